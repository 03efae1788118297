"""Bundles: one `.tar.gz` holding what a device needs to run a model and prove it answers right.

Device path: imports the standard library, numpy, onnxruntime and this package's device modules only.
`edge_rnn/bundle.py` (workstation) writes bundles; this module opens, verifies and self-tests them.

Format 1 (`NAME.tar.gz`, stdlib tarfile, ustar, gzip; members in this order, mtime 0, mode 0644, owner 0):

- `manifest.json` (first): the model folder's manifest, made a *device* manifest — `files` holds only the
  bundled model roles (`onnx`, `onnx_int8`, `onnx_step`, … and `<role>_ort` with `--ort`) plus `reference`;
  workstation roles (`keras`, `checkpoint`) stay behind. Two blocks are added::

      "bundle": {"format": 1, "made_by": "0.x", "variants": ["int8", "step"], "roles": ["onnx_int8", "onnx_step"]},
      "reference": {"file": "reference.npz", "source": "keras" | "numpy", "count": 8,
                    "inputs": ["input"], "outputs": ["probs"],
                    "tolerances": {ROLE: {OUTPUT: {"atol": 1e-05, "why": "…", "argmax_min": 0.995 | null,
                                                   "mean_atol": 0.05 | null}}}}

  `atol` bounds max |Δ| over every input and element; `mean_atol` (a quantized classifier's probabilities) bounds
  the mean over the inputs of each input's max |Δ|; `argmax_min` the top-1 agreement on the inputs the source is
  sure of. A bound that is null or absent (bundles made before it existed) is not checked.

  With `edge-rnn bundle --data FILE` (labelled data), the reference inputs are rows of FILE and the reference
  block says which (`"data": {"file": "test.npz", "rows": [0, 3, …], "stratified_by": "probs" | null}`), and a
  third block records every bundled model's metric on the whole of FILE at the device's batch::

      "data_metrics": {"data": "test.npz", "sha256": "…", "examples": 1000, "batch": 1, "kinds": {"probs": "softmax"},
                       "roles": {ROLE: {"output": "probs", "metric": "accuracy", "value": 0.91, "low": 0.89,
                                        "high": 0.93, "ok": true | false | null}}}

  (`low`/`high`: the 95% interval, null where none is defined; `ok`: the role's promise on that data, null for
  the fp32 baseline.) `verify` checks the block's shape and prints it.

- the model files, flat names as in the folder (`model.int8.onnx`, `model.step.onnx`, …);
- `reference.npz`: `input/<name>` (N, …) real inputs and `output/<name>` the source model's (Keras or NumPy)
  outputs for them; listed in `files` under role `reference` with its sha256 like every model file;
- with `--ort`: `<model>.ort` (role `<role>_ort`) and its `<model>.required_operators.config`
  (role `<role>_ort_config`).

Reading refuses, with one line naming the member: `..` or absolute names, links, device files, fifos,
directories, duplicates, members missing from or not listed in the manifest, a header size or sha256 that
differs from the manifest, more than MAX_MEMBERS members, and content over MAX_TOTAL_BYTES — checked from the
manifest and the headers before a member is read, and enforced on the decompressed stream while reading (a
gzip bomb whose headers lie stops at the limit the manifest implies). Members are read into memory; nothing
is written to disk.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..errors import InputError, ModelFileError
from .bounded import open_regular, parse_json, read_npz
from .manifest import BUNDLE_SUFFIX, MANIFEST_NAME, MAX_MANIFEST_BYTES, SCHEMA_VERSION
from .schema import BUNDLE_HINT, BUNDLE_MANIFEST, validate

BUNDLE_FORMAT = 1
REFERENCE_NAME = "reference.npz"
REFERENCE_ROLE = "reference"
DATA_METRICS = "data_metrics"
# Caps a device enforces before trusting an archive: the largest model edge-rnn makes is ~1 MB, a bundle
# of every variant with .ort forms holds ~15 members; these leave room for much larger user models.
MAX_COMPRESSED_BYTES = 512 * 1024 * 1024
MAX_TOTAL_BYTES = 512 * 1024 * 1024  # members' bytes once decompressed
MAX_MEMBERS = 64
# Variant names (the CLI's --variant) → the manifest role of the file that variant bundles.
VARIANT_ROLES: dict[str, str] = {
    "fp32": "onnx",
    "int8": "onnx_int8",
    "int8-static": "onnx_int8_static",
    "fp16": "onnx_fp16",
    "step": "onnx_step",
    "step-int8": "onnx_step_int8",
}
# Roles run as the source model's float32 export; every other model role is a quantized (int8/fp16) form.
FP32_ROLES = ("onnx", "onnx_step")
ORT_SUFFIX = "_ort"
MODEL_SUFFIXES = (".onnx", ".ort")
_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile reads and pads in records of 20 blocks


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """Whether MODEL names a bundle (by its suffix) rather than a model file."""
    return str(path).endswith(BUNDLE_SUFFIX)


@dataclass
class Bundle:
    """A bundle read into memory: its device manifest and every member's bytes, all verified on opening."""

    path: Path
    manifest: dict[str, Any]
    members: dict[str, bytes] = field(default_factory=dict)

    @property
    def roles(self) -> list[str]:
        """The model roles, in the order the bundle lists them (its variants first)."""
        listed = [r for r, e in self.manifest["files"].items() if e["path"].endswith(MODEL_SUFFIXES)]
        first = [r for r in self.manifest.get("bundle", {}).get("roles", []) if r in listed]
        return first + [r for r in listed if r not in first]

    def data(self, role: str) -> bytes:
        entry = self.manifest["files"].get(role)
        if not isinstance(entry, dict) or entry.get("path") not in self.members:
            raise InputError(f"{self.path} holds no {role!r} file — choose one of {self.roles}")
        return self.members[entry["path"]]

    def reference(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The reference vectors: ({input: (N, …)}, {output: (N, …)}) as the source model answered."""
        # Its members' declared sizes and .npy headers are checked before an array is inflated (bounded.read_npz).
        arrays = read_npz(self.data(REFERENCE_ROLE), where=f"{self.path}: member {REFERENCE_NAME}", error=ModelFileError,
                          hint="make the bundle again with `edge-rnn bundle`")
        split = lambda kind: {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{kind}/")}  # noqa: E731
        return split("input"), split("output")


class _CappedReader(io.RawIOBase):
    """A read-only stream that refuses to hand out more than `limit` bytes (the limit may shrink later)."""

    def __init__(self, raw: Any, *, limit: int, where: Path) -> None:
        self.raw, self.limit, self.count, self.where, self.member = raw, limit, 0, where, MANIFEST_NAME

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or self.count + size > self.limit:
            # Ask for no more than the limit allows, then fail if the stream holds more than that.
            size = self.limit - self.count + 1
        data = self.raw.read(size)
        self.count += len(data)
        if self.count > self.limit:
            raise ModelFileError(
                f"{self.where}: the archive unpacks to more than {self.limit:,} bytes, more than its manifest lists, "
                f"in or after member {self.member!r} — a damaged or hostile archive (gzip bomb?); refusing it"
            )
        return data


def _refuse(path: Path, member: str, what: str) -> ModelFileError:
    return ModelFileError(f"{path}: member {member!r} {what} — refusing the bundle; make it again with `edge-rnn bundle`")


def _check_header(path: Path, info: tarfile.TarInfo, seen: set[str]) -> None:
    """Refuse a member by its header alone: unsafe name, not a plain file, duplicate."""
    name = info.name
    parts = PurePosixPath(name).parts
    if name.startswith("/") or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise _refuse(path, name, "has an absolute path")
    if ".." in parts or "\\" in name:
        raise _refuse(path, name, "has a path leaving the bundle ('..')")
    if info.issym() or info.islnk():
        raise _refuse(path, name, f"is a {'symbolic' if info.issym() else 'hard'} link (to {info.linkname!r})")
    if info.ischr() or info.isblk() or info.isfifo():
        raise _refuse(path, name, "is a device file or fifo")
    if info.isdir():
        raise _refuse(path, name, "is a directory; a bundle holds files at its root only")
    if not info.isreg():
        raise _refuse(path, name, f"has tar type {info.type!r}, not a plain file")
    if len(parts) != 1:
        raise _refuse(path, name, "is inside a folder; a bundle holds files at its root only")
    if name in seen:
        raise _refuse(path, name, "appears twice")


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, *, path: Path) -> bytes:
    f = tar.extractfile(info)
    data = f.read(info.size) if f is not None else b""
    if len(data) != info.size:
        raise _refuse(path, info.name, f"is truncated ({len(data)} of the {info.size} bytes its header declares)")
    return data


def _parse_manifest(path: Path, data: bytes) -> dict[str, Any]:
    manifest = parse_json(data, where=f"{path}: member {MANIFEST_NAME}", error=ModelFileError, hint="rebuild the bundle with edge-rnn bundle")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    block = manifest.get("bundle") if isinstance(manifest, dict) else None
    if not isinstance(block, dict) or not isinstance(files, dict):
        raise _refuse(path, MANIFEST_NAME, "has no 'bundle' or 'files' block: not an edge-rnn bundle manifest")
    if block.get("format") != BUNDLE_FORMAT or manifest.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise _refuse(path, MANIFEST_NAME, f"is bundle format {block.get('format')!r}; this edge-rnn reads format {BUNDLE_FORMAT} — upgrade edge-rnn")
    # Every field's type, range and length (schema.BUNDLE_MANIFEST), before any is used.
    validate(manifest, BUNDLE_MANIFEST, where=f"{path}: member {MANIFEST_NAME!r}", hint=BUNDLE_HINT)
    paths = []
    for role, entry in files.items():
        ok = isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("sha256"), str) \
            and isinstance(entry.get("bytes"), int) and entry["bytes"] >= 0
        if not ok or entry["path"] in (MANIFEST_NAME, "") or len(PurePosixPath(entry["path"]).parts) != 1 or ".." in entry["path"]:
            raise _refuse(path, MANIFEST_NAME, f"lists an invalid file for role {role!r}")
        paths.append(entry["path"])
    if len(set(paths)) != len(paths):
        raise _refuse(path, MANIFEST_NAME, "lists one file under two roles")
    if REFERENCE_ROLE not in files:
        raise _refuse(path, MANIFEST_NAME, f"lists no {REFERENCE_NAME} (role {REFERENCE_ROLE!r})")
    total = sum(e["bytes"] for e in files.values())
    if total > MAX_TOTAL_BYTES or len(files) + 1 > MAX_MEMBERS:
        raise _refuse(path, MANIFEST_NAME, f"lists {len(files)} files of {total:,} bytes, over the caps "
                                           f"({MAX_MEMBERS} members, {MAX_TOTAL_BYTES:,} bytes)")
    return manifest


def not_a_bundle(path: Path) -> str | None:
    """What a user gives where a bundle is wanted before one exists (a model folder, a Keras or model file, another
    file), with the commands that make one; None for a name ending in .tar.gz."""
    if is_bundle(path) and not path.is_dir():
        return None
    what = f"{path} is not a bundle (a .tar.gz made by edge-rnn bundle)"
    keras = path.suffix.lower() in (".keras", ".h5", ".hdf5")
    if path.is_dir():
        folder = path
    elif keras:
        folder = path.parent / path.stem
    elif path.suffix.lower() in (".onnx", ".ort") or (path.parent / MANIFEST_NAME).exists():
        folder = path.parent
    else:
        return f"{what} — give a bundle, or make one from a model folder: edge-rnn bundle DIR -o NAME.tar.gz"
    first = f"edge-rnn export {path}, then " if keras else ""
    return f"{what} — make one: {first}edge-rnn bundle {folder} -o {folder.name or 'model'}.tar.gz, then verify that file"


def open_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read a bundle into memory, refusing anything unsafe or not as its manifest lists (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"no bundle {path} — make one with `edge-rnn bundle DIR`")
    # Until the manifest is read, the stream may hold little more than it.
    limit = MAX_MANIFEST_BYTES + 4 * _RECORD
    with open_regular(path, what="bundle", max_bytes=MAX_COMPRESSED_BYTES, error=ModelFileError,
                      hint="make one with `edge-rnn bundle DIR`", size_hint="not a bundle edge-rnn made") as raw:
        capped = _CappedReader(gzip.GzipFile(fileobj=raw, mode="rb"), limit=limit, where=path)
        try:
            return _read_tar(path, capped)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelFileError(f"{path}: not a readable .tar.gz at member {capped.member!r} ({reason}) — copy it again") from exc


def _read_tar(path: Path, capped: _CappedReader) -> Bundle:
    manifest: dict[str, Any] | None = None
    listed: dict[str, dict[str, Any]] = {}
    members: dict[str, bytes] = {}
    seen: set[str] = set()
    count = 0
    with tarfile.open(fileobj=capped, mode="r|") as tar:
        for info in tar:
            count += 1
            capped.member = info.name
            if count > MAX_MEMBERS:
                raise _refuse(path, info.name, f"is one member too many (the cap is {MAX_MEMBERS})")
            _check_header(path, info, seen)
            seen.add(info.name)
            if manifest is None:
                if info.name != MANIFEST_NAME or info.size > MAX_MANIFEST_BYTES:
                    raise _refuse(path, info.name, f"comes first; a bundle starts with its {MANIFEST_NAME} (≤ {MAX_MANIFEST_BYTES:,} bytes)")
                manifest = _parse_manifest(path, _read_member(tar, info, path=path))
                listed = {e["path"]: e for e in manifest["files"].values()}
                # The stream may now hold the listed files, their headers and tar's padding, and nothing more.
                padded = sum(-(-e["bytes"] // _BLOCK) * _BLOCK for e in listed.values())
                capped.limit = capped.count + padded + _BLOCK * (len(listed) + 2) + 2 * _RECORD
                continue
            entry = listed.get(info.name)
            if entry is None:
                raise _refuse(path, info.name, "is not listed in the bundle's manifest")
            if info.size != entry["bytes"]:
                raise _refuse(path, info.name, f"declares {info.size:,} bytes; the manifest lists {entry['bytes']:,}")
            data = _read_member(tar, info, path=path)
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise _refuse(path, info.name, "does not match its sha256 in the manifest (changed or corrupted)")
            members[info.name] = data
    if manifest is None:
        raise ModelFileError(f"{path}: an empty archive, no {MANIFEST_NAME} — make the bundle again with `edge-rnn bundle`")
    for name in listed:
        if name not in members:
            raise _refuse(path, name, "is listed in the manifest but missing from the archive")
    return Bundle(path, manifest, members)


def verify(bundle: Bundle) -> list[str]:
    """Integrity of an opened bundle: every member's sha256 and size again, and the reference block; one line per member."""
    lines = []
    for role, entry in bundle.manifest["files"].items():
        data = bundle.members[entry["path"]]
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise _refuse(bundle.path, entry["path"], "does not match its sha256 in the manifest (changed or corrupted)")
        lines.append(f"{entry['path']} ({role}): {entry['bytes']:,} bytes, sha256 {entry['sha256'][:12]}… ok")
    ref = bundle.manifest.get("reference")
    if not (isinstance(ref, dict) and isinstance(ref.get("tolerances"), dict) and ref.get("file") == bundle.manifest["files"][REFERENCE_ROLE]["path"]):
        raise _refuse(bundle.path, MANIFEST_NAME, "has no valid 'reference' block (file, tolerances)")
    inputs, outputs = bundle.reference()
    if sorted(inputs) != sorted(ref.get("inputs", [])) or sorted(outputs) != sorted(ref.get("outputs", [])):
        raise _refuse(bundle.path, REFERENCE_NAME, "holds other arrays than the manifest's reference block names")
    for role in bundle.roles:
        if role.endswith("_config"):
            continue
        if role not in ref["tolerances"]:
            raise _refuse(bundle.path, MANIFEST_NAME, f"has no stored tolerance for role {role!r}")
    recorded_metrics(bundle)
    return lines


@dataclass
class RoleMetric:
    """One bundled model's headline metric on the data the bundle was made with, as recorded at bundling."""

    role: str
    output: str
    metric: str
    value: float
    low: float | None
    high: float | None
    ok: bool | None


@dataclass
class RecordedMetrics:
    """The `data_metrics` block: the data's file name and sha256, its size, the batch, and one entry per role."""

    data: str
    sha256: str
    examples: int
    batch: int
    roles: list[RoleMetric]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def recorded_metrics(bundle: Bundle) -> RecordedMetrics | None:
    """The metrics the bundle records on its maker's data (None for a bundle made without --data); a block of the
    wrong shape, or naming a role the bundle does not hold, refuses the bundle."""
    block = bundle.manifest.get(DATA_METRICS)
    if block is None:
        return None
    bad = _refuse(bundle.path, MANIFEST_NAME, f"has an invalid {DATA_METRICS!r} block")
    if not (isinstance(block, dict) and isinstance(block.get("data"), str) and isinstance(block.get("sha256", ""), str)
            and _number(block.get("examples")) and _number(block.get("batch")) and isinstance(block.get("roles"), dict)):
        raise bad
    roles = []
    for role, entry in block["roles"].items():
        if role not in bundle.roles:
            raise _refuse(bundle.path, MANIFEST_NAME, f"records a metric for role {role!r}, which the bundle does not hold")
        ok = isinstance(entry, dict) and isinstance(entry.get("output"), str) and isinstance(entry.get("metric"), str) \
            and _number(entry.get("value")) and all(entry.get(k) is None or _number(entry.get(k)) for k in ("low", "high")) \
            and entry.get("ok") in (True, False, None)
        if not ok:
            raise bad
        roles.append(RoleMetric(role, entry["output"], entry["metric"], float(entry["value"]), entry.get("low"), entry.get("high"), entry.get("ok")))
    return RecordedMetrics(block["data"], block.get("sha256", ""), int(block["examples"]), int(block["batch"]), roles)


# ---------------------------------------------------------------------------------------------
# Loading a bundled model, and the on-device self-test


def steppable_role(manifest: dict[str, Any], role: str) -> bool:
    """Whether the file of `role` runs one step at a time: a step form, or a sequence file that takes the state
    itself (the char RNN's model.onnx takes h0 and returns h)."""
    state = (manifest.get("step") or {}).get("state") or []
    io_inputs = {s.get("name") for s in (manifest.get("io") or {}).get("inputs", [])}
    return "_step" in role or bool(state) and all(s.get("input") in io_inputs for s in state)


def default_role(bundle: Bundle, *, step: bool = False) -> str:
    """The role `infer`/`generate` run without --role (the first bundled variant), or `stream`'s (the first step form)."""
    roles = [r for r in bundle.roles if not step or steppable_role(bundle.manifest, r)]
    if not roles:
        raise InputError(f"{bundle.path} holds no step model (it has {bundle.roles}) — bundle it with --variant step")
    return roles[0]
