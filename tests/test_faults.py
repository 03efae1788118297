"""Faults and concurrency (issue 10): killed writers, full disks, unwritable or self-overwriting outputs, seeds,
shared sessions and two processes writing one folder — through the real CLI where a command exists."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edge_rnn.cli import app
from edge_rnn.device.manifest import MANIFEST_NAME, load_manifest, save_manifest, sha256_file, verified_file

runner = CliRunner()
TEMP_GLOB = ".*.tmp*"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def cli_process(*args, limit_bytes: int | None = None) -> subprocess.Popen:
    """`edge-rnn ARGS` in its own process; with `limit_bytes`, every file it writes is capped (ulimit -f)."""

    def cap() -> None:
        # Python ignores SIGXFSZ, so a write past the cap raises OSError(EFBIG) instead of killing the process.
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.Popen([sys.executable, "-m", "edge_rnn", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=cap if limit_bytes else None)


def one_line_error(output: str, exit_code: int, *fragments: str) -> str:
    assert exit_code == 1, output
    assert "Traceback" not in output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    for fragment in fragments:
        assert fragment in lines[0], output
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def assert_folder_verifies(folder: Path) -> dict:
    """Every listed file matches its sha256, every model file on disk is listed, and no temp file is left."""
    manifest = load_manifest(folder)
    for role in manifest["files"]:
        verified_file(manifest, folder, role)
    listed = {entry["path"] for entry in manifest["files"].values()}
    assert {p.name for p in folder.glob("*.onnx")} <= listed
    assert list(folder.glob(TEMP_GLOB)) == []
    return manifest


# --- killed mid-write ---------------------------------------------------------------------------------

KILLED_WRITER = """
import os, sys
from edge_rnn.device.manifest import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half a model" * 1000)
    os.kill(os.getpid(), 9)
"""


def test_a_killed_writer_leaves_the_artifact_and_its_temp_file_is_swept(mnist_copy):
    before = snapshot(mnist_copy)
    for target in ("model.int8.onnx", MANIFEST_NAME):
        child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(mnist_copy / target)])
        assert child.wait(timeout=60) == -9
        # Only this writer's temp file, named with its dead pid: the second writer swept the first one's.
        left = [p.name for p in mnist_copy.glob(TEMP_GLOB)]
        assert left == [f".{Path(target).stem}.{child.pid}.{left[0].split('.')[-3]}.tmp{Path(target).suffix}"], left
        assert {k: v for k, v in snapshot(mnist_copy).items() if k not in left} == before
    manifest = load_manifest(mnist_copy)
    for role in manifest["files"]:
        verified_file(manifest, mnist_copy, role)
    # A live writer's temp file (this process's pid) is not ours to delete.
    live = mnist_copy / f".model.fp16.{os.getpid()}.abc123.tmp.onnx"
    live.write_bytes(b"still being written")

    for command in (("export", mnist_copy), ("quantize", mnist_copy, "--variant", "int8"), ("ort", mnist_copy, "--variant", "int8")):
        result = run(*command)
        assert result.exit_code == 0, result.output
        assert sorted(p.name for p in mnist_copy.glob(TEMP_GLOB)) == [live.name], command
    live.unlink()
    assert_folder_verifies(mnist_copy)
    assert sha256_file(mnist_copy / "model.onnx") == before["model.onnx"]


# --- disk full, unwritable output ---------------------------------------------------------------------

def test_a_full_disk_fails_quantize_in_one_line_and_keeps_the_previous_files(mnist_copy):
    before = snapshot(mnist_copy)
    limit = (mnist_copy / "model.int8.onnx").stat().st_size // 2
    child = cli_process("quantize", mnist_copy, "--variant", "int8", limit_bytes=limit)
    stdout, stderr = child.communicate(timeout=120)
    one_line_error(stdout + stderr, child.returncode, "model.int8.onnx", "File too large", "previous file is unchanged")
    assert snapshot(mnist_copy) == before
    assert_folder_verifies(mnist_copy)


def test_an_output_under_a_regular_file_is_a_clear_error(mnist_copy, tmp_path):
    not_a_folder = tmp_path / "not-a-folder"
    not_a_folder.write_text("a file")
    result = run("bundle", mnist_copy, "-o", not_a_folder / "mnist.tar.gz")
    one_line_error(result.output, result.exit_code, "not-a-folder", "not a folder")
    assert not_a_folder.read_text() == "a file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into 0555 folders; the regular-file parent case covers root")
def test_a_read_only_folder_is_a_clear_error(mnist_copy):
    before = snapshot(mnist_copy)
    mnist_copy.chmod(0o555)
    try:
        result = run("quantize", mnist_copy, "--variant", "int8")
    finally:
        mnist_copy.chmod(0o755)
    one_line_error(result.output, result.exit_code, str(mnist_copy), "Permission denied")
    assert snapshot(mnist_copy) == before


# --- output equal to an input -------------------------------------------------------------------------

@pytest.mark.parametrize("out", ["folder", "file"])
def test_export_refuses_to_overwrite_its_input(mnist_copy, out):
    before = snapshot(mnist_copy)
    keras_file = mnist_copy / "model.keras"
    result = run("export", keras_file, "--out", mnist_copy if out == "folder" else keras_file)
    one_line_error(result.output, result.exit_code, "would overwrite the input", "model.keras")
    assert snapshot(mnist_copy) == before


def test_bundle_refuses_a_model_file_as_its_output(mnist_copy):
    before = snapshot(mnist_copy)
    result = run("bundle", mnist_copy, "-o", mnist_copy / "model.onnx")
    one_line_error(result.output, result.exit_code, "model.onnx", ".tar.gz")
    assert snapshot(mnist_copy) == before


def test_quantize_refuses_to_overwrite_its_source(mnist_copy):
    manifest = load_manifest(mnist_copy)
    manifest["files"]["onnx"] = dict(manifest["files"]["onnx_int8"])  # the int8 file named as the fp32 source
    save_manifest(mnist_copy, manifest)
    before = snapshot(mnist_copy)
    result = run("quantize", mnist_copy, "--variant", "int8")
    one_line_error(result.output, result.exit_code, "model.int8.onnx", "is the model it is made from")
    assert snapshot(mnist_copy) == before


# --- seeds --------------------------------------------------------------------------------------------

def test_same_seed_same_char_rnn_weights(tmp_path):
    """The Keras twin is tests/test_mnist_lstm.py::test_training_is_reproducible (op determinism on in lstm.train)."""
    from edge_rnn.train.data import load_text

    text = tmp_path / "text.txt"
    text.write_text(load_text(None)[:5_000], encoding="utf-8")
    weights = []
    for name in ("a", "b"):
        result = run("train", "char-rnn", "--text", text, "--hidden", 8, "--iters", 60, "--seed", 5, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        with np.load(tmp_path / name / "checkpoint.npz") as ckpt:
            weights.append({k: ckpt[k] for k in ckpt.files})
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        np.testing.assert_array_equal(weights[0][key], weights[1][key], err_msg=key)


# --- concurrency --------------------------------------------------------------------------------------

@pytest.mark.parametrize("file", ["model.onnx", "model.int8.onnx"])
def test_eight_threads_sharing_a_session_match_serial_runs(mnist_dir, digits, file):
    from edge_rnn.device.session import load_model

    model = load_model(mnist_dir / file)
    name = model.io["inputs"][0]["name"]
    x = digits.x_test[:128].astype(np.float32) / 255.0
    batches = [x[i:i + 4] for i in range(0, len(x), 4)]  # (4, 28, 28) each
    serial = [model.run({name: b})[0] for b in batches]
    threaded: dict[int, np.ndarray] = {}
    start = threading.Barrier(8)

    def worker(k: int) -> None:
        start.wait()
        for i in range(k, len(batches), 8):
            threaded[i] = model.run({name: batches[i]})[0]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(threaded) == list(range(len(batches)))
    for i, expected in enumerate(serial):
        np.testing.assert_array_equal(threaded[i], expected)


def test_two_processes_quantizing_one_folder_leave_a_true_manifest(mnist_copy):
    """folder_lock serialises the two read-modify-writes: both variants end up listed, every file verifies."""
    manifest = load_manifest(mnist_copy)
    for role in ("onnx_int8", "onnx_step_int8"):
        entry = manifest["files"].pop(role, None)
        if entry:
            (mnist_copy / entry["path"]).unlink()
    for block in ("quantization", "graphs"):
        manifest.get(block, {}).pop("onnx_int8", None)
    save_manifest(mnist_copy, manifest)

    children = [cli_process("quantize", mnist_copy, "--variant", v) for v in ("int8", "fp16")]
    for child in children:
        stdout, stderr = child.communicate(timeout=120)
        assert child.returncode == 0, stdout + stderr
    manifest = assert_folder_verifies(mnist_copy)
    assert {"onnx", "onnx_int8", "onnx_fp16"} <= set(manifest["files"])
    assert {"onnx_int8", "onnx_fp16"} <= set(manifest["quantization"])
    assert json.loads((mnist_copy / MANIFEST_NAME).read_text())["files"] == manifest["files"]


# --- a killed training run resumes --------------------------------------------------------------------

KILLED_TRAINER = """
import os, sys
from edge_rnn.train import lstm
from edge_rnn.cli import app

real_train = lstm.train

def train_then_die(*args, on_epoch=None, **kwargs):
    def die_after_two(epoch, epochs, logs):
        if epoch == 2:  # BackupAndRestore has saved epoch 2 (it runs before this callback)
            os.kill(os.getpid(), 9)
    return real_train(*args, on_epoch=die_after_two, **kwargs)

lstm.train = train_then_die
app(sys.argv[1:])
"""


def test_a_killed_lstm_training_resumes_to_the_same_model(digits, tmp_path):
    data = tmp_path / "small.npz"
    np.savez(data, x_train=digits.x_train[:512], y_train=digits.y_train[:512], x_test=digits.x_test[:128], y_test=digits.y_test[:128])
    args = ["train", "mnist-lstm", "--data", data, "--epochs", 3, "--batch-size", 64, "--seed", 1]
    killed = subprocess.run([sys.executable, "-c", KILLED_TRAINER, *map(str, args), "--out", tmp_path / "killed"],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert (tmp_path / "killed" / ".train-backup").is_dir() and not (tmp_path / "killed" / "model.keras").exists()

    resumed = run(*args, "--out", tmp_path / "killed", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert not (tmp_path / "killed" / ".train-backup").exists()  # deleted once training ends
    unbroken = run(*args, "--out", tmp_path / "unbroken")
    assert unbroken.exit_code == 0, unbroken.output
    a, b = (load_manifest(tmp_path / name) for name in ("killed", "unbroken"))
    accuracy = a["metrics"]["keras_accuracy"], b["metrics"]["keras_accuracy"]
    assert accuracy[0] == pytest.approx(accuracy[1], abs=0.03), accuracy
    # Not bit-identical (the backup holds weights, optimizer and epoch, not the shuffling/dropout RNG position),
    # but the same trajectory: measured max |Δweight| 1.4e-4 after 3 epochs.
    import keras

    weights = [keras.saving.load_model(tmp_path / name / "model.keras", compile=False).get_weights() for name in ("killed", "unbroken")]
    for wa, wb in zip(*weights):
        np.testing.assert_allclose(wa, wb, atol=2e-3)

    again = run(*args, "--out", tmp_path / "unbroken", "--resume")
    one_line_error(again.output, again.exit_code, "no interrupted run to resume")
