"""The project's error types. Every message is one line: what is wrong, where, and what to do."""

from __future__ import annotations

import contextlib
import importlib
import os
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
