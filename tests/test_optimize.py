"""clean_recurrent_graph: a real tf2onnx export of a small LSTM stack, plus hand-built LSTM/GRU/RNN graphs.

tf2onnx + this cleanup is the export path for models keras_onnx refuses (the fallback in
edge_rnn.models.keras_model) and the bench's "plain" baseline; the built-in models export through keras_onnx.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_rnn.export.optimize import clean_recurrent_graph
from edge_rnn.tolerances import CLEAN_FP32_ATOL

SAMPLE = Path(__file__).resolve().parents[1] / "edge_rnn" / "data" / "mnist_sample_5k.npz"
# Ops that only build zero states or move layouts; none should survive the pass on a tf2onnx LSTM stack.
SCAFFOLDING = ("Shape", "Expand", "ConstantOfShape", "Concat", "Cast", "Slice", "Unsqueeze", "Gather")


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture(scope="module")
def sample_digits() -> np.ndarray:
    x = np.load(SAMPLE)["x"][:200]
    return (x / 255.0).astype(np.float32)  # (200, 28, 28)


@pytest.fixture(scope="module")
def exported() -> onnx.ModelProto:
    """The product's architecture at LSTM(16), one short epoch, exported the fallback's way (tf2onnx)."""
    tf = pytest.importorskip("tensorflow")
    tf2onnx = pytest.importorskip("tf2onnx")
    import keras

    keras.utils.set_random_seed(0)
    data = np.load(SAMPLE)
    x, y = (data["x"][:1000] / 255.0).astype(np.float32), data["y"][:1000].astype(np.int64)
    L = keras.layers
    model = keras.Sequential([
        keras.Input((28, 28)),
        L.LSTM(16, activation="relu", return_sequences=True), L.Dropout(0.2),
        L.LSTM(16, activation="relu"), L.Dropout(0.2),
        L.Dense(8, activation="relu"), L.Dropout(0.2),
        L.Dense(10, activation="softmax"),
    ])  # fmt: skip
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    fn = tf.function(lambda t: model(t, training=False))
    spec = [tf.TensorSpec([None, 28, 28], tf.float32, name="input")]
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17)
    return proto


@pytest.fixture(scope="module")
def cleaned(exported) -> tuple[onnx.ModelProto, dict]:
    return clean_recurrent_graph(exported)


def test_clean_removes_scaffolding(exported, cleaned):
    model, report = cleaned
    ops = _ops(model)
    assert _ops(exported)["LSTM"] == 2 and ops["LSTM"] == 2
    assert not [op for op in SCAFFOLDING if ops[op]], ops
    # Only the batch-major → time-major Transpose at the input stays: onnxruntime rejects LSTM layout=1.
    assert ops["Transpose"] == 1
    assert len(report["zero_states_dropped"]) == 4  # initial_h and initial_c of both LSTMs
    assert len(report["last_step_to_y_h"]) == 1
    assert len(report["transposes_folded"]) == 1
    assert report["nodes_before"] == len(exported.graph.node) > report["nodes_after"] == len(model.graph.node)
    for node in model.graph.node:
        if node.op_type == "LSTM":
            assert len(node.input) <= 5  # no initial_h / initial_c left


def test_clean_keeps_outputs_and_validity(exported, cleaned, sample_digits):
    model, _ = cleaned
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == [i.name for i in exported.graph.input]
    assert [o.name for o in model.graph.output] == [o.name for o in exported.graph.output]
    for x in (sample_digits, sample_digits[:1]):  # the batch axis stays dynamic
        (raw,) = _run(exported, {"input": x})
        (new,) = _run(model, {"input": x})
        np.testing.assert_allclose(new, raw, rtol=0, atol=CLEAN_FP32_ATOL)


def test_clean_does_not_mutate_input(exported):
    before = exported.SerializeToString()
    clean_recurrent_graph(exported)
    assert exported.SerializeToString() == before


def test_cleaned_model_quantizes_to_dynamic_lstm(cleaned, exported, sample_digits, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, _ = cleaned
    paths = {}
    for tag, m in (("raw", exported), ("clean", model)):
        onnx.save(m, tmp_path / f"{tag}.onnx")
        quantize_dynamic(tmp_path / f"{tag}.onnx", tmp_path / f"{tag}_int8.onnx", weight_type=QuantType.QInt8)
        paths[tag] = onnx.load(tmp_path / f"{tag}_int8.onnx")
    assert _ops(paths["clean"])["DynamicQuantizeLSTM"] == 2
    assert _ops(paths["clean"])["LSTM"] == 0
    (raw_q,) = _run(paths["raw"], {"input": sample_digits})
    (clean_q,) = _run(paths["clean"], {"input": sample_digits})
    assert clean_q.shape == (len(sample_digits), 10)
    # Same quantized weights through the same kernels: the int8 models agree as closely as the fp32 ones.
    np.testing.assert_allclose(clean_q, raw_q, rtol=0, atol=CLEAN_FP32_ATOL)


# --- hand-built graphs: GRU, RNN, bidirectional LSTM and the rules' limits --------------------------------

H, I, T, B = 3, 2, 4, 2
rng = np.random.default_rng(0)


def _weights(op: str, dirs: int) -> list[onnx.TensorProto]:
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    return [
        numpy_helper.from_array(rng.standard_normal((dirs, gates * H, I)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((dirs, gates * H, H)).astype(np.float32), "R"),
    ]


def _model(nodes, inits, outputs: dict[str, int], inputs=None) -> onnx.ModelProto:
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, "batch", I])]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * rank) for o, rank in outputs.items()]
    graph = helper.make_graph(nodes, "g", inputs, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _zeros_like_batch(out: str) -> list[onnx.NodeProto]:
    """ConstantOfShape([dirs, batch, H]) with batch read at run time, as exporters write it (see _state_consts)."""
    return [
        helper.make_node("Shape", ["x"], ["shape"], start=1, end=2),
        helper.make_node("Concat", ["dirs", "shape", "hidden"], ["state_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["state_shape"], [out]),
    ]


def _state_consts(dirs: int = 1) -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(np.array([dirs], np.int64), "dirs"),
            numpy_helper.from_array(np.array([H], np.int64), "hidden")]  # fmt: skip


def _assert_same(model: onnx.ModelProto, cleaned: onnx.ModelProto) -> None:
    onnx.checker.check_model(cleaned, full_check=True)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    for a, b in zip(_run(model, {"x": x}), _run(cleaned, {"x": x})):
        np.testing.assert_allclose(b, a, rtol=0, atol=CLEAN_FP32_ATOL)


@pytest.mark.parametrize("op", ["GRU", "RNN"])
def test_zero_state_from_constant_of_shape_is_dropped(op):
    rnn = helper.make_node(op, ["x", "W", "R", "", "", "h0"], ["y", "y_h"], hidden_size=H)
    nodes = [*_zeros_like_batch("h0"), rnn]
    model = _model(nodes, _weights(op, 1) + _state_consts(), {"y_h": 3})
    cleaned, report = clean_recurrent_graph(model)
    assert _ops(cleaned) == Counter({op: 1})
    assert [d["tensor"] for d in report["zero_states_dropped"]] == ["h0"]
    _assert_same(model, cleaned)


def test_nonzero_state_is_kept():
    h0 = numpy_helper.from_array(np.full((1, 1, H), 0.5, np.float32), "h0_value")
    nodes = [
        helper.make_node("Shape", ["x"], ["batch"], start=1, end=2),
        helper.make_node("Concat", ["dirs", "batch", "hidden"], ["state_shape"], axis=0),
        helper.make_node("Expand", ["h0_value", "state_shape"], ["h0"]),
        helper.make_node("RNN", ["x", "W", "R", "", "", "h0"], ["y", "y_h"], hidden_size=H),
    ]
    model = _model(nodes, _weights("RNN", 1) + _state_consts() + [h0], {"y_h": 3})
    cleaned, report = clean_recurrent_graph(model)
    assert report["zero_states_dropped"] == []
    assert cleaned.graph.node[-1].input[5] == "h0"


def test_zero_times_runtime_value_is_not_zero():
    """0 * inf is NaN, so Mul by zero proves nothing unless the other factor is a finite constant."""
    zero = numpy_helper.from_array(np.zeros((1, 1, H), np.float32), "zero")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, "batch", I]),
              helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, "batch", H])]  # fmt: skip
    nodes = [
        helper.make_node("Mul", ["s", "zero"], ["h0"]),
        helper.make_node("LSTM", ["x", "W", "R", "", "", "h0", "zero"], ["y", "y_h"], hidden_size=H),
    ]
    model = _model(nodes, _weights("LSTM", 1) + [zero], {"y_h": 3}, inputs)
    cleaned, report = clean_recurrent_graph(model)
    assert [d["input"] for d in report["zero_states_dropped"]] == [6]  # initial_c (constant zero) only
    assert cleaned.graph.node[-1].input[5] == "h0"


def test_bidirectional_last_steps_become_y_h():
    """tf2onnx's Bidirectional pattern: per direction Slice(Y, dir) → Squeeze → Slice(time) → Squeeze."""
    ints = {n: numpy_helper.from_array(np.array([v], np.int64), n)
            for n, v in {"i0": 0, "i1": 1, "i2": 2, "im1": -1, "end": 2**31 - 1}.items()}  # fmt: skip
    nodes = [*_zeros_like_batch("h0"),
             helper.make_node("LSTM", ["x", "W", "R", "", "", "h0", "h0"], ["y"], hidden_size=H,
                              direction="bidirectional")]  # fmt: skip
    for d, (start, end) in enumerate([("im1", "end"), ("i0", "i1")]):  # forward: last step; reverse: first
        nodes += [
            helper.make_node("Slice", ["y", f"i{d}", f"i{d + 1}", "i1"], [f"y{d}"]),
            helper.make_node("Squeeze", [f"y{d}", "i1"], [f"s{d}"]),
            helper.make_node("Slice", [f"s{d}", start, end, "i0"], [f"t{d}"]),
            helper.make_node("Squeeze", [f"t{d}", "i0"], [f"last{d}"]),
        ]
    nodes.append(helper.make_node("Concat", ["last0", "last1"], ["out"], axis=1))
    model = _model(nodes, _weights("LSTM", 2) + _state_consts(2) + list(ints.values()), {"out": 2})
    cleaned, report = clean_recurrent_graph(model)
    assert len(report["last_step_to_y_h"]) == 2
    lstm = next(n for n in cleaned.graph.node if n.op_type == "LSTM")
    assert list(lstm.output) == ["", lstm.output[1]]  # Y no longer written, only Y_h
    _assert_same(model, cleaned)


@pytest.mark.parametrize(
    ("direction", "lens"),
    [
        ("forward", True),  # with sequence_lens, Y_h is each sequence's own last step; Y[-1] is zero-padded
        ("reverse", False),  # a reverse pass ends at t = 0: Y_h is Y[0], not Y[-1]
    ],
)
def test_last_step_rewrite_needs_proof(direction, lens):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, "batch", I])
    inputs = [x, helper.make_tensor_value_info("lens", TensorProto.INT32, ["batch"])] if lens else [x]
    ints = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("i0", 0), ("i1", 1), ("im1", -1))]
    ints.append(numpy_helper.from_array(np.array([2**31 - 1], np.int64), "end"))
    nodes = [
        helper.make_node("GRU", ["x", "W", "R", "", "lens" if lens else ""], ["y"], hidden_size=H,
                         direction=direction),
        helper.make_node("Squeeze", ["y", "i1"], ["s"]),
        helper.make_node("Slice", ["s", "im1", "end", "i0"], ["last"]),
    ]
    model = _model(nodes, _weights("GRU", 1) + ints, {"last": 3}, inputs)
    cleaned, report = clean_recurrent_graph(model)
    assert report["last_step_to_y_h"] == [] and _ops(cleaned)["Slice"] == 1


def test_transpose_pairs_merge_or_cancel():
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])]
    nodes = [
        helper.make_node("Transpose", ["x"], ["a"], perm=[1, 0, 2]),
        helper.make_node("Transpose", ["a"], ["b"], perm=[1, 0, 2]),  # cancels
        helper.make_node("Transpose", ["b"], ["c"], perm=[2, 0, 1]),
        helper.make_node("Transpose", ["c"], ["out"], perm=[0, 2, 1]),  # merges into one
    ]
    model = _model(nodes, [], {"out": 3}, inputs)
    cleaned, report = clean_recurrent_graph(model)
    assert _ops(cleaned) == Counter({"Transpose": 1})
    assert [o.name for o in cleaned.graph.output] == ["out"]
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run(cleaned, {"x": x})[0], _run(model, {"x": x})[0])
