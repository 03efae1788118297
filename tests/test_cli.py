"""The CLI through typer's CliRunner: exit codes, outputs, help, and clean one-line errors."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from edge_rnn.cli import app
from edge_rnn.device.manifest import load_manifest
from conftest import write_png

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _commands(typer_app, prefix=()):
    import typer.main

    group = typer.main.get_command(typer_app)
    stack = [(prefix, group)]
    while stack:
        path, cmd = stack.pop()
        subs = getattr(cmd, "commands", None)
        if subs:
            stack += [(path + (name,), sub) for name, sub in subs.items()]
        else:
            yield path


def test_every_command_has_help_with_an_example():
    commands = list(_commands(app))
    assert {("train", "mnist-lstm"), ("export",), ("quantize",), ("infer",), ("stream",), ("generate",), ("pipeline",)} <= set(commands)
    for path in commands:
        result = run(*path, "--help")
        assert result.exit_code == 0, path
        assert "Example:" in result.output and "edge-rnn " + " ".join(path) in result.output, path


def _assert_one_line_error(result, *fragments: str):
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:")
    for fragment in fragments:
        assert fragment in lines[0], result.output


def test_infer_png_and_npy(mnist_dir, digits, tmp_path):
    png = tmp_path / "digit.png"
    write_png(png, digits.x_test[0])
    rgb = tmp_path / "rgb.png"
    write_png(rgb, digits.x_test[1], mode="RGB")
    batch = tmp_path / "batch.npy"
    np.save(batch, digits.x_test[:5])
    result = run("infer", mnist_dir / "model.onnx", png, rgb, batch, "--json", "--top-k", "3")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    preds = payload["predictions"]
    assert [p["input"] for p in preds] == ["digit.png", "rgb.png"] + [f"batch.npy[{i}]" for i in range(5)]
    for p in preds:
        assert len(p["top"]) == 3
        probs = [t["probability"] for t in p["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1
    # The PNG and the same digit in the .npy batch agree (same preprocessing from the manifest).
    assert preds[0]["top"][0] == preds[2]["top"][0]
    labels = [int(p["label"]) for p in preds[2:]]
    assert np.mean(np.array(labels) == digits.y_test[:5]) >= 0.6


def test_infer_table_output_int8(mnist_dir, digits, tmp_path):
    png = tmp_path / "d.png"
    write_png(png, digits.x_test[3])
    result = run("infer", mnist_dir / "model.int8.onnx", png)
    assert result.exit_code == 0, result.output
    assert "d.png" in result.output and "probability" in result.output


def test_missing_model_is_a_clean_error(tmp_path):
    _assert_one_line_error(run("infer", tmp_path / "nope.onnx", tmp_path / "x.png"), "no model file", "edge-rnn export")


def test_wrong_size_image_is_a_clean_error(mnist_dir, tmp_path):
    png = tmp_path / "big.png"
    write_png(png, np.zeros((32, 30), np.uint8))
    _assert_one_line_error(run("infer", mnist_dir / "model.onnx", png), "30×32", "28×28")


def test_unreadable_files_are_clean_errors(mnist_dir, tmp_path):
    bad_png = tmp_path / "broken.png"
    bad_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    _assert_one_line_error(run("infer", mnist_dir / "model.onnx", bad_png), "broken.png")
    bad_npy = tmp_path / "broken.npy"
    bad_npy.write_bytes(b"\x93NUMPY garbage")
    _assert_one_line_error(run("infer", mnist_dir / "model.onnx", bad_npy), "broken.npy")
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _assert_one_line_error(run("infer", mnist_dir / "model.onnx", pickled), "pickled.npy")
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((3, 28, 27), np.uint8))
    _assert_one_line_error(run("infer", mnist_dir / "model.onnx", wrong), "(3, 28, 27)")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    _assert_one_line_error(run("infer", mnist_dir / "model.onnx", text), "unsupported input type")


def test_tampered_or_corrupt_model_is_refused(mnist_copy, digits, tmp_path):
    png = tmp_path / "d.png"
    write_png(png, digits.x_test[0])
    model = mnist_copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    _assert_one_line_error(run("infer", model, png), "sha256")
    (mnist_copy / "manifest.json").write_text("{ not json")
    _assert_one_line_error(run("infer", mnist_copy / "model.int8.onnx", png), "manifest.json", "not valid JSON")


def test_model_without_manifest_is_refused(mnist_dir, tmp_path, digits):
    import shutil

    lone = tmp_path / "lone.onnx"
    shutil.copy(mnist_dir / "model.onnx", lone)
    png = tmp_path / "d.png"
    write_png(png, digits.x_test[0])
    _assert_one_line_error(run("infer", lone, png), "no manifest.json")


def test_export_and_quantize_commands(mnist_copy):
    result = run("export", mnist_copy, "--opset", "17")
    assert result.exit_code == 0, result.output
    assert "LSTM×2" in result.output and "parity onnx_step probs" in result.output
    # A re-export invalidates the old int8 files, which the manifest then no longer lists.
    assert not {"onnx_int8", "onnx_step_int8"} & set(load_manifest(mnist_copy)["files"])
    result = run("quantize", mnist_copy, "--variant", "int8")
    assert result.exit_code == 0, result.output
    assert "DynamicQuantizeLSTM×2" in result.output and "step drift vs fp32 over 1,008 steps (36 streams × 28)" in result.output
    assert {"onnx_int8", "onnx_step_int8"} <= set(load_manifest(mnist_copy)["files"])


def test_export_without_a_model_folder(tmp_path):
    _assert_one_line_error(run("export", tmp_path), "no manifest.json", "edge-rnn train")


def test_quantize_unknown_variant(mnist_copy):
    _assert_one_line_error(run("quantize", mnist_copy, "--variant", "int3"), "unknown variant")


def test_train_rejects_bad_data(tmp_path):
    bogus = tmp_path / "bogus.npz"
    bogus.write_bytes(b"PK\x03\x04 not really a zip")
    _assert_one_line_error(run("train", "mnist-lstm", "--data", bogus, "--out", tmp_path / "m"), "bogus.npz")
    assert not (tmp_path / "m").exists()
    _assert_one_line_error(run("train", "mnist-lstm", "--data", "nowhere-set", "--out", tmp_path / "m"), "nowhere-set")


def test_failed_export_keeps_the_previous_model(mnist_copy, monkeypatch):
    """A parity failure (here: a tolerance no export can meet) lists every output and renames nothing."""
    from edge_rnn.models.mnist_lstm import MnistLstmAdapter

    before = {p.name: p.read_bytes() for p in mnist_copy.iterdir()}
    monkeypatch.setattr(MnistLstmAdapter, "tolerance", lambda self, name, ref, *, stepped: (-1.0, "atol -1"))
    result = run("export", mnist_copy)
    _assert_one_line_error(result, "not saved", "onnx probs", "onnx_step probs")
    assert {p.name: p.read_bytes() for p in mnist_copy.iterdir()} == before


def test_error_text_with_brackets_is_printed_verbatim(mnist_dir, tmp_path):
    odd = tmp_path / "b[red].npy"
    np.save(odd, np.zeros((3, 28), np.uint8))
    _assert_one_line_error(run("infer", mnist_dir / "model.onnx", odd), "b[red].npy", "(3, 28)")


def test_manifest_with_wrong_fields_is_refused(mnist_copy, digits, tmp_path):
    png = tmp_path / "d.png"
    write_png(png, digits.x_test[0])
    manifest = json.loads((mnist_copy / "manifest.json").read_text())
    manifest["labels"] = ["zero", "one"]
    (mnist_copy / "manifest.json").write_text(json.dumps(manifest))
    _assert_one_line_error(run("infer", mnist_copy / "model.onnx", png), "2 labels for an output of 10 values")
    manifest["schema"] = "2"
    (mnist_copy / "manifest.json").write_text(json.dumps(manifest))
    _assert_one_line_error(run("infer", mnist_copy / "model.onnx", png), "'schema' must be an integer")


def test_bad_outputs_fail_before_any_work(tmp_path, digits):
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    _assert_one_line_error(run("train", "mnist-lstm", "--data", "sample", "--out", a_file / "m"), "cannot write")
    one_array = tmp_path / "one.npy"
    np.save(one_array, digits.x_test[:3])
    _assert_one_line_error(run("train", "mnist-lstm", "--data", one_array, "--out", tmp_path / "m"), "single array")
    _assert_one_line_error(run("bench", "--plot", tmp_path / "plot.xyz"), "--plot", ".png")
