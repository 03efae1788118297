"""Score every variant of a model on the user's labelled data, the way the device runs it.

Device path: numpy and onnxruntime only (the Keras source model is added as one more runner by
`edge_rnn.evaluate` on a workstation). The data is read once, in chunks; every variant answers each chunk in
batches of the deployed batch size (default 1: a dynamic int8 model quantizes its activations with a scale
that spans the batch it is given, so its answer to one example depends on its batch neighbours, and only the
batch the device runs gives the device's figure). Step models are fed one time step at a time, state carried.

What is kept is per example (hits, errors, agreement with fp32, each example's max |Δ| from fp32), so memory
is flat in the data's size. Each variant gets:
- its metric with a 95% interval (edge_rnn.device.metrics), per scored output;
- the difference to fp32 (`onnx`, or the step model where a bundle has no sequence file) and to the source;
- top-1 agreement with fp32 (classifiers; sign agreement for regressions);
- its promise's verdict: a quantized form keeps the quantization promise on this data (tolerances.py:
  agreement where fp32 is sure, mean max |Δ|, and the metric's drop ≤ the budget); a float32 form (step model,
  `.ort` file, the Keras source) equals fp32 within the float32 tolerance of its kind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from ..errors import InputError
from ..tolerances import (
    EVAL_MAX_ACCURACY_DROP_PP, EVAL_MAX_ERROR_INCREASE, KERAS_ONNX_ATOL, KERAS_ONNX_RTOL, ORT_FORMAT_ATOL, QUANT_CONFIDENT_MARGIN,
    QUANT_MAX_MEAN_PROB_DIFF, QUANT_MIN_CONFIDENT_AGREEMENT, STEP_SEQUENCE_ATOL,
)
from .dataset import Dataset
from .metrics import Figure, Tally, figures, score_batch
from .stepper import Stepper

# Rows read from the data per chunk; each variant then answers the chunk in batches of the deployed size.
CHUNK_ROWS = 256
FP32_BASELINES = ("onnx", "onnx_step")
ORT_SUFFIX = "_ort"
# Runner promises: how a variant is judged against fp32.
QUANTIZED, EXACT, BASELINE = "quantized", "exact", "baseline"

Outputs = dict[str, np.ndarray]


@dataclass
class Runner:
    """One variant: a role name, how it answers a chunk of feeds, and the promise it is judged by."""

    role: str
    run: Callable[[dict[str, np.ndarray]], Outputs]
    promise: str  # QUANTIZED | EXACT | BASELINE
    atol: float | None = None  # EXACT: the float32 tolerance at output scale ~1 (scaled up for large outputs)


@dataclass
class Verdict:
    ok: bool | None  # None: no promise applies (the baseline itself, or no fp32 to compare with)
    failures: list[str] = field(default_factory=list)
    why: str = ""


@dataclass
class VariantScore:
    role: str
    promise: str
    figures: dict[str, list[Figure]]  # per scored output, the headline first
    vs_fp32: float | None = None  # headline metric minus fp32's
    vs_source: float | None = None
    agreement: float | None = None  # top-1 (classifiers) or sign (regressions) agreement with fp32
    sure_agreement: float | None = None
    sure_count: int = 0
    mean_max_abs_diff: float | None = None  # mean over examples of each one's max |Δ| from fp32
    max_abs_diff: float | None = None
    verdict: Verdict = field(default_factory=lambda: Verdict(None))
    seconds: float = 0.0

    @property
    def headline(self) -> Figure | None:
        first = next(iter(self.figures.values()), [])
        return first[0] if first else None

    def to_json(self) -> dict[str, Any]:
        h = self.headline
        return {
            "role": self.role, "promise": self.promise,
            "metric": h.name if h else None, "value": h.value if h else None, "low": h.low if h else None, "high": h.high if h else None,
            "vs_fp32": self.vs_fp32, "vs_source": self.vs_source, "agreement": self.agreement,
            "sure_agreement": self.sure_agreement, "sure_count": self.sure_count, "mean_max_abs_diff": self.mean_max_abs_diff,
            "max_abs_diff": self.max_abs_diff, "ok": self.verdict.ok, "failures": self.verdict.failures,
            "figures": {name: [f.to_json() for f in figs] for name, figs in self.figures.items()},
            "seconds": self.seconds,
        }


@dataclass
class Evaluation:
    data: str
    count: int
    batch: int
    kinds: dict[str, str]  # scored output → metric kind
    baseline: str | None
    variants: list[VariantScore]
    max_drop: float
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(v.verdict.ok is not False for v in self.variants)

    def variant(self, role: str) -> VariantScore | None:
        return next((v for v in self.variants if v.role == role), None)

    def to_json(self) -> dict[str, Any]:
        return {"data": self.data, "examples": self.count, "batch": self.batch, "kinds": self.kinds, "baseline": self.baseline,
                "max_drop": self.max_drop, "ok": self.ok, "notes": self.notes, "variants": [v.to_json() for v in self.variants]}


# ---------------------------------------------------------------------------------------------
# Runners over onnxruntime sessions


def _zero_state(model, n: int) -> dict[str, np.ndarray]:
    return {s["input"]: np.zeros((n, s["shape"][1]), np.float32) for s in model.state}


def sequence_runner(model, *, batch: int) -> Callable[[dict[str, np.ndarray]], Outputs]:
    """A whole-sequence file answering a chunk in batches of `batch` (state inputs, as the char RNN has, start at 0)."""
    names = [o.name for o in model.session.get_outputs()]
    state_out = {s["output"] for s in model.state}

    def run(feeds: dict[str, np.ndarray]) -> Outputs:
        n = len(next(iter(feeds.values())))
        parts: dict[str, list[np.ndarray]] = {name: [] for name in names if name not in state_out}
        for i in range(0, n, batch):
            sub = {k: v[i : i + batch] for k, v in feeds.items()}
            for name, y in zip(names, model.run({**sub, **_zero_state(model, len(next(iter(sub.values()))))})):
                if name in parts:
                    parts[name].append(y)
        return {name: np.concatenate(ys) for name, ys in parts.items()}

    return run


def step_runner(model, *, batch: int) -> Callable[[dict[str, np.ndarray]], Outputs]:
    """A step file fed one time step at a time from the zero state, in batches of `batch`; outputs joined over time
    where the sequence model has a time axis, else the last step's (as the sequence model answers)."""
    steppers: dict[int, Stepper] = {}
    sequence_outputs = {s["name"]: s for s in model.manifest["io"]["outputs"]}

    def run(feeds: dict[str, np.ndarray]) -> Outputs:
        n = len(next(iter(feeds.values())))
        parts: dict[str, list[np.ndarray]] = {}
        for i in range(0, n, batch):
            sub = {k: v[i : i + batch] for k, v in feeds.items()}
            size = len(next(iter(sub.values())))
            stepper = steppers.get(size) or steppers.setdefault(size, Stepper(model, batch=size))
            stepper.reset()
            outs = list(stepper.run_sequence(sub))
            for name in stepper.output_names:
                spec = sequence_outputs.get(name, {})
                per_time = len(spec.get("shape", [])) > 2 and len(outs) > 1
                y = np.concatenate([o[name] for o in outs], axis=1) if per_time else outs[-1][name]
                parts.setdefault(name, []).append(y)
        return {name: np.concatenate(ys) for name, ys in parts.items()}

    return run


def promise_of(role: str) -> tuple[str, float | None]:
    """How a manifest role is judged: fp32 baselines, float32 twins (exact), or quantized forms."""
    base = role[: -len(ORT_SUFFIX)] if role.endswith(ORT_SUFFIX) else role
    if role == "onnx":
        return BASELINE, None
    if base in FP32_BASELINES:
        # A .ort file of an fp32 model, or the step model fed step by step: the same float32 arithmetic.
        return EXACT, ORT_FORMAT_ATOL + (STEP_SEQUENCE_ATOL if "_step" in base else 0.0) if role.endswith(ORT_SUFFIX) else STEP_SEQUENCE_ATOL
    return QUANTIZED, None


# ---------------------------------------------------------------------------------------------
# The evaluation loop


@dataclass
class _Against:
    """Per-example comparison of one variant with fp32 on one output: counts of decisions (an example, a label, or a
    real step of a sequence), of those that agree, of those fp32 is sure of and of those kept, and the example's
    max |Δ| over all its values (real steps only)."""

    parts: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, **arrays: np.ndarray) -> None:
        for key, value in arrays.items():
            self.parts.setdefault(key, []).append(np.asarray(value, np.float64))

    def total(self, key: str) -> float:
        return float(sum(a.sum() for a in self.parts.get(key, [])))

    def max_diff(self) -> np.ndarray:
        return np.concatenate(self.parts["max_diff"]) if "max_diff" in self.parts else np.zeros(0)


def _compare(kind: str, base: np.ndarray, got: np.ndarray, valid: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per example: decisions, agreements, sure decisions, sure ones kept, and max |Δ| (padding steps left out)."""
    base, got = np.asarray(base, np.float64), np.asarray(got, np.float64)
    n = len(base)
    diff = np.abs(base - got)
    if kind in ("softmax", "logits") and base.shape[-1] > 1:
        agree = base.argmax(-1) == got.argmax(-1)
        top2 = np.sort(base, axis=-1)[..., -2:]
        sure = (top2[..., 1] - top2[..., 0]) >= QUANT_CONFIDENT_MARGIN if kind == "softmax" else np.zeros(agree.shape, bool)
        per = diff.max(-1)  # per decision
    else:
        agree = (base >= 0.5) == (got >= 0.5) if kind == "sigmoid" else np.sign(base) == np.sign(got)
        sure = np.abs(2 * base - 1) >= QUANT_CONFIDENT_MARGIN if kind == "sigmoid" else np.zeros(agree.shape, bool)
        per = diff
    real = np.ones(agree.shape, bool)
    if valid is not None and agree.ndim >= 2 and valid.shape == agree.shape[:2]:
        real = np.broadcast_to(valid.reshape(valid.shape + (1,) * (agree.ndim - 2)), agree.shape)
    flat = lambda a: a.reshape(n, -1)  # noqa: E731
    return {
        "decisions": flat(real).sum(1), "agree": flat(agree & real).sum(1), "sure": flat(sure & real).sum(1),
        "sure_agree": flat(sure & agree & real).sum(1), "max_diff": flat(np.where(real, per, 0.0)).max(1),
    }


def _drop(figure: Figure, base: Figure) -> float:
    """How much worse `figure` is than `base`: percentage points for accuracies, percent of fp32 for errors."""
    if figure.higher_is_better:
        return 100.0 * (base.value - figure.value)
    return 100.0 * (figure.value - base.value) / max(abs(base.value), 1e-12)


def default_max_drop(kind: str) -> float:
    """The metric's budget: EVAL_MAX_ACCURACY_DROP_PP for accuracies, EVAL_MAX_ERROR_INCREASE (%) for errors."""
    return EVAL_MAX_ACCURACY_DROP_PP if kind in ("softmax", "sigmoid") else EVAL_MAX_ERROR_INCREASE


def _judge(score: VariantScore, *, runner: Runner, kind: str, base: VariantScore | None, max_drop: float,
           base_outputs_scale: float) -> Verdict:
    if runner.promise == BASELINE:
        return Verdict(None, why="the fp32 model every variant is compared with")
    if base is None:
        return Verdict(None, why="no fp32 model here to compare with")
    failures = []
    if runner.promise == EXACT:
        atol = max(runner.atol or KERAS_ONNX_ATOL, KERAS_ONNX_RTOL * base_outputs_scale)
        if score.max_abs_diff is not None and score.max_abs_diff > atol:
            failures.append(f"{score.role} differs from fp32 by {score.max_abs_diff:.2e} > {atol:.2e} (float32 tolerance)")
        return Verdict(not failures, failures, why=f"float32: max |Δ| from fp32 ≤ {atol:.1e}")
    h, b = score.headline, base.headline
    why = [f"metric drop ≤ {max_drop:g}{' pp' if kind in ('softmax', 'sigmoid') else ' %'}"]
    if kind in ("softmax", "sigmoid"):
        why += [f"≥ {QUANT_MIN_CONFIDENT_AGREEMENT:.1%} top-1 kept where fp32 is sure", f"mean max|Δ| ≤ {QUANT_MAX_MEAN_PROB_DIFF:g}"]
        if score.sure_count and score.sure_agreement is not None and score.sure_agreement < QUANT_MIN_CONFIDENT_AGREEMENT:
            failures.append(f"{score.role} keeps fp32's answer on {score.sure_agreement:.2%} of the {score.sure_count} it is sure of "
                            f"< {QUANT_MIN_CONFIDENT_AGREEMENT:.1%}")
        if score.mean_max_abs_diff is not None and score.mean_max_abs_diff > QUANT_MAX_MEAN_PROB_DIFF:
            failures.append(f"{score.role}'s probabilities differ from fp32's by {score.mean_max_abs_diff:.3f} on average > {QUANT_MAX_MEAN_PROB_DIFF:g}")
    if h is not None and b is not None:
        drop = _drop(h, b)
        if drop > max_drop:
            text = f"{drop:.2f} pp below" if h.higher_is_better else f"{drop:.1f}% worse than"
            budget = f"{max_drop:g} pp" if h.higher_is_better else f"{max_drop:g}%"
            failures.append(f"{score.role}'s {h.name} is {text} fp32's (budget {budget}, --max-drop)")
    return Verdict(not failures, failures, why="; ".join(why))


def evaluate_runners(
    data: Dataset,
    runners: list[Runner],
    *,
    kinds: dict[str, str],
    batch: int,
    max_drop: float | None = None,
    source_role: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Every runner answers every chunk of `data`; each scored output (`kinds`: output → metric kind) is tallied."""
    if not runners:
        raise InputError("nothing to evaluate: no model files")
    scored = [name for name in kinds if name in data.targets]
    compared = scored + [name for name in kinds if name not in scored]  # the headline output first
    baseline = next((r.role for r in runners if r.promise == BASELINE), None)
    if baseline is None:
        baseline = next((r.role for r in runners if r.role in FP32_BASELINES), None)
    tallies = {r.role: {name: Tally(kinds[name]) for name in scored} for r in runners}
    against = {r.role: {name: _Against() for name in compared} for r in runners}
    seconds = {r.role: 0.0 for r in runners}
    scale = 0.0
    for start, feeds, targets in data.batches(CHUNK_ROWS):
        valid = data.valid_steps(feeds)
        answers: dict[str, Outputs] = {}
        for r in runners:
            t0 = time.perf_counter()
            answers[r.role] = r.run(feeds)
            seconds[r.role] += time.perf_counter() - t0
            missing = [name for name in compared if name not in answers[r.role]]
            if missing:
                raise InputError(f"{r.role} does not produce output {', '.join(missing)}")
        for r in runners:
            out = answers[r.role]
            for name in scored:
                score_batch(tallies[r.role][name], out[name], targets[name], valid=valid)
            if baseline is not None:
                for name in compared:
                    base = answers[baseline][name]
                    scale = max(scale, float(np.max(np.abs(base))) if base.size else 0.0)
                    against[r.role][name].add(**_compare(kinds[name], base, out[name], valid))
        if on_progress is not None:
            on_progress(min(start + CHUNK_ROWS, data.count), data.count)
    scores = []
    for r in runners:
        score = VariantScore(r.role, r.promise, {name: figures(tallies[r.role][name]) for name in scored}, seconds=seconds[r.role])
        if baseline is not None and compared:
            first = against[r.role][compared[0]]
            decisions, sure = first.total("decisions"), first.total("sure")
            score.agreement = first.total("agree") / decisions if decisions else None
            score.sure_count = int(sure)
            score.sure_agreement = first.total("sure_agree") / sure if sure else None
            diff = first.max_diff()
            score.mean_max_abs_diff = float(diff.mean()) if diff.size else None
            score.max_abs_diff = max(float(against[r.role][n].max_diff().max(initial=0.0)) for n in compared)
        scores.append(score)
    by_role = {s.role: s for s in scores}
    base_score = by_role.get(baseline) if baseline else None
    source_score = by_role.get(source_role) if source_role else None
    head_kind = kinds[scored[0]] if scored else (kinds[compared[0]] if compared else "linear")
    budget = default_max_drop(head_kind) if max_drop is None else max_drop
    for r, score in zip(runners, scores):
        h = score.headline
        if base_score is not None and h is not None and base_score.headline is not None:
            score.vs_fp32 = h.value - base_score.headline.value
        if source_score is not None and h is not None and source_score.headline is not None:
            score.vs_source = h.value - source_score.headline.value
        score.verdict = _judge(score, runner=r, kind=head_kind, base=base_score, max_drop=budget, base_outputs_scale=scale)
    notes = []
    if not scored:
        notes.append("no targets in the data: variants are compared with fp32 only (add an array named after an output to score them)")
    return Evaluation(data.source, data.count, batch, {n: kinds[n] for n in compared}, baseline, scores, budget, notes)


def roles_in(files: Iterable[str]) -> list[str]:
    """Model roles in evaluation order: fp32 first, then the quantized forms, step forms, .ort files."""
    order = ["onnx", "onnx_int8", "onnx_int8_static", "onnx_fp16", "onnx_step", "onnx_step_int8"]
    model_roles = [r for r in files if r.startswith("onnx") and not r.endswith("_config")]
    rank = {r: i for i, r in enumerate(order)}
    return sorted(model_roles, key=lambda r: (r.endswith(ORT_SUFFIX), rank.get(r.removesuffix(ORT_SUFFIX), len(order)), r))
