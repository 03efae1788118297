"""Make a bundle: one `.tar.gz` with the device files of a model folder and the source model's reference vectors.

Workstation side (the adapters run Keras or NumPy for the reference outputs). The format, and how a device
opens, verifies and self-tests a bundle, are in `edge_rnn/device/bundle.py`.

With the user's labelled data (`--data`), the reference inputs are rows of it (round-robin over the classes of a
classifier's target, else the first rows), and every bundled model is scored on the whole data set at the
device's batch (edge_rnn.evaluate), its metric and interval recorded in the manifest's `data_metrics` block.
The same folder and the same data make the same bytes.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import BundleConfig
from .device.bundle import BUNDLE_FORMAT, BUNDLE_SUFFIX, DATA_METRICS, FP32_ROLES, ORT_SUFFIX, REFERENCE_NAME, REFERENCE_ROLE, VARIANT_ROLES, Bundle, steppable_role
from .device.session import load_bundle_model
from .device.dataset import Dataset
from .device.metrics import class_targets
from .device.manifest import MANIFEST_NAME, atomic_path, load_manifest, verified_file
from .errors import EdgeRnnError
from .tolerances import (
    BUNDLE_QUANT_MEAN_PROB_DIFF, BUNDLE_QUANT_OUTPUT_RTOL, BUNDLE_QUANT_PROB_ATOL, QUANT_MIN_CONFIDENT_AGREEMENT,
)

# Manifest roles that stay on the workstation: the source models.
WORKSTATION_ROLES = ("keras", "checkpoint")
# Every member's tar header: no owner, no time, one mode — the same folder makes the same bytes.
_MTIME = 0
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def variant_role(manifest: dict[str, Any], variant: str, *, model_dir: Path) -> str:
    """The manifest role a --variant bundles; a step variant of a model whose sequence file steps itself (the char
    RNN's model.onnx) is that file."""
    if variant not in VARIANT_ROLES:
        raise EdgeRnnError(f"unknown variant {variant!r} — choose from {', '.join(VARIANT_ROLES)}")
    role = VARIANT_ROLES[variant]
    files = manifest.get("files", {})
    twin = role.replace("onnx_step", "onnx", 1)
    if role not in files and "_step" in role and twin in files and steppable_role(manifest, twin):
        role = twin
    if role not in files:
        have = ", ".join(v for v, r in VARIANT_ROLES.items() if r in files) or "none"
        if role == "onnx":
            step = f"make it with `edge-rnn export {model_dir}` first"
        elif role in FP32_ROLES:  # no step model: the export said why (manifest `step_refused`)
            step = f"the export made none ({manifest.get('step_refused') or 'the model does not stream'})"
        else:
            quantize = f"edge-rnn quantize {model_dir} --variant {variant.removeprefix('step-')}"
            # Quantizing needs the fp32 export: a folder that has none is exported first.
            step = f"make it with `{quantize}` first" if "onnx" in files else f"export it first: `edge-rnn export {model_dir}`, then `{quantize}`"
        raise EdgeRnnError(f"{model_dir} has no {variant} model (role {role!r}; it has: {have}) — {step}")
    return role


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz (np.load reads it) with fixed zip timestamps, so the same arrays give the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(value), allow_pickle=False)
    return buf.getvalue()


def _classifier_output(manifest: dict[str, Any], name: str, ref: np.ndarray) -> bool:
    """Top-1 is a promise for a model with labels whose first output scores them, (N, classes)."""
    outputs = manifest["io"]["outputs"]
    return bool(manifest.get("labels")) and outputs[0]["name"] == name and ref.ndim == 2


def tolerances_for(role: str, reference: dict[str, np.ndarray], *, manifest: dict[str, Any], adapter: Any) -> dict[str, dict]:
    """{output: {"atol", "why", "argmax_min", "mean_atol"}} for one bundled role against the source model's outputs."""
    base = role[: -len(ORT_SUFFIX)] if role.endswith(ORT_SUFFIX) else role
    stepped = "_step" in base
    result = {}
    for name, ref in reference.items():
        classifier = _classifier_output(manifest, name, ref)
        if base in FP32_ROLES:
            atol, text = adapter.tolerance(name, ref, stepped=stepped)
            why = f"float32 export vs the source model, as validated at export ({text})"
        elif classifier:
            atol = BUNDLE_QUANT_PROB_ATOL
            why = (f"quantized probabilities vs the source model: max |Δ| ≤ {atol:g} (tolerances.BUNDLE_QUANT_PROB_ATOL), "
                   f"and its mean over the inputs of each one's max |Δ| ≤ {BUNDLE_QUANT_MEAN_PROB_DIFF:g} (BUNDLE_QUANT_MEAN_PROB_DIFF)")
        else:
            scale = float(np.max(np.abs(ref))) if ref.size else 0.0
            atol = BUNDLE_QUANT_OUTPUT_RTOL * max(scale, 1.0)
            why = (f"quantized output vs the source model: max |Δ| ≤ {BUNDLE_QUANT_OUTPUT_RTOL:g} × max(|source|, 1) = {atol:.3g} "
                   "(tolerances.BUNDLE_QUANT_OUTPUT_RTOL)")
        argmax_min = QUANT_MIN_CONFIDENT_AGREEMENT if classifier else None
        mean_atol = BUNDLE_QUANT_MEAN_PROB_DIFF if classifier and base not in FP32_ROLES else None
        if classifier:
            why += f"; top-1 kept on ≥ {argmax_min:.1%} of the inputs the source is sure of"
        result[name] = {"atol": float(atol), "why": why, "argmax_min": argmax_min, "mean_atol": mean_atol}
    return result


def _class_ids(manifest: dict[str, Any], dataset: Dataset, kinds: dict[str, str]) -> tuple[str, np.ndarray] | tuple[None, None]:
    """(output, one class id per example) from the first target scored as a classifier: softmax over C > 1 classes,
    or a single sigmoid's 0/1; (None, None) where no target names one class per example (a regression, a per-step
    sequence)."""
    shapes = {s["name"]: s.get("shape", []) for s in manifest["io"]["outputs"]}
    for name, kind in kinds.items():
        if name not in dataset.targets:
            continue
        target = np.asarray(dataset.targets[name][: dataset.count])  # (N, …)
        classes = shapes[name][-1] if shapes[name] else 1
        if kind == "softmax" and isinstance(classes, int) and classes > 1:
            ids = class_targets(target, classes, ndim=len(shapes[name]))
        elif kind == "sigmoid" and target.reshape(len(target), -1).shape[1] == 1:
            ids = (target.reshape(-1) >= 0.5).astype(np.int64)
        else:
            continue
        if ids.ndim == 1:
            return name, ids
    return None, None


def round_robin(ids: np.ndarray, *, count: int) -> list[int]:
    """Up to `count` positions of `ids` taken round-robin over its classes (each class's positions in order,
    classes in id order), so every class is there as evenly as the rows allow."""
    queues = [np.flatnonzero(ids == c) for c in np.unique(ids)]
    picked: list[int] = []
    for r in range(max((len(q) for q in queues), default=0)):
        picked += [int(q[r]) for q in queues if r < len(q)]
        if len(picked) >= count:
            break
    return picked[:count]


def reference_rows(manifest: dict[str, Any], dataset: Dataset, kinds: dict[str, str], *, count: int) -> tuple[list[int], str | None, np.ndarray | None]:
    """Rows of `dataset` for a bundle's reference vectors, in stratified order, the output whose classes they are
    stratified by and the rows' class ids: `count` rows round-robin over the classes; the first `count` rows (and
    no classes) where no target names one class per example."""
    output, ids = _class_ids(manifest, dataset, kinds)
    if ids is None:
        return list(range(min(count, dataset.count))), None, None
    rows = round_robin(ids, count=count)
    return rows, output, ids[rows]


# Data rows considered for the reference vectors: this many times the count, in stratified order, of which the
# first `count` that every bundled quantized model answers within its self-test bound on this host are kept.
REFERENCE_CANDIDATES = 4


def _data_reference(manifest: dict[str, Any], data: Path, *, count: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Candidate reference inputs drawn from the user's data ({io input: (n, …)}, state inputs at zero), in
    stratified order, and where from."""
    from .evaluate import model_feeds, open_for, output_kinds

    dataset = open_for(manifest, data, need_targets=True)
    rows, stratified_by, classes = reference_rows(manifest, dataset, output_kinds(manifest, dataset), count=REFERENCE_CANDIDATES * count)
    parts = [dataset.rows(i, i + 1)[0] for i in rows]
    feeds = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    drawn = {"file": data.name, "rows": rows, "stratified_by": stratified_by, "classes": classes}
    return model_feeds(manifest, feeds), drawn


def _stable_rows(candidates: Bundle, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], *, manifest: dict[str, Any],
                 adapter: Any) -> np.ndarray:
    """Which candidate rows every bundled quantized model answers within its self-test bound here (bool per row).

    A self-test proves that a device computes what this host computed; a row on which a quantized model already
    flips the source's answer here (a rare near-decision, counted in the data metrics) would fail on every
    device and prove nothing, so such rows are not made reference vectors."""
    from .device.selftest import _answers

    ok = np.ones(len(next(iter(inputs.values()))), bool)
    for role in candidates.roles:
        base = role[: -len(ORT_SUFFIX)] if role.endswith(ORT_SUFFIX) else role
        if base in FP32_ROLES:
            continue
        tolerances = tolerances_for(role, outputs, manifest=manifest, adapter=adapter)
        got = _answers(load_bundle_model(candidates.path, role=role, threads=1, bundle=candidates), inputs, outputs)
        for name, ref in outputs.items():
            if name not in got or name not in tolerances:
                continue
            delta = np.abs(got[name].astype(np.float64) - ref.astype(np.float64)).reshape(len(ref), -1).max(axis=1)
            ok &= delta <= tolerances[name]["atol"]
            if tolerances[name]["argmax_min"] is not None:
                from .device.labels import agreement, label_kind

                ok &= agreement(ref, got[name], 0.0, kind=label_kind(manifest, classes=ref.shape[-1]))[0]
    return ok


def _sure_first(manifest: dict[str, Any], outputs: dict[str, np.ndarray], *, count: int) -> np.ndarray:
    """`count` candidate rows, in candidate order: for a classifier, those the source model is sure of first (up to
    half of `count`, QUANT_CONFIDENT_MARGIN as the self-test judges it), then the others; otherwise the first `count`."""
    from .device.labels import agreement, label_kind
    from .tolerances import QUANT_CONFIDENT_MARGIN

    total = len(next(iter(outputs.values())))
    first = manifest["io"]["outputs"][0]["name"]
    ref = outputs.get(first)
    if ref is None or not _classifier_output(manifest, first, ref):
        return np.arange(min(count, total))
    _, sure = agreement(ref, ref, QUANT_CONFIDENT_MARGIN, kind=label_kind(manifest, classes=ref.shape[-1]))
    chosen = set(np.flatnonzero(sure)[: count // 2].tolist())
    chosen.update([i for i in range(total) if i not in chosen][: count - len(chosen)])
    return np.asarray(sorted(chosen), dtype=np.intp)


def data_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a data file, or of a folder's .npy files (each one's name and sha256, in name order)."""
    from .device.manifest import sha256_file

    path = Path(path)
    if path.is_dir():
        listing = "".join(f"{p.name}\0{sha256_file(p)}\n" for p in sorted(path.iterdir()) if p.suffix == ".npy")
        return hashlib.sha256(listing.encode("utf-8")).hexdigest()
    return sha256_file(path)


def _data_metrics(bundle: Bundle, data: Path, *, batch: int) -> dict[str, Any]:
    """The `data_metrics` block: every bundled model, loaded from the bytes it is bundled as, scored on the whole
    data set at `batch` (edge_rnn.evaluate: its headline metric with the 95% interval, and its promise's verdict)."""
    from .evaluate import evaluate_models

    models = {role: load_bundle_model(bundle.path, role=role, threads=1, bundle=bundle) for role in bundle.roles}
    evaluation = evaluate_models(bundle.manifest, models, data=data, batch=batch, need_targets=True)
    roles = {}
    for v in evaluation.variants:
        h = v.headline
        roles[v.role] = {"output": next(iter(v.figures)), "metric": h.name, "value": h.value, "low": h.low, "high": h.high,
                         "ok": v.verdict.ok}
    return {"data": data.name, "sha256": data_digest(data), "examples": evaluation.count, "batch": batch,
            "kinds": evaluation.kinds, "roles": roles}


def _to_ort(model_path: Path, out_dir: Path) -> tuple[Path, Path]:
    """The .ort form of a model and its required_operators.config (edge_rnn.export.ort_format)."""
    from .export.ort_format import to_ort

    return to_ort(model_path, out_dir)


def make_bundle(
    model_dir: str | os.PathLike[str],
    *,
    variants: tuple[str, ...] | list[str] = ("int8",),
    ort: bool = False,
    out: str | os.PathLike[str] | None = None,
    config: BundleConfig = BundleConfig(),
    data: str | os.PathLike[str] | None = None,
) -> Path:
    """Write `out` (default: DIR.tar.gz beside DIR) atomically: the variants' model files, a device manifest and the
    source model's reference vectors (see edge_rnn/device/bundle.py). With labelled `data` (.npz or a folder of .npy),
    the reference inputs are drawn from it and every bundled model's metric on it is recorded. Returns the bundle's path."""
    from .models import adapter_for

    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    out_path = Path(out) if out is not None else model_dir.parent / f"{model_dir.name}{BUNDLE_SUFFIX}"
    if not out_path.name.endswith(BUNDLE_SUFFIX):
        raise EdgeRnnError(f"{out_path}: a bundle's name ends in {BUNDLE_SUFFIX} (devices tell bundles from model files by it)")
    if not variants:
        raise EdgeRnnError("no --variant given — name at least one (e.g. --variant int8)")
    roles = list(dict.fromkeys(variant_role(manifest, v, model_dir=model_dir) for v in variants))
    files: dict[str, bytes] = {}  # member name → bytes
    entries: dict[str, dict[str, Any]] = {}  # role → files entry
    for role in roles:
        path = verified_file(manifest, model_dir, role)
        files[path.name] = path.read_bytes()
        entries[role] = dict(manifest["files"][role], path=path.name)

    adapter = adapter_for(manifest)
    drawn: dict[str, Any] | None = None
    source = adapter.load(model_dir, manifest)
    if data is None:
        inputs = adapter.reference_inputs(manifest, count=config.count * config.candidates, time_steps=config.time_steps,
                                          seed=config.seed)
    else:
        inputs, drawn = _data_reference(manifest, Path(data), count=config.count)
    outputs = adapter.reference(source, inputs, io=manifest["io"])
    outputs = {name: np.asarray(y) for name, y in outputs.items()}
    if data is None:
        rows = _sure_first(manifest, outputs, count=config.count)
        inputs = {k: v[rows] for k, v in inputs.items()}
        outputs = {k: v[rows] for k, v in outputs.items()}
    if drawn is not None:
        candidates = Bundle(out_path, dict(manifest, files={r: entries[r] for r in roles}),
                            {entries[r]["path"]: files[entries[r]["path"]] for r in roles})
        stable = _stable_rows(candidates, inputs, outputs, manifest=manifest, adapter=adapter)
        classes = drawn.pop("classes")
        usable = np.flatnonzero(stable)
        # Stratified again over the usable rows, so a row passed over is replaced by one of its own class.
        kept = [int(usable[i]) for i in round_robin(classes[usable], count=config.count)] if classes is not None \
            else [int(i) for i in usable[: config.count]]
        kept.sort(key=lambda i: drawn["rows"][i])  # in data order
        if not kept:
            raise EdgeRnnError(f"no row of {data} is answered by the quantized models within the self-test's bounds — "
                               "their promise fails on this data (see `edge-rnn evaluate`); bundle the fp32 variant")
        inputs = {k: v[kept] for k, v in inputs.items()}
        outputs = {k: v[kept] for k, v in outputs.items()}
        drawn = dict(drawn, rows=[drawn["rows"][i] for i in kept], passed_over=int(np.sum(~stable)))

    if ort:
        with tempfile.TemporaryDirectory(prefix="edge-rnn-ort-") as tmp:
            for role in roles:
                ort_path, ops_path = _to_ort(verified_file(manifest, model_dir, role), Path(tmp) / role)
                for suffix, produced in ((ORT_SUFFIX, ort_path), (f"{ORT_SUFFIX}_config", ops_path)):
                    name = produced.name if produced.suffix == ".ort" else f"{Path(entries[role]['path']).stem}.{produced.name}"
                    files[name] = produced.read_bytes()
                    entries[f"{role}{suffix}"] = {"path": name, "sha256": hashlib.sha256(files[name]).hexdigest(), "bytes": len(files[name])}

    reference = _npz_bytes({**{f"input/{k}": v for k, v in inputs.items()}, **{f"output/{k}": v for k, v in outputs.items()}})
    files[REFERENCE_NAME] = reference
    entries[REFERENCE_ROLE] = {"path": REFERENCE_NAME, "sha256": hashlib.sha256(reference).hexdigest(), "bytes": len(reference)}

    device = copy.deepcopy(manifest)
    device["files"] = entries
    device["bundle"] = {"format": BUNDLE_FORMAT, "made_by": __version__, "variants": list(variants), "roles": roles}
    model_roles = [r for r in entries if r != REFERENCE_ROLE and not r.endswith("_config")]
    device["reference"] = {
        "file": REFERENCE_NAME,
        "source": adapter.source_kind,
        "count": len(next(iter(inputs.values()))),
        "inputs": list(inputs),
        "outputs": list(outputs),
        "tolerances": {r: tolerances_for(r, outputs, manifest=manifest, adapter=adapter) for r in model_roles},
        **({"data": drawn} if drawn is not None else {}),
    }
    members = [(entries[r]["path"], files[entries[r]["path"]]) for r in entries]
    if data is not None:
        device[DATA_METRICS] = _data_metrics(Bundle(out_path, device, dict(members)), Path(data), batch=config.data_batch)
    members.insert(0, (MANIFEST_NAME, (json.dumps(device, indent=2) + "\n").encode("utf-8")))
    with atomic_path(out_path) as tmp:
        _write_tar_gz(tmp, members)
    return out_path


def _write_tar_gz(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A ustar archive in gzip with fixed times, owners and modes, members in the given order."""
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=_MTIME) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
