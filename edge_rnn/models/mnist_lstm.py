"""The built-in mnist-lstm: a Keras model like any other, validated and calibrated on its own digits.

Its folder comes from `edge-rnn train mnist-lstm` (model.keras + a manifest with data, preprocessing and
labels); the export is the generic Keras one, with the output named `probs` as the manifest says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import DataError
from .base import Arrays, Exported
from .keras_model import KerasAdapter


def _digit_images(manifest: dict[str, Any], *, split: str) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    from ..train.data import KERAS_SETS, load_digits

    data = manifest.get("data", {})
    name, source = data.get("name"), data.get("source")
    spec = name if name in (*KERAS_SETS, "sample") else source
    if not spec:
        raise DataError(f"the manifest of {manifest.get('model')} does not say which data it was trained on")
    digits = load_digits(spec)
    if digits.warnings:
        # load_digits fell back to the bundled sample: not the data the model was trained and held out on.
        raise DataError(f"cannot load the model's data {spec!r} ({digits.warnings[0]}) — restore access to it")
    return (digits.x_train, digits.y_train) if split == "train" else (digits.x_test, digits.y_test)


def classifier_inputs(manifest: dict[str, Any], *, split: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The model's own data as preprocessed float32 (N, T, F) inputs and int64 labels (N,); split 'train' or 'heldout'."""
    from ..device.runtime import preprocess_pixels

    images, labels = _digit_images(manifest, split=split)
    return preprocess_pixels(images, preprocessing=manifest["preprocessing"]), labels.astype(np.int64)


def _rename_output(model, old: str, new: str) -> None:
    """Rename graph output `old` to `new` (a model.keras saved before its last layer was named `probs`)."""
    for node in model.graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
    for value in model.graph.output:
        if value.name == old:
            value.name = new


class MnistLstmAdapter(KerasAdapter):
    """Keras export and reference; real digits (not random pixels) for validation, calibration and drift."""

    name = "mnist-lstm"
    bench_kind = "classify"
    needs_calibration_data = False  # its own training digits calibrate it

    def load(self, model_dir: Path, manifest: dict[str, Any]):
        from ..train.lstm import load_keras_model

        return load_keras_model(model_dir)[0]

    def export(self, source, manifest: dict[str, Any], *, opset: int, fail_on_loop: bool = False) -> Exported:
        exported = super().export(source, manifest, opset=opset, fail_on_loop=fail_on_loop)
        want = manifest["io"]["outputs"][0]["name"]
        got = exported.fields["io"]["outputs"][0]["name"]
        if got != want:
            for graph in exported.graphs:
                _rename_output(graph.model, got, want)
            for block in (exported.fields["io"], exported.fields.get("step", {})):
                for spec in block.get("outputs", []):
                    spec["name"] = want if spec["name"] == got else spec["name"]
        return exported

    def sample_inputs(self, manifest: dict[str, Any], *, batch: int, time_steps: int, seed: int) -> Arrays:
        x, _ = classifier_inputs(manifest, split="train")
        idx = np.random.default_rng(seed).choice(len(x), size=batch, replace=False)
        return {manifest["io"]["inputs"][0]["name"]: x[idx]}

    def stream_inputs(self, manifest: dict[str, Any], *, steps: int, seed: int) -> Arrays:
        # A device streams one digit at a time from a zero state (this relu LSTM's state is unbounded over
        # endless rows): ⌈steps / 28⌉ training digits, each its own stream of 28 rows, batched.
        x, _ = classifier_inputs(manifest, split="train")
        return {manifest["step"]["inputs"][0]["name"]: x[: -(-steps // x.shape[1])]}

    def calibration_feeds(self, model_dir: Path, manifest: dict[str, Any], fp32_path: Path, *, samples: int, batch: int,
                          data: dict[str, str] | None = None) -> list[Arrays]:
        if data:
            return super().calibration_feeds(model_dir, manifest, fp32_path, samples=samples, batch=batch, data=data)
        x, _ = classifier_inputs(manifest, split="train")
        x = x[:samples]
        name = manifest["io"]["inputs"][0]["name"]
        return [{name: x[i : i + batch]} for i in range(0, len(x), batch)]
