"""What this CPU can do for int8: the features that decide which onnxruntime kernels run.

Device path: standard library only. Timings and int8 rounding differ between hosts (MLAS picks AVX2,
AVX-512, VNNI or AMX kernels on x86-64 and dot-product or i8mm kernels on arm64), so every benchmark
and every quantization record names the features of the host it came from.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

CPUINFO = Path("/proc/cpuinfo")
# /proc/cpuinfo repeats one ~1.5 KB block per core (~400 KB on 256 cores); the first block holds what is read from
# it, so the read stops here whatever the kernel (or a bind mount over it) serves.
MAX_CPUINFO_BYTES = 4 * 1024 * 1024
# x86-64 flags, in /proc/cpuinfo spelling, that change MLAS's float and integer GEMM kernels.
X86_FEATURES = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")
# arm64 (aarch64) hwcaps: dot product (asimddp) and int8 matrix multiply (i8mm) speed up int8 GEMMs.
ARM_FEATURES = ("asimd", "asimddp", "i8mm", "bf16", "sve", "sve2")


def _cpuinfo_fields(text: str) -> tuple[str, set[str]]:
    """(model name, feature flags) from /proc/cpuinfo text; x86 says `flags`, arm64 says `Features`."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def int8_path(arch: str, flags: set[str]) -> str:
    """The widest integer dot-product path the CPU offers (what decides int8 speed and rounding)."""
    if arch in ("x86_64", "amd64", "i686"):
        for flag, name in (("amx_int8", "amx"), ("avx512_vnni", "avx512-vnni"), ("avx_vnni", "avx-vnni"), ("avx512bw", "avx512"), ("avx2", "avx2")):
            if flag in flags:
                return name
        return "sse"
    if arch in ("aarch64", "arm64"):
        for flag, name in (("i8mm", "arm-i8mm"), ("asimddp", "arm-dotprod"), ("asimd", "arm-neon")):
            if flag in flags:
                return name
    return "generic"


def cpu_features(cpuinfo: str | None = None) -> dict[str, Any]:
    """{"arch", "model", "cores", "features": [flags that matter, present ones only], "int8_path"} of this host."""
    if cpuinfo is None:
        cpuinfo = ""
        with contextlib.suppress(OSError), open(CPUINFO, "rb") as f:
            cpuinfo = f.read(MAX_CPUINFO_BYTES).decode("utf-8", errors="replace")
    arch = platform.machine().lower()
    model, flags = _cpuinfo_fields(cpuinfo)
    wanted = ARM_FEATURES if arch in ("aarch64", "arm64") else X86_FEATURES
    return {
        "arch": arch,
        "model": model or platform.processor() or arch,
        "cores": os.cpu_count(),
        "features": [f for f in wanted if f in flags],
        "int8_path": int8_path(arch, flags),
    }


def describe(features: dict[str, Any]) -> str:
    """One line for terminals and READMEs: model, cores, int8 path and flags."""
    return f"{features['model']} ({features['arch']}, {features['cores']} cores; int8 path {features['int8_path']}; {' '.join(features['features']) or 'no SIMD flags read'})"
