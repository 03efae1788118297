"""Shared fixtures: real models trained briefly on the real bundled digits, once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from edge_rnn.config import LstmConfig

# Long enough that the model is a real digit classifier (~90% held-out), short enough for CI.
# Augmentation off: the tests' tolerances were measured on this model as it was (the recipe's augmentation has
# tests of its own, and needs more than 6 epochs to pay off).
TEST_LSTM = LstmConfig(epochs=6, batch_size=32, seed=0, augment_shift=0.0, augment_rotate=0.0, augment_scale=0.0)


@pytest.fixture(scope="session")
def digits():
    from edge_rnn.train.data import load_sample

    return load_sample()


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory, digits):
    """A trained, exported and int8-quantized mnist-lstm folder (read-only for tests: copy to modify)."""
    from edge_rnn.exporter import export
    from edge_rnn.train.lstm import save_trained, train
    from edge_rnn.quantize import quantize

    out = tmp_path_factory.mktemp("mnist-lstm")
    result = train(digits, cfg=TEST_LSTM)
    save_trained(result, digits, out, cfg=TEST_LSTM)
    export(out)
    quantize(out, variants=("int8",))
    return out


@pytest.fixture()
def mnist_copy(tmp_path, mnist_dir):
    """A private copy of the trained folder, for tests that change or break files."""
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(mnist_dir, dst)
    return dst


@pytest.fixture(scope="session")
def heldout_batch(digits):
    return digits.x_test[:16], digits.y_test[:16]


def write_png(path, pixels: np.ndarray, mode: str = "L") -> None:
    from PIL import Image

    img = Image.fromarray(pixels.astype(np.uint8), mode="L")
    img.convert(mode).save(path)


# Where a weight scale sits: DynamicQuantizeLSTM's inputs 8 (W_scale) and 10 (R_scale); a dynamically
# quantized MatMul's weight scale is an initializer of the Mul after MatMulInteger.
LSTM_SCALE_INPUT = {"lstm W": 8, "lstm R": 10}


def damage_scale(src, dst, *, factor: float, which: str) -> str:
    """Copy an int8 model with one weight scale multiplied by `factor` (a broken quantizer); return its name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    initializers = {t.name: t for t in model.graph.initializer}
    if which in LSTM_SCALE_INPUT:
        names = [n.input[LSTM_SCALE_INPUT[which]] for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM"]
    else:  # the last dense layer's weight scale
        names = [i for n in model.graph.node if n.op_type == "Mul" for i in n.input if i in initializers and "scale" in i][-1:]
    assert names, [n.op_type for n in model.graph.node]
    target = initializers[names[0]]
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * np.float32(factor), target.name))
    onnx.save(model, str(dst))
    return target.name


@pytest.fixture(scope="session")
def char_dir(tmp_path_factory):
    """A briefly trained, exported and int8-quantized char-rnn folder on the real Shakespeare text."""
    from edge_rnn.train.char_rnn import save_trained, train
    from edge_rnn.config import CharRnnConfig
    from edge_rnn.train.data import load_text
    from edge_rnn.exporter import export
    from edge_rnn.quantize import quantize

    out = tmp_path_factory.mktemp("char-rnn")
    # A 200k-char slice, saved as the corpus the manifest names, so held-out scoring reads the same text.
    corpus = tmp_path_factory.mktemp("corpus") / "shakespeare-200k.txt"
    corpus.write_text(load_text(None)[:200_000], encoding="utf-8")
    text = load_text(corpus)
    cfg = CharRnnConfig(hidden=64, iters=3_000, seed=0)
    result = train(text, config=cfg)
    save_trained(result, out_dir=out, text=text, text_source=str(corpus), config=cfg)
    export(out)
    quantize(out, variants=("int8",))
    return out


def in_role(fused: dict[str, int], role: str) -> dict[str, int]:
    """The fused recurrent ops (op → count) a role's graph holds, given the sequence model's: a step model runs the
    cells that export/decomposed.STEP_FORMS decomposes as MatMul + gates instead."""
    from edge_rnn.export.decomposed import STEP_FORMS

    if "step" not in role:
        return fused
    return {op: n for op, n in fused.items() if STEP_FORMS[op] == "fused"}


def one_line_error(result, *fragments: str) -> str:
    """A CliRunner result that failed with exit 1 and one `error:` line holding every fragment; return the line."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output
    return lines[0]


@pytest.fixture(scope="session")
def user_models(tmp_path_factory):
    """Three users' Keras models on real data (tests/user_models.py): {name: (model folder, data .npz)},
    exported and int8-quantized (read-only for tests: copy to modify)."""
    from user_models import make_user_models

    return make_user_models(tmp_path_factory.mktemp("user-models"))


def ort_answers(path, x, *, batch: int = 1) -> np.ndarray:
    """The first output of a plain onnxruntime session (one thread), `batch` rows per call; `x` is the array for the
    model's first input, or {input name: array}. The tests' independent check of what edge-rnn reports."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = x if isinstance(x, dict) else {session.get_inputs()[0].name: x}
    n = len(next(iter(feeds.values())))
    return np.concatenate([session.run(None, {k: v[i : i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)])
