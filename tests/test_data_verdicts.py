"""Issue 17, "your data, every verdict": `export --data`, `bundle --data`, `verify` and `bench --data` on the three
users' real models (tests/user_models.py), each figure checked against one computed here from onnxruntime directly."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from conftest import one_line_error, ort_answers
from edge_rnn.bench.harness import BENCH_DATA_ROWS, BenchConfig, bench
from edge_rnn.cli import app
from edge_rnn.device.manifest import load_manifest
from edge_rnn.device.metrics import wilson
from edge_rnn.exporter import DATA_PARITY_ROWS

runner = CliRunner()
# Few runs, no time budgets, small batches: the test checks the figures, not the speed.
FAST = BenchConfig(runs=20, warmup=2, min_seconds=0.0, throughput_seconds=0.0, rounds=1, batch_sizes=(4, 8))


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / folder.name)


# ---------------------------------------------------------------------------------------------
# export --data


def test_export_checks_parity_on_the_users_rows(user_models, tmp_path):
    """Both files of the masked text model are also checked on the user's first rows (padded lines, real ids)."""
    folder, data = user_models["text"]
    folder = _copy(folder, tmp_path)
    result = run("export", folder, "--data", data)
    assert result.exit_code == 0, result.output
    for role in ("onnx", "onnx_step"):
        assert f"parity {role} next_char on the first {DATA_PARITY_ROWS} rows of {data.name}: max|Δ|" in result.output
    block = load_manifest(folder)["metrics"]["export_parity_data"]
    assert block["data"] == data.name and block["rows"] == DATA_PARITY_ROWS
    assert set(block["roles"]) == {"onnx", "onnx_step"} and all(v["next_char"]["ok"] for v in block["roles"].values())
    # Exported again without data: the record of the data check goes with the files it described.
    assert run("export", folder).exit_code == 0
    assert "export_parity_data" not in load_manifest(folder)["metrics"]


def test_export_data_with_an_id_outside_the_vocabulary_is_one_line(user_models, tmp_path):
    folder, data = user_models["text"]
    folder = _copy(folder, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with np.load(data) as d:
        ids, targets = d["ids"].copy(), d["next_char"]
    ids[5, 3] = 500
    bad = tmp_path / "bad.npz"
    np.savez(bad, ids=ids, next_char=targets)
    one_line_error(run("export", folder, "--data", bad), "bad.npz", "500", "vocabulary")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def _clip_inputs(model: onnx.ModelProto, name: str, bound: float) -> None:
    """A damaged conversion: input `name` clipped to ±bound before the graph reads it."""
    clipped = f"{name}_clipped"
    for node in model.graph.node:
        node.input[:] = [clipped if i == name else i for i in node.input]
    model.graph.initializer.extend([numpy_helper.from_array(np.float32(-bound), "clip_lo"), numpy_helper.from_array(np.float32(bound), "clip_hi")])
    model.graph.node.insert(0, helper.make_node("Clip", [name, "clip_lo", "clip_hi"], [clipped]))


def test_export_on_the_users_data_finds_what_random_inputs_miss(user_models, tmp_path, monkeypatch):
    """A conversion that clips its input at ±8 passes on N(0, 1) validation inputs; the user's raw 0–255 pixels show
    it, in one line naming the data, and the folder keeps its files."""
    import edge_rnn.export.keras_onnx as keras_onnx

    folder, data = user_models["digits"]
    folder = _copy(folder, tmp_path)
    convert = keras_onnx.convert

    def damaged(model, **kwargs):
        conversion = convert(model, **kwargs)
        _clip_inputs(conversion.model, "rows", 8.0)
        return conversion

    monkeypatch.setattr(keras_onnx, "convert", damaged)
    assert run("export", folder).exit_code == 0  # random inputs miss it
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with np.load(data) as d:
        raw = tmp_path / "raw_pixels.npz"
        np.savez(raw, x=d["x"] * 255, y=d["y"])
    line = one_line_error(run("export", folder, "--data", raw), "not saved", f"on the first {DATA_PARITY_ROWS} rows of raw_pixels.npz")
    assert "onnx digit" in line and "onnx_step digit" in line
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# ---------------------------------------------------------------------------------------------
# bundle --data, verify


@pytest.fixture(scope="module")
def digits_bundle(user_models, tmp_path_factory):
    folder, data = user_models["digits"]
    out = tmp_path_factory.mktemp("data-bundle") / "digits.tar.gz"
    result = run("bundle", folder, "--variant", "fp32", "--variant", "int8", "--data", data, "-o", out)
    assert result.exit_code == 0, result.output
    with tarfile.open(out, "r:gz") as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    return out, manifest, result.output


def test_bundle_reference_is_drawn_from_the_data_one_class_after_another(digits_bundle, user_models):
    out, manifest, _ = digits_bundle
    _, data = user_models["digits"]
    drawn = manifest["reference"]["data"]
    assert drawn["file"] == data.name and drawn["stratified_by"] == "digit"
    with np.load(data) as d:
        x, y = d["x"], d["y"]
    rows = drawn["rows"]
    counts = np.bincount(y[rows], minlength=10)
    # 16 rows over 10 classes: every class once, six of them (the lowest ids) twice.
    assert counts.tolist() == [2] * 6 + [1] * 4
    assert rows == sorted(rows) and manifest["reference"]["count"] == 16
    from edge_rnn.device.bundle import open_bundle

    inputs, _ = open_bundle(out).reference()
    np.testing.assert_array_equal(inputs["rows"], x[rows])


def test_bundle_records_each_models_metric_as_computed_independently(digits_bundle, user_models):
    """The recorded accuracy of each bundled file equals onnxruntime's own at batch 1 over the whole data set."""
    out, manifest, _ = digits_bundle
    folder, data = user_models["digits"]
    block = manifest["data_metrics"]
    with np.load(data) as d:
        x, y = d["x"], d["y"]
    assert block["data"] == data.name and block["examples"] == len(y) and block["batch"] == 1
    assert set(block["roles"]) == {"onnx", "onnx_int8"}
    for role, file in (("onnx", "model.onnx"), ("onnx_int8", "model.int8.onnx")):
        hits = int(np.sum(ort_answers(folder / file, x).argmax(-1) == y))
        entry = block["roles"][role]
        assert entry["metric"] == "accuracy" and entry["output"] == "digit"
        assert entry["value"] == hits / len(y), role
        assert (entry["low"], entry["high"]) == pytest.approx(wilson(hits, len(y)), abs=1e-12)
    assert block["roles"]["onnx"]["ok"] is None and block["roles"]["onnx_int8"]["ok"] is True


def test_bundle_with_data_is_deterministic(digits_bundle, user_models, tmp_path):
    out, _, _ = digits_bundle
    folder, data = user_models["digits"]
    again = tmp_path / "again.tar.gz"
    assert run("bundle", folder, "--variant", "fp32", "--variant", "int8", "--data", data, "-o", again).exit_code == 0
    assert again.read_bytes() == out.read_bytes()


def test_verify_prints_the_recorded_metrics(digits_bundle, user_models):
    out, manifest, made = digits_bundle
    result = run("verify", out)
    assert result.exit_code == 0, result.output
    _, data = user_models["digits"]
    assert f"recorded at bundling on {data.name}: 1,000 examples, batch 1" in result.output
    for role in ("onnx", "onnx_int8"):
        entry = manifest["data_metrics"]["roles"][role]
        line = next(line for line in result.output.splitlines() if f" {role} " in line and "accuracy" in line)
        assert f"{100 * entry['value']:.2f}%" in line and f"{100 * entry['low']:.2f}–{100 * entry['high']:.2f}%" in line
    assert "recorded at bundling" in made  # `bundle` shows the same table


def test_a_bundle_naming_a_role_it_does_not_hold_is_refused(digits_bundle, tmp_path):
    from edge_rnn.bundle import _write_tar_gz

    out, manifest, _ = digits_bundle
    manifest["data_metrics"]["roles"]["onnx_fp16"] = manifest["data_metrics"]["roles"]["onnx"]
    with tarfile.open(out, "r:gz") as tar:
        members = [(info.name, tar.extractfile(info).read()) for info in tar]
    members[0] = ("manifest.json", json.dumps(manifest).encode())
    _write_tar_gz(tmp_path / "edited.tar.gz", members)
    one_line_error(run("verify", tmp_path / "edited.tar.gz"), "onnx_fp16", "does not hold")


def test_bundle_data_without_targets_is_one_line(user_models, tmp_path):
    folder, data = user_models["co2"]
    with np.load(data) as d:
        np.savez(tmp_path / "inputs_only.npz", x=d["x"])
    one_line_error(run("bundle", folder, "--data", tmp_path / "inputs_only.npz", "-o", tmp_path / "c.tar.gz"), "no targets")
    assert not (tmp_path / "c.tar.gz").exists()


# ---------------------------------------------------------------------------------------------
# bench --data


@pytest.fixture(scope="module")
def digits_bench(user_models, tmp_path_factory):
    folder, data = user_models["digits"]
    # bench makes the missing fp16 variant in the folder: it gets a copy.
    work = shutil.copytree(folder, tmp_path_factory.mktemp("bench-data") / "digits")
    return work, bench([work], cfg=FAST, data=data)


def test_bench_rows_answer_the_data_with_an_interval(digits_bench, user_models):
    work, report = digits_bench
    _, data = user_models["digits"]
    with np.load(data) as d:
        x, y = d["x"][:BENCH_DATA_ROWS], d["y"][:BENCH_DATA_ROWS]
    rows = {(r.variant, r.runtime): r for r in report.results}
    expected = {(v, "onnxruntime") for v in ("fp32", "int8", "fp16", "step", "fp32-plain", "int8-plain")} | {("fp32", "tf.function")}
    assert expected <= rows.keys(), sorted(rows)
    for key, r in rows.items():
        low, high = r.accuracy_interval
        assert r.metric == "accuracy" and 0.7 < low <= r.accuracy <= high < 1.0, key
    # onnxruntime fp32 at batch 1, computed here: exactly bench's figure and its Wilson interval.
    hits = int(np.sum(ort_answers(work / "model.onnx", x).argmax(-1) == y))
    fp32 = rows[("fp32", "onnxruntime")]
    assert fp32.accuracy == hits / len(y)
    assert fp32.accuracy_interval == pytest.approx(list(wilson(hits, len(y))), abs=1e-12)
    # Float32 forms of the same weights (the step model, tf2onnx's plain export, tf.function) score within its interval.
    for key in (("step", "onnxruntime"), ("fp32-plain", "onnxruntime"), ("fp32", "tf.function")):
        assert fp32.accuracy_interval[0] <= rows[key].accuracy <= fp32.accuracy_interval[1], key
    int8 = rows[("int8", "onnxruntime")]
    int8_hits = int(np.sum(ort_answers(work / "model.int8.onnx", x).argmax(-1) == y))
    assert int8.accuracy == int8_hits / len(y)
    # Agreement with fp32 is on the data's rows too.
    assert rows[("fp32", "tf.function")].agreement_with_fp32 > 0.99
    assert report.config["data"] == {"file": data.name, "max_rows": BENCH_DATA_ROWS, "batch": 1}


def test_bench_table_and_markdown_show_the_interval(digits_bench):
    from rich.console import Console

    from edge_rnn.bench.report import markdown
    from edge_rnn.cli import _bench_tables

    _, report = digits_bench
    fp32 = next(r for r in report.results if (r.variant, r.runtime) == ("fp32", "onnxruntime"))
    low, high = fp32.accuracy_interval
    shown = f"{fp32.accuracy:.2%} ({low:.1%}–{high:.1%})"
    console = Console(record=True, width=300)
    for table in _bench_tables(report):
        console.print(table)
    assert shown in console.export_text()
    assert shown in markdown(report.to_json())


def test_bench_data_takes_one_folder(user_models, tmp_path):
    (digits, data), (co2, _) = user_models["digits"], user_models["co2"]
    one_line_error(run("bench", digits, co2, "--data", data), "--data scores one model")


def test_bench_data_of_another_model_is_one_line(user_models, tmp_path):
    digits, _ = user_models["digits"]
    _, co2_data = user_models["co2"]
    one_line_error(run("bench", _copy(digits, tmp_path), "--data", co2_data, "--runs", "20", "--rounds", "1"), "co2_test.npz")



def test_a_bundle_drawn_from_data_self_tests_on_this_host(digits_bundle):
    # Reference rows are the data's, stratified, passing over rows a quantized model already flips here: the
    # self-test then proves what a device computes, and the whole-data metrics keep the flips' count.
    out, manifest, _ = digits_bundle
    result = runner.invoke(app, ["verify", str(out), "--run"])
    assert result.exit_code == 0, result.output
    assert manifest["reference"]["data"]["passed_over"] >= 0 and manifest["reference"]["count"] == 16
