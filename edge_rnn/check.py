"""Which runtime answers right: one model file on several runtimes, each against the source model's answers.

For a model folder (its `onnx` file), two sets of inputs are run, both from the folder's adapter (`sample_inputs`):
- `reference`: REFERENCE_COUNT realistic inputs (real digits for mnist-lstm, ids within the vocabulary and
  post-padded where a Keras model masks, floats at the scale the model expects);
- `random`: a larger batch (`batch`, default RANDOM_BATCH) drawn the same way with another seed — random
  in the model's own input range, so a runtime is not judged on eight inputs alone.
The expected answers are the source model's (Keras, or the char RNN's NumPy reference), which needs the
`[train]` extra; without it the expected answers are onnxruntime's on the same file, and the report says so.

For a bundle (`edge-rnn bundle`), any model role it holds (default: the bundle's default, `default_role`):
- `reference`: the bundle's reference vectors, judged against the source model's answers stored beside them at
  the tolerance the bundle stores for that role (a quantized role at its quantized tolerance, with its top-1
  promise on the inputs the source is sure of);
- `random`: the larger batch from the adapter, as for a folder. A bundle carries no source model, so these are
  judged against onnxruntime on the same member, at the same stored tolerance, and the report says so.
Runtimes open files by path: the member is written to a private `tempfile.mkdtemp()` folder, removed afterwards.

Every runtime runs in its own `spawn` subprocess with `threads` threads: a runtime that crashes (tract panics
abort the process) is reported as unable to load the file instead of taking `check` down, and its memory and
threads are its own. Each reports its outputs, and its batch-1 latency as the median of a short run.

A runtime answers wrong when any output on either set is further from the expected answer than the
tolerance the file was validated at (the adapter's fp32 tolerance, `edge_rnn.tolerances`): one number, or one per
element where the adapter derives it from the source model and the set's inputs (the char RNN's float32 bound,
`tolerances.char_rnn_fp32_bound`, which holds on any host's summation order). A runtime that is not installed is
reported as missing, one that cannot load the file as such; neither is a wrong answer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .device.selftest import _top1
from .device.bundle import is_bundle
from .device.hostinfo import cpu_features, describe
from .device.manifest import load_manifest, verified_file
from .errors import EdgeRnnError, InputError, MissingDependencyError
from .bench.runtimes import RUNTIMES, Arrays, open_runtime, run_in_child, runtime

# Real inputs with the source model's answers (the reference vectors).
REFERENCE_COUNT = 8
# The larger batch every runtime also answers.
RANDOM_BATCH = 256
# Time steps for a model whose time axis is dynamic (as bench uses).
DEFAULT_TIME_STEPS = 32
# Batch-1 latency: the median of at least MIN runs, and of as many as fit in SECONDS (at most MAX runs).
LATENCY_MIN_RUNS = 5
LATENCY_MAX_RUNS = 200
LATENCY_SECONDS = 0.5
LATENCY_WARMUP = 3
# One runtime's whole measurement (onnx.reference, pure NumPy, is the slowest: seconds, not minutes).
RUNTIME_TIMEOUT_S = 300.0

OK, WRONG, CANNOT_LOAD, NOT_INSTALLED, UNSUPPORTED = "ok", "wrong", "cannot load", "not installed", "unsupported"

# What a runtime is known to accept and ignore, per ONNX recurrent op: on a graph that uses one it answers as if the
# graph did not (the MNIST LSTM's Relu activations, a masked model's sequence_lens), so its answer says nothing about
# the file. Such a runtime is reported `unsupported`, naming the node and what it ignores, and does not fail the check.
# - onnx.reference (onnx 1.23): its LSTM, GRU and RNN take these and drop them (onnx/reference/ops/op_lstm.py,
#   op_gru.py, op_rnn.py: "TODO: support overridden attributes", every one `# noqa: ARG002`); an RNN activation
#   other than Tanh/Affine it refuses (cannot load).
# - tract (0.23): measured on one-op graphs against onnxruntime (tests/test_check.py, where tract is installed);
#   a sequence_lens input it refuses (cannot load).
IGNORED_BY = {
    "onnx.reference": {
        "LSTM": ("activations", "activation_alpha", "activation_beta", "clip", "input_forget", "sequence_lens"),
        "GRU": ("activations", "activation_alpha", "activation_beta", "clip", "sequence_lens"),
        "RNN": ("clip", "sequence_lens"),
    },
    "tract": {
        "LSTM": ("activations", "clip", "input_forget"),
        "GRU": ("activations", "clip"),
        "RNN": ("activations", "clip"),
    },
}
# The activations a recurrent op applies without the attribute (the ONNX operator specification), per direction.
DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}


@dataclass
class RuntimeResult:
    """One runtime's answer: `status` is ok, wrong, cannot load or not installed; diffs are per set, per output."""

    runtime: str
    version: str | None
    status: str
    reason: str = ""  # why it cannot load, is missing, or which output is off by how much
    max_abs_diff: dict[str, dict[str, float]] = field(default_factory=dict)  # set → output → max |Δ| vs expected
    agreement: float | None = None  # top-1 agreement with the expected answers over both sets (classifiers)
    latency_ms: float | None = None  # batch 1, median of a short run
    latency_runs: int = 0
    load_ms: float | None = None

    @property
    def worst(self) -> float | None:
        values = [d for by_output in self.max_abs_diff.values() for d in by_output.values()]
        return max(values) if values else None


@dataclass
class CheckReport:
    """Every runtime's result on one model file, against one set of expected answers."""

    model: str
    file: str
    role: str
    expected_from: str  # who gave the expected answers: the source model, or onnxruntime
    sets: dict[str, int]  # set name → number of inputs
    tolerances: dict[str, str]  # output → tolerance as text
    results: list[RuntimeResult]
    machine: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def wrong(self) -> list[RuntimeResult]:
        return [r for r in self.results if r.status == WRONG]

    def to_json(self) -> dict[str, Any]:
        """The `--json` document: the file, the expected answers' source, the tolerances, every runtime, the machine."""
        doc = asdict(self)
        for r, d in zip(self.results, doc["results"]):
            d["max_abs_diff_overall"] = r.worst
        doc["wrong"] = [r.runtime for r in self.wrong]
        return doc


@dataclass
class _Vectors:
    """Inputs per set, the expected outputs of the sets the source model answered (the others: onnxruntime's on the
    same file), the tolerance of an output on a set's inputs — (atol, text), atol one number or one per element of
    the output — and the top-1 promise where one is stored."""

    inputs: dict[str, Arrays]
    expected: dict[str, Arrays]
    expected_from: str
    tolerance: Any  # (output, reference array, the set's inputs) → (atol, text)
    model_name: str
    path: Path
    io: dict[str, Any]
    role: str
    file: str  # what the report names: the folder's file, or BUNDLE:member
    notes: list[str] = field(default_factory=list)
    # output → the stored quantized promises on the reference set beyond atol: "argmax_min" (least top-1 agreement on the
    # inputs the source is sure of) and "mean_atol" (bound on the mean over the inputs of each one's max |Δ|); None: unchecked
    promises: dict[str, dict[str, float | None]] = field(default_factory=dict)


def _random_inputs(manifest: dict[str, Any], *, batch: int, seed: int) -> Arrays:
    """The larger batch, drawn by the model kind's adapter in the model's own input range."""
    from .models import adapter_for
    from .models.keras_model import fixed_time_steps

    time_steps = fixed_time_steps(manifest) or DEFAULT_TIME_STEPS
    return adapter_for(manifest).sample_inputs(manifest, batch=batch, time_steps=time_steps, seed=seed)


def known_gaps(runtime_name: str, path: str | os.PathLike[str]) -> list[str]:
    """What the graph at `path` uses that runtime `runtime_name` is known to ignore (IGNORED_BY), one line per node:
    `LSTM 'lstm' activations Sigmoid, Relu, Relu (it applies Sigmoid, Tanh, Tanh)`; [] when nothing is known."""
    ignores = IGNORED_BY.get(runtime_name)
    if not ignores:
        return []
    try:
        import onnx
        from onnx import helper

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 — without onnx, or on a file it cannot parse, nothing is known
        return []
    found = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ignores:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        used = []
        for name in ignores[node.op_type]:
            if name == "sequence_lens":
                if len(node.input) > 4 and node.input[4]:
                    used.append("its sequence_lens input (the padding mask)")
            elif name == "activations":
                given = [a.decode() if isinstance(a, bytes) else str(a) for a in attrs.get(name, [])]
                default = list(DEFAULT_ACTIVATIONS[node.op_type]) * (2 if attrs.get("direction") == b"bidirectional" else 1)
                if given and [a.lower() for a in given] != [a.lower() for a in default]:
                    used.append(f"activations {', '.join(given)} (it applies {', '.join(default)})")
            elif name == "input_forget":
                if attrs.get(name, 0):
                    used.append("input_forget=1")
            elif name in attrs:
                value = attrs[name]
                used.append(f"{name} {', '.join(f'{v:g}' for v in value) if isinstance(value, list) else f'{value:g}'}")
        if used:
            found.append(f"{node.op_type} {node.name!r} {'; '.join(used)}")
    return found


def _variant_name(role: str) -> str:
    """A manifest role's `bundle --variant` name: onnx_int8 → int8, onnx_step_int8 → step-int8, onnx_int8_static → int8-static."""
    from .device.bundle import VARIANT_ROLES

    return next((v for v, r in VARIANT_ROLES.items() if r == role), role)


def _folder_roles(manifest: dict[str, Any]) -> list[str]:
    """The roles of a folder `check` runs: every whole-sequence ONNX file (fp32 and its quantized variants)."""
    return [r for r, f in manifest["files"].items() if str(f.get("path", "")).endswith(".onnx") and "_step" not in r]


def _folder_vectors(model_dir: Path, *, role: str, batch: int, seed: int) -> _Vectors:
    """A folder's realistic (reference) and random inputs with the source model's answers. The fp32 file is judged on
    both at its export tolerance; a quantized variant on the reference set at the bound a bundle stores for it
    (`bundle.tolerances_for`, with its top-1 and mean promises) and on the random set against onnxruntime on the same
    file (whether another runtime computes the same int8 graph), as a bundle's is."""
    from .bundle import FP32_ROLES, tolerances_for
    from .device.manifest import make_command, missing_role
    from .models import adapter_for
    from .models.keras_model import fixed_time_steps

    manifest = load_manifest(model_dir)
    roles = _folder_roles(manifest)
    if not roles:  # trained, never exported
        raise missing_role(manifest, model_dir, "onnx")
    if role not in roles:
        files = manifest["files"]
        if role.endswith("_ort") and role in files:
            why = f"{files[role]['path']} is ORT format, which only onnxruntime opens — check the .onnx it was made from"
        elif "_step" in role:
            why = (f"check runs whole sequences; a step model's answers are proved at export (step == sequence) and on a "
                   f"device by edge-rnn bundle {model_dir} --variant {_variant_name(role)}, then edge-rnn verify BUNDLE --run")
        elif role in files:
            why = f"{files[role].get('path')} is not an ONNX model file; check runs the folder's .onnx files"
        else:
            make = make_command(role, model_dir)
            why = f"{model_dir} holds no {role} file" + (f" ({make})" if make else "")
        raise InputError(f"--role {role}: {why} — choose from {', '.join(roles)}")
    path = verified_file(manifest, model_dir, role)
    adapter = adapter_for(manifest)
    time_steps = fixed_time_steps(manifest) or DEFAULT_TIME_STEPS
    quantized = role not in FP32_ROLES
    # A quantized role is judged at the bound a bundle stores, so on inputs drawn as a bundle draws its reference
    # vectors (held-out text from a zero state for the char RNN, real digits for mnist-lstm).
    inputs = {
        "reference": adapter.reference_inputs(manifest, count=REFERENCE_COUNT, time_steps=time_steps, seed=seed) if quantized
        else adapter.sample_inputs(manifest, batch=REFERENCE_COUNT, time_steps=time_steps, seed=seed),
        "random": adapter.sample_inputs(manifest, batch=batch, time_steps=time_steps, seed=seed + 1),
    }
    notes = []
    try:
        source = adapter.load(model_dir, manifest)
    except MissingDependencyError as exc:
        source, expected, expected_from = None, {}, "onnxruntime (same file)"
        notes.append(f"no source-model answers: {exc} — every runtime is compared with onnxruntime on the same file instead")
    else:
        answered = ("reference",) if quantized else tuple(inputs)
        expected = {name: adapter.reference(source, inputs[name], io=manifest["io"]) for name in answered}
        expected_from = (f"source model ({adapter.name} adapter) (reference set) and onnxruntime on the same file (random set)"
                         if quantized else f"source model ({adapter.name} adapter)")
    if not quantized:
        tolerance = lambda output, ref, x: adapter.tolerance(output, ref, stepped=False, source=source, inputs=x)  # noqa: E731
        return _Vectors(inputs, expected, expected_from, tolerance, manifest["model"], path, manifest["io"], role, str(path), notes)

    def tolerance(output: str, ref: Any, x: Arrays) -> tuple[float, str]:
        bound = tolerances_for(role, {output: ref}, manifest=manifest, adapter=adapter)[output]
        return bound["atol"], f"atol {bound['atol']:.3g} (the bound a bundle of {role} stores)"

    stored = tolerances_for(role, expected.get("reference", {}), manifest=manifest, adapter=adapter)
    promises = {name: {k: bound.get(k) for k in ("argmax_min", "mean_atol")} for name, bound in stored.items()}
    return _Vectors(inputs, expected, expected_from, tolerance, manifest["model"], path, manifest["io"], role, str(path),
                    notes, promises)


def _bundle_vectors(bundle_path: Path, *, role: str | None, batch: int, seed: int, workdir: Path) -> _Vectors:
    """The bundle's reference vectors and stored tolerances for `role`, its member written into `workdir`."""
    from .device.bundle import default_role, open_bundle, verify
    from .device.session import create_session

    bundle = open_bundle(bundle_path)
    verify(bundle)
    manifest = bundle.manifest
    model_roles = [r for r in bundle.roles if not r.endswith("_config")]
    role = role or default_role(bundle)
    if role not in model_roles:
        raise InputError(f"--role {role}: {bundle_path} holds no such model — choose from {', '.join(model_roles)}")
    member = manifest["files"][role]["path"]
    path = workdir / member
    path.write_bytes(bundle.data(role))
    ref_inputs, ref_outputs = bundle.reference()
    graph_inputs = [i.name for i in create_session(path, threads=1, opt_level="disable").get_inputs()]
    missing = [name for name in graph_inputs if name not in ref_inputs]
    if missing:
        raise InputError(
            f"--role {role}: {member} takes {', '.join(missing)}, which the reference vectors do not hold (a step model); "
            f"check runs whole sequences — its step-by-step answers are self-tested by `edge-rnn verify {bundle_path} --run`"
        )
    stored = manifest["reference"]["tolerances"][role]
    outputs = [name for name in ref_outputs if name in stored]
    inputs = {
        "reference": {name: ref_inputs[name] for name in graph_inputs},
        "random": _random_inputs(manifest, batch=batch, seed=seed + 1),
    }
    source = manifest["reference"].get("source", "source")
    expected = {"reference": {name: ref_outputs[name] for name in outputs}}
    notes = [f"a bundle holds no source model: the random set is compared with onnxruntime on the same member ({member}), "
             f"the reference set with the {source} model's answers stored in the bundle"]

    def tolerance(output: str, ref: Any, inputs: Arrays) -> tuple[float, str]:
        atol = float(stored[output]["atol"])
        return atol, f"atol {atol:g} (stored in the bundle for {role})"

    promises = {name: {k: stored[name].get(k) for k in ("argmax_min", "mean_atol")} for name in outputs}
    return _Vectors(inputs, expected, f"{source} source model (reference set) and onnxruntime on the same member (random set)",
                    tolerance, manifest["model"], path, manifest["io"], role, f"{bundle_path}:{member}", notes, promises)


# ---------------------------------------------------------------------------------------------
# One runtime, in its own process


def _latency(call, *, seconds: float) -> tuple[float, int]:
    for _ in range(LATENCY_WARMUP):
        call()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < LATENCY_MIN_RUNS or (len(times) < LATENCY_MAX_RUNS and time.perf_counter() - start < seconds):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3), len(times)


def measure(name: str, path: str, inputs: dict[str, Arrays], *, threads: int, seconds: float = LATENCY_SECONDS) -> dict[str, Any]:
    """Run every set on runtime `name` and time batch 1: {"outputs": set → output → array, "latency_ms", "runs", "load_ms"}
    or {"error": one line} when the runtime cannot load or run the file."""
    try:
        t0 = time.perf_counter()
        run = open_runtime(name, path, threads=threads)
        load_ms = (time.perf_counter() - t0) * 1e3
        outputs = {set_name: run(x) for set_name, x in inputs.items()}
        one = {k: v[:1] for k, v in inputs["reference"].items()}
        latency_ms, runs = _latency(lambda: run(one), seconds=seconds)
    except EdgeRnnError as exc:
        return {"error": str(exc)}
    return {"outputs": outputs, "latency_ms": latency_ms, "runs": runs, "load_ms": load_ms}


def _child(name: str, path: str, inputs: dict[str, Arrays], threads: int, queue) -> None:
    queue.put(measure(name, path, inputs, threads=threads))




def _in_subprocess(name: str, path: Path, inputs: dict[str, Arrays], *, threads: int) -> dict[str, Any]:
    got = run_in_child(_child, (name, str(path), inputs, threads), threads=threads, timeout_s=RUNTIME_TIMEOUT_S, poll_s=0.5)
    if got.timed_out:
        return {"error": f"no answer within {RUNTIME_TIMEOUT_S:.0f} s"}
    if got.error is not None:
        return {"error": f"the {name} process failed: {got.error}"}
    if got.died is not None:
        return {"error": f"the {name} process died (exit code {got.died}: the runtime crashed on this file)"}
    return got.value


# ---------------------------------------------------------------------------------------------
# Judging


def _agreement(outputs: dict[str, Arrays], expected: dict[str, Arrays], first: str) -> float | None:
    """Top-1 agreement over every set where the first output is a classifier's (N, classes)."""
    pairs = [(outputs[s].get(first), expected[s][first]) for s in expected]
    if not all(mine is not None and mine.shape == ref.shape and ref.ndim == 2 and ref.shape[1] > 1 for mine, ref in pairs):
        return None
    agree = np.concatenate([mine.argmax(-1) == ref.argmax(-1) for mine, ref in pairs])
    return float(agree.mean())


def _tolerances(vectors: _Vectors, expected: dict[str, Arrays]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Per set and output the atol — one number, or one per element where the adapter derives it from the set's inputs —
    and per output its text. An output whose atol is one number on every set takes the largest over the sets, as if
    they were one set (a tolerance relative to the output's magnitude scales with the largest)."""
    per_set = {s: {o: vectors.tolerance(o, ref, vectors.inputs[s]) for o, ref in want.items()} for s, want in expected.items()}
    tolerances: dict[str, dict[str, Any]] = {s: {} for s in per_set}
    texts: dict[str, str] = {}
    for output in expected["reference"]:
        given = {s: per_set[s][output] for s in per_set if output in per_set[s]}
        if all(np.ndim(atol) == 0 for atol, _ in given.values()):
            atol, texts[output] = max(given.values(), key=lambda pair: float(pair[0]))
            for s in given:
                tolerances[s][output] = float(atol)
            continue
        for s, (atol, _) in given.items():
            tolerances[s][output] = atol
        by_text = {text: [s for s in given if given[s][1] == text] for _, text in given.values()}
        ranges = ", ".join(f"{s} {np.min(atol):.2g}–{np.max(atol):.2g}" for s, (atol, _) in given.items())
        texts[output] = (f"{next(iter(by_text))}: {ranges}" if len(by_text) == 1
                         else "; ".join(f"{', '.join(sets)} set: {text}" for text, sets in by_text.items()))
    return tolerances, texts


def _off_by(output: str, set_name: str, delta: np.ndarray, atol: Any) -> str | None:
    """None when every |Δ| is within its atol (a number, or one per element), else what is off and by how much."""
    if np.ndim(atol) == 0:
        diff = float(np.max(delta, initial=0.0))
        return None if diff <= atol else f"{output} off by {diff:.2g} on the {set_name} set (tolerance {atol:g})"  # NaN is off too
    bound = np.broadcast_to(atol, delta.shape)
    if np.all(delta <= bound):
        return None
    ratio = np.where(np.isnan(delta), np.inf, delta / np.maximum(bound, np.finfo(np.float64).tiny))
    worst = np.unravel_index(np.argmax(ratio), delta.shape)
    return (f"{output} off by {delta[worst]:.2g} on the {set_name} set at {list(map(int, worst))}, where its bound is "
            f"{bound[worst]:.2g} ({ratio[worst]:.3g}× it)")


def _judge(result: RuntimeResult, outputs: dict[str, Arrays], vectors: _Vectors, expected: dict[str, Arrays],
           tolerances: dict[str, dict[str, Any]]) -> None:
    off = []
    for set_name, want in expected.items():
        diffs = result.max_abs_diff.setdefault(set_name, {})
        for output, ref in want.items():
            mine = outputs[set_name].get(output)
            if mine is None or mine.shape != ref.shape:
                off.append(f"{output} on the {set_name} set has shape {None if mine is None else mine.shape}, expected {ref.shape}")
                continue
            delta = np.abs(mine.astype(np.float64) - ref.astype(np.float64))
            diffs[output] = float(np.max(delta, initial=0.0))
            message = _off_by(output, set_name, delta, tolerances[set_name][output])
            if message:
                off.append(message)
    result.agreement = _agreement(outputs, expected, vectors.io["outputs"][0]["name"])
    for output, promise in vectors.promises.items():
        # A quantized role's promises, on the reference set (the one the source model answered).
        ref, mine = expected["reference"][output], outputs["reference"].get(output)
        if mine is None or mine.shape != ref.shape or not ref.size:
            continue  # already off, by its shape
        least, mean_atol = promise.get("argmax_min"), promise.get("mean_atol")
        agreement, sure = _top1(ref, mine) if least is not None else (None, 0)
        if agreement is not None and agreement < least:
            off.append(f"{output} keeps top-1 on {agreement:.1%} of the {sure} sure reference inputs (promise ≥ {least:.1%})")
        delta = np.abs(mine.astype(np.float64) - ref.astype(np.float64)).reshape(len(ref), -1)
        mean = float(delta.max(axis=1).mean())
        if mean_atol is not None and not mean <= mean_atol:
            off.append(f"{output}: mean over the reference inputs of each one's max |Δ| is {mean:.2g} (stored bound {mean_atol:g})")
    if off:
        result.status, result.reason = WRONG, "; ".join(off)


def check(
    target: str | os.PathLike[str],
    *,
    runtimes: Sequence[str] | None = None,
    role: str | None = None,
    batch: int = RANDOM_BATCH,
    threads: int = 1,
    seed: int = 0,
    data: str | os.PathLike[str] | None = None,
) -> CheckReport:
    """Run a model folder's `role` file (default `onnx`) or a bundle's (default: the bundle's default role) on every
    named runtime (all known ones by default) and judge each answer; with `data` (the user's .npz or .npy folder),
    its first `batch` rows are one more set, answered by the source model for a folder (by onnxruntime for a bundle)."""
    names = list(dict.fromkeys(runtimes or RUNTIMES))
    for name in names:
        runtime(name)  # unknown names fail before any work
    if batch < 1 or threads < 1:
        raise EdgeRnnError("--batch and --threads must be at least 1")
    target = Path(target)
    if is_bundle(target):
        # Runtimes open files by path; the member goes to a private folder, never beside the user's files.
        workdir = Path(tempfile.mkdtemp(prefix="edge-rnn-check-"))
        try:
            vectors = _bundle_vectors(target, role=role, batch=batch, seed=seed, workdir=workdir)
            return _check(_with_data(vectors, data, batch=batch, manifest=load_bundle_manifest(target)), names, threads=threads)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    if not target.is_dir():
        if target.suffix.lower() in (".keras", ".h5", ".hdf5") and target.is_file():
            from .device.manifest import not_a_model_folder

            raise EdgeRnnError(not_a_model_folder(target))
        raise EdgeRnnError(f"{target} is not a model folder or a bundle — give a folder made by edge-rnn export (or pipeline), "
                           "or a .tar.gz made by edge-rnn bundle")
    vectors = _folder_vectors(target, role=role or "onnx", batch=batch, seed=seed)
    return _check(_with_data(vectors, data, batch=batch, manifest=load_manifest(target), model_dir=target), names, threads=threads)


def load_bundle_manifest(path: Path) -> dict[str, Any]:
    from .device.bundle import open_bundle

    return open_bundle(path).manifest


def _with_data(vectors: _Vectors, data: str | os.PathLike[str] | None, *, batch: int, manifest: dict[str, Any],
               model_dir: Path | None = None) -> _Vectors:
    """`vectors` plus a `data` set: the first `batch` rows of the user's data (state inputs at zero), answered by the
    source model where the folder has one (else by onnxruntime on the same file, like the random set)."""
    if data is None:
        return vectors
    from .evaluate import open_for

    dataset = open_for(manifest, data, max_rows=batch)
    feeds, _ = dataset.rows(0, dataset.count)
    for spec in vectors.io["inputs"]:
        if spec["name"] not in feeds:  # a state input (the char RNN's h0): the zero state
            feeds[spec["name"]] = np.zeros((dataset.count, spec["shape"][1]), np.float32)
    vectors.inputs["data"] = feeds
    if "random" in vectors.expected and model_dir is not None:
        from .models import adapter_for

        adapter = adapter_for(manifest)
        vectors.expected["data"] = adapter.reference(adapter.load(model_dir, manifest), feeds, io=manifest["io"])
    vectors.notes.append(f"data set: the first {dataset.count} rows of {data}")
    return vectors


def _check(vectors: _Vectors, names: list[str], *, threads: int) -> CheckReport:
    measured: dict[str, dict[str, Any]] = {}
    results: list[RuntimeResult] = []
    # A set without the source model's answers takes onnxruntime's: measure it even when not named.
    by_ort = [s for s in vectors.inputs if s not in vectors.expected]
    order = names if not by_ort or "onnxruntime" in names else ["onnxruntime", *names]
    for name in order:
        version = RUNTIMES[name].version()
        if version is None:
            results.append(RuntimeResult(name, None, NOT_INSTALLED, f"{RUNTIMES[name].install_hint()} to check it"))
            continue
        measured[name] = _in_subprocess(name, vectors.path, vectors.inputs, threads=threads)
        m = measured[name]
        if "error" in m:
            results.append(RuntimeResult(name, version, CANNOT_LOAD, m["error"]))
        else:
            results.append(RuntimeResult(name, version, OK, latency_ms=m["latency_ms"], latency_runs=m["runs"], load_ms=m["load_ms"]))
    expected = dict(vectors.expected)
    if by_ort:
        ort = measured.get("onnxruntime", {})
        if "outputs" not in ort:
            raise EdgeRnnError(f"no expected answers for the {' and '.join(by_ort)} set: onnxruntime cannot run {vectors.file} "
                               f"({ort.get('error') or 'onnxruntime is not installed'})")
        judged = list(expected.get("reference", ort["outputs"]["reference"]))  # the outputs the source model answers for
        expected.update({s: {k: ort["outputs"][s][k] for k in judged} for s in by_ort})
    expected = {s: expected[s] for s in vectors.inputs}
    tolerances, tolerance_text = _tolerances(vectors, expected)
    for result in results:
        if result.status == OK:
            _judge(result, measured[result.runtime]["outputs"], vectors, expected, tolerances)
        gaps = known_gaps(result.runtime, vectors.path) if result.status in (OK, WRONG) else []
        if gaps:
            ignored = (f"{result.runtime} {result.version} is known to ignore what this graph uses: {'; '.join(gaps)}")
            if result.status == WRONG:
                result.status = UNSUPPORTED
                result.reason = f"{ignored} — so its answer says nothing about the file and does not fail the check ({result.reason})"
            else:
                result.reason = f"{ignored} — these inputs did not show it"
    results = [r for r in results if r.runtime in names]
    machine = cpu_features()
    machine["description"] = describe(machine)
    return CheckReport(
        model=vectors.model_name, file=vectors.file, role=vectors.role, expected_from=vectors.expected_from,
        sets={name: len(next(iter(x.values()))) for name, x in vectors.inputs.items()}, tolerances=tolerance_text,
        results=results, machine=machine, notes=vectors.notes,
    )
