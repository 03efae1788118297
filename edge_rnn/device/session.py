"""onnxruntime sessions over verified model files, and the I/O each file's role promises.

Device path: imports numpy, onnxruntime and this package's device modules only.

A model folder may hold two kinds of files (see manifest.py):
- sequence files, whose graph I/O is the manifest's `io`;
- steppable files, whose graph inputs include every `step.state[*].input`: their I/O is `step.inputs` +
  the state inputs, `step.outputs` + the state outputs (`model.step.onnx`, or the char RNN's `model.onnx`,
  which takes `h0` and returns `h`).
`load_model` finds which one a file is, checks the graph's names against it, and checks the fields the
manifest's task needs through the `TASKS` table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from ..errors import InputError, ModelFileError
from .labels import first_activation, labels_problem
from .bounded import not_regular
from .manifest import BUNDLE_SUFFIX, load_manifest, not_a_model_file, role_of, verified_file

if TYPE_CHECKING:  # the bundle reader (tarfile, gzip) is imported when a bundle is opened, not by every load
    from .bundle import Bundle

# Every error onnxruntime raises derives straight from Exception; these are the ones it defines.
ORT_ERRORS = tuple(
    value for value in vars(_ort_state).values() if isinstance(value, type) and issubclass(value, Exception)
)
MASK_KINDS = ("mask_zero", "mask_value")


def session_options(*, threads: int | None = None, opt_level: str = "all") -> ort.SessionOptions:
    """SessionOptions for latency on small devices: sequential execution, `threads` intra-op threads."""
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # onnxruntime's own log lines (coloured warnings and errors on stderr) would stand beside edge-rnn's one-line
    # error for the same fault; errors still reach the caller as exceptions. EDGE_RNN_DEBUG=1 keeps the log.
    if not os.environ.get("EDGE_RNN_DEBUG"):
        options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def create_session(
    path: str | os.PathLike[str] | bytes, *, threads: int | None = None, opt_level: str = "all", where: str | os.PathLike[str] = ""
) -> ort.InferenceSession:
    """An onnxruntime CPU session from a file or a model's bytes (named `where`); a broken model becomes ModelFileError."""
    try:
        return ort.InferenceSession(
            path if isinstance(path, bytes) else str(path),
            sess_options=session_options(threads=threads, opt_level=opt_level), providers=["CPUExecutionProvider"],
        )
    except ORT_ERRORS as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFileError(f"onnxruntime cannot load {where or path}: {first} — re-export it") from exc


@dataclass
class LoadedModel:
    """A verified model file, its folder's manifest, an onnxruntime session and the I/O of the file's role.

    `io` is {"inputs": [spec], "outputs": [spec]} in graph order (spec: name, dtype, shape); `state` lists
    the state tensors ({"layer", "name", "input", "output", "dtype", "shape"}) of a steppable file, [] otherwise.
    """

    path: Path
    model_dir: Path
    role: str
    manifest: dict[str, Any]
    session: ort.InferenceSession
    io: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {"inputs": [], "outputs": []})
    state: list[dict[str, Any]] = field(default_factory=list)

    @property
    def steppable(self) -> bool:
        return bool(self.state)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(None, feeds)
        except ORT_ERRORS as exc:
            raise InputError(f"{self.path.name} rejected the input: {str(exc).splitlines()[0]}") from exc


def _bad(model_dir: Path, what: str) -> ModelFileError:
    return ModelFileError(f"manifest in {model_dir}: {what} — re-export the folder with edge-rnn")


def _specs_ok(specs: Any) -> bool:
    return isinstance(specs, list) and all(
        isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("shape", []), list) for s in specs
    )


def _io_ok(io: Any) -> bool:
    return isinstance(io, dict) and all(_specs_ok(io.get(side)) for side in ("inputs", "outputs"))


def step_spec(manifest: dict[str, Any], model_dir: Path) -> dict[str, Any] | None:
    """The manifest's `step` block (checked), the task's own for manifests written before it, or None."""
    step = manifest.get("step")
    if step is None:
        legacy = TASKS.get(manifest.get("task"), TaskSpec()).legacy_step
        return legacy(manifest) if legacy else None
    state = step.get("state") if isinstance(step, dict) else None
    state_ok = isinstance(state, list) and state and all(
        isinstance(s, dict) and all(isinstance(s.get(k), str) for k in ("layer", "name", "input", "output"))
        and isinstance(s.get("shape"), list) and len(s["shape"]) == 2 and isinstance(s["shape"][1], int)
        for s in state
    )
    if not (_io_ok(step) and state_ok):
        raise _bad(model_dir, "'step' needs inputs, outputs and state entries (layer, name, input, output, shape)")
    return step


def _role_io(manifest: dict[str, Any], model_dir: Path, graph_inputs: list[str]) -> tuple[dict, list[dict]]:
    """(io, state) of a file whose graph takes `graph_inputs`: steppable iff it takes every state input."""
    step = step_spec(manifest, model_dir)
    if step is not None and all(s["input"] in graph_inputs for s in step["state"]):
        state = step["state"]
        tensor = lambda s, side: {"name": s[side], "dtype": s.get("dtype", "float32"), "shape": s["shape"]}  # noqa: E731
        io = {
            "inputs": step["inputs"] + [tensor(s, "input") for s in state],
            "outputs": step["outputs"] + [tensor(s, "output") for s in state],
        }
        return io, state
    io = manifest.get("io")
    if not _io_ok(io):
        raise ModelFileError(f"manifest in {model_dir}: 'io' must list inputs and outputs with names — re-export the folder")
    return io, []


def _check_names(path: Path, io: dict, session: ort.InferenceSession, *, what: str) -> None:
    expected = ([s["name"] for s in io["inputs"]], [s["name"] for s in io["outputs"]])
    actual = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if sorted(expected[0]) != sorted(actual[0]) or sorted(expected[1]) != sorted(actual[1]):
        raise ModelFileError(f"{path} has inputs/outputs {actual}, the manifest's {what} says {expected} — re-export it")


def load_model(
    model_path: str | os.PathLike[str], *, threads: int | None = None, opt_level: str = "all", role: str | None = None, step: bool = False
) -> LoadedModel:
    """Load MODEL.onnx after verifying it against the manifest beside it (sha256, size, I/O names, task fields).

    A bundle (`.tar.gz`, see bundle.py) is verified member by member first; `role` picks its file (default: its
    first variant, or with `step` its first step form). A plain file is its own role.
    """
    path = Path(model_path)
    # Checked by suffix here: importing the bundle reader (tarfile, gzip) costs ~5 ms of a plain file's start.
    if path.name.endswith(BUNDLE_SUFFIX):
        return load_bundle_model(path, role=role, step=step, threads=threads, opt_level=opt_level)
    if path.is_dir():
        # A model folder: `role`'s file, else the step model where one is wanted and listed, else the sequence model.
        manifest = load_manifest(path)
        files = manifest.get("files", {})
        role = role or ("onnx_step" if step and "onnx_step" in files else "onnx")
        verified = verified_file(manifest, path, role)
        return _build(verified, verified, model_dir=path, role=role, manifest=manifest, threads=threads, opt_level=opt_level)
    if role is not None:
        raise InputError(f"--role picks a file inside a bundle or a model folder; {path} is a model file — drop --role")
    kind = not_regular(path)
    if kind:
        raise ModelFileError(f"model file {path} is {kind}, not a regular file — give the .onnx file or its folder")
    problem = not_a_model_file(path)
    if problem is not None:
        raise ModelFileError(problem)
    model_dir = path.parent
    manifest = load_manifest(model_dir)
    role = role_of(manifest, model_dir, path)
    verified_file(manifest, model_dir, role)
    return _build(path, path, model_dir=model_dir, role=role, manifest=manifest, threads=threads, opt_level=opt_level)


def model_from_bytes(
    data: bytes, *, where: Path, model_dir: Path, role: str, manifest: dict[str, Any], threads: int | None = None, opt_level: str = "all"
) -> LoadedModel:
    """A LoadedModel from a model's bytes already verified against `manifest` (a bundle member, shown as `where`)."""
    if Path(where).suffix == ".onnx":  # .ort members are FlatBuffers, and hold no external-data paths
        from .onnxfile import check_onnx_bytes

        check_onnx_bytes(data, where=where)
    return _build(data, where, model_dir=model_dir, role=role, manifest=manifest, threads=threads, opt_level=opt_level)


def _build(
    source: Path | bytes, path: Path, *, model_dir: Path, role: str, manifest: dict[str, Any], threads: int | None, opt_level: str
) -> LoadedModel:
    """Session + the I/O of the file's role, checked against the manifest and its task's fields."""
    task = TASKS.get(manifest.get("task"))
    if task is None:
        raise _bad(model_dir, f"unknown task {manifest.get('task')!r}")
    if not _io_ok(manifest.get("io")):
        raise ModelFileError(f"manifest in {model_dir}: 'io' must list inputs and outputs with names — re-export the folder")
    session = create_session(source, threads=threads, opt_level=opt_level, where=path)
    io, state = _role_io(manifest, model_dir, [i.name for i in session.get_inputs()])
    _check_names(path, io, session, what="step" if state else "io")
    # Graph order, which positional readers (and the I/O names shown to users) follow.
    by_name = {s["name"]: s for s in io["inputs"] + io["outputs"]}
    io = {"inputs": [by_name[i.name] for i in session.get_inputs()], "outputs": [by_name[o.name] for o in session.get_outputs()]}
    _check_masking(manifest, model_dir)
    for check in task.checks:
        check(manifest, session, model_dir)
    return LoadedModel(path, model_dir, role, manifest, session, io, state)


# ---------------------------------------------------------------------------------------------
# Task fields: what each task's commands read from the manifest, checked before any work.


def _check_masking(manifest: dict[str, Any], model_dir: Path) -> None:
    masking = manifest.get("masking", [])
    names = {s["name"] for s in manifest["io"]["inputs"]}
    ok = isinstance(masking, list) and all(
        isinstance(m, dict) and m.get("input") in names and m.get("kind") in MASK_KINDS
        and isinstance(m.get("value", 0.0), (int, float)) and np.isfinite(m.get("value", 0.0))
        for m in masking
    )
    if not ok:
        raise _bad(model_dir, f"'masking' entries need an input of 'io', a kind ({' or '.join(MASK_KINDS)}) and a finite value")


def _labels(manifest: dict[str, Any], session: ort.InferenceSession, model_dir: Path, *, required: bool) -> None:
    labels = manifest.get("labels")
    if labels is None and not required:
        return
    if not (isinstance(labels, list) and labels and all(isinstance(label, str) for label in labels)):
        raise _bad(model_dir, "labels must be a list of strings")
    problem = labels_problem(len(labels), classes=session.get_outputs()[0].shape[-1], activation=first_activation(manifest))
    if problem is not None:
        raise _bad(model_dir, problem)


def _image_preprocessing(manifest: dict[str, Any], session: ort.InferenceSession, model_dir: Path) -> None:
    pre = manifest.get("preprocessing")
    image = pre.get("image") if isinstance(pre, dict) else None
    if not (isinstance(image, dict) and all(isinstance(image.get(k), int) and image[k] > 0 for k in ("height", "width"))):
        raise _bad(model_dir, "preprocessing.image needs positive integer height and width")
    if not all(isinstance(pre.get(k, 0.0), (int, float)) and np.isfinite(pre.get(k, 0.0)) for k in ("scale", "offset")):
        raise _bad(model_dir, "preprocessing.scale and offset must be numbers")


def _vocab(manifest: dict[str, Any], session: ort.InferenceSession, model_dir: Path) -> None:
    vocab = manifest.get("vocab")
    if not (isinstance(vocab, list) and vocab and all(isinstance(c, str) and len(c) == 1 for c in vocab) and len(set(vocab)) == len(vocab)):
        raise _bad(model_dir, "vocab must be a list of distinct single characters")
    last_dim = session.get_outputs()[0].shape[-1]
    if isinstance(last_dim, int) and len(vocab) != last_dim:
        raise _bad(model_dir, f"vocab has {len(vocab)} characters but the model scores {last_dim}")


def _hidden(manifest: dict[str, Any], session: ort.InferenceSession, model_dir: Path) -> None:
    config = manifest.get("config")
    hidden = config.get("hidden") if isinstance(config, dict) else None
    h_dim = session.get_inputs()[-1].shape[-1]
    if not isinstance(hidden, int) or (isinstance(h_dim, int) and h_dim != hidden):
        raise _bad(model_dir, f"config.hidden must be the model's hidden size ({h_dim})")


def _char_rnn_step(manifest: dict[str, Any]) -> dict[str, Any]:
    """The char RNN's step block for manifests written before `step` existed: ids in, logits out, h0 → h."""
    hidden = (manifest.get("config") or {}).get("hidden")
    return {
        "inputs": [{"name": "ids", "dtype": "int64", "shape": ["batch", 1]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 1, len(manifest.get("vocab") or [])]}],
        "state": [{"layer": "rnn", "name": "h", "input": "h0", "output": "h", "dtype": "float32", "shape": ["batch", hidden]}],
    }


Check = Callable[[dict[str, Any], ort.InferenceSession, Path], None]


@dataclass(frozen=True)
class TaskSpec:
    """What a task needs from its manifest and which commands serve it (the first is suggested to others)."""

    checks: tuple[Check, ...] = ()
    commands: tuple[str, ...] = ("infer", "stream")
    legacy_step: Callable[[dict[str, Any]], dict[str, Any]] | None = None


TASKS: dict[str, TaskSpec] = {
    # mnist-lstm: images in, the manifest's preprocessing applied, labels out.
    "classify": TaskSpec(checks=(_image_preprocessing, lambda m, s, d: _labels(m, s, d, required=True))),
    # char-rnn: characters in (vocab), generation from the manifest's start state.
    "generate": TaskSpec(checks=(_vocab, _hidden), commands=("generate", "stream"), legacy_step=_char_rnn_step),
    # Any exported Keras model: arrays in, every output out; labels optional.
    "keras": TaskSpec(checks=(lambda m, s, d: _labels(m, s, d, required=False),)),
}


# What each command takes after the model, in the command a refusal suggests.
COMMAND_ARGS = {"infer": "FILE.npy", "generate": "--prime 'TEXT'", "stream": "--input FILE.npy"}


def require_command(model: LoadedModel, command: str, *, given: str | os.PathLike[str] | None = None) -> None:
    """Raise InputError when `command` does not serve the model's task, naming the command that does, with the path
    the user `given` (default: the model file)."""
    commands = TASKS[model.manifest["task"]].commands
    if command not in commands:
        given = model.path if given is None else given
        raise InputError(f"{given} is a {model.manifest['task']!r} model, which `edge-rnn {command}` does not run — use "
                         f"`edge-rnn {commands[0]} {given} {COMMAND_ARGS[commands[0]]}`")


def load_bundle_model(path: str | os.PathLike[str], *, role: str | None = None, step: bool = False,
                      threads: int | None = None, opt_level: str = "all", bundle: Bundle | None = None):
    """A LoadedModel for one role of a bundle (default: see `default_role`), every member verified before loading."""
    from .bundle import default_role, open_bundle

    bundle = bundle or open_bundle(path)
    role = role or default_role(bundle, step=step)
    if role not in bundle.roles:
        raise InputError(f"{bundle.path} holds no {role!r} model — choose --role from {bundle.roles}")
    name = bundle.manifest["files"][role]["path"]
    return model_from_bytes(bundle.data(role), where=bundle.path / name, model_dir=bundle.path, role=role,
                            manifest=bundle.manifest, threads=threads, opt_level=opt_level)
