"""Validate exported ONNX files against their source model, Optimum-style: names first, then every output's
shape and values, all collected before anyone fails; and step models, fed one time step at a time.

Workstation side (the device has its own stepper); imports numpy and onnxruntime.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import numpy.typing as npt

from ..device.parity import OutputCheck, ParityReport

Arrays = dict[str, npt.NDArray]
# (output name, reference array) → (max |Δ| allowed, the tolerance as text)
Tolerance = Callable[[str, npt.NDArray], tuple[float, str]]


@dataclass
class Validation:
    """One file's check: the parity report and, per output, the tolerance it was judged with."""

    role: str
    report: ParityReport
    tolerances: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.report.ok

    def metrics(self) -> dict[str, dict[str, Any]]:
        """{output: {max_abs_diff, tolerance, ok}} for the manifest."""
        return {c.name: {"max_abs_diff": c.max_abs_diff, "tolerance": self.tolerances.get(c.name, f"atol {c.atol:g}"),
                         "ok": c.ok} for c in self.report.checks}

    def failures(self) -> list[str]:
        return [f"{self.role} {c.name}: missing or shaped {c.shape}, not as the reference" if np.isinf(c.max_abs_diff)
                else f"{self.role} {c.name}: max|Δ| {c.max_abs_diff:.3g} > {self.tolerances.get(c.name, c.atol)}"
                for c in self.report.checks if not c.ok]


def session(path: str | os.PathLike[str]):
    """A one-thread onnxruntime CPU session (the machines this runs on are shared)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_steps(sess, step: dict[str, Any], inputs: Arrays, *, initial: Arrays | None = None) -> list[Arrays]:
    """Feed a step model one time step at a time, carrying every `step['state']` tensor from output to input.

    `inputs` hold whole sequences (batch, T, …) for the step model's inputs with time length 1, and
    per-call values for the others; states start at `initial` (zeros where absent). Returns each step's outputs.
    """
    names = [spec["name"] for spec in step["inputs"]]
    temporal = {spec["name"] for spec in step["inputs"] if len(spec["shape"]) > 1 and spec["shape"][1] == 1}
    batch = len(inputs[names[0]])
    T = max(inputs[n].shape[1] for n in names if n in temporal)
    state = {s["input"]: np.zeros((batch, s["shape"][-1]), np.float32) for s in step["state"]}
    state.update(initial or {})
    out_names = [o.name for o in sess.get_outputs()]
    steps = []
    for t in range(T):
        feed = {n: inputs[n][:, t : t + 1] if n in temporal else inputs[n] for n in names}
        outs = dict(zip(out_names, sess.run(None, {**feed, **state})))
        state = {s["input"]: outs[s["output"]] for s in step["state"]}
        steps.append(outs)
    return steps


def stepped_outputs(steps: list[Arrays], step: dict[str, Any], reference: Arrays) -> Arrays:
    """The step model's answer for the whole sequence: a per-step output (time length 1) concatenated over time
    where the reference is a sequence too, otherwise the last step's value."""
    out = {}
    T = len(steps)
    for spec in step["outputs"]:
        name = spec["name"]
        ref = reference.get(name)
        per_step = len(spec["shape"]) > 1 and spec["shape"][1] == 1
        if per_step and ref is not None and ref.ndim == len(spec["shape"]) and ref.shape[1] == T:
            out[name] = np.concatenate([s[name] for s in steps], axis=1)
        else:
            out[name] = steps[-1][name]
    return out


def check(role: str, reference: Arrays, got: Arrays, *, tolerance: Tolerance, source: str) -> Validation:
    """Every reference output: present, same shape, max |Δ| within its tolerance."""
    report = ParityReport(source, role)
    texts = {}
    for name, ref in reference.items():
        atol, texts[name] = tolerance(name, ref)
        value = got.get(name)
        if value is None or np.shape(value) != np.shape(ref):
            report.checks.append(OutputCheck(name, float("inf"), atol, tuple(np.shape(value)) if value is not None else ()))
            continue
        diff = np.abs(np.asarray(ref, np.float64) - np.asarray(value, np.float64))
        report.checks.append(OutputCheck(name, float(np.max(diff)) if diff.size else 0.0, atol, tuple(np.shape(value))))
    return Validation(role, report, texts)


def drift(fp32_path: str | os.PathLike[str], candidate_path: str | os.PathLike[str], step: dict[str, Any],
          stream: Arrays) -> dict[str, Any]:
    """A quantized step model vs its fp32 step model over `stream` (batch rows are separate streams, the state
    carried and never reset within one): max |Δ| of every output and state over all steps."""
    a = run_steps(session(fp32_path), step, stream)
    b = run_steps(session(candidate_path), step, stream)
    names = [s["name"] for s in step["outputs"]] + [s["output"] for s in step["state"]]
    finite = [all(np.all(np.isfinite(x[n])) for n in names) for x in a]
    note = None
    if not all(finite):
        # An unbounded activation (relu) can overflow fp32 itself on a long stream: compare the steps before.
        first = finite.index(False)
        note = f"fp32 itself overflows at step {first + 1} of this stream (unbounded activation); compared the {first} steps before"
        a, b = a[:first], b[:first]
        if not a:
            return {"steps": 0, "note": note}
    diffs = {n: [float(np.max(np.abs(x[n].astype(np.float64) - y[n]))) for x, y in zip(a, b)] for n in names}
    outputs = {s["name"]: max(diffs[s["name"]]) for s in step["outputs"]}
    state = {s["output"]: max(diffs[s["output"]]) for s in step["state"]}
    streams = len(next(iter(stream.values())))
    return {
        "steps": len(a) * streams,
        "streams": streams,
        "steps_per_stream": len(a),
        "outputs_max_abs_diff": outputs,
        "state_max_abs_diff": state,
        "max_abs_diff": max([*outputs.values(), *state.values()]),
        "last_step_max_abs_diff": max(diffs[n][-1] for n in names),
        **({"note": note} if note else {}),
    }
