"""Bounded readers for what a device feeds a model: .npy arrays, images, JSON rows.

Device path: numpy and Pillow (for images) only. Every reader checks sizes before it allocates, refuses
what it cannot convert without changing a value (object and structured arrays, NaN/Inf, fractional
ids, ids outside the vocabulary), and says which input and which row is wrong.

Masked inputs (the manifest's `masking`) must be post-padded: onnxruntime runs a masked recurrent
layer over the first `sequence_lens` steps of each row, which equals Keras only when every real step
comes before every padding step (see edge_rnn/export/keras_onnx.py).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import numpy.typing as npt

from ..errors import InputError
from .bounded import MAX_ARRAY_BYTES, check_numeric, load_npy, open_regular, parse_json

# .npy inputs bigger than this are refused before loading (a batch of 28×28 float32 digits is ~3 KB each).
MAX_NPY_BYTES = MAX_ARRAY_BYTES
# One JSON row on stdin is one time step of a stream: a few thousand numbers at most.
MAX_JSON_LINE_BYTES = 1024 * 1024
# An image's width × height is read from its header and refused past this before decoding (4096 × 4096;
# the models take 28 × 28). Pillow's own cap (~89 M pixels, 179 M as an error) is far higher.
MAX_IMAGE_PIXELS = 4096 * 4096
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".tif", ".tiff", ".webp")
# float32 holds every integer up to 2**24 exactly; beyond, an integer array fed as floats would change.
FLOAT32_EXACT_INT = 2**24
# The dtype names onnxruntime reports for graph inputs → numpy.
ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}
# What a post-padding check sees as a real (unmasked) step, per masking kind: (B, T, …) → (B, T) bool.
MASKS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "mask_zero": lambda x, value: x != value,  # Embedding(mask_zero=True): id 0 is padding
    "mask_value": lambda x, value: np.any(x != value, axis=-1),  # Masking(mask_value): a step equal to it everywhere
}


# ---------------------------------------------------------------------------------------------
# .npy


def read_npy(path: str | os.PathLike[str], *, max_bytes: int = MAX_NPY_BYTES) -> np.ndarray:
    """One .npy array, its header (shape, dtype, size) checked before the data is read; never unpickles."""
    return load_npy(path, what="input file", max_bytes=max_bytes, error=InputError)


def _check_numeric(dtype: np.dtype, *, where: str) -> None:
    check_numeric(dtype, where=where, error=InputError)


# ---------------------------------------------------------------------------------------------
# Images (mnist-lstm): PNGs and .npy pixel arrays → preprocessed float32 (N, H, W)


def _image_pixels(path: Path, *, height: int, width: int) -> npt.NDArray[np.uint8]:
    from PIL import Image, UnidentifiedImageError

    try:
        # Image.open reads the header only: the size is refused before a pixel is decoded. Pillow's own bomb
        # check (a warning past Image.MAX_IMAGE_PIXELS, DecompressionBombError — not an OSError — past twice that) is
        # made an error at any size.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            size = img.size
            if size[0] * size[1] > MAX_IMAGE_PIXELS:
                raise InputError(f"{path} is {size[0]}×{size[1]} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel cap — not decoded; give a {width}×{height} image")
            if size != (width, height):
                raise InputError(f"{path} is {size[0]}×{size[1]} pixels; the model takes {width}×{height} images — resize it first")
            img.load()
            if img.mode not in ("L", "RGB", "RGBA", "P", "LA", "1", "I;16", "I"):
                raise InputError(f"{path} has pixel mode {img.mode}; give an 8-bit grey or RGB image")
            if img.mode in ("I;16", "I"):
                raise InputError(f"{path} is a 16/32-bit image; give an 8-bit grey or RGB image")
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"cannot read {path}: {exc} — give a {width}×{height} image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot read {path} as an image ({exc}) — give a 28×28 PNG or a .npy array") from exc


def _npy_pixels(path: Path, *, height: int, width: int) -> np.ndarray:
    """A .npy of one image (28, 28) or a batch (N, 28, 28): uint8 raw pixels or float already in [0, 1]."""
    array = read_npy(path)
    shape = array.shape
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (height, width) or array.shape[0] == 0:
        raise InputError(f"{path} has shape {shape}; expected ({height}, {width}) or (N, {height}, {width})")
    return array


def preprocess_pixels(images: npt.NDArray[np.uint8], *, preprocessing: dict[str, Any]) -> npt.NDArray[np.float32]:
    """uint8 pixels (N, H, W) → float32 model input, exactly as the manifest's preprocessing says."""
    x = images.astype(np.float32) * np.float32(preprocessing["scale"]) + np.float32(preprocessing.get("offset", 0.0))
    if preprocessing["image"].get("invert"):
        x = np.float32(1.0) - x
    return x.astype(np.float32, copy=False)


def load_images(
    paths: Sequence[str | os.PathLike[str]], *, preprocessing: dict[str, Any]
) -> tuple[npt.NDArray[np.float32], list[str]]:
    """Read PNGs and .npy files → float32 (N, H, W) preprocessed as the manifest says, and a name per row."""
    height, width = preprocessing["image"]["height"], preprocessing["image"]["width"]
    batches, names = [], []
    for raw in paths:
        path = Path(raw)
        open_regular(path, what="input file", max_bytes=MAX_NPY_BYTES, error=InputError).close()  # a FIFO or device: refused by what it is
        if path.suffix.lower() == ".npy":
            array = _npy_pixels(path, height=height, width=width)
            if array.dtype == np.uint8:
                x = preprocess_pixels(array, preprocessing=preprocessing)
            elif np.issubdtype(array.dtype, np.floating):
                if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
                    raise InputError(f"{path}: float arrays must be preprocessed pixels in [0, 1]; save raw pixels as uint8")
                x = array.astype(np.float32)
            else:
                raise InputError(f"{path} has dtype {array.dtype}; give uint8 pixels or float32 in [0, 1]")
            names += [f"{path.name}[{i}]" for i in range(len(x))] if len(x) > 1 else [path.name]
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            x = preprocess_pixels(_image_pixels(path, height=height, width=width)[None], preprocessing=preprocessing)
            names.append(path.name)
        else:
            raise InputError(f"{path}: unsupported input type {path.suffix!r}; give .png (or another image) or .npy")
        batches.append(x.astype(np.float32))
    if not batches:
        raise InputError("no inputs given — pass one or more .png or .npy files")
    return np.concatenate(batches), names


# ---------------------------------------------------------------------------------------------
# Arrays for any model: one per graph input, checked against the manifest's I/O spec


def convert_array(
    array: np.ndarray, *, spec: dict[str, Any], dtype: np.dtype | type, where: str, batched: bool | None = None
) -> np.ndarray:
    """`array` as graph input `spec` (name, dtype, shape) of numpy `dtype`, with a batch axis; raises InputError.

    Integer inputs are ids: whole numbers in [0, spec["vocab"]) when the spec gives a vocabulary size, and never
    negative (ONNX Gather would wrap a negative id around where Keras refuses it). Float inputs must be finite.
    A single example without the batch axis gets one; `batched` forces the choice.
    """
    name = spec["name"]
    where = f"{where} (input {name!r})"
    _check_numeric(array.dtype, where=where)
    if array.dtype.kind == "b":
        raise InputError(f"{where} has dtype bool; give numbers")
    target = np.dtype(dtype)
    shape = spec.get("shape", [])
    if batched is None:
        batched = array.ndim == len(shape)
    if array.ndim != len(shape) - (0 if batched else 1):
        expected = _shape_text(shape)
        raise InputError(f"{where} has shape {array.shape}; expected {expected} or one example {_shape_text(shape[1:])}")
    given = array.shape
    if not batched:
        array = array[None]
    if array.shape[0] == 0:
        raise InputError(f"{where} holds a batch of 0 examples; give at least one")
    for axis, (got, want) in enumerate(zip(array.shape, shape)):
        if isinstance(want, int) and got != want:
            raise InputError(f"{where} has shape {given}; expected {_shape_text(shape)}" + ("" if batched else f" or one example {_shape_text(shape[1:])}"))
        if axis > 0 and got == 0:
            raise InputError(f"{where} has shape {given}: an axis is empty")
    if target.kind in "iu":
        return _as_ids(array, target=target, vocab=spec.get("vocab"), where=where)
    if target.kind == "f" and isinstance(spec.get("vocab"), int):  # ids fed as floats (a Keras Input's default dtype)
        return _as_ids(array, target=np.dtype(np.int64), vocab=spec["vocab"], where=where).astype(target)
    if target.kind == "f":
        return _as_floats(array, target=target, where=where)
    raise InputError(f"{where}: the graph takes {target}, which edge-rnn cannot feed from a .npy array")


def _as_ids(array: np.ndarray, *, target: np.dtype, vocab: Any, where: str) -> np.ndarray:
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise InputError(f"{where} holds NaN or Inf; ids must be whole numbers")
        if not np.all(array == np.round(array)):
            raise InputError(f"{where} holds fractional values but the model takes integer ids; save whole numbers")
    limit = vocab if isinstance(vocab, int) and vocab > 0 else np.iinfo(target).max + 1
    bad = (array < 0) | (array >= limit)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        place = f"row {at[0]}, position {at[1]}" if len(at) == 2 else f"row {at[0]}" if len(at) == 1 else f"index {list(at)}"
        valid = f"valid ids are 0–{limit - 1}" + (f", the vocabulary of {limit:,}" if limit == vocab else "")
        rule = "ids start at 0" if array[at] < 0 else f"ids must be below {limit}"
        raise InputError(f"{where} holds the id {array[at]:g} at {place}; {rule} ({valid})")
    return array.astype(target)


def _as_floats(array: np.ndarray, *, target: np.dtype, where: str) -> np.ndarray:
    if array.dtype.kind in "iu" and array.size and max(abs(int(array.min())), abs(int(array.max()))) > FLOAT32_EXACT_INT:
        raise InputError(f"{where} holds integers beyond ±{FLOAT32_EXACT_INT}, which {target} cannot hold exactly")
    with np.errstate(over="ignore"):
        x = array.astype(target)
    if not np.all(np.isfinite(x)):
        raise InputError(f"{where} holds NaN or Inf (or values too large for {target}); give finite numbers")
    return x


def _shape_text(shape: list) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def check_post_padded(x: np.ndarray, *, kind: str, value: float, where: str) -> None:
    """Refuse a masked input (B, T, …) whose row has a real step after a padding step, naming the row."""
    real = MASKS[kind](x, value)  # (B, T)
    late = real[:, 1:] & ~real[:, :-1]  # a real step right after a padding step
    if late.any():
        row = int(np.argmax(late.any(axis=1)))
        step = int(np.argmax(late[row])) + 1
        raise InputError(
            f"{where} row {row}: step {step} is real after padding (value {value:g}) — masked inputs must be post-padded "
            "(real steps first, padding at the end), as onnxruntime's sequence lengths would differ from Keras otherwise"
        )


def parse_input_specs(specs: Sequence[str | os.PathLike[str]], *, names: Sequence[str]) -> dict[str, Path]:
    """`NAME=FILE.npy` per input (or one `FILE.npy` for a one-input model) → {input name: path}."""
    files: dict[str, Path] = {}
    for raw in specs:
        text = os.fspath(raw)
        name, sep, rest = text.partition("=")
        if sep and name in names:
            key, path = name, Path(rest)
        elif sep and name and os.sep not in name and "/" not in name and not Path(text).exists():
            raise InputError(f"{text!r}: the model has no input {name!r} — its input{'s are' if len(names) > 1 else ' is'} "
                             f"{', '.join(repr(n) for n in names)}" + (" (or give FILE.npy alone: one input)" if len(names) == 1 else ""))
        elif len(names) == 1:
            key, path = names[0], Path(text)
        else:
            raise InputError(f"{text!r}: name the input it feeds, NAME=FILE.npy, with NAME one of {', '.join(names)}")
        if key in files:
            raise InputError(f"input {key!r} is given twice ({files[key]} and {path})")
        if path.is_dir():
            raise InputError(f"input file {path} is a directory, not a regular file — give a .npy file (numpy.save) instead")
        if path.suffix.lower() != ".npy":
            raise InputError(f"{path}: unsupported input type {path.suffix!r}; give a .npy array (numpy.save)")
        files[key] = path
    missing = [n for n in names if n not in files]
    if missing:
        raise InputError(f"no array for input {', '.join(repr(m) for m in missing)} — pass --input NAME=FILE.npy for each of {', '.join(names)}")
    return files


def read_feeds(
    io_inputs: Sequence[dict[str, Any]],
    specs: Sequence[str | os.PathLike[str]],
    *,
    dtypes: dict[str, Any] | None = None,
    masking: Iterable[dict[str, Any]] = (),
) -> dict[str, np.ndarray]:
    """One .npy per input spec (`NAME=FILE.npy`, or `FILE.npy` for one input) → {name: array (B, …)} of the graph's dtypes.

    Every input must hold the same batch size; masked inputs must be post-padded.
    """
    names = [s["name"] for s in io_inputs]
    files = parse_input_specs(specs, names=names)
    feeds = {}
    for spec in io_inputs:
        path = files[spec["name"]]
        dtype = (dtypes or {}).get(spec["name"], spec.get("dtype", "float32"))
        feeds[spec["name"]] = convert_array(read_npy(path), spec=spec, dtype=dtype, where=str(path))
    batches = {name: x.shape[0] for name, x in feeds.items()}
    if len(set(batches.values())) > 1:
        raise InputError(f"the inputs hold different batch sizes {batches}; give every input the same number of examples")
    for m in masking:
        if m["input"] in feeds:
            check_post_padded(feeds[m["input"]], kind=m["kind"], value=m.get("value", 0.0), where=str(files[m["input"]]))
    return feeds


# ---------------------------------------------------------------------------------------------
# JSON rows (stream from stdin): one time step per line


def json_rows(lines: Iterable[str], *, names: Sequence[str], max_bytes: int = MAX_JSON_LINE_BYTES) -> Iterator[dict[str, np.ndarray]]:
    """Lines of JSON → {input name: array} per line: an array for a one-input model, else {"NAME": array, …}.

    A text stream (stdin) is read with a bounded readline, so one endless line cannot exhaust memory.
    """
    if hasattr(lines, "readline"):
        text = lines
        lines = iter(lambda: text.readline(max_bytes + 1), "")
    for number, line in enumerate(lines, start=1):
        if len(line) > max_bytes:
            raise InputError(f"stdin line {number} is longer than {max_bytes // 1024} KiB — one line is one time step")
        if not line.strip():
            continue
        row = parse_json(line, where=f"stdin line {number}", error=InputError, hint="give one JSON array per line")
        if not isinstance(row, dict):
            if len(names) != 1:
                raise InputError(f"stdin line {number}: the model has inputs {', '.join(names)}; give {{\"NAME\": array, …}} per line")
            row = {names[0]: row}
        unknown = sorted(set(row) - set(names))
        if unknown or len(row) != len(names):
            raise InputError(f"stdin line {number} has inputs {sorted(row)}; the model takes {', '.join(names)}")
        arrays = {}
        for name, value in row.items():
            try:
                arrays[name] = np.asarray(value)
            except ValueError as exc:
                raise InputError(f"stdin line {number} (input {name!r}) is not a rectangular array of numbers") from exc
            if arrays[name].dtype.kind not in "biuf":
                raise InputError(f"stdin line {number} (input {name!r}) is not a rectangular array of numbers")
        yield arrays
