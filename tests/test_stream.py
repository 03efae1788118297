"""The device loop on user models: Stepper == whole-sequence model, `stream` and generic `infer` through the CLI,
clean refusals of bad input, and both commands where tensorflow/keras/onnx cannot be imported.

Model folders are built here as `edge-rnn export MODEL.keras` writes them (manifest schema 1, task "keras"):
small Keras models of the kinds the issue lists, converted with keras_onnx.convert (sequence and step form).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import one_line_error
from edge_rnn.cli import app
from edge_rnn.device.manifest import load_manifest, record_file, save_manifest
from edge_rnn.device.session import load_model
from edge_rnn.device.stepper import Stepper
from edge_rnn.tolerances import STEP_SEQUENCE_ATOL
from test_device import BLOCKER

keras = pytest.importorskip("keras")
layers = keras.layers

T, F, VOCAB = 6, 3, 20
runner = CliRunner()


def run_cli(*args, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def floats(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def export_folder(folder, model, *, labels=None, vocab=None):
    """model.onnx (+ model.step.onnx) and a manifest in the exporter's schema; returns the folder."""
    import onnx

    from edge_rnn.export.keras_onnx import NotStreamableError, convert

    folder.mkdir(parents=True)
    sequence = convert(model)
    onnx.save(sequence.model, folder / "model.onnx")
    io = sequence.io
    if vocab:
        io["inputs"][0]["vocab"] = vocab
    manifest = {"schema": 1, "model": folder.name, "adapter": "keras", "task": "keras", "io": io, "masking": sequence.masking}
    if labels:
        manifest["labels"] = labels
    try:
        step = convert(model, step=True)
    except NotStreamableError as exc:
        manifest["step_refused"] = str(exc)
    else:
        onnx.save(step.model, folder / "model.step.onnx")
        state_in, state_out = {s["input"] for s in step.state}, {s["output"] for s in step.state}
        manifest["step"] = {
            "inputs": [s for s in step.io["inputs"] if s["name"] not in state_in],
            "outputs": [s for s in step.io["outputs"] if s["name"] not in state_out],
            "state": step.state,
        }
        record_file(manifest, folder, "onnx_step", "model.step.onnx")
    record_file(manifest, folder, "onnx", "model.onnx")
    save_manifest(folder, manifest)
    return folder


def stacked_lstm():
    return keras.Sequential([keras.Input((None, F), name="x"), layers.LSTM(12, return_sequences=True),
                             layers.LSTM(12), layers.Dense(4, activation="softmax", name="out")])


def gru_rnn_stack():
    return keras.Sequential([keras.Input((None, F), name="x"), layers.GRU(10, return_sequences=True),
                             layers.SimpleRNN(8, return_sequences=True), layers.TimeDistributed(layers.Dense(2), name="out")])


def masked_ids():
    return keras.Sequential([keras.Input((None,), dtype="int32", name="ids"), layers.Embedding(VOCAB, 4, mask_zero=True),
                             layers.LSTM(8), layers.Dense(3, activation="softmax", name="out")])


def two_inputs():
    x, features = keras.Input((None, F), name="x"), keras.Input((5,), name="features")
    merged = layers.Concatenate()([layers.GRU(8)(x), layers.Dense(4, activation="tanh")(features)])
    return keras.Model([x, features], layers.Dense(2, name="out")(merged))


def bidirectional():
    return keras.Sequential([keras.Input((None, F), name="x"), layers.Bidirectional(layers.LSTM(8)), layers.Dense(2, name="out")])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("user-models")
    return {
        "stacked_lstm": export_folder(root / "stacked_lstm", stacked_lstm()),
        "gru_rnn_stack": export_folder(root / "gru_rnn_stack", gru_rnn_stack()),
        "masked_ids": export_folder(root / "masked_ids", masked_ids(), labels=["neg", "neu", "pos"], vocab=VOCAB),
        "two_inputs": export_folder(root / "two_inputs", two_inputs()),
        "bidirectional": export_folder(root / "bidirectional", bidirectional()),
    }


def ids_batch() -> np.ndarray:
    x = np.random.default_rng(1).integers(1, VOCAB, (3, T)).astype(np.int32)
    x[1, 4:] = 0  # post-padded
    x[2, 2:] = 0
    return x


def sequence_outputs(folder, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model = load_model(folder / "model.onnx", threads=1)
    return dict(zip([s["name"] for s in model.io["outputs"]], model.run(feeds)))


def prefix_outputs(folder, feeds: dict[str, np.ndarray], t: int) -> dict[str, np.ndarray]:
    """The sequence model's outputs on the first t + 1 steps: what a step model says after step t."""
    return sequence_outputs(folder, {n: x[:, : t + 1] if n in ("x", "ids") else x for n, x in feeds.items()})


# --- Stepper -----------------------------------------------------------------------------------------

CASES = {
    "stacked_lstm": lambda: {"x": floats(3, T, F)},
    "gru_rnn_stack": lambda: {"x": floats(3, T, F)},
    "masked_ids": lambda: {"ids": ids_batch()},
    "two_inputs": lambda: {"x": floats(3, T, F), "features": floats(3, 5, seed=2)},
}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", CASES)
def test_stepper_equals_the_sequence_model(folders, name, batch):
    feeds = {n: x[:batch] for n, x in CASES[name]().items()}
    model = load_model(folders[name] / "model.step.onnx", threads=1)
    stepper = Stepper(model, batch=batch)
    assert stepper._bindings, "the common shapes run through IOBinding"
    steps = list(stepper.run_sequence(feeds))
    assert len(steps) == T
    for t, outputs in enumerate(steps):
        expected = prefix_outputs(folders[name], feeds, t)
        for out_name, got in outputs.items():
            want = expected[out_name]
            want = want[:, t : t + 1] if got.ndim == 3 else want  # return_sequences: this step's slice
            np.testing.assert_allclose(got, want, atol=STEP_SEQUENCE_ATOL, rtol=0)


def test_stepper_carries_h_and_c_and_resets(folders):
    model = load_model(folders["stacked_lstm"] / "model.step.onnx", threads=1)
    stepper = Stepper(model)
    names = {(s["layer"], s["name"]) for s in model.state}
    assert {n for _, n in names} == {"h", "c"} and len({layer for layer, _ in names}) == 2
    x = floats(1, T, F)
    first = [out["out"] for out in stepper.run_sequence({"x": x})]
    assert all(np.abs(v).max() > 0 for v in stepper.state.values())
    stepper.reset()
    assert all(not v.any() for v in stepper.state.values())
    again = [out["out"] for out in stepper.run_sequence({"x": x})]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
    # A state set from outside continues from there, like the sequence model on the whole input.
    stepper.reset()
    list(stepper.run_sequence({"x": x[:, :3]}))
    saved = stepper.state
    stepper.reset()
    stepper.state = saved
    rest = [out["out"] for out in stepper.run_sequence({"x": x[:, 3:]})]
    np.testing.assert_allclose(rest[-1], first[-1], atol=STEP_SEQUENCE_ATOL, rtol=0)


# --- stream CLI ------------------------------------------------------------------------------------

def stream_lines(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines()]


def test_stream_cli_equals_the_sequence_model(folders, tmp_path):
    folder = folders["gru_rnn_stack"]
    x = floats(T, F, seed=5)
    np.save(tmp_path / "x.npy", x)
    lines = stream_lines(run_cli("stream", folder / "model.step.onnx", "--input", tmp_path / "x.npy", "--digits", 0))
    whole = sequence_outputs(folder, {"x": x[None]})["out"]  # (1, T, 2)
    assert [line["step"] for line in lines] == list(range(T))
    for t, line in enumerate(lines):
        np.testing.assert_allclose(np.array(line["outputs"]["out"]), whole[0, t : t + 1], atol=STEP_SEQUENCE_ATOL, rtol=0)
    # The same rows from stdin, one JSON array per line, give the same lines; --max-steps stops early.
    stdin = "".join(json.dumps(row.tolist()) + "\n" for row in x)
    assert stream_lines(run_cli("stream", folder / "model.step.onnx", "--digits", 0, input=stdin)) == lines
    assert stream_lines(run_cli("stream", folder / "model.step.onnx", "--max-steps", 2, "--digits", 0, input=stdin)) == lines[:2]
    # The folder itself streams through its step model, as `infer FOLDER` runs its sequence model.
    assert stream_lines(run_cli("stream", folder, "--digits", 0, input=stdin)) == lines


def test_stream_cli_two_inputs_and_ids(folders, tmp_path):
    x, features = floats(1, T, F, seed=6), floats(5, seed=7)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "f.npy", features)
    folder = folders["two_inputs"]
    lines = stream_lines(run_cli("stream", folder / "model.step.onnx", "--input", f"x={tmp_path / 'x.npy'}",
                                 "--input", f"features={tmp_path / 'f.npy'}", "--digits", 0))
    for t, line in enumerate(lines):
        want = prefix_outputs(folder, {"x": x, "features": features[None]}, t)["out"]
        np.testing.assert_allclose(np.array(line["outputs"]["out"]), want[0], atol=STEP_SEQUENCE_ATOL, rtol=0)
    # ids from stdin: one id per line; a padded tail keeps the output of the last real step.
    ids = [3, 7, 1, 0, 0]
    lines = stream_lines(run_cli("stream", folders["masked_ids"] / "model.step.onnx", "--digits", 0, input="\n".join(map(str, ids)) + "\n"))
    want = sequence_outputs(folders["masked_ids"], {"ids": np.array([ids], np.int32)})["out"][0]
    np.testing.assert_allclose(np.array(lines[-1]["outputs"]["out"]), want, atol=STEP_SEQUENCE_ATOL, rtol=0)
    assert lines[-1]["outputs"] == lines[2]["outputs"]


# --- generic infer -----------------------------------------------------------------------------------

def test_infer_two_input_model(folders, tmp_path):
    x, features = floats(4, T, F, seed=8), floats(4, 5, seed=9)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "f.npy", features.astype(np.float64))  # float64 is converted to the graph's float32
    result = run_cli("infer", folders["two_inputs"] / "model.onnx", "--input", f"x={tmp_path / 'x.npy'}",
                     "--input", f"features={tmp_path / 'f.npy'}", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    want = sequence_outputs(folders["two_inputs"], {"x": x, "features": features})["out"]
    np.testing.assert_allclose(np.array(payload["outputs"]["out"]), want, atol=1e-6, rtol=0)
    assert payload["predictions"] == []
    table = run_cli("infer", folders["two_inputs"] / "model.onnx", "--input", f"x={tmp_path / 'x.npy'}",
                    "--input", f"features={tmp_path / 'f.npy'}")
    assert table.exit_code == 0 and "out" in table.output


def test_infer_ids_with_labels_top_k(folders, tmp_path):
    x = ids_batch()
    np.save(tmp_path / "ids.npy", x.astype(np.int64))
    result = run_cli("infer", folders["masked_ids"] / "model.onnx", tmp_path / "ids.npy", "--json", "--top-k", "2")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    probs = sequence_outputs(folders["masked_ids"], {"ids": x})["out"]
    assert [p["input"] for p in payload["predictions"]] == [f"ids.npy[{i}]" for i in range(3)]
    for p, row in zip(payload["predictions"], probs):
        assert p["label"] == ["neg", "neu", "pos"][int(np.argmax(row))] and len(p["top"]) == 2
    np.save(tmp_path / "one.npy", x[0].astype(np.float32))  # one example, no batch axis, whole-number floats
    single = run_cli("infer", folders["masked_ids"] / "model.onnx", tmp_path / "one.npy", "--json")
    assert json.loads(single.output)["predictions"][0]["label"] == payload["predictions"][0]["label"]


# --- refusals ----------------------------------------------------------------------------------------



def test_bad_arrays_are_refused_with_one_line(folders, tmp_path):
    model = folders["masked_ids"] / "model.onnx"

    def infer_with(array, name="a.npy"):
        np.save(tmp_path / name, array)
        return run_cli("infer", model, tmp_path / name)

    good = ids_batch()
    one_line_error(infer_with(good + 0.5), "fractional", "integer ids")
    one_line_error(infer_with(good[:, :, None]), "shape (3, 6, 1)")
    one_line_error(infer_with(np.where(good == 0, np.nan, good)), "NaN")
    pre_padded = good.copy()
    pre_padded[1] = [0, 0, 4, 5, 6, 7]
    one_line_error(infer_with(pre_padded), "row 1", "post-padded")
    one_line_error(infer_with(np.full((2, T), -1)), "id -1", "start at 0")
    one_line_error(infer_with(np.full((2, T), VOCAB)), f"id {VOCAB}", f"below {VOCAB}")
    one_line_error(infer_with(np.zeros((0, T), np.int32)), "batch of 0")
    one_line_error(infer_with(np.array([{"a": 1}], dtype=object)), "a.npy")
    one_line_error(infer_with(np.zeros(3, dtype=[("a", "i4")])), "a.npy", "numeric")
    two = folders["two_inputs"] / "model.onnx"
    np.save(tmp_path / "x.npy", floats(2, T, F))
    np.save(tmp_path / "f.npy", floats(3, 5))
    one_line_error(run_cli("infer", two, tmp_path / "x.npy"), "NAME=FILE.npy")
    one_line_error(run_cli("infer", two, "--input", f"x={tmp_path / 'x.npy'}"), "'features'")
    one_line_error(run_cli("infer", two, "--input", f"x={tmp_path / 'x.npy'}", "--input", f"features={tmp_path / 'f.npy'}"),
                   "different batch sizes")
    np.save(tmp_path / "f4.npy", floats(2, 4))
    one_line_error(run_cli("infer", two, "--input", f"x={tmp_path / 'x.npy'}", "--input", f"features={tmp_path / 'f4.npy'}"),
                   "shape (2, 4)", "(batch, 5)")


def test_bad_streams_are_refused_with_one_line(folders, tmp_path):
    one_line_error(run_cli("stream", folders["bidirectional"] / "model.onnx"), "no step form", "Bidirectional")
    one_line_error(run_cli("stream", folders["gru_rnn_stack"] / "model.onnx"), "model.step.onnx")
    step = folders["masked_ids"] / "model.step.onnx"
    # Mid-stream refusals: the steps before the bad line are printed, then one error line.
    result = run_cli("stream", step, input="3\n0\n5\n")
    assert result.exit_code == 1 and "post-padded" in result.output and result.output.count("\n") == 3, result.output
    one_line_error(run_cli("stream", step, input="[1.5]\n"), "stdin line 1", "fractional")
    one_line_error(run_cli("stream", step, input="not json\n"), "stdin line 1", "not valid JSON")
    one_line_error(run_cli("stream", folders["gru_rnn_stack"] / "model.step.onnx", input="[1, 2]\n"), "shape (2,)")
    one_line_error(run_cli("stream", folders["gru_rnn_stack"] / "model.step.onnx", input='[1, "a", 3]\n'), "numbers")
    np.save(tmp_path / "batch.npy", floats(2, T, F))
    one_line_error(run_cli("stream", folders["gru_rnn_stack"] / "model.step.onnx", "--input", tmp_path / "batch.npy"), "batch of 2")
    np.save(tmp_path / "pre.npy", np.array([0, 0, 3], np.int64))
    one_line_error(run_cli("stream", step, "--input", tmp_path / "pre.npy"), "row 0", "post-padded")
    assert run_cli("stream", step, "--max-steps", 0, input="3\n").exit_code == 2  # out of range: a usage error


def test_file_whose_graph_differs_from_the_manifest_is_refused(folders, tmp_path):
    import shutil

    folder = tmp_path / "swapped"
    shutil.copytree(folders["stacked_lstm"], folder)
    shutil.copy(folders["masked_ids"] / "model.onnx", folder / "model.onnx")  # another model's graph, recorded honestly
    manifest = load_manifest(folder)
    record_file(manifest, folder, "onnx", "model.onnx")
    save_manifest(folder, manifest)
    np.save(tmp_path / "x.npy", floats(2, T, F))
    one_line_error(run_cli("infer", folder / "model.onnx", tmp_path / "x.npy"), "inputs/outputs", "manifest's io")
    shutil.copy(folders["gru_rnn_stack"] / "model.step.onnx", folder / "model.step.onnx")
    record_file(manifest, folder, "onnx_step", "model.step.onnx")
    save_manifest(folder, manifest)
    one_line_error(run_cli("stream", folder / "model.step.onnx", "--input", tmp_path / "x.npy"), "manifest's io")


# --- the device path ---------------------------------------------------------------------------------

def test_stream_and_infer_without_tensorflow(folders, tmp_path):
    x = floats(T, F, seed=11)
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def device(*args, stdin=None):
        proc = subprocess.run([sys.executable, "-c", BLOCKER, *map(str, args)], input=stdin, capture_output=True, text=True,
                              timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
        assert "HEAVY_MODULES=\n" in proc.stderr
        return proc.stdout

    lines = [json.loads(line) for line in device("stream", folders["stacked_lstm"] / "model.step.onnx", "--input", tmp_path / "x.npy", "--digits", "0").splitlines()]
    want = sequence_outputs(folders["stacked_lstm"], {"x": x[None]})["out"][0]
    np.testing.assert_allclose(np.array(lines[-1]["outputs"]["out"]), want, atol=STEP_SEQUENCE_ATOL, rtol=0)
    from_stdin = device("stream", folders["stacked_lstm"] / "model.step.onnx", "--digits", "0", stdin="".join(json.dumps(r.tolist()) + "\n" for r in x))
    assert [json.loads(line) for line in from_stdin.splitlines()] == lines
    payload = json.loads(device("infer", folders["stacked_lstm"] / "model.onnx", tmp_path / "x.npy", "--json"))
    np.testing.assert_allclose(np.array(payload["outputs"]["out"])[0], want, atol=1e-6, rtol=0)
