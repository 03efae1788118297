"""The char RNN through the CLI: train, export, generate on onnxruntime == sample in NumPy, errors."""

from __future__ import annotations


import numpy as np
from typer.testing import CliRunner

from edge_rnn.cli import app
from edge_rnn.device.manifest import load_manifest, sha256_file

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_manifest_describes_the_char_rnn(char_dir):
    manifest = load_manifest(char_dir)
    assert manifest["model"] == "char-rnn" and manifest["task"] == "generate"
    assert len(manifest["vocab"]) == len(set(manifest["vocab"])) and "R" in manifest["vocab"]
    assert [s["name"] for s in manifest["io"]["inputs"]] == ["ids", "h0"]
    assert [s["name"] for s in manifest["io"]["outputs"]] == ["logits", "h"]
    assert set(manifest["files"]) == {"checkpoint", "onnx", "onnx_int8"}
    for entry in manifest["files"].values():
        assert entry["sha256"] == sha256_file(char_dir / entry["path"])
    assert 0 < manifest["metrics"]["val_nats_per_char"] < np.log(len(manifest["vocab"]))
    parity = manifest["metrics"]["export_parity"]
    assert parity["onnx"]["logits"]["ok"] and parity["onnx"]["logits"]["max_abs_diff"] <= 1e-4
    # model.onnx is its own step model: fed one char at a time it matches NumPy on the whole text.
    assert parity["onnx_step"]["logits"]["ok"] and parity["onnx_step"]["h"]["max_abs_diff"] <= 1e-4
    assert manifest["adapter"] == "char-rnn"
    assert manifest["step"]["inputs"] == [{**manifest["io"]["inputs"][0], "shape": ["batch", 1]}]
    assert manifest["step"]["state"] == [
        {"layer": "rnn", "name": "h", "input": "h0", "output": "h", "dtype": "float32", "shape": ["batch", 64]}]
    # The int8 file streams too (it takes h0): its drift from fp32 over 1,000 chars of text is on record.
    drift = manifest["quantization"]["onnx_int8"]["step_drift"]
    assert drift["steps"] == 1000 and 0 < drift["outputs_max_abs_diff"]["logits"] < 10 and np.isfinite(drift["state_max_abs_diff"]["h"])


def test_generate_matches_numpy_sample(char_dir):
    onnx_out = run("generate", char_dir / "model.onnx", "--prime", "ROMEO:", "--length", "200", "--seed", "7")
    numpy_out = run("sample", char_dir, "--prime", "ROMEO:", "--length", "200", "--seed", "7")
    assert onnx_out.exit_code == 0, onnx_out.output
    assert numpy_out.exit_code == 0, numpy_out.output
    assert onnx_out.output.startswith("ROMEO:") and len(onnx_out.output) >= 206
    assert onnx_out.output == numpy_out.output
    other_seed = run("generate", char_dir / "model.onnx", "--prime", "ROMEO:", "--length", "200", "--seed", "8")
    assert other_seed.output != onnx_out.output


def test_generate_with_int8_model(char_dir):
    result = run("generate", char_dir / "model.int8.onnx", "--prime", "KING", "--length", "50", "--temperature", "0.5")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("KING") and result.output.endswith("\n") and len(result.output[:-1]) == 54


def _one_line_error(result, *fragments):
    assert result.exit_code == 1
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output


def test_generate_errors(char_dir, mnist_dir):
    _one_line_error(run("generate", char_dir / "model.onnx", "--prime", "ROMEO→€"), "never saw", "€→")
    _one_line_error(run("generate", char_dir / "model.onnx", "--temperature", "0"), "temperature")
    _one_line_error(run("generate", mnist_dir / "model.onnx"), "edge-rnn infer")
    _one_line_error(run("infer", char_dir / "model.onnx", char_dir / "checkpoint.npz"), "edge-rnn generate")


def test_train_char_rnn_and_resume(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(("To be, or not to be, that is the question:\n" * 200), encoding="utf-8")
    out = tmp_path / "m"
    first = run("train", "char-rnn", "--text", text, "--hidden", "16", "--iters", "300", "--out", out)
    assert first.exit_code == 0, first.output
    assert load_manifest(out)["metrics"]["train_steps"] == 300
    resumed = run("train", "char-rnn", "--text", text, "--hidden", "16", "--iters", "600", "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    manifest = load_manifest(out)
    assert manifest["metrics"]["train_steps"] == 600
    # A repetitive text is easy: far below the uniform guess of log(V) nats/char.
    assert manifest["metrics"]["val_nats_per_char"] < 0.5 * np.log(len(manifest["vocab"]))
    exported = run("export", out)
    assert exported.exit_code == 0 and "RNN×1" in exported.output, exported.output


def test_train_char_rnn_bad_text(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café ".encode("latin-1") * 100)
    _one_line_error(run("train", "char-rnn", "--text", bad, "--out", tmp_path / "m"), "not UTF-8")
    assert not (tmp_path / "m").exists()
    _one_line_error(run("train", "char-rnn", "--text", tmp_path / "none.txt", "--out", tmp_path / "m"), "no such text file")
    _one_line_error(run("train", "char-rnn", "--out", tmp_path / "empty", "--resume"), "no manifest.json")


def test_resume_past_the_target_and_wild_temperatures_are_refused(char_dir, tmp_path):
    import shutil

    folder = shutil.copytree(char_dir, tmp_path / "c")
    manifest_before = (folder / "manifest.json").read_text()
    _one_line_error(run("train", "char-rnn", "--out", folder, "--resume", "--iters", "10"), "already at step 3,000")
    assert (folder / "manifest.json").read_text() == manifest_before
    _one_line_error(run("generate", folder / "model.onnx", "--temperature", "1e-320"), "temperature must be between")
    _one_line_error(run("sample", folder, "--temperature", "inf"), "temperature must be between")
