"""Bundles through the real CLI: make, verify, self-test, run; and every hostile archive refused with one line."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edge_rnn.config import BundleConfig
from edge_rnn.cli import app
from edge_rnn.device.bundle import MAX_TOTAL_BYTES, open_bundle
from edge_rnn.device.selftest import self_test
from edge_rnn.tolerances import BUNDLE_QUANT_MEAN_PROB_DIFF, BUNDLE_QUANT_PROB_ATOL

from conftest import damage_scale

runner = CliRunner()
GIB = 1 << 30


def _cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def mnist_bundle(mnist_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "mnist.tar.gz"
    result = _cli("bundle", mnist_dir, "--variant", "int8", "--variant", "step", "-o", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def char_bundle(char_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "char.tar.gz"
    result = _cli("bundle", char_dir, "--variant", "int8", "--variant", "fp32", "-o", out)
    assert result.exit_code == 0, result.output
    return out


def _members(bundle: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(bundle, "r:gz") as tar:
        return [(info, tar.extractfile(info).read() if info.isreg() else b"") for info in tar]


def _write(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with gzip.open(path, "wb") as gz, tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def _with_manifest(members, edit) -> list:
    manifest = json.loads(members[0][1])
    edit(manifest)
    data = json.dumps(manifest).encode()
    info = members[0][0]
    info.size = len(data)
    return [(info, data), *members[1:]]


# ---------------------------------------------------------------------------------------------
# Made, verified, self-tested, run


def test_mnist_bundle_verifies_and_self_tests(mnist_bundle, mnist_dir):
    names = [info.name for info, _ in _members(mnist_bundle)]
    assert names == ["manifest.json", "model.int8.onnx", "model.step.onnx", "reference.npz"]
    manifest = json.loads(_members(mnist_bundle)[0][1])
    assert set(manifest["files"]) == {"onnx_int8", "onnx_step", "reference"}
    assert manifest["bundle"]["format"] == 1 and manifest["bundle"]["variants"] == ["int8", "step"]
    ref = manifest["reference"]
    assert ref["source"] == "keras" and ref["count"] == BundleConfig.count and ref["tolerances"]["onnx_int8"]["probs"]["argmax_min"] is not None
    result = _cli("verify", mnist_bundle, "--run")
    assert result.exit_code == 0, result.output
    assert "onnx_int8" in result.output and "onnx_step" in result.output and "FAIL" not in result.output
    # Deterministic: the same folder makes the same bytes.
    again = mnist_bundle.parent / "again.tar.gz"
    assert _cli("bundle", mnist_dir, "--variant", "int8", "--variant", "step", "-o", again).exit_code == 0
    assert again.read_bytes() == mnist_bundle.read_bytes()


def test_char_bundle_verifies_self_tests_and_generates_like_the_folder(char_bundle, char_dir):
    manifest = json.loads(_members(char_bundle)[0][1])
    assert manifest["reference"]["source"] == "numpy" and "checkpoint" not in manifest["files"]
    result = _cli("verify", char_bundle, "--run")
    assert result.exit_code == 0, result.output
    args = ["--prime", "ROMEO:", "--length", "40", "--seed", "3"]
    from_bundle = _cli("generate", char_bundle, *args)
    from_file = _cli("generate", char_dir / "model.int8.onnx", *args)
    assert from_bundle.exit_code == 0, from_bundle.output
    assert from_bundle.output == from_file.output
    fp32 = _cli("generate", char_bundle, "--role", "onnx", *args)
    assert fp32.output == _cli("generate", char_dir / "model.onnx", *args).output


def test_infer_and_stream_on_a_bundle_answer_as_the_folder(mnist_bundle, mnist_dir, digits, tmp_path):
    x = tmp_path / "digits.npy"
    np.save(x, digits.x_test[:3])
    from_bundle = _cli("infer", mnist_bundle, x, "--json")
    from_file = _cli("infer", mnist_dir / "model.int8.onnx", x, "--json")
    assert from_bundle.exit_code == 0, from_bundle.output
    assert json.loads(from_bundle.output)["predictions"] == json.loads(from_file.output)["predictions"]
    one = tmp_path / "one.npy"
    np.save(one, digits.x_test[:1].astype(np.float32) / 255.0)
    streamed = _cli("stream", mnist_bundle, "--input", one)
    assert streamed.exit_code == 0, streamed.output
    assert streamed.output == _cli("stream", mnist_dir / "model.step.onnx", "--input", one).output
    wrong = _cli("infer", mnist_bundle, x, "--role", "onnx_fp16")
    assert wrong.exit_code == 1 and "onnx_fp16" in wrong.output


def test_unknown_or_missing_variants_are_refused(mnist_dir, tmp_path):
    for variant, words in (("int4", "unknown variant"), ("fp16", "no fp16 model")):
        result = _cli("bundle", mnist_dir, "--variant", variant, "-o", tmp_path / "x.tar.gz")
        assert result.exit_code == 1 and words in result.output and len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Hostile archives


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, b""


def _plain(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _tampered(members):
    info, data = members[1]
    return [members[0], (info, bytes([data[0] ^ 1]) + data[1:]), *members[2:]]


def _lying_header(members):
    # The header declares (and the archive holds) 4 KiB more than the manifest lists for the member.
    info, data = members[1]
    return [members[0], (info, data + bytes(4096)), *members[2:]]


HOSTILE = {
    "tampered": (_tampered, "model.int8.onnx", "sha256"),
    "missing": (lambda m: [m[0], *m[2:]], "model.int8.onnx", "missing"),
    "extra": (lambda m: [*m, _plain("notes.txt", b"hi")], "notes.txt", "not listed"),
    "dotdot": (lambda m: [*m, _plain("../evil", b"x")], "../evil", ".."),
    "absolute": (lambda m: [*m, _plain("/tmp/evil", b"x")], "/tmp/evil", "absolute"),
    "symlink": (lambda m: [m[0], _special("model.int8.onnx", tarfile.SYMTYPE, "/etc/passwd"), *m[2:]], "model.int8.onnx", "symbolic link"),
    "hardlink": (lambda m: [m[0], _special("model.int8.onnx", tarfile.LNKTYPE, "manifest.json"), *m[2:]], "model.int8.onnx", "hard link"),
    "device": (lambda m: [*m, _special("tty", tarfile.CHRTYPE)], "tty", "device file"),
    "fifo": (lambda m: [*m, _special("pipe", tarfile.FIFOTYPE)], "pipe", "device file or fifo"),
    "directory": (lambda m: [*m, _special("sub", tarfile.DIRTYPE)], "sub", "directory"),
    "duplicate": (lambda m: [*m, m[1]], "model.int8.onnx", "twice"),
    "lying header size": (_lying_header, "model.int8.onnx", "declares"),
}


def _snapshot(*folders: Path) -> dict:
    return {str(f): sorted(os.listdir(f)) for f in folders}


def _refused(bad: Path, member: str, words: str, *commands) -> None:
    before = _snapshot(bad.parent, Path.cwd())
    for command in commands or (("verify", bad),):
        result = _cli(*command)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1, result.output
        assert len(lines) == 1 and lines[0].startswith("error:") and repr(member) in lines[0] and words in lines[0], lines
    assert _snapshot(bad.parent, Path.cwd()) == before


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_archives_are_refused_naming_the_member(case, mnist_bundle, tmp_path, digits):
    edit, member, words = HOSTILE[case]
    bad = _write(tmp_path / f"{case.replace(' ', '-')}.tar.gz", edit(_members(mnist_bundle)))
    x = tmp_path / "x.npy"
    np.save(x, digits.x_test[:1])
    _refused(bad, member, words, ("verify", bad), ("infer", bad, x))


def _gzip_stream(parts) -> bytes:
    """gzip of the concatenated parts (bytes, or an int n for n zero bytes), without holding the zeros in memory."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunks, zeros = [], bytes(1 << 24)
    for part in parts:
        if isinstance(part, int):
            for _ in range(part // len(zeros)):
                chunks.append(comp.compress(zeros))
        else:
            chunks.append(comp.compress(part))
    chunks.append(comp.flush())
    return b"".join(chunks)


def _tar_member(info: tarfile.TarInfo, data: bytes) -> bytes:
    return info.tobuf(format=tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512)


@pytest.fixture(scope="module")
def bomb_parts(mnist_bundle):
    members = _members(mnist_bundle)
    return members, _tar_member(*members[0])


def test_gzip_bomb_declared_in_the_manifest_is_refused_before_reading(bomb_parts, tmp_path):
    members, _ = bomb_parts

    def declare(manifest):
        manifest["files"]["onnx_int8"]["bytes"] = GIB

    head = _with_manifest(members, declare)
    info = tarfile.TarInfo("model.int8.onnx")
    info.size = GIB
    bad = tmp_path / "bomb.tar.gz"
    bad.write_bytes(_gzip_stream([_tar_member(*head[0]), info.tobuf(format=tarfile.GNU_FORMAT), GIB]))
    assert bad.stat().st_size < 4 << 20 and GIB > MAX_TOTAL_BYTES
    _refused(bad, "manifest.json", "over the caps")


def test_gzip_bomb_whose_headers_lie_stops_at_the_manifests_size(bomb_parts, tmp_path):
    # A GNU long-name header tarfile reads whole before it hands out the member: 1 GiB of zeros the
    # manifest lists nowhere. The decompressed stream is capped at what the manifest implies.
    _, manifest_member = bomb_parts
    longname = tarfile.TarInfo("././@LongLink")
    longname.type, longname.size = tarfile.GNUTYPE_LONGNAME, GIB
    bad = tmp_path / "liar.tar.gz"
    bad.write_bytes(_gzip_stream([manifest_member, longname.tobuf(format=tarfile.GNU_FORMAT), GIB]))
    assert bad.stat().st_size < 4 << 20
    _refused(bad, "manifest.json", "more than its manifest lists")


# ---------------------------------------------------------------------------------------------
# The self-test catches a valid model that is not the source's


def test_self_test_fails_on_a_swapped_model(mnist_bundle, mnist_dir, tmp_path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(mnist_dir / "model.onnx")
    rng = np.random.default_rng(1)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size > 1:
            # Re-initialised weights of the same scale: a differently trained model with the same graph.
            init.CopyFrom(numpy_helper.from_array(rng.normal(0, float(w.std()) or 0.1, w.shape).astype(np.float32), init.name))
    swapped = model.SerializeToString()
    members = _members(mnist_bundle)

    def reseal(manifest):
        manifest["files"]["onnx_int8"].update(sha256=hashlib.sha256(swapped).hexdigest(), bytes=len(swapped))

    head = _with_manifest(members, reseal)
    bad = _write(tmp_path / "swapped.tar.gz", [head[0], (members[1][0], swapped), *members[2:]])
    assert _cli("verify", bad).exit_code == 0  # integrity holds: every sha256 matches the (resealed) manifest
    result = _cli("verify", bad, "--run")
    assert result.exit_code == 1
    assert "self-test failed for onnx_int8" in result.output and "onnx_step" not in result.output.splitlines()[-1]


def _resealed(bundle: Path, role: str, data: bytes, out: Path) -> Path:
    """The bundle with `role`'s member replaced by `data` and the manifest's sha256 and size updated to match."""
    members = _members(bundle)
    name = json.loads(members[0][1])["files"][role]["path"]

    def reseal(manifest):
        manifest["files"][role].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))

    head = _with_manifest(members, reseal)
    return _write(out, [head[0], *((info, data if info.name == name else body) for info, body in members[1:])])


@pytest.mark.parametrize("scale", ["W_int8_scale", "R_int8_scale", "WhyT_scale"])
def test_self_test_fails_on_a_damaged_char_int8_model(scale, char_bundle, tmp_path):
    """The char RNN's int8 file holds its RNN's W and R int8 per gate row (quantize/cells.py): one of their scales, or
    the output projection's, ×1.5 fails `verify --run` by the relative bound (BUNDLE_QUANT_OUTPUT_RTOL), which the
    sound file keeps with room for other hosts."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(open_bundle(char_bundle).data("onnx_int8"))
    (target,) = [t for t in model.graph.initializer if t.name == scale]
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * np.float32(1.5), target.name))
    bad = _resealed(char_bundle, "onnx_int8", model.SerializeToString(), tmp_path / "damaged.tar.gz")
    result = _cli("verify", bad, "--run")
    assert result.exit_code == 1 and "self-test failed for onnx_int8" in result.output.strip().splitlines()[-1], result.output
    (sound,) = [r for r in self_test(open_bundle(char_bundle)).results if r.role == "onnx_int8" and r.output == "logits"]
    (broken,) = [r for r in self_test(open_bundle(bad)).results if r.role == "onnx_int8" and r.output == "logits"]
    assert sound.ok and sound.max_abs_diff < sound.atol / 2, sound
    assert not broken.ok and broken.max_abs_diff > 2 * sound.max_abs_diff, broken


@pytest.mark.parametrize("which", ["lstm W", "dense"])
def test_self_test_fails_on_a_damaged_int8_model(which, mnist_bundle, mnist_dir, tmp_path):
    """A broken quantizer (one weight scale ×4) must fail `verify --run` though every sha256 matches. The Dense
    scale ×4 keeps every argmax and stays under the max bound on many reference sets: only the mean bound sees it."""
    damaged = tmp_path / "damaged.onnx"
    damage_scale(mnist_dir / "model.int8.onnx", damaged, factor=4.0, which=which)
    bad = _resealed(mnist_bundle, "onnx_int8", damaged.read_bytes(), tmp_path / "damaged.tar.gz")
    assert _cli("verify", bad).exit_code == 0  # integrity holds
    result = _cli("verify", bad, "--run")
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert "self-test failed for onnx_int8" in last and "onnx_step" not in last
    (sound,) = [r for r in self_test(open_bundle(mnist_bundle)).results if r.role == "onnx_int8"]
    (broken,) = [r for r in self_test(open_bundle(bad)).results if r.role == "onnx_int8"]
    # The bounds stored are the named tolerances; sound int8 keeps the mean bound with room for other hosts' rounding.
    assert (sound.atol, sound.mean_atol) == (broken.atol, broken.mean_atol) == (BUNDLE_QUANT_PROB_ATOL, BUNDLE_QUANT_MEAN_PROB_DIFF)
    assert sound.ok and sound.mean_abs_diff < BUNDLE_QUANT_MEAN_PROB_DIFF / 3, sound
    assert not broken.ok and "mean max |Δ|" in broken.failure, broken


@pytest.fixture(scope="module")
def keras_dir(tmp_path_factory) -> Path:
    """A tiny Keras LSTM classifier exported and int8-quantized through the CLI (fp32, step and int8 files)."""
    keras = pytest.importorskip("keras")
    work = tmp_path_factory.mktemp("keras-lstm")
    keras.utils.set_random_seed(0)
    keras.Sequential([
        keras.Input((None, 6), name="sensor"),
        keras.layers.LSTM(12),
        keras.layers.Dense(3, activation="softmax", name="activity"),
    ]).save(work / "lstm.keras")
    labels = work / "labels.txt"
    labels.write_text("walk\nrun\nsit\n")
    result = _cli("export", work / "lstm.keras", "--out", work / "lstm", "--labels", labels)
    assert result.exit_code == 0, result.output
    result = _cli("quantize", work / "lstm", "--variant", "int8")
    assert result.exit_code == 0, result.output
    return work / "lstm"


def test_keras_folder_bundle_self_tests_and_streams_like_the_folder(keras_dir, tmp_path):
    out = tmp_path / "lstm.tar.gz"
    result = _cli("bundle", keras_dir, "--variant", "fp32", "--variant", "step", "--variant", "int8", "-o", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads(_members(out)[0][1])
    assert set(manifest["files"]) == {"onnx", "onnx_step", "onnx_int8", "reference"}
    assert manifest["reference"]["source"] == "keras"
    result = _cli("verify", out, "--run")
    assert result.exit_code == 0, result.output
    assert all(role in result.output for role in ("onnx_int8", "onnx_step")) and "FAIL" not in result.output
    sequence = tmp_path / "window.npy"
    np.save(sequence, np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32))
    from_bundle = _cli("stream", out, "--input", sequence)
    from_folder = _cli("stream", keras_dir / "model.step.onnx", "--input", sequence)
    assert from_bundle.exit_code == 0, from_bundle.output
    assert len(from_bundle.output.strip().splitlines()) == 10 and from_bundle.output == from_folder.output


def test_ort_forms_are_bundled_and_self_tested(char_dir, tmp_path):
    out = tmp_path / "char-ort.tar.gz"
    result = _cli("bundle", char_dir, "--variant", "int8", "--ort", "-o", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads(_members(out)[0][1])
    assert {"onnx_int8", "onnx_int8_ort", "onnx_int8_ort_config", "reference"} == set(manifest["files"])
    result = _cli("verify", out, "--run")
    assert result.exit_code == 0 and "onnx_int8_ort" in result.output, result.output


def test_a_classifiers_reference_inputs_hold_inputs_its_source_is_sure_of(tmp_path):
    """Without --data, a Keras classifier's reference inputs are made-up; picked sure-first from 8× candidates, so the
    self-test's "top-1 (sure)" judges inputs (up to half the set) instead of staying blank."""
    import keras

    from edge_rnn.config import BundleConfig
    from edge_rnn.device.labels import agreement
    from edge_rnn.models import adapter_for
    from edge_rnn.tolerances import QUANT_CONFIDENT_MARGIN

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 20, 6)).astype(np.float32)
    y = (x[:, :, 0].mean(1) > 0).astype(np.int64) + (x[:, :, 1].mean(1) > 0.3)
    model = keras.Sequential([keras.Input((None, 6), name="x"), keras.layers.GRU(16), keras.layers.Dense(3, activation="softmax", name="y")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=5, verbose=0)
    model.save(tmp_path / "c.keras")
    (tmp_path / "labels.txt").write_text("low\nmid\nhigh\n")
    assert _cli("export", tmp_path / "c.keras", "--labels", tmp_path / "labels.txt", "--out", tmp_path / "c").exit_code == 0
    assert _cli("quantize", tmp_path / "c", "--variant", "int8").exit_code == 0
    assert _cli("bundle", tmp_path / "c", "--variant", "int8", "-o", tmp_path / "c.tar.gz").exit_code == 0
    count = BundleConfig().count
    # What the first `count` made-up inputs alone would give: the source is sure of fewer of them.
    from edge_rnn.device.manifest import load_manifest

    manifest = load_manifest(tmp_path / "c")
    adapter = adapter_for(manifest)
    plain = adapter.reference(adapter.load(tmp_path / "c", manifest),
                              adapter.reference_inputs(manifest, count=count, time_steps=16, seed=0), io=manifest["io"])["y"]
    _, plain_sure = agreement(plain, plain, QUANT_CONFIDENT_MARGIN, kind="softmax")
    (result,) = [r for r in self_test(open_bundle(tmp_path / "c.tar.gz")).results if r.role == "onnx_int8"]
    assert result.ok, result
    assert result.sure >= min(count // 2, 1 + int(plain_sure.sum())), (result.sure, int(plain_sure.sum()))


def test_verify_says_none_sure_instead_of_a_blank_top1(tmp_path):
    """An untrained labelled classifier is sure of no input: its top-1 promise cannot be judged, and the self-test table
    says "none sure" (it was blank, like an output that has no such promise — which shows "—")."""
    import keras

    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((None, 6), name="x"), keras.layers.GRU(4),
                              keras.layers.Dense(3, activation="softmax", name="y", kernel_initializer="zeros")])
    model.save(tmp_path / "u.keras")
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    assert _cli("export", tmp_path / "u.keras", "--labels", tmp_path / "labels.txt", "--out", tmp_path / "u").exit_code == 0
    assert _cli("bundle", tmp_path / "u", "--variant", "fp32", "-o", tmp_path / "u.tar.gz").exit_code == 0
    rows = [line.split() for line in _cli("verify", tmp_path / "u.tar.gz", "--run").output.splitlines() if line.strip().startswith("onnx ")]
    assert rows and all(" ".join(r[-3:-1]) == "none sure" for r in rows), rows
    assert _cli("export", tmp_path / "u.keras", "--out", tmp_path / "n").exit_code == 0  # no labels: no top-1 promise
    assert _cli("bundle", tmp_path / "n", "--variant", "fp32", "-o", tmp_path / "n.tar.gz").exit_code == 0
    rows = [line.split() for line in _cli("verify", tmp_path / "n.tar.gz", "--run").output.splitlines() if line.strip().startswith("onnx ")]
    assert rows and all(r[-2] == "—" for r in rows), rows
