"""edge-rnn: take recurrent neural networks from training to edge devices.

Importing the package is cheap and TensorFlow-free; training and export import TensorFlow lazily. The device API
(`edge_rnn.load`, `Model`, `Stream`: edge_rnn/device/api.py) is imported on first use, so onnxruntime is loaded
only by a program that runs a model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import DataError, EdgeRnnError, InputError, MissingDependencyError, ModelFileError

if TYPE_CHECKING:
    from .device.api import Model, Stream, TensorInfo, load, load_stream

__version__ = "0.2.0"

# Names served by edge_rnn.device.api, imported when first asked for (PEP 562).
_API = ("load", "load_stream", "Model", "Stream", "TensorInfo")

__all__ = [
    "DataError",
    "EdgeRnnError",
    "InputError",
    "MissingDependencyError",
    "Model",
    "ModelFileError",
    "Stream",
    "TensorInfo",
    "__version__",
    "load",
    "load_stream",
]


def __getattr__(name: str) -> Any:
    if name in _API:
        from .device import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'edge_rnn' has no attribute {name!r}")
