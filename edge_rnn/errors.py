"""The project's error types. Every message is one line: what is wrong, where, and what to do."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from typing import Iterator


class EdgeRnnError(Exception):
    """Base class: the CLI prints the message on one line and exits with code 1."""


class DataError(EdgeRnnError):
    """A data set or text corpus is missing, unreadable or malformed."""


class InputError(EdgeRnnError):
    """An input given to a model (image, array, prime text) is unusable."""


class ModelFileError(EdgeRnnError):
    """A model folder, manifest or model file is missing, corrupt or does not match its manifest."""


class MissingDependencyError(EdgeRnnError):
    """An optional extra (e.g. `[train]`, `[bench]`) is needed for this command but not installed."""


class NonFiniteError(EdgeRnnError):
    """A model's outputs or recurrent state became NaN or Inf (float32 overflowed)."""


# Set to 1 to see the traceback of an exception the CLI would otherwise turn into one line.
DEBUG_ENV = "EDGE_RNN_DEBUG"
# Packages that load, trace, convert and run the models edge-rnn is given: an exception raised inside them
# describes that model (a cycle, an op or a name they do not accept, a shape they cannot infer), not a bug in
# edge-rnn's own code.
MODEL_LIBRARIES = ("onnxruntime", "onnx", "tf2onnx", "keras", "tensorflow")
# Lines of a library's message that wrap the cause rather than state it (TensorFlow's "in user code:" and its
# frames, Keras's "Exception encountered when calling …" and its argument list), and terminal styling in it.
_WRAPPER_LINES = re.compile(r"in user code:|File \"|.*Exception encountered when calling|Arguments received by|•")
_STYLING = re.compile(r"\x1b\[[0-9;]*m")


def _summary(exc: BaseException) -> str:
    """"TypeName: the line of the message that states the cause": the first past any wrapper lines (and the source
    line each quoted frame is followed by)."""
    lines = [line.strip() for line in _STYLING.sub("", str(exc)).splitlines() if line.strip()]
    causes = [line for i, line in enumerate(lines)
              if not _WRAPPER_LINES.match(line) and not (i and lines[i - 1].startswith('File "'))]
    cause = causes[0] if causes else lines[0] if lines else ""
    return f"{type(exc).__name__}: {cause[:300]}" if cause else type(exc).__name__


def _library(module: str) -> str | None:
    """'onnxruntime.quantization.onnx_model' → 'onnxruntime.quantization'; None outside MODEL_LIBRARIES."""
    parts = module.split(".")
    if parts[0] not in MODEL_LIBRARIES:
        return None
    public = len(parts) > 1 and not parts[1].startswith("_") and parts[1] not in ("capi", "onnx_cpp2py_export", "src", "python")
    return ".".join(parts[:2]) if public else parts[0]


def _raised_in(exc: BaseException) -> str | None:
    """The model library an exception comes from: its class's module, else the innermost frame of its traceback in a
    model library or in edge_rnn (frames of numpy, the standard library and the like are passed over)."""
    library = _library(type(exc).__module__)
    if library is not None:
        return library
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_globals.get("__name__", ""))
        tb = tb.tb_next
    for module in reversed(frames):
        if module == "edge_rnn" or module.startswith("edge_rnn."):
            return None
        library = _library(module)
        if library is not None:
            return library
    return None


def escaped_error(exc: BaseException) -> EdgeRnnError | None:
    """The one-line EdgeRnnError an exception that escaped the library stands for: running out of memory, nesting
    too deep, an operating-system error, or a model library failing on a model; None for anything else (a bug in
    edge-rnn, whose traceback is what to report)."""
    debug = f"set {DEBUG_ENV}=1 to see the traceback"
    if isinstance(exc, MemoryError):
        detail = f" ({str(exc).splitlines()[0][:200]})" if str(exc).strip() else ""
        return EdgeRnnError(f"out of memory{detail} — the model or its input asks for more than this machine has; "
                            f"give a smaller input or batch ({debug})")
    if isinstance(exc, RecursionError):
        return EdgeRnnError(f"a file nests structures too deeply to process (RecursionError) — not one edge-rnn wrote ({debug})")
    if isinstance(exc, OSError):
        path = exc.filename2 if exc.filename2 is not None else exc.filename
        reason = exc.strerror or _summary(exc)
        return EdgeRnnError(f"{path}: {reason}" if path is not None else f"{reason} (OSError)")
    library = _raised_in(exc)
    if library is not None:
        return EdgeRnnError(f"{library} failed on this model: {_summary(exc)} ({debug})")
    return None


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: TensorFlow's C++ start-up lines (CUDA probes, oneDNN notes)
    are printed before absl logging is configured, so TF_CPP_MIN_LOG_LEVEL cannot silence them."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# Heavy imports whose native start-up chatter is hidden; their Python exceptions still propagate.
_NOISY = ("tensorflow", "keras", "tf2onnx")


def require(module: str, extra: str):
    """Import `module` or raise MissingDependencyError naming the pip extra that provides it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if module in sys.modules:
        return sys.modules[module]
    quiet = module.split(".")[0] in _NOISY and "tensorflow" not in sys.modules
    try:
        with _quiet_native_stderr() if quiet else contextlib.nullcontext():
            return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is not installed ({exc}); install it with: pip install 'edge-rnn[{extra}]'"
        ) from exc
