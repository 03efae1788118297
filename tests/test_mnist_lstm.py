"""The Keras LSTM MNIST path end to end: train → ONNX → int8 → onnxruntime, on real held-out digits."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edge_rnn.export.graphs import op_counts
from edge_rnn.train.lstm import load_keras_model, preprocess
from edge_rnn.device.manifest import load_manifest, sha256_file
from edge_rnn.device.runtime import load_model, predict_probs
from edge_rnn.device.parity import quant_gate
from edge_rnn.tolerances import FP32_PROB_ATOL

from conftest import damage_scale


@pytest.fixture(scope="module")
def probs(mnist_dir, digits):
    """Keras, ONNX fp32 and ONNX int8 probabilities on all 1,000 held-out digits."""
    keras_model, manifest = load_keras_model(mnist_dir)
    x = preprocess(digits.x_test)
    return {
        "keras": keras_model.predict(x, batch_size=256, verbose=0),
        "onnx": predict_probs(load_model(mnist_dir / "model.onnx"), x),
        "int8": predict_probs(load_model(mnist_dir / "model.int8.onnx"), x),
    }


def test_model_is_a_real_classifier(probs, digits):
    # 6 short epochs on 4,000 digits: well above chance, so parity below is about a real model.
    assert np.mean(probs["keras"].argmax(1) == digits.y_test) > 0.80


def test_keras_vs_onnx_fp32_parity(probs, digits):
    assert len(digits.y_test) >= 500
    np.testing.assert_allclose(probs["onnx"], probs["keras"], rtol=0, atol=FP32_PROB_ATOL)
    assert np.array_equal(probs["onnx"].argmax(1), probs["keras"].argmax(1))


def test_int8_keeps_the_quantization_promise(probs, digits):
    gate = quant_gate(probs["onnx"], probs["int8"], labels=digits.y_test)
    assert gate.ok, gate.failures
    # Enough of the held-out digits are ones fp32 is sure of for the promise to mean something.
    assert gate.confident_count >= 0.7 * len(digits.y_test)
    # Quantization really changed the numbers (it is not the fp32 model twice).
    assert np.max(np.abs(probs["int8"] - probs["onnx"])) > 1e-6


@pytest.mark.parametrize(
    "which, broken",
    [("lstm W", ("sure of", "pp accuracy", "on average")), ("lstm R", ("sure of", "pp accuracy", "on average")),
     # ×4 on the softmax layer's weights keeps every argmax: only the probability promise can see it.
     ("dense", ("on average",))],
)
def test_the_int8_gate_fails_on_a_damaged_model(probs, digits, mnist_dir, tmp_path, which, broken):
    """The promise above is not vacuous: one weight tensor's scale ×4 must break it on any host."""
    from edge_rnn.device.runtime import create_session

    damaged = tmp_path / "damaged.onnx"
    name = damage_scale(mnist_dir / "model.int8.onnx", damaged, factor=4.0, which=which)
    session = create_session(damaged)
    x = preprocess(digits.x_test)
    feed = session.get_inputs()[0].name
    broken_probs = np.concatenate([session.run(None, {feed: x[i : i + 256]})[0] for i in range(0, len(x), 256)])
    gate = quant_gate(probs["onnx"], broken_probs, labels=digits.y_test, candidate=f"int8 with {name} ×4")
    assert not gate.ok, f"{name} ×4 still passes: {gate}"
    for promise in broken:
        assert any(promise in f for f in gate.failures), (promise, gate.failures)


@pytest.mark.parametrize("fp32_file, int8_file", [("model.onnx", "model.int8.onnx"), ("model.step.onnx", "model.step.int8.onnx")])
def test_graphs_hold_fused_lstm_ops(mnist_dir, fp32_file, int8_file):
    fp32 = onnx.load(str(mnist_dir / fp32_file))
    int8 = onnx.load(str(mnist_dir / int8_file))
    assert op_counts(fp32).get("LSTM") == 2
    assert "Loop" not in op_counts(fp32) and "Scan" not in op_counts(fp32)
    assert op_counts(int8).get("DynamicQuantizeLSTM") == 2
    assert "LSTM" not in op_counts(int8)
    onnx.checker.check_model(fp32, full_check=True)
    acts = [list(a.strings) for n in fp32.graph.node if n.op_type == "LSTM" for a in n.attribute if a.name == "activations"]
    assert acts == [[b"Sigmoid", b"Relu", b"Relu"]] * 2


def test_step_model_streams_each_digit(mnist_dir):
    """keras_onnx's step model: one row per call, h and c of both LSTMs carried; parity and int8 drift recorded."""
    manifest = load_manifest(mnist_dir)
    step = manifest["step"]
    assert [s["name"] for s in step["inputs"]] == ["input"] and step["inputs"][0]["shape"] == ["batch", 1, 28]
    assert [s["name"] for s in step["outputs"]] == ["probs"]
    assert [(s["name"], s["shape"]) for s in step["state"]] == [("h", ["batch", 128]), ("c", ["batch", 128])] * 2
    parity = manifest["metrics"]["export_parity"]
    assert parity["onnx"]["probs"]["ok"] and parity["onnx_step"]["probs"]["ok"]
    assert parity["onnx_step"]["probs"]["max_abs_diff"] <= FP32_PROB_ATOL
    drift = manifest["quantization"]["onnx_step_int8"]["step_drift"]
    assert drift["steps"] >= 1000 and 0 < drift["outputs_max_abs_diff"]["probs"] <= 1.0
    assert set(drift["state_max_abs_diff"]) == {s["output"] for s in step["state"]}


def test_onnx_metadata_and_dynamic_batch(mnist_dir, digits):
    model = onnx.load(str(mnist_dir / "model.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["edge_rnn.model"] == "mnist-lstm"
    assert json.loads(meta["edge_rnn.config"])["units"] == 128
    assert "tensorflow" in json.loads(meta["edge_rnn.versions"])
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = load_model(mnist_dir / "model.onnx")
    for n in (1, 7):
        (p,) = session.run({"input": preprocess(digits.x_test[:n])})
        assert p.shape == (n, 10)
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)


def test_manifest_describes_every_file(mnist_dir):
    manifest = load_manifest(mnist_dir)
    assert manifest["model"] == "mnist-lstm"
    assert manifest["data"]["name"] == "sample" and manifest["data"]["train"] == 4000 and manifest["data"]["heldout"] == 1000
    assert manifest["preprocessing"]["scale"] == pytest.approx(1 / 255)
    assert manifest["labels"] == [str(d) for d in range(10)]
    assert set(manifest["files"]) == {"keras", "onnx", "onnx_step", "onnx_int8", "onnx_step_int8"}
    assert manifest["adapter"] == "mnist-lstm"
    for entry in manifest["files"].values():
        path = mnist_dir / entry["path"]
        assert entry["sha256"] == sha256_file(path) and entry["bytes"] == path.stat().st_size
    for lib in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime"):
        assert manifest["versions"][lib]
    assert manifest["opset"] == 17
    assert manifest["graphs"]["onnx_int8"]["DynamicQuantizeLSTM"] == 2
    assert 0.0 < manifest["metrics"]["keras_accuracy"] <= 1.0
    # int8 weights: about a quarter of the fp32 file.
    assert manifest["files"]["onnx_int8"]["bytes"] < 0.35 * manifest["files"]["onnx"]["bytes"]


def test_training_is_reproducible(digits):
    from edge_rnn.config import LstmConfig
    from edge_rnn.train.data import Digits
    from edge_rnn.train.lstm import train

    small = Digits("s", "s", digits.x_train[:256], digits.y_train[:256], digits.x_test[:64], digits.y_test[:64])
    cfg = LstmConfig(epochs=1, batch_size=64, seed=3)
    a = train(small, cfg=cfg).model.get_weights()
    b = train(small, cfg=cfg).model.get_weights()
    for wa, wb in zip(a, b):
        np.testing.assert_array_equal(wa, wb)


def test_pipeline_gate_fails_on_a_damaged_int8_file(mnist_copy, digits):
    """The pipeline's own gate (what makes `edge-rnn pipeline` exit 1) on a folder whose int8 file is broken."""
    from edge_rnn.device.manifest import load_manifest, record_file, save_manifest
    from edge_rnn.pipeline import check_classifier, gate_classifier

    rows, reports, gates = check_classifier(mnist_copy, digits.x_test, digits.y_test)
    assert gate_classifier(reports, gates) == []
    damage_scale(mnist_copy / "model.int8.onnx", mnist_copy / "model.int8.onnx", factor=4.0, which="lstm W")
    manifest = load_manifest(mnist_copy)
    record_file(manifest, mnist_copy, "onnx_int8", "model.int8.onnx")
    save_manifest(mnist_copy, manifest)
    rows, reports, gates = check_classifier(mnist_copy, digits.x_test, digits.y_test)
    failures = gate_classifier(reports, gates)
    assert failures and all(f.startswith("onnx int8") for f in failures), failures


def test_steps_per_execution_changes_no_weight(digits):
    """The recipe runs 32 training steps per call into the graph for speed: the weights must be bit-identical."""
    import dataclasses

    from edge_rnn.config import LstmConfig
    from edge_rnn.train.data import Digits
    from edge_rnn.train.lstm import train

    small = Digits("s", "s", digits.x_train[:320], digits.y_train[:320], digits.x_test[:32], digits.y_test[:32])
    weights = [train(small, cfg=dataclasses.replace(LstmConfig(), epochs=2, steps_per_execution=spe)).model.get_weights()
               for spe in (1, 32)]
    assert len(weights[0]) == len(weights[1]) > 0
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


def test_augmented_batches_are_seeded_and_move_the_digits(digits):
    """Each epoch's training batches are moved (shift, rotation, scale) by draws fixed by seed, epoch and batch:
    the same batches twice, others the next epoch, the plain digits in the same order with augmentation off."""
    import dataclasses

    from edge_rnn.config import LstmConfig
    from edge_rnn.train.data import Digits
    from edge_rnn.train.lstm import train_batches

    small = Digits("s", "s", digits.x_train[:256], digits.y_train[:256], digits.x_test[:32], digits.y_test[:32])
    cfg = LstmConfig(seed=5)
    plain_cfg = dataclasses.replace(cfg, augment_shift=0.0, augment_rotate=0.0, augment_scale=0.0)
    moved = [list(train_batches(small, cfg, 64)(epoch).as_numpy_iterator()) for epoch in (0, 0, 1)]
    plain = list(train_batches(small, plain_cfg, 64)(0).as_numpy_iterator())
    assert len(moved[0]) == len(plain) == 4
    for (xa, ya), (xb, yb), (xp, yp) in zip(moved[0], moved[1], plain):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)  # seeded
        assert np.array_equal(ya, yp)  # the same digits in the same order, only moved
        assert xa.dtype == np.float32 and xa.min() >= 0.0 and xa.max() <= 1.0
        assert np.mean(np.abs(xa - xp).max(axis=(1, 2)) > 0.5) > 0.9  # (nearly) every digit moved
        np.testing.assert_allclose(xa.sum(), xp.sum(), rtol=0.1)  # moved, not erased: the ink stays
    assert not any(np.array_equal(xa, xb) for (xa, _), (xb, _) in zip(moved[0], moved[2]))  # each epoch its own
    assert sorted(np.concatenate([y for _, y in plain]).tolist()) == sorted(small.y_train.tolist())
