"""Quantize an exported model with onnxruntime.quantization, and report what was quantized.

Variants (file roles in the manifest):
- `onnx_int8`         dynamic int8 weights (quantize_dynamic after ORT's pre-processing): LSTM → DynamicQuantizeLSTM,
                      MatMul → MatMulInteger; activations quantized on the fly.
- `onnx_int8_static`  static int8 in QDQ format (quantize_static), activation ranges calibrated on real training
                      data; onnxruntime has no static LSTM/GRU/RNN kernel, so the recurrent ops stay float.
- `onnx_fp16`         float16 weights and compute, float32 inputs/outputs (onnxruntime.transformers.float16).
- `onnx_step_int8`    dynamic int8 of the step model `model.step.onnx`, where the folder has one.

Any folder works: the model's adapter (edge_rnn.models) gives the calibration data — the built-in models'
own training data, or for a user's Keras model the `.npy` files the user names. onnxruntime has int8
kernels for LSTM only, so GRU and RNN stay float32 and the coverage report says so. Every variant that
streams (its graph takes the manifest's state inputs) is run next to its fp32 step model over
DRIFT_STEPS steps, and the drift (max |Δ| of outputs and state) goes into its coverage record.

Measured choices (mnist-lstm, onnxruntime 1.32, 1 thread, batch 1): per-channel weights make the dynamic
model 12 % slower and bigger with no accuracy gain; reduce_range, QUInt8 weights and skipping the
pre-processing are all within noise. So: per-tensor QInt8 weights, after pre-processing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import EdgeRnnError, require
from .export import op_counts
from .device.hostinfo import cpu_features
from .device.manifest import atomic_path, folder_lock, load_manifest, record_file, save_manifest, verified_file

# Variant name → (manifest role, file name).
VARIANTS: dict[str, tuple[str, str]] = {
    "int8": ("onnx_int8", "model.int8.onnx"),
    "int8-static": ("onnx_int8_static", "model.int8-static.onnx"),
    "fp16": ("onnx_fp16", "model.fp16.onnx"),
}
# The step model (model.step.onnx) gets dynamic int8 only: it runs one step per call on a device, where
# int8 weights matter; static QDQ would need calibration feeds for every state tensor.
STEP_VARIANTS: dict[str, tuple[str, str]] = {"int8": ("onnx_step_int8", "model.step.int8.onnx")}
# A streaming variant is run this many steps next to fp32 (state carried, never reset) to measure its drift.
DRIFT_STEPS = 1000
FP16_KEEP_FLOAT32 = ("Transpose",)
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Calibration inputs: enough real samples for stable ranges, few enough that Entropy/Percentile stay fast.
CALIBRATION_SAMPLES = 256
CALIBRATION_BATCH = 32
# Ops that carry quantized weights or integer compute.
QUANTIZED_OPS = (
    "DynamicQuantizeLSTM",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QLinearMatMul",
    "QGemm",
    "QLinearSoftmax",
    "QLinearAdd",
    "QLinearMul",
    "QLinearConv",
    "ConvInteger",
    "QAttention",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
)
# Ops that only convert between float and int8 (no compute of their own).
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
# Ops whose weights decide the file size; they stay float unless quantized.
FLOAT_WEIGHT_OPS = ("LSTM", "GRU", "RNN", "MatMul", "Gemm", "Gather", "Conv", "FusedGemm", "FusedMatMul")
WHY_FLOAT = {
    "int8": {
        "RNN": "onnxruntime has no quantized RNN kernel (quantize_dynamic fuses only LSTM)",
        "GRU": "onnxruntime has no quantized GRU kernel (quantize_dynamic fuses only LSTM)",
        "LSTM": "quantize_dynamic left this LSTM float (unsupported attributes or weights not initializers)",
        "MatMul": "both inputs are activations (no weight to quantize) or the quantizer excluded it",
        "Gemm": "quantize_dynamic does not quantize Gemm; pre-processing fused MatMul+Add into it",
        "Gather": "embedding Gather kept float (quantize_dynamic quantizes Gather only of large initializers)",
    },
    "int8-static": {
        "LSTM": "onnxruntime has no static (QDQ) LSTM kernel; only quantize_dynamic makes DynamicQuantizeLSTM",
        "GRU": "onnxruntime has no static (QDQ) GRU kernel",
        "RNN": "onnxruntime has no static (QDQ) RNN kernel",
        "MatMul": "both inputs are activations, or the quantizer excluded it",
        "Gemm": "the quantizer excluded it",
        "Gather": "the quantizer excluded it",
    },
}


@dataclass
class QuantizeReport:
    variant: str
    path: Path
    bytes: int
    fp32_bytes: int
    op_counts: dict[str, int]
    coverage: dict[str, Any]
    role: str = ""


def _dtype_bytes(tensor) -> int:
    onnx = require("onnx", "train")
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def weight_bytes(model) -> dict[str, Any]:
    """Initializer bytes of an onnx.ModelProto: total, by dtype, and by the op that consumes them.

    A weight behind a DequantizeLinear (QDQ) or Cast is counted under the op that uses the dequantized value.
    """
    onnx = require("onnx", "train")
    g = model.graph
    sizes = {t.name: _dtype_bytes(t) for t in g.initializer}
    dtypes = {t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in g.initializer}
    consumers: dict[str, list] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def final_op(node) -> str:
        # Follow weight → DequantizeLinear/Cast → the op that computes with it.
        seen = 0
        while node.op_type in ("DequantizeLinear", "Cast") and seen < 4:
            nxt = consumers.get(node.output[0], [])
            if len(nxt) != 1:
                break
            node, seen = nxt[0], seen + 1
        return node.op_type

    by_op: Counter[str] = Counter()
    by_dtype: Counter[str] = Counter()
    for name, size in sizes.items():
        by_dtype[dtypes[name]] += size
        users = consumers.get(name, [])
        by_op[final_op(users[0]) if users else "(unused)"] += size
    return {"total": sum(sizes.values()), "by_dtype": dict(by_dtype), "by_op": dict(by_op.most_common())}


def _qdq_ops(model) -> dict[str, int]:
    """Compute ops fed by a DequantizeLinear of a weight initializer: what static QDQ quantized."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    dq_of_weight = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    return dict(Counter(n.op_type for n in g.node if n.op_type != "DequantizeLinear" and dq_of_weight & set(n.input)))


def runtime_op_counts(path: str | os.PathLike[str], *, opt_level: str = "all") -> dict[str, int]:
    """Op counts of the graph onnxruntime actually runs (after its graph optimisations fuse QDQ into int8 kernels)."""
    import onnxruntime as ort

    onnx = require("onnx", "train")
    from .device.runtime import session_options

    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads=1, opt_level=opt_level)
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        # Serialising an ORT_ENABLE_ALL graph logs a "hardware specific" warning; only errors matter here.
        options.log_severity_level = 3
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        return op_counts(onnx.load(options.optimized_model_filepath))


def coverage(
    fp32_model, q_model, *, variant: str, runtime_ops: dict[str, int] | None = None
) -> dict[str, Any]:
    """Which weight-carrying ops were quantized, which stayed float and why, and what that did to the weights' size."""
    fp32_w, q_w = weight_bytes(fp32_model), weight_bytes(q_model)
    q_counts = op_counts(q_model)
    size = {
        "fp32_weight_bytes": fp32_w["total"],
        "weight_bytes": q_w["total"],
        "weight_ratio": q_w["total"] / max(1, fp32_w["total"]),
        "by_dtype": q_w["by_dtype"],
        "by_op": q_w["by_op"],
    }
    if variant == "fp16":
        report = {
            "quantized": {},
            "float16": {op: n for op, n in q_counts.items() if op in FLOAT_WEIGHT_OPS},
            "still_float": {},
            "note": "every float32 weight is stored as float16; inputs/outputs stay float32 (Cast at the edges)",
            "size": size,
        }
        if runtime_ops is not None:
            # onnxruntime's CPU provider lacks float16 kernels for most ops and inserts Casts back to float32.
            report["runtime_ops"] = runtime_ops
        return report
    if variant == "int8-static":
        qdq = _qdq_ops(q_model)
        quantized = {f"{op} (QDQ)": n for op, n in qdq.items()}
        remaining = Counter({op: n for op, n in q_counts.items() if op in FLOAT_WEIGHT_OPS})
        remaining.subtract(qdq)
        still_float = {op: n for op, n in remaining.items() if n > 0}
    else:
        quantized = {op: n for op, n in q_counts.items() if op in QUANTIZED_OPS and op not in QDQ_OPS}
        still_float = {op: n for op, n in q_counts.items() if op in FLOAT_WEIGHT_OPS}
    reasons = WHY_FLOAT.get(variant, {})
    report: dict[str, Any] = {
        "quantized": quantized,
        "still_float": {
            op: {"count": n, "weight_bytes": q_w["by_op"].get(op, 0), "why": reasons.get(op, "no int8 kernel for this op")}
            for op, n in still_float.items()
        },
        "fp32_ops": {op: n for op, n in op_counts(fp32_model).items() if op in FLOAT_WEIGHT_OPS},
        "size": size,
    }
    if runtime_ops is not None:
        report["runtime_ops"] = runtime_ops
        report["runtime_int8_ops"] = {op: n for op, n in runtime_ops.items() if op in QUANTIZED_OPS and op not in QDQ_OPS}
    return report


# ---------------------------------------------------------------------------------------------
# Variant makers


def _pre_process(src: Path, dst: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # ORT recommends its pre-processing (symbolic shape inference + graph optimisation) before quantizing.
    quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)


def _dynamic_int8(src: Path, dst: Path, **_: Any) -> dict[str, Any]:
    quantization = require("onnxruntime.quantization", "train")
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        _pre_process(src, pre)
        quantization.quantize_dynamic(str(pre), str(dst), weight_type=quantization.QuantType.QInt8)
    return {"weights": "QInt8 per-tensor", "activations": "uint8, quantized at run time"}


class _FeedReader:
    """onnxruntime's CalibrationDataReader protocol (get_next until None) over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _static_int8(src: Path, dst: Path, *, feeds: Callable[[], list[dict[str, np.ndarray]]], calibration: str,
                 calibration_data: str, **_: Any) -> dict[str, Any]:
    quantization = require("onnxruntime.quantization", "train")
    method = {
        "minmax": quantization.CalibrationMethod.MinMax,
        "entropy": quantization.CalibrationMethod.Entropy,
        "percentile": quantization.CalibrationMethod.Percentile,
    }[calibration]
    feeds = feeds()
    reader = _FeedReader(feeds)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        _pre_process(src, pre)
        quantization.quantize_static(
            str(pre),
            str(dst),
            reader,
            quant_format=quantization.QuantFormat.QDQ,
            calibrate_method=method,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8,
        )
    n = sum(len(next(iter(f.values()))) for f in feeds)
    return {"format": "QDQ", "calibration": calibration, "calibration_samples": n, "calibration_data": calibration_data}


def _fp16(src: Path, dst: Path, **_: Any) -> dict[str, Any]:
    onnx = require("onnx", "train")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # Transposes stay float32 (they hold no weights, so the file is no bigger): onnxruntime 1.32 segfaults
    # creating an ORT_ENABLE_ALL session for the char RNN's graph when its Transposes run in float16.
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, op_block_list=FP16_KEEP_FLOAT32)
    onnx.save(model, str(dst))
    return {"weights": "float16", "io": "float32", "float32_ops": list(FP16_KEEP_FLOAT32)}


_MAKERS = {"int8": _dynamic_int8, "int8-static": _static_int8, "fp16": _fp16}


@contextlib.contextmanager
def _quiet_root_logging() -> Iterator[None]:
    """onnxruntime.quantization warns on the root logger, dumping whole TypeProtos for inputs it does not
    quantize (e.g. the char RNN's int64 `ids`); what it did is in the coverage report instead."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def parse_calibration_data(items: Sequence[str]) -> dict[str, str]:
    """`FILE.npy` (the model's one input) or `NAME=FILE.npy` per input → {input name or "": path}."""
    data: dict[str, str] = {}
    for item in items:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        if name in data:
            raise EdgeRnnError(f"--calibration-data gives {name or 'the input'!r} twice")
        data[name] = path
    if "" in data and len(data) > 1:
        raise EdgeRnnError("--calibration-data: with several files, name each input: NAME=FILE.npy")
    return data


def steppable(model, step: dict[str, Any] | None) -> bool:
    """A model file streams when its graph inputs include every state input of the manifest's step block."""
    names = {i.name for i in model.graph.input}
    return bool(step) and all(s["input"] in names for s in step["state"])


def quantize(
    model_dir: str | os.PathLike[str],
    *,
    variants: tuple[str, ...] = ("int8",),
    calibration: str = "minmax",
    calibration_samples: int = CALIBRATION_SAMPLES,
    calibration_data: Sequence[str] = (),
) -> list[QuantizeReport]:
    """Make each variant of `model_dir/model.onnx` (and int8 of model.step.onnx), record them in the manifest,
    return coverage reports; a streaming variant also gets its drift from fp32 over DRIFT_STEPS steps."""
    from .models import adapter_for
    from .validate import drift

    onnx = require("onnx", "train")
    model_dir = Path(model_dir)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise EdgeRnnError(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    if calibration not in CALIBRATION_METHODS:
        raise EdgeRnnError(f"unknown calibration method {calibration!r}; choose from {list(CALIBRATION_METHODS)}")
    data = parse_calibration_data(calibration_data)
    if data and "int8-static" not in variants:
        raise EdgeRnnError("--calibration-data is for --variant int8-static")
    with folder_lock(model_dir):  # no other writer between reading the manifest and saving it
        manifest = load_manifest(model_dir)
        adapter = adapter_for(manifest)
        step = manifest.get("step")
        jobs = []  # (variant, fp32 role, variant role, variant file)
        for variant in variants:
            jobs.append((variant, "onnx", *VARIANTS[variant]))
            if variant in STEP_VARIANTS and "onnx_step" in manifest["files"]:
                jobs.append((variant, "onnx_step", *STEP_VARIANTS[variant]))
        sources = {role: verified_file(manifest, model_dir, role) for role in {job[1] for job in jobs}}
        stream: dict[str, np.ndarray] | None = None
        reports = []
        for variant, src_role, role, name in jobs:
            src = sources[src_role]
            if (model_dir / name).resolve() == src.resolve():
                raise EdgeRnnError(f"the {variant} output {model_dir / name} is the model it is made from — fix the "
                                   f"'{src_role}' entry of {model_dir / 'manifest.json'}; nothing written")
            fp32_model = onnx.load(str(src))
            feeds = functools.partial(adapter.calibration_feeds, model_dir, manifest, src, samples=calibration_samples,
                                      batch=CALIBRATION_BATCH, data=data or None)
            described = f"files {data}" if data else "training split"
            with atomic_path(model_dir / name) as tmp, _quiet_root_logging():
                settings = _MAKERS[variant](src, tmp, feeds=feeds, calibration=calibration, calibration_data=described)
                q_model = onnx.load(str(tmp))
                runtime_ops = runtime_op_counts(tmp)
                step_drift = None
                if steppable(q_model, step):
                    stream = adapter.stream_inputs(manifest, steps=DRIFT_STEPS, seed=0) if stream is None else stream
                    step_drift = drift(src, tmp, step, stream)
            record_file(manifest, model_dir, role, name)
            cov = coverage(fp32_model, q_model, variant=variant, runtime_ops=runtime_ops)
            cov["settings"] = settings
            if step_drift is not None:
                cov["step_drift"] = step_drift
            # int8 kernels (and so the rounding of near-ties) depend on the CPU: record which one made these figures.
            cov["host"] = cpu_features()
            cov["file_ratio"] = (model_dir / name).stat().st_size / src.stat().st_size
            q_counts = op_counts(q_model)
            manifest.setdefault("graphs", {})[role] = q_counts
            manifest.setdefault("quantization", {})[role] = cov
            reports.append(QuantizeReport(variant, model_dir / name, (model_dir / name).stat().st_size, src.stat().st_size,
                                          q_counts, cov, role=role))
        save_manifest(model_dir, manifest)
    return reports
