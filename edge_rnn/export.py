"""Export a model folder to ONNX: Keras via tf2onnx, the NumPy char RNN via onnx.helper; audit the graph.

Generic over models: the exporter is chosen by the files the manifest lists (`keras` or `checkpoint`),
and the input/output names and shapes come from the manifest's `io` block.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import ExportConfig
from .errors import EdgeRnnError, ModelFileError, require
from .device.manifest import atomic_path, load_manifest, record_file, save_manifest, verified_file
from .tolerances import FP32_LOGIT_ATOL, FP32_PROB_ATOL

ONNX_FILE = "model.onnx"
BATCH_DIM = "batch"
# Fused recurrent ops; an export holding recurrent layers but none of these fell back to Loop.
FUSED_RECURRENT_OPS = ("LSTM", "GRU", "RNN")
KERAS_RECURRENT_LAYERS = ("LSTM", "GRU", "SimpleRNN")
# 13: Unsqueeze/Squeeze take axes as inputs (the char-RNN graph); 18: the newest tf2onnx 1.17 converts to.
SUPPORTED_OPSETS = range(13, 19)


@dataclass
class ExportReport:
    path: Path
    op_counts: dict[str, int]
    opset: int
    max_abs_diff: float | None = None
    notes: list[str] = field(default_factory=list)


def op_counts(model) -> dict[str, int]:
    """Count nodes by op type in the main graph of an onnx.ModelProto."""
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def _set_metadata(model, props: dict[str, Any]) -> None:
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _name_batch_axis(model) -> None:
    """tf2onnx names the dynamic batch axis `unk__N`; call it `batch` on every graph input and output."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_param = BATCH_DIM


def _save_validated(model, path: Path, *, validate: Callable[[Path], float], atol: float, source: str) -> float:
    """check_model(full_check=True), write to a temporary file, compare it with the source model, and only
    then rename it over `path`: a failed export leaves the previous model.onnx as it was."""
    from .device.runtime import ORT_ERRORS

    onnx = require("onnx", "train")
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise EdgeRnnError(f"the exported graph fails onnx.checker ({str(exc).splitlines()[0]}) — not saved") from exc
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
        try:
            diff = validate(tmp)
        except ORT_ERRORS as exc:
            raise EdgeRnnError(f"onnxruntime cannot run the exported graph ({str(exc).splitlines()[0]}) — not saved") from exc
        if not diff <= atol:
            raise EdgeRnnError(f"the ONNX export differs from {source} by {diff:.3g} > {atol:g} — not saved")
    return diff


def keras_to_onnx(keras_model, *, io: dict[str, Any], opset: int):
    """Keras 3 model → onnx.ModelProto with fused recurrent ops, via tf2onnx.convert.from_function.

    (tf2onnx.convert.from_keras fails under Keras 3; a tf.function with an input_signature works.)
    """
    tf = require("tensorflow", "train")
    tf2onnx = require("tf2onnx", "train")
    specs = [
        tf.TensorSpec([None if isinstance(d, str) else d for d in spec["shape"]], spec["dtype"], name=spec["name"])
        for spec in io["inputs"]
    ]
    output_names = [spec["name"] for spec in io["outputs"]]

    @tf.function(input_signature=specs)
    def serve(*inputs):
        outputs = keras_model(inputs[0] if len(inputs) == 1 else list(inputs), training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        return dict(zip(output_names, outputs))

    model, _ = tf2onnx.convert.from_function(serve, input_signature=specs, opset=opset)
    _name_batch_axis(model)
    return model


def _export_versions() -> dict[str, str]:
    import onnxruntime as ort

    onnx = require("onnx", "train")
    return {"onnx": onnx.__version__, "onnxruntime": ort.__version__}


def _recurrent_layers(keras_model) -> list[str]:
    return [layer.__class__.__name__ for layer in keras_model.layers if layer.__class__.__name__ in KERAS_RECURRENT_LAYERS]


def _validate_keras_export(keras_model, onnx_path: Path, io: dict[str, Any], *, seed: int = 0) -> float:
    """Max |Δ| between Keras and onnxruntime on 64 random inputs in the preprocessed range [0, 1]."""
    import onnxruntime as ort

    spec = io["inputs"][0]
    shape = [64 if isinstance(d, str) else d for d in spec["shape"]]
    x = np.random.default_rng(seed).random(shape, dtype=np.float32)
    expected = np.asarray(keras_model(x, training=False))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run([io["outputs"][0]["name"]], {spec["name"]: x})
    return float(np.max(np.abs(expected - got)))


def _export_keras(model_dir: Path, manifest: dict[str, Any], cfg: ExportConfig) -> ExportReport:
    from .lstm import load_keras_model, versions
    from .optimize import clean_recurrent_graph

    keras_model, _ = load_keras_model(model_dir)
    onnx_model = keras_to_onnx(keras_model, io=manifest["io"], opset=cfg.opset)
    raw_counts = op_counts(onnx_model)
    onnx_model, clean_report = clean_recurrent_graph(onnx_model)
    counts = op_counts(onnx_model)
    notes = [f"graph cleanup: {raw_counts} → {counts}"]
    recurrent = _recurrent_layers(keras_model)
    fused = sum(counts.get(op, 0) for op in FUSED_RECURRENT_OPS)
    if recurrent and fused < len(recurrent):
        notes.append(f"only {fused} fused recurrent ops for {len(recurrent)} recurrent layers ({recurrent}): tf2onnx fell back to Loop")
    _set_metadata(
        onnx_model,
        {
            "edge_rnn.model": manifest["model"],
            "edge_rnn.config": manifest.get("config", {}),
            "edge_rnn.preprocessing": manifest.get("preprocessing", {}),
            "edge_rnn.labels": manifest.get("labels", []),
            "edge_rnn.versions": versions(),
            "edge_rnn.cleanup": clean_report,
        },
    )
    path = model_dir / ONNX_FILE
    diff = _save_validated(
        onnx_model, path, validate=lambda tmp: _validate_keras_export(keras_model, tmp, manifest["io"]),
        atol=FP32_PROB_ATOL, source="Keras on random inputs",
    )
    return ExportReport(path, counts, cfg.opset, diff, notes)


def _export_char_rnn(model_dir: Path, manifest: dict[str, Any], cfg: ExportConfig) -> ExportReport:
    import onnxruntime as ort

    from .char_rnn import forward, load_checkpoint
    from .graphs import char_rnn_model

    ckpt = load_checkpoint(verified_file(manifest, model_dir, "checkpoint"))
    if list(ckpt.vocab) != manifest.get("vocab"):
        raise ModelFileError(f"the checkpoint's vocabulary differs from the manifest's in {model_dir} — retrain the folder")
    onnx_model = char_rnn_model(ckpt.params, vocab=ckpt.vocab, opset=cfg.opset)
    (ids_name, h0_name) = [spec["name"] for spec in manifest["io"]["inputs"]]

    def validate(tmp: Path) -> float:
        # NumPy float64 vs onnxruntime on a random id sequence from a random state.
        rng = np.random.default_rng(0)
        ids = rng.integers(0, len(ckpt.vocab), size=200)
        h0 = rng.standard_normal((ckpt.hidden, 1)) * 0.5
        expected, h_expected = forward(ckpt.params, ids=ids, h_prev=h0)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        logits, h = session.run(None, {ids_name: ids[None].astype(np.int64), h0_name: h0.T.astype(np.float32)})
        return max(float(np.max(np.abs(logits[0] - expected))), float(np.max(np.abs(h - h_expected.T))))

    path = model_dir / ONNX_FILE
    diff = _save_validated(onnx_model, path, validate=validate, atol=FP32_LOGIT_ATOL, source="the NumPy model")
    return ExportReport(path, op_counts(onnx_model), cfg.opset, diff)


def export(model_dir: str | os.PathLike[str], *, cfg: ExportConfig = ExportConfig()) -> ExportReport:
    """Export the model in `model_dir` to `model_dir/model.onnx`, record it in the manifest, return a report."""
    require("onnx", "train")
    if cfg.opset not in SUPPORTED_OPSETS:
        raise EdgeRnnError(f"--opset {cfg.opset} is not supported; choose {SUPPORTED_OPSETS.start}–{SUPPORTED_OPSETS.stop - 1}")
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    files = manifest.get("files", {})
    if "keras" in files:
        report = _export_keras(model_dir, manifest, cfg)
    elif "checkpoint" in files:
        report = _export_char_rnn(model_dir, manifest, cfg)
    else:
        raise ModelFileError(f"manifest in {model_dir} lists neither a 'keras' model nor a 'checkpoint' — train first")
    manifest = load_manifest(model_dir)
    # Variants derived from an older model.onnx no longer describe this one.
    for role in [r for r in manifest["files"] if r.startswith("onnx_")]:
        del manifest["files"][role]
    record_file(manifest, model_dir, "onnx", ONNX_FILE)
    manifest["opset"] = report.opset
    manifest.setdefault("versions", {}).update(_export_versions())
    manifest.setdefault("graphs", {})["onnx"] = report.op_counts
    if report.max_abs_diff is not None:
        manifest.setdefault("metrics", {})["export_random_input_max_abs_diff"] = report.max_abs_diff
    save_manifest(model_dir, manifest)
    return report
