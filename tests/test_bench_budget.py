"""`edge-rnn bench --budget`: the per-step budget of each step model — state bytes per stream, weights bytes, peak
memory, step latency — measured where TensorFlow and onnx cannot be imported (a board's device install), with every
figure checked against a computation made independently of the code under test."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import TEST_LSTM, one_line_error
from edge_rnn.bench.budget import BudgetConfig, budget, weight_bytes
from edge_rnn.cli import app
from edge_rnn.errors import EdgeRnnError, ModelFileError

HEAVY = ("tensorflow", "tf2onnx", "keras", "onnx")
# On the path of the bench process and of every measuring process it starts: none of them can import HEAVY.
SITECUSTOMIZE = textwrap.dedent(
    f"""
    import atexit, sys
    HEAVY = {HEAVY!r}
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                raise ImportError(f"{{name}} is not installed on this device")
    sys.meta_path.insert(0, _Block())
    atexit.register(lambda: print("HEAVY_MODULES=" + ",".join(sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)), file=sys.stderr))
    """
)
RUNS = 400  # timed steps per row: enough for a p99, quick on a shared host
MIB_BOUND = 1024  # a process running one of these small models stays far below this


def _onnx_weight_bytes(path) -> dict[str, int]:
    """{numpy dtype name: bytes} of every tensor stored in an ONNX file, computed with the onnx package."""
    import onnx
    from onnx import numpy_helper

    totals: Counter = Counter()

    def add(tensor) -> None:
        array = numpy_helper.to_array(tensor)
        totals[array.dtype.name] += array.nbytes

    def graph(g) -> None:
        for tensor in g.initializer:
            add(tensor)
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    add(attr.t)
                for tensor in attr.tensors:
                    add(tensor)
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
                    graph(sub)

    graph(onnx.load(str(path)).graph)
    return dict(totals)


def _state_bytes_from_graph(path, manifest) -> int:
    """Bytes per stream of the graph inputs the manifest names as state, read with the onnx package (float32)."""
    import onnx

    names = {s["input"] for s in manifest["step"]["state"]}
    inputs = [i for i in onnx.load(str(path)).graph.input if i.name in names]
    assert len(inputs) == len(names) and all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in inputs)
    return sum(4 * i.type.tensor_type.shape.dim[1].dim_value for i in inputs)


@pytest.fixture(scope="module")
def device_run(mnist_dir, char_dir, tmp_path_factory):
    """`edge-rnn bench MNIST CHAR BUNDLE --budget --json` in a process (and children) that cannot import TensorFlow or
    onnx, on an 80-column terminal: (completed process, JSON document, the bundle)."""
    from edge_rnn.bundle import make_bundle

    work = tmp_path_factory.mktemp("budget")
    bundle = make_bundle(mnist_dir, variants=("int8", "step"), out=work / "mnist.tar.gz")
    site = work / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    out = work / "budget.json"
    before = {p: sorted(os.listdir(p)) for p in (mnist_dir, char_dir)}
    proc = subprocess.run(
        [sys.executable, "-m", "edge_rnn", "bench", str(mnist_dir), str(char_dir), str(bundle), "--budget", "--runs", str(RUNS),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert {p: sorted(os.listdir(p)) for p in (mnist_dir, char_dir)} == before  # nothing written into the folders
    return proc, json.loads(out.read_text()), bundle


def _rows(doc) -> dict[tuple[str, str], dict]:
    return {(r["model"], r["variant"], r["file"].split("/")[-2] if ".tar.gz/" in r["file"] else "folder"): r for r in doc["budget"]}


def test_runs_without_tensorflow_or_onnx_and_fits_80_columns(device_run):
    proc, doc, bundle = device_run
    assert [line for line in proc.stderr.splitlines() if line.startswith("HEAVY_MODULES=")] == ["HEAVY_MODULES="]
    assert not doc["notes"], doc["notes"]
    assert sorted(_rows(doc)) == sorted([
        ("mnist-lstm", "step", "folder"), ("mnist-lstm", "step-int8", "folder"), ("char-rnn", "fp32", "folder"),
        ("char-rnn", "int8", "folder"), ("mnist-lstm", "step", bundle.name),
    ])
    lines = proc.stdout.splitlines()
    assert "…" not in proc.stdout and max(map(len, lines)) <= 80, proc.stdout
    for name in ("state", "B/stream", "weights", "+model", "p50 µs", "p99 µs"):
        assert name in proc.stdout
    assert any(re.match(r"mnist-lstm +step-int8 +2,048 +\d", line) for line in lines), proc.stdout
    # The host the figures came from, as bench names it everywhere.
    assert doc["machine"]["cpu_features"]["int8_path"] in proc.stdout and doc["machine"]["libraries"]["onnxruntime"] in proc.stdout
    assert doc["config"]["threads"] == 1 and doc["config"]["streams"] == 1 and doc["config"]["steps"] == RUNS


def test_state_bytes_are_the_hidden_sizes(device_run, mnist_dir, char_dir):
    from edge_rnn.device.manifest import load_manifest

    _, doc, bundle = device_run
    rows = _rows(doc)
    # Two stacked LSTMs of TEST_LSTM.units, each with h and c, float32: 2 × 2 × 128 × 4 = 2,048 bytes per stream.
    mnist = 2 * 2 * TEST_LSTM.units * 4
    char = load_manifest(char_dir)["config"]["hidden"] * 4  # one RNN state h
    assert mnist == 2048 and char == 256
    for key, row in rows.items():
        assert row["state_bytes_per_stream"] == (mnist if key[0] == "mnist-lstm" else char), key
        assert row["state_bytes_per_stream"] == sum(row["state_tensors"].values())
    manifest = load_manifest(mnist_dir)
    assert _state_bytes_from_graph(mnist_dir / "model.step.onnx", manifest) == mnist
    assert set(rows[("mnist-lstm", "step", "folder")]["state_tensors"]) == {s["input"] for s in manifest["step"]["state"]}


def test_weights_bytes_are_the_tensors_in_the_file(device_run, mnist_dir, char_dir):
    _, doc, bundle = device_run
    rows = _rows(doc)
    files = {("mnist-lstm", "step"): mnist_dir / "model.step.onnx", ("mnist-lstm", "step-int8"): mnist_dir / "model.step.int8.onnx",
             ("char-rnn", "fp32"): char_dir / "model.onnx", ("char-rnn", "int8"): char_dir / "model.int8.onnx"}
    for (model, variant), path in files.items():
        row = rows[(model, variant, "folder")]
        expected = _onnx_weight_bytes(path)
        assert row["weights_by_dtype"] == expected, (model, variant)
        assert row["weights_bytes"] == sum(expected.values()) and row["file_bytes"] == path.stat().st_size
        # The rest of the file is its graph and metadata (the audit, names): at most 16 KiB, whatever the weights weigh.
        assert 0 < row["file_bytes"] - row["weights_bytes"] < 16 * 1024, (model, variant, row["file_bytes"], row["weights_bytes"])
    # int8 holds the LSTMs' weights in a quarter of the bytes, and the char RNN's (its RNN's W and R per gate row too)
    # in under a third.
    step, step_int8 = rows[("mnist-lstm", "step", "folder")], rows[("mnist-lstm", "step-int8", "folder")]
    assert step_int8["weights_bytes"] < 0.3 * step["weights_bytes"] and step_int8["weights_by_dtype"]["int8"] > 0
    assert rows[("char-rnn", "int8", "folder")]["weights_bytes"] < 0.35 * rows[("char-rnn", "fp32", "folder")]["weights_bytes"]
    # The bundle's member is the folder's file: the same figures.
    from_bundle = rows[("mnist-lstm", "step", bundle.name)]
    assert (from_bundle["weights_bytes"], from_bundle["state_bytes_per_stream"]) == (step["weights_bytes"], step["state_bytes_per_stream"])


def test_latency_and_memory_are_measured(device_run):
    _, doc, _ = device_run
    for key, row in _rows(doc).items():
        for us in (row["step_us"], row["graph_step_us"]):  # through Stream.step, and the Stepper alone
            assert 0 < us["p50"] <= us["p90"] <= us["p99"] <= us["max"], key
            assert us["p50"] < 100_000, key  # one step of these models is tens of µs; 0.1 s would be a broken loop
        assert row["steps"] == RUNS and 0 < row["load_ms"] < 60_000, key
        assert row["memory_source"] == ("VmHWM" if sys.platform == "linux" else "ru_maxrss"), key
        assert 0 < row["baseline_rss_mib"] < row["peak_rss_mib"] < MIB_BOUND, key
        assert row["model_rss_mib"] == pytest.approx(row["peak_rss_mib"] - row["baseline_rss_mib"]) and row["model_rss_mib"] > 0, key


def test_weight_bytes_counts_every_kind_of_stored_tensor():
    """Initializers (raw and typed fields), Constant values, subgraphs (If branches), int4 packing and strings."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    const = lambda name, array: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))  # noqa: E731
    branch = lambda name: helper.make_graph([const(name, np.ones((5,), np.float64))], name, [],  # noqa: E731
                                            [helper.make_tensor_value_info(name, TensorProto.DOUBLE, [5])])
    initializers = [
        numpy_helper.from_array(np.zeros((3, 4), np.float32), "w"),  # raw_data
        helper.make_tensor("ids", TensorProto.INT64, [2, 3], list(range(6))),  # int64_data, not raw
        numpy_helper.from_array(np.zeros((7,), np.float16), "half"),
        numpy_helper.from_array(np.zeros((2, 5), np.int8), "q"),
        helper.make_tensor("nibbles", TensorProto.INT4, [3], [1, -2, 3]),  # 3 × 4 bits → 2 bytes
        helper.make_tensor("words", TensorProto.STRING, [2], [b"abc", b"de"]),  # strings: their bytes
        helper.make_tensor("scalar", TensorProto.FLOAT, [], [1.0]),
    ]
    nodes = [const("c", np.ones((2, 2), np.float32)),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch("a"), else_branch=branch("b"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [5])], initializer=initializers)
    data = helper.make_model(graph).SerializeToString()
    assert weight_bytes(data, where="m.onnx") == {
        "float32": 3 * 4 * 4 + 4 + 2 * 2 * 4, "int64": 6 * 8, "float16": 7 * 2, "int8": 2 * 5, "int4": 2, "string": 5,
        "float64": 2 * 5 * 8,
    }
    assert onnx.load_from_string(data).graph.node[1].op_type == "If"
    with pytest.raises(ModelFileError, match="not an ONNX model"):
        weight_bytes(b"\x3a\xff\xff\xff", where="broken.onnx")


def test_bad_usage_is_one_line(mnist_dir, tmp_path):
    runner = CliRunner()
    one_line_error(runner.invoke(app, ["bench", str(mnist_dir), "--budget", "--plot", str(tmp_path / "p.png")]), "--plot", "--budget")
    one_line_error(runner.invoke(app, ["bench", str(mnist_dir / "model.onnx"), "--budget"]), "one file of the model folder", "give the folder")
    one_line_error(runner.invoke(app, ["bench", str(tmp_path), "--budget"]), "manifest.json")
    # A folder without a step model has no per-step budget, and says so.
    no_step = tmp_path / "no-step"
    shutil.copytree(mnist_dir, no_step)
    manifest = json.loads((no_step / "manifest.json").read_text())
    for role in ("onnx_step", "onnx_step_int8"):
        del manifest["files"][role]
    (no_step / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(runner.invoke(app, ["bench", str(no_step), "--budget"]), "no per-step budget", "no step model", "re-export")


def test_a_row_that_cannot_finish_is_reported(mnist_dir):
    with pytest.raises(EdgeRnnError, match="no budget row measured.*no result within"):
        budget([mnist_dir], cfg=BudgetConfig(timeout_s=0.01))


def test_the_full_report_carries_the_budget(mnist_dir):
    """`bench` without --budget adds the same rows to its JSON, its config and its tables."""
    from rich.console import Console

    from edge_rnn.bench.harness import BenchReport
    from edge_rnn.bench.report import markdown
    from edge_rnn.cli import _bench_tables

    measured = budget([mnist_dir], cfg=BudgetConfig(steps=50, warmup=5))
    config = {"batch_sizes": [64], "opt_level": "all", "runs": 50, "min_seconds": 0, "max_seconds": 1}
    report = BenchReport([], measured.machine, config, budget=measured)
    doc = report.to_json()
    assert [r["variant"] for r in doc["budget"]] == ["step", "step-int8"] and doc["config"]["budget"]["steps"] == 50
    assert "| mnist-lstm | step-int8 | 2,048 |" in markdown(doc)
    console = Console(record=True, width=120)
    for table in _bench_tables(report):
        console.print(table)
    assert "per-step budget" in console.export_text()


def test_a_masked_model_is_stepped_without_padding(user_models):
    """The text model masks id 0: the budget's frames draw real ids only, so both step files are measured (a drawn 0
    followed by a real id was refused as a real step after padding, and the rows were left unmeasured)."""
    folder, _ = user_models["text"]
    measured = budget([folder], cfg=BudgetConfig(steps=50, warmup=5))
    assert not measured.notes, measured.notes
    rows = {r.variant: r for r in measured.rows}
    assert set(rows) == {"step", "step-int8"}
    assert all(r.step_us["p50"] > 0 for r in rows.values())
