"""The device install, proven: a fresh virtual environment with the plain `pip install .` (no extras) has no
tensorflow, tf2onnx or onnx, and its `edge-rnn` runs infer, stream and generate — on `.onnx` and `.ort` files —
on model folders the workstation side made, with the answers the workstation gets.

The package is installed from a copy of the sources in tmp_path (pip builds in the source tree, which must stay
clean); pip takes its wheels from this host's cache or index as any user's install would (~20 s here).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_rnn.device.runtime import generate, infer
from edge_rnn.export.ort_format import add_ort

ROOT = Path(__file__).resolve().parents[1]
# Building the venv and installing the wheels: generous for a slow host, far below CI's budget.
INSTALL_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory) -> Path:
    """bin/ of a fresh venv holding `pip install .` and nothing else."""
    base = tmp_path_factory.mktemp("device")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "edge_rnn", src / "edge_rnn", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=INSTALL_TIMEOUT_S)
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q", str(src)],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv / "bin"


def device(bin_dir: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / "edge-rnn"), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_device_venv_has_no_training_side(device_venv):
    probe = "import importlib.util as u, json; print(json.dumps({m: bool(u.find_spec(m)) for m in ('tensorflow', 'tf2onnx', 'onnx', 'keras', 'onnxruntime', 'edge_rnn.device')}))"
    found = json.loads(subprocess.run([str(device_venv / "python"), "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert found == {"tensorflow": False, "tf2onnx": False, "onnx": False, "keras": False, "onnxruntime": True, "edge_rnn.device": True}
    assert device(device_venv, "--version").returncode == 0


def test_device_venv_runs_infer_stream_generate(device_venv, mnist_dir, char_dir, heldout_batch, tmp_path):
    mnist, char = tmp_path / "mnist", tmp_path / "char"
    shutil.copytree(mnist_dir, mnist)
    shutil.copytree(char_dir, char)
    add_ort(mnist, variants=["int8"])  # the workstation adds .ort files; the device only runs them
    digits = tmp_path / "digits.npy"
    np.save(digits, heldout_batch[0][:8])
    expected = [p.label for p in infer(mnist / "model.int8.onnx", [digits]).predictions]
    for model in ("model.int8.onnx", "model.int8.ort"):
        result = device(device_venv, "infer", mnist / model, digits, "--json")
        assert result.returncode == 0, result.stderr
        assert [row["label"] for row in json.loads(result.stdout)["predictions"]] == expected

    window = tmp_path / "window.npy"
    np.save(window, heldout_batch[0][0].astype(np.float32) / 255.0)
    for model in ("model.step.onnx", "model.step.int8.ort"):
        result = device(device_venv, "stream", mnist / model, "--input", window)
        assert result.returncode == 0, result.stderr
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert [line["step"] for line in lines] == list(range(28))

    text = generate(char / "model.onnx", prime="ROMEO:", length=60, seed=7)
    result = device(device_venv, "generate", char / "model.onnx", "--prime", "ROMEO:", "--length", "60", "--seed", "7")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ROMEO:" + text + "\n"

    (mnist / "model.int8.onnx").write_bytes((mnist / "model.onnx").read_bytes())
    result = device(device_venv, "infer", mnist / "model.int8.onnx", digits)
    assert result.returncode == 1 and "sha256" in result.stderr and "Traceback" not in result.stderr


def test_device_venv_self_tests_and_runs_a_bundle(device_venv, mnist_dir, char_dir, heldout_batch, tmp_path):
    """The board's side of shipping: a bundle made on the workstation is verified, self-tested against the
    source model's reference outputs, and run — all without TensorFlow or onnx."""
    from edge_rnn.bundle import make_bundle

    mnist = make_bundle(mnist_dir, variants=("int8", "step"), ort=True, out=tmp_path / "mnist.tar.gz")
    char = make_bundle(char_dir, variants=("int8",), out=tmp_path / "char.tar.gz")
    for bundle in (mnist, char):
        result = device(device_venv, "verify", bundle, "--run")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "self-test" in result.stdout
    digits = tmp_path / "digits.npy"
    np.save(digits, heldout_batch[0][:8])
    expected = [p.label for p in infer(mnist_dir / "model.int8.onnx", [digits]).predictions]
    result = device(device_venv, "infer", mnist, digits, "--json")
    assert result.returncode == 0, result.stderr
    assert [row["label"] for row in json.loads(result.stdout)["predictions"]] == expected
    result = device(device_venv, "generate", char, "--prime", "ROMEO:", "--length", "40", "--seed", "3")
    assert result.returncode == 0 and result.stdout.startswith("ROMEO:"), result.stderr
    before = sorted(p.name for p in tmp_path.iterdir())
    tampered = tmp_path / "tampered.tar.gz"
    data = bytearray(mnist.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the compressed stream: a member's bytes or the gzip CRC change
    tampered.write_bytes(bytes(data))
    result = device(device_venv, "verify", tampered)
    assert result.returncode == 1 and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["tampered.tar.gz"])  # nothing unpacked beside it
