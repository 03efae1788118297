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
