"""The two manifests' schemas — a model folder's `manifest.json` and a bundle's — checked once, when a manifest is
read, before any field is used.

Device path: the standard library only.

A schema is a tree of small nodes (`Str`, `Int`, `Num`, `Bool`, `Maybe`, `ListOf`, `Tuple`, `MapOf`, `Obj`, `AnyOf`)
built from what edge-rnn reads (and writes: everything train, export, quantize and bundle write passes). It checks
types, ranges and lengths; an object's unknown keys are allowed (a newer edge-rnn may add some), but a known key of
the wrong type is refused, and so is an untyped block that is not an object. `validate` raises ModelFileError on the
first field that is wrong, in one line naming its path::

    DIR/manifest.json: io.inputs[0].shape must be a list (≤ 8 items), got "batch" — re-export the model (edge-rnn export)

Semantic checks (a file's path stays in its folder, labels match the model's outputs, …) stay where the fields are
used (manifest.py, bundle.py, session.py); this module only makes sure those checks, and every reader after them,
meet the types they expect.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelFileError

# Bounds of what a manifest may hold (a manifest is at most MAX_MANIFEST_BYTES anyway; these keep each field sane).
MAX_TEXT_CHARS = 4096  # any string: names, paths, notes
MAX_NAME_CHARS = 256  # a dtype, a symbolic dimension, a version
MAX_ROLES = 64  # model files of a folder or bundle (a bundle holds at most MAX_MEMBERS members)
MAX_TENSORS = 1024  # inputs, outputs or state tensors of one model
MAX_RANK = 8  # a tensor's dimensions
MAX_ITEMS = 1_000_000  # labels, vocabulary, a start state, reference rows, an audit's op list
MAX_IMAGE_SIDE = 1 << 16
MAX_HIDDEN = 1 << 20
# numpy dtypes a tensor spec may name (np.dtype() of anything else is not a tensor edge-rnn can feed).
DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool")
FOLDER_HINT = "re-export the model (edge-rnn export), or train it again"
BUNDLE_HINT = "refusing the bundle; make it again with `edge-rnn bundle`"
# How much of a wrong value an error shows.
_SHOWN_CHARS = 40
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}")


class _Invalid(Exception):
    def __init__(self, path: str, what: str, value: Any, missing: bool = False) -> None:
        super().__init__(path)
        self.path, self.what, self.value, self.missing = path, what, value, missing


def _key(path: str, key: str) -> str:
    if _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key
    cut = key if len(key) <= 64 else key[:63] + "…"
    return f"{path}[{json.dumps(cut)}]"  # JSON-escaped: a key from a file may hold control characters


def _got(value: Any) -> str:
    """A wrong value as an error shows it: short, on one line, control characters escaped."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else json.dumps(value)  # NaN, Infinity: as the file spells them
    if isinstance(value, str):
        if len(value) <= _SHOWN_CHARS:
            return json.dumps(value)
        return f"{json.dumps(value[: _SHOWN_CHARS - 1])[:-1]}…\" ({len(value):,} characters)"
    if isinstance(value, list):
        return f"a list of {len(value):,} item{'s' * (len(value) != 1)}"
    if isinstance(value, dict):
        return f"an object of {len(value):,} {'entry' if len(value) == 1 else 'entries'}"
    return type(value).__name__


def _range(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f" from {low:,} to {high:,}"
    if low is not None:
        return f" ≥ {low:,}"
    return f" ≤ {high:,}" if high is not None else ""


class Node:
    """A schema node: `what` a value must be, and `check(value, path)`, which raises _Invalid."""

    what = "a value"

    def check(self, value: Any, path: str) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Str(Node):
    max_len: int = MAX_TEXT_CHARS
    min_len: int = 0
    pattern: str | None = None  # a regular expression the whole string must match
    choices: tuple[str, ...] = ()
    describe: str = ""  # what to call it instead of "a string …"

    @property
    def what(self) -> str:  # type: ignore[override]
        if self.describe:
            return self.describe
        if self.choices:
            return "one of " + ", ".join(json.dumps(c) for c in self.choices)
        if self.min_len == self.max_len:
            return f"a string of {self.max_len} character{'s' * (self.max_len != 1)}"
        return f"{'a non-empty' if self.min_len else 'a'} string (≤ {self.max_len:,} characters)"

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, str) or not self.min_len <= len(value) <= self.max_len \
                or (self.pattern is not None and not re.fullmatch(self.pattern, value)) \
                or (self.choices and value not in self.choices):
            raise _Invalid(path, self.what, value)


@dataclass(frozen=True)
class Int(Node):
    min: int | None = None
    max: int | None = None

    @property
    def what(self) -> str:  # type: ignore[override]
        return "an integer" + _range(self.min, self.max)

    def check(self, value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or (self.min is not None and value < self.min) \
                or (self.max is not None and value > self.max):
            raise _Invalid(path, self.what, value)


@dataclass(frozen=True)
class Num(Node):
    """A finite number (an integer or a float; JSON's NaN and Infinity, which Python reads, are refused)."""

    min: float | None = None
    max: float | None = None

    @property
    def what(self) -> str:  # type: ignore[override]
        return "a number" + _range(self.min, self.max)

    def check(self, value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise _Invalid(path, self.what, value)


@dataclass(frozen=True)
class Bool(Node):
    what = "true or false"

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, bool):
            raise _Invalid(path, self.what, value)


@dataclass(frozen=True)
class Maybe(Node):
    node: Node

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"{self.node.what} or null"

    def check(self, value: Any, path: str) -> None:
        if value is not None:
            try:
                self.node.check(value, path)
            except _Invalid as exc:
                if exc.path == path:  # this value itself, not one inside it: say null was allowed too
                    raise _Invalid(path, self.what, value) from None
                raise


@dataclass(frozen=True)
class AnyOf(Node):
    nodes: tuple[Node, ...]
    describe: str

    @property
    def what(self) -> str:  # type: ignore[override]
        return self.describe

    def check(self, value: Any, path: str) -> None:
        for node in self.nodes:
            try:
                node.check(value, path)
                return
            except _Invalid:
                continue
        raise _Invalid(path, self.what, value)


@dataclass(frozen=True)
class ListOf(Node):
    item: Node
    max_len: int

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"a list (≤ {self.max_len:,} items)"

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, list) or len(value) > self.max_len:
            raise _Invalid(path, self.what, value)
        for i, item in enumerate(value):
            self.item.check(item, f"{path}[{i}]")


@dataclass(frozen=True)
class Tuple(Node):
    """A list of exactly len(items) values, each its own schema."""

    items: tuple[Node, ...]

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"a list of {len(self.items)} items"

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, list) or len(value) != len(self.items):
            raise _Invalid(path, self.what, value)
        for i, (node, item) in enumerate(zip(self.items, value)):
            node.check(item, f"{path}[{i}]")


@dataclass(frozen=True)
class MapOf(Node):
    """An object of any keys (names: roles, outputs, inputs) whose values share one schema."""

    value: Node
    max_len: int
    max_key: int = MAX_TEXT_CHARS

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"an object (≤ {self.max_len:,} entries)"

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, dict) or len(value) > self.max_len:
            raise _Invalid(path, self.what, value)
        for key, item in value.items():
            if len(key) > self.max_key:
                raise _Invalid(_key(path, key), f"named in ≤ {self.max_key:,} characters", key)
            self.value.check(item, _key(path, key))


@dataclass(frozen=True)
class Obj(Node):
    """An object with known keys (each optional unless in `required`); other keys pass unchecked."""

    fields: dict[str, Node] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    what = "an object"

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(path, self.what, value)
        for key in self.required:
            if key not in value:
                raise _Invalid(_key(path, key), self.fields[key].what, None, missing=True)
        for key, node in self.fields.items():
            if key in value:
                node.check(value[key], _key(path, key))


def validate(manifest: Any, schema: Node, *, where: object, hint: str) -> None:
    """Raise ModelFileError, one line naming `where` and the field's path, if `manifest` does not meet `schema`."""
    try:
        schema.check(manifest, "")
    except _Invalid as exc:
        name = exc.path or "the manifest"
        if exc.missing:
            raise ModelFileError(f"{where}: {name} is missing; it must be {exc.what} — {hint}") from None
        raise ModelFileError(f"{where}: {name} must be {exc.what}, got {_got(exc.value)} — {hint}") from None


# ---------------------------------------------------------------------------------------------
# The schemas


TEXT = Str()
NAME = Str(min_len=1)
SHORT = Str(max_len=MAX_NAME_CHARS)
OBJECT = Obj()  # a block whose contents edge-rnn only shows or merges: it must be an object
DIM = Maybe(AnyOf((Int(min=0), SHORT), "an integer ≥ 0 or a name (≤ 256 characters)"))  # null or a name: a free axis
SHAPE = ListOf(DIM, MAX_RANK)
TENSOR = Obj({"name": NAME, "dtype": Str(choices=DTYPES), "shape": SHAPE, "meaning": TEXT, "vocab": Int(min=1)},
             required=("name",))
TENSORS = ListOf(TENSOR, MAX_TENSORS)
STATE = Obj({"layer": TEXT, "name": NAME, "input": NAME, "output": NAME, "dtype": Str(choices=DTYPES),
             "shape": Tuple((DIM, Int(min=1))), "meaning": TEXT},
            required=("layer", "name", "input", "output", "shape"))
FILE_ENTRY = Obj({"path": NAME, "sha256": Str(pattern="[0-9a-f]{64}", describe="a sha256 (64 lowercase hex digits)"),
                  "bytes": Int(min=0)}, required=("path", "sha256", "bytes"))
ROLE_NAMES = ListOf(NAME, MAX_ROLES)

# Everything edge-rnn reads from a model folder's manifest (see manifest.py's docstring for the layout).
FOLDER_FIELDS: dict[str, Node] = {
    "schema": Int(min=0),
    "model": NAME,
    "adapter": TEXT,
    "task": TEXT,
    "source": Obj({"file": TEXT, "sha256": TEXT}),
    "files": MapOf(FILE_ENTRY, MAX_ROLES),
    "io": Obj({"inputs": TENSORS, "outputs": TENSORS}, required=("inputs", "outputs")),
    "step": Obj({"inputs": TENSORS, "outputs": TENSORS, "state": ListOf(STATE, MAX_TENSORS)},
                required=("inputs", "outputs", "state")),
    "step_refused": TEXT,
    "labels": Maybe(ListOf(TEXT, MAX_ITEMS)),
    "vocab": ListOf(Str(min_len=1, max_len=1), MAX_ITEMS),
    "preprocessing": Maybe(Obj({
        "image": Obj({"height": Int(min=1, max=MAX_IMAGE_SIDE), "width": Int(min=1, max=MAX_IMAGE_SIDE), "mode": SHORT,
                      "invert": Bool()}),
        "scale": Num(), "offset": Num(), "input": TEXT, "output": TEXT, "dtype": SHORT, "shape": SHAPE,
    })),
    "masking": ListOf(Obj({"input": NAME, "kind": SHORT, "value": Num()}, required=("input", "kind")), MAX_TENSORS),
    "config": Obj({"hidden": Int(min=1, max=MAX_HIDDEN), "seq_length": Int(min=1)}),
    "generation": Obj({"h0": ListOf(Num(), MAX_HIDDEN), "why": TEXT}),
    "sample_inputs": MapOf(Obj({"kind": SHORT, "low": Int(), "high": Int(), "padding": Num(), "mean": Num(), "std": Num(min=0)},
                               required=("kind",)), MAX_TENSORS),
    "output_activations": MapOf(SHORT, MAX_TENSORS),
    "opset": Int(min=1, max=1000),
    "audit": ListOf(Obj({"layer": TEXT, "cls": TEXT, "onnx_ops": ListOf(TEXT, MAX_ITEMS), "fused": Bool(), "note": TEXT}), MAX_ITEMS),
    "graphs": MapOf(MapOf(Int(min=0), MAX_TEXT_CHARS), MAX_ROLES),
    "quantization": MapOf(Obj({"settings": OBJECT}), MAX_ROLES),
    "versions": MapOf(SHORT, MAX_TENSORS),
    "data": Obj({"name": TEXT, "source": TEXT, "val_fraction": Num(min=0, max=1)}),
    "metrics": OBJECT,
    "history": OBJECT,
    "training": OBJECT,
    "ort": OBJECT,
}
FOLDER_MANIFEST = Obj(FOLDER_FIELDS, required=("model",))

TOLERANCE = Obj({"atol": Num(min=0), "why": TEXT, "argmax_min": Maybe(Num(min=0, max=1)), "mean_atol": Maybe(Num(min=0))},
                required=("atol",))
# A bundle's manifest: the folder's fields (its `files` the bundled members) and the blocks bundle.py's docstring lists.
BUNDLE_MANIFEST = Obj({
    **FOLDER_FIELDS,
    "bundle": Obj({"format": Int(), "made_by": SHORT, "variants": ROLE_NAMES, "roles": ROLE_NAMES}, required=("format",)),
    "reference": Obj({
        "file": NAME, "source": SHORT, "count": Int(min=0), "inputs": ListOf(NAME, MAX_TENSORS), "outputs": ListOf(NAME, MAX_TENSORS),
        "tolerances": MapOf(MapOf(TOLERANCE, MAX_TENSORS), MAX_ROLES),
        "data": Obj({"file": TEXT, "rows": ListOf(Int(min=0), MAX_ITEMS), "stratified_by": Maybe(TEXT), "passed_over": Int(min=0)}),
    }, required=("file", "tolerances")),
    "data_metrics": Obj({
        "data": TEXT, "sha256": TEXT, "examples": Int(min=0), "batch": Int(min=1), "kinds": MapOf(SHORT, MAX_TENSORS),
        "roles": MapOf(Obj({"output": NAME, "metric": SHORT, "value": Num(), "low": Maybe(Num()), "high": Maybe(Num()),
                            "ok": Maybe(Bool())}, required=("output", "metric", "value")), MAX_ROLES),
    }, required=("data", "examples", "batch", "roles")),
}, required=("model", "files", "bundle", "reference"))
