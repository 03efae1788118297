"""`edge-rnn check`: one model file on several runtimes, each judged against the source model's answers.

onnxruntime is tested for real everywhere. The wrong-answer path is proven without tract by a real runtime
that really answers wrong: `onnx.reference` (the `[train]` extra's onnx) ignores the LSTM `activations`
attribute — shown first on a one-op LSTM — so on the MNIST LSTM (relu cells) it is off by ~1. That gap is known
(`check.IGNORED_BY`), so by default it is reported `unsupported` with the node and attribute and does not fail the
run; with the table emptied the same answer is WRONG and fails it.

openvino and tract come from the optional `[runtimes]` extra, which CI does not install: where they are
missing, the tests assert that `check` reports them as not installed; where they are installed (the
development host), the same tests assert what they answer — tract off on the MNIST LSTM (a known gap), openvino right.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from edge_rnn.config import BundleConfig
from edge_rnn.cli import app
from edge_rnn.bench.runtimes import RUNTIMES
from edge_rnn.tolerances import KERAS_ONNX_ATOL

# Small batches keep onnx.reference (pure NumPy) and the spawned processes quick.
BATCH = "16"


def _check(*args: str):
    return CliRunner().invoke(app, ["check", *map(str, args), "--batch", BATCH])


def _doc(*args: str) -> tuple[int, dict]:
    result = _check(*args, "--json")
    return result.exit_code, json.loads(result.stdout)


def _by_runtime(doc: dict) -> dict[str, dict]:
    return {r["runtime"]: r for r in doc["results"]}


@pytest.fixture(scope="module")
def gru_dir(tmp_path_factory):
    """A small Keras GRU model exported through the CLI (dynamic time axis, softmax output)."""
    keras = pytest.importorskip("keras")
    work = tmp_path_factory.mktemp("gru")
    keras.utils.set_random_seed(0)
    keras.Sequential([
        keras.Input((None, 6), name="sensor"),
        keras.layers.GRU(12),
        keras.layers.Dense(3, activation="softmax", name="activity"),
    ]).save(work / "gru.keras")
    result = CliRunner().invoke(app, ["export", str(work / "gru.keras"), "--out", str(work / "gru")])
    assert result.exit_code == 0, result.output
    return work / "gru"


def test_mnist_on_onnxruntime_answers_right(mnist_dir):
    result = _check(mnist_dir, "--runtime", "onnxruntime")
    assert result.exit_code == 0, result.output
    assert "onnxruntime" in result.stdout and "ok" in result.stdout and "WRONG" not in result.stdout
    words = " ".join(result.stdout.split())  # rich wraps the title where the (tmp) path makes it long
    assert "source model" in words and "tolerance: probs atol 1e-05" in words
    code, doc = _doc(mnist_dir, "--runtime", "onnxruntime")
    assert code == 0 and doc["wrong"] == [] and doc["sets"] == {"reference": 8, "random": int(BATCH)}
    (ort,) = doc["results"]
    assert ort["status"] == "ok" and ort["version"]
    assert 0 <= ort["max_abs_diff_overall"] <= KERAS_ONNX_ATOL
    assert set(ort["max_abs_diff"]) == {"reference", "random"}
    assert ort["agreement"] == 1.0 and ort["latency_ms"] > 0 and ort["latency_runs"] >= 5
    assert doc["machine"]["arch"] and "int8 path" in doc["machine"]["description"]


def test_keras_gru_folder_on_onnxruntime(gru_dir):
    code, doc = _doc(gru_dir, "--runtime", "onnxruntime")
    assert code == 0, doc
    (ort,) = doc["results"]
    assert ort["status"] == "ok" and set(ort["max_abs_diff"]["random"]) == {"activity"}
    assert ort["max_abs_diff_overall"] <= KERAS_ONNX_ATOL and ort["agreement"] == 1.0


def _one_lstm(onnx, *, activations: list[str] | None):
    """A one-op ONNX LSTM (input 3, hidden 4) with fixed random weights, and `activations` if given."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"W": (1, 16, 3), "R": (1, 16, 4), "B": (1, 32)}
    inits = [numpy_helper.from_array(rng.normal(0, 0.7, shape).astype(np.float32), name) for name, shape in weights.items()]
    attrs = {"hidden_size": 4, **({"activations": activations} if activations else {})}
    node = helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], **attrs)
    graph = helper.make_graph([node], "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 2, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx_reference_ignores_the_lstm_activations_attribute():
    """The premise of the wrong-answer tests: onnx.reference agrees with onnxruntime on a default LSTM and
    not on one with Sigmoid/Relu/Relu, where it answers as if the attribute were absent."""
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    x = np.random.default_rng(1).normal(0, 2, (5, 2, 3)).astype(np.float32)

    def both(model):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0], ReferenceEvaluator(model).run(None, {"x": x})[0]

    ort_default, ref_default = both(_one_lstm(onnx, activations=None))
    ort_relu, ref_relu = both(_one_lstm(onnx, activations=["Sigmoid", "Relu", "Relu"]))
    np.testing.assert_allclose(ref_default, ort_default, atol=1e-6)
    assert np.max(np.abs(ref_relu - ort_relu)) > 0.1
    np.testing.assert_allclose(ref_relu, ort_default, atol=1e-6)


def _lstm_nodes(path) -> list[str]:
    import onnx

    names = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "LSTM"]
    assert len(names) == 2  # the MNIST LSTM's two layers
    return names


def test_a_runtime_known_to_ignore_an_attribute_is_unsupported_not_wrong(mnist_dir):
    """Default runtimes on the MNIST LSTM: onnx.reference is off by ~0.5 because it ignores the Relu activations —
    reported as unsupported, naming both LSTM nodes and the attribute, exit 0."""
    pytest.importorskip("onnx")
    result = _check(mnist_dir)
    assert result.exit_code == 0, result.output
    words = " ".join(result.stdout.split())
    assert "unsupported" in words and "WRONG" not in words
    # Every LSTM node of the file is named (their names follow Keras' layer numbering, so they are read from the file).
    for node in _lstm_nodes(mnist_dir / "model.onnx"):
        assert f"LSTM '{node}' activations Sigmoid, Relu, Relu (it applies Sigmoid, Tanh, Tanh)" in words
    code, doc = _doc(mnist_dir, "--runtime", "onnxruntime", "--runtime", "onnx.reference")
    rows = _by_runtime(doc)
    assert code == 0 and doc["wrong"] == [] and rows["onnxruntime"]["status"] == "ok"
    assert rows["onnx.reference"]["status"] == "unsupported" and rows["onnx.reference"]["max_abs_diff_overall"] > 0.1
    assert "probs off by" in rows["onnx.reference"]["reason"]


def test_a_runtime_that_answers_wrong_is_flagged(mnist_dir, monkeypatch):
    """The same answer, with nothing known to explain it, fails the run: WRONG, exit 1 (0 with --allow-wrong)."""
    pytest.importorskip("onnx")
    import edge_rnn.check

    monkeypatch.setattr(edge_rnn.check, "IGNORED_BY", {})
    result = _check(mnist_dir, "--runtime", "onnxruntime", "--runtime", "onnx.reference")
    assert result.exit_code == 1, result.output
    assert "WRONG" in result.stdout and "onnx.reference: probs off by" in " ".join(result.stdout.split())
    assert "wrong answers from: onnx.reference" in result.stderr
    code, doc = _doc(mnist_dir, "--runtime", "onnxruntime", "--runtime", "onnx.reference")
    assert code == 1 and doc["wrong"] == ["onnx.reference"]
    rows = _by_runtime(doc)
    assert rows["onnxruntime"]["status"] == "ok"
    assert rows["onnx.reference"]["status"] == "wrong" and rows["onnx.reference"]["max_abs_diff_overall"] > 0.1
    # --allow-wrong still reports it, and exits 0.
    allowed = _check(mnist_dir, "--runtime", "onnx.reference", "--allow-wrong")
    assert allowed.exit_code == 0 and "WRONG" in allowed.stdout and "--allow-wrong" in allowed.stderr


def test_known_gaps_name_the_node_and_what_is_ignored(tmp_path):
    """From the graph alone: default activations are no gap; Relu activations, a clip and a sequence_lens input are."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from edge_rnn.check import known_gaps

    def saved(model, name):
        onnx.save(model, tmp_path / name)
        return tmp_path / name

    assert known_gaps("onnx.reference", saved(_one_lstm(onnx, activations=None), "plain.onnx")) == []
    assert known_gaps("onnx.reference", saved(_one_lstm(onnx, activations=["sigmoid", "tanh", "tanh"]), "lower.onnx")) == []
    relu = saved(_one_lstm(onnx, activations=["Sigmoid", "Relu", "Relu"]), "relu.onnx")
    assert known_gaps("onnx.reference", relu) == ["LSTM '' activations Sigmoid, Relu, Relu (it applies Sigmoid, Tanh, Tanh)"]
    assert known_gaps("onnxruntime", relu) == []
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, s).astype(np.float32), n) for n, s in
             {"W": (1, 12, 3), "R": (1, 12, 4), "B": (1, 24)}.items()]
    node = helper.make_node("GRU", ["x", "W", "R", "B", "lens"], ["y"], name="masked", hidden_size=4, clip=2.0)
    graph = helper.make_graph([node], "gru", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, 3]),
                                              helper.make_tensor_value_info("lens", TensorProto.INT32, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 2, 4])], inits)
    gru = saved(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "gru.onnx")
    assert known_gaps("onnx.reference", gru) == ["GRU 'masked' clip 2; its sequence_lens input (the padding mask)"]


def _one_cell(onnx, op: str, *, lens: bool = False, **attrs):
    """A one-op ONNX LSTM/GRU/RNN (input 3, hidden 4, time 5, batch 2), with a sequence_lens input if `lens`."""
    from onnx import TensorProto, helper, numpy_helper

    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.7, s).astype(np.float32), n)
             for n, s in {"W": (1, 4 * gates, 3), "R": (1, 4 * gates, 4), "B": (1, 8 * gates)}.items()]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, 3])]
    if lens:
        inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [2]))
    node = helper.make_node(op, ["x", "W", "R", "B"] + (["lens"] if lens else []), ["y"], name="cell", hidden_size=4, **attrs)
    graph = helper.make_graph([node], "cell", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 2, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


USES = {  # what a graph uses, as one-op graph attributes, for every name IGNORED_BY can hold
    "activations": lambda op: {"activations": {"LSTM": ["Sigmoid", "Relu", "Relu"], "GRU": ["Sigmoid", "Relu"], "RNN": ["Relu"]}[op]},
    "activation_alpha": lambda op: {"activations": {"LSTM": ["HardSigmoid", "Tanh", "Tanh"], "GRU": ["HardSigmoid", "Tanh"]}[op],
                                    "activation_alpha": [0.5], "activation_beta": [0.3]},
    "clip": lambda op: {"clip": 0.5},
    "input_forget": lambda op: {"input_forget": 1},
}


def test_every_known_gap_is_real(tmp_path):
    """Each entry of IGNORED_BY, for every runtime installed here (onnx.reference in CI; tract where the `[runtimes]`
    extra is): a one-op graph using it is named by known_gaps, and the runtime's answer is > 0.1 off onnxruntime's."""
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort

    from edge_rnn.bench.runtimes import open_runtime
    from edge_rnn.check import IGNORED_BY, known_gaps

    x = np.random.default_rng(1).normal(0, 2, (5, 2, 3)).astype(np.float32)
    proved = []
    for name, ops in IGNORED_BY.items():
        if RUNTIMES[name].version() is None:
            continue
        for op, ignored in ops.items():
            for what in ignored:
                if what == "activation_beta":
                    continue  # made together with activation_alpha
                lens = what == "sequence_lens"
                path = tmp_path / f"{name}-{op}-{what}.onnx"
                onnx.save(_one_cell(onnx, op, lens=lens, **({} if lens else USES[what](op))), path)
                feeds = {"x": x, **({"lens": np.array([5, 2], np.int32)} if lens else {})}
                want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
                (gap,) = known_gaps(name, path)
                assert gap.startswith(f"{op} 'cell' ") and what.split("_")[0] in gap, gap
                got = open_runtime(name, path)(feeds)["y"]
                assert np.max(np.abs(got - want)) > 0.1, (name, op, what)
                proved.append((name, op, what))
    assert len(proved) >= 11  # onnx.reference's entries at least (activation_beta goes with activation_alpha)


def test_a_folder_int8_variant_is_judged_at_its_bundle_bound(mnist_dir, monkeypatch):
    """--role onnx_int8 on a folder: the reference set against the source model at the bound a bundle stores (0.3 in
    probability, with the top-1 and mean promises), the random set against onnxruntime on the same file. With that
    bound made 1e-6 the same int8 answers fail: the role is really judged."""
    code, doc = _doc(mnist_dir, "--role", "onnx_int8", "--runtime", "onnxruntime")
    assert code == 0, doc
    (ort,) = doc["results"]
    assert doc["role"] == "onnx_int8" and doc["file"].endswith("model.int8.onnx")
    assert doc["tolerances"]["probs"] == "atol 0.3 (the bound a bundle of onnx_int8 stores)"
    assert 1e-4 < ort["max_abs_diff"]["reference"]["probs"] <= 0.3 and ort["max_abs_diff"]["random"]["probs"] == 0.0
    import edge_rnn.bundle

    monkeypatch.setattr(edge_rnn.bundle, "BUNDLE_QUANT_PROB_ATOL", 1e-6)
    code, doc = _doc(mnist_dir, "--role", "onnx_int8", "--runtime", "onnxruntime")
    assert code == 1 and doc["wrong"] == ["onnxruntime"]


@pytest.mark.parametrize("name", ["openvino", "tract"])
def test_optional_runtimes_on_mnist(mnist_dir, name):
    """Where the `[runtimes]` extra is missing (CI): reported as not installed, exit 0. Where it is installed
    (the development host): tract is off on the relu LSTM (it ignores `activations`: unsupported, not a failure),
    openvino agrees."""
    code, doc = _doc(mnist_dir, "--runtime", "onnxruntime", "--runtime", name)
    row = _by_runtime(doc)[name]
    if RUNTIMES[name].version() is None:
        assert code == 0 and row["status"] == "not installed" and "edge-rnn[runtimes]" in row["reason"]
        assert row["max_abs_diff"] == {} and row["latency_ms"] is None
    elif name == "tract":
        assert code == 0 and row["status"] == "unsupported" and doc["wrong"] == [] and row["max_abs_diff_overall"] > 0.1
        assert "activations Sigmoid, Relu, Relu" in row["reason"]
    else:
        assert code == 0 and row["status"] == "ok" and row["max_abs_diff_overall"] <= KERAS_ONNX_ATOL and row["agreement"] == 1.0


BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"tensorflow", "tf2onnx", "keras", "onnx", "openvino", "tract"}:
            raise ImportError(f"{name} is not installed on this device")
sys.meta_path.insert(0, _Block())
sys.argv = ["edge-rnn"] + sys.argv[1:]
from edge_rnn.cli import main
main()
"""


def test_without_the_extras_missing_runtimes_are_reported_and_onnxruntime_is_the_reference(gru_dir):
    """A device-like install: no Keras (so no source-model answers), no onnx, openvino or tract."""
    proc = subprocess.run([sys.executable, "-c", BLOCKER, "check", str(gru_dir), "--batch", BATCH, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["expected_from"] == "onnxruntime (same file)" and any("[train]" in n for n in doc["notes"])
    rows = _by_runtime(doc)
    assert list(rows) == list(RUNTIMES)
    assert rows["onnxruntime"]["status"] == "ok" and rows["onnxruntime"]["max_abs_diff_overall"] == 0.0
    for name in ("openvino", "tract", "onnx.reference"):
        assert rows[name]["status"] == "not installed", name


def test_bad_usage_is_a_clean_error(mnist_dir, tmp_path):
    unknown = _check(mnist_dir, "--runtime", "tensorrt")
    assert unknown.exit_code == 1 and "unknown runtime 'tensorrt'" in unknown.stderr
    step = _check(mnist_dir, "--role", "onnx_step")
    words = " ".join(step.stderr.split())
    assert step.exit_code == 1 and "whole sequences" in words and f"edge-rnn bundle {mnist_dir} --variant step" in words
    assert "choose from onnx, onnx_int8" in words
    misspelt = _check(mnist_dir, "--role", "onnx_int9")
    assert misspelt.exit_code == 1 and "quantize" not in misspelt.stderr and "choose from onnx, onnx_int8" in " ".join(misspelt.stderr.split())
    absent = _check(mnist_dir, "--role", "onnx_fp16")
    words = " ".join(absent.stderr.split())
    assert absent.exit_code == 1 and f"edge-rnn quantize {mnist_dir} --variant fp16" in words and "Traceback" not in absent.output
    missing = _check(tmp_path)
    assert missing.exit_code == 1 and "manifest.json" in missing.stderr and "Traceback" not in missing.output


# Bundles: the reference vectors and tolerances stored in the bundle, any role it holds.

@pytest.fixture(scope="module")
def mnist_bundle(mnist_dir, tmp_path_factory):
    """The mnist-lstm folder bundled as int8 (the default role) + fp32."""
    from edge_rnn.bundle import make_bundle

    return make_bundle(mnist_dir, variants=("int8", "fp32"), out=tmp_path_factory.mktemp("bundle") / "mnist.tar.gz")


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Where tempfile makes folders during the test, to show check leaves nothing there."""
    import tempfile

    where = tmp_path / "tmp"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    return where


def test_bundle_on_onnxruntime_answers_right_in_every_role(mnist_bundle, private_tmp):
    before = sorted(p.name for p in mnist_bundle.parent.iterdir())
    result = _check(mnist_bundle, "--runtime", "onnxruntime")
    assert result.exit_code == 0, result.output
    words = " ".join(result.stdout.split())  # rich wraps the title where the (tmp) path makes it long
    assert "WRONG" not in words and "stored in the bundle for onnx_int8" in words
    assert "onnxruntime on the same member" in words and "holds no source model" in " ".join(result.stderr.split())
    for role, member in (("onnx_int8", "model.int8.onnx"), ("onnx", "model.onnx")):
        code, doc = _doc(mnist_bundle, "--runtime", "onnxruntime", *(["--role", role] if role == "onnx" else []))
        assert code == 0 and doc["wrong"] == [] and doc["role"] == role and doc["file"] == f"{mnist_bundle}:{member}"
        assert doc["sets"] == {"reference": BundleConfig.count, "random": int(BATCH)}
        (ort,) = doc["results"]
        assert ort["status"] == "ok" and ort["max_abs_diff"]["random"] == {"probs": 0.0}  # onnxruntime is the random set's answer
        stored = json.loads(_members_manifest(mnist_bundle))["reference"]["tolerances"][role]["probs"]["atol"]
        assert 0 < ort["max_abs_diff"]["reference"]["probs"] <= stored and f"atol {stored:g}" in doc["tolerances"]["probs"]
    assert stored == KERAS_ONNX_ATOL  # the fp32 role at fp32's tolerance, the int8 one above at its own
    assert list(private_tmp.iterdir()) == [] and sorted(p.name for p in mnist_bundle.parent.iterdir()) == before


def _members_manifest(bundle) -> bytes:
    import tarfile

    with tarfile.open(bundle, "r:gz") as tar:
        return tar.extractfile("manifest.json").read()


def test_a_runtime_that_answers_wrong_on_a_bundle_is_flagged(mnist_bundle, mnist_dir, private_tmp, monkeypatch):
    """On a bundle's member as on a folder's file: the known gap makes it unsupported; without the table, WRONG."""
    pytest.importorskip("onnx")
    import edge_rnn.check

    code, doc = _doc(mnist_bundle, "--role", "onnx", "--runtime", "onnxruntime", "--runtime", "onnx.reference")
    assert code == 0 and _by_runtime(doc)["onnx.reference"]["status"] == "unsupported"
    for node in _lstm_nodes(mnist_dir / "model.onnx"):
        assert f"LSTM '{node}' activations Sigmoid, Relu, Relu" in _by_runtime(doc)["onnx.reference"]["reason"]
    monkeypatch.setattr(edge_rnn.check, "IGNORED_BY", {})
    code, doc = _doc(mnist_bundle, "--role", "onnx", "--runtime", "onnxruntime", "--runtime", "onnx.reference")
    assert code == 1 and doc["wrong"] == ["onnx.reference"]
    rows = _by_runtime(doc)
    assert rows["onnxruntime"]["status"] == "ok"
    assert rows["onnx.reference"]["max_abs_diff"]["reference"]["probs"] > 0.1  # off from the source model's stored answers
    assert list(private_tmp.iterdir()) == []


def test_a_bundle_without_the_extras_reports_missing_runtimes(mnist_bundle):
    proc = subprocess.run([sys.executable, "-c", BLOCKER, "check", str(mnist_bundle), "--batch", BATCH, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = _by_runtime(json.loads(proc.stdout))
    assert list(rows) == list(RUNTIMES) and rows["onnxruntime"]["status"] == "ok"
    for name in ("openvino", "tract", "onnx.reference"):
        assert rows[name]["status"] == "not installed" and "pip install" in rows[name]["reason"], name


def test_a_role_the_bundle_does_not_hold_is_refused_in_one_line(mnist_bundle, private_tmp):
    result = _check(mnist_bundle, "--role", "onnx_step")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert "holds no such model" in result.stderr and "onnx_int8, onnx" in result.stderr
    assert list(private_tmp.iterdir()) == []


# bench's openvino/tract rows: the same measurements as every row, on the fp32 file (one row, measured in-process here).

@pytest.mark.parametrize("name", ["openvino", "tract"])
def test_bench_measures_optional_runtimes_where_installed(mnist_dir, gru_dir, name, tmp_path):
    """Runs only where the `[runtimes]` extra is installed; elsewhere bench's plan notes the row as missing."""
    from edge_rnn.bench.harness import BenchConfig, _measure_classifier, _measure_outputs, _onnx_runtime_rows, _Row
    from edge_rnn.device.manifest import load_manifest
    from edge_rnn.models import adapter_for

    notes: list[str] = []
    planned = _onnx_runtime_rows("m", mnist_dir / "model.onnx", lambda v, rt, p: (v, rt, str(p)), notes)
    if RUNTIMES[name].version() is None:
        assert (("fp32", name, str(mnist_dir / "model.onnx")) not in planned
                and any(f"no {name} row" in n and "edge-rnn[runtimes]" in n for n in notes))
        return
    assert ("fp32", name, str(mnist_dir / "model.onnx")) in planned
    cfg = BenchConfig(runs=5, warmup=1, min_seconds=0.0, batch_sizes=(4,), throughput_seconds=0.0, rounds=1)
    manifest = load_manifest(mnist_dir)
    x = adapter_for(manifest).sample_inputs(manifest, batch=8, time_steps=28, seed=0)["input"]
    np.savez(tmp_path / "eval.npz", x=x, y=np.zeros(8, np.int64))
    out = _measure_classifier(_Row("m", "fp32", name, str(mnist_dir / "model.onnx"), "classify", str(tmp_path / "eval.npz"),
                                   {"io": manifest["io"]}), cfg)
    assert out["latency_ms"]["p50"] > 0 and out["top1"].shape == (8,) and set(out["throughput_per_s"]) == {"4"}
    gru = load_manifest(gru_dir)
    feeds = adapter_for(gru).sample_inputs(gru, batch=8, time_steps=5, seed=0)
    np.savez(tmp_path / "gru.npz", **feeds)
    out = _measure_outputs(_Row("g", "fp32", name, str(gru_dir / "model.onnx"), "outputs", str(tmp_path / "gru.npz"),
                                {"io": gru["io"]}), cfg)
    assert out["outputs"][0].shape == (8, 3) and out["latency_ms"]["p50"] > 0
