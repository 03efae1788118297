"""Keep third-party libraries' logs off the user's terminal while bench measures (`bench --verbose` keeps them).

What reached the terminal before: onnxruntime.quantization's warnings through Python's root logger ("Please consider
to run pre-processing", and a tensor's whole protobuf: `elem_type: 9 … dim_param: "unk__535"`), tf2onnx's and
absl's loggers, TensorFlow's C++ log (TF_CPP_MIN_LOG_LEVEL, read when TensorFlow loads, in each measuring child too),
onnxruntime's C++ logger (its default severity, per process) and Python warnings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Iterator

# Read by the libraries when they load, in this process and in the children it spawns (they copy the environment);
# a value the user set is kept.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR", "GLOG_minloglevel": "3"}
# Python loggers of the libraries bench drives, raised to ERROR.
QUIET_LOGGERS = ("", "tf2onnx", "absl", "tensorflow", "onnx", "onnxruntime", "h5py", "keras")
# onnxruntime's severities: 0 verbose, 1 info, 2 warning (its default), 3 error.
ORT_QUIET, ORT_DEFAULT = 3, 2


def _ort_severity(level: int) -> None:
    with contextlib.suppress(ImportError, AttributeError):
        import onnxruntime

        onnxruntime.set_default_logger_severity(level)


@contextlib.contextmanager
def quiet_libraries(enabled: bool = True) -> Iterator[None]:
    """Inside the block, third-party logs and warnings below ERROR are dropped (nothing changes when not `enabled`);
    the environment, loggers and onnxruntime's severity are restored after it."""
    if not enabled:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in QUIET_ENV}
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    saved_levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    _ort_severity(ORT_QUIET)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _ort_severity(ORT_DEFAULT)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def stderr_to(path: str | None) -> Iterator[None]:
    """File descriptor 2 (what C++ libraries write: LiteRT's "Created TensorFlow Lite XNNPACK delegate", onnxruntime's
    and TensorFlow's own logs) into the file `path` for the block, then back; nothing changes for None."""
    if path is None:
        yield
        return
    import sys

    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def last_line(path: str | os.PathLike[str]) -> str:
    """The last non-blank line of a captured stderr file ("" when there is none)."""
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
            return lines[-1] if lines else ""
    return ""
