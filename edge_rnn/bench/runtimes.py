"""Other runtimes a device might run an ONNX file on, one small adapter each, found through a registry.

`RUNTIMES` is the single truth of the runtimes `check` and `bench` know. Each entry says which Python
module provides it (imported only inside `open_runtime`, so a missing runtime costs nothing), which pip
distribution carries its version, which pip extra installs it, and how to open a file: `open(path, threads)`
returns `run(feeds) -> {output name: array}`.

What each adapter does to get fp32 answers, one thread, any batch:
- onnxruntime: the device path's own session (`edge_rnn.device.session.create_session`).
- openvino: `Core().compile_model(path, "CPU", {INFERENCE_NUM_THREADS, INFERENCE_PRECISION_HINT: f32})`.
  The precision hint is explicit because OpenVINO's CPU plugin defaults to bf16 on CPUs with AVX-512 BF16 or
  AMX: measured on an AMD EPYC with avx512_bf16, the MNIST LSTM's probabilities were off by 8.6e-3 with the
  default and by 6e-8 with f32 — an answer that depends on the host is not what `check` should measure.
- tract: `tract.onnx().load(path)`, every input's fact set to the concrete shape and dtype of the feeds, then
  `into_model().into_runnable()`; one runnable per input shape (tract's recurrent ops need a concrete batch:
  a symbolic one makes it panic, which aborts the whole Python process — callers run it in a subprocess).
- onnx.reference: the ONNX specification's reference evaluator (`[train]` extra brings `onnx`): pure
  NumPy, slow, and not a device runtime, but the spec's reading of each operator.
"""

from __future__ import annotations

import contextlib

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import numpy.typing as npt

from ..errors import DEBUG_ENV, EdgeRnnError

Arrays = dict[str, npt.NDArray]
# run(feeds: input name → array) → output name → array.
Run = Callable[[Arrays], Arrays]


class RuntimeLoadError(EdgeRnnError):
    """A runtime could not load or run a model file (its own error, as one line)."""


@dataclass(frozen=True)
class Runtime:
    """One runtime: where it comes from, and how to open a model file with it."""

    name: str
    module: str  # the Python module that must be importable
    distribution: str  # the pip distribution whose version is reported
    extra: str  # the edge-rnn extra that installs it ("" for onnxruntime: always there)
    open: Callable[[str, int], Run]  # (model path, threads) → run

    def version(self) -> str | None:
        """The installed version, or None when the runtime is not installed."""
        try:
            if importlib.util.find_spec(self.module.split(".")[0]) is None:
                return None
            return importlib.metadata.version(self.distribution)
        except (ImportError, importlib.metadata.PackageNotFoundError):
            return None

    def install_hint(self) -> str:
        return f"pip install 'edge-rnn[{self.extra}]'" if self.extra else f"pip install {self.distribution}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _open_onnxruntime(path: str, threads: int) -> Run:
    from ..device.session import ORT_ERRORS, create_session

    session = create_session(path, threads=threads)
    names = [o.name for o in session.get_outputs()]

    def run(feeds: Arrays) -> Arrays:
        try:
            return dict(zip(names, session.run(names, feeds)))
        except ORT_ERRORS as exc:
            raise RuntimeLoadError(_first_line(exc)) from exc

    return run


def _open_openvino(path: str, threads: int) -> Run:
    import openvino as ov

    try:
        compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    except RuntimeError as exc:
        raise RuntimeLoadError(_first_line(exc)) from exc
    request = compiled.create_infer_request()
    ports = [(port.get_any_name(), port) for port in compiled.outputs]

    def run(feeds: Arrays) -> Arrays:
        try:
            result = request.infer(feeds)
        except RuntimeError as exc:
            raise RuntimeLoadError(_first_line(exc)) from exc
        return {name: np.array(result[port]) for name, port in ports}

    return run


# numpy dtype → tract's fact mnemonic.
TRACT_DTYPES = {"float32": "f32", "float16": "f16", "float64": "f64", "int64": "i64", "int32": "i32", "uint8": "u8", "int8": "i8", "bool": "bool"}


def _graph_output_names(path: str) -> list[str]:
    """The ONNX graph's output names in order, read by onnxruntime (always installed) without optimising."""
    from ..device.session import create_session

    return [o.name for o in create_session(path, threads=1, opt_level="disable").get_outputs()]


def _open_tract(path: str, threads: int) -> Run:
    # tract runs on the calling thread; `threads` has nothing to set.
    import tract

    try:
        model = tract.onnx().load(path)
    except tract.TractError as exc:
        raise RuntimeLoadError(_first_line(exc)) from exc
    inputs = [model.input_name(i) for i in range(model.input_count())]
    # tract names outputs after the node that makes them ("probs/Softmax"); the graph's names are the contract.
    outputs = _graph_output_names(path)
    by_shape: dict[tuple, Any] = {}

    def runnable(feeds: Arrays):
        key = tuple((name, feeds[name].shape, feeds[name].dtype.name) for name in inputs)
        if key not in by_shape:
            fresh = tract.onnx().load(path)
            try:
                for i, (_, shape, dtype) in enumerate(key):
                    fresh.set_input_fact(i, ",".join([*map(str, shape), TRACT_DTYPES[dtype]]))
                by_shape[key] = fresh.into_model().into_runnable()
            except (tract.TractError, KeyError) as exc:
                raise RuntimeLoadError(_first_line(exc)) from exc
        return by_shape[key]

    def run(feeds: Arrays) -> Arrays:
        ready = runnable(feeds)
        try:
            out = ready.run([np.ascontiguousarray(feeds[name]) for name in inputs])
        except tract.TractError as exc:
            raise RuntimeLoadError(_first_line(exc)) from exc
        return {name: t.to_numpy() for name, t in zip(outputs, out)}

    # Loading is typing and optimising for a shape: done on the first run of each shape.
    return run


def _open_onnx_reference(path: str, threads: int) -> Run:
    from onnx.reference import ReferenceEvaluator

    # The evaluator raises whatever its operator implementations raise.
    errors = (RuntimeError, ValueError, TypeError, NotImplementedError, KeyError)
    try:
        evaluator = ReferenceEvaluator(path)
    except errors as exc:
        raise RuntimeLoadError(_first_line(exc)) from exc

    def run(feeds: Arrays) -> Arrays:
        try:
            return dict(zip(evaluator.output_names, evaluator.run(None, feeds)))
        except errors as exc:
            raise RuntimeLoadError(_first_line(exc)) from exc

    return run


RUNTIMES: dict[str, Runtime] = {
    "onnxruntime": Runtime("onnxruntime", "onnxruntime", "onnxruntime", "", _open_onnxruntime),
    "openvino": Runtime("openvino", "openvino", "openvino", "runtimes", _open_openvino),
    "tract": Runtime("tract", "tract", "tract", "runtimes", _open_tract),
    "onnx.reference": Runtime("onnx.reference", "onnx.reference", "onnx", "train", _open_onnx_reference),
}


def runtime(name: str) -> Runtime:
    """The registry entry for `name`, or EdgeRnnError listing the known ones."""
    if name not in RUNTIMES:
        raise EdgeRnnError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def open_runtime(name: str, path: str | os.PathLike[str], *, threads: int = 1) -> Run:
    """run(feeds) → {output: array} of the model file at `path` on runtime `name`; RuntimeLoadError if it cannot load it."""
    return runtime(name).open(str(path), threads)


# BLAS/OpenMP thread counts a measuring child process starts with (it copies the environment at start).
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def thread_env(threads: int) -> Iterator[None]:
    """Set THREAD_ENV to `threads` for the child processes started inside the block, then restore it."""
    saved = {k: os.environ.get(k) for k in THREAD_ENV}
    os.environ.update({k: str(threads) for k in THREAD_ENV})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass(frozen=True)
class ChildResult:
    """What `run_in_child` got: the child's answer, or the exception it raised (its last line: "MemoryError: …"), or
    the exit code it died with, or that it never answered."""

    value: Any = None
    died: int | None = None
    timed_out: bool = False
    error: str | None = None


@dataclass(frozen=True)
class _ChildFailed:
    """Put on the queue in place of an answer when the child's target raised."""

    line: str


def _child_main(target: Callable[..., None], args: tuple, queue) -> None:
    """The child's entry: `target(*args, queue)`, an exception it raises sent back as one line instead of printed as a
    traceback on the user's terminal (EDGE_RNN_DEBUG=1 prints it too)."""
    try:
        target(*args, queue)
    except (Exception, KeyboardInterrupt) as exc:  # MemoryError too; a Ctrl-C reaches the child as well as the parent
        if os.environ.get(DEBUG_ENV):
            import traceback

            traceback.print_exc()
        queue.put(_ChildFailed(_first_line(exc)))


def run_in_child(target: Callable[..., None], args: tuple, *, threads: int, timeout_s: float, poll_s: float = 0.5) -> ChildResult:
    """Run `target(*args, queue)` in a fresh (spawned) process with `threads` BLAS/OpenMP threads and return the
    first thing it puts on `queue` — or how it failed: an exception in the child comes back as `error` (one line, no
    traceback), and a runtime that crashes (tract panics abort a process) or hangs costs its own process, never the
    caller. The child is joined, or killed, before this returns."""
    import multiprocessing
    import queue as queue_mod
    import time

    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    with thread_env(threads):
        proc = ctx.Process(target=_child_main, args=(target, args, q), daemon=True)
        proc.start()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                value = q.get(timeout=poll_s)
            except queue_mod.Empty:
                if not proc.is_alive():
                    return ChildResult(died=proc.exitcode)
                continue
            return ChildResult(error=value.line) if isinstance(value, _ChildFailed) else ChildResult(value=value)
        return ChildResult(timed_out=True)
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
