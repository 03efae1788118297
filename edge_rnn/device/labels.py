"""What a classifier's labels mean, from the manifest: one decision per row of its first output.

Device path: numpy only. The manifest's `output_activations` (recorded at export from the layer the output ends
in) says how the first output's scores become labels, and `labels` names them:

- `softmax` (and a manifest without activations, as the built-in models'): one label per class, the row's label
  is the top-scoring class (top-k: the k best).
- `binary`: one sigmoid unit with two labels, [negative, positive]: positive where p ≥ 0.5, else negative,
  reported with the probability of the label chosen (1 − p for negative).
- `multilabel`: K sigmoid units with K labels (K = 1 included: one yes/no label): each label is chosen where its
  own probability is ≥ 0.5, independently of the others; a row may have none or several.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# A sigmoid's decision threshold: p ≥ THRESHOLD is yes.
THRESHOLD = 0.5
KINDS = ("softmax", "binary", "multilabel")


def first_activation(manifest: dict[str, Any]) -> str | None:
    """The activation the first output ends in, as recorded at export (None where the manifest does not say)."""
    outputs = manifest.get("io", {}).get("outputs") or []
    activations = manifest.get("output_activations")
    if not outputs or not isinstance(activations, dict):
        return None
    return activations.get(outputs[0].get("name"))


def labels_problem(count: int, *, classes: Any, activation: str | None) -> str | None:
    """Why `count` labels cannot name a first output of `classes` values ending in `activation`, or None if they can:
    one per class, or for a single sigmoid unit one (its yes) or two (negative, positive)."""
    if not isinstance(classes, int):
        return None
    if activation == "sigmoid" and classes == 1:
        if count in (1, 2):
            return None
        return f"{count} labels for one sigmoid unit (a binary classifier): give 2, negative then positive (or 1, its yes label)"
    if count != classes:
        if activation == "sigmoid":
            return f"{count} labels for {classes} sigmoid units (a multi-label classifier) — one per unit (each its own yes/no at 0.5)"
        return f"{count} labels for an output of {classes} values — one per class"
    return None


def label_kind(manifest: dict[str, Any], *, classes: int) -> str:
    """softmax, binary or multilabel (see the module docstring) for a first output of `classes` values."""
    if first_activation(manifest) != "sigmoid":
        return "softmax"
    labels = manifest.get("labels") or []
    return "binary" if classes == 1 and len(labels) == 2 else "multilabel"


@dataclass
class Decision:
    """One row's labels: `label` and `probability` the chosen label (multilabel: the best of those chosen, or "" and
    the best score when none is); `chosen` every label chosen (multilabel: those at ≥ 0.5, in label order); `top`
    the k best (label, probability); `scores` every label's own probability (multilabel only)."""

    kind: str
    label: str
    probability: float
    chosen: list[str]
    top: list[tuple[str, float]]
    scores: list[tuple[str, float]] = field(default_factory=list)


def decide(scores: np.ndarray, *, labels: list[str], kind: str, top_k: int = 1) -> list[Decision]:
    """(N, classes) scores → a Decision per row."""
    results = []
    for p in np.asarray(scores, np.float64):
        if kind == "binary":
            yes = float(p[0])
            pair = [(labels[1], yes), (labels[0], 1.0 - yes)]
            top = pair if yes >= THRESHOLD else pair[::-1]
            results.append(Decision(kind, top[0][0], top[0][1], [top[0][0]], top[:top_k]))
        elif kind == "multilabel":
            every = [(label, float(q)) for label, q in zip(labels, p)]
            chosen = [label for label, q in every if q >= THRESHOLD]
            ranked = sorted(every, key=lambda lq: -lq[1])
            best = ranked[0] if not chosen else max(((lb, q) for lb, q in every if q >= THRESHOLD), key=lambda lq: lq[1])
            results.append(Decision(kind, best[0] if chosen else "", best[1], chosen, ranked[:top_k], every))
        else:
            order = np.argsort(-p, kind="stable")[:top_k]
            top = [(labels[i], float(p[i])) for i in order]
            results.append(Decision(kind, top[0][0], top[0][1], [top[0][0]], top))
    return results


def agreement(ref: np.ndarray, got: np.ndarray, sure_margin: float, *, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(same, sure) per row of two models' (N, classes) scores, for top-1 agreement: the same top class, sure where the
    reference's top leads its runner-up by `sure_margin`; for sigmoid outputs (binary, multilabel) the same yes/no on
    every unit, sure where each of the reference's units is at least `sure_margin` / 2 from the threshold."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if kind in ("binary", "multilabel"):
        same = ((ref >= THRESHOLD) == (got >= THRESHOLD)).all(-1)
        return same, (np.abs(ref - THRESHOLD) >= sure_margin / 2).all(-1)
    top2 = np.sort(ref, axis=-1)[..., -2:]
    sure = (top2[..., -1] - top2[..., 0]) >= sure_margin if ref.shape[-1] > 1 else np.ones(ref.shape[:-1], bool)
    return ref.argmax(-1) == got.argmax(-1), sure
