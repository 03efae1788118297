"""The on-device self-test of a bundle: its reference inputs run through every bundled model on this machine's
onnxruntime, each output judged against the source model's answers at the tolerance the bundle stores for its role.

Device path: numpy, onnxruntime and this package's device modules only. The bundle format is in bundle.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import EdgeRnnError
from .bundle import Bundle
from .labels import label_kind
from .session import load_bundle_model
from .stepper import Stepper


@dataclass
class OutputResult:
    """One role's answer for one output on the reference inputs, against the source model's."""

    role: str
    output: str
    max_abs_diff: float
    atol: float
    agreement: float | None = None  # top-1 agreement on the inputs the source is sure of (classifier outputs)
    sure: int = 0  # how many inputs that is
    argmax_min: float | None = None
    mean_abs_diff: float | None = None  # mean over the inputs of each one's max |Δ| (where a mean_atol is stored)
    mean_atol: float | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.failure

    @property
    def failure(self) -> str:
        """Which bound this output broke ('' when it kept them all)."""
        if self.error:
            return self.error
        broken = []
        if not self.max_abs_diff <= self.atol:
            broken.append(f"max |Δ| {self.max_abs_diff:.3g} > {self.atol:.3g}")
        if self.mean_atol is not None and not (self.mean_abs_diff is not None and self.mean_abs_diff <= self.mean_atol):
            broken.append(f"mean max |Δ| {self.mean_abs_diff:.3g} > {self.mean_atol:.3g}")
        if self.argmax_min is not None and self.agreement is not None and self.agreement < self.argmax_min:
            broken.append(f"top-1 {self.agreement:.1%} of {self.sure} sure < {self.argmax_min:.1%}")
        return "; ".join(broken)


@dataclass
class SelfTest:
    bundle: Path
    count: int
    source: str
    results: list[OutputResult] = field(default_factory=list)
    # What the answers were computed with: int8 answers change with the thread count and the CPU's int8 path, so a
    # self-test says both (the ARM check compares ARM and x86 at equal thread counts).
    threads: int | None = 1
    host: str = ""
    onnxruntime: str = ""

    @property
    def ran_with(self) -> str:
        """'1 thread, onnxruntime 1.32.0, <host>' — printed with the verdict."""
        threads = "onnxruntime's default threads" if self.threads is None else f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        return ", ".join(p for p in (threads, f"onnxruntime {self.onnxruntime}" if self.onnxruntime else "", self.host) if p)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)


def _answers(model: Any, inputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The file's outputs for the reference inputs, one input at a time as a device runs them (batch 1: a dynamic
    int8 model's activation scale spans its batch, so answers computed together would depend on each other)."""
    n = len(next(iter(inputs.values())))
    rows = [_batch_answers(model, {k: v[i : i + 1] for k, v in inputs.items()}, {k: v[i : i + 1] for k, v in reference.items()})
            for i in range(n)]
    return {name: np.concatenate([r[name] for r in rows]) for name in rows[0]}


def _batch_answers(model: Any, inputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The file's outputs for a batch of inputs: whole sequences in one call, or step by step with the Stepper."""
    graph_inputs = [i.name for i in model.session.get_inputs()]
    if all(name in inputs for name in graph_inputs):
        names = [o.name for o in model.session.get_outputs()]
        return dict(zip(names, model.run({name: inputs[name] for name in graph_inputs})))
    batch = len(next(iter(inputs.values())))
    stepper = Stepper(model, batch=batch)
    steps = list(stepper.run_sequence({s["name"]: inputs[s["name"]] for s in stepper.input_specs}))
    out = {}
    for name in stepper.output_names:
        ref = reference.get(name)
        # A per-step output (time length 1) answers for the whole sequence concatenated; others by the last step.
        if ref is not None and steps and steps[0][name].ndim == ref.ndim >= 2 and steps[0][name].shape[1] == 1 and ref.shape[1] == len(steps):
            out[name] = np.concatenate([s[name] for s in steps], axis=1)
        else:
            out[name] = steps[-1][name]
    return out


def _top1(ref: npt.NDArray, got: npt.NDArray, *, kind: str = "softmax") -> tuple[float | None, int]:
    """Top-1 agreement on the rows where the source's top-1 leads its runner-up by the quantization margin (a sigmoid
    output's: the same yes/no on every unit, where each is half that margin from 0.5; see labels.agreement)."""
    from ..tolerances import QUANT_CONFIDENT_MARGIN
    from .labels import agreement

    same, sure = agreement(ref, got, QUANT_CONFIDENT_MARGIN, kind=kind)
    if not sure.any():
        return None, 0
    return float(same[sure].mean()), int(sure.sum())


def self_test(bundle: Bundle, *, roles: list[str] | None = None, threads: int | None = 1) -> SelfTest:
    """Run the reference inputs through every bundled model (or `roles`) on this machine's onnxruntime and judge
    each output against the source model's answers and the tolerance stored for that role."""
    ref_block = bundle.manifest["reference"]
    inputs, reference = bundle.reference()
    import onnxruntime

    from .hostinfo import cpu_features, describe

    report = SelfTest(bundle.path, int(ref_block.get("count", 0)), str(ref_block.get("source", "")), threads=threads,
                      host=describe(cpu_features()), onnxruntime=onnxruntime.__version__)
    for role in roles or [r for r in bundle.roles if not r.endswith("_config")]:
        tolerances = ref_block["tolerances"].get(role, {})
        try:
            model = load_bundle_model(bundle.path, role=role, threads=threads, bundle=bundle)
            got = _answers(model, inputs, reference)
        except EdgeRnnError as exc:
            report.results.append(OutputResult(role, "-", float("inf"), 0.0, error=str(exc)))
            continue
        for name, ref in reference.items():
            tol = tolerances.get(name)
            if name not in got or not isinstance(tol, dict):
                continue  # an output this file does not produce (a step file's state), or no tolerance for it
            answer = got[name]
            if answer.shape != ref.shape:
                report.results.append(OutputResult(role, name, float("inf"), tol["atol"], error=f"shape {answer.shape}, source {ref.shape}"))
                continue
            delta = np.abs(answer.astype(np.float64) - ref.astype(np.float64))  # (N, …)
            diff = float(np.max(delta)) if ref.size else 0.0
            kind = label_kind(bundle.manifest, classes=ref.shape[-1]) if ref.ndim else "softmax"
            agreement, sure = _top1(ref, answer, kind=kind) if tol.get("argmax_min") is not None else (None, 0)
            mean_atol = tol.get("mean_atol")
            mean = float(delta.reshape(len(delta), -1).max(axis=1).mean()) if mean_atol is not None and ref.size else None
            report.results.append(OutputResult(role, name, diff, float(tol["atol"]), agreement, sure, tol.get("argmax_min"),
                                               mean, None if mean_atol is None else float(mean_atol)))
    return report
