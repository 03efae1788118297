"""The per-step budget of a step model: the figures a user holds against a board's budget.

Device path: numpy, onnxruntime and edge_rnn.device only (no onnx, no TensorFlow), so `edge-rnn bench DIR --budget`
runs on the board itself. Takes model folders and bundles; one row per steppable model file (a step form, or a
sequence file that takes its state, as the char RNN's every variant does):

- state bytes per stream: the bytes of every recurrent state tensor for one stream (units × the graph input's
  dtype), what a device keeps per stream between steps. The Stepper double-buffers it (two sets, ping-ponged), so
  a Stream of N streams holds 2 × N × this;
- weights bytes: every tensor stored in the ONNX file (initializers, Constant values, in subgraphs too) at its
  element size, read from the protobuf without the onnx package (`weight_bytes`); None for `.ort` files
  (FlatBuffers, not parsed here);
- memory: each row runs in a fresh `python -c` process that imports numpy, onnxruntime and the device modules,
  reads its resident memory (VmRSS, the baseline), loads the file (sha256-checked, as a device loads it),
  steps it, and reads its peak (VmHWM: the high-water mark of the process's resident memory, from
  /proc/self/status; ru_maxrss where there is no /proc). `peak` is the whole process, `model` the peak minus
  the baseline: what the session, its arena and the stepping added;
- step latency: `Stream.step` (the public API a device program calls: its input checks, one IOBinding run, copies
  out) at one stream, given each step as an array of the graph's dtype, `steps` timed steps after `warmup`, each
  timed alone; and the same through the `Stepper` alone (the graph and its IOBinding, as the bench's step row
  runs it: `graph_step_us`), so the JSON shows what the checks cost. The two take turns one sequence at a time
  (the file's fixed time axis, else STREAM_STEPS steps, from a reset that is not timed), so both see the same
  load, and the state stays in the range the model was trained for. Inputs are random (uniform [0, 1) floats, ids in the vocabulary): a recurrent step's cost does
  not depend on the values.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import EdgeRnnError, ModelFileError
from ..device.bundle import ORT_SUFFIX, VARIANT_ROLES, steppable_role
from ..device.manifest import BUNDLE_SUFFIX, load_manifest, verified_file
# The protobuf wire reader and onnx.proto field numbers of the device's ONNX checks (onnxfile.py).
from ..device.onnxfile import (
    _ATTR_G, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES, _ATTR_T, _ATTR_TENSORS, _FUNCTION_NODE, _GRAPH_INITIALIZER, _GRAPH_NODE,
    _GRAPH_SPARSE_INITIALIZER, _MODEL_FUNCTIONS, _MODEL_GRAPH, _NODE_ATTRIBUTE, _SPARSE_INDICES, _SPARSE_VALUES, MAX_GRAPH_DEPTH,
    _Corrupt, _fields, _submessages, _varint,
)

# Steps between resets where the time axis is dynamic: a typical sequence length for the built-ins (25–32).
STREAM_STEPS = 32
# The child process's own answer arrives on its last stdout line, after anything a library prints.
RESULT_PREFIX = "EDGE_RNN_BUDGET="

# Called before each measured row with (model, variant).
RowCallback = Callable[[str, str], None]


@dataclass(frozen=True)
class BudgetConfig:
    """How to measure: threads and graph optimisation as a device runs, timed steps, rounds, time limit per row."""

    threads: int = 1  # a Raspberry Pi's realistic setting: the other cores serve the rest of the device
    opt_level: str = "all"  # the device's default (edge_rnn.device.session)
    steps: int = 2000  # timed steps per row and round: p99 is then the 20th slowest
    warmup: int = 200
    # Each row is measured this many times, each in a fresh process, rows interleaved; timings are medians over
    # rounds, memory the highest peak.
    rounds: int = 1
    timeout_s: float = 120.0


@dataclass
class BudgetRow:
    """One steppable model file: memory in MiB, latency in µs per step at one stream."""

    model: str
    variant: str
    role: str
    file: str
    file_bytes: int
    state_bytes_per_stream: int
    state_tensors: dict[str, int]  # state input name → bytes per stream
    weights_bytes: int | None  # None for .ort files
    weights_by_dtype: dict[str, int] | None
    peak_rss_mib: float  # the whole process's peak
    baseline_rss_mib: float  # after importing numpy, onnxruntime and the device modules
    model_rss_mib: float  # peak − baseline
    load_ms: float
    step_us: dict[str, float]  # Stream.step: p50, p90, p99, max, mean
    graph_step_us: dict[str, float]  # the Stepper alone (the graph and its IOBinding, as bench's step row), the same figures
    steps: int  # timed steps, over every round
    memory_source: str  # VmHWM (Linux) or ru_maxrss


@dataclass
class BudgetReport:
    rows: list[BudgetRow]
    machine: dict[str, Any]
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The `bench --budget --json` document: budget rows, machine, config, notes."""
        return {"budget": [dataclasses.asdict(r) for r in self.rows], "machine": self.machine, "config": self.config, "notes": self.notes}


# ---------------------------------------------------------------------------------------------
# Weights: the tensors stored in an ONNX file, read from its protobuf (the device has no onnx package)

# onnx.proto TensorProto.DataType → (name, bits per element); 0 bits: STRING, counted by its bytes.
ONNX_DTYPES: dict[int, tuple[str, int]] = {
    1: ("float32", 32), 2: ("uint8", 8), 3: ("int8", 8), 4: ("uint16", 16), 5: ("int16", 16), 6: ("int32", 32),
    7: ("int64", 64), 8: ("string", 0), 9: ("bool", 8), 10: ("float16", 16), 11: ("float64", 64), 12: ("uint32", 32),
    13: ("uint64", 64), 14: ("complex64", 64), 15: ("complex128", 128), 16: ("bfloat16", 16), 17: ("float8e4m3fn", 8),
    18: ("float8e4m3fnuz", 8), 19: ("float8e5m2", 8), 20: ("float8e5m2fnuz", 8), 21: ("uint4", 4), 22: ("int4", 4),
    23: ("float4e2m1", 4),
}
# TensorProto field numbers (onnx.proto, stable since IR version 3).
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_STRING_DATA, _TENSOR_RAW_DATA = 1, 2, 6, 9


def _packed_varints(data: memoryview, span: tuple[int, int]) -> list[int]:
    values, pos = [], span[0]
    while pos < span[1]:
        value, pos = _varint(data, pos, span[1])
        values.append(value)
    return values


def _tensor_bytes(data: memoryview, span: tuple[int, int], totals: dict[str, int]) -> None:
    """Add one TensorProto's bytes (elements × element size) to totals[dtype name]."""
    dims: list[int] = []
    dtype, strings, raw = 0, 0, 0
    for number, wire, value in _fields(data, *span):
        if number == _TENSOR_DIMS:
            dims += [value] if wire == 0 else _packed_varints(data, value)
        elif number == _TENSOR_DATA_TYPE and wire == 0:
            dtype = value
        elif number == _TENSOR_STRING_DATA and wire == 2:
            strings += value[1] - value[0]
        elif number == _TENSOR_RAW_DATA and wire == 2:
            raw = value[1] - value[0]
    name, bits = ONNX_DTYPES.get(dtype, (f"type {dtype}", 0))
    if bits:
        size = (int(np.prod(dims, dtype=np.int64)) * bits + 7) // 8
    else:  # strings, and types this table does not know: the bytes stored
        size = strings or raw
    totals[name] = totals.get(name, 0) + size


def _nodes_tensors(data: memoryview, span: tuple[int, int], node_field: int, totals: dict[str, int], depth: int) -> None:
    kinds = {_ATTR_T: "t", _ATTR_TENSORS: "t", _ATTR_G: "g", _ATTR_GRAPHS: "g", _ATTR_SPARSE: "s", _ATTR_SPARSES: "s"}
    for _, node in _submessages(data, span, {node_field: "node"}):
        for _, attr in _submessages(data, node, {_NODE_ATTRIBUTE: "attr"}):
            for kind, sub in _submessages(data, attr, kinds):
                if kind == "t":
                    _tensor_bytes(data, sub, totals)
                elif kind == "s":
                    for _, part in _submessages(data, sub, {_SPARSE_VALUES: "t", _SPARSE_INDICES: "t"}):
                        _tensor_bytes(data, part, totals)
                else:
                    _graph_tensors(data, sub, totals, depth + 1)


def _graph_tensors(data: memoryview, span: tuple[int, int], totals: dict[str, int], depth: int) -> None:
    if depth > MAX_GRAPH_DEPTH:
        raise _Corrupt(span[0])
    for kind, sub in _submessages(data, span, {_GRAPH_INITIALIZER: "t", _GRAPH_SPARSE_INITIALIZER: "s"}):
        if kind == "t":
            _tensor_bytes(data, sub, totals)
        else:
            for _, part in _submessages(data, sub, {_SPARSE_VALUES: "t", _SPARSE_INDICES: "t"}):
                _tensor_bytes(data, part, totals)
    _nodes_tensors(data, span, _GRAPH_NODE, totals, depth)


def weight_bytes(data: bytes | memoryview, *, where: object) -> dict[str, int]:
    """{dtype name: bytes} of every tensor an ONNX model's bytes store (initializers, node attributes such as
    Constant values, subgraphs and functions), each counted as elements × element size; ModelFileError if the
    bytes are not an ONNX model."""
    view = memoryview(data)
    totals: dict[str, int] = {}
    try:
        for kind, span in _submessages(view, (0, len(view)), {_MODEL_GRAPH: "graph", _MODEL_FUNCTIONS: "function"}):
            if kind == "graph":
                _graph_tensors(view, span, totals, 1)
            else:
                _nodes_tensors(view, span, _FUNCTION_NODE, totals, 1)
    except _Corrupt as exc:
        raise ModelFileError(f"{where} is not an ONNX model (malformed or truncated protobuf near byte {exc.args[0]}) — re-export it") from None
    return totals


# ---------------------------------------------------------------------------------------------
# Inside the measuring child (a fresh `python -c`)


def _memory_mib() -> tuple[float, float, str]:
    """(resident now, peak resident) of this process in MiB, and where the peak was read."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024, "VmHWM"
    except (OSError, KeyError, ValueError):
        import resource

        # ru_maxrss is KiB on Linux and BSD, bytes on macOS; it has no "now", so both are the peak.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
        return peak, peak, "ru_maxrss"


def _frames(stream, temporal: set[str], rng: np.random.Generator, *, count: int) -> list[dict[str, np.ndarray]]:
    """`count` one-step inputs for one stream as a device program passes them: (1, features…) arrays of the graph's
    dtype (a sequence input without its time axis); floats uniform in [0, 1), ids in the input's vocabulary (not a
    masked input's padding id 0)."""
    specs = {s["name"]: s for s in stream.loaded.io["inputs"]}
    vocab = stream.loaded.manifest.get("vocab")
    # A masked input's padding value is never drawn: a real step after padding is refused (post-padding only).
    padding = {m["input"]: m.get("value", 0) for m in stream.loaded.manifest.get("masking", [])}
    frames: list[dict[str, np.ndarray]] = [{} for _ in range(count)]
    for info in stream.inputs:
        dims = info.shape[2:] if info.name in temporal else info.shape[1:]
        shape = (1, *(d if isinstance(d, int) else 1 for d in dims))
        for frame in frames:
            if info.dtype.kind == "f":
                frame[info.name] = rng.random(shape, dtype=np.float64).astype(info.dtype)
            else:
                size = specs.get(info.name, {}).get("vocab") or (len(vocab) if isinstance(vocab, list) else 1)
                low = 1 if padding.get(info.name) == 0 and size > 1 else 0
                frame[info.name] = rng.integers(low, size, shape).astype(info.dtype)
    return frames


def _sequence_length(manifest: dict[str, Any]) -> int:
    """The fixed time axis of the sequence model's first input, else STREAM_STEPS."""
    inputs = (manifest.get("io") or {}).get("inputs") or [{}]
    shape = inputs[0].get("shape") or []
    return shape[1] if len(shape) > 2 and isinstance(shape[1], int) and shape[1] > 0 else STREAM_STEPS


# (step(frame), its frames, reset()) of one way to step a model.
Runner = tuple[Callable[[dict[str, np.ndarray]], Any], list[dict[str, np.ndarray]], Callable[[], None]]


def _timed(runners: list[Runner], *, steps: int, warmup: int) -> list[dict[str, float]]:
    """p50/p90/p99/max/mean µs of each runner's step over `steps` single timed calls after `warmup` of each. The
    runners take turns one sequence (their frames, from a reset) at a time, so that all see the same load from
    the rest of the machine; resets are not timed."""
    import time

    clock = time.perf_counter_ns
    ns = [np.empty(warmup + steps, np.int64) for _ in runners]
    done = 0
    while done < warmup + steps:
        for (step, frames, reset), times in zip(runners, ns):
            reset()
            for i, frame in enumerate(frames[: warmup + steps - done]):
                start = clock()
                step(frame)
                times[done + i] = clock() - start
        done += min(len(runners[0][1]), warmup + steps - done)
    figures = []
    for times in ns:
        us = times[warmup:] / 1e3
        figures.append({**{f"p{q}": float(np.percentile(us, q)) for q in (50, 90, 99)}, "max": float(us.max()), "mean": float(us.mean())})
    return figures


def measure_step(job: dict[str, Any]) -> dict[str, Any]:
    """One row, in this (fresh) process: load the file as a device does, step it at one stream, time and weigh it."""
    import time

    from ..device.api import Stream
    from ..device.inputs import ORT_DTYPES
    from ..device.session import load_model
    from ..device.stepper import Stepper

    baseline, _, _ = _memory_mib()
    t0 = time.perf_counter()
    loaded = load_model(job["path"], role=job["role"], step=True, threads=job["threads"], opt_level=job["opt_level"])
    stream = Stream(loaded, streams=1)
    load_ms = (time.perf_counter() - t0) * 1e3
    # The graph alone, as the bench's step row runs it: what Stream.step costs beyond it is its per-step input checks.
    stepper = Stepper(loaded, batch=1)
    graph_inputs = {i.name: np.dtype(ORT_DTYPES.get(i.type, np.float32)) for i in loaded.session.get_inputs()}
    state = {s["input"]: int(s["shape"][1]) * graph_inputs[s["input"]].itemsize for s in loaded.state}
    frames = _frames(stream, stepper.temporal, np.random.default_rng(0), count=_sequence_length(loaded.manifest))
    graph_frames = [{name: x[:, None] if name in stepper.temporal else x for name, x in frame.items()} for frame in frames]
    step_us, graph_step_us = _timed([(lambda frame: stream.step(**frame), frames, stream.reset), (stepper.step, graph_frames, stepper.reset)],
                                    steps=job["steps"], warmup=job["warmup"])
    _, peak, source = _memory_mib()
    return {
        "state_tensors": state, "load_ms": load_ms, "baseline_rss_mib": baseline, "peak_rss_mib": peak, "memory_source": source,
        "step_us": step_us, "graph_step_us": graph_step_us, "steps": job["steps"],
    }


def child_main() -> None:
    """The measuring child's entry point: a job as JSON on stdin, the result (or {"error"}) on stdout's last line."""
    job = json.loads(sys.stdin.read())
    try:
        out = measure_step(job)
    except EdgeRnnError as exc:
        out = {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    print(RESULT_PREFIX + json.dumps(out), flush=True)


# Imported before the baseline is read: what any device program running a model has loaded.
_CHILD = "import numpy, onnxruntime, edge_rnn.device.api; from edge_rnn.bench.budget import child_main; child_main()"


def _child_env(threads: int) -> dict[str, str]:
    """This environment with BLAS/OpenMP threads set and this edge_rnn importable (a source checkout included)."""
    from .runtimes import THREAD_ENV

    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, **{k: str(threads) for k in THREAD_ENV}, "PYTHONPATH": path}


def _run_child(job: dict[str, Any], cfg: BudgetConfig) -> dict[str, Any] | str:
    """The child's result, or one line saying how it failed."""
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(job), capture_output=True, text=True,
                              timeout=cfg.timeout_s, env=_child_env(cfg.threads))
    except subprocess.TimeoutExpired:
        return f"no result within {cfg.timeout_s:.0f} s"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the measuring process exited with code {proc.returncode}: {last}"
    out = json.loads(lines[-1][len(RESULT_PREFIX):])
    return out["error"] if "error" in out else out


# ---------------------------------------------------------------------------------------------
# In the parent: which files, their weights, the rows


# Manifest role → the variant name `bundle --variant` uses for it.
ROLE_VARIANTS = {role: variant for variant, role in VARIANT_ROLES.items()}


def variant_of(role: str) -> str:
    """The variant name of a role (onnx_step_int8 → step-int8; an .ort form gets `.ort`); unknown roles keep their name."""
    base = role[: -len(ORT_SUFFIX)] if role.endswith(ORT_SUFFIX) else role
    name = ROLE_VARIANTS.get(base, base)
    return f"{name}.ort" if base != role else name


@dataclass(frozen=True)
class _Planned:
    model: str
    role: str
    job_path: str  # the model file, or the bundle
    job_role: str | None  # the role inside a bundle; None for a file
    file: str
    data: bytes


def _plan(path: Path, notes: list[str]) -> list[_Planned]:
    """The steppable model files of a folder or bundle, verified against its manifest."""
    if path.name.endswith(BUNDLE_SUFFIX):
        from ..device.bundle import open_bundle

        bundle = open_bundle(path)
        manifest = bundle.manifest
        steppable = [r for r in bundle.roles if steppable_role(manifest, r)]
        planned = [_Planned(manifest["model"], r, str(path), r, f"{path.name}/{manifest['files'][r]['path']}", bundle.data(r)) for r in steppable]
    elif path.is_dir():
        manifest = load_manifest(path)
        roles = [r for r, e in manifest["files"].items() if isinstance(e, dict) and str(e.get("path", "")).endswith((".onnx", ".ort"))]
        planned = []
        for role in (r for r in roles if steppable_role(manifest, r)):
            file = verified_file(manifest, path, role)
            planned.append(_Planned(manifest["model"], role, str(file), None, str(file), file.read_bytes()))
    else:
        from ..device.manifest import manifest_path, not_a_model_file

        why = not_a_model_file(path) if path.suffix.lower() in (".keras", ".h5", ".hdf5") else None
        if not os.path.lexists(path):
            why = f"no folder or bundle {path} — give a model folder (edge-rnn export makes one) or a bundle (.tar.gz)"
        if why is None and path.is_file() and manifest_path(path.parent).is_file():
            why = f"{path} is one file of the model folder {path.parent} — give the folder (every step model in it is measured)"
        raise ModelFileError(why or f"{path} is not a model folder or a bundle (.tar.gz) — give one of those (`edge-rnn bundle DIR` makes a bundle)")
    if not planned:
        refused = manifest.get("step_refused")
        why = f"it has no step form: {refused}" if refused else "it holds no step model — " + (
            "bundle the folder with --variant step" if path.is_file()
            else f"re-export it (`edge-rnn export {path}`) to make its step model" if "onnx" in manifest.get("files", {})
            else f"export it with `edge-rnn export {path}`")
        notes.append(f"{path}: no per-step budget — {why}")
    return planned


def _median(outs: list[dict[str, Any]]) -> dict[str, Any]:
    """A row's rounds: median timings and load, the highest peak (and the baseline of that round), every step counted."""
    worst = max(outs, key=lambda o: o["peak_rss_mib"])
    return {
        **outs[0],
        "peak_rss_mib": worst["peak_rss_mib"], "baseline_rss_mib": worst["baseline_rss_mib"],
        "load_ms": float(np.median([o["load_ms"] for o in outs])),
        **{key: {q: float(np.median([o[key][q] for o in outs])) for q in outs[0][key]} for key in ("step_us", "graph_step_us")},
        "steps": sum(o["steps"] for o in outs),
    }


def budget(
    paths: Sequence[str | os.PathLike[str]], *, cfg: BudgetConfig = BudgetConfig(), on_row: RowCallback | None = None,
    allow_empty: bool = False,
) -> BudgetReport:
    """The per-step budget of every steppable model file in each folder or bundle (see the module docstring). Without a
    row to show (no step model, or none measured) it raises, unless `allow_empty` (the full bench: a note says why)."""
    from .machine import OPT_LEVELS, machine_info

    if cfg.opt_level not in OPT_LEVELS:
        raise EdgeRnnError(f"unknown --opt-level {cfg.opt_level!r}; choose from {list(OPT_LEVELS)}")
    if min(cfg.threads, cfg.steps, cfg.rounds) < 1 or cfg.warmup < 0:
        raise EdgeRnnError("--threads, --runs (timed steps) and --rounds must be at least 1")
    if not paths:
        raise ModelFileError("no model folders or bundles given — run `edge-rnn pipeline` first, or pass model folders")
    notes: list[str] = []
    # The full bench notes a folder without a step model itself (its step row); allow_empty leaves that to it.
    planned = [p for path in map(Path, paths) for p in _plan(path, [] if allow_empty else notes)]
    if not planned and not allow_empty:
        raise ModelFileError("; ".join(notes))
    job = {"threads": cfg.threads, "opt_level": cfg.opt_level, "steps": cfg.steps, "warmup": cfg.warmup}
    measured: list[list[dict[str, Any]]] = [[] for _ in planned]
    failed: set[int] = set()
    for _ in range(cfg.rounds):
        for i, p in enumerate(planned):
            if i in failed:
                continue
            if on_row is not None:
                on_row(p.model, variant_of(p.role))
            out = _run_child({**job, "path": p.job_path, "role": p.job_role}, cfg)
            if isinstance(out, str):
                notes.append(f"{p.model} {variant_of(p.role)}: not measured — {out}")
                failed.add(i)
            else:
                measured[i].append(out)
    rows = []
    for p, outs in zip(planned, measured):
        if not outs or len(outs) < cfg.rounds:
            continue
        out = _median(outs)
        weights = None if p.file.endswith(".ort") else weight_bytes(p.data, where=p.file)
        rows.append(BudgetRow(
            model=p.model, variant=variant_of(p.role), role=p.role, file=p.file, file_bytes=len(p.data),
            state_bytes_per_stream=sum(out["state_tensors"].values()), state_tensors=out["state_tensors"],
            weights_bytes=None if weights is None else sum(weights.values()), weights_by_dtype=weights,
            peak_rss_mib=out["peak_rss_mib"], baseline_rss_mib=out["baseline_rss_mib"],
            model_rss_mib=out["peak_rss_mib"] - out["baseline_rss_mib"], load_ms=out["load_ms"], step_us=out["step_us"],
            graph_step_us=out["graph_step_us"], steps=out["steps"], memory_source=out["memory_source"],
        ))
    if planned and not rows and not allow_empty:
        raise EdgeRnnError("no budget row measured: " + "; ".join(notes))
    config = {**dataclasses.asdict(cfg), "streams": 1, "step_us": "edge_rnn.Stream.step", "graph_step_us": "Stepper"}
    return BudgetReport(rows, machine_info(threads=cfg.threads), config, notes)
