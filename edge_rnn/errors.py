"""The project's error types. Every message is one line: what is wrong, where, and what to do."""

from __future__ import annotations


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


def require(module: str, extra: str):
    """Import `module` or raise MissingDependencyError naming the pip extra that provides it."""
    import importlib
    import os

    # TensorFlow's C++ start-up chatter (CUDA probes, CPU flags) is noise on a CLI: keep errors only.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is not installed ({exc}); install it with: pip install 'edge-rnn[{extra}]'"
        ) from exc
