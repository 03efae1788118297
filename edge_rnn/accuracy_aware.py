"""Quantization judged on the user's data, and accuracy control: keep the fewest nodes float that bring it inside.

`DataJudge` opens the user's labelled data once (checked against the manifest before anything is written), runs
the fp32 model over it once, and judges a quantized file by the promise `edge-rnn evaluate` holds it to
(edge_rnn.device.evaluate: the metric's drop ≤ the budget, and for classifiers agreement where fp32 is sure and
mean max |Δ|), at batch 1, the batch a device runs: a dynamic int8 model quantizes its activations with a scale
spanning the whole batch, so only batch 1 gives the device's answer.

`keep_float` is NNCF's quantize_with_accuracy_control for onnxruntime.quantization, dynamic int8 LSTMs
(DynamicQuantizeLSTM) included: every quantizable node (an op of onnxruntime's registry that carries a weight) is
left out of quantization alone, on top of the nodes already kept float, and measured on the data; the one whose
leaving-out helps most is kept float (`nodes_to_exclude`); then the best-ranked few are measured again, until the
model is inside its budget or nothing is left to try. Each trial is a whole requantization and a pass over the
data, so a trial budget (MAX_TRIALS) bounds the work, and the record lists every trial.

Workstation side: imports onnx and onnxruntime.quantization inside functions.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .device.evaluate import BASELINE, QUANTIZED, Evaluation, Runner, VariantScore, evaluate_runners, sequence_runner, step_runner
from .device.metrics import METRICS
from .errors import EdgeRnnError, require
from .tolerances import QUANT_MIN_CONFIDENT_AGREEMENT, QUANT_MAX_MEAN_PROB_DIFF

# Rows of --data a quantized variant is judged on (the first ones): at batch 1 a pass over 2,000 rows takes
# seconds for a small LSTM and accuracy control makes several passes; the record says how many were used.
JUDGE_MAX_ROWS = 2_000
# The deployed batch size every quantized candidate answers at (see the module docstring).
JUDGE_BATCH = 1
# Accuracy control: requantize-and-judge trials at most (the full model's judgement not counted).
MAX_TRIALS = 48
# After the first round (every node left out alone), each round re-measures only the best-ranked this many.
RERANK_TOP = 3
# Side-by-side batch-1 latency: rounds, each running every model in turn for about ROUND_SECONDS; the median round.
LATENCY_ROUNDS = 7
LATENCY_ROUND_SECONDS = 0.04
LATENCY_WARMUP_RUNS = 5
# Weights are initializers of two or more dimensions; a bias or a scale alone does not make a node quantizable.
WEIGHT_MIN_DIMS = 2


# ---------------------------------------------------------------------------------------------
# Judging a file on the data


def _memo(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """`run` answering each distinct chunk of feeds once: fp32's answers are replayed on every trial."""
    seen: dict[bytes, dict[str, np.ndarray]] = {}

    def replay(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        digest = hashlib.blake2b(digest_size=16)
        for name in sorted(feeds):
            x = np.ascontiguousarray(feeds[name])
            digest.update(f"{name}|{x.dtype}|{x.shape}|".encode())
            digest.update(x.tobytes())
        key = digest.digest()
        if key not in seen:
            seen[key] = run(feeds)
        return seen[key]

    return replay


def drop_of(score: VariantScore, *, base: VariantScore) -> float | None:
    """How much worse `score`'s headline is than fp32's: percentage points for accuracies, % of fp32 for errors."""
    h, b = score.headline, base.headline
    if h is None or b is None:
        return None
    if h.higher_is_better:
        return 100.0 * (b.value - h.value)
    return 100.0 * (h.value - b.value) / max(abs(b.value), 1e-12)


@dataclass
class Judged:
    """One file's judgement on the data: its score, fp32's, the budget and the metric's kind."""

    evaluation: Evaluation
    role: str
    kind: str

    @property
    def score(self) -> VariantScore:
        return self.evaluation.variant(self.role)

    @property
    def base(self) -> VariantScore:
        return self.evaluation.variant("onnx")

    @property
    def ok(self) -> bool:
        return self.score.verdict.ok is not False

    @property
    def drop(self) -> float | None:
        return drop_of(self.score, base=self.base)

    @property
    def unit(self) -> str:
        return "pp" if self.score.headline is not None and self.score.headline.higher_is_better else "%"

    def excess(self) -> float:
        """How far outside its worst promise the file is, as a share of that promise's limit (≤ 1: inside)."""
        s = self.score
        budget = max(self.evaluation.max_drop, 1e-9)
        ratios = [(self.drop or 0.0) / budget]
        if self.kind in ("softmax", "sigmoid"):
            if s.sure_count and s.sure_agreement is not None:
                ratios.append((1.0 - s.sure_agreement) / (1.0 - QUANT_MIN_CONFIDENT_AGREEMENT))
            if s.mean_max_abs_diff is not None:
                ratios.append(s.mean_max_abs_diff / QUANT_MAX_MEAN_PROB_DIFF)
        return max(ratios)

    def figures(self) -> dict[str, Any]:
        """What the manifest records: the metric for fp32 and the file, the drop, the comparison with fp32, the verdict."""
        s, h, b = self.score, self.score.headline, self.base.headline
        return {
            "metric": h.name if h else None, "fp32": b.value if b else None, "value": h.value if h else None,
            "low": h.low if h else None, "high": h.high if h else None,
            "drop": self.drop, "unit": self.unit, "budget": self.evaluation.max_drop,
            "agreement": s.agreement, "sure_agreement": s.sure_agreement, "sure_count": s.sure_count,
            "mean_max_abs_diff": s.mean_max_abs_diff, "max_abs_diff": s.max_abs_diff,
            "ok": self.ok, "failures": list(s.verdict.failures), "promise": s.verdict.why,
        }


class DataJudge:
    """The user's labelled data checked against the manifest, and fp32's answers to it, for judging quantized files."""

    def __init__(self, model_dir: Path, manifest: dict[str, Any], data: str | os.PathLike[str], *, fp32_path: Path,
                 metric: str | None = None, max_drop: float | None = None, max_rows: int = JUDGE_MAX_ROWS) -> None:
        from .device.runtime import _graph_dtypes
        from .device.session import load_model
        from .evaluate import check_targets, open_for, output_kinds

        self.model_dir, self.manifest, self.max_drop = model_dir, manifest, max_drop
        self.fp32 = load_model(fp32_path, threads=1)
        self.data = open_for(manifest, data, dtypes=_graph_dtypes(self.fp32), need_targets=True, max_rows=max_rows)
        self.rows_in_file = len(next(iter(self.data.inputs.values())))
        self.kinds = output_kinds(manifest, self.data, metric=metric)
        check_targets(self.kinds, self.data)
        self.kind = next((self.kinds[n] for n in self.kinds if n in self.data.targets), "linear")
        self._fp32_run = _memo(sequence_runner(self.fp32, batch=JUDGE_BATCH))

    def judged_on(self) -> dict[str, Any]:
        """The manifest's `judged_on` record: which data, how many rows of it, at which batch, by which metric."""
        return {"data": self.data.source, "examples": self.data.count, "rows_in_file": self.rows_in_file,
                "batch": JUDGE_BATCH, "metric": {kind: name for name, kind in METRICS.items()}[self.kind], "kinds": self.kinds}

    def judge(self, path: Path, role: str) -> Judged:
        """`path` (a quantized form of model.onnx, or of model.step.onnx when `role` names a step form, fed step by
        step) against fp32 on the data, at batch 1."""
        from .device.session import model_from_bytes

        model = model_from_bytes(Path(path).read_bytes(), where=Path(path), model_dir=self.model_dir, role=role,
                                 manifest=self.manifest, threads=1)
        run = step_runner(model, batch=JUDGE_BATCH) if "_step" in role else sequence_runner(model, batch=JUDGE_BATCH)
        runners = [Runner("onnx", self._fp32_run, BASELINE), Runner(role, run, QUANTIZED)]
        evaluation = evaluate_runners(self.data, runners, kinds=self.kinds, batch=JUDGE_BATCH, max_drop=self.max_drop)
        return Judged(evaluation, role, self.kind)

    def first_row(self) -> dict[str, np.ndarray]:
        feeds, _ = self.data.rows(0, 1)
        return feeds


# ---------------------------------------------------------------------------------------------
# What can be kept float


@dataclass(frozen=True)
class Node:
    """A quantizable node: its name (as the quantizer sees it), op type, and the bytes of its float32 weights."""

    name: str
    op: str
    weight_bytes: int

    def to_json(self, layers: set[str]) -> dict[str, Any]:
        layer = self.name.split("/")[0]
        # keras_onnx names each node `{Keras layer}/{op}`, so the layer is the name's first part where it is one.
        return {"node": self.name, "op": self.op, "weight_bytes": self.weight_bytes, **({"layer": layer} if layer in layers else {})}


def quantizable_nodes(model, *, op_types: Sequence[str]) -> list[Node]:
    """Nodes of `model` (an onnx.ModelProto as the quantizer sees it) whose op is in `op_types` (onnxruntime's
    registry for the variant) and that carry a float weight initializer, in graph order."""
    onnx = require("onnx", "train")
    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type not in op_types or not node.name:
            continue
        weights = [inits[i] for i in node.input if i in inits and inits[i].data_type == onnx.TensorProto.FLOAT
                   and len(inits[i].dims) >= WEIGHT_MIN_DIMS]
        if weights:
            found.append(Node(node.name, node.op_type, sum(4 * int(np.prod(w.dims, dtype=np.int64)) for w in weights)))
    return found


# ---------------------------------------------------------------------------------------------
# Accuracy control


@dataclass
class Trial:
    """One requantization: the nodes kept float, the file, and its judgement."""

    kept: tuple[Node, ...]
    path: Path
    judged: Judged

    def to_json(self) -> dict[str, Any]:
        h = self.judged.score.headline
        return {"kept_float": [n.name for n in self.kept], "value": h.value if h else None, "drop": self.judged.drop,
                "ok": self.judged.ok}


@dataclass
class Control:
    """What accuracy control found: the full model's trial, the chosen one, and every trial in between."""

    before: Trial
    best: Trial
    trials: list[Trial] = field(default_factory=list)
    candidates: list[Node] = field(default_factory=list)
    not_quantized: list[Node] = field(default_factory=list)  # named by the registry but left float by the quantizer anyway
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.best.judged.ok


def keep_float(
    candidates: Sequence[Node],
    *,
    make: Callable[[tuple[str, ...], Path], None],
    judge: Callable[[Path], Judged],
    before: Trial,
    work: Path,
    start: Sequence[Node] = (),
    max_trials: int = MAX_TRIALS,
) -> Control:
    """The fewest `candidates` kept float (`make(nodes_to_exclude, path)` requantizes) that bring the model inside its
    budget (`judge`), greedily: leave each out alone on top of those kept, keep the one that helps most, repeat.

    `start`: nodes to try first as a whole (the sequence model's choice, for its step model); kept if they suffice,
    else the search goes on from them."""
    from .export.graphs import op_counts

    onnx = require("onnx", "train")
    control = Control(before, before, [], list(candidates))
    count = 0

    def trial(kept: tuple[Node, ...]) -> Trial:
        nonlocal count
        count += 1
        path = work / f"trial-{count}.onnx"
        make(tuple(n.name for n in kept), path)
        t = Trial(kept, path, judge(path))
        control.trials.append(t)
        return t

    kept: tuple[Node, ...] = ()
    current = before
    remaining = list(candidates)
    if start:
        kept = tuple(n for n in candidates if n.name in {s.name for s in start})
        remaining = [n for n in remaining if n not in kept]
        current = trial(kept)
    ranking: list[Node] | None = None  # remaining nodes, the most helpful to keep float first
    while not current.judged.ok and remaining and count < max_trials:
        measured: dict[Node, Trial] = {}
        for node in remaining if ranking is None else ranking[:RERANK_TOP]:
            if count >= max_trials:
                break
            t = trial(kept + (node,))
            if op_counts(onnx.load(str(t.path))) == op_counts(onnx.load(str(current.path))):
                # The quantizer leaves it float anyway (e.g. a Gather of a small table): not a choice to make.
                control.not_quantized.append(node)
                remaining.remove(node)
                continue
            measured[node] = t
        if not measured:
            break
        # Inside the budget: the node whose float weights cost least; else the trial least far outside it.
        inside = [n for n, t in measured.items() if t.judged.ok]
        chosen = min(inside, key=lambda n: n.weight_bytes) if inside else min(measured, key=lambda n: measured[n].judged.excess())
        kept, current = kept + (chosen,), measured[chosen]
        remaining.remove(chosen)
        fresh = sorted((n for n in measured if n in remaining), key=lambda n: measured[n].judged.excess())
        ranking = fresh + [n for n in (ranking or remaining) if n in remaining and n not in measured]
    if count >= max_trials and not current.judged.ok:
        control.note = f"stopped after {max_trials} trials (MAX_TRIALS)"
    # The best trial: inside with the fewest nodes float, else the one least far outside the budget.
    pool = [before] + control.trials
    inside = [t for t in pool if t.judged.ok]
    control.best = (min(inside, key=lambda t: (len(t.kept), sum(n.weight_bytes for n in t.kept))) if inside
                    else min(pool, key=lambda t: t.judged.excess()))
    return control


# ---------------------------------------------------------------------------------------------
# Side-by-side latency


def _feed_for(session, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One batch-1 call's feeds for `session` from one data row: a step model gets the row's first time step, state
    inputs (absent from the data) zeros."""
    from .device.runtime import ORT_DTYPES

    feeds = {}
    for i in session.get_inputs():
        if i.name in row:
            x = row[i.name][:1]
            if len(i.shape) > 1 and i.shape[1] == 1 and x.ndim > 1 and x.shape[1] != 1:
                x = x[:, :1]
            feeds[i.name] = x
        else:
            shape = [d if isinstance(d, int) else 1 for d in i.shape]
            feeds[i.name] = np.zeros(shape, ORT_DTYPES.get(i.type, np.float32))
    return feeds


def side_by_side_ms(paths: dict[str, Path], *, row: dict[str, np.ndarray]) -> dict[str, Any]:
    """Batch-1 latency (ms, median of LATENCY_ROUNDS rounds, one thread) of each model, run in turn in every round so
    that a busy shared host slows them alike."""
    from .device.session import create_session

    sessions = {label: create_session(path, threads=1) for label, path in paths.items()}
    feeds = {label: _feed_for(s, row) for label, s in sessions.items()}
    reps = {}
    for label, s in sessions.items():
        t0 = time.perf_counter()
        for _ in range(LATENCY_WARMUP_RUNS):
            s.run(None, feeds[label])
        per_call = (time.perf_counter() - t0) / LATENCY_WARMUP_RUNS
        reps[label] = max(1, int(LATENCY_ROUND_SECONDS / max(per_call, 1e-6)))
    times: dict[str, list[float]] = {label: [] for label in sessions}
    labels = list(sessions)
    for r in range(LATENCY_ROUNDS):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            s, f, n = sessions[label], feeds[label], reps[label]
            t0 = time.perf_counter()
            for _ in range(n):
                s.run(None, f)
            times[label].append((time.perf_counter() - t0) / n)
    result: dict[str, Any] = {label: 1000 * statistics.median(ts) for label, ts in times.items()}
    result.update({"batch": 1, "threads": 1, "rounds": LATENCY_ROUNDS})
    return result


def require_data_for(*, accuracy_aware: bool, max_drop: float | None, metric: str | None, data: Any) -> None:
    """--accuracy-aware, --max-drop and --metric are about the judgement on --data: refused without it."""
    given = [flag for flag, on in (("--accuracy-aware", accuracy_aware), ("--max-drop", max_drop is not None),
                                   ("--metric", metric is not None)) if on]
    if given and data is None:
        raise EdgeRnnError(f"{', '.join(given)}: only with --data FILE.npz, the labelled data (inputs and targets, as "
                           "`edge-rnn evaluate` takes) the quantized model is judged on")
