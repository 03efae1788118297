"""Static int8 (QDQ, calibrated on real training digits), fp16, and the coverage report."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edge_rnn.errors import EdgeRnnError
from edge_rnn.export.graphs import op_counts
from edge_rnn.train.lstm import preprocess
from edge_rnn.device.manifest import load_manifest
from edge_rnn.models.mnist_lstm import MnistLstmAdapter, classifier_inputs
from edge_rnn.quantize import quantize, weight_bytes
from edge_rnn.device.runtime import load_model, predict_probs
from edge_rnn.device.parity import quant_gate


@pytest.fixture(scope="module")
def static_dir(tmp_path_factory, mnist_dir):
    import shutil

    out = shutil.copytree(mnist_dir, tmp_path_factory.mktemp("static") / "model")
    reports = quantize(out, variants=("int8-static", "fp16"), calibration="entropy")
    return out, {r.variant: r for r in reports}


def test_static_int8_is_qdq_and_leaves_lstm_float(static_dir):
    out, reports = static_dir
    counts = op_counts(onnx.load(str(out / "model.int8-static.onnx")))
    assert counts["LSTM"] == 2 and counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > 0
    cov = reports["int8-static"].coverage
    assert cov["still_float"]["LSTM"]["count"] == 2
    assert "LSTM" in cov["still_float"]["LSTM"]["why"]
    # The LSTMs hold almost all weights, so static int8 barely shrinks the file — and the report says so.
    assert cov["size"]["weight_ratio"] > 0.9
    assert cov["runtime_int8_ops"]  # onnxruntime fuses the QDQ pairs into int8 kernels
    manifest = load_manifest(out)
    assert manifest["quantization"]["onnx_int8_static"]["settings"]["calibration"] == "entropy"
    assert manifest["files"]["onnx_int8_static"]["path"] == "model.int8-static.onnx"


def test_static_int8_keeps_the_quantization_promise(static_dir, digits):
    out, _ = static_dir
    x = classifier_inputs(load_manifest(out), split="heldout")[0]
    fp32 = predict_probs(load_model(out / "model.onnx"), x)
    q = predict_probs(load_model(out / "model.int8-static.onnx"), x)
    gate = quant_gate(fp32, q, labels=digits.y_test, candidate="int8-static")
    assert gate.ok, gate.failures


def test_calibration_uses_training_digits_not_heldout(mnist_dir, digits):
    manifest = load_manifest(mnist_dir)
    feeds = MnistLstmAdapter().calibration_feeds(mnist_dir, manifest, mnist_dir / "model.onnx", samples=64, batch=32)
    x = np.concatenate([f["input"] for f in feeds])
    assert x.shape == (64, 28, 28) and x.dtype == np.float32
    np.testing.assert_array_equal(x, preprocess(digits.x_train[:64]))


def test_fp16_halves_the_weights(static_dir):
    out, reports = static_dir
    cov = reports["fp16"].coverage
    assert cov["size"]["weight_ratio"] == pytest.approx(0.5, abs=0.01)
    assert weight_bytes(onnx.load(str(out / "model.fp16.onnx")))["by_dtype"].get("float32", 0) == 0


def test_bad_calibration_method_is_refused(mnist_copy):
    with pytest.raises(EdgeRnnError, match="calibration"):
        quantize(mnist_copy, variants=("int8-static",), calibration="magic")
    assert "onnx_int8_static" not in load_manifest(mnist_copy)["files"]
