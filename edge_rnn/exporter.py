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
from .device.manifest import SCHEMA_VERSION, atomic_path, folder_lock, load_manifest, record_file, save_manifest, sha256_file
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
    # A folder exported in place: no other writer between reading its manifest and saving the new one.
    with folder_lock(source) if source.is_dir() else contextlib.nullcontext():
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
        model = adapter.load(model_dir, manifest)
    else:
        model_dir = Path(out) if out is not None else source.parent / source.stem
        if source.resolve() in (model_dir.resolve(), (model_dir / KERAS_FILE).resolve()):
            raise EdgeRnnError(f"--out {model_dir} would overwrite the input {source} — choose another folder, "
                               f"or export the folder in place (edge-rnn export {source.parent})")
        model = load_keras_file(source, trust_h5=trust_h5)
        keras_file, adapter = source, KerasAdapter()
        manifest = _new_keras_manifest(source)
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
        classes = new["io"]["outputs"][0]["shape"][-1]
        if label_list and len(label_list) != classes:
            raise EdgeRnnError(f"{labels} has {len(label_list)} labels but the model's first output "
                               f"{new['io']['outputs'][0]['name']!r} has {classes} values — one label per line, one per class")
        new["labels"] = label_list
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
    save_manifest(model_dir, new)
    onnx_check = validations[0].report.checks
    return ExportReport(
        model_dir / ONNX_FILE, graphs["onnx"], cfg.opset, max(c.max_abs_diff for c in onnx_check) if onnx_check else None,
        exported.notes, model_dir, files, graphs, new.get("audit", []), validations, new.get("step_refused"),
        Path(data).name if data is not None else None, data_rows, data_validations,
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


