"""Readers that allocate before they check (issue 20), through the real CLI: every file a command reads is checked —
what the path is, its size, its .npy headers, a zip's directory and declared sizes, an IDX header, a Keras config —
before memory is allocated for it, and refused with one line naming it.

The bombs are valid files (deflate streams of zeros with their right CRCs) that inflate past the ~2 GiB memory budget
from a few MB; each is given to its reader in a child process whose peak resident memory is measured (os.wait4), so
a reader that inflates first and checks after breaks the budget here. Children run under an address-space limit
(CHILD_ADDRESS_SPACE) so that such a reader fails its test instead of swapping the host.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import one_line_error
from test_hostile_inputs import CLASSIFY, _classifier, _folder, _npy_header

from edge_rnn.cli import app
from edge_rnn.config import MAX_KERAS_ARCHIVE_BYTES, MAX_TF_CONFIG_BYTES, MAX_TRAIN_DATA_BYTES
from edge_rnn.device.bounded import MAX_ARRAY_BYTES, MAX_ARRAYS_BYTES, MEMORY_BUDGET_BYTES
from edge_rnn.device.manifest import file_entry
from edge_rnn.errors import DataError

runner = CliRunner()
MIB, GIB = 1024**2, 1024**3
# What a bomb inflates to: past the memory budget, so a reader that inflates before it checks cannot pass.
BOMB_BYTES = MEMORY_BUDGET_BYTES + GIB // 4
# A child may map this much address space: far above the budget (TensorFlow-free commands map < 1 GiB), far below
# the host's memory, so a reader that allocates what a file declares fails instead of exhausting the machine.
CHILD_ADDRESS_SPACE = 8 * GIB
_CHUNK = 16 * MIB


# ---------------------------------------------------------------------------------------------
# Building hostile files


@functools.lru_cache(maxsize=4)
def _deflated(prefix: bytes, size: int, fill: int = 0) -> tuple[bytes, int]:
    """(raw deflate stream, crc32) of `prefix` followed by `size` bytes of `fill`, in about a second for gigabytes.

    One 16 MiB chunk of fill compresses (with a sync flush) to the same bytes every time once the 32 KiB window holds
    only fill, so the stream is that output repeated; every back-reference in it reaches fill bytes only."""
    chunk = bytes([fill]) * _CHUNK
    full, rest = divmod(size, _CHUNK)
    assert full >= 3
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.compress(chunk) + c.flush(zlib.Z_SYNC_FLUSH)
    repeat = c.compress(chunk) + c.flush(zlib.Z_SYNC_FLUSH)
    assert repeat == c.compress(chunk) + c.flush(zlib.Z_SYNC_FLUSH)
    stream = head + repeat * (full - 1) + c.compress(chunk[:rest]) + c.flush()
    crc = zlib.crc32(prefix)
    for _ in range(full):
        crc = zlib.crc32(chunk, crc)
    return stream, zlib.crc32(chunk[:rest], crc)


def _member(name: str, data: bytes) -> tuple[str, bytes, int, int, int]:
    """A stored zip member: (name, payload, method, crc32, uncompressed size)."""
    return name, data, zipfile.ZIP_STORED, zlib.crc32(data), len(data)


def _bomb_npy(name: str, shape: tuple[int, ...], dtype: str = "|u1") -> tuple[str, bytes, int, int, int]:
    """A deflated .npy member holding zeros of `shape`: a few MB that inflate to the whole array."""
    header = _npy_header(shape, dtype)
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    payload, crc = _deflated(header, size)
    return name, payload, zipfile.ZIP_DEFLATED, crc, len(header) + size


def _zip(members: list[tuple[str, bytes, int, int, int]]) -> bytes:
    """A zip archive of `members` (each under 4 GiB once inflated, so no zip64), written by hand: zipfile would
    inflate a member's bytes to write it."""
    out, central = bytearray(), bytearray()
    for name, payload, method, crc, size in members:
        encoded, offset = name.encode(), len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(payload), size, len(encoded), 0)
        out += encoded + payload
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc, len(payload), size,
                               len(encoded), 0, 0, 0, 0, 0, offset) + encoded
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(out), 0)
    return bytes(out + central + end)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _gzip_of_zeros(prefix: bytes, size: int) -> bytes:
    """A .gz file of `prefix` and `size` zero bytes (RFC 1952: header, deflate stream, crc32, size mod 2**32)."""
    stream, crc = _deflated(prefix, size)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + stream + struct.pack("<LL", crc, (len(prefix) + size) % 2**32)


def _idx_header(*dims: int) -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, len(dims)) + struct.pack(f">{len(dims)}I", *dims)


def _char_folder(tmp_path, checkpoint: bytes):
    """A char-rnn model folder whose manifest lists `checkpoint` with its real sha256 (a hostile folder is consistent)."""
    folder = tmp_path / "char"
    folder.mkdir()
    (folder / "checkpoint.npz").write_bytes(checkpoint)
    manifest = {"schema": 1, "model": "char-rnn", "task": "generate", "files": {"checkpoint": file_entry(folder, "checkpoint.npz")}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _bundle(tmp_path, reference: bytes):
    """A bundle (format 1) holding a tiny model and `reference` as its reference.npz, every sha256 right."""
    members = {"model.onnx": _classifier(), "reference.npz": reference}
    entry = lambda name: {"path": name, "sha256": hashlib.sha256(members[name]).hexdigest(), "bytes": len(members[name])}  # noqa: E731
    manifest = {"schema": 1, "model": "tiny", "task": "keras", "bundle": {"format": 1, "roles": ["onnx"]},
                "files": {"onnx": entry("model.onnx"), "reference": entry("reference.npz")},
                "reference": {"file": "reference.npz", "source": "keras", "count": 1, "inputs": ["x"], "outputs": ["y"],
                              "tolerances": {"onnx": {"y": {"atol": 1e-5}}}}}
    path = tmp_path / "tiny.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("manifest.json", json.dumps(manifest).encode()), *members.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------------------------------------
# Tiny Keras models, edited into hostile ones


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory):
    """tiny.keras (LSTM → GRU → Dense) and emb.keras (Embedding → RNN(LSTMCell) → Dense, and a Bidirectional)."""
    import keras

    folder = tmp_path_factory.mktemp("keras")
    x = keras.Input((None, 3), name="x")
    h = keras.layers.GRU(4, name="gru")(keras.layers.LSTM(4, return_sequences=True, name="lstm")(x))
    keras.Model(x, keras.layers.Dense(2, name="dense")(h)).save(folder / "tiny.keras")
    ids = keras.Input((None,), dtype="int32", name="ids")
    e = keras.layers.Embedding(50, 4, name="emb")(ids)
    r = keras.layers.RNN(keras.layers.LSTMCell(3), name="rnn")(e)
    b = keras.layers.Bidirectional(keras.layers.SimpleRNN(2), name="bi")(e)
    keras.Model(ids, [keras.layers.Dense(3, name="d")(r), b]).save(folder / "emb.keras")
    return folder


def _edited(src, dst, *, config=None, members: dict[str, bytes] | None = None):
    """A copy of the .keras file `src` with config.json changed by `config(dict)` (which may return the new text) and
    members replaced."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = (members or {}).get(info.filename, zin.read(info))
            if info.filename == "config.json" and config is not None:
                parsed = json.loads(data)
                text = config(parsed)
                data = text if isinstance(text, bytes) else json.dumps(parsed).encode()
            zout.writestr(info.filename, data)
    return dst


def _layer(config: dict, name: str) -> dict:
    return next(layer["config"] for layer in config["config"]["layers"] if layer["config"].get("name") == name)


def _h5_declaring(src, *, dataset: str, elements: int) -> bytes:
    """model.weights.h5 of `src` with `dataset` replaced by a chunked, compressed float32 one of `elements` values of
    which none is stored (HDF5 serves the fill value): a few KB declaring elements × 4 bytes."""
    import h5py

    with zipfile.ZipFile(src) as archive:
        buffer = io.BytesIO(archive.read("model.weights.h5"))
    with h5py.File(buffer, "r+") as h5:
        del h5[dataset]
        h5.create_dataset(dataset, shape=(elements,), dtype="f4", chunks=(1 << 20,), compression="gzip", fillvalue=0.0)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Running a command in a child process and measuring it


# Runs argv[3:] under an address-space limit and writes its peak RSS (KiB) to argv[2]. A small process of its own: a
# child's peak counts the memory of the process it was forked from (Linux charges the replaced image at exec), so the
# command is not started from pytest's process, which holds Keras by then.
_MEASURE = """
import os, resource, subprocess, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
proc = subprocess.Popen(sys.argv[3:])
_, status, usage = os.wait4(proc.pid, 0)
proc.returncode = os.waitstatus_to_exitcode(status)
with open(sys.argv[2], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(proc.returncode)
"""


def _child(tmp_path, *argv, timeout: float = 120.0) -> tuple[int, str, int, float]:
    """(exit code, output, peak RSS in bytes, seconds) of a command (`python ARGV`), measured on its own."""
    stamp = time.monotonic_ns()
    log, rss = tmp_path / f"child-{stamp}.log", tmp_path / f"child-{stamp}.rss"
    with open(log, "wb") as out:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", _MEASURE, str(CHILD_ADDRESS_SPACE), str(rss), sys.executable, *map(str, argv)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise AssertionError(f"{' '.join(map(str, argv))} still running after {timeout:.0f} s: {log.read_text()[-2000:]}") from None
    return code, log.read_text(errors="replace"), int(rss.read_text()) * 1024, time.monotonic() - start


def _refused_in_child(tmp_path, *args, needles: tuple[str, ...]) -> tuple[int, float]:
    """Run a command that must be refused with one `error:` line holding `needles`; (peak RSS, seconds)."""
    code, output, peak, seconds = _child(tmp_path, "-m", "edge_rnn", *args)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert code == 1 and lines and lines[-1].startswith("error:") and "Traceback" not in output, output[-3000:]
    for needle in needles:
        assert needle.lower() in lines[-1].lower(), lines[-1]
    return peak, seconds


# ---------------------------------------------------------------------------------------------
# Files that inflate past the memory budget: refused by what they declare, memory flat


def _train_npz(tmp_path):
    n = BOMB_BYTES // (28 * 28)
    small = np.zeros(4, np.uint8)
    members = [_bomb_npy("x_train.npy", (n, 28, 28)), _member("y_train.npy", _npy_bytes(np.zeros(n, np.uint8))),
               _member("x_test.npy", _npy_bytes(np.zeros((4, 28, 28), np.uint8))), _member("y_test.npy", _npy_bytes(small))]
    (tmp_path / "bomb.npz").write_bytes(_zip(members))
    return ["train", "mnist-lstm", "--data", tmp_path / "bomb.npz", "--epochs", 1, "--out", tmp_path / "out"], \
        ("x_train.npy", f"over the {MAX_TRAIN_DATA_BYTES // MIB} MiB cap")


def _train_idx_gz(tmp_path, size: int = BOMB_BYTES):
    n = size // (28 * 28)
    folder = tmp_path / "idx"
    folder.mkdir(exist_ok=True)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(_gzip_of_zeros(_idx_header(n, 28, 28), n * 28 * 28))
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_header(n) + bytes(n)))
    (folder / "t10k-images-idx3-ubyte").write_bytes(_idx_header(4, 28, 28) + bytes(4 * 28 * 28))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx_header(4) + bytes(4))
    return ["train", "mnist-lstm", "--data", folder, "--epochs", 1, "--out", tmp_path / "out"], \
        (f"over the {MAX_TRAIN_DATA_BYTES // MIB} MiB cap", "--stream")


def _train_zip_directory(tmp_path):
    # 2.6 million directory entries (133 MB) for one local header: zipfile makes an object of each before any
    # member is read.
    name = b"x_train.npy"
    entry = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, 0, 0, 0, len(name), 0, 0, 0, 0, 0, 0) + name
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0x21, 0, 0, 0, len(name), 0) + name
    count = 2_600_000
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, len(entry) * count, len(local), 0)
    with open(tmp_path / "directory.npz", "wb") as f:
        f.write(local)
        for _ in range(count // 100_000):
            f.write(entry * 100_000)
        f.write(end)
    return ["train", "mnist-lstm", "--data", tmp_path / "directory.npz", "--epochs", 1, "--out", tmp_path / "out"], \
        ("directory", "over the caps")


def _sample_checkpoint(tmp_path):
    folder = _char_folder(tmp_path, _zip([_bomb_npy("Whh.npy", (BOMB_BYTES // 8,), "<f8")]))
    return ["sample", folder, "--length", 10], ("Whh.npy", "over the 512 MiB cap")


def _verify_reference(tmp_path):
    path = _bundle(tmp_path, _zip([_bomb_npy("input/x.npy", (BOMB_BYTES // (28 * 28 * 4), 28, 28), "<f4"),
                                   _member("output/y.npy", _npy_bytes(np.zeros((1, 28), np.float32)))]))
    return ["verify", path], ("reference.npz", "input/x.npy", f"over the {MAX_ARRAY_BYTES // MIB} MiB cap")


def _evaluate_members(tmp_path):
    # Eight compressed members, each under the one-array cap, that inflate to 2.3 GiB together.
    rows = 300 * MIB // (28 * 28 * 4)
    names = ["x", "y"] + [f"extra{i}" for i in range(6)]
    (tmp_path / "data.npz").write_bytes(_zip([_bomb_npy(f"{n}.npy", (rows, 28, 28), "<f4") for n in names]))
    model = _folder(tmp_path / "m", _classifier(), task="classify", extra=CLASSIFY)
    return ["evaluate", model.parent, "--data", tmp_path / "data.npz"], (f"over the {MAX_ARRAYS_BYTES // GIB} GiB cap",)


def _export_config_json(tmp_path, keras_files):
    # config.json: the model's real config and 2.25 GiB of spaces after it — valid JSON.
    with zipfile.ZipFile(keras_files / "tiny.keras") as archive:
        infos = [(i.filename, archive.read(i)) for i in archive.infolist()]
    members = []
    for name, data in infos:
        if name == "config.json":
            payload, crc = _deflated(data, BOMB_BYTES, fill=ord(" "))
            members.append((name, payload, zipfile.ZIP_DEFLATED, crc, len(data) + BOMB_BYTES))
        else:
            members.append(_member(name, data))
    (tmp_path / "bomb.keras").write_bytes(_zip(members))
    return ["export", tmp_path / "bomb.keras", "--out", tmp_path / "out"], \
        ("config.json", f"over the {MAX_KERAS_ARCHIVE_BYTES // MIB} MiB cap")


def _export_weights_h5(tmp_path, keras_files):
    weights = _h5_declaring(keras_files / "tiny.keras", dataset="layers/dense/vars/0", elements=BOMB_BYTES // 4)
    _edited(keras_files / "tiny.keras", tmp_path / "bomb.keras", members={"model.weights.h5": weights})
    return ["export", tmp_path / "bomb.keras", "--out", tmp_path / "out"], ("model.weights.h5", "MAX_MODEL_WEIGHT_BYTES")


BOMBS = {
    "train --data .npz member": _train_npz,
    "train --data zip directory": _train_zip_directory,
    "sample checkpoint.npz": _sample_checkpoint,
    "verify reference.npz": _verify_reference,
    "evaluate --data members together": _evaluate_members,
    "export config.json": _export_config_json,
    "export model.weights.h5": _export_weights_h5,
}


@pytest.mark.parametrize("case", BOMBS)
def test_a_file_declaring_gigabytes_is_refused_and_memory_stays_flat(case, tmp_path, request):
    build = BOMBS[case]
    args, needles = build(tmp_path, request.getfixturevalue("keras_files")) if case.startswith("export") else build(tmp_path)
    peak, seconds = _refused_in_child(tmp_path, *args, needles=needles)
    print(f"\n{case}: refused in {seconds:.1f} s, peak RSS {peak / MIB:.0f} MiB")
    # Far under the budget the file would have broken: nothing it declares was allocated.
    assert peak < MEMORY_BUDGET_BYTES // 4, f"{case}: peak RSS {peak / MIB:.0f} MiB"


def test_an_idx_gz_over_the_memory_cap_is_refused_unless_streamed(tmp_path):
    """Held in memory, a .gz IDX file whose header fits the record cap but not the memory cap is refused from its
    header; streamed (--stream), the same file is read through in chunks in flat memory."""
    args, needles = _train_idx_gz(tmp_path)
    peak, seconds = _refused_in_child(tmp_path, *args, needles=needles)
    print(f"\ntrain --data IDX .gz: refused in {seconds:.1f} s, peak RSS {peak / MIB:.0f} MiB")
    assert peak < MEMORY_BUDGET_BYTES // 4
    # Streamed: a file over the memory cap (smaller than the bomb, which would take ~15 s to inflate through).
    size = MAX_TRAIN_DATA_BYTES + 64 * MIB
    _train_idx_gz(tmp_path, size)
    script = ("import sys; from pathlib import Path; from edge_rnn.train.data import load_idx_folder; "
              "d = load_idx_folder(Path(sys.argv[1]), stream=True); print(d.train_images.path.name, len(d.y_train), d.x_train.shape)")
    code, output, peak, seconds = _child(tmp_path, "-c", script, tmp_path / "idx")
    assert code == 0, output
    n = size // (28 * 28)
    assert output.split() == ["train-images-idx3-ubyte.gz", str(n), "(0,", "28,", "28)"], output
    print(f"streamed {n * 784 / MIB:.0f} MiB of IDX .gz in {seconds:.1f} s, peak RSS {peak / MIB:.0f} MiB")
    assert peak < MAX_TRAIN_DATA_BYTES


# ---------------------------------------------------------------------------------------------
# .npy headers declaring more than the file holds: refused before an array is allocated


def _huge_header(shape, dtype="<f4") -> bytes:
    return _npy_header(shape, dtype) + bytes(16)


def _tiny_refused(args, *needles):
    one_line_error(runner.invoke(app, [str(a) for a in args]), *needles)


def test_a_huge_npy_header_in_train_data_is_refused(tmp_path):
    members = [_member("x_train.npy", _huge_header((2**40, 28, 28), "|u1"))] + [
        _member(f"{k}.npy", _npy_bytes(np.zeros(s, np.uint8))) for k, s in (("y_train", 4), ("x_test", (4, 28, 28)), ("y_test", 4))]
    (tmp_path / "d.npz").write_bytes(_zip(members))
    _tiny_refused(["train", "mnist-lstm", "--data", tmp_path / "d.npz", "--epochs", 1, "--out", tmp_path / "out"], "x_train", "declares shape")


def test_a_huge_npy_header_in_a_checkpoint_is_refused(tmp_path):
    folder = _char_folder(tmp_path, _zip([_member("Whh.npy", _huge_header((2**31, 2**31), "<f8"))]))
    _tiny_refused(["sample", folder, "--length", 10], "Whh", "declares shape")


def test_a_huge_npy_header_in_a_bundle_reference_is_refused(tmp_path):
    path = _bundle(tmp_path, _zip([_member("input/x.npy", _huge_header((2**40, 28, 28))),
                                   _member("output/y.npy", _npy_bytes(np.zeros((1, 28), np.float32)))]))
    _tiny_refused(["verify", path], "reference.npz", "input/x", "declares shape")


def test_a_huge_npy_header_as_calibration_data_is_refused(tmp_path):
    from edge_rnn.models.base import load_npy

    (tmp_path / "calib.npy").write_bytes(_huge_header((2**40, 28)))
    with pytest.raises(DataError, match="declares shape"):
        load_npy(tmp_path / "calib.npy", what="calibration data for 'x'")


# ---------------------------------------------------------------------------------------------
# Keras configs that ask for absurd allocations or cannot be walked: refused, by layer, before Keras builds anything


def _deep(levels: int):
    def edit(config) -> bytes:  # written as text: json.dumps itself recurses once per level
        config["config"]["notes"] = "NESTED"
        return json.dumps(config).replace('"NESTED"', "[" * levels + "]" * levels).encode()
    return edit


def _units(config):
    _layer(config, "lstm")["units"] = 10**7


def _rows(config):
    _layer(config, "emb")["input_dim"] = 10**10


def _together(config):
    # Each under MAX_MODEL_WEIGHT_BYTES alone (320 MiB), over it together.
    _layer(config, "emb")["input_dim"] = 20_000_000
    _layer(config, "d")["units"] = 20_000_000


def _unknown_class(config):
    next(layer for layer in config["config"]["layers"] if layer["config"].get("name") == "lstm")["class_name"] = "FancyLSTM"


KERAS_CASES = {
    "lstm-10M-units": ("tiny", _units, ("'lstm'", "units=10,000,000", "MAX_MODEL_WEIGHT_BYTES")),
    "embedding-10G-rows": ("emb", _rows, ("'emb'", "10,000,000,000 rows", "MAX_MODEL_WEIGHT_BYTES")),
    "layers-over-together": ("emb", _together, ("together", "'emb'", "'d'")),
    "config-nested-500": ("tiny", _deep(500), ("config.json", "nests", "64 deep")),
    "config-nested-100k": ("tiny", _deep(100_000), ("config.json", "nests")),
    "unknown-class": ("tiny", _unknown_class, ("'lstm'", "'FancyLSTM'", "custom class")),
}


@pytest.mark.parametrize("case", KERAS_CASES)
def test_a_keras_config_is_checked_before_keras_builds_it(case, keras_files, tmp_path):
    source, edit, needles = KERAS_CASES[case]
    bad = _edited(keras_files / f"{source}.keras", tmp_path / f"{case}.keras", config=edit)
    one_line_error(runner.invoke(app, ["export", str(bad), "--out", str(tmp_path / "out")]), *needles)
    assert not (tmp_path / "out").exists()


def test_a_cell_class_defined_in_a_script_is_named(tmp_path):
    """A real .keras file whose RNN runs a cell class Keras cannot import (defined in a test, as in a notebook: the
    file records no module for it) is refused naming the cell and its class, not Keras' generic message."""
    import json
    import zipfile

    import keras

    class ScriptCell(keras.layers.Layer):
        def __init__(self, units, **kwargs):
            super().__init__(**kwargs)
            self.units, self.state_size = units, units

        def build(self, shape):
            self.kernel = self.add_weight(shape=(shape[-1], self.units))

        def call(self, x, states):
            h = keras.ops.tanh(x @ self.kernel + states[0])
            return h, [h]

        def get_config(self):
            return {**super().get_config(), "units": self.units}

    ScriptCell.__module__ = "__main__"  # as a class typed into a notebook or a script run as `python train.py`
    model = keras.Sequential([keras.Input((5, 3)), keras.layers.RNN(ScriptCell(4, name="my_cell"), name="rnn"),
                              keras.layers.Dense(2)])
    path = tmp_path / "script_cell.keras"
    model.save(path)
    config = json.loads(zipfile.ZipFile(path).read("config.json"))
    (rnn,) = [layer for layer in config["config"]["layers"] if layer["class_name"] == "RNN"]
    assert rnn["config"]["cell"]["module"] is None  # what makes Keras' own message generic
    one_line_error(runner.invoke(app, ["export", str(path), "--out", str(tmp_path / "out")]),
                   "'my_cell'", "'ScriptCell'", "script or notebook", "custom class")
    assert not (tmp_path / "out").exists()


def test_the_checks_pass_real_keras_files(keras_files):
    """The caps are far above real models: both tiny files pass the checks (sizes, nesting, weights) and load."""
    from edge_rnn.models.keras_model import load_keras_file, read_keras_config

    for name, weights in (("tiny", 8), ("emb", 12)):
        assert read_keras_config(keras_files / f"{name}.keras")["class_name"] == "Functional"
        assert len(load_keras_file(keras_files / f"{name}.keras").weights) == weights


# ---------------------------------------------------------------------------------------------
# A FIFO, a device or a directory where a file is read: refused by what it is


def _special(tmp_path, kind: str, name: str):
    path = tmp_path / name
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")  # named like the file the reader expects
    else:
        path.mkdir()
    return path


KIND_TEXT = {"fifo": "is a FIFO", "device": "is a character device", "directory": "is a directory"}


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_a_special_text_corpus_is_refused(kind, tmp_path):
    # A child process: reading a FIFO blocks for ever and /dev/zero never ends, so a reader that opens first hangs.
    path = _special(tmp_path, kind, "corpus.txt")
    _refused_in_child(tmp_path, "train", "char-rnn", "--text", path, "--iters", 10, "--out", tmp_path / "out",
                      needles=(str(path), KIND_TEXT[kind], "not a regular file"))


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_a_special_labels_file_is_refused(kind, tmp_path, keras_files):
    path = _special(tmp_path, kind, "labels.txt")
    _refused_in_child(tmp_path, "export", keras_files / "tiny.keras", "--labels", path, "--out", tmp_path / "out",
                      needles=("labels file", KIND_TEXT[kind], "not a regular file"))


SPECIAL_READERS = {
    "train --data": lambda tmp_path, path, keras_files: ["train", "mnist-lstm", "--data", path, "--out", tmp_path / "out"],
    "infer input": lambda tmp_path, path, keras_files: [
        "infer", _folder(tmp_path / "m", _classifier(), task="classify", extra=CLASSIFY), path],
    "export .keras": lambda tmp_path, path, keras_files: ["export", path, "--out", tmp_path / "out"],
}
SPECIAL_NAMES = {"train --data": "data.npz", "infer input": "x.npy", "export .keras": "model.keras"}


# A folder is a valid --data (IDX) and export source (a model folder): only infer's input is never one.
@pytest.mark.parametrize("reader, kind", [(r, k) for r in SPECIAL_READERS for k in ("fifo", "device", "directory")
                                          if k != "directory" or r == "infer input"])
def test_a_special_file_given_as_input_is_refused(reader, kind, tmp_path, keras_files):
    path = _special(tmp_path, kind, SPECIAL_NAMES[reader])
    one_line_error(runner.invoke(app, [str(a) for a in SPECIAL_READERS[reader](tmp_path, path, keras_files)]),
                   KIND_TEXT[kind], "not a regular file")


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
@pytest.mark.parametrize("command", ["infer", "bundle"])
def test_a_special_file_in_place_of_a_folders_model_is_refused(command, kind, tmp_path):
    """A folder's model.onnx replaced by a FIFO, /dev/zero or a directory: never hashed or read (a FIFO blocks, /dev/zero
    never ends), and named for what it is, not "missing" — through the loader (infer) and the manifest's file check
    (bundle)."""
    model = _folder(tmp_path / "m", _classifier(), task="classify", extra=CLASSIFY)
    model.unlink()
    _special(model.parent, kind, model.name)
    np.save(tmp_path / "x.npy", np.zeros((1, 28, 28), np.float32))
    args = (["infer", model.parent, tmp_path / "x.npy"] if command == "infer"
            else ["bundle", model.parent, "--variant", "fp32", "-o", tmp_path / "b.tar.gz"])
    # The device is a symlink to /dev/zero: the manifest's file check refuses a symlink out of the folder first.
    needles = (("points outside its folder",) if kind == "device"
               else (str(model), KIND_TEXT[kind], "not a regular file"))
    _refused_in_child(tmp_path, *args, needles=needles)
    assert not (tmp_path / "b.tar.gz").exists()


# ---------------------------------------------------------------------------------------------
# TF_CONFIG: an environment variable read whole


@pytest.mark.parametrize("case", ["over-the-cap", "nested-30k"])
def test_tf_config_too_big_or_too_deep_is_one_line(case, tmp_path):
    if case == "over-the-cap":
        workers = [f"worker-{i}.example.com:12345" for i in range(MAX_TF_CONFIG_BYTES // 20)]
        value, needles = json.dumps({"cluster": {"worker": workers}, "task": {"index": 0}}), ("TF_CONFIG", "MAX_TF_CONFIG_BYTES")
    else:
        value, needles = '{"cluster": {"worker": ' + "[" * 30_000 + "]" * 30_000 + "}}", ("TF_CONFIG", "nests")
    result = runner.invoke(app, ["train", "mnist-lstm", "--strategy", "multi-worker", "--data", "sample", "--connect-timeout", "0.1",
                                 "--out", str(tmp_path / "out")], env={"TF_CONFIG": value})
    one_line_error(result, *needles)
