"""Hostile files through the real CLI: each is refused with one line naming the file and why, exit 1, no traceback.

Tiny hand-built ONNX folders (an Identity / ReduceMean graph with a manifest) stand in for trained models: what is
under test is what happens before a model runs.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from edge_rnn.cli import app
from edge_rnn.device.manifest import file_entry

runner = CliRunner()


def _refused(args, *, input=None, needle: str = "") -> str:
    result = runner.invoke(app, [str(a) for a in args], input=input)
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, BaseException) or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output, result.output
    # stdout may hold the steps a stream answered before the bad line; the error is one line, the last.
    text = result.output.strip().splitlines()[-1]
    assert text.startswith("error:") and result.output.count("error:") == 1, result.output
    assert needle.lower() in text.lower(), text
    return text


def _folder(tmp_path, graph_bytes: bytes, *, task="keras", step=False, extra=None):
    """A model folder holding model.onnx (the given bytes) and a manifest listing it with its real sha256."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "model.onnx").write_bytes(graph_bytes)
    manifest = {
        "schema": 1, "model": "tiny", "task": task, "adapter": "keras",
        "io": {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 28, 28]}],
               "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 28]}]},
        "files": {"onnx": file_entry(tmp_path, "model.onnx")},
    }
    if step:
        manifest["step"] = {
            "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 1, 3]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 1, 3]}],
            "state": [{"layer": "rnn", "name": "h", "input": "h0", "output": "h", "dtype": "float32", "shape": ["batch", 2]}],
        }
    manifest.update(extra or {})
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "model.onnx"


def _classifier(weight: TensorProto | None = None) -> bytes:
    """x (batch, 28, 28) → ReduceMean over the columns → y (batch, 28); optionally with one extra initializer."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2], keepdims=0)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 28])], initializer=[weight] if weight else [],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def _stepper() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["h0"], ["h"])], "step",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 3]), helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, 3]), helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


CLASSIFY = {
    "task": "classify", "labels": [str(i) for i in range(28)],
    "preprocessing": {"scale": 1 / 255, "offset": 0.0, "image": {"height": 28, "width": 28, "invert": False}},
}


def test_tiny_folders_work(tmp_path):
    """The fixtures themselves are sound: the refusals below are the hostile part's doing."""
    model = _folder(tmp_path / "a", _classifier(), task="classify", extra=CLASSIFY)
    np.save(tmp_path / "x.npy", np.zeros((28, 28), np.uint8))
    assert runner.invoke(app, ["infer", str(model), str(tmp_path / "x.npy")]).exit_code == 0
    step = _folder(tmp_path / "b", _stepper(), step=True)
    result = runner.invoke(app, ["stream", str(step)], input="[[0.5, 1, 2]]\n")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------
# JSON: manifests, stdin rows of stream, bundle manifests

DEEP = "[" * 100_000 + "]" * 100_000
HOSTILE_JSON = {
    "deep": (DEEP, "too deeply"),
    "huge-int": ("[" + "9" * 100_000 + "]", "not valid JSON"),
    "bad-utf8": (b"[\xff\xfe]", "not valid JSON"),
    "truncated": ('{"model": "x", ', "not valid JSON"),
}


@pytest.mark.parametrize("case", HOSTILE_JSON)
def test_hostile_manifest_json(tmp_path, case):
    text, needle = HOSTILE_JSON[case]
    model = _folder(tmp_path, _classifier())
    (tmp_path / "manifest.json").write_bytes(text.encode() if isinstance(text, str) else text)
    _refused(["infer", model, tmp_path / "x.npy"], needle=needle)


@pytest.mark.parametrize("case", ["deep", "huge-int", "truncated"])
def test_hostile_stdin_rows(tmp_path, case):
    text, needle = HOSTILE_JSON[case]
    model = _folder(tmp_path, _stepper(), step=True)
    line = _refused(["stream", model], input="[[1, 2, 3]]\n" + text + "\n", needle=needle)
    assert "stdin line 2" in line


def test_stdin_line_over_cap(tmp_path):
    model = _folder(tmp_path, _stepper(), step=True)
    _refused(["stream", model], input="[" + "0," * 600_000 + "0]\n", needle="longer than")


def test_oversized_manifest(tmp_path):
    model = _folder(tmp_path, _classifier())
    (tmp_path / "manifest.json").write_bytes(b" " * (5 * 1024 * 1024))
    _refused(["infer", model, tmp_path / "x.npy"], needle="over the")


def test_deep_bundle_manifest(tmp_path):
    import io
    import tarfile

    data = DEEP.encode()
    path = tmp_path / "deep.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    _refused(["infer", path, tmp_path / "x.npy"], needle="too deeply")


# ---------------------------------------------------------------------------------------------
# Images


def _png(path, mode: str, size=(28, 28)) -> None:
    from PIL import Image

    if mode == "I;16":
        Image.fromarray(np.full(size[::-1], 40000, np.uint16)).save(path)
    else:
        Image.new(mode, size).save(path)


def test_image_bomb_refused_fast(tmp_path):
    """A real 20,000 × 20,000 PNG (a few hundred KB) is refused from its header, before any decoding."""
    import time

    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (20_000, 20_000)).save(bomb)
    assert bomb.stat().st_size < 2_000_000
    model = _folder(tmp_path / "m", _classifier(), task="classify", extra=CLASSIFY)
    start = time.perf_counter()
    _refused(["infer", model, bomb], needle="bomb.png")
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("size", [(5000, 5000), (29, 28)])
def test_image_size_refused(tmp_path, size):
    from PIL import Image

    path = tmp_path / "big.png"
    Image.new("L", size).save(path)
    model = _folder(tmp_path / "m", _classifier(), task="classify", extra=CLASSIFY)
    _refused(["infer", model, path], needle="pixels")


@pytest.mark.parametrize("mode,ok", [("P", True), ("RGBA", True), ("LA", True), ("1", True), ("I;16", False), ("F", False), ("CMYK", False)])
def test_image_modes(tmp_path, mode, ok):
    """Palette, RGBA, LA and 1-bit images are converted to grey (alpha ignored); 16-bit, float and CMYK are refused."""
    path = tmp_path / ("x.tiff" if mode in ("F", "CMYK") else "x.png")
    _png(path, mode)
    model = _folder(tmp_path / "m", _classifier(), task="classify", extra=CLASSIFY)
    if ok:
        assert runner.invoke(app, ["infer", str(model), str(path)]).exit_code == 0
    else:
        _refused(["infer", model, path], needle=path.name)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + os.urandom(64), os.urandom(200)])
def test_broken_images(tmp_path, content):
    path = tmp_path / "x.png"
    path.write_bytes(content)
    model = _folder(tmp_path / "m", _classifier(), task="classify", extra=CLASSIFY)
    _refused(["infer", model, path], needle="x.png")


# ---------------------------------------------------------------------------------------------
# .npy


@pytest.mark.parametrize("dtype", [">f4", ">u1", "<f2", "<f8"])
def test_npy_dtypes_converted(tmp_path, dtype):
    """Big-endian and float16/float64 arrays are converted to the graph's float32 (values unchanged)."""
    np.save(tmp_path / "x.npy", np.full((28, 28), 0.5 if "f" in dtype else 7, dtype=dtype))
    model = _folder(tmp_path / "m", _classifier(), task="classify", extra=CLASSIFY)
    result = runner.invoke(app, ["infer", str(model), str(tmp_path / "x.npy")])
    assert result.exit_code == 0, result.output


def _npy_header(shape, dtype="<f4") -> bytes:
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


HOSTILE_NPY = {
    "declares-more": (_npy_header((1000, 28, 28)) + b"\0" * 64, "declares shape"),
    "declares-less": (_npy_header((1, 28, 28)) + b"\0" * (28 * 28 * 4 + 4), "declares shape"),
    "declares-huge": (_npy_header((2**40, 28, 28)), "declares shape"),
    "object": (_npy_header((1,), "|O") + b"\0" * 16, "dtype"),
    "complex": (_npy_header((28, 28), "<c8") + b"\0" * (28 * 28 * 8), "dtype"),
    "float64-overflow": (_npy_header((28, 28), "<f8") + np.full((28, 28), 1e300).tobytes(), "[0, 1]"),
    "not-npy": (os.urandom(100), "cannot read"),
    "empty": (b"", "cannot read"),
}


@pytest.mark.parametrize("case", HOSTILE_NPY)
def test_hostile_npy(tmp_path, case):
    content, needle = HOSTILE_NPY[case]
    (tmp_path / "x.npy").write_bytes(content)
    model = _folder(tmp_path / "m", _classifier(), task="classify", extra=CLASSIFY)
    _refused(["infer", model, tmp_path / "x.npy"], needle=needle)


# ---------------------------------------------------------------------------------------------
# ONNX files


def _external(location: str, *, offset: int = 0, length: int = 4) -> TensorProto:
    tensor = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[1])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


HOSTILE_ONNX = {
    "empty": (lambda d: b"", "empty"),
    "truncated": (lambda d: _classifier()[:40], "not an ONNX model"),
    "random": (lambda d: bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)), "ONNX"),
    "not-a-graph": (lambda d: b'{"not": "onnx"}', "ONNX"),
    "wrong-kind": (lambda d: _stepper(), "inputs/outputs"),
    "external-dotdot": (lambda d: _classifier(_external("../../etc/passwd")), "external"),
    "external-sub-dotdot": (lambda d: _classifier(_external("sub/../../x")), "external"),
    "external-absolute": (lambda d: _classifier(_external("/etc/passwd")), "external"),
    "external-symlink": (lambda d: (d / "w.bin").symlink_to("/etc/passwd") or _classifier(_external("w.bin")), "external"),
    "external-absurd-length": (lambda d: _classifier(_external("w.bin", offset=2**62, length=2**62)), "external"),
}


# A valid model of the wrong kind is a hostile input only where the manifest says what the graph must be
# (infer checks the I/O names); check and quantize take a folder's graph as it is.
HOSTILE_ONNX_RUNS = [(command, case) for command in ("infer", "check", "quantize") for case in HOSTILE_ONNX
                     if command == "infer" or case != "wrong-kind"]


@pytest.mark.parametrize("command, case", HOSTILE_ONNX_RUNS)
def test_hostile_onnx(tmp_path, case, command):
    make, needle = HOSTILE_ONNX[case]
    tmp_path.mkdir(exist_ok=True)
    model = _folder(tmp_path, make(tmp_path))
    np.save(tmp_path / "x.npy", np.zeros((28, 28), np.float32))
    target = {"infer": [model, tmp_path / "x.npy"], "check": [tmp_path, "--role", "onnx"], "quantize": [tmp_path]}[command]
    _refused([command, *target], needle=needle if command == "infer" or "external" in case or case == "empty" else "")


def test_hostile_onnx_stream(tmp_path):
    model = _folder(tmp_path, _classifier(_external("../../etc/passwd")), step=True)
    _refused(["stream", model], input="[[1, 2, 3]]\n", needle="external")


def test_external_data_refused_in_a_bundle(tmp_path):
    """A bundle member is checked from its bytes, before onnxruntime sees them."""
    from edge_rnn.device.onnxfile import check_onnx_bytes
    from edge_rnn.errors import ModelFileError

    with pytest.raises(ModelFileError, match="external"):
        check_onnx_bytes(_classifier(_external("/etc/passwd")), where="bundle.tar.gz:model.onnx")


def test_external_data_in_a_subgraph_and_constant(tmp_path):
    """Tensors inside node attributes (a Constant's value, an If branch's initializers) are walked too."""
    from edge_rnn.device.onnxfile import check_onnx_bytes
    from edge_rnn.errors import ModelFileError

    const = helper.make_node("Constant", [], ["c"], value=_external("/etc/shadow"))
    branch = helper.make_graph([const], "b", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])])
    top = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)], "top",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    data = helper.make_model(top).SerializeToString()
    with pytest.raises(ModelFileError, match="shadow"):
        check_onnx_bytes(data, where="m.onnx")
    onnx.checker.check_model(helper.make_model(helper.make_graph([], "ok", [], [])))


def test_a_manifest_file_that_is_a_symlink_out_of_the_folder_is_refused(tmp_path, mnist_copy):
    """The listed model.onnx replaced by a symlink to a file outside the folder (same bytes, so the sha256 would
    match): refused as leaving the folder before anything reads it."""
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes((mnist_copy / "model.onnx").read_bytes())
    (mnist_copy / "model.onnx").unlink()
    (mnist_copy / "model.onnx").symlink_to(outside)
    np.save(tmp_path / "x.npy", np.zeros((28, 28), np.uint8))
    _refused(["infer", mnist_copy / "model.onnx", tmp_path / "x.npy"], needle="outside")
