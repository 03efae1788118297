"""`stream` and `infer --json` print JSON and nothing else on stdout: a model whose numbers overflow is refused at the
step (or row) where it happens, with exit 1, and stdin that is not UTF-8 is a one-line error under any locale.

The overflowing model is real: an LSTM with activation="relu" (an unbounded cell), weights made positive and scaled
up, exported by edge-rnn. Fed a constant input its cell state grows geometrically until float32 overflows (step 58
here); before, `stream` printed `NaN` and `Infinity` — not JSON — and exited 0.
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

from edge_rnn.cli import app

keras = pytest.importorskip("keras")

runner = CliRunner()
STEPS = 200  # a constant input this long overflows the model (it does by step 58); 12 steps do not


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def json_lines(text: str) -> list[dict]:
    """Every line parsed as strict JSON (NaN, Infinity and -Infinity refused)."""
    return [json.loads(line, parse_constant=_no_constants) for line in text.splitlines()]


def error_line(result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def relu_dir(tmp_path_factory):
    """An exported LSTM(activation="relu") with positive, scaled-up weights: finite on short inputs, overflowing on long ones."""
    from edge_rnn.exporter import export

    root = tmp_path_factory.mktemp("relu")
    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([keras.Input((None, 2), name="x"), layers.LSTM(3, activation="relu", name="lstm"), layers.Dense(2, name="y")])
    lstm = model.layers[0]
    kernel, recurrent, bias = lstm.get_weights()
    lstm.set_weights([np.abs(kernel) * 4, np.abs(recurrent) * 4, bias + 1])
    model.save(root / "relu.keras")
    export(root / "relu.keras", out=root / "relu")
    np.save(root / "long.npy", np.ones((STEPS, 2), np.float32))
    np.save(root / "short.npy", np.ones((1, 5, 2), np.float32))
    np.save(root / "long_batch.npy", np.ones((3, STEPS, 2), np.float32))
    return root


def test_a_finite_stream_is_json_on_every_line(relu_dir):
    result = runner.invoke(app, ["stream", str(relu_dir / "relu" / "model.step.onnx"), "--input", str(relu_dir / "long.npy"), "--max-steps", "10"])
    assert result.exit_code == 0, result.output
    assert [line["step"] for line in json_lines(result.stdout)] == list(range(10))


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_an_overflowing_stream_stops_at_the_step_with_an_error(relu_dir, source):
    model = str(relu_dir / "relu" / "model.step.onnx")
    if source == "file":
        result = runner.invoke(app, ["stream", model, "--input", str(relu_dir / "long.npy")])
    else:
        result = runner.invoke(app, ["stream", model], input="[1.0, 1.0]\n" * STEPS)
    line = error_line(result)
    steps = json_lines(result.stdout)  # every step printed before it is JSON
    assert 0 < len(steps) < STEPS and all(np.isfinite(v).all() for s in steps for v in s["outputs"].values())
    assert f"step {len(steps)}:" in line and "NaN or Inf" in line and "overflowed" in line


def test_infer_json_refuses_an_overflowing_row(relu_dir):
    model = str(relu_dir / "relu" / "model.onnx")
    short = runner.invoke(app, ["infer", model, str(relu_dir / "short.npy"), "--json"])
    assert short.exit_code == 0 and json.loads(short.stdout, parse_constant=_no_constants)["outputs"]
    result = runner.invoke(app, ["infer", model, str(relu_dir / "long_batch.npy"), "--json"])
    line = error_line(result)
    assert result.stdout == "" and "long_batch.npy[0]" in line and "'y'" in line and "NaN or Inf" in line


@pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C"}, {"LC_ALL": "C"}, {"LC_ALL": "C.UTF-8"}],
                         ids=["strict", "c-locale", "utf8-locale"])
def test_stdin_that_is_not_utf8_is_one_line(relu_dir, env):
    """The real process (CliRunner's stdin is not the locale's): a bad byte on line 2 after a good line 1."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "LC_ALL", "LANG", "LC_CTYPE")}
    done = subprocess.run(
        [sys.executable, "-m", "edge_rnn", "stream", str(relu_dir / "relu" / "model.step.onnx")],
        input=b"[1.0, 1.0]\n[1.0, \xff\xfe]\n[1.0, 1.0]\n", capture_output=True, env={**environ, **env}, timeout=120,
    )
    stderr = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines() == [stderr.strip()] and stderr.startswith("error: stdin line 2 is not UTF-8"), stderr
    assert [line["step"] for line in json_lines(done.stdout.decode())] == [0]
