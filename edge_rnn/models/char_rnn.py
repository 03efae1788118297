"""The built-in char-rnn: a NumPy checkpoint → one ONNX graph (graphs.char_rnn_model), NumPy as the reference.

Its model.onnx is its own step model: it takes the hidden state `h0` and returns `h`, so feeding one
character at a time and carrying `h` is streaming; the manifest's `step` block says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import EdgeRnnError, ModelFileError
from ..tolerances import CHAR_RNN_BOUND_LAMBDA, FP32_LOGIT_ATOL, char_rnn_fp32_bound
from .base import Adapter, Arrays, Exported, Graph

ONNX_FILE = "model.onnx"
# Validation starts from a random state of about the scale tanh states have while reading text.
H0_SCALE = 0.5


def text_ids(manifest: dict[str, Any], *, split: str) -> npt.NDArray[np.int64]:
    """Char ids (N,) int64 of the model's training text ('train') or its held-out tail ('heldout')."""
    from ..train.char_rnn import encode, text_split

    train, val = text_split(manifest)
    return encode(train if split == "train" else val, vocab="".join(manifest["vocab"]))


def step_block(io: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `step` block: one id per call, the hidden state carried from `h` back into `h0`."""
    (ids, h0), (logits, h) = io["inputs"], io["outputs"]
    return {
        "inputs": [{**ids, "shape": ["batch", 1]}],
        "outputs": [{**logits, "shape": ["batch", 1, logits["shape"][-1]]}],
        "state": [{"layer": "rnn", "name": "h", "input": h0["name"], "output": h["name"], "dtype": "float32",
                   "shape": ["batch", h0["shape"][-1]]}],
    }


class CharRnnAdapter(Adapter):
    """min-char-rnn from its NumPy checkpoint (see the module docstring)."""

    name = "char-rnn"
    source_roles = ("checkpoint",)
    source_kind = "numpy"
    bench_kind = "generate"
    needs_calibration_data = False  # its own training text calibrates it

    def load(self, model_dir: Path, manifest: dict[str, Any]):
        from ..train.char_rnn import load_checkpoint
        from ..device.manifest import verified_file

        checkpoint = load_checkpoint(verified_file(manifest, model_dir, "checkpoint"))
        if list(checkpoint.vocab) != manifest.get("vocab"):
            raise ModelFileError(f"the checkpoint's vocabulary differs from the manifest's in {model_dir} — retrain the folder")
        return checkpoint

    def export(self, source, manifest: dict[str, Any], *, opset: int, fail_on_loop: bool = False) -> Exported:
        from ..train.char_rnn import io_spec
        from ..export.graphs import char_rnn_model

        model = char_rnn_model(source.params, vocab=source.vocab, opset=opset)
        io = io_spec(hidden=source.hidden, vocab_size=len(source.vocab))
        audit = [{
            "layer": "rnn", "cls": "min-char-rnn (NumPy)", "onnx_ops": [n.op_type for n in model.graph.node], "fused": True,
            "note": "one fused RNN op (tanh) built with onnx.helper; quantize_dynamic makes the output MatMul int8, "
                    "RNN stays float32 (not in onnxruntime's IntegerOps registry)",
        }]
        return Exported([Graph("onnx", ONNX_FILE, model)], {"io": io, "step": step_block(io), "audit": audit, "masking": []})

    def sample_inputs(self, manifest: dict[str, Any], *, batch: int, time_steps: int, seed: int) -> Arrays:
        rng = np.random.default_rng(seed)
        (ids, h0) = manifest["io"]["inputs"]
        hidden = h0["shape"][-1]
        return {
            ids["name"]: rng.integers(0, len(manifest["vocab"]), size=(batch, time_steps)).astype(np.int64),
            h0["name"]: (rng.standard_normal((batch, hidden)) * H0_SCALE).astype(np.float32),
        }

    def reference_inputs(self, manifest: dict[str, Any], *, count: int, time_steps: int, seed: int) -> Arrays:
        # Real held-out text from a zero state, as a device scores it: `count` chunks at seeded offsets.
        text = text_ids(manifest, split="heldout")
        starts = np.random.default_rng(seed).choice(len(text) - time_steps, size=count, replace=False)
        (ids, h0) = manifest["io"]["inputs"]
        return {ids["name"]: np.stack([text[s : s + time_steps] for s in starts]),
                h0["name"]: np.zeros((count, h0["shape"][-1]), np.float32)}

    def stream_inputs(self, manifest: dict[str, Any], *, steps: int, seed: int) -> Arrays:
        # The training text itself: the characters the model meets when it generates.
        ids = manifest["step"]["inputs"][0]["name"]
        return {ids: text_ids(manifest, split="train")[None, :steps]}

    def reference(self, source, inputs: Arrays, *, io: dict[str, Any]) -> Arrays:
        from ..train.char_rnn import forward

        (ids, h0), (logits, h) = [s["name"] for s in io["inputs"]], [s["name"] for s in io["outputs"]]
        rows = [forward(source.params, ids=row, h_prev=h_row[:, None]) for row, h_row in zip(inputs[ids], inputs[h0])]
        return {logits: np.stack([r[0] for r in rows]), h: np.stack([r[1][:, 0] for r in rows])}

    def tolerance(self, output: str, reference: npt.NDArray, *, stepped: bool, source: Any = None,
                  inputs: Arrays | None = None) -> tuple[Any, str]:
        # NumPy float64 vs onnxruntime float32, stepped or not: the same float32 rounding per step. Given the
        # checkpoint and the inputs, the bound per element derived from them (tolerances.char_rnn_fp32_bound),
        # which holds whatever order a host's kernels sum in; without them, the number measured on one host.
        if source is None or not inputs:
            return FP32_LOGIT_ATOL, f"atol {FP32_LOGIT_ATOL:g}"
        ids = next(x for x in inputs.values() if np.issubdtype(x.dtype, np.integer))
        h0 = next(x for x in inputs.values() if np.issubdtype(x.dtype, np.floating))
        # One bound per set serves both outputs: kept with the very objects it was derived from (held, so compared by
        # identity without an id being reused).
        cached = getattr(self, "_bound", None)
        if cached is None or any(a is not b for a, b in zip(cached[0], (source, ids, h0))):
            cached = self._bound = ((source, ids, h0), char_rnn_fp32_bound(source.params, ids=ids, h0=h0))
        logits, h = cached[1]
        bound = logits if reference.ndim == logits.ndim else h
        if bound.shape != reference.shape:
            return FP32_LOGIT_ATOL, f"atol {FP32_LOGIT_ATOL:g}"
        return bound, f"float32 bound per element from the weights and inputs (λ {CHAR_RNN_BOUND_LAMBDA:g})"

    def calibration_feeds(self, model_dir: Path, manifest: dict[str, Any], fp32_path: Path, *, samples: int, batch: int,
                          data: dict[str, str] | None = None) -> list[Arrays]:
        """Char-id chunks of the training text, each batch row its own stream with the hidden state carried over."""
        import onnxruntime as ort

        if data:
            raise EdgeRnnError("char-rnn calibrates on its own training text; --calibration-data is for Keras models")
        inputs = [spec["name"] for spec in manifest["io"]["inputs"]]
        T = int(manifest["config"]["seq_length"])
        H = int(manifest["config"]["hidden"])
        ids = text_ids(manifest, split="train")[: samples * T]
        chunks = ids[: len(ids) // T * T].reshape(-1, T)
        # States come from running fp32, so the ranges of h0 are the ones the model meets when generating.
        rows = len(chunks) // batch * batch or len(chunks)
        streams = chunks[:rows].reshape(-1 if rows >= batch else 1, min(batch, rows), T)
        session = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
        h = np.zeros((streams.shape[1], H), np.float32)
        feeds = []
        for chunk in streams:
            feed = {inputs[0]: chunk.astype(np.int64), inputs[1]: h}
            feeds.append(feed)
            h = session.run(None, feed)[1]
        return feeds
