"""The manifest: the single description of a model folder, plus sha256 and atomic writes.

Device path: imports the standard library only.

Layout of `DIR/manifest.json`::

    {"schema": 1, "model": "mnist-lstm", "task": "classify" | "generate",
     "data": {...}, "preprocessing": {...}, "io": {"inputs": [...], "outputs": [...]},
     "labels": [...] | "vocab": [...],
     "files": {ROLE: {"path": "model.onnx", "sha256": "...", "bytes": 123}},
     "opset": 17, "versions": {...}, "config": {...}, "metrics": {...}}

An `io` input an Embedding reads carries `"vocab": N` (ids must lie in 0…N−1; the device refuses others before
onnxruntime runs). `labels` name the first output's values as `output_activations` says (labels.py): one per
class (softmax), [negative, positive] for one sigmoid unit, or one per sigmoid unit (multi-label).

Every field's type, range and length is checked against schema.FOLDER_MANIFEST when the manifest is loaded.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from .. import __version__
from ..errors import EdgeRnnError, ModelFileError
from .bounded import not_regular, read_json_capped
from .schema import FOLDER_HINT, FOLDER_MANIFEST, validate

try:
    import fcntl
except ImportError:  # Windows: no flock; folder_lock does nothing there (see the README's "Concurrency")
    fcntl = None  # type: ignore[assignment]

MANIFEST_NAME = "manifest.json"
# A device bundle (device/bundle.py): one .tar.gz holding a device manifest and its members.
BUNDLE_SUFFIX = ".tar.gz"
SCHEMA_VERSION = 1
# Manifests are small; anything larger is not ours and is refused before parsing.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
# Held (flock) around every read-modify-write of a folder's manifest, so two processes never interleave them.
LOCK_NAME = ".edge-rnn.lock"
# atomic_path's temporary files: `.{stem}.{writer pid}.{random}.tmp{suffix}` beside the artifact. The pid lets the
# next writer in the folder tell a killed writer's leftovers (pid gone) from a live writer's (pid running).
_TMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp(\.[^.]*)?$")
# Errors that mean "this output cannot be written", turned into a one-line EdgeRnnError.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete atomic_path temp files in `folder` whose writer process is gone (killed mid-write); return them.

    Only names of our pattern are touched; a live writer's temp file (its pid running) is left alone.
    """
    swept = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = _TMP_NAME.match(entry.name)
            if match and entry.is_file(follow_symlinks=False) and not _pid_running(int(match["pid"])):
                with contextlib.suppress(FileNotFoundError):  # another sweeper got there first
                    os.unlink(entry.path)
                    swept.append(Path(entry.path))
    return swept


def _write_error(path: Path, exc: OSError) -> EdgeRnnError:
    hint = "free some space" if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else "choose another output folder"
    return EdgeRnnError(f"cannot write {path}: {exc.strerror or exc} — {hint}; the previous file is unchanged")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure delete it.

    A process that dies mid-write leaves the old file (or none), never a half-written one; its temporary file is
    swept by the next atomic write in the folder. Disk full, file-size limits and read-only folders raise EdgeRnnError.
    """
    path = Path(path)
    try:
        if path.parent.exists() and not path.parent.is_dir():
            raise EdgeRnnError(f"cannot write {path}: {path.parent} is a file, not a folder — choose another output folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_temp_files(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.{os.getpid()}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as exc:
        raise EdgeRnnError(f"cannot write {path}: {exc.strerror or exc} — choose another output folder") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            # mkstemp makes 0600 files; give the artifact the mode a plain open() would have.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
            os.replace(tmp_path, path)
        except OSError as exc:
            if exc.errno in _WRITE_ERRNOS:
                raise _write_error(path, exc) from exc
            raise
    finally:
        tmp_path.unlink(missing_ok=True)


# Per-process state of folder_lock: flock conflicts between two descriptors of one process, so nested use (in one
# thread) takes the flock once, and other threads of the process wait on the RLock.
_folder_rlocks: dict[Path, threading.RLock] = {}
_folder_depth: dict[Path, int] = {}
_folder_guard = threading.Lock()


@contextlib.contextmanager
def folder_lock(model_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on `model_dir` (flock on DIR/.edge-rnn.lock) around a manifest read-modify-write.

    Two processes writing the same folder run their updates one after the other, so the manifest always lists
    the files on disk. Re-entrant within a thread.
    """
    key = Path(model_dir).resolve()
    if not key.is_dir():  # nothing to lock yet: the caller's own read reports the missing folder
        yield
        return
    with _folder_guard:
        rlock = _folder_rlocks.setdefault(key, threading.RLock())
    with rlock:
        depth = _folder_depth.get(key, 0)
        fd = None
        if depth == 0 and fcntl is not None:
            try:
                fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise EdgeRnnError(f"cannot write in {model_dir}: {exc.strerror or exc} — choose a folder you can write to") from exc
            fcntl.flock(fd, fcntl.LOCK_EX)
        _folder_depth[key] = depth + 1
        try:
            yield
        finally:
            _folder_depth[key] = depth
            if fd is not None:
                os.close(fd)  # releases the flock


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def manifest_path(model_dir: str | os.PathLike[str]) -> Path:
    return Path(model_dir) / MANIFEST_NAME


def load_manifest(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and sanity-check `model_dir/manifest.json`; raise ModelFileError if missing or malformed."""
    path = manifest_path(model_dir)
    if not os.path.lexists(path):
        raise ModelFileError(not_a_model_folder(Path(model_dir)))
    # A directory, FIFO or device named manifest.json is refused as what it is; the size and the nesting are capped.
    manifest = read_json_capped(path, what="manifest", max_bytes=MAX_MANIFEST_BYTES, error=ModelFileError,
                                hint="re-run the step that wrote it")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("model"), str):
        raise ModelFileError(f"{path} has no 'model' name — not an edge-rnn manifest")
    check_schema_version(manifest, where=path)
    # Every field's type, range and length, before any is used (a newer schema was refused above: its types may differ).
    validate(manifest, FOLDER_MANIFEST, where=path, hint=FOLDER_HINT)
    manifest.setdefault("files", {})
    return manifest


# What a user gives where a model folder is wanted: a Keras file (export it first) or one of a folder's model files.
_KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
_MODEL_FILE_SUFFIXES = (".onnx", ".ort")


def not_a_model_folder(model_dir: Path) -> str:
    """Why `model_dir` has no manifest, and the next step: export a Keras file, give a model file's folder, give the
    folder a bundle was made from, or make a folder (export into it, or train)."""
    suffix = model_dir.suffix.lower()
    if suffix in _KERAS_SUFFIXES and model_dir.is_file():
        return (f"{model_dir} is a Keras model file, not an exported model folder — export it first: edge-rnn export "
                f"{model_dir} (it makes the folder {model_dir.parent / model_dir.stem}, which this command takes)")
    if suffix in _KERAS_SUFFIXES + _MODEL_FILE_SUFFIXES and not os.path.lexists(model_dir):
        return f"no file {model_dir} — this command takes an exported model folder (edge-rnn export MODEL.keras makes one)"
    if model_dir.is_file():
        if model_dir.name.endswith(BUNDLE_SUFFIX):
            return (f"{model_dir} is a bundle; this command takes a model folder — give the folder the bundle was made "
                    "from (edge-rnn bundle DIR made it)")
        if suffix in _MODEL_FILE_SUFFIXES:
            return f"{model_dir} is a model file; this command takes its folder — give {model_dir.parent}"
        if os.path.lexists(manifest_path(model_dir.parent)):
            return f"{model_dir} is a file of the model folder {model_dir.parent}; this command takes the folder — give {model_dir.parent}"
        return f"{model_dir} is a file, not a model folder — give a folder made by edge-rnn export or edge-rnn train"
    where = f"in {model_dir}" if model_dir.is_dir() else f"in {model_dir} (no such folder)"
    return (f"no {MANIFEST_NAME} {where} — not a model folder: export a Keras model into it (edge-rnn export MODEL.keras "
            f"--out {model_dir}) or train one there (edge-rnn train …)")


def not_a_model_file(path: Path) -> str | None:
    """Why `path`, given where one model file is wanted, is none (a Keras file, another file of a model folder, a file
    that is missing), with the next step; None for an .onnx or .ort file that exists."""
    suffix = path.suffix.lower()
    if suffix in _KERAS_SUFFIXES and path.is_file():
        return not_a_model_folder(path)
    folder = path.parent
    in_folder = os.path.lexists(manifest_path(folder))
    if not path.is_file():
        if not in_folder:
            return (f"no model file {path} — give an exported model folder, one of its .onnx files or a bundle "
                    "(`edge-rnn export MODEL.keras` makes a folder)")
        variant = path.name.split(".")[-2] if path.name.count(".") >= 2 else ""
        if suffix == ".ort":
            make = f"make the .ort files with `edge-rnn ort {folder}`"
        elif variant in QUANTIZED_VARIANTS:
            make = f"make it with `edge-rnn quantize {folder} --variant {variant}`"
        else:
            make = f"give {folder} or one of the files it has"
        return f"no model file {path} — {folder} has: {', '.join(_model_files(folder)) or 'no model file'}; {make}"
    if suffix not in _MODEL_FILE_SUFFIXES:
        if in_folder:
            return (f"{path} is not a model file (.onnx or .ort) — give its folder {folder}, or one of its model files: "
                    f"{', '.join(_model_files(folder)) or 'none yet'}")
        return f"{path} is not a model file (.onnx or .ort) — give an exported model folder, one of its .onnx files or a bundle"
    return None


def _model_files(folder: Path) -> list[str]:
    """The .onnx and .ort files in `folder`, by name."""
    return sorted(p.name for p in folder.iterdir() if p.suffix in _MODEL_FILE_SUFFIXES and p.is_file())


def check_schema_version(manifest: dict[str, Any], *, where: object) -> None:
    """Refuse a manifest whose `schema` is not an integer, or newer than this edge-rnn reads."""
    version = manifest.get("schema", SCHEMA_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ModelFileError(f"{where}: 'schema' must be an integer")
    if version > SCHEMA_VERSION:
        raise ModelFileError(f"{where} has schema {version}, newer than this edge-rnn understands — upgrade edge-rnn")


def save_manifest(model_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    """Write the manifest atomically."""
    manifest.setdefault("schema", SCHEMA_VERSION)
    # The edge-rnn that last wrote the folder: a device can tell which release made what it runs.
    manifest.setdefault("versions", {})["edge-rnn"] = __version__
    atomic_write_json(manifest_path(model_dir), manifest)


def file_entry(model_dir: str | os.PathLike[str], relpath: str) -> dict[str, Any]:
    """The `files` entry for `model_dir/relpath`: relative path, sha256 and size."""
    full = Path(model_dir) / relpath
    return {"path": relpath, "sha256": sha256_file(full), "bytes": full.stat().st_size}


def record_file(manifest: dict[str, Any], model_dir: str | os.PathLike[str], role: str, relpath: str) -> None:
    """Add or replace the file of `role` in `manifest` (caller saves)."""
    manifest.setdefault("files", {})[role] = file_entry(model_dir, relpath)


def _safe_relpath(model_dir: Path, relpath: Any) -> Path:
    """Resolve a manifest path, refusing absolute paths and anything escaping the model folder."""
    if not isinstance(relpath, str) or not relpath or os.path.isabs(relpath):
        raise ModelFileError(f"manifest in {model_dir} has an invalid file path {relpath!r}")
    full = (model_dir / relpath).resolve()
    if model_dir.resolve() not in full.parents:
        raise ModelFileError(f"manifest in {model_dir} points outside its folder: {relpath!r}")
    return full


# The variants `edge-rnn quantize` makes (quantize.VARIANTS: the device side does not import the quantizer).
QUANTIZED_VARIANTS = ("int8", "int8-static", "fp16")


def make_command(role: str, model_dir: str | os.PathLike[str], *, again: bool = False, task: str | None = None) -> str | None:
    """The next step that makes the file of `role` in `model_dir` (whose manifest says `task`): "make it with
    `edge-rnn …`"; None for a role no edge-rnn command makes (a misspelt one)."""
    verb = "make it again" if again else "make it"
    if role in ("onnx", "onnx_step"):
        return f"{verb} with `edge-rnn export {model_dir}`"
    if role == "ort_config" or role.endswith("_ort"):
        return f"{verb} with `edge-rnn ort {model_dir}`"
    variant = role.removeprefix("onnx_").removeprefix("step_").replace("_", "-")
    if role.startswith("onnx_") and variant in QUANTIZED_VARIANTS:
        return f"{verb} with `edge-rnn quantize {model_dir} --variant {variant}`"
    if role == "keras":
        return f"export your .keras file into the folder again (`edge-rnn export MODEL.keras --out {model_dir}`)"
    if role == "checkpoint":
        if again:
            return f"train it again (`edge-rnn train char-rnn --out {model_dir}`)"
        run = f"edge-rnn generate {model_dir}" if task == "generate" else f"edge-rnn infer {model_dir} FILE.npy"
        return f"only a char RNN trained by edge-rnn has one (`edge-rnn train char-rnn --out DIR`); run this folder's ONNX model with `{run}`"
    return None


def missing_role(manifest: dict[str, Any], model_dir: str | os.PathLike[str], role: str) -> ModelFileError:
    """The error for a `role` the manifest does not list: the command that makes it, or the roles there are."""
    make = make_command(role, model_dir, task=manifest.get("task"))
    if make is None:
        listed = [r for r, e in manifest.get("files", {}).items()
                  if isinstance(e, dict) and str(e.get("path", "")).endswith(_MODEL_FILE_SUFFIXES)]
        make = f"choose --role from {', '.join(listed)}" if listed else f"it has no model yet: `edge-rnn export {model_dir}` makes one"
    return ModelFileError(f"manifest in {model_dir} lists no '{role}' file — {make}")


def _remake(role: str, model_dir: str | os.PathLike[str]) -> str:
    """The next step for a listed file that is missing or changed."""
    return make_command(role, model_dir, again=True) or "the manifest lists it but no edge-rnn command makes it: re-run the step that wrote it"


def verified_file(manifest: dict[str, Any], model_dir: str | os.PathLike[str], role: str) -> Path:
    """Path of the file of `role`, after checking it exists and matches the manifest's sha256 and size."""
    model_dir = Path(model_dir)
    entry = manifest.get("files", {}).get(role)
    if not isinstance(entry, dict):
        raise missing_role(manifest, model_dir, role)
    full = _safe_relpath(model_dir, entry.get("path"))
    kind = not_regular(full)
    if kind:  # never hashed or read: a FIFO would block, /dev/zero never ends
        raise ModelFileError(f"{full} is {kind}, not a regular file — {_remake(role, model_dir)}")
    if not full.is_file():
        raise ModelFileError(f"{full} is listed in the manifest but missing — {_remake(role, model_dir)}")
    if full.stat().st_size != entry.get("bytes") or sha256_file(full) != entry.get("sha256"):
        raise ModelFileError(
            f"{full} does not match the sha256 in {manifest_path(model_dir)} — the file was changed or corrupted; "
            f"{_remake(role, model_dir)}"
        )
    if full.suffix == ".onnx":
        # Before onnxruntime or onnx.load follow an external-data path out of the folder (see onnxfile.py).
        from .onnxfile import check_onnx_file

        check_onnx_file(full)
    return full


def role_of(manifest: dict[str, Any], model_dir: str | os.PathLike[str], model_file: str | os.PathLike[str]) -> str:
    """The role under which `model_file` is listed in the manifest, or raise ModelFileError."""
    target = Path(model_file).resolve()
    for role, entry in manifest.get("files", {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            if (Path(model_dir) / entry["path"]).resolve() == target:
                return role
    raise ModelFileError(f"{model_file} is not listed in {manifest_path(model_dir)} — export it with edge-rnn, or point at a listed file")


def update_manifest(model_dir: str | os.PathLike[str], **fields: Any) -> dict[str, Any]:
    """Load, shallow-merge dict fields (e.g. metrics) or replace others, and save atomically (under folder_lock)."""
    with folder_lock(model_dir):
        manifest = load_manifest(model_dir)
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(manifest.get(key), dict):
                manifest[key].update(value)
            else:
                manifest[key] = value
        save_manifest(model_dir, manifest)
    return manifest


def check_writable_dir(folder: str | os.PathLike[str]) -> Path:
    """Create `folder` if needed and prove a file can be written there, before hours of training."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise EdgeRnnError(f"cannot write in {folder}: {exc.strerror or exc} — choose another output folder") from exc
    return folder
