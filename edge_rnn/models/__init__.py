"""One adapter per model kind, found through a registry (no `if kind == …` in the stages).

`adapter_for(manifest)` picks the adapter a folder's manifest names in `adapter`; manifests written
before adapters existed name none, and their model name decides (mnist-lstm, char-rnn).

Workstation side: the adapters import keras, onnx and the training modules inside their methods.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import ModelFileError
from .base import Adapter, Arrays, Exported, Graph

# Adapter name → (module in this package, class): the single truth of the model kinds edge-rnn knows.
ADAPTERS: dict[str, tuple[str, str]] = {
    "keras": ("keras_model", "KerasAdapter"),
    "mnist-lstm": ("mnist_lstm", "MnistLstmAdapter"),
    "char-rnn": ("char_rnn", "CharRnnAdapter"),
}
# Manifests without an `adapter` field (written before adapters): model name → adapter.
LEGACY_MODELS = {"mnist-lstm": "mnist-lstm", "char-rnn": "char-rnn"}


def adapter_for(manifest: dict[str, Any]) -> Adapter:
    """The adapter of a folder's model kind, from its manifest."""
    name = manifest.get("adapter") or LEGACY_MODELS.get(manifest.get("model"))
    if name not in ADAPTERS:
        raise ModelFileError(
            f"manifest of {manifest.get('model')!r} names no known model kind (adapter {manifest.get('adapter')!r}; "
            f"known: {sorted(ADAPTERS)}) — re-export it from its .keras file with edge-rnn export"
        )
    module, cls = ADAPTERS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)()


__all__ = ["ADAPTERS", "Adapter", "Arrays", "Exported", "Graph", "adapter_for"]
