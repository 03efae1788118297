"""Keras 3 → ONNX with fused recurrent ops: parity with Keras, Keras' own test numbers, op counts, step models.

Models are small copies of the Keras RNN guide / keras.io examples (IMDB bidirectional LSTM, weather
regression, seq2seq, encoder–decoder, the notebook's MNIST LSTM), built with fixed seeds; inputs are in
their real range (ids inside the vocabulary, floats ~N(0, 1)), with post-padding where a mask is used.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest

from edge_rnn.export.keras_onnx import Conversion, NotStreamableError, UnsupportedLayerError, convert
from edge_rnn.tolerances import KERAS_ONNX_ATOL, KERAS_ONNX_RTOL, KERAS_TEST_ORACLE_TOL, STEP_SEQUENCE_ATOL

keras = pytest.importorskip("keras")
layers = keras.layers

B, T, F = 4, 7, 3
VOCAB = 30
RECURRENT = ("LSTM", "GRU", "RNN")


# --- helpers ---------------------------------------------------------------------------------------

def session(conv: Conversion) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the test machine has 2 shared cores
    return ort.InferenceSession(conv.model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(conv: Conversion, inputs: list[np.ndarray]) -> list[np.ndarray]:
    feed = {spec["name"]: x for spec, x in zip(conv.io["inputs"], inputs)}
    return session(conv).run(None, feed)


def keras_outputs(model, inputs: list[np.ndarray]) -> list[np.ndarray]:
    out = model(inputs[0] if len(inputs) == 1 else inputs, training=False)
    return [keras.ops.convert_to_numpy(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def op_counts(conv: Conversion) -> Counter:
    return Counter(node.op_type for node in conv.model.graph.node)


def assert_close(got: np.ndarray, expected: np.ndarray) -> float:
    """Absolute tolerance for outputs of scale ~1, relative beyond; returns max |Δ|."""
    assert got.shape == expected.shape
    scale = float(np.max(np.abs(expected)))
    if scale > 10:
        np.testing.assert_allclose(got, expected, rtol=KERAS_ONNX_RTOL, atol=0)
    else:
        np.testing.assert_allclose(got, expected, rtol=0, atol=KERAS_ONNX_ATOL)
    return float(np.max(np.abs(got - expected)))


def post_padded(x: np.ndarray, lengths: list[int], pad: float = 0.0) -> np.ndarray:
    x = x.copy()
    for row, n in enumerate(lengths):
        x[row, n:] = pad
    return x


def floats(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def ids(*shape: int, lengths: list[int], seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).integers(1, VOCAB, shape).astype(np.int32)  # 0 is the padding id
    return post_padded(x, lengths).astype(np.int32)


def randomise(model, seed: int = 0) -> None:
    """Non-trivial BatchNormalization statistics (fresh ones are mean 0, variance 1)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.moving_mean.assign(rng.standard_normal(layer.moving_mean.shape).astype(np.float32) * 0.3)
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape).astype(np.float32))
            layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape).astype(np.float32))
            layer.beta.assign(rng.standard_normal(layer.beta.shape).astype(np.float32) * 0.1)


# --- models ----------------------------------------------------------------------------------------
# Each builder returns (model, inputs, number of Keras recurrent layers that must become fused ops).

LENGTHS = [T, 5, 2, 0]  # full, partial, short and fully masked rows


def imdb_bidirectional():
    model = keras.Sequential([
        keras.Input((T,), dtype="int32", name="ids"),
        layers.Embedding(VOCAB, 8, mask_zero=True),
        layers.Bidirectional(layers.LSTM(8)),
        layers.Dense(1, activation="sigmoid"),
    ])
    return model, [ids(B, T, lengths=LENGTHS)], 1


def weather_regressor():
    model = keras.Sequential([keras.Input((10, 5)), layers.LSTM(16), layers.Dense(1)])
    dense = model.layers[-1]
    # An unnormalized target (temperatures in kelvin): outputs ~300, far from 1.
    dense.kernel.assign(dense.kernel * 40.0)
    dense.bias.assign(np.array([290.0], np.float32))
    return model, [floats(B, 10, 5)], 1


def seq2seq_repeat():
    model = keras.Sequential([
        keras.Input((T, F)),
        layers.LSTM(12),
        layers.RepeatVector(5),
        layers.LSTM(12, return_sequences=True),
        layers.TimeDistributed(layers.Dense(4, activation="softmax")),
    ])
    return model, [floats(B, T, F)], 2


def encoder_decoder():
    enc_in = keras.Input((None, 4), name="encoder_inputs")
    dec_in = keras.Input((None, 5), name="decoder_inputs")
    _, h, c = layers.LSTM(10, return_state=True, name="encoder")(enc_in)
    dec = layers.LSTM(10, return_sequences=True, name="decoder")(dec_in, initial_state=[h, c])
    out = layers.Dense(5, activation="softmax", name="probs")(dec)
    model = keras.Model([enc_in, dec_in], out)
    return model, [floats(B, 6, 4), floats(B, 5, 5, seed=1)], 2


def gru_gru_rnn_stack():
    model = keras.Sequential([
        keras.Input((T, F)),
        layers.GRU(10, reset_after=True, return_sequences=True),
        layers.GRU(10, reset_after=False, return_sequences=True),
        layers.SimpleRNN(8),
        layers.Dense(3),
    ])
    return model, [floats(B, T, F)], 3


def masking_lstm():
    model = keras.Sequential([
        keras.Input((T, F)),
        layers.Masking(0.0),
        layers.LSTM(8, return_sequences=True),
        layers.Dropout(0.3),
        layers.LSTM(8, return_sequences=True),
        layers.TimeDistributed(layers.Dense(2)),
    ])
    return model, [post_padded(floats(B, T, F), LENGTHS)], 2


def masking_bidirectional(merge_mode):
    def build():
        model = keras.Sequential([
            keras.Input((T, F)),
            layers.Masking(0.0),
            layers.Bidirectional(layers.GRU(8, return_sequences=True), merge_mode=merge_mode),
        ])
        return model, [post_padded(floats(B, T, F), LENGTHS)], 1
    return build


def go_backwards(cell, masked: bool):
    def build():
        x = keras.Input((T, F))
        y = layers.Masking(0.0)(x) if masked else x
        outputs = cell(8, go_backwards=True, return_sequences=True, return_state=True)(y)
        model = keras.Model(x, outputs)
        data = floats(B, T, F)
        return model, [post_padded(data, LENGTHS) if masked else data], 1
    return build


def hard_sigmoid_cells():
    model = keras.Sequential([
        keras.Input((T, F)),
        layers.LSTM(8, recurrent_activation="hard_sigmoid", return_sequences=True),
        layers.GRU(8, recurrent_activation="hard_sigmoid", activation="elu", return_sequences=True),
        layers.SimpleRNN(8, activation="softsign"),
    ])
    return model, [floats(B, T, F)], 3


def norms_and_merges():
    x = keras.Input((T, F))
    a = layers.LSTM(8, return_sequences=True)(x)
    d = layers.Dense(8, activation="tanh")(x)
    y = layers.Concatenate()([a, d])
    y = layers.BatchNormalization()(y)
    y = layers.LayerNormalization()(y)
    y = layers.Add()([y, layers.Dense(16)(y)])
    y = layers.GRU(8)(y)
    model = keras.Model(x, layers.Dense(2, activation="softmax")(y))
    randomise(model)
    return model, [floats(B, T, F)], 2


def dense_activations():
    names = ["linear", "relu", "sigmoid", "tanh", "softmax", "hard_sigmoid", "elu", "selu", "softplus",
             "softsign", "swish", "silu", "gelu", "relu6", "leaky_relu"]
    x = keras.Input((6,))
    branches = [layers.Dense(4, activation=name)(layers.Dense(6)(x)) for name in names]
    model = keras.Model(x, layers.Concatenate()(branches))
    return model, [floats(B, 6) * 3], 0


def flatten_reshape():
    x = keras.Input((T, F))
    y = layers.SimpleRNN(8, return_sequences=True)(x)
    y = layers.Reshape((T * 2, 4))(y)
    y = layers.Flatten()(y)
    return keras.Model(x, layers.Dense(3)(y)), [floats(B, T, F)], 1


def mnist_lstm():
    # The notebook's architecture: 28 rows of 28 pixels as a 28-step sequence.
    model = keras.Sequential([
        keras.Input((28, 28)),
        layers.LSTM(128, activation="relu", return_sequences=True),
        layers.Dropout(0.2),
        layers.LSTM(128, activation="relu"),
        layers.Dropout(0.2),
        layers.Dense(32, activation="relu"),
        layers.Dropout(0.2),
        layers.Dense(10, activation="softmax"),
    ])
    pixels = np.random.default_rng(0).random((3, 28, 28), dtype=np.float32)  # preprocessed range [0, 1]
    return model, [pixels], 2


MODELS = {
    "imdb_bidirectional": imdb_bidirectional,
    "weather_regressor": weather_regressor,
    "seq2seq_repeat": seq2seq_repeat,
    "encoder_decoder": encoder_decoder,
    "gru_gru_rnn_stack": gru_gru_rnn_stack,
    "masking_lstm": masking_lstm,
    **{f"bidirectional_{m}": masking_bidirectional(m) for m in ("concat", "sum", "mul", "ave", None)},
    **{f"go_backwards_{c.__name__}_{'masked' if m else 'dense'}": go_backwards(c, m)
       for c in (layers.LSTM, layers.GRU, layers.SimpleRNN) for m in (False, True)},
    "hard_sigmoid_cells": hard_sigmoid_cells,
    "norms_and_merges": norms_and_merges,
    "dense_activations": dense_activations,
    "flatten_reshape": flatten_reshape,
    "mnist_lstm": mnist_lstm,
}

_built: dict[str, tuple] = {}


def built(name: str):
    """Build each model once per module (seeded), so parity and step tests share it."""
    if name not in _built:
        keras.utils.set_random_seed(0)
        _built[name] = MODELS[name]()
    return _built[name]


# --- parity with Keras -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_parity_with_keras_and_fused_ops(name):
    model, inputs, n_recurrent = built(name)
    conv = convert(model)
    got = run(conv, inputs)
    expected = keras_outputs(model, inputs)
    assert [o["name"] for o in conv.io["outputs"]] == [o.name for o in conv.model.graph.output]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert_close(g, e)
    counts = op_counts(conv)
    assert sum(counts[op] for op in RECURRENT) == n_recurrent
    assert counts["Loop"] == counts["Scan"] == 0


@pytest.mark.parametrize("opset", range(13, 19))
def test_every_supported_opset(opset):
    """Masking (ReduceMax), LayerNormalization (decomposed below 17) and Split differ across opsets."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((T, F)),
        layers.Masking(0.0),
        layers.Bidirectional(layers.LSTM(8, return_sequences=True)),
        layers.LayerNormalization(),
        layers.GRU(8),
    ])
    x = post_padded(floats(B, T, F), LENGTHS)
    conv = convert(model, opset=opset)
    assert conv.model.opset_import[0].version == opset
    assert_close(run(conv, [x])[0], keras_outputs(model, [x])[0])
    assert ("LayerNormalization" in op_counts(conv)) == (opset >= 17)


def test_io_masking_and_audit_describe_the_graph():
    model, _, _ = built("imdb_bidirectional")
    conv = convert(model)
    assert conv.io["inputs"] == [{"name": "ids", "dtype": "int32", "shape": ["batch", T]}]
    assert conv.io["outputs"] == [{"name": model.layers[-1].name, "dtype": "float32", "shape": ["batch", 1]}]
    assert conv.masking == [{"input": "ids", "kind": "mask_zero", "value": 0.0}]
    assert conv.state == []
    assert [(a.cls, a.onnx_ops) for a in conv.audit[:1]] == [("InputLayer", [])]
    by_layer = {a.layer: a for a in conv.audit}
    bidi = by_layer[model.layers[1].name]
    assert bidi.fused and bidi.onnx_ops.count("LSTM") == 1 and "int8" in bidi.note
    assert not by_layer[model.layers[0].name].fused and by_layer[model.layers[0].name].onnx_ops == ["Gather"]

    model, _, _ = built("encoder_decoder")
    conv = convert(model)
    assert [spec["shape"] for spec in conv.io["inputs"]] == [["batch", "time", 4], ["batch", "time", 5]]
    assert [spec["name"] for spec in conv.io["inputs"]] == ["encoder_inputs", "decoder_inputs"]
    gru_note = next(a.note for a in convert(built("gru_gru_rnn_stack")[0]).audit if a.cls == "GRU")
    assert "GRU stays float32" in gru_note


def test_masked_steps_follow_keras_3():
    """Keras 3 carries the last valid output over masked steps (zero_output_for_mask=False) and outputs
    zeros for a fully masked row; ONNX alone would write zeros at every t ≥ len."""
    model, (x,), _ = built("masking_lstm")
    conv = convert(model)
    sub = keras.Model(model.inputs[0], model.layers[1].output)  # the first LSTM's sequence
    (seq,) = keras_outputs(sub, [x])
    np.testing.assert_array_equal(seq[1, 5:], np.broadcast_to(seq[1, 4], seq[1, 5:].shape))
    np.testing.assert_array_equal(seq[3], 0.0)
    assert_close(run(conv, [x])[0], keras_outputs(model, [x])[0])
    assert op_counts(conv)["Where"] == 2  # one carry-forward per unidirectional layer


# --- Keras' own test expectations ------------------------------------------------------------------
# Literal outputs from keras-team/keras keras/src/layers/rnn/{lstm,gru,simple_rnn,bidirectional}_test.py
# (the copies installed with keras 3.15), reproduced through convert() and onnxruntime.

def constant_cell(cls, units: int, **kwargs):
    init = keras.initializers.Constant
    return cls(units, kernel_initializer=init(0.01), recurrent_initializer=init(0.02),
               bias_initializer=init(0.03), **kwargs)


def oracle_run(layer_fn, sequence: np.ndarray, *, extra_inputs: list[np.ndarray] = (), masked: bool = False):
    x = keras.Input(sequence.shape[1:])
    extras = [keras.Input(e.shape[1:]) for e in extra_inputs]
    y = layers.Masking(-1.0)(x) if masked else x
    out = layer_fn(y, extras)
    model = keras.Model([x, *extras], out)
    conv = convert(model)
    assert sum(op_counts(conv)[op] for op in RECURRENT) >= 1 and op_counts(conv)["Loop"] == 0
    return run(conv, [sequence, *extra_inputs])


SEQ_3x6x4 = np.arange(72).reshape((3, 6, 4)).astype("float32")
SEQ_2x3x4 = np.arange(24).reshape((2, 3, 4)).astype("float32")
SEQ_2x4x3 = np.arange(24).reshape((2, 4, 3)).astype("float32")

KERAS_CORRECTNESS = {
    # lstm_test.py::test_correctness
    "lstm": (layers.LSTM, {}, SEQ_3x6x4, [0.6288687, 0.86899155, 0.9460773]),
    "lstm_go_backwards": (layers.LSTM, {"go_backwards": True}, SEQ_3x6x4, [0.35622165, 0.74789524, 0.8872726]),
    "lstm_no_unit_forget_bias": (layers.LSTM, {"unit_forget_bias": False}, SEQ_3x6x4,
                                 [0.57019705, 0.8661914, 0.9459622]),
    "lstm_no_bias": (layers.LSTM, {"use_bias": False}, SEQ_3x6x4, [0.54986924, 0.86226785, 0.9443936]),
    # gru_test.py::test_correctness
    "gru": (layers.GRU, {}, SEQ_3x6x4, [0.5217289, 0.6371659, 0.39384964]),
    "gru_go_backwards": (layers.GRU, {"go_backwards": True}, SEQ_3x6x4, [0.24406259, 0.611516, 0.3928808]),
    "gru_reset_before": (layers.GRU, {"reset_after": False}, SEQ_3x6x4, [0.51447755, 0.6426879, 0.40208298]),
    "gru_no_bias": (layers.GRU, {"use_bias": False}, SEQ_3x6x4, [0.49988455, 0.64701194, 0.4103359]),
    # simple_rnn_test.py::test_correctness
    "simple_rnn": (layers.SimpleRNN, {}, SEQ_2x3x4, [0.405432, 0.73605347]),
    "simple_rnn_go_backwards": (layers.SimpleRNN, {"go_backwards": True}, SEQ_2x3x4, [0.11144729, 0.5528889]),
}


@pytest.mark.parametrize("case", list(KERAS_CORRECTNESS))
def test_keras_correctness_numbers(case):
    cls, kwargs, sequence, per_row = KERAS_CORRECTNESS[case]
    units = 4 if cls is layers.SimpleRNN else 3
    (got,) = oracle_run(lambda y, _: constant_cell(cls, units, **kwargs)(y), sequence)
    expected = np.repeat(np.array(per_row, np.float32)[:, None], units, axis=1)
    np.testing.assert_allclose(got, expected, atol=KERAS_TEST_ORACLE_TOL, rtol=KERAS_TEST_ORACLE_TOL)


def test_keras_pass_initial_state_numbers():
    """lstm_test.py::test_pass_initial_state and gru_test.py::test_pass_return_state."""
    state = np.arange(4).reshape((2, 2)).astype("float32")
    for go_back, expected in [(False, [[0.20574439, 0.3558822], [0.64930826, 0.66276]]),
                              (True, [[0.13281618, 0.2790356], [0.5839337, 0.5992567]])]:
        (got,) = oracle_run(lambda y, hc: constant_cell(layers.LSTM, 2, go_backwards=go_back)(y, initial_state=hc),
                            SEQ_2x4x3, extra_inputs=[state, state])
        np.testing.assert_allclose(got, expected, atol=KERAS_TEST_ORACLE_TOL, rtol=KERAS_TEST_ORACLE_TOL)
    for go_back, expected in [(False, [[0.23774096, 0.33508456], [0.83659905, 1.0227708]]),
                              (True, [[0.13486053, 0.23261218], [0.78257304, 0.9691353]])]:
        output, h = oracle_run(
            lambda y, h0: constant_cell(layers.GRU, 2, go_backwards=go_back, return_state=True)(y, initial_state=h0),
            SEQ_2x4x3, extra_inputs=[state])
        np.testing.assert_allclose(output, expected, atol=KERAS_TEST_ORACLE_TOL, rtol=KERAS_TEST_ORACLE_TOL)
        np.testing.assert_allclose(h, expected, atol=KERAS_TEST_ORACLE_TOL, rtol=KERAS_TEST_ORACLE_TOL)


def test_keras_masking_numbers():
    """lstm_test.py::test_masking with its post-padded mask [[T, T, T, F], [T, T, F, F]], given to the
    layer by Masking(-1) over steps set to -1: last output, carried-forward sequence, zeroed sequence."""
    sequence = SEQ_2x4x3.copy()
    sequence[0, 3:] = sequence[1, 2:] = -1.0
    row0 = [[0.01588910] * 2, [0.05552048] * 2, [0.11755939] * 2]
    row1 = [[0.14185596] * 2, [0.28556206] * 2]
    cases = [
        ({}, np.array([[0.11755939] * 2, [0.28556206] * 2])),
        ({"return_sequences": True}, np.array([row0 + [row0[-1]], row1 + [row1[-1]] * 2])),
        ({"return_sequences": True, "zero_output_for_mask": True}, np.array([row0 + [[0.0] * 2], row1 + [[0.0] * 2] * 2])),
    ]
    for kwargs, expected in cases:
        (got,) = oracle_run(lambda y, _: constant_cell(layers.LSTM, 2, **kwargs)(y), sequence, masked=True)
        np.testing.assert_allclose(got, expected, atol=KERAS_TEST_ORACLE_TOL, rtol=KERAS_TEST_ORACLE_TOL)


def test_keras_bidirectional_numbers():
    """bidirectional_test.py::test_correctness and ::test_return_state."""
    tol = dict(atol=KERAS_TEST_ORACLE_TOL, rtol=KERAS_TEST_ORACLE_TOL)
    rnn = lambda: constant_cell(layers.SimpleRNN, 2)  # noqa: E731 — a fresh layer per model
    (got,) = oracle_run(lambda y, _: layers.Bidirectional(rnn())(y), SEQ_2x3x4)
    np.testing.assert_allclose(got, [[0.39687276, 0.39687276, 0.10004295, 0.10004295],
                                     [0.7237238, 0.7237238, 0.53391594, 0.53391594]], **tol)
    (got,) = oracle_run(lambda y, _: layers.Bidirectional(rnn(), merge_mode="ave")(y), SEQ_2x3x4)
    np.testing.assert_allclose(got, [[0.24845785, 0.24845785], [0.6288199, 0.6288199]], **tol)
    fwd, bwd = oracle_run(lambda y, _: layers.Bidirectional(rnn(), merge_mode=None)(y), SEQ_2x3x4)
    np.testing.assert_allclose(fwd, [[0.39687276, 0.39687276], [0.7237238, 0.7237238]], **tol)
    np.testing.assert_allclose(bwd, [[0.10004295, 0.10004295], [0.53391594, 0.53391594]], **tol)

    def custom_backward(y, _):
        init = keras.initializers.Constant
        backward = layers.SimpleRNN(2, kernel_initializer=init(0.03), recurrent_initializer=init(0.02),
                                    bias_initializer=init(0.01), go_backwards=True)
        return layers.Bidirectional(rnn(), backward_layer=backward, merge_mode="mul")(y)

    (got,) = oracle_run(custom_backward, SEQ_2x3x4)
    np.testing.assert_allclose(got, [[0.08374989, 0.08374989], [0.6740834, 0.6740834]], **tol)
    (got,) = oracle_run(
        lambda y, _: layers.Bidirectional(constant_cell(layers.GRU, 2, return_sequences=True), merge_mode="sum")(y),
        SEQ_2x3x4)
    np.testing.assert_allclose(got, [[[0.20937867] * 2, [0.34462988] * 2, [0.40290534] * 2],
                                     [[0.59829646] * 2, [0.6734641] * 2, [0.6479671] * 2]], **tol)
    output, h1, c1, h2, c2 = oracle_run(
        lambda y, _: layers.Bidirectional(constant_cell(layers.LSTM, 2, return_state=True))(y), SEQ_2x4x3)
    np.testing.assert_allclose(output, [[0.1990008, 0.1990008, 0.12659755, 0.12659755],
                                        [0.52335435, 0.52335435, 0.44717982, 0.44717982]], **tol)
    np.testing.assert_allclose(h1, [[0.1990008] * 2, [0.52335435] * 2], **tol)
    np.testing.assert_allclose(c1, [[0.35567185] * 2, [1.0492687] * 2], **tol)
    np.testing.assert_allclose(h2, [[0.12659755] * 2, [0.44717982] * 2], **tol)
    np.testing.assert_allclose(c2, [[0.2501858] * 2, [0.941473] * 2], **tol)


# --- step models -----------------------------------------------------------------------------------

def run_steps(conv: Conversion, inputs: list[np.ndarray], *, initial: dict[str, np.ndarray] | None = None):
    """Feed a step model one time step at a time from zero (or given) states; returns per-step outputs."""
    sess = session(conv)
    n_model_inputs = len(conv.io["inputs"]) - len(conv.state)
    names = [spec["name"] for spec in conv.io["inputs"][:n_model_inputs]]
    batch = inputs[0].shape[0]
    state = {s["input"]: np.zeros((batch, s["shape"][1]), np.float32) for s in conv.state}
    state.update(initial or {})
    out_names = [spec["name"] for spec in conv.io["outputs"]]
    steps = []
    for t in range(inputs[0].shape[1]):
        feed = {name: x[:, t:t + 1] for name, x in zip(names, inputs)}
        outs = dict(zip(out_names, sess.run(None, {**feed, **state})))
        state = {s["input"]: outs[s["output"]] for s in conv.state}
        steps.append(outs)
    return steps


STEPPABLE = ["masking_lstm", "gru_gru_rnn_stack", "mnist_lstm", "hard_sigmoid_cells", "norms_and_merges"]


@pytest.mark.parametrize("name", STEPPABLE)
def test_step_model_matches_sequence_model(name):
    model, inputs, n_recurrent = built(name)
    sequence = convert(model)
    stepper = convert(model, step=True)
    # One state per cell of the sequence model (h, and c for an LSTM), whether the step runs it fused or decomposed.
    assert len(stepper.state) == sum(2 if op == "LSTM" else 1 for op in op_counts(sequence).elements() if op in RECURRENT)
    assert not {op for op in op_counts(stepper) if op in ("Loop", "Scan")}
    for s in stepper.state:
        assert s["input"] == f"state.{s['layer']}.{s['name']}" and s["output"] == f"state_out.{s['layer']}.{s['name']}"
    assert all(spec["shape"][1] == 1 for spec in stepper.io["inputs"][: len(inputs)])
    expected = run(sequence, inputs)
    steps = run_steps(stepper, inputs)
    for k, spec in enumerate(sequence.io["outputs"]):
        whole = expected[k]
        if whole.ndim == 3:  # a return_sequences output: one time step per call
            got = np.concatenate([step[spec["name"]] for step in steps], axis=1)
        else:
            got = steps[-1][spec["name"]]
        np.testing.assert_allclose(got, whole, atol=STEP_SEQUENCE_ATOL, rtol=0)


def test_masked_step_keeps_the_state():
    """Embedding(mask_zero) → LSTM: stepping over padding (id 0) leaves the state and output unchanged."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((T,), dtype="int32"), layers.Embedding(VOCAB, 6, mask_zero=True),
                              layers.LSTM(8, return_sequences=True), layers.GRU(8)])
    x = ids(B, T, lengths=[T, 4, 1, 3])
    stepper = convert(model, step=True)
    assert stepper.masking == [{"input": stepper.io["inputs"][0]["name"], "kind": "mask_zero", "value": 0.0}]
    steps = run_steps(stepper, [x])
    final = steps[-1][stepper.io["outputs"][0]["name"]]
    np.testing.assert_allclose(final, run(convert(model), [x])[0], atol=STEP_SEQUENCE_ATOL, rtol=0)
    np.testing.assert_allclose(final, keras_outputs(model, [x])[0], atol=KERAS_ONNX_ATOL, rtol=0)
    # Row 1 is padded from step 4 on: its states after step 3 are its final states.
    for s in stepper.state:
        np.testing.assert_array_equal(steps[3][s["output"]][1], steps[-1][s["output"]][1])


def test_step_state_inputs_replace_initial_state_inputs():
    """A masked decoder whose initial state is a model input: over whole sequences a fully masked row
    returns that initial state (onnxruntime alone returns zeros); the step model's state inputs take
    the initial-state inputs' place.

    The mask is passed explicitly: Keras 3.15 records no mask for a layer called with initial_state in
    a functional model (Masking before it is ignored, by Keras and so by the converter)."""
    keras.utils.set_random_seed(3)
    x, h0, c0 = keras.Input((None, F), name="x"), keras.Input((8,), name="h0"), keras.Input((8,), name="c0")
    lstm = layers.LSTM(8, return_sequences=True, return_state=True, name="decoder")
    mask = keras.ops.any(keras.ops.not_equal(x, 0.0), axis=-1)
    model = keras.Model([x, h0, c0], lstm(x, initial_state=[h0, c0], mask=mask))
    h, c = floats(B, 8, seed=1), floats(B, 8, seed=2)
    sequence = convert(model)
    with_empty_row = post_padded(floats(B, T, F), LENGTHS)
    expected = keras_outputs(model, [with_empty_row, h, c])
    np.testing.assert_array_equal(expected[1][3], h[3])
    for got, e in zip(run(sequence, [with_empty_row, h, c]), expected):
        assert_close(got, e)

    stepper = convert(model, step=True)
    assert [spec["name"] for spec in stepper.io["inputs"]] == ["x", "state.decoder.h", "state.decoder.c"]
    # Masked steps output the state h: Keras' carried-forward output once a row had a valid step.
    data = post_padded(floats(B, T, F), [T, 5, 2, 1])
    whole = run(sequence, [data, h, c])
    steps = run_steps(stepper, [data], initial={"state.decoder.h": h, "state.decoder.c": c})
    got = np.concatenate([step["decoder"] for step in steps], axis=1)
    np.testing.assert_allclose(got, whole[0], atol=STEP_SEQUENCE_ATOL, rtol=0)
    np.testing.assert_allclose(steps[-1]["state_out.decoder.c"], whole[2], atol=STEP_SEQUENCE_ATOL, rtol=0)
    assert [spec["name"] for spec in stepper.io["outputs"]] == [
        "decoder", "decoder.1", "decoder.2", "state_out.decoder.h", "state_out.decoder.c"]


# --- refusals --------------------------------------------------------------------------------------

def test_lambda_layer_is_refused_by_name():
    model = keras.Sequential([keras.Input((T, F)), layers.LSTM(4), layers.Lambda(lambda t: t * 2, name="double")])
    with pytest.raises(UnsupportedLayerError, match=r"'double' \(Lambda\)"):
        convert(model)


def test_unsupported_recurrent_activation_is_refused():
    model = keras.Sequential([keras.Input((T, F)), layers.GRU(4, activation="selu", name="gru_selu")])
    with pytest.raises(UnsupportedLayerError, match=r"'gru_selu' \(GRU\).*'selu'"):
        convert(model)


@pytest.mark.parametrize("name, pattern", [
    ("imdb_bidirectional", r"\(Bidirectional\) reads the sequence backwards"),
    ("go_backwards_GRU_dense", r"\(GRU\) runs backwards"),
    ("seq2seq_repeat", r"\(RepeatVector\)"),
    ("flatten_reshape", r"\(Reshape\) reshapes across the time axis"),
])
def test_whole_sequence_models_have_no_step_form(name, pattern):
    model, _, _ = built(name)
    with pytest.raises(NotStreamableError, match=pattern):
        convert(model, step=True)


def test_float_ids_into_an_embedding_stream_one_step_at_a_time():
    """Keras' default Input is float32: ids fed as floats to an Embedding are still an id sequence, so the step model
    takes one id per call (the export ended in a traceback from its step check when the input was not seen as time)."""
    model = keras.Sequential([keras.Input((None,), name="ids"), layers.Embedding(50, 4), layers.LSTM(5), layers.Dense(3)])
    ids = np.random.default_rng(0).integers(0, 50, (4, 9)).astype(np.float32)
    sequence = convert(model)
    stepper = convert(model, step=True)
    assert stepper.io["inputs"][0]["shape"] == ["batch", 1]
    np.testing.assert_allclose(run(sequence, [ids])[0], model.predict(ids, verbose=0), atol=KERAS_ONNX_ATOL, rtol=KERAS_ONNX_RTOL)
    last = run_steps(stepper, [ids])[-1][sequence.io["outputs"][0]["name"]]
    np.testing.assert_allclose(last, run(sequence, [ids])[0], atol=STEP_SEQUENCE_ATOL, rtol=0)
