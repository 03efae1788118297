"""Numeric tolerances, named once and used by both the library's checks and the tests."""

# Keras (float32, TF kernels) vs ONNX fp32 (onnxruntime kernels): softmax probabilities.
FP32_PROB_ATOL = 1e-5
# A graph cleanup only reroutes tensors (same math): cleaned vs raw export outputs.
CLEAN_FP32_ATOL = 1e-6
# NumPy float64 reference vs ONNX float32: char-RNN logits.
FP32_LOGIT_ATOL = 1e-4
# Loss recomputed from ONNX logits vs the NumPy reference loss (relative).
LOSS_RTOL = 1e-5
# int8 (or fp16) vs fp32, the promise a quantized classifier keeps on every host (edge_rnn.device.parity.quant_gate).
# Top-1 agreement over *all* inputs is not a promise: a near-tie (fp32's top two classes a few 1e-3 apart)
# flips with the rounding of whichever int8 kernels onnxruntime picks for the CPU (AVX2, AVX-512, VNNI,
# AMX, arm dot-product), so 99% held on an AVX-512 host and failed (98.8%) on an AVX2 one with the same
# model. Where fp32 is sure of its answer, a sound quantizer does not change it on any host:
QUANT_CONFIDENT_MARGIN = 0.5  # fp32's top-1 probability leads its runner-up by at least this
QUANT_MIN_CONFIDENT_AGREEMENT = 0.995  # of those inputs, this share must keep fp32's top-1
# And the model stays as useful: held-out accuracy may drop at most this much (percentage points).
QUANT_MAX_ACCURACY_DROP_PP = 1.0
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
