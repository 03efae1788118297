"""`edge-rnn export` of stateful recurrent layers and of `RNN` over built-in cells — one cell, or a stack
(`RNN([LSTMCell, LSTMCell])`) — through the real CLI (issue 20, class 6).

Tiny models saved as .keras files, exported once per module. Checked on numbers: model.onnx against Keras'
predict (a stateful model from reset state, at its fixed batch), fused ops only (no Loop or Scan), the step model
fed one step at a time against model.onnx, and for stateful layers the step model's state against the state Keras
keeps between calls.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from conftest import in_role, one_line_error
from edge_rnn.cli import app
from edge_rnn.device.manifest import load_manifest
from edge_rnn.export.graphs import op_counts
from edge_rnn.export.validate import session
from edge_rnn.tolerances import KERAS_ONNX_ATOL, STEP_SEQUENCE_ATOL

keras = pytest.importorskip("keras")
layers = keras.layers

runner = CliRunner()
BATCH = 2  # the stateful models' fixed batch
FIXED_T = 6  # stateful_gru's fixed time axis
T = 7  # the other models' sequences
F = 3
RECURRENT = ("LSTM", "GRU", "RNN")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


# --- the models -------------------------------------------------------------------------------------

def stateful_lstm():  # free time axis, a sequence out
    return keras.Sequential([
        keras.Input((None, F), batch_size=BATCH, name="x"),
        layers.LSTM(8, stateful=True, return_sequences=True, name="lstm"),
        layers.TimeDistributed(layers.Dense(2), name="y"),
    ])


def stateful_gru():  # fixed time axis, the last output
    return keras.Sequential([
        keras.Input((FIXED_T, F), batch_size=BATCH, name="x"),
        layers.GRU(8, stateful=True, name="gru"),
        layers.Dense(3, activation="softmax", name="y"),
    ])


def stateful_stack():  # both at once: a stateful stack, whose state Keras nests per cell
    return keras.Sequential([
        keras.Input((None, F), batch_size=BATCH, name="x"),
        layers.RNN([layers.LSTMCell(8), layers.GRUCell(8)], stateful=True, name="stack"),
        layers.Dense(2, name="y"),
    ])


def stacked_lstm():
    return keras.Sequential([
        keras.Input((None, F), name="x"),
        layers.RNN([layers.LSTMCell(8), layers.LSTMCell(12)], name="stack"),
        layers.Dense(2, name="y"),
    ])


def stacked_gru():  # both reset_after forms, a sequence out
    return keras.Sequential([
        keras.Input((None, F), name="x"),
        layers.RNN([layers.GRUCell(8), layers.GRUCell(8, reset_after=False)], return_sequences=True, name="stack"),
        layers.TimeDistributed(layers.Dense(2), name="y"),
    ])


def mixed():  # return_state: the stack's states, cell by cell ([h0], [h1, c1] flattened)
    x = keras.Input((None, F), name="x")
    seq, h0, (h1, c1) = layers.RNN([layers.SimpleRNNCell(8), layers.LSTMCell(10)], return_sequences=True,
                                   return_state=True, name="stack")(x)
    return keras.Model(x, [seq, h0, h1, c1])


def single_cell():
    return keras.Sequential([keras.Input((None, F), name="x"), layers.RNN(layers.LSTMCell(8), name="rnn"),
                             layers.Dense(2, name="y")])


def masked_stack():  # post-padded rows: every cell skips the padding, the output carries the last real step
    return keras.Sequential([
        keras.Input((None, F), name="x"),
        layers.Masking(0.0),
        layers.RNN([layers.GRUCell(8), layers.LSTMCell(8)], return_sequences=True, name="stack"),
        layers.TimeDistributed(layers.Dense(2), name="y"),
    ])


# name → (builder, fused ops in both graphs, step-model state names in order)
MODELS = {
    "stateful_lstm": (stateful_lstm, {"LSTM": 1}, ["lstm.h", "lstm.c"]),
    "stateful_gru": (stateful_gru, {"GRU": 1}, ["gru.h"]),
    "stateful_stack": (stateful_stack, {"LSTM": 1, "GRU": 1}, ["stack.0.h", "stack.0.c", "stack.1.h"]),
    "stacked_lstm": (stacked_lstm, {"LSTM": 2}, ["stack.0.h", "stack.0.c", "stack.1.h", "stack.1.c"]),
    "stacked_gru": (stacked_gru, {"GRU": 2}, ["stack.0.h", "stack.1.h"]),
    "mixed": (mixed, {"RNN": 1, "LSTM": 1}, ["stack.0.h", "stack.1.h", "stack.1.c"]),
    "single_cell": (single_cell, {"LSTM": 1}, ["rnn.h", "rnn.c"]),
    "masked_stack": (masked_stack, {"GRU": 1, "LSTM": 1}, ["stack.0.h", "stack.1.h", "stack.1.c"]),
}
STATEFUL = {"stateful_lstm": "lstm", "stateful_gru": "gru", "stateful_stack": "stack"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name → (the .keras file, its exported folder, the CLI's output)."""
    root = tmp_path_factory.mktemp("stateful")
    out = {}
    for name, (build, _, _) in MODELS.items():
        keras.utils.set_random_seed(0)
        path = root / f"{name}.keras"
        build().save(path)
        result = run("export", path, "--out", root / name)
        assert result.exit_code == 0, result.output
        out[name] = (path, root / name, result.output)
    return out


def inputs(name: str, *, seed: int = 1, time_steps: int | None = None) -> np.ndarray:
    """(batch, T, F) float32: the fixed batch for a stateful model, post-padded rows for the masked one."""
    rng = np.random.default_rng(seed)
    batch = BATCH if name in STATEFUL else 4
    steps = time_steps or (FIXED_T if name == "stateful_gru" else T)
    x = rng.standard_normal((batch, steps, F)).astype(np.float32)
    if name == "masked_stack":
        x[1, 4:] = 0.0
        x[2, 1:] = 0.0
    return x


def keras_predict(path, x: np.ndarray) -> list[np.ndarray]:
    """Keras' own answer: the file loaded afresh (a stateful layer's state starts at zeros), predict in one batch."""
    out = keras.saving.load_model(path).predict(x, batch_size=len(x), verbose=0)
    return out if isinstance(out, list) else [out]


def ort_run(path, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = session(path)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))


def step_through(path, step: dict, x: np.ndarray, state: dict | None = None) -> tuple[list[dict], dict]:
    """The step model over x one time step at a time, the state carried (zeros unless given): every step's outputs
    and the final state."""
    sess = session(path)
    names = [o.name for o in sess.get_outputs()]
    state = state or {s["input"]: np.zeros((len(x), s["shape"][-1]), np.float32) for s in step["state"]}
    steps = []
    for t in range(x.shape[1]):
        got = dict(zip(names, sess.run(None, {"x": x[:, t:t + 1], **state})))
        state = {s["input"]: got[s["output"]] for s in step["state"]}
        steps.append(got)
    return steps, state


def keras_states(layer) -> list[np.ndarray]:
    """A stateful layer's state as Keras keeps it, flattened in Keras' order (per cell: h, then c for an LSTM)."""
    return [np.asarray(v.numpy()) for v in keras.tree.flatten(layer.states)]


# --- fused graphs and parity with Keras ------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_fused_ops_only_and_parity_with_keras(name, exported):
    path, folder, output = exported[name]
    _, fused, _ = MODELS[name]
    manifest = load_manifest(folder)
    assert set(manifest["files"]) == {"keras", "onnx", "onnx_step"} and "tf2onnx" not in output
    for role in ("onnx", "onnx_step"):
        counts = op_counts(onnx.load(str(folder / manifest["files"][role]["path"])))
        assert {op: counts[op] for op in RECURRENT if op in counts} == in_role(fused, role), (role, counts)
        assert "Loop" not in counts and "Scan" not in counts
    # Independently of the export's own check: onnxruntime vs Keras' predict on other inputs.
    x = inputs(name)
    got = ort_run(folder / "model.onnx", x)
    want = keras_predict(path, x)
    assert list(got) == [o["name"] for o in manifest["io"]["outputs"]] and len(want) == len(got)
    for (output_name, value), ref in zip(got.items(), want):
        np.testing.assert_allclose(value, ref, atol=KERAS_ONNX_ATOL, rtol=0, err_msg=output_name)
    for role, checks in manifest["metrics"]["export_parity"].items():
        assert all(c["ok"] for c in checks.values()), (role, checks)


@pytest.mark.parametrize("name", list(MODELS))
def test_step_model_equals_the_sequence_model(name, exported):
    _, folder, _ = exported[name]
    _, _, state_names = MODELS[name]
    step = load_manifest(folder)["step"]
    assert [s["input"] for s in step["state"]] == [f"state.{n}" for n in state_names]
    assert [s["output"] for s in step["state"]] == [f"state_out.{n}" for n in state_names]
    x = inputs(name, seed=2)
    whole = ort_run(folder / "model.onnx", x)
    steps, state = step_through(folder / "model.step.onnx", step, x)
    for spec in step["outputs"]:
        ref = whole[spec["name"]]
        got = np.concatenate([s[spec["name"]] for s in steps], axis=1) if ref.ndim == 3 else steps[-1][spec["name"]]
        np.testing.assert_allclose(got, ref, atol=STEP_SEQUENCE_ATOL, rtol=0, err_msg=spec["name"])
    if name == "mixed":
        # return_state: the stack's states are every cell's, in the step model's state order.
        for k, s in enumerate(step["state"], start=1):
            np.testing.assert_allclose(state[s["input"]], whole[f"stack.{k}"], atol=STEP_SEQUENCE_ATOL, rtol=0)


# --- stateful: the state Keras keeps between calls is the step model's state -------------------------

@pytest.mark.parametrize("name", list(STATEFUL))
def test_keras_state_between_calls_is_the_step_models_state(name, exported):
    """Keras called chunk by chunk (one step at a time where the time axis is free; two whole chunks where it is
    fixed) keeps its state; the step model fed the same steps from zeros answers the same and holds the same state.
    Fed Keras' layer.states, it continues where Keras does; model.onnx starts from zeros instead."""
    path, folder, output = exported[name]
    manifest = load_manifest(folder)
    step = manifest["step"]
    chunk = FIXED_T if name == "stateful_gru" else 1
    x = inputs(name, seed=3, time_steps=2 * chunk if name == "stateful_gru" else T)
    model = keras.saving.load_model(path)
    layer = model.get_layer(STATEFUL[name])
    onnx_steps, _ = step_through(folder / "model.step.onnx", step, x)
    out = step["outputs"][0]["name"]
    tol = KERAS_ONNX_ATOL + STEP_SEQUENCE_ATOL
    for k, start in enumerate(range(0, x.shape[1], chunk)):
        y = model.predict(x[:, start:start + chunk], batch_size=BATCH, verbose=0)
        last = onnx_steps[start + chunk - 1]
        np.testing.assert_allclose(last[out], y, atol=tol, rtol=0, err_msg=f"output after chunk {k}")
        for s, kept in zip(step["state"], keras_states(layer), strict=True):
            np.testing.assert_allclose(last[s["output"]], kept, atol=tol, rtol=0, err_msg=f"{s['output']} after chunk {k}")
    # Keras' state fed to the step model: it continues as Keras does.
    more = inputs(name, seed=4, time_steps=chunk)
    given = {s["input"]: kept for s, kept in zip(step["state"], keras_states(layer))}
    continued, _ = step_through(folder / "model.step.onnx", step, more, state=given)
    want = model.predict(more, batch_size=BATCH, verbose=0)
    np.testing.assert_allclose(continued[-1][out], want, atol=tol, rtol=0)
    # model.onnx starts from zero state (the audit says so): Keras after reset_states(), not Keras carrying on.
    if name == "stateful_gru":
        fresh = ort_run(folder / "model.onnx", more)[out]
        assert np.max(np.abs(fresh - want)) > 1e-3
        np.testing.assert_allclose(fresh, keras_predict(path, more)[0], atol=KERAS_ONNX_ATOL, rtol=0)
    audit = next(a for a in manifest["audit"] if a["layer"] == STATEFUL[name])
    assert "stateful=True: model.onnx starts from zero state" in audit["note"] and "stateful=True" in output


def test_stateful_parity_on_user_data_of_any_row_count(exported, tmp_path):
    """--data rows (5, not a multiple of the fixed batch 2) reach Keras two rows at a time, each pair from reset
    state; onnxruntime takes all five at once."""
    path, _, _ = exported["stateful_gru"]
    data = tmp_path / "rows.npz"
    np.savez(data, x=inputs("stateful_gru", seed=5)[[0, 1, 0, 1, 0]] * np.float32(1.5))
    result = run("export", path, "--out", tmp_path / "out", "--data", data)
    assert result.exit_code == 0, result.output
    parity = load_manifest(tmp_path / "out")["metrics"]["export_parity_data"]
    assert parity["rows"] == 5 and set(parity["roles"]) == {"onnx", "onnx_step"}
    for checks in parity["roles"].values():
        assert all(c["ok"] and c["max_abs_diff"] < KERAS_ONNX_ATOL for c in checks.values()), checks


def test_a_damaged_second_cell_fails_parity(exported, tmp_path, monkeypatch):
    """The stack's second cell is checked too: its recurrent weight ×1.05 (the first cell's untouched) fails both
    graphs' parity, in one line, and nothing is written."""
    from onnx import numpy_helper

    import edge_rnn.export.keras_onnx as keras_onnx

    path, _, _ = exported["stacked_lstm"]
    convert = keras_onnx.convert

    def damaged(model, **kwargs):
        conversion = convert(model, **kwargs)
        second = next(n for n in conversion.model.graph.node if n.op_type == "LSTM" and n.name != "stack/LSTM")
        r = next(t for t in conversion.model.graph.initializer if t.name == second.input[2])
        r.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(r) * np.float32(1.05), r.name))
        return conversion

    monkeypatch.setattr(keras_onnx, "convert", damaged)
    one_line_error(run("export", path, "--out", tmp_path / "damaged"), "not saved", "onnx y", "onnx_step y")
    assert not (tmp_path / "damaged").exists()


def test_a_stateful_layer_keras_onnx_refuses_goes_through_tf2onnx(tmp_path):
    """selu has no ONNX recurrent form: the stateful GRU falls back to tf2onnx, traced as its stateless twin (a free
    batch axis; the same weights), and passes parity against the stateful model at its batch."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((None, F), batch_size=BATCH, name="x"),
                              layers.GRU(6, activation="selu", stateful=True, name="gru_selu"), layers.Dense(2, name="y")])
    model.save(tmp_path / "selu.keras")
    result = run("export", tmp_path / "selu.keras", "--out", tmp_path / "selu")
    assert result.exit_code == 0, result.output
    assert "tf2onnx fallback" in result.output and "'gru_selu' (GRU)" in result.output
    folder = tmp_path / "selu"
    assert op_counts(onnx.load(str(folder / "model.onnx"))).get("Loop", 0) >= 1
    x = inputs("stateful_gru", seed=6, time_steps=T)
    np.testing.assert_allclose(ort_run(folder / "model.onnx", x)["y"], keras_predict(tmp_path / "selu.keras", x)[0],
                               atol=KERAS_ONNX_ATOL, rtol=0)
