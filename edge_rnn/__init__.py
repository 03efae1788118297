"""edge-rnn: take recurrent neural networks from training to edge devices.

Importing the package is cheap and TensorFlow-free; training and export import TensorFlow lazily.
"""

from .errors import DataError, EdgeRnnError, InputError, MissingDependencyError, ModelFileError

__version__ = "0.2.0"

__all__ = [
    "DataError",
    "EdgeRnnError",
    "InputError",
    "MissingDependencyError",
    "ModelFileError",
    "__version__",
]
