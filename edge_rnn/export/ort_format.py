"""ORT format: onnxruntime's own model files for minimal builds, and the operator config such a build takes.

Workstation side. The conversion is onnxruntime's `convert_onnx_models_to_ort` tool, run as `python -m` in a
child process (its optimisation level is read from an environment variable, which a library must not set in
its caller's process; its progress lines are kept and shown only when it fails). The config is written by the
same tool's `create_config_from_models`, with operator types (`--enable_type_reduction`).

Optimisation level: **basic**, recorded as `ORT_OPTIMIZATION` in the manifest's `ort` block. A `.ort` file
keeps the graph as optimised at conversion; a full onnxruntime build does not optimise it again at load, and a
minimal build cannot. onnxruntime's levels, for a file that must run on any CPU:
- basic: constant folding, redundant-node removal and fusions that only produce standard ONNX operators — a
  valid ONNX graph with no tie to a CPU or execution provider (onnxruntime's ORT-format guide: "basic
  optimizations are semantics-preserving and result in a valid ONNX graph … should be baked in");
- extended: fusions into `com.microsoft` contrib kernels, assigned at conversion to the CPU execution provider
  of the machine converting (a reduced build then needs those contrib kernels, and an NNAPI/CoreML/XNNPACK
  device cannot take the fused nodes);
- layout / all: NCHWc layout transforms whose block size follows the converting CPU's vector width — the
  hardware-specific level onnxruntime warns about for saved files.
Measured on mnist-lstm and the char RNN: extended (and all) turn Gemm+Relu into `FusedGemm` and the int8
DynamicQuantizeLinear→MatMulInteger→Cast→Mul chain into `DynamicQuantizeMatMul`, both `com.microsoft`; basic
keeps ONNX operators only (plus the `DynamicQuantizeLSTM` the int8 file already holds), and its `.ort` files
answer exactly as the `.onnx` files do on a full build (max |Δ| 0; tests/test_ort_format.py).

Layout written into `out_dir`: `<stem>.ort` per converted model and one `required_operators.config` covering
every `.ort` file in `out_dir` (so converting several variants into one folder gives the one config a reduced
build of that folder needs). In a model folder, `add_ort` lists each `.ort` under `<role>_ort` (e.g.
`onnx_int8_ort`, verified by sha256 like any member; its I/O is checked as its source role's), the config under
`ort_config`, and `ort: {"optimization": "basic", "onnxruntime": "<version>", "config": "required_operators.config"}`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ..device.manifest import (
    QUANTIZED_VARIANTS, atomic_path, folder_lock, load_manifest, missing_role, record_file, save_manifest, verified_file,
)
from ..errors import EdgeRnnError, ModelFileError

ORT_OPTIMIZATION = "basic"
CONFIG_NAME = "required_operators.config"
ORT_ROLE_SUFFIX = "_ort"
CONFIG_ROLE = "ort_config"
# The tool's own variable for its optimisation level (it has no flag for it).
_LEVEL_VARIABLE = "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"


def ort_info() -> dict[str, Any]:
    """The manifest's `ort` block: optimisation level, the onnxruntime that converted, the config's name."""
    import onnxruntime

    return {"optimization": ORT_OPTIMIZATION, "onnxruntime": onnxruntime.__version__, "config": CONFIG_NAME}


def to_ort(model_path: Path, out_dir: Path) -> tuple[Path, Path]:
    """MODEL.onnx → (out_dir/<stem>.ort at ORT_OPTIMIZATION, out_dir/required_operators.config for every .ort there)."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    if not model_path.is_file() or model_path.suffix != ".onnx":
        raise ModelFileError(f"no ONNX model {model_path} to convert to ORT format — export it first")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{model_path.stem}.ort"
    with tempfile.TemporaryDirectory(prefix=".ort-", dir=out_dir) as tmp:
        argv = [
            sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort",
            "--optimization_style", "Fixed", "--output_dir", tmp, str(model_path.resolve()),
        ]
        result = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, _LEVEL_VARIABLE: ORT_OPTIMIZATION})
        # The tool names its output after the level (model.basic.ort); exactly one .ort is expected.
        made = sorted(Path(tmp).glob("*.ort"))
        if result.returncode != 0 or len(made) != 1:
            last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
            raise ModelFileError(f"onnxruntime could not convert {model_path} to ORT format: {last}")
        with atomic_path(target) as tmp_target:
            os.replace(made[0], tmp_target)
    return target, write_config(out_dir)


def write_config(out_dir: Path) -> Path:
    """out_dir/required_operators.config: the operators and their types of every .ort file in out_dir."""
    import logging

    from onnxruntime.tools.ort_format_model import create_config_from_models

    # The tool's logger says "Created config in …" at INFO for every call.
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    models = sorted(Path(out_dir).glob("*.ort"))
    if not models:
        raise ModelFileError(f"no .ort file in {out_dir} to describe — convert a model first")
    config = Path(out_dir) / CONFIG_NAME
    with atomic_path(config) as tmp:
        create_config_from_models(models, tmp, enable_type_reduction=True)
        # The tool heads the file with the models' absolute paths; keep their names only (no workstation paths).
        lines = tmp.read_text(encoding="utf-8").splitlines()
        lines = [f"# - {Path(line[4:]).name}" if line.startswith("# - ") else line for line in lines]
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


def _variant_of(role: str) -> str:
    """'onnx' / 'onnx_step' → 'fp32'; 'onnx_int8_static' / 'onnx_step_int8_static' → 'int8-static'."""
    rest = role.removeprefix("onnx").removeprefix("_step").removeprefix("_")
    return rest.replace("_", "-") or "fp32"


def variant_roles(manifest: dict[str, Any], variants: Sequence[str] = (), *, model_dir: str | os.PathLike[str] = "DIR") -> list[str]:
    """The ONNX roles of `variants` (fp32, int8, fp16, int8-static…; each with its step twin), or every ONNX file."""
    files = manifest.get("files", {})
    onnx_roles = [r for r, e in files.items() if isinstance(e, dict) and str(e.get("path", "")).endswith(".onnx")]
    if not variants:
        return onnx_roles
    roles = []
    for variant in variants:
        suffix = "" if variant == "fp32" else "_" + variant.replace("-", "_")
        found = [r for r in (f"onnx{suffix}", f"onnx_step{suffix}") if r in onnx_roles]
        if not found:
            present = ", ".join(dict.fromkeys(_variant_of(r) for r in onnx_roles)) or "none"
            if variant in QUANTIZED_VARIANTS:
                raise EdgeRnnError(f"{model_dir} has no {variant} model yet (it has: {present}) — make it with "
                                   f"`edge-rnn quantize {model_dir} --variant {variant}`, then run ort again")
            raise EdgeRnnError(f"no variant {variant!r} in {model_dir} — it has: {present} (give one of these to --variant)")
        roles += found
    return roles


def add_ort(model_dir: str | os.PathLike[str], *, variants: Sequence[str] = ()) -> dict[str, str]:
    """Convert the folder's ONNX files of `variants` (all by default) to `.ort` beside them and list them in the
    manifest (`<role>_ort`, `ort_config`, `ort`); returns {new role: file name}."""
    model_dir = Path(model_dir)
    with folder_lock(model_dir):  # no other writer between reading the manifest and saving it
        manifest = load_manifest(model_dir)
        written = {}
        roles = variant_roles(manifest, variants, model_dir=model_dir)
        if not roles:  # a folder trained but never exported
            raise missing_role(manifest, model_dir, "onnx")
        for role in roles:
            ort_path, config = to_ort(verified_file(manifest, model_dir, role), model_dir)
            record_file(manifest, model_dir, role + ORT_ROLE_SUFFIX, ort_path.name)
            written[role + ORT_ROLE_SUFFIX] = ort_path.name
        record_file(manifest, model_dir, CONFIG_ROLE, config.name)
        written[CONFIG_ROLE] = config.name
        manifest["ort"] = ort_info()
        save_manifest(model_dir, manifest)
    return written
