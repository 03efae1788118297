"""A user's labelled data for every verdict: one `.npz` (np.savez) or a folder of `.npy` files.

Device path: numpy only. Layout: one array per model input, named as the manifest's input (a one-input model
may call it `x`), and one target array per scored output, named after the output (`y` where the model has one
output). Rows are examples. Nothing is unpickled.

Bounded: an `.npy` in a folder and an uncompressed `.npz` member (np.savez) are memory-mapped after their
headers are checked against the file, so memory stays flat in the data's size; a compressed member
(np.savez_compressed) must be decompressed whole and is refused past MAX_COMPRESSED_MEMBER_BYTES (all of them
together past MAX_INFLATED_BYTES), by the sizes the zip declares, before a byte of it is inflated; a data path that
is a FIFO or a device is refused by what it is (edge_rnn/device/bounded.py reads every file). Every array is checked against the manifest's io before any model runs — shape, dtype
kind, equal row counts, ids inside the vocabulary, finite values, post-padding where the model masks — in
chunks of CHECK_ROWS rows, with one-line errors naming the array (and row) and what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import DataError, InputError
from .bounded import MAX_ARRAY_BYTES, MAX_ARRAYS_BYTES, MAX_NPZ_MEMBERS, npy_mapped, read_npz
from .inputs import _check_numeric, check_post_padded, convert_array

# A compressed .npz member is inflated whole: refuse it past this (its declared size, read from the zip).
MAX_COMPRESSED_MEMBER_BYTES = MAX_ARRAY_BYTES
# Every compressed member of one data set, inflated together.
MAX_INFLATED_BYTES = MAX_ARRAYS_BYTES
# At most this many arrays in one data set (a model's inputs plus its outputs' targets).
MAX_ARRAYS = MAX_NPZ_MEMBERS
# Rows read per chunk when checking the data and when feeding it.
CHECK_ROWS = 4096
SINGLE_INPUT_ALIAS = "x"
SINGLE_TARGET_ALIAS = "y"


@dataclass
class Dataset:
    """Arrays ready to feed: `inputs` by model input name, `targets` by output name, each (count, …), possibly
    memory-mapped. `batches` converts them to the graph's dtypes chunk by chunk."""

    source: str
    inputs: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    count: int
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    dtypes: dict[str, Any] = field(default_factory=dict)
    masking: list[dict[str, Any]] = field(default_factory=list)
    # The model outputs targets may score, by name (name, dtype, shape), for checks against the metric.
    output_specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Applied to each input's raw rows before conversion (an image model scales uint8 pixels as `infer` does).
    transform: Callable[[str, np.ndarray], np.ndarray] | None = None

    def rows(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Rows [start, stop): inputs converted to the graph's dtypes, targets as stored."""
        raw = {name: np.asarray(x[start:stop]) for name, x in self.inputs.items()}
        if self.transform is not None:
            raw = {name: self.transform(name, x) for name, x in raw.items()}
        feeds = {name: convert_array(x, spec=self.specs[name], dtype=self.dtypes.get(name, self.specs[name]["dtype"]),
                                     where=f"{self.source}: {name}", batched=True)
                 for name, x in raw.items()}
        return feeds, {name: np.asarray(y[start:stop]) for name, y in self.targets.items()}

    def batches(self, size: int) -> Iterator[tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """(first row, feeds, targets) per chunk of `size` rows."""
        for start in range(0, self.count, size):
            yield (start, *self.rows(start, min(start + size, self.count)))

    def valid_steps(self, feeds: dict[str, np.ndarray]) -> np.ndarray | None:
        """(N, T) True at the real (unmasked) steps of a masked model's input, None for an unmasked model."""
        from .inputs import MASKS

        for m in self.masking:
            if m["input"] in feeds:
                return MASKS[m["kind"]](feeds[m["input"]], m.get("value", 0.0))
        return None


_HINT = "save the data with np.savez(FILE, name=array, …) or as a folder of .npy files"


def _read_folder(path: Path) -> dict[str, np.ndarray]:
    files = sorted(p for p in path.iterdir() if p.suffix == ".npy")
    if not files:
        raise DataError(f"{path} holds no .npy files — save one array per model input and output there with numpy.save")
    if len(files) > MAX_ARRAYS:
        raise DataError(f"{path} holds {len(files)} .npy files, more than {MAX_ARRAYS} — one per model input and output")
    return {file.stem: npy_mapped(file, what=".npy file", error=DataError, hint="give .npy files saved with numpy.save") for file in files}


def read_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The named arrays of `path` (an .npz or a folder of .npy), memory-mapped where stored uncompressed."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"no data at {path} — give an .npz saved with np.savez, or a folder of .npy files")
    if path.is_dir():
        return _read_folder(path)
    if path.suffix.lower() == ".npy":
        raise DataError(f"{path} is one .npy array; --data takes an .npz (np.savez(FILE, x=inputs, y=targets)) or a folder of .npy files")
    # Uncompressed members are memory-mapped (flat memory in the data's size); compressed ones (np.savez_compressed)
    # are inflated whole, so they count against the caps.
    return read_npz(path, where=str(path), what="data file", error=DataError, hint=_HINT, mmap=True, flat_names=True, max_members=MAX_ARRAYS,
                    max_array_bytes=MAX_COMPRESSED_MEMBER_BYTES, max_total_bytes=MAX_INFLATED_BYTES)


def _target_shape_ok(target: np.ndarray, spec: dict[str, Any]) -> bool:
    """A target matches its output's shape, or is class ids for it (one axis fewer)."""
    shape = spec.get("shape", [])
    for candidate in (shape, shape[:-1]):
        if target.ndim == len(candidate) and all(not isinstance(d, int) or a == 0 or t == d for a, (t, d) in enumerate(zip(target.shape, candidate))):
            return True
    # A single-unit output (N, 1) may take a flat target (N,).
    return bool(shape) and shape[-1] == 1 and target.ndim == len(shape) - 1


def _check_class_ids(target: np.ndarray, spec: dict[str, Any], *, where: str, start: int) -> None:
    """Class-id targets (one axis fewer than a classifier's output of C > 1 scores) are whole numbers in [0, C)."""
    shape = spec.get("shape", [])
    classes = shape[-1] if shape else None
    if not (isinstance(classes, int) and classes > 1 and target.ndim == len(shape) - 1):
        return
    bad = (target < 0) | (target >= classes) | (target != np.round(target))
    if bad.any():
        row = start + int(np.argmax(bad.reshape(len(target), -1).any(axis=1)))
        value = target.reshape(len(target), -1)[row - start][bad.reshape(len(target), -1)[row - start]][0]
        raise DataError(f"{where} holds class {value:g} at row {row}; the output scores classes 0–{classes - 1} — fix the labels")


def open_dataset(
    path: str | os.PathLike[str],
    *,
    inputs: Sequence[dict[str, Any]],
    outputs: Sequence[dict[str, Any]],
    dtypes: dict[str, Any] | None = None,
    masking: Sequence[dict[str, Any]] = (),
    need_targets: bool = False,
    max_rows: int | None = None,
    transform: Callable[[str, np.ndarray], np.ndarray] | None = None,
) -> Dataset:
    """Read and check `path` against a model's io: `inputs` (the graph's data inputs, no state) and `outputs`
    (the ones a target may score). Raises DataError/InputError naming the array before any model runs."""
    source = str(path)
    arrays = read_arrays(path)
    input_names = [s["name"] for s in inputs]
    output_names = [s["name"] for s in outputs]
    if len(inputs) == 1 and SINGLE_INPUT_ALIAS in arrays and input_names[0] not in arrays:
        arrays[input_names[0]] = arrays.pop(SINGLE_INPUT_ALIAS)
    if len(outputs) >= 1 and SINGLE_TARGET_ALIAS in arrays and output_names[0] not in arrays and SINGLE_TARGET_ALIAS not in input_names:
        if len(outputs) > 1:
            raise DataError(f"{source}: 'y' is ambiguous — the model has outputs {', '.join(output_names)}; name each target after its output")
        arrays[output_names[0]] = arrays.pop(SINGLE_TARGET_ALIAS)
    unknown = sorted(set(arrays) - set(input_names) - set(output_names))
    if unknown:
        alias = " (or x)" if len(inputs) == 1 else ""
        talias = " (or y)" if len(outputs) == 1 else ""
        raise DataError(f"{source} holds {', '.join(repr(u) for u in unknown)}, which is neither an input ({', '.join(input_names)}{alias}) "
                        f"nor an output ({', '.join(output_names)}{talias}) of the model — rename the array")
    missing = [n for n in input_names if n not in arrays]
    if missing:
        alias = " (or 'x')" if len(inputs) == 1 else ""
        raise DataError(f"{source} has no array for input {', '.join(repr(m) for m in missing)}{alias} — it holds {', '.join(sorted(arrays)) or 'nothing'}")
    targets = {n: arrays[n] for n in output_names if n in arrays}
    if need_targets and not targets:
        alias = " (or 'y')" if len(outputs) == 1 else ""
        raise DataError(f"{source} has no targets — add an array named after the output {', '.join(repr(n) for n in output_names)}{alias} "
                        "holding the true answers")
    counts = {name: (a.shape[0] if a.ndim else 0) for name, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"{source}: the arrays hold different numbers of rows {counts} — every array needs one row per example")
    count = next(iter(counts.values()))
    if count == 0:
        raise DataError(f"{source} holds no examples (0 rows) — give at least one")
    if max_rows is not None:
        count = min(count, max_rows)
    specs = {s["name"]: s for s in inputs}
    by_output = {s["name"]: s for s in outputs}
    for name, target in targets.items():
        _check_numeric(target.dtype, where=f"{source}: {name}")
        if not _target_shape_ok(target, by_output[name]):
            shape = by_output[name].get("shape", [])
            raise DataError(f"{source}: target {name!r} has shape {target.shape}; the output is {tuple(shape)} — give one target per "
                            "output value, or class ids (one axis fewer) for a classifier")
    # A free time axis of a target (a sequence output) must be as long as the inputs' time axis.
    steps = {arrays[s["name"]].shape[1] for s in inputs if len(s.get("shape", [])) > 1 and isinstance(s["shape"][1], str)
             and arrays[s["name"]].ndim > 1}
    for name, target in targets.items():
        shape = by_output[name].get("shape", [])
        if len(shape) > 2 and isinstance(shape[1], str) and target.ndim > 1 and steps and target.shape[1] not in steps:
            raise DataError(f"{source}: target {name!r} has {target.shape[1]} time steps, the inputs {sorted(steps)[0]} — "
                            "give one target per input step")
    data = Dataset(source, {n: arrays[n] for n in input_names}, targets, count, specs=specs, dtypes=dict(dtypes or {}),
                   masking=[m for m in masking if m.get("input") in specs], output_specs=by_output, transform=transform)
    # Every row checked before any work: converted chunk by chunk (ids, finiteness, shape) and targets finite.
    for start in range(0, count, CHECK_ROWS):
        stop = min(start + CHECK_ROWS, count)
        try:
            feeds, tgts = data.rows(start, stop)
        except InputError as exc:
            raise DataError(f"{exc} (rows {start}–{stop - 1}) — fix the data") from None
        for m in data.masking:
            check_post_padded(feeds[m["input"]], kind=m["kind"], value=m.get("value", 0.0), where=f"{source}: {m['input']} (from row {start})")
        for name, t in tgts.items():
            if t.dtype.kind == "f" and not np.all(np.isfinite(t)):
                row = start + int(np.argmax(~np.isfinite(t).reshape(len(t), -1).all(axis=1)))
                raise DataError(f"{source}: target {name!r} holds NaN or Inf at row {row} — drop the row or fill in the true value")
            _check_class_ids(t, by_output[name], where=f"{source}: target {name!r}", start=start)
    return data
