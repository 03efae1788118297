"""`edge-rnn evaluate MODEL --data FILE`: every variant of a model folder, model file or bundle, scored on the
user's labelled data (edge_rnn.device.evaluate does the scoring).

Runs on a device: only numpy and onnxruntime are needed. On a workstation with the `[train]` extra, a
folder's Keras source model is scored too (one more runner, float32, batch-independent).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .device.dataset import CHECK_ROWS, Dataset, open_dataset
from .device.evaluate import EXACT, Evaluation, Runner, evaluate_runners, promise_of, roles_in, sequence_runner, step_runner
from .device.metrics import KINDS, METRICS, output_kind
from .errors import InputError, MissingDependencyError, ModelFileError
from .tolerances import KERAS_ONNX_ATOL

# How a built-in task's first output is scored (a Keras model's manifest records its outputs' activations).
TASK_KINDS = {"classify": "softmax", "generate": "logits"}
MAX_EVAL_BATCH = 65_536


def _state(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    from .device.session import step_spec

    step = step_spec(manifest, Path("."))
    return (step or {}).get("state", [])


def data_outputs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The outputs a target may score: the model's outputs without the recurrent state it hands back."""
    state_out = {s.get("output") for s in _state(manifest)}
    return [s for s in manifest["io"]["outputs"] if s["name"] not in state_out]


def data_inputs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The inputs data feeds: the model's inputs without the recurrent state it takes, each id input with the size
    of its vocabulary (`vocab`: ids must lie below it) where the manifest knows it."""
    state_in = {s.get("input") for s in _state(manifest)}
    described = manifest.get("sample_inputs") if isinstance(manifest.get("sample_inputs"), dict) else {}
    chars = manifest.get("vocab") if manifest.get("task") == "generate" else None
    specs = []
    for spec in manifest["io"]["inputs"]:
        if spec["name"] in state_in:
            continue
        how = described.get(spec["name"])
        if isinstance(how, dict) and how.get("kind") == "ids" and isinstance(how.get("high"), int):
            spec = {**spec, "vocab": how["high"]}
        elif isinstance(chars, list) and np.issubdtype(np.dtype(spec.get("dtype", "float32")), np.integer):
            spec = {**spec, "vocab": len(chars)}
        specs.append(spec)
    return specs


def output_kinds(manifest: dict[str, Any], data: Dataset, *, metric: str | None = None) -> dict[str, str]:
    """{output: metric kind} for every output the data scores or variants are compared on."""
    outputs = data_outputs(manifest)
    recorded = manifest.get("output_activations") if isinstance(manifest.get("output_activations"), dict) else {}
    task_kind = TASK_KINDS.get(manifest.get("task"))
    kinds = {}
    for i, spec in enumerate(outputs):
        name = spec["name"]
        activation = task_kind if (i == 0 and task_kind) else recorded.get(name)
        if metric is not None and (name in data.targets or not data.targets):
            if METRICS[metric] == "logits" and activation == "softmax":
                raise InputError(f"--metric {metric} scores logits, but the output {name!r} ends in softmax (probabilities) — "
                                 "use --metric accuracy")
            kinds[name] = METRICS[metric]
            continue
        target = data.targets.get(name)
        kinds[name] = output_kind(activation, output_shape=tuple(spec.get("shape", [])), target=target if target is not None else np.zeros(0, np.float32))
    return kinds


def check_targets(kinds: dict[str, str], data: Dataset) -> None:
    """Each target fits the metric its output is scored by, checked before any model runs (one line each)."""
    for name, kind in kinds.items():
        target = data.targets.get(name)
        if target is None:
            continue
        shape = data.output_specs.get(name, {}).get("shape", [])
        classes = shape[-1] if shape else None
        where = f"{data.source}: target {name!r}"
        if kind in ("softmax", "logits"):
            if not (isinstance(classes, int) and classes > 1):
                raise InputError(f"{where}: {kind} metrics score classes, but the output {name!r} holds {classes} value(s) per "
                                 "example — score it with --metric mae (or binary-accuracy for 0/1 targets)")
            if target.ndim not in (len(shape) - 1, len(shape)):
                raise InputError(f"{where} has shape {target.shape}; give class ids {tuple(shape[:-1])} or one-hot rows {tuple(shape)}")
            continue
        if not (target.ndim == len(shape) or (classes == 1 and target.ndim == len(shape) - 1)):
            raise InputError(f"{where} has shape {target.shape} but the output {name!r} is {tuple(shape)} — "
                             + ("class ids are scored with --metric accuracy" if target.ndim == len(shape) - 1 else "give one target per output value"))
        if kind == "sigmoid":
            for start in range(0, data.count, CHECK_ROWS):
                if not np.all(np.isin(np.asarray(target[start : start + CHECK_ROWS]), (0, 1))):
                    raise InputError(f"{where} is scored as yes/no (sigmoid output) but holds values other than 0 and 1 — "
                                     "give 0/1 labels, or --metric mae to score it as a regression")


def _preprocess(manifest: dict[str, Any]) -> Callable[[str, np.ndarray], np.ndarray] | None:
    pre = manifest.get("preprocessing")
    if not (isinstance(pre, dict) and "image" in pre):
        return None
    from .device.inputs import preprocess_pixels

    # Image models take raw uint8 pixels as `infer` does: scaled as the manifest says; floats must already be.
    return lambda name, x: preprocess_pixels(x, preprocessing=pre) if x.dtype == np.uint8 else x


def open_for(manifest: dict[str, Any], path: str | os.PathLike[str], *, dtypes: dict[str, Any] | None = None,
             need_targets: bool = False, max_rows: int | None = None) -> Dataset:
    """The user's data checked against a manifest's io (inputs without state, outputs with targets)."""
    data = open_dataset(path, inputs=data_inputs(manifest), outputs=data_outputs(manifest), dtypes=dtypes,
                        masking=manifest.get("masking", []), need_targets=need_targets, max_rows=max_rows,
                        transform=_preprocess(manifest))
    return data


def _folder_models(model_dir: Path, manifest: dict[str, Any], roles: list[str], *, threads: int | None):
    from .device.manifest import verified_file
    from .device.runtime import load_model

    return {role: load_model(verified_file(manifest, model_dir, role), threads=threads) for role in roles}


def _runner_for(model, role: str, *, batch: int) -> Runner:
    promise, atol = promise_of(role)
    steps = "_step" in role
    run = step_runner(model, batch=batch) if steps else sequence_runner(model, batch=batch)
    return Runner(role, run, promise, atol)


def _source_runner(model_dir: Path, manifest: dict[str, Any], notes: list[str]) -> Runner | None:
    """The Keras source model as a runner where the folder has one and Keras is installed."""
    if "keras" not in manifest.get("files", {}):
        return None
    try:
        from .models import adapter_for

        adapter = adapter_for(manifest)
        source = adapter.load(model_dir, manifest)
    except MissingDependencyError:
        notes.append("Keras is not installed here ([train] extra): the source model is not scored")
        return None
    io = manifest["io"]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return adapter.reference(source, feeds, io=io)

    return Runner("keras", run, EXACT, KERAS_ONNX_ATOL)


def evaluate(
    target: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str],
    batch: int = 1,
    metric: str | None = None,
    max_drop: float | None = None,
    threads: int | None = 1,
    source: bool = True,
    roles: list[str] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Score every variant of TARGET (a model folder, a model file with its manifest, or a bundle) on DATA.

    Quantized forms run at `batch` (the deployed batch size); every form is judged by its promise.
    """
    from .device.bundle import is_bundle, open_bundle
    from .device.session import load_bundle_model
    from .device.manifest import load_manifest, not_a_model_file, role_of

    if not 1 <= batch <= MAX_EVAL_BATCH:
        raise InputError(f"--batch must be between 1 and {MAX_EVAL_BATCH:,}")
    if metric is not None and metric not in METRICS:
        raise InputError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}")
    if max_drop is not None and not (0 <= max_drop <= 1000):
        raise InputError("--max-drop is in percent (pp for accuracy): between 0 and 1000")
    path = Path(target)
    notes: list[str] = []
    runners: list[Runner] = []
    if is_bundle(path):
        bundle = open_bundle(path)
        manifest = bundle.manifest
        chosen = roles or roles_in(bundle.roles)
        models = {role: load_bundle_model(path, role=role, threads=threads, bundle=bundle) for role in chosen}
    else:
        if path.is_dir():
            model_dir = path
            manifest = load_manifest(model_dir)
            chosen = roles or roles_in(manifest.get("files", {}))
        elif not_a_model_file(path) is None:
            model_dir = path.parent
            manifest = load_manifest(model_dir)
            role = role_of(manifest, model_dir, path)
            chosen = roles or (["onnx", role] if role != "onnx" and "onnx" in manifest.get("files", {}) else [role])
        else:  # a Keras file, a missing file, a file that is no model
            raise ModelFileError(not_a_model_file(path))
        models = _folder_models(model_dir, manifest, chosen, threads=threads)
        if source:
            keras_runner = _source_runner(model_dir, manifest, notes)
            if keras_runner is not None:
                runners.append(keras_runner)
    if not models:
        raise InputError(f"{path} holds no ONNX model to evaluate — make one with `edge-rnn export {path}`")
    if "onnx" not in models:
        notes.append("no fp32 sequence model here: variants are compared with the fp32 step model where there is one")
    evaluation = evaluate_models(manifest, models, data=data, batch=batch, metric=metric, max_drop=max_drop, extra=runners,
                                 on_progress=on_progress)
    evaluation.notes = notes + evaluation.notes
    return evaluation


def model_feeds(manifest: dict[str, Any], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Data feeds {input: (N, …)} completed with zeros for every io input the data does not give: the recurrent
    state a sequence model takes (the char RNN's h0), which a device starts at zero too."""
    n = len(next(iter(feeds.values())))
    full = dict(feeds)
    for spec in manifest["io"]["inputs"]:
        if spec["name"] not in full:
            dims = [d if isinstance(d, int) else 1 for d in spec["shape"][1:]]
            full[spec["name"]] = np.zeros((n, *dims), np.dtype(spec.get("dtype", "float32")))
    return full


def evaluate_models(
    manifest: dict[str, Any],
    models: dict[str, Any],
    *,
    data: str | os.PathLike[str],
    batch: int = 1,
    metric: str | None = None,
    max_drop: float | None = None,
    extra: list[Runner] = (),
    need_targets: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Score loaded models (role → LoadedModel: a folder's files, or a bundle's members before the bundle is
    written) and `extra` runners (the Keras source) on DATA at `batch`, each judged by its promise."""
    from .device.runtime import _graph_dtypes

    dataset = open_for(manifest, data, dtypes=_graph_dtypes(next(iter(models.values()))), need_targets=need_targets)
    kinds = output_kinds(manifest, dataset, metric=metric)
    check_targets(kinds, dataset)
    runners = [_runner_for(model, role, batch=batch) for role, model in models.items()] + list(extra)
    source_role = next((r.role for r in extra if r.role == "keras"), None)
    return evaluate_runners(dataset, runners, kinds=kinds, batch=batch, max_drop=max_drop, source_role=source_role,
                            on_progress=on_progress)


__all__ = ["evaluate", "open_for", "output_kinds", "data_inputs", "data_outputs", "evaluate_models", "model_feeds", "KINDS"]
