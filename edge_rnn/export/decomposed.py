"""One time step of an LSTM / GRU / SimpleRNN cell as plain ONNX ops (MatMul + element-wise gates), for step models.

Workstation side: numpy and onnx only; keras_onnx calls it with its graph builder.

Why: a step model runs one time step per call, and the issue behind this module expected onnxruntime's fused
LSTM/GRU/RNN kernels to pay a large set-up per call. Measured (STEP_FORMS), that set-up is small for LSTM and GRU at
batch 1; the decomposed form wins for SimpleRNN at every batch and for GRU at batch 64, and its MatMuls are what
onnxruntime's quantize_dynamic makes int8 — GRU and SimpleRNN step models get int8 compute, which their fused ops
never do. Both forms compute the same function; the export's step-vs-sequence parity check holds either to fp32
tolerance.

The math, with the weights of cells.CellWeights (ONNX gate order, written down once there) as x·Wxᵀ + h·Rᵀ::

    LSTM (gates iofc):  z = [x, h]·[Wᵀ; Rᵀ] + (Wb + Rb)          (B, 4U)
                        i, o, f = f(z[:, :3U]) split;  g = g(z[:, 3U:])
                        c' = f⊙c + i⊙g;  h' = o⊙h(c')
    GRU (gates zrh), linear_before_reset=1 (Keras reset_after=True):
                        [zr_x | xh] = x·Wᵀ + Wb;  [zr_h | hh] = h·Rᵀ + Rb     (two MatMuls: r scales hh only)
                        z, r = f(zr_x + zr_h) split;  ĥ = g(xh + r⊙hh);  h' = ĥ + z⊙(h − ĥ)   (= (1−z)⊙ĥ + z⊙h)
    GRU, linear_before_reset=0 (reset_after=False):
                        [zr_x | xh] = x·Wᵀ + (Wb + Rb);  zr_h = h·Rzrᵀ
                        z, r = f(zr_x + zr_h) split;  ĥ = g(xh + (r⊙h)·Rhᵀ);  h' = ĥ + z⊙(h − ĥ)
    RNN:                h' = f([x, h]·[Wᵀ; Rᵀ] + (Wb + Rb))

The LSTM's and RNN's linear part `[x, h]·[Wx; Wh] + b` has three forms (LINEAR_FORMS): one Concat + MatMul + Add
over pre-stacked weights, the same with Gemm (bias folded in), or two MatMuls summed (no Concat copy). MatMul is what
quantize_dynamic turns into int8 (Gemm is not in its IntegerOps registry); onnxruntime fuses MatMul + Add into a
Gemm itself when it loads the file.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from .cells import CellWeights

# Per ONNX op kind, the form a step model's cell takes by default: "decomposed" (this module) or "fused" (the ONNX
# LSTM/GRU/RNN op at T = 1). scripts/bench_step_cells.py, onnxruntime 1.32, one thread, AMD EPYC AVX2 (2 shared cores),
# input 28, units 32/128/256, p50 µs per step, decomposed (two MatMuls) ÷ fused, over two runs:
#   RNN   batch 1: 0.81–0.86   batch 64: 0.41–0.49   → decomposed
#   GRU   batch 1: 1.00–1.07   batch 64: 0.79–0.84   → decomposed: at most ~1.5 µs more at batch 1, a fifth less at
#         batch 64, and quantize_dynamic makes its MatMuls int8 compute (DynamicQuantizeMatMul; file 0.27× fp32)
#   LSTM  batch 1: 0.95–0.98   batch 64: 0.91–1.01   → fused: 1–2 µs a step is within the spread between runs, and the
#         fused op keeps DynamicQuantizeLSTM, whose int8 drift equals the decomposed form's (5.3e-3 vs 5.7e-3)
# onnxruntime's fused kernels cost little to set up at T = 1 here: a step is the call itself (~10 µs for the MNIST
# LSTM's 5 inputs and 5 outputs) plus products both forms share.
STEP_FORMS: dict[str, str] = {"LSTM": "fused", "GRU": "decomposed", "RNN": "decomposed"}
# How `[x, h]·[Wx; Wh] + b` is emitted by default (see LINEAR_FORMS): two MatMuls were fastest at batch 1 for LSTM and
# RNN at every size (within ~1% at batch 64), save the Concat copy, and give x·W and h·R an int8 scale each.
LINEAR_FORM = "two_matmuls"
# The audit's word on a decomposed step cell.
DECOMPOSED_NOTE = "step: decomposed cell (MatMul + gates), one time step per call without the fused kernel"


class Builder(Protocol):
    """What this module needs of keras_onnx._Builder."""

    def const(self, array: np.ndarray, hint: str = ...) -> str: ...
    def op(self, op_type: str, inputs: list[str], *, n_out: int = 1, **attrs): ...


def _concat_matmul(b: Builder, x: str, h: str, Wx: np.ndarray, Wh: np.ndarray, bias: np.ndarray) -> str:
    xh = b.op("Concat", [x, h], axis=-1)  # (B, F+U)
    return b.op("Add", [b.op("MatMul", [xh, b.const(np.concatenate([Wx, Wh]), "W_xh")]), b.const(bias, "b")])


def _concat_gemm(b: Builder, x: str, h: str, Wx: np.ndarray, Wh: np.ndarray, bias: np.ndarray) -> str:
    xh = b.op("Concat", [x, h], axis=-1)  # (B, F+U)
    return b.op("Gemm", [xh, b.const(np.concatenate([Wx, Wh]), "W_xh"), b.const(bias, "b")])


def _two_matmuls(b: Builder, x: str, h: str, Wx: np.ndarray, Wh: np.ndarray, bias: np.ndarray) -> str:
    xw = b.op("Add", [b.op("MatMul", [x, b.const(Wx, "Wx")]), b.const(bias, "b")])
    return b.op("Add", [xw, b.op("MatMul", [h, b.const(Wh, "Wh")])])


# `[x, h]·[Wx; Wh] + bias` for x (B, F), h (B, U), Wx (F, N), Wh (U, N), bias (N,) → (B, N).
LINEAR_FORMS: dict[str, Callable[..., str]] = {
    "concat_matmul": _concat_matmul,
    "concat_gemm": _concat_gemm,
    "two_matmuls": _two_matmuls,
}

# ONNX recurrent activation functions as ops; which take activation_alpha / activation_beta (consumed in order).
_TAKES_ALPHA = ("Affine", "HardSigmoid", "Elu", "LeakyRelu", "ThresholdedRelu", "ScaledTanh")
_TAKES_BETA = ("Affine", "HardSigmoid", "ScaledTanh")


def _activation_fns(cell: CellWeights) -> list[Callable[[Builder, str], str]]:
    """The cell's ONNX activation list (f, g, h…) with its alphas/betas, as emitters."""
    alphas, betas = list(cell.activation_alpha), list(cell.activation_beta)
    fns = []
    for name in cell.activations:
        alpha = alphas.pop(0) if name in _TAKES_ALPHA else None
        beta = betas.pop(0) if name in _TAKES_BETA else None
        fns.append(_activation(name, alpha, beta))
    return fns


def _activation(name: str, alpha: float | None, beta: float | None) -> Callable[[Builder, str], str]:
    if name == "Affine":
        def affine(b: Builder, x: str) -> str:
            if alpha == 1.0 and beta == 0.0:
                return x
            return b.op("Add", [b.op("Mul", [x, b.const(np.array(alpha, np.float32), "alpha")]),
                                b.const(np.array(beta, np.float32), "beta")])
        return affine
    if name == "ScaledTanh":
        return lambda b, x: b.op("Mul", [b.op("Tanh", [b.op("Mul", [x, b.const(np.array(beta, np.float32), "beta")])]),
                                         b.const(np.array(alpha, np.float32), "alpha")])
    attrs = {k: v for k, v in (("alpha", alpha), ("beta", beta)) if v is not None}
    return lambda b, x: b.op(name, [x], **attrs)


def _xh_weights(cell: CellWeights) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(Wxᵀ (F, G·U), Rᵀ (U, G·U), Wb (G·U,), Rb (G·U,)) of one direction."""
    G_U = cell.W.shape[1]
    Wx, Wh = cell.W[0].T, cell.R[0].T
    Wb, Rb = cell.B[0, :G_U], cell.B[0, G_U:]
    assert Wx.shape[1] == Wh.shape[1] == Wb.shape[0] == Rb.shape[0] == G_U and Wh.shape[0] == cell.hidden_size
    return Wx, Wh, Wb, Rb


def lstm_step(b: Builder, cell: CellWeights, *, x: str, states: list[str], linear: str = LINEAR_FORM) -> list[str]:
    """One LSTM step: x (B, F), states [h (B, U), c (B, U)] → [h', c'] (B, U) float32."""
    U = cell.hidden_size
    Wx, Wh, Wb, Rb = _xh_weights(cell)
    assert Wx.shape[1] == 4 * U
    f, g, h_act = _activation_fns(cell)
    h, c = states
    z = LINEAR_FORMS[linear](b, x, h, Wx, Wh, Wb + Rb)  # (B, 4U), gates i o f c
    ifo, cand = b.op("Split", [z, b.const(np.array([3 * U, U], np.int64), "split")], n_out=2, axis=-1)
    i, o, fg = b.op("Split", [f(b, ifo), b.const(np.array([U, U, U], np.int64), "split")], n_out=3, axis=-1)
    c_next = b.op("Add", [b.op("Mul", [fg, c]), b.op("Mul", [i, g(b, cand)])])
    h_next = b.op("Mul", [o, h_act(b, c_next)])
    return [h_next, c_next]


def gru_step(b: Builder, cell: CellWeights, *, x: str, states: list[str], linear: str = LINEAR_FORM) -> list[str]:
    """One GRU step (either linear_before_reset): x (B, F), states [h (B, U)] → [h'] (B, U) float32.

    Always x·Wᵀ and h·Rᵀ as two products whatever `linear` says: r scales only the candidate's recurrent part, so one
    product over [x, h] would need zero blocks (a third more weights to read per step)."""
    U = cell.hidden_size
    Wx, Wh, Wb, Rb = _xh_weights(cell)
    assert Wx.shape[1] == 3 * U
    f, g = _activation_fns(cell)
    (h,) = states
    zr, hc = slice(0, 2 * U), slice(2 * U, 3 * U)
    sizes = b.const(np.array([2 * U, U], np.int64), "split")
    halves = b.const(np.array([U, U], np.int64), "split")
    if cell.attrs.get("linear_before_reset", 0):
        gx = b.op("Add", [b.op("MatMul", [x, b.const(Wx, "Wx")]), b.const(Wb, "Wb")])  # (B, 3U)
        gh = b.op("Add", [b.op("MatMul", [h, b.const(Wh, "Wh")]), b.const(Rb, "Rb")])  # (B, 3U)
        zr_x, xh = b.op("Split", [gx, sizes], n_out=2, axis=-1)
        zr_h, hh = b.op("Split", [gh, sizes], n_out=2, axis=-1)
        z, r = b.op("Split", [f(b, b.op("Add", [zr_x, zr_h])), halves], n_out=2, axis=-1)
        cand = g(b, b.op("Add", [xh, b.op("Mul", [r, hh])]))
    else:
        # Every bias sits outside r ⊙ (…) here, so Wb + Rb is one bias on the input product.
        gx = b.op("Add", [b.op("MatMul", [x, b.const(Wx, "Wx")]), b.const(Wb + Rb, "b")])  # (B, 3U)
        zr_x, xh = b.op("Split", [gx, sizes], n_out=2, axis=-1)
        zr_h = b.op("MatMul", [h, b.const(np.ascontiguousarray(Wh[:, zr]), "Rzr")])  # (B, 2U)
        z, r = b.op("Split", [f(b, b.op("Add", [zr_x, zr_h])), halves], n_out=2, axis=-1)
        rh = b.op("MatMul", [b.op("Mul", [r, h]), b.const(np.ascontiguousarray(Wh[:, hc]), "Rh")])  # (B, U)
        cand = g(b, b.op("Add", [xh, rh]))
    h_next = b.op("Add", [cand, b.op("Mul", [z, b.op("Sub", [h, cand])])])
    return [h_next]


def rnn_step(b: Builder, cell: CellWeights, *, x: str, states: list[str], linear: str = LINEAR_FORM) -> list[str]:
    """One SimpleRNN step: x (B, F), states [h (B, U)] → [h'] (B, U) float32."""
    Wx, Wh, Wb, Rb = _xh_weights(cell)
    (f,) = _activation_fns(cell)
    (h,) = states
    return [f(b, LINEAR_FORMS[linear](b, x, h, Wx, Wh, Wb + Rb))]


# ONNX op kind → one decomposed time step: the single truth of which cells have a decomposed form.
STEP_CELLS: dict[str, Callable[..., list[str]]] = {"LSTM": lstm_step, "GRU": gru_step, "RNN": rnn_step}
