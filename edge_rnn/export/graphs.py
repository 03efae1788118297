"""ONNX graphs built directly with onnx.helper from NumPy weights (no TensorFlow).

Workstation side: imports onnx, so nothing on the device path imports this module.

char_rnn_model: the min-char-rnn network as one ONNX `RNN` (Tanh) between a OneHot input and a
MatMul + Add output projection::

    ids int64 [batch, time] ─Transpose→ [time, batch] ─OneHot(V)→ x [time, batch, V]
    h0 float32 [batch, H] ─Unsqueeze→ [1, batch, H]
    RNN(x, W=Wxh, R=Whh, B=[bh, 0], initial_h) → Y [time, 1, batch, H], Y_h [1, batch, H]
    Y ─Squeeze→ [time, batch, H] ─Transpose→ [batch, time, H] ─MatMul(Whyᵀ)─Add(by)→ logits [batch, time, V]
    Y_h ─Squeeze→ h [batch, H]

Why this shape:
- `RNN` with Tanh is exactly h_t = tanh(Wxh x_t + Whh h_{t-1} + bh); onnxruntime runs the input
  projection for all time steps as one GEMM and only the recurrence step by step.
- OneHot → W=Wxh rather than Gather(Wxhᵀ) → W=identity: RNN always multiplies its input by W, so the
  Gather form pays an extra H×H product per step to undo nothing; OneHot's V×H product is the same
  work as the lookup it replaces (V ≈ H here). Measured on onnxruntime 1.32, H=100, V=65, one
  thread: a batch-1 time-1 step takes 12.6 µs with OneHot vs 18.8 µs with Gather; scoring 100k
  characters at once is within noise of each other (~250 ms).
- The layout=0 (time-major) form with explicit Transposes: onnxruntime's CPU RNN kernel does not
  implement layout=1.
- The output projection stays a separate MatMul + Add so onnxruntime's quantize_dynamic, which
  quantizes MatMul/Gather but not RNN, can make it int8.
"""

from __future__ import annotations

from collections import Counter
from typing import Mapping

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

GRAPH_NAME = "char_rnn"
PRODUCER = "edge-rnn"


def _initializer(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name=name)


def char_rnn_model(
    params: Mapping[str, npt.NDArray[np.floating]],
    *,
    vocab: str,
    opset: int = 17,
) -> onnx.ModelProto:
    """float32 ONNX model: ids int64 [batch, time], h0 float32 [batch, H] -> logits [batch, time, V], h [batch, H]."""
    Wxh = np.asarray(params["Wxh"], dtype=np.float32)  # (H, V)
    Whh = np.asarray(params["Whh"], dtype=np.float32)  # (H, H)
    Why = np.asarray(params["Why"], dtype=np.float32)  # (V, H)
    bh = np.asarray(params["bh"], dtype=np.float32).reshape(-1)  # (H,)
    by = np.asarray(params["by"], dtype=np.float32).reshape(-1)  # (V,)
    H, V = Wxh.shape
    if len(vocab) != V:
        raise ValueError(f"vocab has {len(vocab)} characters but Wxh has {V} columns")
    initializers = [
        _initializer("depth", np.array(V, dtype=np.int64)),
        _initializer("onehot_values", np.array([0.0, 1.0], dtype=np.float32)),
        _initializer("W", Wxh[None]),  # (1, H, V): one direction
        _initializer("R", Whh[None]),  # (1, H, H)
        _initializer("B", np.concatenate([bh, np.zeros(H, np.float32)])[None]),  # (1, 2H): Wb = bh, Rb = 0
        _initializer("axis0", np.array([0], dtype=np.int64)),
        _initializer("axis1", np.array([1], dtype=np.int64)),
        _initializer("WhyT", Why.T),  # (H, V)
        _initializer("by", by),  # (V,)
    ]
    nodes = [
        helper.make_node("Transpose", ["ids"], ["ids_tb"], perm=[1, 0], name="ids_time_major"),
        helper.make_node("OneHot", ["ids_tb", "depth", "onehot_values"], ["x"], axis=-1, name="one_hot"),
        helper.make_node("Unsqueeze", ["h0", "axis0"], ["initial_h"], name="add_direction_axis"),
        helper.make_node(
            "RNN",
            ["x", "W", "R", "B", "", "initial_h"],
            ["Y", "Y_h"],
            hidden_size=H,
            activations=["Tanh"],
            direction="forward",
            name="rnn",
        ),
        helper.make_node("Squeeze", ["Y", "axis1"], ["hs_tb"], name="drop_direction_axis"),
        helper.make_node("Transpose", ["hs_tb"], ["hs"], perm=[1, 0, 2], name="batch_major"),
        helper.make_node("MatMul", ["hs", "WhyT"], ["logits_nobias"], name="output_projection"),
        helper.make_node("Add", ["logits_nobias", "by"], ["logits"], name="output_bias"),
        helper.make_node("Squeeze", ["Y_h", "axis0"], ["h"], name="last_state"),
    ]
    graph = helper.make_graph(
        nodes,
        GRAPH_NAME,
        inputs=[
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "time"]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["batch", H]),
        ],
        outputs=[
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "time", V]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", H]),
        ],
        initializer=initializers,
        doc_string="min-char-rnn: h_t = tanh(Wxh x_t + Whh h_{t-1} + bh); logits_t = Why h_t + by",
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=PRODUCER)
    # ir_version 8 is what opset 17 shipped with, so older onnxruntime builds on devices can load it.
    model.ir_version = 8
    helper.set_model_props(model, {"vocab": vocab, "hidden": str(H), "vocab_size": str(V), "model": "char-rnn"})
    return model


def char_rnn_step_model(
    params: Mapping[str, npt.NDArray[np.floating]],
    *,
    vocab: str,
    opset: int = 17,
) -> onnx.ModelProto:
    """float32 ONNX step model, same I/O as char_rnn_model at time 1: ids int64 [batch, 1], h0 float32 [batch, H]
    -> logits [batch, 1, V], h [batch, H]; the cell decomposed (Gather + MatMul + Add + Tanh), no fused RNN.

    One step is h = tanh(Wxhᵀ[id] + bh + h0·Whhᵀ): the one-hot product becomes a row lookup in (Wxhᵀ + bh), whose
    rows already hold the bias, and the fused kernel's per-call set-up is gone (figures in export/decomposed.py).
    """
    Wxh = np.asarray(params["Wxh"], dtype=np.float32)  # (H, V)
    Whh = np.asarray(params["Whh"], dtype=np.float32)  # (H, H)
    Why = np.asarray(params["Why"], dtype=np.float32)  # (V, H)
    bh = np.asarray(params["bh"], dtype=np.float32).reshape(-1)  # (H,)
    by = np.asarray(params["by"], dtype=np.float32).reshape(-1)  # (V,)
    H, V = Wxh.shape
    if len(vocab) != V:
        raise ValueError(f"vocab has {len(vocab)} characters but Wxh has {V} columns")
    table = Wxh.T + bh  # (V, H): row v is Wxh·onehot(v) + bh
    assert table.shape == (V, H) and Whh.shape == (H, H) and Why.shape == (V, H)
    initializers = [
        _initializer("Wxh_rows", table),
        _initializer("WhhT", Whh.T),  # (H, H)
        _initializer("WhyT", Why.T),  # (H, V)
        _initializer("by", by),  # (V,)
        _initializer("axis1", np.array([1], dtype=np.int64)),
    ]
    # Everything (B, ·) two-dimensional: onnxruntime then fuses each MatMul + Add into one Gemm when it loads the
    # graph, while the file keeps MatMul, which quantize_dynamic makes int8 (it leaves Gemm float32).
    nodes = [
        helper.make_node("Squeeze", ["ids", "axis1"], ["id"], name="drop_time_axis"),  # (B,)
        helper.make_node("Gather", ["Wxh_rows", "id"], ["xh"], axis=0, name="input_rows"),  # (B, H)
        helper.make_node("MatMul", ["h0", "WhhT"], ["hh"], name="recurrent_projection"),  # (B, H)
        helper.make_node("Add", ["hh", "xh"], ["pre"], name="pre_activation"),
        helper.make_node("Tanh", ["pre"], ["h"], name="tanh"),  # (B, H): the new state, a graph output
        helper.make_node("MatMul", ["h", "WhyT"], ["logits_nobias"], name="output_projection"),  # (B, V)
        helper.make_node("Add", ["logits_nobias", "by"], ["logits_2d"], name="output_bias"),
        helper.make_node("Unsqueeze", ["logits_2d", "axis1"], ["logits"], name="add_time_axis"),  # (B, 1, V)
    ]
    graph = helper.make_graph(
        nodes,
        GRAPH_NAME + "_step",
        inputs=[
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 1]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["batch", H]),
        ],
        outputs=[
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, V]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", H]),
        ],
        initializer=initializers,
        doc_string="min-char-rnn, one step: h = tanh(Wxh x + Whh h0 + bh); logits = Why h + by",
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=PRODUCER)
    model.ir_version = 8
    helper.set_model_props(model, {"vocab": vocab, "hidden": str(H), "vocab_size": str(V), "model": "char-rnn"})
    return model


def op_counts(model) -> dict[str, int]:
    """Count nodes by op type in the main graph of an onnx.ModelProto."""
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))
