"""ONNX char-RNN graph: structure, and parity with the NumPy reference through onnxruntime."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edge_rnn.train import char_rnn
from edge_rnn.device import sampling
from edge_rnn.train.data import load_text
from edge_rnn.config import CharRnnConfig
from edge_rnn.export.graphs import char_rnn_model
from edge_rnn.tolerances import FP32_LOGIT_ATOL, LOSS_RTOL

HIDDEN = 32


@pytest.fixture(scope="module")
def checkpoint() -> char_rnn.Checkpoint:
    # Briefly trained on real text, so logits are peaked and the state is far from zero.
    return char_rnn.train(load_text(None)[:50_000], config=CharRnnConfig(hidden=HIDDEN, iters=600)).checkpoint


@pytest.fixture(scope="module")
def model(checkpoint) -> onnx.ModelProto:
    return char_rnn_model(checkpoint.params, vocab=checkpoint.vocab)


@pytest.fixture(scope="module")
def session(model) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def ids(checkpoint) -> np.ndarray:
    # 1,500 characters of the held-out tail of the slice the model was trained on.
    return char_rnn.encode(load_text(None)[45_000:46_500], vocab=checkpoint.vocab)


def run(session, ids: np.ndarray, h0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    ids = np.atleast_2d(ids).astype(np.int64)
    h0 = np.zeros((ids.shape[0], HIDDEN), np.float32) if h0 is None else h0
    logits, h = session.run(["logits", "h"], {"ids": ids, "h0": h0})
    return logits, h


def onnx_step(session):
    return lambda ids, h: run(session, ids, h)


def test_graph_structure(model, checkpoint):
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["RNN"] == 1 and ops["MatMul"] == 1 and ops["Add"] == 1 and "Loop" not in ops and "Scan" not in ops
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*model.graph.input, *model.graph.output]}
    V = len(checkpoint.vocab)
    assert dims == {"ids": ["batch", "time"], "h0": ["batch", HIDDEN], "logits": ["batch", "time", V], "h": ["batch", HIDDEN]}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert all(init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64) for init in model.graph.initializer)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["vocab"] == checkpoint.vocab and props["hidden"] == str(HIDDEN)


def test_logits_match_numpy(session, checkpoint, ids):
    h0 = np.random.default_rng(0).uniform(-0.5, 0.5, (1, HIDDEN))
    ref_logits, ref_h = char_rnn.forward(checkpoint.params, ids=ids, h_prev=h0.T)
    logits, h = run(session, ids, h0.astype(np.float32))
    assert logits.dtype == np.float32 and logits.shape == (1, len(ids), len(checkpoint.vocab))
    np.testing.assert_allclose(logits[0], ref_logits, rtol=0, atol=FP32_LOGIT_ATOL)
    np.testing.assert_allclose(h, ref_h.T, rtol=0, atol=FP32_LOGIT_ATOL)


def test_step_by_step_equals_whole_sequence(session, ids):
    whole, h_whole = run(session, ids[:300])
    h = np.zeros((1, HIDDEN), np.float32)
    steps = []
    for i in ids[:300]:
        logits, h = run(session, np.array([[i]]), h)
        steps.append(logits[0, 0])
    np.testing.assert_allclose(np.array(steps), whole[0], rtol=0, atol=FP32_LOGIT_ATOL)
    np.testing.assert_allclose(h, h_whole, rtol=0, atol=FP32_LOGIT_ATOL)


def test_batch_rows_are_independent(session, ids):
    batch = np.stack([ids[:200], ids[200:400]])
    logits, h = run(session, batch)
    for row in range(2):
        alone, h_alone = run(session, batch[row])
        np.testing.assert_allclose(logits[row], alone[0], rtol=0, atol=FP32_LOGIT_ATOL)
        np.testing.assert_allclose(h[row], h_alone[0], rtol=0, atol=FP32_LOGIT_ATOL)


def test_loss_from_onnx_logits_equals_reference_loss(session, checkpoint, ids):
    inputs, targets = ids[:-1], ids[1:]
    ref_loss, _, _ = char_rnn.loss_and_grads(checkpoint.params, inputs, targets, np.zeros((HIDDEN, 1)))
    logits, _ = run(session, inputs)
    assert char_rnn.cross_entropy(logits[0], targets=targets) == pytest.approx(ref_loss, rel=LOSS_RTOL)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_same_seed_generates_the_same_text(session, checkpoint, temperature):
    kwargs = dict(vocab=checkpoint.vocab, hidden=HIDDEN, prime="ROMEO:", length=300, temperature=temperature, seed=42)
    numpy_text = sampling.sample_with(char_rnn.numpy_step(checkpoint.params), **kwargs)
    onnx_text = sampling.sample_with(onnx_step(session), **kwargs)
    assert onnx_text == numpy_text
    assert numpy_text == char_rnn.sample(checkpoint, prime="ROMEO:", length=300, temperature=temperature, seed=42)


def test_runtime_step_matches_session_run(session, ids):
    from pathlib import Path

    from edge_rnn.device.runtime import LoadedModel, onnx_step

    vocab_size = session.get_outputs()[0].shape[-1]
    state = [{"layer": "rnn", "name": "h", "input": "h0", "output": "h", "dtype": "float32", "shape": ["batch", HIDDEN]}]
    io = {"inputs": [{"name": "ids", "dtype": "int64", "shape": ["batch", 1]}, {"name": "h0", "dtype": "float32", "shape": ["batch", HIDDEN]}],
          "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 1, vocab_size]}, {"name": "h", "dtype": "float32", "shape": ["batch", HIDDEN]}]}
    step = onnx_step(LoadedModel(Path("char_rnn.onnx"), Path("."), "model", {}, session, io, state))
    h = np.zeros((1, HIDDEN), np.float32)
    kept = []
    for i in ids[:50]:  # one char at a time: the preallocated IOBinding path
        logits, h_next = step(np.array([[i]]), h)
        ref_logits, ref_h = run(session, np.array([[i]]), h)
        np.testing.assert_array_equal(logits, ref_logits)
        np.testing.assert_array_equal(h_next, ref_h)
        kept.append((logits, h_next, ref_logits, ref_h))
        h = h_next
    for logits, h_next, ref_logits, ref_h in kept:  # later steps did not overwrite what earlier ones returned
        np.testing.assert_array_equal(logits, ref_logits)
        np.testing.assert_array_equal(h_next, ref_h)
    batch = np.stack([ids[:20], ids[20:40]])  # any other shape goes through session.run
    h0 = np.random.default_rng(0).uniform(-0.5, 0.5, (2, HIDDEN))  # float64 is cast, as before
    logits, h_next = step(batch, h0)
    ref_logits, ref_h = run(session, batch, h0.astype(np.float32))
    np.testing.assert_array_equal(logits, ref_logits)
    np.testing.assert_array_equal(h_next, ref_h)


def test_output_projection_is_quantizable(model, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(model, src)
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
    ops = Counter(node.op_type for node in onnx.load(dst).graph.node)
    assert ops["MatMul"] == 0 and (ops["MatMulInteger"] + ops["DynamicQuantizeMatMul"]) == 1
    assert ops["RNN"] == 1


def test_char_int8_gate_fails_on_a_damaged_projection(char_dir, tmp_path):
    """The pipeline's nats/char promise for quantized char RNNs holds for the real int8 file and fails when
    the output projection's weight scale is ×4 (a broken quantizer)."""
    import shutil

    import onnx
    from onnx import numpy_helper

    from edge_rnn.device.manifest import load_manifest, record_file, save_manifest
    from edge_rnn.pipeline import check_char_rnn

    folder = shutil.copytree(char_dir, tmp_path / "char")
    _, _, failures = check_char_rnn(folder, max_chars=3000)
    assert failures == []
    model = onnx.load(str(folder / "model.int8.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    # The output projection's dynamic-quantization scale (not the RNN weights' stored int8 row scales, `*_int8_scale`).
    scale = next(i for n in model.graph.node if n.op_type == "Mul" for i in n.input
                 if i in inits and "scale" in i and not i.endswith("_int8_scale"))
    inits[scale].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[scale]) * np.float32(4.0), scale))
    onnx.save(model, str(folder / "model.int8.onnx"))
    manifest = load_manifest(folder)
    record_file(manifest, folder, "onnx_int8", "model.int8.onnx")
    save_manifest(folder, manifest)
    _, _, failures = check_char_rnn(folder, max_chars=3000)
    assert len(failures) == 1 and "onnx int8" in failures[0] and "nats/char" in failures[0], failures
