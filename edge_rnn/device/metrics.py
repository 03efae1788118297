"""Metrics on a user's labelled data, each with a 95% interval, accumulated batch by batch.

Device path: numpy only. A metric is kept as per-example sums (hits and trials, summed errors and counts),
so memory grows with the number of examples, never with their size, and an interval can be drawn from the
same numbers: Wilson's for a proportion of independent trials (one per example), a percentile bootstrap over
examples for everything else (per-step accuracy of a sequence, MAE, RMSE, nats/char), resampling whole
examples so that the steps of one sequence stay together.

Kinds (what an output is, from the manifest or from `--metric`):
- `softmax`: a classifier's probabilities (N, C), or per time step (N, T, C): top-1 accuracy (and top-k).
- `sigmoid`: independent yes/no scores (N, K): accuracy at 0.5, averaged over the K labels (binary: K = 1).
- `linear`: a regression (N, K) or (N, T, K): MAE, RMSE and the max error.
- `logits`: next-character logits (N, T, V) of the char RNN: cross-entropy in nats/char.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

# 95% intervals: z for Wilson's, and the bootstrap's resamples (fixed seed: the same data gives the same interval).
Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
# Resamples are drawn in blocks of at most this many, and of at most BOOTSTRAP_BLOCK_ITEMS picks (8 bytes each,
# three arrays of them: ~50 MB), so that a large data set's bootstrap stays within memory.
BOOTSTRAP_BLOCK = 50
BOOTSTRAP_BLOCK_ITEMS = 2_000_000
# The k of top-k accuracy, reported beside top-1 where a classifier has more than k classes.
TOP_K = 5
KINDS = ("softmax", "sigmoid", "linear", "logits")
# --metric names → the kind of output they score.
METRICS = {"accuracy": "softmax", "binary-accuracy": "sigmoid", "mae": "linear", "nats": "logits"}


@dataclass
class Figure:
    """One metric's value with its 95% interval (low, high; None where no interval is defined)."""

    name: str  # accuracy, top5_accuracy, binary_accuracy, mae, rmse, max_error, nats_per_char
    value: float
    low: float | None
    high: float | None
    higher_is_better: bool

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.name, "value": self.value, "low": self.low, "high": self.high}


def wilson(hits: int, trials: int) -> tuple[float, float]:
    """Wilson score interval (95%) of a proportion hits/trials."""
    if trials == 0:
        return (0.0, 1.0)
    p = hits / trials
    denom = 1 + Z95**2 / trials
    centre = (p + Z95**2 / (2 * trials)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / trials + Z95**2 / (4 * trials**2)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_ratio(num: npt.NDArray[np.float64], den: npt.NDArray[np.float64], *, transform=None) -> tuple[float, float]:
    """Percentile bootstrap (95%) of sum(num) / sum(den) over examples resampled with replacement."""
    n = len(num)
    if n == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    stats = []
    # Resamples per block: BOOTSTRAP_BLOCK, fewer for big data so a block's picks stay within BOOTSTRAP_BLOCK_ITEMS.
    block = max(1, min(BOOTSTRAP_BLOCK, BOOTSTRAP_BLOCK_ITEMS // n))
    for start in range(0, BOOTSTRAP_RESAMPLES, block):
        size = min(block, BOOTSTRAP_RESAMPLES - start)
        picks = rng.integers(0, n, size=(size, n))
        ratio = num[picks].sum(axis=1) / np.maximum(den[picks].sum(axis=1), 1e-300)
        stats.append(ratio)
    values = np.concatenate(stats)
    if transform is not None:
        values = transform(values)
    low, high = np.percentile(values, [2.5, 97.5])
    return (float(low), float(high))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class Tally:
    """Per-example sums for one variant and one output, appended batch by batch."""

    kind: str
    parts: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, **arrays: np.ndarray) -> None:
        for key, value in arrays.items():
            self.parts.setdefault(key, []).append(np.asarray(value, np.float64))

    def get(self, key: str) -> np.ndarray:
        return np.concatenate(self.parts[key]) if key in self.parts else np.zeros(0)


def class_targets(target: np.ndarray, classes: int, *, ndim: int) -> np.ndarray:
    """Class ids from targets for an output of `ndim` axes scoring `classes`: ids (one axis fewer), or one-hot /
    probability rows (the output's own shape)."""
    if target.ndim == ndim and classes > 1:
        return target.argmax(axis=-1)
    return target.astype(np.int64)


def _valid(valid: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    return np.ones(shape, bool) if valid is None else valid


def score_batch(tally: Tally, output: np.ndarray, target: np.ndarray, *, valid: np.ndarray | None = None) -> None:
    """Add one batch of `output` (N, …) against `target` to `tally`; `valid` (N, T) marks the steps that count
    for a sequence output (masked padding is left out)."""
    n = len(output)
    output = np.asarray(output, np.float64)
    if tally.kind in ("softmax", "logits"):
        classes = output.shape[-1]
        ids = class_targets(target, classes, ndim=output.ndim)
        seq = output.ndim == 3
        ok = _valid(valid if seq else None, ids.shape)
        if tally.kind == "logits":
            probs = _softmax(output)
            picked = np.take_along_axis(probs, ids[..., None], axis=-1)[..., 0]
            nll = -np.log(np.maximum(picked, 1e-30))
            tally.add(nll=(nll * ok).reshape(n, -1).sum(1), steps=ok.reshape(n, -1).sum(1))
            return
        top1 = output.argmax(axis=-1) == ids
        hits = {"hits": (top1 & ok).reshape(n, -1).sum(1)}
        if classes > TOP_K:
            topk = np.argpartition(-output, TOP_K - 1, axis=-1)[..., :TOP_K]
            hits["hits_k"] = ((topk == ids[..., None]).any(-1) & ok).reshape(n, -1).sum(1)
        tally.add(trials=ok.reshape(n, -1).sum(1), **hits)
    elif tally.kind == "sigmoid":
        target = target.reshape(output.shape).astype(np.float64)
        right = (output >= 0.5) == (target >= 0.5)
        ok = np.ones(right.shape, bool)
        if valid is not None and output.ndim >= 3 and valid.shape == output.shape[:2]:
            ok = np.broadcast_to(valid.reshape(valid.shape + (1,) * (output.ndim - 2)), right.shape)
        tally.add(hits=(right & ok).reshape(n, -1).sum(1), trials=ok.reshape(n, -1).sum(1))
    else:
        target = np.asarray(target, np.float64).reshape(output.shape)
        err = np.abs(output - target)
        ok = np.ones(err.shape, bool)
        if valid is not None and output.ndim >= 3 and valid.shape == output.shape[:2]:
            ok = np.broadcast_to(valid.reshape(valid.shape + (1,) * (output.ndim - 2)), err.shape)
        err = np.where(ok, err, 0.0)
        tally.add(abs=err.reshape(n, -1).sum(1), sq=(err**2).reshape(n, -1).sum(1), count=ok.reshape(n, -1).sum(1),
                  max=err.reshape(n, -1).max(1))


def figures(tally: Tally) -> list[Figure]:
    """The metrics a tally holds, the headline first, each with its 95% interval."""
    if tally.kind == "logits":
        nll, steps = tally.get("nll"), tally.get("steps")
        value = float(nll.sum() / max(steps.sum(), 1))
        return [Figure("nats_per_char", value, *bootstrap_ratio(nll, steps), higher_is_better=False)]
    if tally.kind in ("softmax", "sigmoid"):
        name = "accuracy" if tally.kind == "softmax" else "binary_accuracy"
        trials = tally.get("trials")
        out = []
        for key, label in (("hits", name), ("hits_k", f"top{TOP_K}_accuracy")):
            if key not in tally.parts:
                continue
            hits = tally.get(key)
            value = float(hits.sum() / max(trials.sum(), 1))
            one_trial_each = bool(np.all(trials == 1))
            low, high = wilson(int(hits.sum()), int(trials.sum())) if one_trial_each else bootstrap_ratio(hits, trials)
            out.append(Figure(label, value, low, high, higher_is_better=True))
        return out
    abs_, sq, count, mx = tally.get("abs"), tally.get("sq"), tally.get("count"), tally.get("max")
    total = max(count.sum(), 1)
    return [
        Figure("mae", float(abs_.sum() / total), *bootstrap_ratio(abs_, count), higher_is_better=False),
        Figure("rmse", float(math.sqrt(sq.sum() / total)), *bootstrap_ratio(sq, count, transform=np.sqrt), higher_is_better=False),
        Figure("max_error", float(mx.max()) if len(mx) else 0.0, None, None, higher_is_better=False),
    ]


def output_kind(activation: str | None, *, output_shape: tuple[int, ...], target: np.ndarray) -> str:
    """The kind of an output: from the activation its layer ends in, else guessed from the targets (integer
    class ids against a last axis of several → softmax; anything else → linear)."""
    if activation in ("softmax", "sigmoid", "logits"):
        return activation
    if activation is not None:
        return "linear"
    if target.dtype.kind in "iub" and len(output_shape) >= 2 and output_shape[-1] > 1 and target.ndim == len(output_shape) - 1:
        return "softmax"
    return "linear"
