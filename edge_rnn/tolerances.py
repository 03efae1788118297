"""Numeric tolerances, named once and used by both the library's checks and the tests."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import numpy.typing as npt

# Keras (float32, TF kernels) vs ONNX fp32 (onnxruntime kernels): softmax probabilities.
FP32_PROB_ATOL = 1e-5
# A graph cleanup only reroutes tensors (same math): cleaned vs raw export outputs.
CLEAN_FP32_ATOL = 1e-6
# NumPy float64 reference vs ONNX float32: char-RNN logits, where a caller has no weights and inputs to derive
# the bound from (char_rnn_fp32_bound below replaces it wherever it has them). A number measured on one host:
# an AMX host's onnxruntime was off by 1.3e-4 on `check`'s random set, and an AVX2 one by 3.4e-4 on the
# pipeline's char RNN (random ids from a random state, the steps where no unit is saturated yet).
FP32_LOGIT_ATOL = 1e-4
# Loss recomputed from ONNX logits vs the NumPy reference loss (relative).
LOSS_RTOL = 1e-5
# int8 (or fp16) vs fp32, the promise a quantized classifier keeps on every host (edge_rnn.device.parity.quant_gate).
# Top-1 agreement over *all* inputs is not a promise: a near-tie (fp32's top two classes a few 1e-3 apart)
# flips with the rounding of whichever int8 kernels onnxruntime picks for the CPU (AVX2, AVX-512, VNNI,
# AMX, arm dot-product), so 99% held on an AVX-512 host and failed (98.8%) on an AVX2 one with the same
# model. Where fp32 is sure of its answer, a sound quantizer does not change it on any host:
# Measured (tests' 6-epoch model, 804 of 1,000 held-out digits that sure): 100% for sound int8 in five
# settings whose overall agreement ranged 99.0–99.5%; 9–63% with one LSTM weight scale ×4.
QUANT_CONFIDENT_MARGIN = 0.5  # fp32's top-1 probability leads its runner-up by at least this
QUANT_MIN_CONFIDENT_AGREEMENT = 0.995  # of those inputs, this share must keep fp32's top-1
# And the model stays as useful: held-out accuracy may drop at most this much (percentage points).
QUANT_MAX_ACCURACY_DROP_PP = 1.0
# Decisions alone miss a broken scale on a layer whose output order survives it (the softmax layer's
# weight scale ×4 multiplies every logit by 4: same argmax, probabilities far off), so the probabilities
# must stay close on average: the mean over inputs of max |Δprob|. Measured on the tests' 6-epoch model
# (AVX-512 VNNI host): 0.0065–0.008 for sound int8 (per-tensor, per-channel, reduce_range, QUInt8 weights:
# stand-ins for other hosts' rounding), ≥ 0.06 with any one weight scale ×1.5 (LSTM or Dense).
QUANT_MAX_MEAN_PROB_DIFF = 0.03
# A quantized char RNN (int8 output projection, fp16 weights) vs fp32: held-out nats/char may rise at most
# this much. A loss over thousands of characters does not hinge on near-ties the way top-1 does; measured
# +0.002 (int8) and +0.0000 (fp16) on the default model, +0.3 and more with the projection's scale ×4.
QUANT_MAX_NATS_INCREASE = 0.02
# Centred-difference gradient check, float64: max relative error per parameter.
GRADCHECK_MAX_REL_ERROR = 1e-6
# Keras (TF kernels, float32) vs onnxruntime's fused LSTM/GRU/RNN (float32), outputs of scale ~1: both
# sum the same products in a different order; a dozen steps of 16 units stay well below this.
KERAS_ONNX_ATOL = 1e-5
# The same comparison for outputs far from 1 (e.g. an unscaled regression target ~10²): float32 rounding
# grows with the magnitude, so compare relative to it.
KERAS_ONNX_RTOL = 1e-5
# A step model run T times vs the sequence model run once (both onnxruntime float32): same kernels, the
# input projection batched differently.
STEP_SEQUENCE_ATOL = 1e-5
# The literal outputs in Keras' own recurrent layer tests are asserted there with atol = rtol = 1e-5.
KERAS_TEST_ORACLE_TOL = 1e-5
# A bundle's self-test of a quantized (int8, fp16) model against the *source* model's outputs (Keras or NumPy) on
# its few reference inputs, on whatever host the device is. Probabilities: max |Δ| over the inputs and classes,
# plus QUANT_MIN_CONFIDENT_AGREEMENT top-1 agreement on the inputs the source is sure of (QUANT_CONFIDENT_MARGIN).
# Measured, int8 vs Keras on 1,000 held-out digits (20-epoch model, AVX-512 VNNI host): per-digit max |Δprob| mean
# 0.003, 99th percentile 0.085, worst 0.22 (a near-tie); 0.0006 on a bundle's 8. A runtime that ignores the LSTM's
# activations (tract) is off by 0.6, a swapped model by ~1.
BUNDLE_QUANT_PROB_ATOL = 0.3
# A max alone misses a broken softmax layer: its weight scale ×4 keeps every argmax and moves the probabilities
# by ~0.1 on average, 0.37 at most on the tests' bundle (6-epoch model) — over 0.3 there, but under it on 43% of
# random 8-digit reference sets, and ×2 (0.17) passes. So the probabilities must also stay close on average, like
# the pipeline's QUANT_MAX_MEAN_PROB_DIFF: the mean over the reference inputs of each one's max |Δprob|. Measured
# vs Keras on that model (AVX-512 VNNI host; per-tensor, per-channel, reduce_range and QUInt8 int8 as stand-ins for
# other hosts' rounding): 0.0045–0.008 on the bundle's 8; over 100,000 random 8-digit sets of the 1,000 held-out
# digits ≤ 0.049, above 0.04 in 0.05% of them (a set holding near-ties). Damaged: on the bundle's 8, 0.13 with
# the Dense scale ×4, 0.58 with one LSTM W scale ×4; over random 8-digit sets Dense ×4 exceeds 0.05 in 91%.
# A single near-tie (up to ~0.25 on another host) among 8 otherwise sound inputs adds ~0.03: still under this.
BUNDLE_QUANT_MEAN_PROB_DIFF = 0.05
# Other outputs (logits, states): max |Δ| relative to the output's magnitude, max(|source|, 1). int8 recurrent weights
# (the char RNN's RNN, a GRU: quantize/cells.py) carry their rounding through every step of the state, so the bound is
# the quantization's, not a host's: the pipeline's char RNN (2-minute recipe) on its 16 held-out reference lines, int8
# logits 1.04 of max |logit| 11.4 (9.1%) and h 0.052, identical on x86 (AVX2) and emulated Cortex-A72/A76 (float
# compute); with only the output layer int8 it was 0.18 of 16 (1.1%); fp16 h 0.0026. One weight scale of the same
# file ×1.5 puts the logits 5.6 off (49%) and h 2.0 (the RNN's W or R scale), ×4 18–34: a sound file stays 2.2× under
# 0.2, a broken one ≥ 2.5× over it; a swapped model is off by several nats.
BUNDLE_QUANT_OUTPUT_RTOL = 0.2
# A `.ort` file vs the `.onnx` it was converted from, both on onnxruntime: the same graph after `basic`
# optimisation (ort_format.py); measured max |Δ| 0 on mnist-lstm (fp32, int8, step) and the char RNN. The
# margin allows the device's full build to fuse the `.onnx` further at load than the saved `.ort` is.
ORT_FORMAT_ATOL = 1e-6
# Budgets of a quantized model's metric on the user's data (`evaluate`, `quantize --data`; `--max-drop` changes
# them): accuracy may fall at most this many percentage points, as QUANT_MAX_ACCURACY_DROP_PP on the built-ins…
EVAL_MAX_ACCURACY_DROP_PP = QUANT_MAX_ACCURACY_DROP_PP
# …and an error metric (MAE, RMSE, nats/char) may rise at most this many percent of fp32's. 2%: int8 weight
# rounding adds noise of ~1/256 of each weight's range, which moves a regression's MAE by well under 1% when
# the model is sound; a broken scale moves it by tens of percent (measured: the tests' CO2 forecaster's MAE
# doubles with int8 everywhere, tests/test_evaluate.py). For a char RNN's ~2 nats/char, 2% is 0.04 nats.
EVAL_MAX_ERROR_INCREASE = 2.0


# ---------------------------------------------------------------------------------------------
# The char RNN's float32 error, derived from its weights and inputs instead of measured on one host.
#
# onnxruntime runs h_t = tanh(Wxh x_t + bh + Whh h_{t-1}), y_t = Why h_t + by in float32; hosts differ in the
# order they sum (AVX2, AVX-512 and AMX kernels block the sums differently, with or without FMA) and in their tanh.
# Rounding model (Higham & Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput.
# 41(5), 2019): each operation rounds with an independent, mean-zero relative error |δ| ≤ u. A sum of n products
# evaluated in *any* order (any tree, fused or not) makes at most 2n − 1 roundings, each of a partial result
# ≤ S = Σ|terms|, so its error is Σ cᵢδᵢ with Σcᵢ² ≤ n·S²: a Hoeffding width √n·u·S for every summation order.
# To first order the errors then travel linearly: e_t = D_t (Whh e_{t-1} + ε_t) + η_t, D_t = diag(1 − h_t²)
# (tanh's slope, which is what lets the RNN forget an error), so the widths add up in the covariance
#     C_t = D_t Whh C_{t-1} Whhᵀ D_t + diag(D_t² · n_in · u² · S_t² + τ²)
# over the sequence — its length and magnitudes are the model's own, step by step — and a logit's width is
# √(Why C_t Whyᵀ + n_out u² (|Why||h_t| + |by|)²). Hoeffding: |error| > λ·width with probability ≤ 2·exp(−λ²/2).
# The weights' own rounding to float32 is one fixed error, the same at every step: it is propagated exactly
# (first order, signed) and added. Measured (AVX2, onnxruntime 1.32 and NumPy float32 in four summation orders; the
# pipeline's H=100 model and the tests' H=64 one; real text and random ids from a random state, 32 to 10,000
# characters): every |Δ| stayed under 0.45 width (λ = 1); tests/test_char_tolerance.py keeps that true.
FP32_UNIT_ROUNDOFF = 2.0**-24
# onnxruntime's float32 tanh (MLAS's rational approximation): measured max |error| 3.0 u inside its RNN op and 5.5 u
# in its Tanh op (AVX2, 2·10⁷ points in [−12, 12]); 16 u leaves room for other hosts' kernels.
FP32_TANH_MAX_ERROR = 16 * FP32_UNIT_ROUNDOFF
# λ of the bound: 2·exp(−32) ≈ 2.5·10⁻¹⁴ per element, so a check's 256 × 32 × 65 logits exceed it by chance with
# probability ~10⁻⁸ under the model, and the observed errors (≤ 0.45 λ=1 widths) stay ≥ 17× under it. A model off by
# 0.1% (Why × 1.001) exceeds it 100–160×.
CHAR_RNN_BOUND_LAMBDA = 8.0


def char_rnn_fp32_bound(
    params: Mapping[str, npt.NDArray[np.float64]], *, ids: npt.NDArray[np.integer], h0: npt.NDArray[np.floating]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per-element bounds on |float32 − exact| of the char RNN's logits (N, T, V) and last state h (N, H), for ids
    (N, T) read from h0 (N, H) by the float64 `params` Wxh (H, V), Whh (H, H), Why (V, H), bh (H, 1), by (V, 1)."""
    Wxh, Whh, Why = (np.asarray(params[k], np.float64) for k in ("Wxh", "Whh", "Why"))
    bh, by = (np.asarray(params[k], np.float64).reshape(-1) for k in ("bh", "by"))
    # The fixed error of storing each weight in float32.
    dWxh, dWhh, dWhy, dbh, dby = (w.astype(np.float32).astype(np.float64) - w for w in (Wxh, Whh, Why, bh, by))
    ids = np.asarray(ids, dtype=np.intp)
    N, T = ids.shape
    H, V = Whh.shape[0], Why.shape[0]
    u = FP32_UNIT_ROUNDOFF
    n_in, n_out = V + H + 2, H + 1  # pre-activation: x's V products, two biases, H products; logit: H products, by
    tanh_var = (FP32_TANH_MAX_ERROR / u) ** 2  # variances are kept in units of u², away from float underflow
    WhhT, WhyT, abs_WhhT, abs_WhyT = Whh.T.copy(), Why.T.copy(), np.abs(Whh).T.copy(), np.abs(Why).T.copy()
    # The covariance is propagated in float32 (8× faster than float64 at H=100): its own relative rounding, ~10⁻⁶
    # over thousands of steps, is nothing beside λ.
    WhhT32, WhyT32 = WhhT.astype(np.float32), WhyT.astype(np.float32)
    diag = np.arange(H)
    h = np.asarray(h0, np.float64).reshape(N, H)  # (N, H) exact state
    C = np.zeros((N, H, H), np.float32)  # covariance of the rounding error of h, / u²
    shift = np.zeros((N, H))  # first-order effect of the float32 weights on h
    logits = np.empty((N, T, V))
    for t in range(T):
        x_col = Wxh.T[ids[:, t]]  # (N, H): Wxh x_t for one-hot x_t
        S = np.abs(x_col) + np.abs(bh) + np.abs(h) @ abs_WhhT  # (N, H) Σ|terms| of each pre-activation
        pre_shift = dWxh.T[ids[:, t]] + dbh + h @ dWhh.T + shift @ WhhT
        h = np.tanh(x_col + bh + h @ WhhT)
        D = 1.0 - h * h  # (N, H) tanh'
        CW = (C.reshape(N * H, H) @ WhhT32).reshape(N, H, H)  # C Whhᵀ, whose transpose is Whh C (C is symmetric)
        C = (CW.transpose(0, 2, 1).reshape(N * H, H) @ WhhT32).reshape(N, H, H)  # Whh C Whhᵀ
        D32 = D.astype(np.float32)
        C *= D32[:, :, None]
        C *= D32[:, None, :]
        C[:, diag, diag] += ((D * S) ** 2 * n_in + tanh_var).astype(np.float32)
        shift = D * pre_shift
        CWy = (C.reshape(N * H, H) @ WhyT32).reshape(N, H, V)  # C Whyᵀ
        var = np.einsum("hv,nhv->nv", WhyT32, CWy).astype(np.float64) + n_out * (np.abs(h) @ abs_WhyT + np.abs(by)) ** 2
        fixed = shift @ WhyT + h @ dWhy.T + dby
        logits[:, t] = CHAR_RNN_BOUND_LAMBDA * u * np.sqrt(np.maximum(var, 0.0)) + np.abs(fixed)
    state = CHAR_RNN_BOUND_LAMBDA * u * np.sqrt(np.maximum(C[:, diag, diag].astype(np.float64), 0.0)) + np.abs(shift)
    return logits, state
