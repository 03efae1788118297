"""int8 weights for the fused recurrent ops onnxruntime has no int8 kernel for: ONNX `GRU` and `RNN`.

onnxruntime quantizes only LSTM (DynamicQuantizeLSTM, onnxruntime#9796); quantize_dynamic leaves a GRU or RNN
float32, and for a recurrent model its W and R are most of the file. This module stores them as int8 instead::

    W int8 [D, G·H, I] ─Cast(float)─Mul(scale [1, G·H, 1])→ W float32 ─┐
    R int8 [D, G·H, H] ─Cast(float)─Mul(scale [1, G·H, 1])→ R float32 ─┴→ GRU / RNN (unchanged, float compute)

Form "int8 weights, float compute" (CELL_FORM): a size gain, not a speed gain. onnxruntime constant-folds the
Cast and Mul of initializers when it creates the session, so the fused op gets its float32 weights once at load
and runs exactly as fp32 (no Loop, no per-call work): the runtime graph holds the GRU/RNN alone.
Why not DequantizeLinear: onnxruntime 1.32 does not fold it (its runtime graph keeps both DequantizeLinear nodes,
as it keeps Q/DQ pairs for its QDQ fusions), so it ran on every call — measured on gru-mnist (1 thread, onnxruntime 1.32, AVX2): batch 1 1.14× fp32 with
DequantizeLinear, 1.00–1.04× with Cast+Mul over runs (the GRU is then fp32's; the rest is the Dense layer's int8
and noise). A `.ort` file is optimised at conversion (basic level folds constants), so it holds the folded float32
weights: the size gain is the `.onnx` file's.

Weights are symmetric int8 in the full 8-bit range, one scale per gate row (axis 1, shared by both directions of
a bidirectional layer). REDUCE_RANGE (quantize/__init__.py) is for int8 *products* (vpmaddubsw saturation on hosts without
VNNI); here nothing multiplies int8 values, so 7 bits would only add error and no host depends on it. Measured on
gru-mnist's 1,000 held-out digits (GRU alone quantized, vs fp32): mean max|Δprob| 0.00094 per row 8-bit, 0.00118
per row 7-bit, 0.00130 per tensor 8-bit; the row scales cost 2 × 3H × 4 bytes (1.2% of the fp32 file).

The unrolled integer form (the input projection for all steps as one DynamicQuantizeMatMul, each step's h·Rᵀ as
another) is not made: measured in scripts/bench_int8_cells.py, see its docstring.

Workstation side: imports onnx.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

# Fused recurrent ops quantized here, and the input index of each weight (ONNX: X, W, R, B, sequence_lens, initial_h).
CELL_OPS = ("GRU", "RNN")
WEIGHT_INPUTS = {"W": 1, "R": 2}
# Recurrent ops whose weights the coverage describes (LSTM: quantize_dynamic's DynamicQuantizeLSTM, or float).
RECURRENT_OPS = ("LSTM", "GRU", "RNN", "DynamicQuantizeLSTM")
# Symmetric int8: [-127, 127], zero point 0 (−128 unused keeps the range symmetric).
INT8_MAX = 127
GATE_AXIS = 1  # W, R are [directions, gates·hidden, inputs]: one scale per gate row
CELL_FORM = "int8 weights (per gate row), dequantized at load; float compute (size, not speed)"
LSTM_FORM = "DynamicQuantizeLSTM: int8 weights and int8 products"
FLOAT_FORM = "float32"
INT8_CAST = "int8 (Cast + Mul by its row scales)"


def int8_rows(w: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """W or R float32 [D, G·H, I] → (int8 [D, G·H, I], scale float32 [G·H]): symmetric, one scale per gate row."""
    assert w.ndim == 3, w.shape
    peak = np.abs(w).max(axis=(0, 2))
    scale = np.where(peak > 0, peak / INT8_MAX, 1.0).astype(np.float32)  # an all-zero row keeps scale 1
    q = np.clip(np.rint(w / scale[None, :, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    assert q.shape == w.shape and scale.shape == (w.shape[GATE_AXIS],)
    return q, scale


def quantize_cell_weights(model: onnx.ModelProto, *, exclude: Sequence[str] = ()) -> list[dict[str, Any]]:
    """In place: every GRU/RNN node's W and R initializers (nodes not in `exclude`) → int8 + Cast + Mul.

    Returns one record per node changed: name, op, and the float32 and int8 bytes of its weights."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    records, new_nodes, dropped = [], {}, set()
    for node in g.node:
        if node.op_type not in CELL_OPS or node.name in exclude:
            continue
        record = {"node": node.name, "op": node.op_type, "float32_bytes": 0, "int8_bytes": 0}
        for role, index in WEIGHT_INPUTS.items():
            name = node.input[index] if len(node.input) > index else ""
            # A weight another node also reads stays float: replacing it would change that node too.
            if name not in inits or uses.get(name, 0) != 1:
                continue
            w = numpy_helper.to_array(inits[name]).astype(np.float32)
            q, scale = int8_rows(w)
            base = f"{name}_int8"
            g.initializer.extend([numpy_helper.from_array(q, f"{base}_quantized"),
                                  numpy_helper.from_array(scale.reshape(1, -1, 1), f"{base}_scale")])
            cast = helper.make_node("Cast", [f"{base}_quantized"], [f"{base}_float"], name=f"{node.name}/{role}_cast",
                                    to=TensorProto.FLOAT)
            mul = helper.make_node("Mul", [cast.output[0], f"{base}_scale"], [f"{base}_dequantized"],
                                   name=f"{node.name}/{role}_scale")
            new_nodes.setdefault(node.name, []).extend([cast, mul])
            node.input[index] = mul.output[0]
            dropped.add(name)
            record["float32_bytes"] += w.nbytes
            record["int8_bytes"] += q.nbytes + scale.nbytes
        if record["int8_bytes"]:
            records.append(record)
    if not records:
        return records
    keep = [t for t in g.initializer if t.name not in dropped]
    del g.initializer[:]
    g.initializer.extend(keep)
    # Each Cast + Mul goes right before the node it feeds, so the graph stays topologically sorted.
    nodes = []
    for node in g.node:
        nodes.extend(new_nodes.get(node.name, []))
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    return records


def _int8_initializer(name: str, inits: dict[str, onnx.TensorProto]) -> bool:
    return name in inits and inits[name].data_type in (TensorProto.INT8, TensorProto.UINT8)


def cell_forms(model: onnx.ModelProto) -> list[dict[str, str]]:
    """Per recurrent node of a graph, read from the graph itself: its op, and how W and R are stored and computed."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def stored(name: str) -> str:
        node = producer.get(name)
        if node is not None and node.op_type == "Mul":  # int8 → Cast → Mul(scale): this module's form
            node = next((producer[i] for i in node.input if i in producer and producer[i].op_type == "Cast"), None)
            if node is not None and _int8_initializer(node.input[0], inits):
                return INT8_CAST
        if node is not None and node.op_type == "DequantizeLinear" and _int8_initializer(node.input[0], inits):
            return "int8 (DequantizeLinear)"
        return "int8" if _int8_initializer(name, inits) else FLOAT_FORM

    forms = []
    for node in g.node:
        if node.op_type not in RECURRENT_OPS:
            continue
        weights = {role: stored(node.input[i]) if len(node.input) > i else FLOAT_FORM for role, i in WEIGHT_INPUTS.items()}
        if node.op_type == "DynamicQuantizeLSTM":
            form = LSTM_FORM
        elif all(v == INT8_CAST for v in weights.values()):
            form = CELL_FORM
        elif any(v != FLOAT_FORM for v in weights.values()):
            form = "partly int8: " + ", ".join(f"{k} {v}" for k, v in weights.items())
        else:
            form = FLOAT_FORM
        forms.append({"node": node.name, "op": node.op_type, "W": weights["W"], "R": weights["R"], "int8": form})
    return forms
