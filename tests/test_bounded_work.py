"""Bounded work (issue 10): every count a user gives has a named cap, generation and `stream` print as they go
in flat memory, Ctrl-C ends `generate` with exit 130, and hostile small inputs get one clean line through the CLI.
"""

from __future__ import annotations

import gzip
import itertools
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from edge_rnn import config
from edge_rnn.cli import app

runner = CliRunner()


def run(*args, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


# ---------------------------------------------------------------------------------------------
# Caps: one past each is a usage error (exit 2) that shows the allowed range, before any work.

CAPS = [
    (("generate", "m.onnx", "--length"), config.MAX_GENERATE_LENGTH),
    (("sample", "dir", "--length"), config.MAX_GENERATE_LENGTH),
    (("train", "mnist-lstm", "--epochs"), config.MAX_EPOCHS),
    (("train", "mnist-lstm", "--batch-size"), config.MAX_BATCH_SIZE),
    (("train", "char-rnn", "--iters"), config.MAX_CHAR_ITERS),
    (("train", "char-rnn", "--hidden"), config.MAX_HIDDEN),
    (("train", "char-rnn", "--seq-length"), config.MAX_SEQ_LENGTH),
    (("pipeline", "--epochs"), config.MAX_EPOCHS),
    (("pipeline", "--char-iters"), config.MAX_CHAR_ITERS),
    (("bench", "dir", "--runs"), config.MAX_BENCH_RUNS),
    (("bench", "dir", "--rounds"), config.MAX_BENCH_ROUNDS),
    (("bench", "dir", "--time-steps"), config.MAX_TIME_STEPS),
    (("check", "dir", "--batch"), config.MAX_CHECK_BATCH),
]


@pytest.mark.parametrize("args, cap", CAPS, ids=[" ".join(a[:-1] if a[0] != "train" else a[:2]) + " " + a[-1] for a, _ in CAPS])
def test_a_count_past_its_cap_is_a_usage_error_naming_the_cap(args, cap, tmp_path):
    out = ("--out", tmp_path / "out") if args[0] in ("train", "pipeline") else ()
    result = run(*args, cap + 1, *out)
    assert result.exit_code == 2, result.output
    assert f"{cap}" in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_every_cap_is_documented_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    for name in ("MAX_GENERATE_LENGTH", "MAX_EPOCHS", "MAX_BATCH_SIZE", "MAX_CHAR_ITERS", "MAX_HIDDEN", "MAX_SEQ_LENGTH",
                 "MAX_BENCH_RUNS", "MAX_BENCH_ROUNDS", "MAX_TIME_STEPS", "MAX_CHECK_BATCH"):
        assert f"{getattr(config, name):,}" in readme, name
    assert "an option outside its range is a usage error" in readme


# ---------------------------------------------------------------------------------------------
# Streaming: text and steps come out as they are made, so a huge count never builds up in memory.


def test_generate_yields_text_as_it_is_made(char_dir):
    from edge_rnn.device.runtime import GENERATE_CHUNK, generate, iter_generate

    # A length no list could hold: the first pieces still arrive at once.
    pieces = list(itertools.islice(iter_generate(char_dir / "model.onnx", prime="ROMEO:", length=10**12, seed=3), 3))
    assert [len(p) for p in pieces] == [GENERATE_CHUNK] * 3
    # Chunking changes no character: the streamed text is the whole-string text.
    assert "".join(pieces)[:100] == generate(char_dir / "model.onnx", prime="ROMEO:", length=100, seed=3)


def test_generate_through_the_cli_equals_the_numpy_sampler(char_dir):
    generated = run("generate", char_dir / "model.onnx", "--prime", "KING:", "--length", 150, "--seed", 5)
    sampled = run("sample", char_dir, "--prime", "KING:", "--length", 150, "--seed", 5)
    assert generated.exit_code == sampled.exit_code == 0, generated.output + sampled.output
    assert generated.output == sampled.output and len(generated.output) == len("KING:") + 150 + 1
    assert run("generate", char_dir / "model.onnx", "--prime", "KING:", "--length", 0).output == "KING:\n"


def test_stream_over_an_endless_stdin_holds_one_step_at_a_time(mnist_dir):
    from edge_rnn.device.runtime import stream

    row = "[" + ",".join(["0.5"] * 28) + "]\n"
    read = itertools.count()
    lines = (row for _ in iter(lambda: next(read), None))  # never ends
    outputs = list(itertools.islice(stream(mnist_dir / "model.step.onnx", lines=lines), 5))
    assert len(outputs) == 5 and next(read) <= 7  # each output came before the stream read much further


def test_stream_over_a_long_file_starts_before_it_ends(mnist_dir, tmp_path):
    from edge_rnn.device.runtime import stream

    x = np.random.default_rng(0).random((20_000, 28), dtype=np.float32)
    np.save(tmp_path / "long.npy", x)
    steps = stream(mnist_dir / "model.step.onnx", inputs=[tmp_path / "long.npy"])
    first = list(itertools.islice(steps, 3))  # three session calls, not 20,000 outputs held
    assert len(first) == 3 and all(y.shape[0] == 1 for step in first for y in step.values())


def test_stream_cli_prints_every_step_of_a_long_stdin(mnist_dir):
    row = "[" + ",".join(["0.25"] * 28) + "]\n"
    result = run("stream", mnist_dir / "model.step.onnx", input=row * 2_000)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2_000 and lines[-1].startswith('{"step": 1999')


def test_ctrl_c_stops_generate_cleanly_with_exit_130(char_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_rnn", "generate", str(char_dir / "model.onnx"), "--length", str(config.MAX_GENERATE_LENGTH)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        first = proc.stdout.read(200)  # text is flushed as it is made, long before the million characters
        assert len(first) == 200
        proc.send_signal(signal.SIGINT)
        rest, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr.decode()
    assert b"Traceback" not in stderr and b"KeyboardInterrupt" not in stderr, stderr.decode()
    assert len(first) + len(rest) < config.MAX_GENERATE_LENGTH


# ---------------------------------------------------------------------------------------------
# Hostile small inputs: one line starting "error:", exit 1, no traceback.


def _one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output


@pytest.mark.parametrize("command", ["generate", "sample"])
@pytest.mark.parametrize(
    "prime, fragment",
    [("", "empty"), ("ROMEO 🙂", "never saw"), ("A\x00B", "never saw"), ("\ufffd", "never saw")],
    ids=["empty", "emoji", "NUL", "replacement-char"],
)
def test_a_bad_prime_is_one_line(char_dir, command, prime, fragment):
    target = char_dir / "model.onnx" if command == "generate" else char_dir
    _one_line_error(run(command, target, "--prime", prime, "--length", 5), fragment)


def _write_idx(folder, *, images: bytes, labels: bytes):
    folder.mkdir()
    for stem in ("train", "t10k"):
        (folder / f"{stem}-images-idx3-ubyte").write_bytes(images)
        (folder / f"{stem}-labels-idx1-ubyte").write_bytes(labels)


def _idx(ndim: int, dims: tuple[int, ...], body: bytes, *, magic_type: int = 0x08) -> bytes:
    header = bytes([0, 0, magic_type, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + body


GOOD_IMAGES = _idx(3, (2, 28, 28), bytes(2 * 28 * 28))
GOOD_LABELS = _idx(1, (2,), bytes([1, 2]))


def _data_case(kind, tmp_path):
    """A --data argument for train mnist-lstm holding one kind of damage; returns (spec, fragment in the error)."""
    if kind == "idx-bad-magic":
        _write_idx(tmp_path / "d", images=b"\x12\x34" + GOOD_IMAGES[2:], labels=GOOD_LABELS)
        return tmp_path / "d", "magic"
    if kind == "idx-truncated":
        _write_idx(tmp_path / "d", images=GOOD_IMAGES[:-100], labels=GOOD_LABELS)
        return tmp_path / "d", "truncated"
    if kind == "idx-gz-garbage":
        (tmp_path / "d").mkdir()
        for stem in ("train", "t10k"):
            (tmp_path / "d" / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(GOOD_IMAGES)[:20])
            (tmp_path / "d" / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(GOOD_LABELS))
        return tmp_path / "d", "d"
    if kind == "idx-empty-folder":
        (tmp_path / "d").mkdir()
        return tmp_path / "d", "IDX"
    x = np.zeros((4, 28, 28), np.uint8)
    if kind == "npz-missing-keys":
        np.savez(tmp_path / "d.npz", x_train=x, y_train=np.zeros(4, np.uint8))
        return tmp_path / "d.npz", "expected"
    if kind == "npz-labels-out-of-range":
        y = np.array([0, 1, 2, 10], np.int64)
        np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)
        return tmp_path / "d.npz", "0–9"
    if kind == "npz-negative-labels":
        y = np.array([0, 1, 2, -1], np.int64)
        np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)
        return tmp_path / "d.npz", "0–9"
    if kind == "npz-no-images":
        e = np.zeros((0, 28, 28), np.uint8)
        np.savez(tmp_path / "d.npz", x_train=e, y_train=np.zeros(0, np.uint8), x_test=e, y_test=np.zeros(0, np.uint8))
        return tmp_path / "d.npz", "no images"
    if kind == "npz-not-a-zip":
        (tmp_path / "d.npz").write_bytes(b"PK\x03\x04 not really")
        return tmp_path / "d.npz", "d.npz"
    raise AssertionError(kind)


DATA_CASES = ["idx-bad-magic", "idx-truncated", "idx-gz-garbage", "idx-empty-folder", "npz-missing-keys",
              "npz-labels-out-of-range", "npz-negative-labels", "npz-no-images", "npz-not-a-zip"]


@pytest.mark.parametrize("kind", DATA_CASES)
def test_broken_digit_data_is_one_line(kind, tmp_path):
    spec, fragment = _data_case(kind, tmp_path)
    out = tmp_path / "out"
    _one_line_error(run("train", "mnist-lstm", "--data", spec, "--epochs", 1, "--out", out), fragment)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "content, fragment",
    [(b"", "only 0 characters"), (b"a", "only 1 characters"), (b"\xff\xfe not utf-8 " * 20, "not UTF-8"),
     (b"a" * 500, "one distinct character"), ("🙂".encode() * 200, "one distinct character")],
    ids=["empty", "one-char", "invalid-utf8", "one-distinct-char", "one-emoji-repeated"],
)
def test_a_bad_corpus_is_one_line(content, fragment, tmp_path):
    (tmp_path / "corpus.txt").write_bytes(content)
    out = tmp_path / "out"
    _one_line_error(run("train", "char-rnn", "--text", tmp_path / "corpus.txt", "--iters", 10, "--out", out), fragment)
    assert not out.exists() or not any(out.iterdir())


def test_ctrl_c_while_training_exits_130_and_leaves_no_partial_folder(tmp_path):
    """SIGINT before any output (here: during TensorFlow's import and training) is 130 too, with no traceback."""
    out = tmp_path / "m"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_rnn", "train", "mnist-lstm", "--data", "sample", "--epochs", "50", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        time.sleep(6)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr.decode()
    assert b"Traceback" not in stderr and b"KeyboardInterrupt" not in stderr, stderr.decode()
    assert not (out / "model.keras").exists() and not list(out.glob(".*.tmp*")) if out.exists() else True
