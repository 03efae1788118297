"""What every model kind's adapter provides to the export and quantize stages.

An adapter is the one place that knows a kind of model: how its source (a Keras file, a NumPy
checkpoint) becomes ONNX graphs and manifest fields, what its source answers for given inputs (the
reference the export is validated against), which inputs are realistic for it, which data calibrates
static int8, and what it refuses. The stages call adapters and never ask which kind they hold.

Workstation side: imports onnx and (inside functions) keras.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..device import bounded
from ..errors import DataError

# Inputs are dicts of input name → array; so are outputs (output name → array).
Arrays = dict[str, npt.NDArray]


@dataclass
class Graph:
    """One ONNX file an export makes: its manifest role, file name and model."""

    role: str
    file: str
    model: Any  # onnx.ModelProto


@dataclass
class Exported:
    """What an adapter's export produced: the graphs, the manifest fields they imply, and notes to print."""

    graphs: list[Graph]
    fields: dict[str, Any]  # io, step or step_refused, audit, masking, … (merged into the manifest)
    notes: list[str] = field(default_factory=list)


class Adapter:
    """Base class of every model kind's adapter (see the module docstring); subclasses fill in each method."""

    name = ""
    # Roles of the files a source comes in (the export refuses a folder holding none of them).
    source_roles: tuple[str, ...] = ()
    # How `bench` scores this kind (a key of bench.KINDS): "classify" (held-out accuracy on the model's own
    # data), "generate" (held-out nats/char) or "outputs" (max |Δ| of every output vs onnxruntime fp32).
    bench_kind = "outputs"
    # Whether static int8 needs the user's calibration data (no data of its own to calibrate on).
    needs_calibration_data = True
    # What the source model runs on, as a bundle's reference block names it: "keras" or "numpy".
    source_kind = ""

    def load(self, model_dir: Path, manifest: dict[str, Any]) -> Any:
        """The source model of a folder (a Keras model, a checkpoint), verified against the manifest."""
        raise NotImplementedError

    def export(self, source: Any, manifest: dict[str, Any], *, opset: int, fail_on_loop: bool = False) -> Exported:
        """Source model → ONNX graphs (role onnx, and onnx_step where the model streams) and manifest fields."""
        raise NotImplementedError

    def sample_inputs(self, manifest: dict[str, Any], *, batch: int, time_steps: int, seed: int) -> Arrays:
        """Realistic inputs for validation, keyed by the manifest's io input names (time axis `time_steps` long)."""
        raise NotImplementedError

    def reference(self, source: Any, inputs: Arrays, *, io: dict[str, Any]) -> Arrays:
        """The source model's outputs for `inputs`, keyed by the names of `io`'s outputs (in the model's order)."""
        raise NotImplementedError

    def tolerance(self, output: str, reference: npt.NDArray, *, stepped: bool, source: Any = None,
                  inputs: Arrays | None = None) -> tuple[Any, str]:
        """Max |Δ| allowed for `output` against `reference` (whole sequence, or `stepped` through the step model),
        and the tolerance as text for reports: one number, or one per element of `reference` where the adapter can
        derive it from the `source` model and the `inputs` that produced `reference` (callers that accept only a
        number leave those out)."""
        raise NotImplementedError

    def calibration_feeds(
        self, model_dir: Path, manifest: dict[str, Any], fp32_path: Path, *, samples: int, batch: int,
        data: dict[str, str] | None = None,
    ) -> list[Arrays]:
        """Feed dicts of real inputs for static int8 calibration (`data`: input name → .npy path, given by the user)."""
        raise NotImplementedError

    def reference_inputs(self, manifest: dict[str, Any], *, count: int, time_steps: int, seed: int) -> Arrays:
        """`count` inputs for a bundle's reference vectors: real data where the kind has its own, sample inputs otherwise."""
        return self.sample_inputs(manifest, batch=count, time_steps=time_steps, seed=seed)

    def stream_inputs(self, manifest: dict[str, Any], *, steps: int, seed: int) -> Arrays:
        """One long realistic stream (batch 1, `steps` time steps) for measuring int8 drift in the step model."""
        return self.sample_inputs(manifest, batch=1, time_steps=steps, seed=seed)


def load_npy(path: str | os.PathLike[str], *, what: str) -> np.ndarray:
    """A .npy array without pickles, its header checked against MAX_ARRAY_BYTES and the file before it is read;
    a bad file is a one-line DataError naming it and `what` it was for."""
    return bounded.load_npy(path, what=f".npy file ({what})", error=DataError)
