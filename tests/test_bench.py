"""`edge-rnn bench` on small real models — the built-ins and a user's GRU+SimpleRNN model exported through the
CLI: every row and JSON field present with sane values (not the timings)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import pytest
from typer.testing import CliRunner

from edge_rnn.bench.harness import BenchConfig, bench
from edge_rnn.bench.report import markdown, plot, write_json
from edge_rnn.cli import app

# Few runs and no throughput time budget: the test checks the report, not the speed.
FAST = BenchConfig(runs=20, warmup=2, min_seconds=0.0, throughput_seconds=0.0, text_chars=2_000, rounds=1)
KEYS = {"model", "variant", "runtime", "size_bytes", "load_ms", "latency_ms", "throughput_per_s", "peak_rss_mb", "accuracy", "agreement_with_fp32"}
HAS_LITERT = importlib.util.find_spec("ai_edge_litert") is not None


@pytest.fixture(scope="module")
def report(tmp_path_factory, mnist_dir, char_dir):
    import shutil

    # bench adds the missing variants (static int8, fp16) to the folders, so it gets copies.
    work = tmp_path_factory.mktemp("bench")
    dirs = [shutil.copytree(d, work / d.name) for d in (mnist_dir, char_dir)]
    report = bench(dirs, cfg=FAST)
    path = work / "bench.json"
    write_json(report, path=path)
    return report, json.loads(path.read_text())


def _rows(doc, model):
    return {(r["variant"], r["runtime"]): r for r in doc["results"] if r["model"] == model}


def test_json_has_every_field_with_sane_values(report):
    _, doc = report
    assert doc["results"]
    for r in doc["results"]:
        assert KEYS <= r.keys(), r["variant"]
        where = f"{r['model']} {r['variant']} {r['runtime']}"
        assert r["size_bytes"] > 1000, where
        assert 0 < r["load_ms"] < 60_000, where
        lat = r["latency_ms"]
        assert set(lat) == {"p50", "p90", "p99"} and 0 < lat["p50"] <= lat["p90"] <= lat["p99"], where
        assert set(r["throughput_per_s"]) == {"64", "256"} and all(v > 0 for v in r["throughput_per_s"].values()), where
        assert 10 < r["peak_rss_mb"] < 16_000, where
        assert r["runs"] == FAST.runs
        if r["variant"] == "step":
            # Scored by max |Δ| against the fp32 sequence model on the same stream, not by agreement.
            assert r["agreement_with_fp32"] is None and r["max_abs_diff"], where
        else:
            assert 0.0 <= r["agreement_with_fp32"] <= 1.0, where
    machine = doc["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["threads"] == 1
    assert {"numpy", "onnxruntime"} <= machine["libraries"].keys()


def test_classifier_rows_and_baselines(report):
    _, doc = report
    rows = _rows(doc, "mnist-lstm")
    expected = {(v, "onnxruntime") for v in ("fp32", "int8", "int8-static", "fp16", "fp32-plain", "int8-plain")}
    expected |= {("fp32", "keras-predict"), ("fp32", "tf.function")}
    if HAS_LITERT:
        expected |= {("fp32", "litert"), ("int8", "litert")}
    assert expected <= rows.keys()
    assert rows[("fp32", "onnxruntime")]["agreement_with_fp32"] == 1.0
    for key, r in rows.items():
        if key == ("step", "onnxruntime"):
            continue  # scored against the sequence model (test_built_in_models_get_a_step_row)
        if key[1] == "tract":
            # tract (an optional extra) ignores the LSTM `activations` attribute: its row shows the wrong
            # answers it gives (tests/test_check.py flags it); only the runtimes that answer right are held here.
            assert r["agreement_with_fp32"] < 0.9, key
            continue
        assert 0.8 < r["accuracy"] <= 1.0, key  # a real classifier on every runtime
        # Float rows make fp32's decisions; int8 rows flip near-ties by the host's int8 kernels (97.7% for
        # static int8 on an AVX2 host, 99.8% here), while a broken int8 model agrees on ≤ 70% (README):
        # the bench's quantized rows are held to a bound that holds on every host, the full promise is
        # tested in test_mnist_lstm.py / test_quantize.py.
        assert r["agreement_with_fp32"] >= (0.9 if "int8" in key[0] else 0.99), key
    # Keras and the fp32 export make the same decisions.
    assert rows[("fp32", "keras-predict")]["agreement_with_fp32"] == 1.0
    assert rows[("int8", "onnxruntime")]["size_bytes"] < 0.3 * rows[("fp32", "onnxruntime")]["size_bytes"]


def test_coverage_names_the_ops(report):
    _, doc = report
    rows = _rows(doc, "mnist-lstm")
    dynamic = rows[("int8", "onnxruntime")]["coverage"]
    assert dynamic["quantized"]["DynamicQuantizeLSTM"] == 2
    static = rows[("int8-static", "onnxruntime")]["coverage"]
    # No static LSTM kernel: both LSTMs stay float, and the report says so and what it costs.
    assert static["still_float"]["LSTM"]["count"] == 2
    assert "no static" in static["still_float"]["LSTM"]["why"]
    assert static["still_float"]["LSTM"]["weight_bytes"] > 0.9 * static["size"]["weight_bytes"]
    assert any(op.endswith("(QDQ)") for op in static["quantized"])
    assert static["settings"]["calibration"] == FAST.calibration
    assert static["runtime_int8_ops"], "onnxruntime should fuse the QDQ Gemms into int8 kernels"
    assert rows[("fp16", "onnxruntime")]["coverage"]["size"]["by_dtype"].get("float16", 0) > 0


def test_char_rnn_rows(report):
    _, doc = report
    rows = _rows(doc, "char-rnn")
    assert {("fp32", "onnxruntime"), ("int8", "onnxruntime"), ("int8-static", "onnxruntime"), ("fp16", "onnxruntime"), ("fp64", "numpy")} <= rows.keys()
    nats = rows[("fp32", "onnxruntime")]["accuracy"]
    assert all(r["metric"] == "val_nats_per_char" for key, r in rows.items() if key != ("step", "onnxruntime"))
    # Briefly trained: better than a uniform guess over the vocabulary, and the NumPy reference agrees.
    assert 0.5 < nats < math.log(65)
    assert rows[("fp64", "numpy")]["accuracy"] == pytest.approx(nats, abs=1e-3)
    assert rows[("fp64", "numpy")]["agreement_with_fp32"] > 0.99
    # onnxruntime has no int8 RNN kernel: the RNN's weights are stored int8 and computed in float (size, not speed).
    coverage = rows[("int8", "onnxruntime")]["coverage"]
    assert coverage["quantized"]["RNN (int8 weights, float compute)"] == 1 and "RNN" not in coverage.get("still_float", {})


def test_built_in_models_get_a_step_row(report):
    _, doc = report
    for model, steps in (("mnist-lstm", 28), ("char-rnn", 32)):
        step = _rows(doc, model)[("step", "onnxruntime")]
        # Stepping the stream equals the sequence model on it (the char RNN's logits at every step).
        assert max(step["max_abs_diff"].values()) < 1e-4, model
        s = step["stepping"]
        assert s["time_steps"] == steps and s["steps_ms"] > 0 and s["sequence_ms"] > 0, model
        assert s["ratio"] == pytest.approx(s["steps_ms"] / s["sequence_ms"])
        assert any(t["name"].startswith(f"{model}: {steps} steps through the step model") for t in doc["targets"])


def test_targets_are_ratios_of_the_rows(report):
    result, doc = report
    names = [t["name"] for t in doc["targets"]]
    assert any("plain tf2onnx" in n for n in names) and any("Keras predict" in n for n in names)
    rows = _rows(doc, "mnist-lstm")
    size = next(t for t in doc["targets"] if t["name"] == "mnist-lstm: int8 file / fp32 file")
    assert size["ratio"] == pytest.approx(rows[("int8", "onnxruntime")]["size_bytes"] / rows[("fp32", "onnxruntime")]["size_bytes"])


def test_plot(report, tmp_path):
    pytest.importorskip("matplotlib")
    result, _ = report
    path = tmp_path / "bench.png"
    plot(result, path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_without_models_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["bench"])
    assert result.exit_code == 1
    assert "edge-rnn pipeline" in result.output
    assert "Traceback" not in result.output


def test_cli_rejects_bad_options(mnist_dir):
    result = CliRunner().invoke(app, ["bench", str(mnist_dir), "--opt-level", "fastest"])
    assert result.exit_code == 1 and "opt-level" in result.output
    result = CliRunner().invoke(app, ["bench", str(mnist_dir), "--calibration", "magic"])
    assert result.exit_code == 1 and "calibration" in result.output


def test_rounds_take_the_median_timing_and_keep_every_run():
    from edge_rnn.bench.harness import _median_of_rounds

    def out(p50, load, rss):
        return {"load_ms": load, "latency_ms": {"p50": p50, "p90": 2 * p50, "p99": 3 * p50}, "throughput_per_s": {"64": 1 / p50},
                "runs": 1000, "peak_rss_mb": rss, "accuracy": 0.9, "metric": "heldout_accuracy", "top1": [1, 2]}

    # One round hit by a burst (0.153 ms) does not move the row.
    combined = _median_of_rounds([out(0.101, 30.0, 100.0), out(0.153, 40.0, 120.0), out(0.102, 31.0, 110.0)])
    assert combined["latency_ms"] == {"p50": 0.102, "p90": 0.204, "p99": 0.306}
    assert combined["load_ms"] == 31.0 and combined["runs"] == 3000 and combined["peak_rss_mb"] == 120.0
    assert combined["throughput_per_s"]["64"] == 1 / 0.102 and combined["accuracy"] == 0.9


# ---------------------------------------------------------------------------------------------------
# A user's model: GRU + SimpleRNN, exported through the CLI, benchmarked at its own input shape.

USER_TIME_STEPS = 12


@pytest.fixture(scope="module")
def user_report(tmp_path_factory):
    keras = pytest.importorskip("keras")
    layers = keras.layers
    work = tmp_path_factory.mktemp("user-bench")
    keras.utils.set_random_seed(0)
    keras.Sequential([
        keras.Input((None, 8), name="sensor"),
        layers.GRU(16, return_sequences=True),
        layers.SimpleRNN(16),
        layers.Dense(4, activation="softmax", name="activity"),
    ]).save(work / "sensor.keras")
    result = CliRunner().invoke(app, ["export", str(work / "sensor.keras"), "--out", str(work / "sensor")])
    assert result.exit_code == 0, result.output
    cfg = dataclasses.replace(FAST, batch_sizes=(4, 8), time_steps=USER_TIME_STEPS)
    report = bench([work / "sensor"], cfg=cfg)
    path = work / "bench.json"
    write_json(report, path=path)
    return report, json.loads(path.read_text())


def test_user_model_rows(user_report):
    report, doc = user_report
    rows = _rows(doc, "sensor")
    expected = {(v, "onnxruntime") for v in ("fp32", "int8", "fp16", "fp32-plain", "step")} | {("fp32", "tf.function")}
    assert expected <= rows.keys(), sorted(rows)
    # Static int8 needs the user's calibration data: not made, and the notes say how to make it; int8 and fp16 were made.
    assert ("int8-static", "onnxruntime") not in rows
    assert any("--calibration-data" in n for n in report.notes)
    assert any("made int8, fp16" in n for n in report.notes)
    for key, r in rows.items():
        assert r["accuracy"] is None and r["metric"] == "max_abs_diff", key
        assert set(r["throughput_per_s"]) == {"4", "8"} and r["latency_ms"]["p50"] > 0, key
    # tf2onnx's export loops over time; ours is fused.
    assert rows[("fp32-plain", "onnxruntime")]["graph_ops"].get("Loop", 0) >= 1
    ours = rows[("fp32", "onnxruntime")]["graph_ops"]
    assert ours == {"GRU": 1, "RNN": 1}
    assert "Loop" not in rows[("step", "onnxruntime")]["graph_ops"]


def test_user_model_max_abs_diff_against_fp32(user_report):
    _, doc = user_report
    rows = _rows(doc, "sensor")
    assert rows[("fp32", "onnxruntime")]["max_abs_diff"] == {"activity": 0.0}
    for key in (("fp32-plain", "onnxruntime"), ("fp32", "tf.function"), ("step", "onnxruntime")):
        assert rows[key]["max_abs_diff"]["activity"] < 1e-4, key
    for variant in ("int8", "fp16"):
        diff = rows[(variant, "onnxruntime")]["max_abs_diff"]["activity"]
        assert math.isfinite(diff) and 0.0 <= diff < 0.5, variant
    # The first output is a classifier's (N, classes): top-1 agreement is reported.
    assert rows[("fp32-plain", "onnxruntime")]["agreement_with_fp32"] is not None
    assert rows[("step", "onnxruntime")]["stepping"]["time_steps"] == USER_TIME_STEPS


def test_user_model_targets(user_report):
    _, doc = user_report
    rows = _rows(doc, "sensor")
    targets = {t["name"]: t for t in doc["targets"]}
    loop = targets["sensor: fused vs tf2onnx Loop: plain export latency / fused fp32"]
    assert loop["ratio"] == pytest.approx(rows[("fp32-plain", "onnxruntime")]["latency_ms"]["p50"] / rows[("fp32", "onnxruntime")]["latency_ms"]["p50"])
    assert loop["goal"] == "≥ 5"
    step = targets[f"sensor: {USER_TIME_STEPS} steps through the step model / one sequence call (batch 1)"]
    assert step["ratio"] == pytest.approx(rows[("step", "onnxruntime")]["stepping"]["ratio"]) and step["goal"] == "≤ 2"


def test_user_model_renders(user_report, tmp_path):
    from rich.console import Console

    from edge_rnn.cli import _bench_tables

    report, doc = user_report
    text = markdown(doc)
    assert "max\\|Δ\\| fp32" in text and "| sensor | fp32-plain | onnxruntime |" in text
    console = Console(record=True, width=250)
    for table in _bench_tables(report, wide=True, width=250):
        console.print(table)
    assert "max|Δ| fp32" in console.export_text()
    # The default (80-column) table keeps the column, and the int8 row's max |Δ| is there whole.
    int8 = next(r for r in report.results if (r.variant, r.runtime) == ("int8", "onnxruntime"))
    narrow = Console(record=True, width=80)
    for table in _bench_tables(report):
        narrow.print(table)
    text = narrow.export_text()
    assert "max|Δ|" in text and f"{max(int8.max_abs_diff.values()):.1e}" in text and "…" not in text
    if importlib.util.find_spec("matplotlib") is not None:
        plot(report, path=tmp_path / "bench.png")
        assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_rejects_zero_time_steps(tmp_path):
    result = CliRunner().invoke(app, ["bench", str(tmp_path), "--time-steps", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_fixed_time_axis_keeps_its_length():
    from edge_rnn.bench.harness import _time_steps
    from edge_rnn.models.keras_model import KerasAdapter

    spec = {"name": "pixels", "dtype": "float32"}
    manifest = {
        "model": "rows", "io": {"inputs": [{**spec, "shape": ["batch", 28, 28]}], "outputs": []},
        "step": {"inputs": [{**spec, "shape": ["batch", 1, 28]}], "outputs": [], "state": []},
    }
    # Export validates at 12 steps and bench asks for --time-steps: a graph fixed at 28 takes only 28.
    assert KerasAdapter().sample_inputs(manifest, batch=2, time_steps=12, seed=0)["pixels"].shape == (2, 28, 28)
    notes: list[str] = []
    assert _time_steps(manifest, dataclasses.replace(FAST, time_steps=50), notes) == 28
    assert notes == ["rows: its time axis is fixed at 28 steps; --time-steps 50 ignored"]
    dynamic = {**manifest, "io": {"inputs": [{**spec, "shape": ["batch", "time", 28]}], "outputs": []}}
    assert _time_steps(dynamic, dataclasses.replace(FAST, time_steps=50), notes) == 50
    assert _time_steps(dynamic, FAST, notes) == 32
