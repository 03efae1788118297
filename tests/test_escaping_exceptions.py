"""Exceptions that used to escape as tracebacks are one-line errors: hostile ONNX graphs (a cycle, an op of an unknown
domain, a tensor asking for 2**40 elements, an allocation of 2**62 bytes at run time) in check, bench, quantize and
infer; a child process's exception in check; MemoryError, RecursionError and OSError anywhere; `bundle -o` naming a
folder; `infer` on a step model. A bug in edge-rnn keeps its traceback, and EDGE_RNN_DEBUG=1 shows every one.

The hostile graphs replace model.onnx in a copy of a small exported Keras model's folder (x (batch, time, 3) → y
(batch, 3)), with the manifest's sha256 updated, so each command gets past its integrity checks to the graph itself.
"""

from __future__ import annotations

import json
import os
import shutil
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from conftest import one_line_error
from edge_rnn.bench.runtimes import run_in_child
from edge_rnn.cli import app
from edge_rnn.device.manifest import file_entry

runner = CliRunner()
# A refusal from the graph's bytes comes before any session, runtime or TensorFlow work.
REFUSAL_SECONDS = 60


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A small Keras LSTM exported by edge-rnn: model.onnx, model.step.onnx, model.keras and the manifest."""
    # Imported here, not at the top: run_in_child's children import this module to find their target.
    keras = pytest.importorskip("keras")
    from edge_rnn.exporter import export

    root = tmp_path_factory.mktemp("tiny")
    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([keras.Input((None, 3), name="x"), layers.LSTM(4, name="lstm"), layers.Dense(3, activation="softmax", name="y")])
    model.save(root / "tiny.keras")
    export(root / "tiny.keras", out=root / "tiny")
    np.save(root / "x.npy", np.random.default_rng(0).random((2, 5, 3), dtype=np.float32))
    return root


# ---------------------------------------------------------------------------------------------
# Hostile graphs: x (batch, time, 3) → y (batch, 3), as the folder's manifest says


def _graph(nodes, initializers=(), domains=()) -> bytes:
    graph = helper.make_graph(
        nodes, "hostile", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "time", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], initializer=list(initializers),
    )
    opsets = [helper.make_opsetid("", 17), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8).SerializeToString()


def _mean_plus(name: str) -> list:
    """y = mean of x over time + the sum of tensor `name` (which the graph must then compute or hold)."""
    return [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=0), helper.make_node("ReduceSum", [name], ["s"], keepdims=0),
            helper.make_node("Add", ["m", "s"], ["y"])]


def _giant(raw: bytes | None = None) -> TensorProto:
    tensor = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[2**20, 2**20])  # 2**40 elements, 4 TiB
    if raw is not None:
        tensor.raw_data = raw
    return tensor


HOSTILE = {
    "cycle": (lambda: _graph([helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=0), helper.make_node("Add", ["m", "b"], ["a"]),
                              helper.make_node("Identity", ["a"], ["b"]), helper.make_node("Identity", ["a"], ["y"])]), "cycle"),
    "unknown-domain": (lambda: _graph([helper.make_node("Pwn", ["x"], ["z"], domain="com.evil"),
                                       helper.make_node("ReduceMean", ["z"], ["y"], axes=[1], keepdims=0)], domains=["com.evil"]), "com.evil"),
    "giant-initializer": (lambda: _graph(_mean_plus("W"), [_giant()]), "1,099,511,627,776 elements"),
    "giant-initializer-small-data": (lambda: _graph(_mean_plus("W"), [_giant(b"\0" * 16)]), "1,099,511,627,776 elements"),
    "giant-constant": (lambda: _graph([helper.make_node("Constant", [], ["W"], value=_giant()), *_mean_plus("W")]), "1,099,511,627,776 elements"),
}


def hostile_folder(tiny_dir, dst, graph: bytes):
    """A copy of the exported folder whose model.onnx is `graph`, listed with its real sha256."""
    shutil.copytree(tiny_dir / "tiny", dst)
    (dst / "model.onnx").write_bytes(graph)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"]["onnx"] = file_entry(dst, "model.onnx")
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


COMMANDS = {
    "infer": lambda d, x: ["infer", d / "model.onnx", x],
    "check": lambda d, x: ["check", d, "--runtime", "onnxruntime", "--runtime", "onnx.reference", "--batch", "8"],
    "quantize": lambda d, x: ["quantize", d],
    "bench": lambda d, x: ["bench", d, "--runs", "1", "--rounds", "1"],
}
# bench refuses through the same check as the others (before any TensorFlow work): one case per kind of refusal.
RUNS = [(c, h) for c in COMMANDS for h in HOSTILE if c != "bench" or h in ("cycle", "unknown-domain", "giant-constant")]


@pytest.mark.parametrize("command, case", RUNS)
def test_a_hostile_graph_is_one_line(tiny_dir, tmp_path, command, case):
    make, needle = HOSTILE[case]
    folder = hostile_folder(tiny_dir, tmp_path / "m", make())
    start = time.monotonic()
    result = run(*COMMANDS[command](folder, tiny_dir / "x.npy"))
    line = one_line_error(result, "model.onnx", needle)
    assert "not an edge-rnn model" in line
    assert time.monotonic() - start < REFUSAL_SECONDS


def test_an_allocation_at_run_time_is_one_line_in_infer_and_in_checks_children(tiny_dir, tmp_path):
    """ConstantOfShape asking for 2**62 bytes (more than any address space: refused on every host) is a valid graph,
    so it loads; onnxruntime fails the run, and onnx.reference's child process raises MemoryError."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [2**30, 2**30])
    graph = _graph([helper.make_node("ConstantOfShape", ["shape"], ["W"]), *_mean_plus("W")], [shape])
    folder = hostile_folder(tiny_dir, tmp_path / "m", graph)
    one_line_error(run("infer", folder / "model.onnx", tiny_dir / "x.npy"), "allocate")
    result = run("check", folder, "--runtime", "onnxruntime", "--runtime", "onnx.reference", "--batch", "8")
    # onnx.reference failing is reported, not failed; onnxruntime (the device's runtime) failing makes the file unusable
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "the onnx.reference process failed: MemoryError" in result.output
    assert "onnxruntime, the runtime `infer`, `stream` and the device use, cannot load" in result.output
    fine = run("check", tiny_dir / "tiny", "--runtime", "onnxruntime", "--runtime", "onnx.reference", "--batch", "8")
    assert fine.exit_code == 0, fine.output  # the same check on the untouched folder passes


# ---------------------------------------------------------------------------------------------
# Child processes: an exception comes back as one line, its traceback stays in the child


def _raises_memory_error(queue) -> None:
    raise MemoryError("Unable to allocate 4.00 EiB for an array")


def _raises_value_error(queue) -> None:
    raise ValueError("cannot reshape array of size 0 into shape (1048576,1048576)\nsecond line")


def test_a_child_exception_comes_back_as_its_last_line(capfd):
    got = run_in_child(_raises_memory_error, (), threads=1, timeout_s=60)
    assert got.error == "MemoryError: Unable to allocate 4.00 EiB for an array" and got.value is None and got.died is None
    got = run_in_child(_raises_value_error, (), threads=1, timeout_s=60)
    assert got.error == "ValueError: cannot reshape array of size 0 into shape (1048576,1048576)"
    assert "Traceback" not in capfd.readouterr().err


def test_edge_rnn_debug_prints_the_childs_traceback(capfd, monkeypatch):
    monkeypatch.setenv("EDGE_RNN_DEBUG", "1")
    got = run_in_child(_raises_memory_error, (), threads=1, timeout_s=60)
    assert got.error.startswith("MemoryError")
    assert "Traceback" in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------
# The CLI's last line of defence, and two refusals with advice


def _raise(exc):
    def fail(*args, **kwargs):
        raise exc

    return fail


@pytest.mark.parametrize("exc, words", [
    (MemoryError("Unable to allocate 4.00 TiB"), ("out of memory", "4.00 TiB", "EDGE_RNN_DEBUG=1")),
    (RecursionError("maximum recursion depth exceeded"), ("too deeply", "EDGE_RNN_DEBUG=1")),
    (PermissionError(13, "Permission denied", "/root/x.npy"), ("/root/x.npy: Permission denied",)),
], ids=["memory", "recursion", "os"])
def test_memory_recursion_and_os_errors_are_one_line(tiny_dir, monkeypatch, exc, words):
    import edge_rnn.device.runtime

    monkeypatch.setattr(edge_rnn.device.runtime, "infer", _raise(exc))
    one_line_error(run("infer", tiny_dir / "tiny" / "model.onnx", tiny_dir / "x.npy"), *words)
    monkeypatch.setenv("EDGE_RNN_DEBUG", "1")
    assert isinstance(run("infer", tiny_dir / "tiny" / "model.onnx", tiny_dir / "x.npy").exception, type(exc))


def test_an_exception_from_inside_onnx_names_the_library(tiny_dir, tmp_path, monkeypatch):
    """What onnx raises on a graph it cannot read (here its own checker on a cycle) is the graph's fault: one line."""
    import onnx

    import edge_rnn.device.runtime

    cyclic = onnx.load_from_string(HOSTILE["cycle"][0]())
    monkeypatch.setattr(edge_rnn.device.runtime, "infer", lambda *a, **k: onnx.checker.check_model(cyclic, full_check=True))
    line = one_line_error(run("infer", tiny_dir / "tiny" / "model.onnx", tiny_dir / "x.npy"), "onnx failed on this model")
    assert "EDGE_RNN_DEBUG=1" in line


def test_the_quantizer_failing_on_a_graph_is_one_line(tiny_dir, tmp_path, monkeypatch):
    """Behind the graph checks, what onnxruntime's quantization tools raise (a plain Exception, on a cycle; here from
    the symbolic shape inference quantize's pre-processing runs) is still one line naming the library."""
    import edge_rnn.device.onnxfile

    monkeypatch.setattr(edge_rnn.device.onnxfile, "check_onnx_file", lambda path: None)  # let the cycle through
    folder = hostile_folder(tiny_dir, tmp_path / "m", HOSTILE["cycle"][0]())
    one_line_error(run("quantize", folder), "error: onnxruntime.", "failed on this model", "cyclic", "EDGE_RNN_DEBUG=1")


def test_a_bug_keeps_its_traceback(tiny_dir, monkeypatch):
    import edge_rnn.device.runtime

    monkeypatch.setattr(edge_rnn.device.runtime, "infer", lambda *a, **k: 1 / 0)
    result = run("infer", tiny_dir / "tiny" / "model.onnx", tiny_dir / "x.npy")
    assert isinstance(result.exception, ZeroDivisionError)


def test_bundle_out_naming_a_folder_is_one_line(tiny_dir, tmp_path):
    taken = tmp_path / "taken.tar.gz"
    taken.mkdir()
    one_line_error(run("bundle", tiny_dir / "tiny", "--variant", "fp32", "-o", taken), "taken.tar.gz", "Is a directory")
    assert taken.is_dir() and not list(taken.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["taken.tar.gz"]  # no temporary file left beside it


def test_infer_on_a_step_model_says_to_stream_it(tiny_dir):
    np.save(tiny_dir / "one_step.npy", np.zeros((2, 1, 3), np.float32))  # the step file's own shape: no shape error first
    one_line_error(run("infer", tiny_dir / "tiny" / "model.step.onnx", tiny_dir / "one_step.npy"), "is a step model",
                   "edge-rnn stream", "model.onnx")
