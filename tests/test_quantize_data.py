"""`quantize --data`: every variant judged on the user's own labelled data at batch 1, and accuracy-aware int8 (the
fewest nodes kept float), on real users' models (tests/user_models.py) and the built-in digit classifier."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import edge_rnn.quantize as quantize_module
from conftest import damage_scale, one_line_error, ort_answers
from edge_rnn.cli import app
from edge_rnn.device.manifest import load_manifest, sha256_file

runner = CliRunner()
# Rows of the digits' 1,000 held-out examples the digit tests judge on (the cap is part of what they check).
ROWS = 300


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def copy(user_models, name: str, tmp_path):
    """A private copy of a user's model folder, and the user's data file."""
    folder, data = user_models[name]
    return shutil.copytree(folder, tmp_path / name), data


def ops(path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def mae(path, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.abs(ort_answers(path, x).astype(np.float64) - y.astype(np.float64).reshape(len(y), -1)).mean())


def break_int8(monkeypatch, *, op: str, which: str) -> None:
    """Make int8 multiply one weight scale by 4 (conftest.damage_scale's `which`) wherever its graph holds `op`:
    a broken quantizer, as accuracy control re-quantizes the model many times."""
    make = quantize_module._MAKERS["int8"]

    def broken(pre, dst, **kwargs):
        settings = make(pre, dst, **kwargs)
        if ops(dst)[op]:
            damage_scale(dst, dst, factor=4.0, which=which)
        return settings

    monkeypatch.setitem(quantize_module._MAKERS, "int8", broken)


@pytest.fixture()
def broken_lstm_scale(monkeypatch):
    """int8 with the LSTM's W scale ×4 wherever it quantizes the LSTM."""
    break_int8(monkeypatch, op="DynamicQuantizeLSTM", which="lstm W")


def test_data_judgement_is_recorded_and_matches_an_independent_count(user_models, tmp_path):
    folder, data = copy(user_models, "digits", tmp_path)
    result = run("quantize", folder, "--data", data, "--max-rows", ROWS)
    assert result.exit_code == 0, result.output
    assert f"judged on {data} ({ROWS} of 1,000 rows, batch 1): accuracy" in result.output.replace("\n", " ")
    quantization = load_manifest(folder)["quantization"]
    record = quantization["onnx_int8"]
    assert record["judged_on"]["data"] == str(data)
    assert record["judged_on"]["examples"] == ROWS and record["judged_on"]["batch"] == 1
    assert record["judged_on"]["metric"] == "accuracy"
    arrays = np.load(data)
    x, y = arrays["x"][:ROWS], arrays["y"][:ROWS]
    fp32 = float((ort_answers(folder / "model.onnx", x).argmax(1) == y).mean())
    int8 = float((ort_answers(folder / "model.int8.onnx", x).argmax(1) == y).mean())
    verdict = record["verdict"]
    assert (verdict["fp32"], verdict["value"]) == (fp32, int8)
    assert verdict["drop"] == pytest.approx(100 * (fp32 - int8))
    assert verdict["ok"] and verdict["failures"] == []
    # The step model is judged on the same rows, fed one step at a time.
    assert quantization["onnx_step_int8"]["verdict"]["ok"]
    assert quantization["onnx_step_int8"]["judged_on"]["examples"] == ROWS
    # Quantized without data (the fixture), the record says what it was judged on.
    assert load_manifest(user_models["digits"][0])["quantization"]["onnx_int8"]["judged_on"] == "synthetic inputs"


def test_a_broken_int8_model_fails_on_the_data_and_is_still_recorded(user_models, tmp_path, broken_lstm_scale):
    folder, data = copy(user_models, "digits", tmp_path)
    line = one_line_error(run("quantize", folder, "--data", data, "--max-rows", ROWS, "--judge-only"),
                          "onnx_int8 broke its promise", "accuracy is", "without --judge-only")
    assert "onnx_step_int8 broke its promise" in line
    manifest = load_manifest(folder)
    assert manifest["files"]["onnx_int8"]["sha256"] == sha256_file(folder / "model.int8.onnx")
    verdict = manifest["quantization"]["onnx_int8"]["verdict"]
    assert verdict["ok"] is False and verdict["drop"] > 1.0
    assert any("it is sure of" in f for f in verdict["failures"])


def test_a_broken_promise_with_json_still_prints_the_report(user_models, tmp_path, broken_lstm_scale):
    """quantize --json: the report, as one JSON document on stdout, says which variant broke its promise (every
    variant is written and recorded); the one-line error follows on stderr, exit 1."""
    import json

    folder, data = copy(user_models, "digits", tmp_path)
    result = run("quantize", folder, "--data", data, "--max-rows", ROWS, "--judge-only", "--json")
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    by_role = {v["role"]: v for v in doc["variants"]}
    assert by_role["onnx_int8"]["ok"] is False and "BREAKS its promise" in by_role["onnx_int8"]["verdict"]
    assert by_role["onnx_int8"]["coverage"]["verdict"]["drop"] > 1.0
    assert "onnx_int8 broke its promise" in result.stderr and "Traceback" not in result.output


def test_accuracy_aware_keeps_a_broken_lstm_float(user_models, tmp_path, broken_lstm_scale):
    folder, data = copy(user_models, "digits", tmp_path)
    result = run("quantize", folder, "--data", data, "--max-rows", ROWS, "--accuracy-aware")
    assert result.exit_code == 0, result.output
    control = load_manifest(folder)["quantization"]["onnx_int8"]["accuracy_control"]
    (kept,) = control["kept_float"]  # the LSTM, named after its Keras layer (lstm, lstm_1… by the session's count)
    assert kept["op"] == "LSTM" and kept["node"] == f"{kept['layer']}/LSTM"
    assert not control["before"]["ok"] and control["after"]["ok"]
    # The LSTM runs in float32, the Dense layer stays int8.
    counts = ops(folder / "model.int8.onnx")
    assert counts["LSTM"] == 1 and counts["DynamicQuantizeLSTM"] == 0 and counts["MatMulInteger"] == 1
    arrays = np.load(data)
    x, y = arrays["x"][:ROWS], arrays["y"][:ROWS]
    fp32 = float((ort_answers(folder / "model.onnx", x).argmax(1) == y).mean())
    after = float((ort_answers(folder / "model.int8.onnx", x).argmax(1) == y).mean())
    assert after == control["after"]["value"] and 100 * (fp32 - after) <= 1.0


@pytest.fixture()
def broken_dense_scale(monkeypatch):
    """int8 with the output layer's weight scale ×4 wherever it quantizes that MatMul (on AVX2 hosts full-range int8
    weights did the like by saturating, which 7-bit weights now avoid)."""
    break_int8(monkeypatch, op="MatMulInteger", which="dense")


def test_accuracy_aware_brings_the_co2_forecaster_inside_its_budget(user_models, tmp_path, broken_dense_scale):
    folder, data = copy(user_models, "co2", tmp_path)
    full_int8 = tmp_path / "full" / "model.int8.onnx"
    shutil.copytree(folder, full_int8.parent)
    quantize_module.quantize(full_int8.parent, variants=("int8",))  # fully quantized, without data
    arrays = np.load(data)
    x, y = arrays["x"], arrays["y"]
    fp32 = mae(folder / "model.onnx", x, y)
    before = mae(full_int8, x, y)
    assert (before - fp32) / fp32 > 0.02  # int8 everywhere breaks the 2 % budget
    result = run("quantize", folder, "--data", data)  # accuracy control is the default for int8 with --data
    assert result.exit_code == 0, result.output
    assert "accuracy control: kept float next_week/" in result.output
    quantization = load_manifest(folder)["quantization"]
    control = quantization["onnx_int8"]["accuracy_control"]
    assert control["metric"] == "mae" and control["budget"] == 2.0 and control["ok"]
    assert control["before"]["value"] == pytest.approx(before, rel=1e-9)
    (kept,) = control["kept_float"]
    assert kept["op"] == "MatMul" and kept["layer"] == "next_week"
    # The kept node really is float in the produced graph; the LSTM is still int8.
    graph = onnx.load(str(folder / "model.int8.onnx")).graph
    assert [n.op_type for n in graph.node if n.name == kept["node"]] == ["MatMul"]
    counts = ops(folder / "model.int8.onnx")
    assert counts["DynamicQuantizeLSTM"] == 1 and counts["MatMulInteger"] == 0
    after = mae(folder / "model.int8.onnx", x, y)
    assert after == pytest.approx(control["after"]["value"], rel=1e-9)
    assert 100 * (after - fp32) / fp32 <= 2.0
    assert control["size_bytes_cost"] == (folder / "model.int8.onnx").stat().st_size - full_int8.stat().st_size
    assert set(control["latency_ms"]) >= {"fp32", "int8", "kept_float"} and control["latency_ms"]["batch"] == 1
    # The step model keeps the same node float, and is judged on the same data step by step.
    step = quantization["onnx_step_int8"]
    assert [n["node"] for n in step["accuracy_control"]["kept_float"]] == [kept["node"]]
    assert step["verdict"]["ok"] and step["settings"]["nodes_to_exclude"] == [kept["node"]]


def test_calibration_data_is_an_alias_and_data_calibrates(user_models, tmp_path):
    folder, data = copy(user_models, "digits", tmp_path)
    result = run("quantize", folder, "--variant", "int8-static", "--calibration-data", data)
    assert result.exit_code == 0, result.output
    assert "judged on synthetic inputs" in result.output
    record = load_manifest(folder)["quantization"]["onnx_int8_static"]
    assert record["settings"]["calibration_data"] == f"--calibration-data {data}"
    assert record["settings"]["calibration_samples"] == quantize_module.CALIBRATION_SAMPLES
    assert record["judged_on"] == "synthetic inputs"
    # The old form, one .npy of inputs, still works.
    npy = tmp_path / "x.npy"
    np.save(npy, np.load(data)["x"][:64])
    result = run("quantize", folder, "--variant", "int8-static", "--calibration-data", npy)
    assert result.exit_code == 0, result.output
    assert load_manifest(folder)["quantization"]["onnx_int8_static"]["settings"]["calibration_samples"] == 64
    # --data calibrates and judges.
    result = run("quantize", folder, "--variant", "int8-static", "--data", data, "--max-rows", ROWS)
    assert result.exit_code == 0, result.output
    record = load_manifest(folder)["quantization"]["onnx_int8_static"]
    assert record["settings"]["calibration_data"].startswith(f"--data {data}")
    assert record["judged_on"]["examples"] == ROWS and record["verdict"]["ok"]


def _bad(path, x, y, kind):
    if kind == "misnamed":
        np.savez(path, z=x, y=y)
    elif kind == "rows":
        np.savez(path, x=x, y=y[:-1])
    elif kind == "nan":
        y = y.copy()
        y[5] = np.nan
        np.savez(path, x=x, y=y)
    else:
        np.savez(path, x=x)


@pytest.mark.parametrize("kind, fragments", [
    ("misnamed", ("'z'", "neither an input")),
    ("rows", ("different numbers of rows",)),
    ("nan", ("NaN", "row 5")),
    ("no-targets", ("has no targets",)),
])
def test_bad_data_is_one_line_and_changes_nothing(user_models, tmp_path, kind, fragments):
    folder, data = copy(user_models, "co2", tmp_path)
    arrays = np.load(data)
    bad = tmp_path / "bad.npz"
    _bad(bad, arrays["x"], arrays["y"], kind)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    one_line_error(run("quantize", folder, "--data", bad, "--accuracy-aware"), str(bad), *fragments)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("args, fragments", [
    (("--accuracy-aware",), ("--accuracy-aware", "--data")),
    (("--max-drop", "5"), ("--max-drop", "--data")),
    (("--variant", "fp16", "--accuracy-aware", "--data", "DATA"), ("--accuracy-aware", "--variant int8")),
])
def test_judgement_options_need_data_and_int8(user_models, tmp_path, args, fragments):
    folder, data = copy(user_models, "co2", tmp_path)
    args = [data if a == "DATA" else a for a in args]
    one_line_error(run("quantize", folder, *args), *fragments)


def test_a_builtin_model_is_judged_on_raw_pixels(mnist_dir, digits, tmp_path):
    from edge_rnn.train.lstm import preprocess

    folder = shutil.copytree(mnist_dir, tmp_path / "mnist")
    data = tmp_path / "digits.npz"
    np.savez(data, x=digits.x_test[:ROWS], y=digits.y_test[:ROWS])  # uint8 pixels, scaled as the manifest says
    (report, *_) = quantize_module.quantize(folder, data=data)
    x = preprocess(digits.x_test[:ROWS])
    int8 = float((ort_answers(folder / "model.int8.onnx", x).argmax(1) == digits.y_test[:ROWS]).mean())
    assert report.verdict["value"] == int8 and report.ok
    assert report.judged_on["examples"] == ROWS
