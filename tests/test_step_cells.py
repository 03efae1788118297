"""Step models with decomposed cells (export/decomposed.py): one time step as MatMul + element-wise gates.

Through the real CLI export where the form is the default (GRU, SimpleRNN) and with the LSTM's form switched in
decomposed.STEP_FORMS (the fused LSTM stays the default): the step model fed one step at a time equals model.onnx
and Keras' predict, holds no fused recurrent op and no Loop/Scan, and says so in its doc string. A cell whose gate
blocks are swapped is refused by the export's own step-vs-sequence parity check. Directly: decomposed == fused for
every activation the fused ops support, and the char RNN's decomposed step graph == its sequence graph.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import dataclasses

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from edge_rnn.cli import app
from edge_rnn.device.manifest import load_manifest
from edge_rnn.errors import EdgeRnnError
from edge_rnn.export import decomposed
from edge_rnn.export.graphs import char_rnn_model, char_rnn_step_model, op_counts
from edge_rnn.export.validate import session
from edge_rnn.tolerances import KERAS_ONNX_ATOL, STEP_SEQUENCE_ATOL

keras = pytest.importorskip("keras")
layers = keras.layers

runner = CliRunner()
T = 6
F = 3
FUSED = ("LSTM", "GRU", "RNN", "Loop", "Scan")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def in_memory(model: onnx.ModelProto):
    """A one-thread onnxruntime session over a graph that is never written to disk."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def lstm():
    return keras.Sequential([keras.Input((None, F), name="x"), layers.LSTM(5, return_sequences=True, name="lstm"),
                             layers.LSTM(4, activation="relu", name="lstm2"), layers.Dense(2, name="y")])


def gru_reset_after():
    return keras.Sequential([keras.Input((None, F), name="x"), layers.GRU(5, name="gru"), layers.Dense(2, name="y")])


def gru_reset_before():
    return keras.Sequential([keras.Input((None, F), name="x"), layers.GRU(5, reset_after=False, return_sequences=True,
                                                                          name="gru"),
                             layers.TimeDistributed(layers.Dense(2), name="y")])


def simple_rnn():
    return keras.Sequential([keras.Input((None, F), name="x"), layers.SimpleRNN(5, activation="relu", name="rnn"),
                             layers.Dense(2, name="y")])


def stacked():
    return keras.Sequential([keras.Input((None, F), name="x"),
                             layers.RNN([layers.GRUCell(5), layers.SimpleRNNCell(4)], return_sequences=True, name="stack"),
                             layers.GRU(3, name="gru"), layers.Dense(2, name="y")])


def masked():
    return keras.Sequential([keras.Input((None, F), name="x"), layers.Masking(0.0),
                             layers.GRU(5, return_sequences=True, name="gru"),
                             layers.TimeDistributed(layers.Dense(2), name="y")])


def masked_zero_output():
    return keras.Sequential([keras.Input((None, F), name="x"), layers.Masking(0.0),
                             layers.SimpleRNN(5, return_sequences=True, zero_output_for_mask=True, name="rnn"),
                             layers.LSTM(4, return_sequences=True, zero_output_for_mask=True, name="lstm"),
                             layers.TimeDistributed(layers.Dense(2), name="y")])


# name → (builder, MatMul count in model.step.onnx: two per decomposed cell, one per GRU(reset_before) candidate,
# one per Dense)
MODELS = {
    "lstm": (lstm, 2 * 2 + 1),
    "gru_reset_after": (gru_reset_after, 2 + 1),
    "gru_reset_before": (gru_reset_before, 3 + 1),
    "simple_rnn": (simple_rnn, 2 + 1),
    "stacked": (stacked, 2 + 2 + 2 + 1),
    "masked": (masked, 2 + 1),
    "masked_zero_output": (masked_zero_output, 2 + 2 + 1),
}


@pytest.fixture
def decomposed_lstm(monkeypatch):
    """Every cell kind decomposed in step models (the LSTM's default form is fused)."""
    monkeypatch.setitem(decomposed.STEP_FORMS, "LSTM", "decomposed")


def inputs(name: str, *, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((4, T, F)).astype(np.float32)
    if name.startswith("masked"):  # post-padded rows, one fully masked
        x[1, 3:] = 0.0
        x[2, :] = 0.0
    return x


def step_through(path, step: dict, x: np.ndarray) -> list[dict]:
    sess = session(path)
    names = [o.name for o in sess.get_outputs()]
    state = {s["input"]: np.zeros((len(x), s["shape"][-1]), np.float32) for s in step["state"]}
    steps = []
    for t in range(x.shape[1]):
        got = dict(zip(names, sess.run(None, {"x": x[:, t:t + 1], **state})))
        state = {s["input"]: got[s["output"]] for s in step["state"]}
        steps.append(got)
    return steps


@pytest.mark.parametrize("name", list(MODELS))
def test_decomposed_step_model_equals_sequence_model_and_keras(name, tmp_path, decomposed_lstm):
    build, matmuls = MODELS[name]
    keras.utils.set_random_seed(0)
    path = tmp_path / f"{name}.keras"
    build().save(path)
    result = run("export", path, "--out", tmp_path / name)
    assert result.exit_code == 0, result.output
    folder = tmp_path / name
    manifest = load_manifest(folder)
    step_model = onnx.load(str(folder / manifest["files"]["onnx_step"]["path"]))
    counts = op_counts(step_model)
    assert not set(FUSED) & set(counts), counts
    assert counts["MatMul"] == matmuls and counts.get("Concat", 0) == 0, counts
    assert step_model.graph.doc_string.startswith(decomposed.DECOMPOSED_NOTE)
    # The manifest's audit (from the whole-sequence conversion) names the step model's form as well.
    assert any("step model runs the" in a["note"] and "decomposed" in a["note"] for a in manifest["audit"])
    assert all(c["ok"] for checks in manifest["metrics"]["export_parity"].values() for c in checks.values())

    x = inputs(name, seed=2)
    sess = session(folder / "model.onnx")
    whole = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))
    want = keras.saving.load_model(path).predict(x, batch_size=len(x), verbose=0)
    steps = step_through(folder / "model.step.onnx", manifest["step"], x)
    (spec,) = manifest["step"]["outputs"]
    ref = whole[spec["name"]]
    got = np.concatenate([s[spec["name"]] for s in steps], axis=1) if ref.ndim == 3 else steps[-1][spec["name"]]
    np.testing.assert_allclose(got, ref, atol=STEP_SEQUENCE_ATOL, rtol=0)
    np.testing.assert_allclose(got, want, atol=KERAS_ONNX_ATOL + STEP_SEQUENCE_ATOL, rtol=0)


def test_default_forms_and_the_audit_note():
    """The defaults (GRU and SimpleRNN decomposed, LSTM fused) and the step conversion's audit naming the form."""
    from edge_rnn.export.keras_onnx import convert

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((None, F), name="x"), layers.LSTM(4, return_sequences=True, name="lstm"),
                              layers.GRU(4, return_sequences=True, name="gru"), layers.SimpleRNN(3, name="rnn")])
    step = convert(model, step=True)
    counts = op_counts(step.model)
    assert counts.get("LSTM") == 1 and "GRU" not in counts and "RNN" not in counts
    notes = {a.layer: a.note for a in step.audit}
    assert decomposed.DECOMPOSED_NOTE in notes["gru"] and decomposed.DECOMPOSED_NOTE in notes["rnn"]
    assert decomposed.DECOMPOSED_NOTE not in notes["lstm"] and "MatMul int8" in notes["gru"]
    assert "gru, rnn" in step.model.graph.doc_string
    assert op_counts(convert(model, step=True, step_form="fused").model).get("GRU") == 1
    with pytest.raises(EdgeRnnError, match="step_form .loop."):
        convert(model, step=True, step_form="loop")


CELLS = {
    "lstm_hard_sigmoid_linear": lambda: layers.LSTM(4, recurrent_activation="hard_sigmoid", activation="linear"),
    "lstm_no_bias": lambda: layers.LSTM(4, use_bias=False, unit_forget_bias=False),
    "gru_softsign_elu": lambda: layers.GRU(4, recurrent_activation="softsign", activation="elu"),
    "gru_before_relu": lambda: layers.GRU(4, reset_after=False, activation="relu"),
    "rnn_softplus": lambda: layers.SimpleRNN(4, activation="softplus"),
}


@pytest.mark.parametrize("linear", list(decomposed.LINEAR_FORMS))
def test_decomposed_equals_fused_for_every_linear_form(linear, monkeypatch):
    """Each cell with non-default activations and biases, decomposed (each linear form) vs the fused op at T = 1."""
    from edge_rnn.export.keras_onnx import convert

    monkeypatch.setattr(decomposed, "STEP_CELLS",
                        {k: (lambda f: lambda *a, **kw: f(*a, **kw, linear=linear))(f) for k, f in decomposed.STEP_CELLS.items()})
    monkeypatch.setattr("edge_rnn.export.keras_onnx.STEP_CELLS", decomposed.STEP_CELLS)
    rng = np.random.default_rng(3)
    for name, make in CELLS.items():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((None, F), name="x"), make()])
        for w in model.weights:  # non-zero biases, so a bias in the wrong place shows
            w.assign(rng.standard_normal(w.shape).astype(np.float32) * 0.5)
        conversions = {form: convert(model, step=True, step_form=form) for form in ("fused", "decomposed")}
        step = {"state": conversions["fused"].state}
        x = rng.standard_normal((3, T, F)).astype(np.float32)
        answers = {}
        for form, conv in conversions.items():
            sess = in_memory(conv.model)
            names = [o.name for o in sess.get_outputs()]
            state = {s["input"]: np.zeros((len(x), s["shape"][-1]), np.float32) for s in step["state"]}
            for t in range(T):
                got = dict(zip(names, sess.run(None, {"x": x[:, t:t + 1], **state})))
                state = {s["input"]: got[s["output"]] for s in step["state"]}
            answers[form] = got
        for out, value in answers["fused"].items():
            np.testing.assert_allclose(answers["decomposed"][out], value, atol=STEP_SEQUENCE_ATOL, rtol=0, err_msg=f"{name} {out}")


def _swap_gates(step_fn, *, first: int, second: int):
    """A step function fed a cell whose gate blocks `first` and `second` (ONNX order) are swapped: a converter bug."""
    def swap(a: np.ndarray, axis: int, U: int) -> np.ndarray:
        blocks = np.split(a, a.shape[axis] // U, axis=axis)
        blocks[first], blocks[second] = blocks[second], blocks[first]
        return np.concatenate(blocks, axis=axis)

    def broken(b, cell, **kwargs):
        U = cell.hidden_size
        B = np.concatenate([swap(part, 1, U) for part in np.split(cell.B, 2, axis=1)], axis=1)
        return step_fn(b, dataclasses.replace(cell, W=swap(cell.W, 1, U), R=swap(cell.R, 1, U), B=B), **kwargs)
    return broken


@pytest.mark.parametrize("name, kind, swap", [("gru_reset_after", "GRU", (0, 1)), ("lstm", "LSTM", (1, 2))])
def test_swapped_gate_blocks_fail_the_export_parity_check(name, kind, swap, tmp_path, decomposed_lstm, monkeypatch):
    build, _ = MODELS[name]
    monkeypatch.setitem(decomposed.STEP_CELLS, kind,
                        _swap_gates(decomposed.STEP_CELLS[kind], first=swap[0], second=swap[1]))
    keras.utils.set_random_seed(0)
    path = tmp_path / f"{name}.keras"
    build().save(path)
    result = run("export", path, "--out", tmp_path / name)
    assert result.exit_code != 0
    assert "onnx_step" in result.output and "Traceback" not in result.output
    assert not (tmp_path / name / "model.step.onnx").exists()


def test_char_rnn_step_graph_equals_the_sequence_graph():
    """graphs.char_rnn_step_model (Gather + MatMul + Tanh) fed one id at a time == char_rnn_model over the sequence."""
    from edge_rnn.train import char_rnn as cr

    vocab = "abcdefgh"
    params = cr.init_params(len(vocab), hidden=6, seed=0)
    rng = np.random.default_rng(0)
    params["bh"] = rng.standard_normal(params["bh"].shape)
    params["by"] = rng.standard_normal(params["by"].shape)
    step_model = char_rnn_step_model(params, vocab=vocab)
    assert op_counts(step_model) == {"Add": 2, "Gather": 1, "MatMul": 2, "Squeeze": 1, "Tanh": 1, "Unsqueeze": 1}
    onnx.checker.check_model(step_model, full_check=True)
    ids = rng.integers(0, len(vocab), size=(3, 9)).astype(np.int64)
    h0 = rng.standard_normal((3, 6)).astype(np.float32) * 0.5
    want_logits, want_h = in_memory(char_rnn_model(params, vocab=vocab)).run(None, {"ids": ids, "h0": h0})
    sess = in_memory(step_model)
    h, logits = h0, []
    for t in range(ids.shape[1]):
        out, h = sess.run(None, {"ids": ids[:, t:t + 1], "h0": h})
        logits.append(out)
    np.testing.assert_allclose(np.concatenate(logits, axis=1), want_logits, atol=STEP_SEQUENCE_ATOL, rtol=0)
    np.testing.assert_allclose(h, want_h, atol=STEP_SEQUENCE_ATOL, rtol=0)
    ref, _ = cr.forward(params, ids=ids[0], h_prev=h0[0][:, None].astype(np.float64))
    np.testing.assert_allclose(np.concatenate(logits, axis=1)[0], ref, atol=1e-4, rtol=0)
