"""ORT format: `.ort` files answer as their `.onnx` sources do (mnist-lstm fp32, int8, step; the char RNN), are
listed and verified through the manifest, run through infer / stream / generate, and come with the operator
config (with types) of the portable `basic` level."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from edge_rnn.cli import app
from edge_rnn.device.session import load_model
from edge_rnn.device.stepper import Stepper
from edge_rnn.export.ort_format import CONFIG_NAME, ORT_OPTIMIZATION, add_ort
from edge_rnn.tolerances import ORT_FORMAT_ATOL

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def mnist_ort(tmp_path_factory, mnist_dir):
    folder = tmp_path_factory.mktemp("ort") / "mnist"
    shutil.copytree(mnist_dir, folder)
    add_ort(folder)
    return folder


@pytest.fixture(scope="module")
def char_ort(tmp_path_factory, char_dir):
    folder = tmp_path_factory.mktemp("ort") / "char"
    shutil.copytree(char_dir, folder)
    result = run("ort", folder)
    assert result.exit_code == 0, result.output
    return folder


def test_manifest_lists_ort_files_and_the_portable_config(mnist_ort):
    manifest = json.loads((mnist_ort / "manifest.json").read_text())
    for role in ("onnx", "onnx_step", "onnx_int8", "onnx_step_int8"):
        entry = manifest["files"][f"{role}_ort"]
        assert entry["path"] == manifest["files"][role]["path"].replace(".onnx", ".ort")
        assert (mnist_ort / entry["path"]).stat().st_size == entry["bytes"]
    assert manifest["files"]["ort_config"]["path"] == CONFIG_NAME
    assert manifest["ort"]["optimization"] == ORT_OPTIMIZATION == "basic"
    config = (mnist_ort / CONFIG_NAME).read_text()
    assert re.search(r"^ai\.onnx;\d+;(.*,)?LSTM(\{|,|$)", config, re.M)
    assert "DynamicQuantizeLSTM" in config and '{"inputs"' in config  # types recorded (type reduction)
    # `basic` keeps ONNX operators: no contrib fusions tied to the converting host's CPU provider.
    assert "FusedGemm" not in config and "DynamicQuantizeMatMul" not in config
    # Names only in the header: no workstation paths travel with the config.
    assert str(mnist_ort) not in config and "# - model.int8.ort" in config


@pytest.mark.parametrize("role", ["onnx", "onnx_int8"])
def test_mnist_sequence_ort_equals_onnx(mnist_ort, heldout_batch, role):
    x = heldout_batch[0].astype(np.float32) / 255.0
    onnx_model = load_model(mnist_ort / f"model{'' if role == 'onnx' else '.int8'}.onnx")
    ort_model = load_model(mnist_ort / f"model{'' if role == 'onnx' else '.int8'}.ort")
    assert ort_model.role == f"{role}_ort" and ort_model.io == onnx_model.io
    name = onnx_model.io["inputs"][0]["name"]
    np.testing.assert_allclose(ort_model.run({name: x})[0], onnx_model.run({name: x})[0], rtol=0, atol=ORT_FORMAT_ATOL)


@pytest.mark.parametrize("stem", ["model.step", "model.step.int8"])
def test_mnist_step_ort_equals_onnx(mnist_ort, heldout_batch, stem):
    x = heldout_batch[0][:1].astype(np.float32) / 255.0
    steppers = [Stepper(mnist_ort / f"{stem}{suffix}", threads=1) for suffix in (".onnx", ".ort")]
    assert steppers[1].model.steppable
    name = steppers[0].model.io["inputs"][0]["name"]
    for t in range(x.shape[1]):
        a, b = (s.step({name: x[:, t : t + 1]}) for s in steppers)
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=0, atol=ORT_FORMAT_ATOL)


@pytest.mark.parametrize("stem", ["model", "model.int8"])
def test_char_rnn_ort_equals_onnx(char_ort, stem):
    models = [load_model(char_ort / f"{stem}{suffix}") for suffix in (".onnx", ".ort")]
    assert models[1].steppable and models[1].role.endswith("_ort")
    hidden = models[0].manifest["config"]["hidden"]
    ids = np.random.default_rng(0).integers(0, len(models[0].manifest["vocab"]), size=(1, 200)).astype(np.int64)
    feeds = {"ids": ids, "h0": np.zeros((1, hidden), np.float32)}
    for a, b in zip(*(m.run(feeds) for m in models)):
        np.testing.assert_allclose(b, a, rtol=0, atol=ORT_FORMAT_ATOL)


def test_infer_stream_generate_run_ort_files(mnist_ort, char_ort, heldout_batch, tmp_path):
    digits = tmp_path / "digits.npy"
    np.save(digits, heldout_batch[0][:4])
    answers = [run("infer", mnist_ort / f"model.int8{s}", digits, "--json", "--top-k", "3") for s in (".onnx", ".ort")]
    assert all(a.exit_code == 0 for a in answers), answers[1].output
    onnx_rows, ort_rows = (json.loads(a.output)["predictions"] for a in answers)
    assert [r["label"] for r in ort_rows] == [r["label"] for r in onnx_rows]
    np.testing.assert_allclose([r["probability"] for r in ort_rows], [r["probability"] for r in onnx_rows], atol=ORT_FORMAT_ATOL)

    window = tmp_path / "window.npy"
    np.save(window, heldout_batch[0][0].astype(np.float32) / 255.0)
    streams = [run("stream", mnist_ort / f"model.step{s}", "--input", window) for s in (".onnx", ".ort")]
    assert all(s.exit_code == 0 for s in streams), streams[1].output
    lines = [[json.loads(line) for line in s.output.splitlines()] for s in streams]
    assert len(lines[1]) == 28
    for a, b in zip(*lines):
        for key in a["outputs"]:
            np.testing.assert_allclose(b["outputs"][key], a["outputs"][key], atol=ORT_FORMAT_ATOL)

    texts = [run("generate", char_ort / f"model.int8{s}", "--prime", "ROMEO:", "--length", "80", "--seed", "5") for s in (".onnx", ".ort")]
    assert texts[1].exit_code == 0, texts[1].output
    assert texts[1].output == texts[0].output


def test_tampered_or_unlisted_ort_is_refused(mnist_ort, heldout_batch, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(mnist_ort, folder)
    digits = tmp_path / "d.npy"
    np.save(digits, heldout_batch[0][:1])
    data = bytearray((folder / "model.int8.ort").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.int8.ort").write_bytes(bytes(data))
    result = run("infer", folder / "model.int8.ort", digits)
    assert result.exit_code == 1 and "sha256" in result.output
    shutil.copy(folder / "model.ort", folder / "other.ort")
    result = run("infer", folder / "other.ort", digits)
    assert result.exit_code == 1 and "not listed" in result.output


def test_ort_command_picks_variants_and_refuses_missing_ones(mnist_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(mnist_dir, folder)
    result = run("ort", folder, "--variant", "int8")
    assert result.exit_code == 0, result.output
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert {r for r in files if r.endswith("_ort")} == {"onnx_int8_ort", "onnx_step_int8_ort"}
    assert "model.step.int8.ort" in (folder / CONFIG_NAME).read_text()
    result = run("ort", folder, "--variant", "fp16")
    assert result.exit_code == 1 and "has no fp16 model yet" in result.output
    assert f"edge-rnn quantize {folder} --variant fp16" in result.output.replace("\n", "")


def test_a_re_export_drops_the_ort_and_quantized_records(tmp_path, mnist_dir):
    """Files made from an older model.onnx (int8, .ort, the operator config) must not stay listed after a re-export."""
    import shutil

    from edge_rnn.device.manifest import load_manifest
    from edge_rnn.exporter import export
    from edge_rnn.export.ort_format import CONFIG_ROLE, add_ort

    folder = shutil.copytree(mnist_dir, tmp_path / "m")
    add_ort(folder, variants=("fp32",))
    before = load_manifest(folder)
    assert "onnx_ort" in before["files"] and CONFIG_ROLE in before["files"] and "ort" in before
    export(folder)
    after = load_manifest(folder)
    assert not [r for r in after["files"] if r.endswith("_ort") or r == CONFIG_ROLE or "int8" in r]
    assert "ort" not in after and "quantization" not in after
