"""Quantize an exported model with onnxruntime.quantization, and report what was quantized.

Variants (file roles in the manifest):
- `onnx_int8`   dynamic int8 weights (quantize_dynamic after ORT's pre-processing): LSTM → DynamicQuantizeLSTM,
                MatMul → MatMulInteger; activations quantized on the fly.
- `onnx_fp16`   float16 weights and compute, float32 inputs/outputs (onnxruntime.transformers.float16).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdgeRnnError, require
from .export import op_counts
from .manifest import atomic_path, load_manifest, record_file, save_manifest, verified_file

# Variant name → (manifest role, file name).
VARIANTS: dict[str, tuple[str, str]] = {
    "int8": ("onnx_int8", "model.int8.onnx"),
    "fp16": ("onnx_fp16", "model.fp16.onnx"),
}
# Ops that carry quantized weights or integer compute.
QUANTIZED_OPS = (
    "DynamicQuantizeLSTM",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "QLinearMatMul",
    "DynamicQuantizeLinear",
    "QuantizeLinear",
    "DequantizeLinear",
    "ConvInteger",
    "QGemm",
    "QAttention",
)
# Ops with weights that stayed in floating point.
FLOAT_WEIGHT_OPS = ("LSTM", "GRU", "RNN", "MatMul", "Gemm", "Gather", "Conv")


@dataclass
class QuantizeReport:
    variant: str
    path: Path
    bytes: int
    fp32_bytes: int
    op_counts: dict[str, int]
    coverage: dict[str, Any]


def coverage(fp32_counts: dict[str, int], q_counts: dict[str, int], *, variant: str) -> dict[str, Any]:
    """Which weight-carrying ops were quantized and which stayed float (with the reason we know of)."""
    quantized = {op: n for op, n in q_counts.items() if op in QUANTIZED_OPS}
    still_float = {op: n for op, n in q_counts.items() if op in FLOAT_WEIGHT_OPS}
    reasons = {
        "RNN": "onnxruntime has no quantized RNN kernel",
        "GRU": "onnxruntime has no quantized GRU kernel",
        "Gather": "embedding-style Gather kept float (quantize_dynamic only quantizes Gather of large initializers)",
        "LSTM": "static QDQ has no LSTM kernel; only dynamic quantization fuses LSTM",
        "MatMul": "activation-activation MatMul, or a MatMul the quantizer excluded",
    }
    if variant == "fp16":
        return {"quantized": {}, "float16": {op: n for op, n in q_counts.items() if op in FLOAT_WEIGHT_OPS}, "still_float32": {}}
    return {
        "quantized": quantized,
        "still_float": {op: {"count": n, "why": reasons.get(op, "")} for op, n in still_float.items()},
        "fp32_ops": {op: n for op, n in fp32_counts.items() if op in FLOAT_WEIGHT_OPS},
    }


def _dynamic_int8(src: Path, dst: Path) -> None:
    quantization = require("onnxruntime.quantization", "train")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        # ORT recommends its pre-processing (symbolic shape inference + graph optimisation) before quantizing.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        quantization.quantize_dynamic(str(pre), str(dst), weight_type=quantization.QuantType.QInt8)


def _fp16(src: Path, dst: Path) -> None:
    onnx = require("onnx", "train")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


_MAKERS = {"int8": _dynamic_int8, "fp16": _fp16}


def quantize(model_dir: str | os.PathLike[str], *, variants: tuple[str, ...] = ("int8",)) -> list[QuantizeReport]:
    """Make each variant of `model_dir/model.onnx`, record it in the manifest, return coverage reports."""
    onnx = require("onnx", "train")
    model_dir = Path(model_dir)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise EdgeRnnError(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    manifest = load_manifest(model_dir)
    src = verified_file(manifest, model_dir, "onnx")
    fp32_counts = op_counts(onnx.load(str(src)))
    reports = []
    for variant in variants:
        role, name = VARIANTS[variant]
        with atomic_path(model_dir / name) as tmp:
            _MAKERS[variant](src, tmp)
            q_counts = op_counts(onnx.load(str(tmp)))
        record_file(manifest, model_dir, role, name)
        cov = coverage(fp32_counts, q_counts, variant=variant)
        manifest.setdefault("graphs", {})[role] = q_counts
        manifest.setdefault("quantization", {})[role] = cov
        reports.append(
            QuantizeReport(variant, model_dir / name, (model_dir / name).stat().st_size, src.stat().st_size, q_counts, cov)
        )
    save_manifest(model_dir, manifest)
    return reports
