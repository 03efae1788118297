"""Quantize an exported model with onnxruntime.quantization, and report what was quantized.

Variants (file roles in the manifest):
- `onnx_int8`         dynamic int8 weights (quantize_dynamic after ORT's pre-processing): LSTM → DynamicQuantizeLSTM,
                      MatMul → MatMulInteger; activations quantized on the fly. GRU and RNN (no int8 kernel in
                      onnxruntime): W and R stored int8, made float32 once at load (quantize/cells.py: size, not speed).
- `onnx_int8_static`  static int8 in QDQ format (quantize_static), activation ranges calibrated on real training
                      data; onnxruntime has no static LSTM/GRU/RNN kernel, so the recurrent ops stay float.
- `onnx_fp16`         float16 weights and compute, float32 inputs/outputs (onnxruntime.transformers.float16).
- `onnx_step_int8`    dynamic int8 of the step model `model.step.onnx`, where the folder has one.

Any folder works: int8-static calibrates on the user's data (`data`, or `calibration_data`), else the model's
adapter (edge_rnn.models) gives it — the built-in models' own training data. onnxruntime has int8
kernels for LSTM only, so GRU and RNN compute in float32 (int8 stores their weights); the coverage report's
`layers` says per recurrent node how its W and R are stored and computed. Every variant that
streams (its graph takes the manifest's state inputs) is run next to its fp32 step model over
DRIFT_STEPS steps, and the drift (max |Δ| of outputs and state) goes into its coverage record.

Judged on the user's data (`data`, edge_rnn.accuracy_aware): every variant at batch 1 by the promise `evaluate`
holds it to, recorded as `judged_on` and `verdict` in its coverage record (`judged_on: "synthetic inputs"` without
data: only the step drift above). With `accuracy_aware`, an int8 variant outside its budget keeps the fewest
nodes float that bring it inside (nodes_to_exclude), recorded as `accuracy_control`; the step model first tries
the nodes its sequence model kept (keras_onnx names nodes after their Keras layer in both graphs).

Measured choices (mnist-lstm, onnxruntime 1.32, 1 thread, batch 1): per-channel weights make the dynamic
model 12 % slower and bigger with no accuracy gain; QUInt8 weights and skipping the pre-processing are within
noise. So: per-tensor QInt8 weights, after pre-processing, with 7-bit weights (REDUCE_RANGE: host-proof, below).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import EdgeRnnError, require
from ..export.graphs import op_counts
from .cells import CELL_OPS, cell_forms, quantize_cell_weights
from ..device.hostinfo import cpu_features
from ..device.manifest import atomic_path, folder_lock, load_manifest, record_file, save_manifest, verified_file

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
# Variants whose quantizer takes nodes_to_exclude, and so accuracy control can keep nodes of float.
ACCURACY_VARIANTS = ("int8", "int8-static")
# What a variant is judged on without --data: the step drift over DRIFT_STEPS random steps, where it streams.
SYNTHETIC = "synthetic inputs"
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
        "RNN": "excluded, or its W/R is not an initializer of its own (onnxruntime has no quantized RNN kernel)",
        "GRU": "excluded, or its W/R is not an initializer of its own (onnxruntime has no quantized GRU kernel)",
        "LSTM": "quantize_dynamic left this LSTM float (unsupported attributes or weights not initializers)",
        "MatMul": "both inputs are activations (no weight to quantize) or the quantizer excluded it",
        "Gemm": "quantize_dynamic does not quantize Gemm; pre-processing fused MatMul+Add into it",
        "Gather": "its table is not a float initializer of its own, or the quantizer excluded it",
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

    @property
    def judged_on(self) -> dict[str, Any] | str:
        return self.coverage.get("judged_on", SYNTHETIC)

    @property
    def verdict(self) -> dict[str, Any] | None:
        """The judgement on the user's data (figures, ok, failures), None when judged on synthetic inputs only."""
        return self.coverage.get("verdict")

    @property
    def ok(self) -> bool | None:
        return None if self.verdict is None else self.verdict["ok"]

    @property
    def accuracy_control(self) -> dict[str, Any] | None:
        return self.coverage.get("accuracy_control")

    def coverage_rows(self) -> list[dict[str, Any]]:
        """Per node that computes with weights (read from the graph): node, how its weights are stored, how it
        computes, its weights' bytes, and why it stayed float where it did."""
        still = self.coverage.get("still_float", {})
        rows = []
        for n in self.coverage.get("nodes", []):
            why = None if n["int8"] or self.variant == "fp16" else still.get(n["op"], {}).get("why")
            rows.append({"node": n["node"], "stored": n["stored"], "computed": n["form"], "bytes": n["weight_bytes"], "why": why})
        return rows

    def verdict_line(self) -> str:
        """One line a user can act on: the weights' size vs fp32, the step drift where it streams, and whether the
        variant kept its promise on the user's data — or that it was not judged, and how to judge it."""
        size = self.coverage["size"]
        text = (f"{self.variant}: {size['weight_ratio']:.2f}× the weights of fp32 ({size['weight_bytes']:,} of "
                f"{size['fp32_weight_bytes']:,} bytes)")
        drift = self.coverage.get("step_drift")
        if drift and drift.get("steps"):  # the outputs' drift: an LSTM's cell state is unbounded, its outputs are not
            text += f", outputs' step drift {max(drift['outputs_max_abs_diff'].values(), default=0.0):.1e} over {drift['steps']:,} steps"
        v = self.verdict
        if v is None:
            from ..tolerances import EVAL_MAX_ACCURACY_DROP_PP, EVAL_MAX_ERROR_INCREASE

            return (text + f" — judged on {self.judged_on} only, not against its promise (accuracy within "
                    f"{EVAL_MAX_ACCURACY_DROP_PP:g} pp of fp32, an error within {EVAL_MAX_ERROR_INCREASE:g} %): give --data FILE "
                    "(your labelled data) to judge it")
        change = round(-v["drop"] if v["unit"] == "pp" else v["drop"], 2) + 0.0
        figures = f"{v['metric']} {v['fp32']:.4g} → {v['value']:.4g} ({change:+.2f} {v['unit']}, budget {v['budget']:g} {v['unit']})"
        if v["ok"]:
            return text + f" — within its promise on your data: {figures}"
        return text + f" — BREAKS its promise on your data: {figures}: " + "; ".join(v["failures"])

    def judgement_lines(self) -> list[str]:
        """What the variant was judged on and how it did, and what accuracy control kept float: plain text lines."""
        on, v = self.judged_on, self.verdict
        if v is None:
            how = "the step drift below" if "step_drift" in self.coverage else "no figure for this file"
            return [f"judged on {on} only ({how}) — give --data FILE to judge it on your data"]
        rows = f"{on['examples']:,} of {on['rows_in_file']:,} rows" if on["examples"] < on["rows_in_file"] else f"{on['examples']:,} rows"
        # A drop is how much worse: an accuracy's change is minus it, an error's plus it.
        change = round(-v["drop"] if v["unit"] == "pp" else v["drop"], 2) + 0.0  # never "-0.00"
        lines = [f"judged on {on['data']} ({rows}, batch {on['batch']}): {v['metric']} fp32 {v['fp32']:.4g} → {v['value']:.4g} "
                 f"({change:+.2f} {v['unit']}, budget {v['budget']:g} {v['unit']}) — "
                 + ("kept its promise" if v["ok"] else "BROKE its promise: " + "; ".join(v["failures"]))]
        control = self.accuracy_control
        if control and "kept_float" in control and "latency_ms" in control:
            kept = ", ".join(f"{n['node']} ({n['op']}, {n['weight_bytes']:,} B of float32 weights)" for n in control["kept_float"]) or "nothing"
            lat = control["latency_ms"]
            lines.append(f"accuracy control: kept float {kept}; {control['metric']} {control['before']['value']:.4g} → "
                         f"{control['after']['value']:.4g} ({'inside' if control['ok'] else 'still outside'} the budget, "
                         f"{len(control['trials'])} trials); file {control['size_bytes_cost']:+,} bytes; batch-1 latency "
                         f"{self.variant} {lat[self.variant]:.3f} ms → {lat['kept_float']:.3f} ms (fp32 {lat['fp32']:.3f} ms)"
                         + (f" — {control['note']}" if "note" in control else ""))
        elif control:
            lines.append(f"accuracy control: {control['note']}")
        return lines


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
        # Follow weight → DequantizeLinear/Cast (→ Mul by its scale, quantize/cells.py) → the op that computes with it.
        seen = 0
        while (node.op_type in ("DequantizeLinear", "Cast") or (node.op_type == "Mul" and seen == 1)) and seen < 4:
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


# Compute ops that hold int8 weights or multiply in int8 (QDQ conversions are not compute).
INT8_COMPUTE_OPS = tuple(op for op in QUANTIZED_OPS if op not in QDQ_OPS)
# Inputs of an op that hold its weights (ONNX input order); an op not named here: every input.
WEIGHT_INPUT_INDEX = {"LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2), "DynamicQuantizeLSTM": (1, 2), "MatMul": (0, 1),
                      "Gemm": (0, 1), "FusedGemm": (0, 1), "FusedMatMul": (0, 1), "Gather": (0,), "Conv": (1,),
                      "MatMulInteger": (0, 1), "DynamicQuantizeMatMul": (0, 1), "MatMulIntegerToFloat": (0, 1)}
WEIGHT_DTYPES = ("float32", "float16", "float64", "int8", "uint8")
INT8_DTYPES = ("int8", "uint8")


def weight_nodes(model) -> list[dict[str, Any]]:
    """Per node that computes with weights, read from the graph itself: each initializer followed through
    DequantizeLinear/Cast (→ Mul by its scale) to the node that uses it, as weight_bytes does. A node's weights are
    what reaches its weight inputs (WEIGHT_INPUT_INDEX); how they are stored is its largest weight's dtype, and how
    they are computed is read from the path: an int8 kernel, int8 dequantized to float (DequantizeLinear, or Cast +
    Mul at load), an int8 table whose gathered rows are dequantized, or float."""
    onnx = require("onnx", "train")
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def follow(node, tensor: str) -> tuple[Any, str, list[str]]:
        via: list[str] = []
        while (node.op_type in ("DequantizeLinear", "Cast") or (node.op_type == "Mul" and len(via) == 1)) and len(via) < 4:
            nxt = consumers.get(node.output[0], [])
            if len(nxt) != 1:
                break
            via.append(node.op_type)
            tensor, node = node.output[0], nxt[0]
        return node, tensor, via

    reached: dict[int, list[dict[str, Any]]] = {}
    for name, tensor in inits.items():
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).name
        for user in consumers.get(name, []):
            node, fed, via = follow(user, name)
            weight_inputs = WEIGHT_INPUT_INDEX.get(node.op_type, range(len(node.input)))
            # A DequantizeLinear's scale or zero point (of an activation, in QDQ) is not a weight of the node it feeds.
            data = user.op_type != "DequantizeLinear" or user.input[0] == name
            is_weight = data and dtype in WEIGHT_DTYPES and any(i < len(node.input) and node.input[i] == fed for i in weight_inputs)
            reached.setdefault(id(node), []).append({"name": name, "dtype": dtype, "bytes": _dtype_bytes(tensor), "via": via,
                                                     "weight": is_weight})
    records = []
    for node in g.node:
        if node.op_type not in FLOAT_WEIGHT_OPS and node.op_type not in INT8_COMPUTE_OPS:
            continue
        found = reached.get(id(node), [])
        weights = [w for w in found if w["weight"]]
        if not weights:
            continue  # computes on activations only: nothing to quantize
        main = max(weights, key=lambda w: w["bytes"])
        stored, via = main["dtype"], main["via"]
        if node.op_type in INT8_COMPUTE_OPS:
            form, int8 = f"{node.op_type} (int8)", True
        elif stored in INT8_DTYPES and "DequantizeLinear" in via:
            form, int8 = f"{node.op_type} after DequantizeLinear", True
        elif stored in INT8_DTYPES and "Cast" in via:
            form, int8 = f"{node.op_type}, float (made at load)", True
        elif stored in INT8_DTYPES:
            dq = any(c.op_type == "DequantizeLinear" for c in consumers.get(node.output[0], []))
            form, int8 = (f"{node.op_type}, rows dequantized" if dq or node.op_type == "Gather" else f"{node.op_type} on int8"), True
        else:
            form, int8 = f"{node.op_type}, {stored}", False
        records.append({"node": node.name, "op": node.op_type, "stored": stored, "form": form, "int8": int8,
                        "via": "+".join(via) or "direct", "weight_bytes": sum(w["bytes"] for w in found)})
    return records


def runtime_op_counts(path: str | os.PathLike[str], *, opt_level: str = "all") -> dict[str, int]:
    """Op counts of the graph onnxruntime actually runs (after its graph optimisations fuse QDQ into int8 kernels)."""
    import onnxruntime as ort

    onnx = require("onnx", "train")
    from ..device.runtime import session_options

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
            "nodes": weight_nodes(q_model),
            "size": size,
        }
        if runtime_ops is not None:
            # onnxruntime's CPU provider lacks float16 kernels for most ops and inserts Casts back to float32.
            report["runtime_ops"] = runtime_ops
        return report
    # Read from the produced graph, node by node: which weights reach each compute node, stored how.
    nodes = weight_nodes(q_model)
    quantized: Counter[str] = Counter()
    float_nodes: dict[str, list[dict[str, Any]]] = {}
    for n in nodes:
        if not n["int8"]:
            float_nodes.setdefault(n["op"], []).append(n)
        elif n["op"] in INT8_COMPUTE_OPS:
            quantized[n["op"]] += 1
        elif n["via"].startswith("Cast"):  # quantize/cells.py: a GRU/RNN's int8 weights made float at load
            quantized[f"{n['op']} (int8 weights, float compute)"] += 1
        elif "DequantizeLinear" in n["via"]:
            quantized[f"{n['op']} (QDQ)"] += 1
        else:  # an int8 table read directly (Gather), its output dequantized
            quantized[f"{n['op']} (int8 weights)"] += 1
    reasons = WHY_FLOAT.get(variant, {})
    report: dict[str, Any] = {
        "quantized": dict(quantized),
        "still_float": {
            op: {"count": len(group), "weight_bytes": sum(n["weight_bytes"] for n in group),
                 "why": reasons.get(op, "no int8 kernel for this op")}
            for op, group in float_nodes.items()
        },
        "fp32_ops": {op: n for op, n in op_counts(fp32_model).items() if op in FLOAT_WEIGHT_OPS},
        "layers": cell_forms(q_model),
        "nodes": nodes,
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


def _split_gemm(path: Path) -> None:
    """Each Gemm → MatMul + Add, in place: quantize_dynamic does this itself before quantizing, so doing it first
    names the nodes as the quantizer sees them (nodes_to_exclude matches `dense/MatMul/MatMulAddFusion_MatMul`,
    never the Gemm's name)."""
    onnx = require("onnx", "train")
    from onnxruntime.quantization.onnx_model import ONNXModel

    model = ONNXModel(onnx.load(str(path)))
    model.replace_gemm_with_matmul()
    onnx.save(model.model, str(path))


def _prepare(variant: str, src: Path, work: Path) -> Path:
    """The model the variant's quantizer is given, made once per file (accuracy control requantizes it many times):
    ORT's pre-processing for int8, with Gemm split for dynamic int8; fp16 converts `src` itself."""
    if variant == "fp16":
        return src
    pre = work / f"{variant}.pre.onnx"
    _pre_process(src, pre)
    if variant == "int8":
        _split_gemm(pre)
    return pre


def quantizable_ops(variant: str) -> tuple[str, ...]:
    """Op types made int8 for `variant`: onnxruntime's quantizer registry, the one truth of what can be, and for int8
    the fused cells whose weights quantize/cells.py stores int8 (so accuracy control can keep one float)."""
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

    cells = CELL_OPS if variant == "int8" else ()
    return tuple(sorted({*{"int8": IntegerOpsRegistry, "int8-static": QDQRegistry}[variant], *cells}))


# Weights quantized to 7 bits (reduce_range): x86 CPUs without VNNI (AVX2, AVX-512 before VNNI) multiply uint8
# activations by int8 weights with vpmaddubsw, whose int16 sum of two products saturates with full-range weights.
# The file is made once and runs on any device, so it must not depend on the device having VNNI. Measured on an
# AVX2 host (char RNN, 16 held-out lines at batch 1, vs fp32 logits): full range max |Δ| 0.80 (saturation: 20× the
# mean 0.040), 7-bit 0.30 (4× its mean 0.077); nats/char 3.2987 / 3.3047 vs fp32 3.3051 on 20k characters.
REDUCE_RANGE = True


def _dynamic_int8(pre: Path, dst: Path, *, exclude: Sequence[str] = (), **_: Any) -> dict[str, Any]:
    quantization = require("onnxruntime.quantization", "train")
    quantization.quantize_dynamic(str(pre), str(dst), weight_type=quantization.QuantType.QInt8, nodes_to_exclude=list(exclude),
                                  reduce_range=REDUCE_RANGE)
    settings = {"weights": "QInt8 per-tensor, 7-bit range (reduce_range)", "activations": "uint8, quantized at run time"}
    # GRU and RNN: no int8 kernel in onnxruntime, so their weights are stored int8 and made float at load (size only).
    onnx = require("onnx", "train")
    model = onnx.load(str(dst))
    if quantize_cell_weights(model, exclude=exclude):
        settings["recurrent_weights"] = "GRU/RNN W, R: symmetric int8 (8-bit) per gate row, Cast+Mul folded at load"
    _drop_value_info(model)
    onnx.save(model, str(dst))
    return settings


def _drop_value_info(model: Any) -> None:
    """Drop the intermediate shapes ORT's pre-processing wrote (symbolic shape inference): hints every runtime
    recomputes, and tract refuses them once an input is given a concrete batch ("Impossible to unify Sym(batch) with
    Val(1)" on a Transpose of the int8 GRU). Graph inputs and outputs keep their shapes."""
    del model.graph.value_info[:]


class _FeedReader:
    """onnxruntime's CalibrationDataReader protocol (get_next until None) over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _static_int8(pre: Path, dst: Path, *, feeds: list[dict[str, np.ndarray]], calibration: str, calibration_data: str,
                 exclude: Sequence[str] = (), **_: Any) -> dict[str, Any]:
    quantization = require("onnxruntime.quantization", "train")
    method = {
        "minmax": quantization.CalibrationMethod.MinMax,
        "entropy": quantization.CalibrationMethod.Entropy,
        "percentile": quantization.CalibrationMethod.Percentile,
    }[calibration]
    quantization.quantize_static(
        str(pre),
        str(dst),
        _FeedReader(feeds),
        quant_format=quantization.QuantFormat.QDQ,
        calibrate_method=method,
        activation_type=quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8,
        nodes_to_exclude=list(exclude),
    )
    onnx = require("onnx", "train")
    model = onnx.load(str(dst))
    _drop_value_info(model)
    onnx.save(model, str(dst))
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


def _is_data_file(item: str) -> bool:
    """One `--calibration-data` item naming an .npz or a folder of .npy: --data's format, for calibration only."""
    return "=" not in item and (item.lower().endswith(".npz") or Path(item).is_dir())


def _dataset_feeds(dataset, graph, *, samples: int) -> list[dict[str, np.ndarray]]:
    """Calibration batches from a checked Dataset: its first `samples` rows; graph inputs the data does not hold (the
    recurrent state a char RNN's sequence model takes) start at zero, as they do on a device."""
    onnx = require("onnx", "train")
    batches = []
    for start in range(0, min(samples, dataset.count), CALIBRATION_BATCH):
        feeds, _ = dataset.rows(start, min(start + CALIBRATION_BATCH, samples, dataset.count))
        n = len(next(iter(feeds.values())))
        for i in graph.graph.input:
            if i.name not in feeds:
                dims = [d.dim_value or 1 for d in i.type.tensor_type.shape.dim]
                feeds[i.name] = np.zeros([n, *dims[1:]], onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
        batches.append(feeds)
    return batches


def _input_dtypes(graph) -> dict[str, Any]:
    onnx = require("onnx", "train")
    return {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in graph.graph.input}


def _calibration(adapter, model_dir: Path, manifest: dict[str, Any], src: Path, *, judge, calibration_data: Sequence[str],
                 samples: int) -> tuple[list[dict[str, np.ndarray]], str]:
    """int8-static's calibration batches and what they came from: --calibration-data (an .npz or .npy folder, or .npy
    files per input), else --data, else the adapter's own (a built-in's training split)."""
    onnx = require("onnx", "train")
    graph = onnx.load(str(src))
    if len(calibration_data) == 1 and _is_data_file(calibration_data[0]):
        from ..evaluate import open_for

        path = calibration_data[0]
        dataset = open_for(manifest, path, dtypes=_input_dtypes(graph), max_rows=samples)
        return _dataset_feeds(dataset, graph, samples=samples), f"--calibration-data {path}"
    if calibration_data:
        files = parse_calibration_data(calibration_data)
        return (adapter.calibration_feeds(model_dir, manifest, src, samples=samples, batch=CALIBRATION_BATCH, data=files),
                f"files {files}")
    if judge is not None:
        return _dataset_feeds(judge.data, graph, samples=samples), f"--data {judge.data.source} (its first {min(samples, judge.data.count)} rows)"
    return adapter.calibration_feeds(model_dir, manifest, src, samples=samples, batch=CALIBRATION_BATCH, data=None), "training split"


class PromiseBroken(EdgeRnnError):
    """A variant broke its quantization promise on the user's data; every variant is written and recorded first."""

    def __init__(self, message: str, reports: list[QuantizeReport]):
        super().__init__(message)
        self.reports = reports


def _accuracy_control(variant: str, role: str, *, prepared: Path, make: Callable[..., dict[str, Any]], src: Path, out: Path,
                      judged, judge, work: Path, start: Sequence[str], layers: set[str]) -> tuple[Any, dict[str, Any], list[str]]:
    """Keep the fewest nodes float that bring `out` (the fully quantized file, replaced in place) inside its budget on
    the data; return the final judgement, the manifest's `accuracy_control` record and the nodes kept float."""
    from ..accuracy_aware import Trial, keep_float, quantizable_nodes, side_by_side_ms

    onnx = require("onnx", "train")
    metric = judged.score.headline.name if judged.score.headline else None
    record: dict[str, Any] = {"budget": judged.evaluation.max_drop, "unit": judged.unit, "metric": metric,
                              "fp32": judged.base.headline.value if judged.base.headline else None,
                              "before": _brief(judged)}
    if judged.ok:
        return judged, {**record, "after": _brief(judged), "kept_float": [], "note": "inside the budget fully quantized"}, []
    full = work / "full.onnx"
    shutil.copyfile(out, full)
    candidates = quantizable_nodes(onnx.load(str(prepared)), op_types=quantizable_ops(variant))
    by_name = {n.name: n for n in candidates}
    control = keep_float(candidates, make=lambda names, path: make(path, exclude=names), judge=lambda path: judge.judge(path, role),
                         before=Trial((), full, judged), work=work, start=[by_name[n] for n in start if n in by_name])
    best = control.best
    shutil.copyfile(best.path, out)
    latency = side_by_side_ms({"fp32": src, variant: full, "kept_float": best.path}, row=judge.first_row())
    record.update({
        "after": _brief(best.judged),
        "kept_float": [n.to_json(layers) for n in best.kept],
        "size_bytes_cost": best.path.stat().st_size - full.stat().st_size,
        "file_bytes": {variant: full.stat().st_size, "kept_float": best.path.stat().st_size},
        "latency_ms": latency,
        "candidates": [n.to_json(layers) for n in control.candidates],
        "trials": [t.to_json() for t in control.trials],
        "ok": control.ok,
    })
    if start:
        record["started_from"] = list(start)
    if control.not_quantized:
        record["left_float_by_the_quantizer"] = [n.name for n in control.not_quantized]
    if control.note:
        record["note"] = control.note
    elif best.kept and len(best.kept) == len(candidates) - len(control.not_quantized):
        record["note"] = "every quantizable node kept float: no int8 compute is left, the fp32 model serves as well"
    return best.judged, record, [n.name for n in best.kept]


def _brief(judged) -> dict[str, Any]:
    h = judged.score.headline
    return {"value": h.value if h else None, "drop": judged.drop, "ok": judged.ok}


def _failure_line(reports: list[QuantizeReport], *, data: str, accuracy_aware: bool) -> str:
    """One line: each variant that broke its promise, how, and what to do next."""
    parts = []
    for r in reports:
        if r.ok is not False:
            continue
        text = f"{r.role} broke its promise on {data}: {'; '.join(r.verdict['failures'])}"
        control = r.accuracy_control
        if control and control.get("kept_float") is not None and "candidates" in control:
            kept = ", ".join(f"{n['node']} ({n['op']})" for n in control["kept_float"]) or "nothing"
            text += (f" — accuracy control tried {len(control['trials'])} requantizations of {len(control['candidates'])} "
                     f"quantizable nodes; best kept float {kept}" + (f" ({control['note']})" if "note" in control else ""))
        parts.append(text)
    hint = ("raise --max-drop, or fix the model (it is written, and recorded with its failed verdict in manifest.json)"
            if accuracy_aware else
            "without --judge-only, accuracy control keeps the most harmful nodes float (the variant is written, and recorded with its failed verdict in manifest.json)")
    return " | ".join(parts) + f" — {hint}"


def quantize(
    model_dir: str | os.PathLike[str],
    *,
    variants: tuple[str, ...] = ("int8",),
    calibration: str = "minmax",
    calibration_samples: int = CALIBRATION_SAMPLES,
    calibration_data: Sequence[str] = (),
    data: str | os.PathLike[str] | None = None,
    metric: str | None = None,
    max_drop: float | None = None,
    max_rows: int | None = None,
    accuracy_aware: bool = False,
) -> list[QuantizeReport]:
    """Make each variant of `model_dir/model.onnx` (and int8 of model.step.onnx), record them in the manifest,
    return coverage reports; a streaming variant also gets its drift from fp32 over DRIFT_STEPS steps.

    With `data` (labelled .npz or .npy folder, as `evaluate` takes): int8-static calibrates on it, and every variant
    is judged on its first `max_rows` rows at batch 1 by the quantization promise, the metric's drop ≤ `max_drop`
    (default: 1 pp for accuracy, 2 % for errors); with `accuracy_aware`, an int8 variant that breaks it keeps the
    fewest nodes float that bring it inside. Raises PromiseBroken, after writing and recording every variant, when
    one breaks its promise."""
    from ..accuracy_aware import JUDGE_MAX_ROWS, DataJudge, require_data_for
    from ..device.metrics import METRICS
    from ..models import adapter_for
    from ..export.validate import drift

    onnx = require("onnx", "train")
    model_dir = Path(model_dir)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise EdgeRnnError(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    if calibration not in CALIBRATION_METHODS:
        raise EdgeRnnError(f"unknown calibration method {calibration!r}; choose from {list(CALIBRATION_METHODS)}")
    require_data_for(accuracy_aware=accuracy_aware, max_drop=max_drop, metric=metric, data=data)
    if accuracy_aware and not any(v in ACCURACY_VARIANTS for v in variants):
        raise EdgeRnnError(f"--accuracy-aware keeps nodes of an int8 model float: use it with --variant {' or '.join(ACCURACY_VARIANTS)}")
    if metric is not None and metric not in METRICS:
        raise EdgeRnnError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}")
    if max_drop is not None and not 0 <= max_drop <= 1000:
        raise EdgeRnnError("--max-drop is in percent (pp for accuracy): between 0 and 1000")
    max_rows = JUDGE_MAX_ROWS if max_rows is None else max_rows
    if max_rows < 1:
        raise EdgeRnnError("--max-rows must be at least 1")
    if calibration_data and "int8-static" not in variants:
        raise EdgeRnnError("--calibration-data is for --variant int8-static")
    if not (len(calibration_data) == 1 and _is_data_file(calibration_data[0])):
        parse_calibration_data(calibration_data)  # a malformed list is refused before any work
    with folder_lock(model_dir):  # no other writer between reading the manifest and saving it
        manifest = load_manifest(model_dir)
        adapter = adapter_for(manifest)
        step = manifest.get("step")
        layers = {a["layer"] for a in manifest.get("audit", []) if isinstance(a, dict) and isinstance(a.get("layer"), str)}
        jobs = []  # (variant, fp32 role, variant role, variant file)
        for variant in variants:
            jobs.append((variant, "onnx", *VARIANTS[variant]))
            if variant in STEP_VARIANTS and "onnx_step" in manifest["files"]:
                jobs.append((variant, "onnx_step", *STEP_VARIANTS[variant]))
        sources = {role: verified_file(manifest, model_dir, role) for role in {job[1] for job in jobs}}
        # The data (and int8-static's calibration data) is read and checked before anything is written: bad data is
        # one error and no file changes.
        judge = (DataJudge(model_dir, manifest, data, fp32_path=sources["onnx"], metric=metric, max_drop=max_drop, max_rows=max_rows)
                 if data is not None else None)
        feeds, described = (_calibration(adapter, model_dir, manifest, sources["onnx"], judge=judge, calibration_data=calibration_data,
                                         samples=calibration_samples)
                            if "int8-static" in variants else ([], ""))
        stream: dict[str, np.ndarray] | None = None
        kept_by_variant: dict[str, list[str]] = {}
        reports = []
        for variant, src_role, role, name in jobs:
            src = sources[src_role]
            if (model_dir / name).resolve() == src.resolve():
                raise EdgeRnnError(f"the {variant} output {model_dir / name} is the model it is made from — fix the "
                                   f"'{src_role}' entry of {model_dir / 'manifest.json'}; nothing written")
            fp32_model = onnx.load(str(src))
            judged, control = None, None
            with tempfile.TemporaryDirectory() as work, atomic_path(model_dir / name) as tmp, _quiet_root_logging():
                prepared = _prepare(variant, src, Path(work))
                make = functools.partial(_MAKERS[variant], prepared, feeds=feeds, calibration=calibration, calibration_data=described)
                settings = make(tmp)
                if judge is not None:
                    judged = judge.judge(tmp, role)
                    if accuracy_aware and variant in ACCURACY_VARIANTS:
                        judged, control, kept = _accuracy_control(
                            variant, role, prepared=prepared, make=make, src=src, out=tmp, judged=judged, judge=judge,
                            work=Path(work), start=kept_by_variant.get(variant, []), layers=layers)
                        kept_by_variant.setdefault(variant, kept)
                        settings["nodes_to_exclude"] = kept
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
            cov["judged_on"] = judge.judged_on() if judge is not None else SYNTHETIC
            if judged is not None:
                cov["verdict"] = judged.figures()
            if control is not None:
                cov["accuracy_control"] = control
                _explain_kept_float(cov, control)
            # int8 kernels (and so the rounding of near-ties) depend on the CPU: record which one made these figures.
            cov["host"] = cpu_features()
            cov["file_ratio"] = (model_dir / name).stat().st_size / src.stat().st_size
            q_counts = op_counts(q_model)
            manifest.setdefault("graphs", {})[role] = q_counts
            manifest.setdefault("quantization", {})[role] = cov
            reports.append(QuantizeReport(variant, model_dir / name, (model_dir / name).stat().st_size, src.stat().st_size,
                                          q_counts, cov, role=role))
        save_manifest(model_dir, manifest)
    if any(r.ok is False for r in reports):
        raise PromiseBroken(_failure_line(reports, data=str(data), accuracy_aware=accuracy_aware), reports)
    return reports


def _explain_kept_float(cov: dict[str, Any], control: dict[str, Any]) -> None:
    """The coverage's still-float ops say which nodes accuracy control kept float, and why."""
    by_op: dict[str, list[str]] = {}
    for node in control.get("kept_float", []):
        by_op.setdefault(node["op"], []).append(node["node"])
    for op, names in by_op.items():
        entry = cov["still_float"].get(op)
        if entry is not None:
            entry["why"] = (f"accuracy control kept {', '.join(names)} float: quantized, {control['metric']} broke the "
                            f"{control['budget']:g} {control['unit']} budget on the data")
