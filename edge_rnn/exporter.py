"""Export a model to ONNX through its adapter, validate every file against the source, write a model folder.

Two ways in: a model folder (its manifest names the adapter: mnist-lstm, char-rnn, keras), or a Keras
file (`.keras`; `.h5` only when trusted), which becomes a new folder holding a copy `model.keras`,
`model.onnx`, `model.step.onnx` where the model streams, and `manifest.json`.

Every file is written to a temporary name, checked (onnx.checker, then onnxruntime against the source
model on realistic inputs: every output's max |Δ| with its named tolerance, and the step model fed one
step at a time against the whole sequence), and renamed only when every check passed; a failure lists
all failed outputs at once and leaves the previous files as they were. With `data`, both files are also checked
on the first DATA_PARITY_ROWS rows of the user's data, the same way: real inputs reach what random ones miss
(masked rows, large magnitudes, rare ids).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import MAX_LABELS_BYTES, ExportConfig
from .device.bounded import read_text_capped
from .errors import DataError, EdgeRnnError, ModelFileError, require
from .device.manifest import (
    SCHEMA_VERSION, atomic_path, folder_lock, load_manifest, manifest_path, record_file, save_manifest, sha256_file,
)
from .export.graphs import op_counts
from .export.validate import Validation, check, run_steps, session, stepped_outputs

ONNX_FILE = "model.onnx"
KERAS_FILE = "model.keras"
BATCH_DIM = "batch"
# Fused recurrent ops; an export holding recurrent layers but none of these fell back to Loop.
FUSED_RECURRENT_OPS = ("LSTM", "GRU", "RNN")
# Ops that run a time loop through onnxruntime's graph executor, step by step (what --fail-on-loop refuses).
LOOP_OPS = ("Loop", "Scan")
# 13: Unsqueeze/Squeeze take axes as inputs (the char-RNN graph); 18: the newest tf2onnx 1.17 converts to.
SUPPORTED_OPSETS = range(13, 19)
# Validation inputs: enough rows for every padding pattern twice; a symbolic time axis gets this many steps.
VALIDATION_BATCH = 16
VALIDATION_STEPS = 12
# What a labels file may hold: one label per line, short enough to print.
MAX_LABEL_CHARS = 200
# Rows of the user's data (--data) both files are also checked on: enough to hold every padding length and
# rare id a real file tends to have in its first rows, few enough that the step model's check (one session
# call per time step, the rows batched) stays well under a second.
DATA_PARITY_ROWS = 64


@dataclass
class ExportReport:
    path: Path  # model.onnx
    op_counts: dict[str, int]
    opset: int
    max_abs_diff: float | None = None  # the largest max |Δ| of model.onnx's outputs against the source
    notes: list[str] = field(default_factory=list)
    model_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)  # role → path of every file written
    graphs: dict[str, dict[str, int]] = field(default_factory=dict)  # role → op counts
    audit: list[dict[str, Any]] = field(default_factory=list)
    validations: list[Validation] = field(default_factory=list)
    step_refused: str | None = None
    # With --data: the same checks on the first `data_rows` rows of `data` (its file name).
    data: str | None = None
    data_rows: int = 0
    data_validations: list[Validation] = field(default_factory=list)
    # Files of the previous export made from its weights (quantized, .ort), deleted once the new manifest was saved:
    # file name → what makes it again from the new weights ("run edge-rnn quantize … again").
    removed: dict[str, str] = field(default_factory=dict)


def _set_metadata(model, props: dict[str, Any]) -> None:
    """Add (or replace) metadata_props; keys already there and not in `props` stay."""
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def read_labels(path: str | os.PathLike[str]) -> list[str]:
    """Class names from a text file of at most MAX_LABELS_BYTES, one per line (trailing blank lines ignored)."""
    path = Path(path)
    lines = read_text_capped(path, what="labels file", max_bytes=MAX_LABELS_BYTES, error=DataError,
                             hint="give a UTF-8 text file, one label per line").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or any(not line.strip() or len(line) > MAX_LABEL_CHARS for line in lines):
        raise EdgeRnnError(f"{path}: every line must be one label (non-empty, ≤ {MAX_LABEL_CHARS} characters)")
    return [line.strip() for line in lines]


def _validate(adapter, source, manifest: dict[str, Any], paths: dict[str, Path], *, inputs: dict[str, np.ndarray]) -> list[Validation]:
    """model.onnx on `inputs` {io input: (N, …)} against the source; the step model fed step by step against the
    source on the whole sequence. Every output of both, collected."""
    io = manifest["io"]
    reference = adapter.reference(source, inputs, io=io)
    sess = session(paths["onnx"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {s["name"]: inputs[s["name"]] for s in io["inputs"]})))
    what = f"the source ({adapter.name})"
    validations = [check("onnx", reference, got, tolerance=lambda n, r: adapter.tolerance(n, r, stepped=False), source=what)]
    step = manifest.get("step")
    if step:
        fed = {s["name"] for s in step["inputs"]} | {s["input"] for s in step["state"]}
        # An input the step model lacks only set a recurrent layer's initial state, which the step model
        # starts at zero: the reference gets zeros for it too.
        inputs = {n: x if n in fed else np.zeros_like(x) for n, x in inputs.items()}
        if any(n not in fed for n in reference):
            reference = adapter.reference(source, inputs, io=io)
        initial = {s["input"]: inputs[s["input"]] for s in step["state"] if s["input"] in inputs}
        role = "onnx_step" if "onnx_step" in paths else "onnx"
        steps = run_steps(session(paths[role]), step, inputs, initial=initial)
        got = stepped_outputs(steps, step, reference)
        got.update({s["output"]: steps[-1][s["output"]] for s in step["state"] if s["output"] in reference})
        wanted = {n: r for n, r in reference.items() if n in got}
        validations.append(check("onnx_step", wanted, got, tolerance=lambda n, r: adapter.tolerance(n, r, stepped=True), source=what))
    return validations


def _loops(graphs: dict[str, dict[str, int]]) -> list[str]:
    return [f"{role} holds {op}×{counts[op]}" for role, counts in graphs.items() for op in LOOP_OPS if counts.get(op)]


def _new_keras_manifest(path: Path) -> dict[str, Any]:
    return {"schema": SCHEMA_VERSION, "model": path.stem, "adapter": "keras", "task": "keras",
            "source": {"file": str(path), "sha256": sha256_file(path)}, "files": {}}


def _previous_manifest(model_dir: Path) -> dict[str, Any] | None:
    """The manifest of an earlier export into `model_dir` (a Keras file exported into an existing folder): what the
    new export keeps (the user's labels) and replaces (the variants made from the earlier weights). None where there
    is none, or none edge-rnn can read (the new manifest then replaces it, as before)."""
    if not manifest_path(model_dir).is_file():
        return None
    try:
        return load_manifest(model_dir)
    except ModelFileError:
        return None


def _replaced_keras_copy(model_dir: Path, manifest: dict[str, Any]) -> Path | None:
    """The folder's Keras copy where it no longer matches the manifest — retrained weights saved over it, which an
    export in place then exports — or None where it matches (or is missing, which adapter.load reports)."""
    entry = manifest["files"].get("keras")
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        return None
    path = model_dir / entry["path"]
    if path.resolve().parent != model_dir.resolve() or not path.is_file():
        return None
    if path.stat().st_size == entry.get("bytes") and sha256_file(path) == entry.get("sha256"):
        return None
    return path


def _first_output_size(manifest: dict[str, Any] | None) -> Any:
    outputs = (manifest or {}).get("io", {}).get("outputs") or [{}]
    shape = outputs[0].get("shape") or [None]
    return shape[-1]


def _carry_labels(previous: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Keep the labels the user gave an earlier export of this folder (no --labels this time) where the new model's
    first output has as many values as before; otherwise drop them and say so. Returns notes for the user."""
    labels = (previous or {}).get("labels")
    new.pop("labels", None)
    if not isinstance(labels, list) or not labels:
        return []
    before, now = _first_output_size(previous), _first_output_size(new)
    if before != now:
        return [f"the previous export's {len(labels)} labels were for {before} output values, the new model has {now} — "
                "labels dropped; give --labels FILE to name them"]
    new["labels"] = labels
    return [f"kept the previous export's {len(labels)} labels (give --labels FILE to change them)"]


def _remake_command(role: str, model_dir: Path) -> str:
    """What makes a derived file of `role` again: "run edge-rnn quantize … again" for a variant, ort for an .ort file."""
    from .export.ort_format import CONFIG_ROLE, ORT_ROLE_SUFFIX

    if role == CONFIG_ROLE or role.endswith(ORT_ROLE_SUFFIX):
        return f"run edge-rnn ort {model_dir} again"
    if role in ("onnx", "onnx_step"):  # a step model the new export does not make
        return "the new model makes none (see the export's `no step model` line)"
    variant = role.removeprefix("onnx_").removeprefix("step_").replace("_", "-")
    return f"run edge-rnn quantize {model_dir} --variant {variant} again"


def _remove_stale(model_dir: Path, before: dict[str, Any], now: dict[str, Any]) -> dict[str, str]:
    """Delete the files the previous manifest listed for derived roles (quantized variants, .ort files, their operator
    config) that the new one no longer lists: they hold the previous weights. Called after the new manifest is
    saved, so a crash in between leaves an unlisted file, never a listed stale one. Returns {file name: next step}."""
    from .export.ort_format import CONFIG_ROLE

    kept = {(model_dir / e["path"]).resolve() for e in now.values() if isinstance(e, dict) and isinstance(e.get("path"), str)}
    removed = {}
    for role, entry in before.items():
        if role in now or not (role.startswith("onnx") or role == CONFIG_ROLE):
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        if (model_dir / entry["path"]).is_symlink():
            continue
        path = (model_dir / entry["path"]).resolve()
        if path in kept or path.parent != model_dir.resolve() or not path.is_file():
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed[entry["path"]] = _remake_command(role, model_dir)
    return removed


def export(
    source: str | os.PathLike[str],
    *,
    cfg: ExportConfig = ExportConfig(),
    out: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    fail_on_loop: bool = False,
    trust_h5: bool = False,
    data: str | os.PathLike[str] | None = None,
) -> ExportReport:
    """Export a model folder in place, or a Keras file into a new folder (`out`, default: beside it, named after
    its stem); validate every file against the source (and on the first rows of `data`, an .npz or a folder of
    .npy, where given) before anything is renamed; record it all in the manifest."""
    source = Path(source)
    # A folder exported in place (or a Keras file into an existing folder): no other writer between reading its
    # manifest and saving the new one.
    target = source if source.is_dir() else Path(out) if out is not None else None
    with folder_lock(target) if target is not None and target.is_dir() else contextlib.nullcontext():
        return _export(source, cfg=cfg, out=out, labels=labels, fail_on_loop=fail_on_loop, trust_h5=trust_h5, data=data)


def _data_inputs(manifest: dict[str, Any], data: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The first DATA_PARITY_ROWS rows of the user's data as model inputs {io input: (N, …)}, checked against the
    new manifest's io first (a bad file is a one-line DataError before anything is written)."""
    from .evaluate import model_feeds, open_for

    dataset = open_for(manifest, data, max_rows=DATA_PARITY_ROWS)
    feeds, _ = dataset.rows(0, dataset.count)
    return model_feeds(manifest, feeds)


def _export(source: Path, *, cfg: ExportConfig, out, labels, fail_on_loop: bool, trust_h5: bool, data) -> ExportReport:
    from .models import adapter_for
    from .models.keras_model import KerasAdapter, load_keras_file

    # The labels file first: a bad one (a FIFO, a device, too big) is refused before Keras loads anything.
    label_list = read_labels(labels) if labels is not None else None
    onnx = require("onnx", "train")
    if cfg.opset not in SUPPORTED_OPSETS:
        raise EdgeRnnError(f"--opset {cfg.opset} is not supported; choose {SUPPORTED_OPSETS.start}–{SUPPORTED_OPSETS.stop - 1}")
    source = Path(source)
    keras_file: Path | None = None
    if source.is_dir():
        if out is not None:
            raise EdgeRnnError(f"--out is for a Keras file; the folder {source} is exported in place")
        model_dir, manifest = source, load_manifest(source)
        adapter = adapter_for(manifest)
        if not any(role in manifest["files"] for role in adapter.source_roles):
            raise ModelFileError(f"manifest in {model_dir} lists no {' or '.join(adapter.source_roles)} file — train first")
        previous = manifest
        replaced = _replaced_keras_copy(model_dir, manifest) if adapter.name == "keras" else None
        if replaced is not None:  # retrained weights saved over the folder's model.keras: they are what to export
            model = load_keras_file(replaced, trust_h5=trust_h5)
            manifest = {**manifest, "source": {"file": str(replaced), "sha256": sha256_file(replaced)}}
        else:
            model = adapter.load(model_dir, manifest)
    else:
        model_dir = Path(out) if out is not None else source.parent / source.stem
        if source.resolve() in (model_dir.resolve(), (model_dir / KERAS_FILE).resolve()):
            raise EdgeRnnError(f"--out {model_dir} would overwrite the input {source} — choose another folder, "
                               f"or export the folder in place (edge-rnn export {source.parent})")
        model = load_keras_file(source, trust_h5=trust_h5)
        keras_file, adapter = source, KerasAdapter()
        manifest = _new_keras_manifest(source)
        previous, replaced = _previous_manifest(model_dir), None
    if label_list is not None and adapter.name != "keras":
        raise EdgeRnnError(f"--labels is for Keras models; {manifest['model']} takes its labels from its training data")

    exported = adapter.export(model, manifest, opset=cfg.opset, fail_on_loop=fail_on_loop)
    graphs = {g.role: op_counts(g.model) for g in exported.graphs}
    if fail_on_loop and _loops(graphs):
        raise EdgeRnnError(f"--fail-on-loop: {', '.join(_loops(graphs))} — nothing written")
    fields = dict(exported.fields)
    new = {k: v for k, v in manifest.items() if k not in ("step", "step_refused")}
    new.setdefault("versions", {}).update(fields.pop("versions", {}))
    new.update(fields, adapter=adapter.name, opset=cfg.opset)
    if label_list is not None:
        from .device.labels import first_activation, labels_problem

        first = new["io"]["outputs"][0]
        problem = labels_problem(len(label_list), classes=first["shape"][-1], activation=first_activation(new)) if label_list else None
        if problem is not None:
            raise EdgeRnnError(f"{labels}: {problem} (the model's first output {first['name']!r} ends in "
                               f"{first_activation(new) or 'no recorded activation'}) — one label per line")
        new["labels"] = label_list
    notes = list(exported.notes)
    if replaced is not None:
        notes.append(f"{replaced} changed since the last export (new weights saved over it): exporting it")
    if label_list is None and adapter.name == "keras":
        notes += _carry_labels(previous, new)
    for graph in exported.graphs:
        props = {"edge_rnn.model": new["model"], "edge_rnn.adapter": adapter.name, "edge_rnn.role": graph.role,
                 "edge_rnn.versions": new["versions"], "edge_rnn.audit": new.get("audit", [])}
        props.update({f"edge_rnn.{k}": new[k] for k in ("config", "preprocessing", "labels") if k in new})
        _set_metadata(graph.model, props)
        try:
            onnx.checker.check_model(graph.model, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise EdgeRnnError(f"the exported {graph.file} fails onnx.checker ({str(exc).splitlines()[0]}) — not saved") from exc
    data_inputs = _data_inputs(new, data) if data is not None else None

    created = not model_dir.exists()
    try:
        validations, data_validations = _write_validated(adapter, model, new, exported.graphs, model_dir, keras_file=keras_file,
                                                         data_inputs=data_inputs, data_name=Path(data).name if data is not None else "")
    except BaseException:
        if created and model_dir.is_dir() and not any(model_dir.iterdir()):
            model_dir.rmdir()
        raise

    # Variants derived from older files (quantized, .ort, their operator config) no longer describe these ones.
    from .export.ort_format import CONFIG_ROLE

    new["files"] = {r: e for r, e in new.get("files", {}).items() if not r.startswith("onnx") and r != CONFIG_ROLE}
    for block in ("quantization", "ort"):
        new.pop(block, None)
    files = {}
    for graph in exported.graphs:
        record_file(new, model_dir, graph.role, graph.file)
        files[graph.role] = model_dir / graph.file
    if keras_file is not None:
        record_file(new, model_dir, "keras", KERAS_FILE)
        files["keras"] = model_dir / KERAS_FILE
    new.setdefault("versions", {}).update(_export_versions())
    new["graphs"] = graphs
    metrics = new.setdefault("metrics", {})
    metrics.pop("export_random_input_max_abs_diff", None)
    metrics["export_parity"] = {v.role: v.metrics() for v in validations}
    metrics.pop("export_parity_data", None)
    data_rows = len(next(iter(data_inputs.values()))) if data_inputs is not None else 0
    if data is not None:
        metrics["export_parity_data"] = {"data": Path(data).name, "rows": data_rows, "roles": {v.role: v.metrics() for v in data_validations}}
    if replaced is not None:
        record_file(new, model_dir, "keras", previous["files"]["keras"]["path"])
    save_manifest(model_dir, new)
    # Only now that the manifest no longer lists them: the previous export's variants, made from its weights.
    removed = _remove_stale(model_dir, previous.get("files", {}) if previous else {}, new["files"])
    onnx_check = validations[0].report.checks
    return ExportReport(
        model_dir / ONNX_FILE, graphs["onnx"], cfg.opset, max(c.max_abs_diff for c in onnx_check) if onnx_check else None,
        notes, model_dir, files, graphs, new.get("audit", []), validations, new.get("step_refused"),
        Path(data).name if data is not None else None, data_rows, data_validations, removed,
    )


def _write_validated(adapter, model, manifest: dict[str, Any], graphs, model_dir: Path, *, keras_file: Path | None,
                     data_inputs: dict[str, np.ndarray] | None, data_name: str) -> tuple[list[Validation], list[Validation]]:
    """Write every graph (and the Keras copy) to temporary files, validate (on realistic inputs, and on the user's
    rows where given), and rename them all only if all checks pass."""
    from .device.runtime import ORT_ERRORS

    onnx = require("onnx", "train")
    with contextlib.ExitStack() as stack:
        paths = {g.role: stack.enter_context(atomic_path(model_dir / g.file)) for g in graphs}
        for graph in graphs:
            onnx.save(graph.model, str(paths[graph.role]))
        inputs = adapter.sample_inputs(manifest, batch=VALIDATION_BATCH, time_steps=VALIDATION_STEPS, seed=0)
        try:
            validations = _validate(adapter, model, manifest, paths, inputs=inputs)
            data_validations = _validate(adapter, model, manifest, paths, inputs=data_inputs) if data_inputs is not None else []
        except ORT_ERRORS as exc:
            raise EdgeRnnError(f"onnxruntime cannot run the exported graph ({str(exc).splitlines()[0]}) — not saved") from exc
        rows = len(next(iter(data_inputs.values()))) if data_inputs is not None else 0
        failures = [f for v in validations for f in v.failures()]
        failures += [f"{f} on the first {rows} rows of {data_name}" for v in data_validations for f in v.failures()]
        if failures:
            raise EdgeRnnError(f"the export differs from {validations[0].report.reference} — not saved: {'; '.join(failures)}")
        if keras_file is not None:
            copy = stack.enter_context(atomic_path(model_dir / KERAS_FILE))
            if keras_file.suffix.lower() == ".keras":
                shutil.copyfile(keras_file, copy)
            else:
                model.save(copy)  # a trusted .h5 becomes a .keras copy
    return validations, data_validations


def _export_versions() -> dict[str, str]:
    import onnxruntime as ort

    onnx = require("onnx", "train")
    return {"onnx": onnx.__version__, "onnxruntime": ort.__version__}


