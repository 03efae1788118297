"""What a bench figure was measured on: the machine, its int8-relevant CPU features, library versions; and the
onnxruntime optimisation levels a bench may ask for. A leaf module, so the budget (device path) and the full
harness both use it without importing each other."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
from typing import Any

from ..device.hostinfo import cpu_features

OPT_LEVELS = ("disable", "basic", "extended", "all")
LIBRARIES = ("numpy", "onnxruntime", "onnx", "tensorflow", "keras", "tf2onnx", "ai-edge-litert", "matplotlib", "openvino", "tract")


def machine_info(*, threads: int) -> dict[str, Any]:
    """CPU model and int8-relevant features, cores, OS, Python and library versions of this machine."""
    features = cpu_features()  # reads /proc/cpuinfo with a cap (device.hostinfo)
    versions = {}
    for lib in LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[lib] = importlib.metadata.version(lib)
    return {
        "cpu": features["model"] or platform.processor() or platform.machine(),
        "cpu_features": features,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "threads": threads,
        "libraries": versions,
    }
