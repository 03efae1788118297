"""The README's main job, `edge-rnn pipeline`, end to end on the bundled data (short training)."""

from __future__ import annotations

from typer.testing import CliRunner

from conftest import TEST_LSTM
from edge_rnn.cli import app
from edge_rnn.device.manifest import load_manifest
from edge_rnn.tolerances import QUANT_MIN_CONFIDENT_AGREEMENT


def test_pipeline_trains_exports_quantizes_and_checks_both_models(tmp_path):
    out = tmp_path / "artifacts"
    result = CliRunner().invoke(
        app, ["pipeline", "--data", "sample", "--epochs", str(TEST_LSTM.epochs), "--char-iters", "3000", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    for row in ("keras", "onnx fp32", "onnx int8", "onnx step fp32", "onnx step int8", "numpy fp64", "onnx fp16"):
        assert row in result.output
    assert "same-seed text equal" in result.output
    mnist = load_manifest(out / "mnist-lstm")
    assert set(mnist["files"]) == {"keras", "onnx", "onnx_int8", "onnx_step", "onnx_step_int8"}
    metrics = mnist["metrics"]
    for role in ("onnx", "onnx_step"):  # the streamed model answers like the whole-sequence one, on every digit
        assert metrics[f"keras_vs_{role}_max_abs_prob_diff"] <= 1e-5 and metrics[f"keras_vs_{role}_argmax_agreement"] == 1.0
    for role in ("onnx_int8", "onnx_step_int8"):
        assert metrics[f"{role}_vs_onnx_confident_agreement"] >= QUANT_MIN_CONFIDENT_AGREEMENT
        assert metrics[f"{role}_vs_onnx_confident_count"] >= 700
    assert metrics["keras_accuracy"] == metrics["onnx_accuracy"] > 0.8
    char = load_manifest(out / "char-rnn")
    assert set(char["files"]) == {"checkpoint", "onnx", "onnx_int8", "onnx_fp16"}
    assert char["metrics"]["numpy_vs_onnx_max_abs_logit_diff"] <= 1e-4 and char["metrics"]["same_seed_text_equal"] is True
    assert abs(char["metrics"]["onnx_val_nats_per_char"] - char["metrics"]["numpy_val_nats_per_char"]) < 1e-4
