"""Compare two models' outputs and report every output with its max difference and tolerance.

Like Optimum's exporter validation: all outputs are checked and reported, then the caller fails once.
Device-safe: numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


@dataclass
class OutputCheck:
    name: str
    max_abs_diff: float
    atol: float
    shape: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return bool(self.max_abs_diff <= self.atol)


@dataclass
class ParityReport:
    reference: str
    candidate: str
    checks: list[OutputCheck] = field(default_factory=list)
    argmax_agreement: float | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def summary(self) -> str:
        """One line per output: name, max |Δ|, tolerance, verdict."""
        lines = [f"{self.reference} vs {self.candidate}:"]
        for c in self.checks:
            lines.append(f"  {c.name}: max|Δ| {c.max_abs_diff:.3g} (atol {c.atol:g}) {'ok' if c.ok else 'FAIL'}")
        if self.argmax_agreement is not None:
            lines.append(f"  argmax agreement {self.argmax_agreement:.2%}")
        return "\n".join(lines)


def compare(
    reference: dict[str, npt.NDArray],
    candidate: dict[str, npt.NDArray],
    *,
    atol: float,
    names: tuple[str, str] = ("reference", "candidate"),
    argmax_of: str | None = None,
) -> ParityReport:
    """Max |Δ| of every output present in both dicts (shapes must match); optional argmax agreement."""
    report = ParityReport(*names)
    for key, ref in reference.items():
        got = candidate[key]
        if np.shape(ref) != np.shape(got):
            report.checks.append(OutputCheck(key, float("inf"), atol, tuple(np.shape(got))))
            continue
        diff = np.abs(np.asarray(ref, np.float64) - np.asarray(got, np.float64))
        report.checks.append(OutputCheck(key, float(np.max(diff)) if diff.size else 0.0, atol, tuple(np.shape(got))))
    if argmax_of is not None:
        report.argmax_agreement = float(np.mean(reference[argmax_of].argmax(-1) == candidate[argmax_of].argmax(-1)))
    return report


@dataclass
class QuantGate:
    """The promise a quantized classifier keeps against its fp32 model, with every figure it was judged on."""

    candidate: str
    agreement: float  # top-1 agreement on all inputs (reported, not gated: near-ties flip with the CPU's int8 kernels)
    confident_agreement: float  # top-1 agreement where fp32's top-1 leads its runner-up by ≥ `margin`
    confident_count: int
    margin: float
    accuracy_drop_pp: float | None  # fp32 accuracy − quantized accuracy, percentage points (None without labels)
    mean_max_abs_diff: float  # mean over inputs of max |Δprob|
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def quant_gate(
    fp32_probs: npt.NDArray,
    quant_probs: npt.NDArray,
    *,
    labels: npt.NDArray | None = None,
    candidate: str = "int8",
) -> QuantGate:
    """Judge a quantized classifier's (N, classes) outputs against fp32's; collect every failed promise.

    The promises and why they hold on every host are in tolerances.py (QUANT_*).
    """
    from ..tolerances import (
        QUANT_CONFIDENT_MARGIN,
        QUANT_MAX_ACCURACY_DROP_PP,
        QUANT_MAX_MEAN_PROB_DIFF,
        QUANT_MIN_CONFIDENT_AGREEMENT,
    )

    fp32_probs, quant_probs = np.asarray(fp32_probs), np.asarray(quant_probs)
    if fp32_probs.shape != quant_probs.shape or fp32_probs.ndim != 2 or len(fp32_probs) == 0:
        raise ValueError(f"quant_gate needs two (N, classes) arrays of one shape, got {fp32_probs.shape} and {quant_probs.shape}")
    top2 = np.sort(fp32_probs, axis=1)[:, -2:]
    confident = (top2[:, 1] - top2[:, 0]) >= QUANT_CONFIDENT_MARGIN
    same = fp32_probs.argmax(1) == quant_probs.argmax(1)
    gate = QuantGate(
        candidate,
        agreement=float(same.mean()),
        confident_agreement=float(same[confident].mean()) if confident.any() else 1.0,
        confident_count=int(confident.sum()),
        margin=QUANT_CONFIDENT_MARGIN,
        accuracy_drop_pp=None
        if labels is None
        else 100.0 * float(np.mean(fp32_probs.argmax(1) == labels) - np.mean(quant_probs.argmax(1) == labels)),
        mean_max_abs_diff=float(np.mean(np.max(np.abs(fp32_probs.astype(np.float64) - quant_probs), axis=1))),
    )
    if gate.confident_agreement < QUANT_MIN_CONFIDENT_AGREEMENT:
        gate.failures.append(
            f"{candidate} agrees with fp32 on {gate.confident_agreement:.2%} of the {gate.confident_count} inputs fp32 is sure of "
            f"(top-1 ahead by ≥ {QUANT_CONFIDENT_MARGIN:g}) < {QUANT_MIN_CONFIDENT_AGREEMENT:.1%}"
        )
    if gate.mean_max_abs_diff > QUANT_MAX_MEAN_PROB_DIFF:
        gate.failures.append(
            f"{candidate}'s probabilities differ from fp32's by {gate.mean_max_abs_diff:.3f} on average (max |Δ| per input) "
            f"> {QUANT_MAX_MEAN_PROB_DIFF:g}"
        )
    if gate.accuracy_drop_pp is not None and gate.accuracy_drop_pp > QUANT_MAX_ACCURACY_DROP_PP:
        gate.failures.append(f"{candidate} loses {gate.accuracy_drop_pp:.2f} pp accuracy > {QUANT_MAX_ACCURACY_DROP_PP:g} pp")
    return gate
