"""The CLI's device commands over files: infer (any model), stream (step models), generate (char RNN).

Device path: imports numpy, onnxruntime, Pillow (for images) and this package's device modules only —
never tensorflow, tf2onnx or onnx. Each command reads its files and runs the model through the public API
(api.py: `load`, `Model.predict`, `Stream.step`), so the CLI and a user's program share one path. Sessions
live in session.py, input readers in inputs.py, the state machinery in stepper.py; the names other modules
import from here are re-exported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from ..errors import InputError, NonFiniteError
from .inputs import (
    ORT_DTYPES, check_post_padded, convert_array, json_rows, load_images, parse_input_specs, preprocess_pixels, read_feeds, read_npy,
)
from .labels import decide, first_activation, label_kind, labels_problem
from .sampling import StepFn
from .session import ORT_ERRORS, LoadedModel, create_session, load_model, require_command, session_options
from .stepper import TIME_DIM, Stepper

if TYPE_CHECKING:
    from .api import Stream

__all__ = [
    "ORT_ERRORS", "LoadedModel", "Prediction", "Inference", "Stepper", "create_session", "generate", "infer", "iter_generate",
    "labelled_stream", "load_images", "load_model", "onnx_step", "predict_probs", "preprocess_pixels", "session_options", "short_floats",
    "stream",
]

# Rows per session.run call in `infer`: bounds the activations' memory for big .npy batches.
INFER_BATCH = 256


def predict_probs(model: LoadedModel, x: npt.NDArray[np.float32], *, batch_size: int = INFER_BATCH) -> npt.NDArray[np.float32]:
    """float32 (N, T, F) → probabilities (N, classes), in batches."""
    name = model.io["inputs"][0]["name"]
    out = [model.run({name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(out)


@dataclass
class Prediction:
    """One row's labels from the first output's last axis (see labels.py): `label` with its `probability` (a binary
    classifier's: of the label chosen), `top` the k best; `kind` softmax, binary or multilabel; `chosen` every label
    chosen (multilabel: each at ≥ 0.5, possibly none); `scores` every label's own probability (multilabel)."""

    input: str
    label: str
    probability: float
    top: list[tuple[str, float]]
    kind: str = "softmax"
    chosen: list[str] = field(default_factory=list)
    scores: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Inference:
    """`rows`: a name per batch row; `outputs`: every output (N, …) by name, except for image classifiers,
    whose one output `predictions` shows; `predictions`: top-k per row where the manifest has labels."""

    rows: list[str]
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    predictions: list[Prediction] = field(default_factory=list)


def _graph_dtypes(model: LoadedModel) -> dict[str, Any]:
    return {i.name: ORT_DTYPES.get(i.type, np.float32) for i in model.session.get_inputs()}


def _top_k(scores: np.ndarray, rows: list[str], *, labels: list[str], top_k: int, manifest: dict[str, Any]) -> list[Prediction]:
    """(N, classes) → a Prediction per row, as the manifest's output kind says (labels.py)."""
    kind = label_kind(manifest, classes=scores.shape[-1])
    return [Prediction(name, d.label, d.probability, d.top, d.kind, d.chosen, d.scores)
            for name, d in zip(rows, decide(scores, labels=labels, kind=kind, top_k=top_k))]


def _row_names(path_name: str, n: int) -> list[str]:
    return [f"{path_name}[{i}]" for i in range(n)] if n > 1 else [path_name]


def _first_non_finite(arrays: Mapping[str, np.ndarray]) -> tuple[str, int] | None:
    """(name, row) of the first float array in `arrays` (each (N, …)) holding NaN or Inf in a row, or None."""
    for name, y in arrays.items():
        if y.dtype.kind == "f" and y.size and not np.isfinite(y).all():
            return name, int(np.flatnonzero(~np.isfinite(y).reshape(len(y), -1).all(axis=1))[0])
    return None


# What a NaN/Inf answer means.
OVERFLOW_HINT = ("the model's float32 numbers overflowed (as a recurrent layer with an unbounded activation such as relu "
                 "can on a long or large input)")


def _check_infer_finite(outputs: Mapping[str, np.ndarray], rows: list[str]) -> None:
    bad = _first_non_finite(outputs)
    if bad is not None:
        raise NonFiniteError(f"{rows[bad[1]]}: output {bad[0]!r} is NaN or Inf — {OVERFLOW_HINT}; no answer is printed")


def _check_step_finite(stream_: Stream, outputs: Mapping[str, np.ndarray], *, step: int) -> None:
    """Refuse a step whose outputs, or the state it leaves for the next step, hold NaN or Inf (naming the step)."""
    for what, arrays in (("output", outputs), ("state", stream_.state())):
        bad = _first_non_finite(arrays)
        if bad is not None:
            raise NonFiniteError(f"step {step}: {what} {bad[0]!r} became NaN or Inf — {OVERFLOW_HINT}; the stream stops "
                                 "here, as every later step would be meaningless")


def _refuse_step_file(model: LoadedModel) -> None:
    """`infer` runs whole sequences: a step file (one time step a call, its state carried) is `stream`'s."""
    sequence_inputs = {s["name"] for s in model.manifest["io"]["inputs"]}
    if model.steppable and not {s["input"] for s in model.state} <= sequence_inputs:
        twin = model.manifest.get("files", {}).get(model.role.replace("onnx_step", "onnx", 1))
        whole = f", or `edge-rnn infer` on {twin['path']} (whole sequences)" if isinstance(twin, dict) and "path" in twin else ""
        raise InputError(f"{model.path.name} is a step model (one time step a call, its state carried between calls): "
                         f"use `edge-rnn stream` for it{whole}")


def infer(
    model_path: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]] = (),
    *,
    named: Sequence[str] = (),
    top_k: int = 1,
    threads: int | None = None,
    role: str | None = None,
) -> Inference:
    """Run MODEL.onnx (or a bundle's `role`, or a folder's onnx file) on files: images for image classifiers, else one .npy
    per input (`NAME=FILE.npy` in `named`), through Model.predict's path (dynamic int8: each row alone).

    A step file is refused (`stream` runs it); state inputs a sequence file takes start at zeros. Every output is
    returned, (N, …) each; labels and top-k where the manifest has labels and the first output is (N, classes).
    An output holding NaN or Inf raises NonFiniteError naming the row.
    """
    from .api import _with_vocab, load

    api_model = load(model_path, threads=threads, role=role)
    model = api_model.loaded
    require_command(model, "infer", given=model_path)
    _refuse_step_file(model)
    labels = model.manifest.get("labels")
    if labels is not None and not 1 <= top_k <= len(labels):
        raise InputError(f"--top-k must be between 1 and {len(labels)}")
    pre = model.manifest.get("preprocessing")
    if isinstance(pre, dict) and "image" in pre:
        if named:
            raise InputError(f"{model.path.name} reads images: pass them as arguments, not with --input")
        x, rows = load_images(inputs, preprocessing=pre)
        zeros = {s["input"]: np.zeros((len(x), s["shape"][1]), np.float32) for s in model.state}
        first = api_model._run({model.io["inputs"][0]["name"]: x, **zeros})[api_model.outputs[0].name]
        _check_infer_finite({api_model.outputs[0].name: first}, rows)
        return Inference(rows, predictions=_top_k(first, rows, labels=labels, top_k=top_k, manifest=model.manifest))

    state = {s["input"]: s for s in model.state}
    model_inputs = _with_vocab([s for s in model.io["inputs"] if s["name"] not in state], model.manifest)
    specs = [*inputs, *named]
    if not specs:
        names = ", ".join(s["name"] for s in model_inputs)
        raise InputError(f"no inputs given — pass FILE.npy (one input) or --input NAME=FILE.npy for each of {names}")
    feeds = read_feeds(model_inputs, specs, dtypes=_graph_dtypes(model), masking=model.manifest.get("masking", []))
    n = next(iter(feeds.values())).shape[0]
    first_file = parse_input_specs(specs, names=[s["name"] for s in model_inputs])[model_inputs[0]["name"]]
    rows = _row_names(first_file.name, n)
    zeros = {name: np.zeros((n, s["shape"][1]), np.float32) for name, s in state.items()}
    outputs = api_model._run({**feeds, **zeros})
    _check_infer_finite(outputs, rows)
    first = outputs[api_model.outputs[0].name]
    predictions = _top_k(first, rows, labels=labels, top_k=top_k, manifest=model.manifest) if labels and first.ndim == 2 else []
    return Inference(rows, outputs, predictions)


def short_floats(y: Any, *, dtype: str | None = None) -> Any:
    """An array (or a number) as nested lists for JSON, each float the shortest decimal that reads back as the same
    value of its dtype (float32: ~8 digits, not the 17 of the double it becomes)."""
    y = np.asarray(y, dtype=dtype)
    if y.dtype.kind != "f":
        return y.tolist()
    flat = [float(np.format_float_positional(v, unique=True, trim="0")) for v in y.reshape(-1)]
    return np.array(flat, dtype=np.float64).reshape(y.shape).tolist() if y.ndim else flat[0]


# ---------------------------------------------------------------------------------------------
# Streaming: a step model fed one time step at a time


def _sequence_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A step input's spec over a whole sequence: the time axis (length 1 in the step form) is free."""
    return {**spec, "shape": [spec["shape"][0], TIME_DIM, *spec["shape"][2:]]}


def _file_sequences(stream_: Stream, specs: Sequence[str | os.PathLike[str]]) -> dict[str, np.ndarray]:
    """`NAME=FILE.npy` (or FILE.npy for one input) → {input: (1, T, …) for sequences, (1, …) otherwise}, checked."""
    from .api import _image_input

    temporal = stream_._stepper.temporal
    files = parse_input_specs(specs, names=[s["name"] for s in stream_._specs])
    sequences = {}
    for spec in stream_._specs:
        name, path = spec["name"], files[spec["name"]]
        shown = _sequence_spec(spec) if name in temporal else spec
        if stream_._image is not None:  # pixels: uint8 scaled as the manifest says, or floats in [0, 1]
            x = _image_input(read_npy(path), spec=shown, preprocessing=stream_._image, where=str(path))
        else:
            x = convert_array(read_npy(path), spec=shown, dtype=stream_._dtypes[name], where=str(path))
        if x.shape[0] != 1:
            raise InputError(f"{path} holds a batch of {x.shape[0]} sequences; `stream` takes one — use `edge-rnn infer` for batches")
        sequences[name] = x
    for m in stream_.loaded.manifest.get("masking", []):
        if m["input"] in temporal and m["input"] in sequences:
            check_post_padded(sequences[m["input"]], kind=m["kind"], value=m.get("value", 0.0), where=str(files[m["input"]]))
    return sequences


def _sequence_steps(stream_: Stream, sequences: Mapping[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """{input: (1, T, …) or (1, …)} → one Stream.step per time step (inputs without a time axis repeat each step)."""
    temporal = {n for n in sequences if n in stream_._stepper.temporal}
    lengths = {sequences[n].shape[1] for n in temporal}
    if len(lengths) > 1:
        raise InputError(f"the sequences have different lengths {sorted(lengths)}; give every sequence input the same number of steps")
    steps = lengths.pop() if lengths else 1
    for t in range(steps):
        feeds = stream_._convert((), {n: x[:, t] if n in temporal else x for n, x in sequences.items()}, rows=None, where=f"step {t}")
        yield stream_._step_converted(feeds, rows=None, where=f"step {t}")


def _json_steps(stream_: Stream, lines: Iterable[str]) -> Iterator[dict[str, np.ndarray]]:
    """JSON lines → one Stream step each, every row checked as it arrives (post-padding too)."""
    for number, row in enumerate(json_rows(lines, names=[s["name"] for s in stream_._specs]), start=1):
        where = f"stdin line {number}"
        feeds = stream_._convert((), row, rows=None, where=where)
        yield stream_._step_converted(feeds, rows=None, where=where)


def stream(
    model_path: str | os.PathLike[str] | LoadedModel,
    sequences: Mapping[str, np.ndarray] | None = None,
    *,
    inputs: Sequence[str | os.PathLike[str]] = (),
    lines: Iterable[str] | None = None,
    max_steps: int | None = None,
    threads: int | None = None,
    role: str | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Feed a step model one time step at a time through a one-stream `Stream`; yield {output: array (1, …)} per step.

    The source is one of: `sequences` {input: (1, T, …)} already converted, `inputs` (`NAME=FILE.npy`, or
    FILE.npy for a one-input model; a sequence is (T, …) or (1, T, …)), or `lines` of JSON (one step each:
    an array for a one-input model, {"NAME": array, …} otherwise). Files are checked before the first step;
    JSON rows as they arrive. A step whose outputs or state hold NaN or Inf raises NonFiniteError naming it.
    """
    for outputs, _ in labelled_stream(model_path, sequences, inputs=inputs, lines=lines, max_steps=max_steps, threads=threads,
                                      role=role, labelled=False):
        yield outputs


def labelled_stream(
    model_path: str | os.PathLike[str] | LoadedModel,
    sequences: Mapping[str, np.ndarray] | None = None,
    *,
    inputs: Sequence[str | os.PathLike[str]] = (),
    lines: Iterable[str] | None = None,
    max_steps: int | None = None,
    threads: int | None = None,
    role: str | None = None,
    labelled: bool = True,
) -> Iterator[tuple[dict[str, np.ndarray], Prediction | None]]:
    """`stream`, each step's outputs with the Prediction of its first output where the manifest has labels and that
    output is one row of scores per step ((1, classes) or (1, 1, classes)), else None (see `stream`)."""
    from .api import Stream, load_stream

    if max_steps is not None and max_steps < 1:
        raise InputError(f"--max-steps must be at least 1, got {max_steps}")
    if isinstance(model_path, LoadedModel):
        stream_ = Stream(model_path)
    else:
        stream_ = load_stream(model_path, threads=threads, role=role)
    require_command(stream_.loaded, "stream", given=None if isinstance(model_path, LoadedModel) else model_path)
    if lines is not None:
        steps = _json_steps(stream_, lines)
    else:
        steps = _sequence_steps(stream_, dict(sequences) if sequences is not None else _file_sequences(stream_, inputs))
    labels = stream_.loaded.manifest.get("labels") if labelled else None
    first = stream_.outputs[0].name if stream_.outputs else None
    for t, outputs in enumerate(steps):
        if max_steps is not None and t >= max_steps:
            return
        _check_step_finite(stream_, outputs, step=t)
        scores = outputs.get(first) if labels else None
        prediction = None
        if scores is not None and scores.ndim in (2, 3) and scores.size == scores.shape[-1] and labels_problem(
                len(labels), classes=scores.shape[-1], activation=first_activation(stream_.loaded.manifest)) is None:
            prediction = _top_k(scores.reshape(1, -1), [f"step {t}"], labels=labels, top_k=1, manifest=stream_.loaded.manifest)[0]
        yield outputs, prediction


# ---------------------------------------------------------------------------------------------
# Generators (char-rnn): state carried between calls


def onnx_step(model: LoadedModel | Stepper) -> StepFn:
    """The char RNN's step function over a Stepper: (ids int64 (1, T), h (1, H)) → (logits float32 (1, T, V), h (1, H)).

    One character — generation's case — runs through the Stepper's IOBinding; a prime of several characters
    runs through session.run in one call (the char RNN's file takes any length). When `h` is the state the
    previous call returned, it is already in the Stepper's buffers and is not copied back. Other batch sizes go
    through session.run. The returned arrays are the caller's own.
    """
    stepper = model if isinstance(model, Stepper) else Stepper(model)
    (ids_name,), (logits_name,), (state,) = [s["name"] for s in stepper.input_specs], stepper.output_names, stepper.model.state
    last: list[Any] = [None]
    bound = stepper.bound_step(ids_name, logits_name)

    def step(ids: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if h.shape[0] != stepper.batch:
            logits, h_next = stepper.model.run({ids_name: ids.astype(np.int64, copy=False), state["input"]: h.astype(np.float32, copy=False)})
            return logits, h_next
        if h is not last[0]:
            stepper.state = {state["input"]: h}
        logits = bound(ids) if bound is not None else stepper.step({ids_name: ids})[logits_name]
        last[0] = stepper.current(state["input"])
        return logits, last[0]

    return step


# Characters per chunk `iter_generate` yields: small enough that text appears as it is made (~10 ms of
# steps), large enough that printing costs nothing beside the steps.
GENERATE_CHUNK = 64


def iter_generate(
    model_path: str | os.PathLike[str],
    *,
    prime: str,
    length: int,
    temperature: float = 1.0,
    seed: int = 0,
    threads: int | None = None,
    role: str | None = None,
    chunk: int = GENERATE_CHUNK,
) -> Iterator[str]:
    """Yield the `length` characters after `prime` from the ONNX char RNN in pieces of up to `chunk`, as they are drawn.

    The model and the arguments are checked at the call; memory stays flat however long the text.
    Same seed → same text as NumPy.
    """
    from .api import load
    from .sampling import generation_h0, iter_sample

    model = load(model_path, threads=threads, role=role).loaded
    require_command(model, "generate", given=model_path)
    hidden = int(model.manifest["config"]["hidden"])
    h0 = generation_h0(model.manifest, hidden=hidden)
    (state,) = model.state
    chars = iter_sample(
        onnx_step(Stepper(model, initial_state={state["input"]: h0})),
        vocab="".join(model.manifest["vocab"]),
        hidden=hidden,
        prime=prime,
        length=length,
        temperature=temperature,
        seed=seed,
        h0=h0,
    )
    return _chunks(chars, size=chunk)


def _chunks(chars: Iterator[str], *, size: int) -> Iterator[str]:
    """Characters → strings of up to `size` of them."""
    piece: list[str] = []
    for ch in chars:
        piece.append(ch)
        if len(piece) == size:
            yield "".join(piece)
            piece.clear()
    if piece:
        yield "".join(piece)


def generate(
    model_path: str | os.PathLike[str],
    *,
    prime: str,
    length: int,
    temperature: float = 1.0,
    seed: int = 0,
    threads: int | None = None,
    role: str | None = None,
) -> str:
    """Sample `length` characters after `prime` with the ONNX char RNN; same seed → same text as NumPy."""
    pieces = iter_generate(model_path, prime=prime, length=length, temperature=temperature, seed=seed, threads=threads, role=role)
    return "".join(pieces)
