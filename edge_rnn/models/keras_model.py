"""The adapter for any Keras 3 model: safe loading, fused-op export with a step model, Keras as the reference.

Loading refuses what could run code: a `.keras` file's config is read first (it is a zip holding
`config.json`) and a `Lambda` layer or a class from a module outside Keras is refused by its layer name;
then `keras.saving.load_model(safe_mode=True)` loads it. HDF5 (`.h5`) files are refused unless the user
says they trust them: the legacy HDF5 loader ignores `safe_mode` and rebuilds a `Lambda` layer from its
pickled Python bytecode, so loading one runs code from the file.

Export: `keras_onnx.convert` (fused LSTM/GRU/RNN, never Loop) for the whole-sequence model and, where the
model streams, the step model. A layer the converter refuses sends the whole model through tf2onnx
(which may emit Loop) and the audit says so, unless the caller forbids loops.

Workstation side: imports keras and onnx inside functions.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import EdgeRnnError, ModelFileError, require
from ..tolerances import KERAS_ONNX_ATOL, KERAS_ONNX_RTOL, STEP_SEQUENCE_ATOL
from .base import Adapter, Arrays, Exported, Graph, load_npy

KERAS_FILE = "model.keras"
ONNX_FILE = "model.onnx"
STEP_FILE = "model.step.onnx"
HDF5_SUFFIXES = (".h5", ".hdf5")
RECURRENT_LAYERS = ("LSTM", "GRU", "SimpleRNN")
# Rows of a validation batch get these fractions of the time axis as their unpadded length (at least 1):
# a full row, a partial one, a short one and a single step, so masking is exercised where the model masks.
PADDED_LENGTHS = (1.0, 2 / 3, 1 / 3, 0.0)
# Modules whose classes a safe .keras file may name (Keras itself, and Python's builtins for tuples and the like).
SAFE_MODULE_PREFIXES = ("keras", "builtins")


# ---------------------------------------------------------------------------------------------------
# Loading

def _unsafe_layers(config: Any) -> list[str]:
    """`name (class)` of every Lambda layer or foreign-module object in a .keras config tree."""
    found = []
    if isinstance(config, dict):
        cls, module = config.get("class_name"), config.get("module")
        inner = config.get("config")
        name = inner.get("name", cls) if isinstance(inner, dict) else cls
        if cls == "Lambda":
            found.append(f"{name!r} (Lambda: runs Python code stored in the file)")
        elif isinstance(module, str) and not module.startswith(SAFE_MODULE_PREFIXES):
            found.append(f"{name!r} ({cls} from module {module!r}, not Keras)")
        for value in config.values():
            found += _unsafe_layers(value)
    elif isinstance(config, list):
        for value in config:
            found += _unsafe_layers(value)
    return found


def load_keras_file(path: str | os.PathLike[str], *, trust_h5: bool = False):
    """A Keras model from a .keras file (safe_mode, Lambda and foreign classes refused) or, if trusted, an .h5 file."""
    keras = require("keras", "train")
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no file {path} — give a .keras model file or a model folder")
    suffix = path.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        if not trust_h5:
            raise ModelFileError(
                f"{path} is an HDF5 file, whose loader can run code stored in it (Lambda layers are pickled bytecode) — "
                "re-save it as .keras, or pass --trust-h5 if you trust where it came from"
            )
        return _load(keras, path, safe_mode=False)
    if suffix != ".keras" or not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path} is not a Keras model file (a .keras zip or a trusted .h5) — save it with model.save('x.keras')")
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelFileError(f"{path} is not a Keras model file (no readable config.json: {exc}) — save it with model.save('x.keras')") from exc
    unsafe = _unsafe_layers(config)
    if unsafe:
        raise ModelFileError(
            f"{path}: layer {unsafe[0]} is refused for safety — rebuild the model from Keras layers only"
        )
    return _load(keras, path, safe_mode=True)


def _load(keras, path: Path, *, safe_mode: bool):
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFileError(f"cannot load {path} as a Keras model ({first})") from exc


# ---------------------------------------------------------------------------------------------------
# What a model's inputs look like, recorded at export so that later stages need no Keras

def _layers(model) -> list:
    return list(model._flatten_layers(include_self=False, recursive=True))


def describe_inputs(keras_model, io: dict[str, Any], masking: list[dict]) -> dict[str, dict]:
    """Per input name: how to make realistic values (ids within every Embedding's vocabulary, floats ~N(0, 1))
    and whether rows must be post-padded (the input is masked)."""
    vocab = [layer.input_dim for layer in _layers(keras_model) if type(layer).__name__ == "Embedding"]
    masks = {m["input"]: m for m in masking}
    described = {}
    for spec in io["inputs"]:
        mask = masks.get(spec["name"])
        if np.issubdtype(np.dtype(spec["dtype"]), np.integer):
            # Id 0 is the padding id under mask_zero, so real ids start at 1 there.
            entry: dict[str, Any] = {"kind": "ids", "low": 1 if mask else 0, "high": min(vocab) if vocab else 2}
        else:
            entry = {"kind": "normal", "mean": 0.0, "std": 1.0}
        if mask:
            entry["padding"] = mask["value"]
        described[spec["name"]] = entry
    return described


def _activation_name(fn: Any) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return str(name).lower()


def final_activation(layer: Any, tensor_index: int = 0) -> str:
    """The activation an output ends in: its layer's (Dense, Activation, Softmax, TimeDistributed(Dense)), 'linear'
    for a recurrent layer's extra state outputs and for layers without one."""
    cls = type(layer).__name__
    if tensor_index:
        return "linear"
    if cls == "TimeDistributed":
        return final_activation(layer.layer)
    if cls == "Softmax":
        return "softmax"
    fn = getattr(layer, "activation", None)
    return _activation_name(fn) if fn is not None else "linear"


def output_activations(keras_model, io: dict[str, Any]) -> dict[str, str]:
    """{output name: the activation its layer ends in} for the model's outputs, which says how `evaluate` scores
    each (softmax → accuracy, sigmoid → accuracy at 0.5, anything else → regression errors)."""
    names = [spec["name"] for spec in io["outputs"]]
    found = {}
    for kt, name in zip(keras_model.outputs, names):
        operation, _, tensor_index = kt._keras_history
        found[name] = final_activation(operation, tensor_index)
    return found


def _lengths(batch: int, time_steps: int) -> list[int]:
    return [max(1, round(time_steps * PADDED_LENGTHS[row % len(PADDED_LENGTHS)])) for row in range(batch)]


def make_inputs(specs: list[dict], described: dict[str, dict], *, batch: int, time_steps: int, seed: int,
                temporal: set[str], padded: bool) -> Arrays:
    """Arrays for `specs` as `described`: symbolic dims → batch / time_steps; the time axis of the
    inputs in `temporal` is `time_steps` long; masked inputs are post-padded when `padded`."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        shape = []
        for axis, d in enumerate(spec["shape"]):
            if axis == 0:
                shape.append(batch)
            elif axis == 1 and spec["name"] in temporal:
                shape.append(time_steps)
            else:
                shape.append(d if isinstance(d, int) else 1)
        how = described.get(spec["name"], {"kind": "normal", "mean": 0.0, "std": 1.0})
        if how["kind"] == "ids":
            x = rng.integers(how["low"], how["high"], shape).astype(spec["dtype"])
        else:
            x = (how["mean"] + how["std"] * rng.standard_normal(shape)).astype(spec["dtype"])
        if padded and "padding" in how and spec["name"] in temporal:
            for row, n in enumerate(_lengths(batch, shape[1])):
                x[row, n:] = how["padding"]
        out[spec["name"]] = x
    return out


def temporal_inputs(manifest: dict[str, Any]) -> set[str]:
    """Inputs with a time axis: a symbolic "time" dim in io, or time length 1 in the step model."""
    names = {s["name"] for s in manifest["io"]["inputs"] if len(s["shape"]) > 1 and s["shape"][1] == "time"}
    step = manifest.get("step", {})
    names |= {s["name"] for s in step.get("inputs", []) if len(s["shape"]) > 1 and s["shape"][1] == 1}
    return names


def fixed_time_steps(manifest: dict[str, Any]) -> int | None:
    """The length of the time axis where the whole-sequence model fixes it (e.g. Input((28, 28))), else None."""
    temporal = temporal_inputs(manifest)
    fixed = [s["shape"][1] for s in manifest["io"]["inputs"] if s["name"] in temporal and isinstance(s["shape"][1], int)]
    return min(fixed) if fixed else None


# ---------------------------------------------------------------------------------------------------
# Export

def _keras_io(keras_model) -> dict[str, Any]:
    """io block for the tf2onnx path, named and shaped as keras_onnx names them."""
    from ..export.keras_onnx import _sanitise, output_names

    def dims(kt) -> list:
        return ["batch" if a == 0 else ("time" if a == 1 else f"dim{a}") if d is None else int(d) for a, d in enumerate(kt.shape)]

    inputs = [{"name": _sanitise(kt._keras_history.operation.name), "dtype": str(kt.dtype), "shape": dims(kt)}
              for kt in keras_model.inputs]
    outputs = [{"name": name, "dtype": str(kt.dtype), "shape": dims(kt)}
               for kt, name in zip(keras_model.outputs, output_names(keras_model.outputs))]
    return {"inputs": inputs, "outputs": outputs}


def _state_from_a_layer(keras_model) -> str | None:
    """Why no step model can stand for the whole model: a recurrent layer starts from another layer's final
    state (an encoder–decoder), which the step model would replace by zeros. None when there is none."""
    from ..export.keras_onnx import _functional

    graph = _functional(keras_model)
    inputs = {id(kt) for kt in graph.inputs}
    for nodes in graph._nodes_by_depth.values():
        for node in nodes:
            layer = node.operation
            initial = node.arguments.kwargs.get("initial_state") if layer is not None else None
            if initial is None:
                continue
            initial = initial if isinstance(initial, (list, tuple)) else [initial]
            sources = [kt._keras_history.operation.name for kt in initial if id(kt) not in inputs]
            if sources:
                return (f"layer {layer.name!r} ({type(layer).__name__}) starts from the final state of {sources[0]!r}, "
                        "which needs that layer's whole sequence — run the whole-sequence model")
    return None


def _fallback(keras_model, refused, *, opset: int) -> Exported:
    """The whole model through tf2onnx (the graph cleanup after it), with an audit that says so."""
    from ..export.tf2onnx_fallback import keras_to_onnx
    from ..export.optimize import clean_recurrent_graph

    io = _keras_io(keras_model)
    model, _ = clean_recurrent_graph(keras_to_onnx(keras_model, io=io, opset=opset))
    why = f"keras_onnx refused {refused}"
    audit = [{"layer": kt._keras_history.operation.name, "cls": "InputLayer", "onnx_ops": [], "fused": False, "note": "graph input"}
             for kt in keras_model.inputs]
    for layer in _layers(keras_model):
        if type(layer).__name__ == "InputLayer":
            continue
        note = "converted by tf2onnx: may contain Loop"
        if layer.name == refused.layer:
            note += f" ({why})"
        audit.append({"layer": layer.name, "cls": type(layer).__name__, "onnx_ops": [], "fused": False, "note": note})
    # tf2onnx's node names do not map back to layers reliably, so its graph is audited as one entry.
    ops = [node.op_type for node in model.graph.node]
    loops = {op: ops.count(op) for op in ("Loop", "Scan") if op in ops}
    audit.append({"layer": "(whole model)", "cls": "tf2onnx", "onnx_ops": ops, "fused": False,
                  "note": (f"holds {', '.join(f'{op}×{n}' for op, n in loops.items())}: onnxruntime runs each time step "
                           "through its graph executor, and quantize_dynamic cannot make a Loop's weights int8")
                  if loops else "no Loop: tf2onnx fused every recurrent layer"})
    fields = {
        "io": io,
        "masking": [],
        "audit": audit,
        "step_refused": f"layer {refused.layer!r} ({refused.cls}) was converted by tf2onnx, which makes no step model",
    }
    return Exported([Graph("onnx", ONNX_FILE, model)], fields, [f"tf2onnx fallback for the whole model: {why}"])


class KerasAdapter(Adapter):
    """Any Keras 3 Sequential or functional model (see the module docstring)."""

    name = "keras"
    source_roles = ("keras",)
    source_kind = "keras"

    def load(self, model_dir: Path, manifest: dict[str, Any]):
        from ..device.manifest import verified_file

        return load_keras_file(verified_file(manifest, model_dir, "keras"))

    def export(self, source, manifest: dict[str, Any], *, opset: int, fail_on_loop: bool = False) -> Exported:
        from ..export.keras_onnx import NotStreamableError, UnsupportedLayerError, convert
        from ..train.lstm import versions

        try:
            conversion = convert(source, opset=opset)
        except UnsupportedLayerError as exc:
            if fail_on_loop:
                raise EdgeRnnError(f"{exc} (--fail-on-loop forbids the tf2onnx fallback, which may emit Loop)") from exc
            exported = _fallback(source, exc, opset=opset)
        else:
            fields: dict[str, Any] = {
                "io": conversion.io,
                "masking": conversion.masking,
                "audit": [asdict(a) for a in conversion.audit],
            }
            exported = Exported([Graph("onnx", ONNX_FILE, conversion.model)], fields)
            reason = _state_from_a_layer(source)
            if reason is None:
                try:
                    stepper = convert(source, opset=opset, step=True)
                except (NotStreamableError, UnsupportedLayerError) as exc:
                    reason = str(exc)
                else:
                    state_names = {s["input"] for s in stepper.state} | {s["output"] for s in stepper.state}
                    fields["step"] = {
                        "inputs": [s for s in stepper.io["inputs"] if s["name"] not in state_names],
                        "outputs": [s for s in stepper.io["outputs"] if s["name"] not in state_names],
                        "state": stepper.state,
                    }
                    exported.graphs.append(Graph("onnx_step", STEP_FILE, stepper.model))
            if reason is not None:
                fields["step_refused"] = reason.splitlines()[0]
        exported.fields["sample_inputs"] = describe_inputs(source, exported.fields["io"], exported.fields["masking"])
        exported.fields["output_activations"] = output_activations(source, exported.fields["io"])
        exported.fields["versions"] = versions()
        return exported

    def sample_inputs(self, manifest: dict[str, Any], *, batch: int, time_steps: int, seed: int) -> Arrays:
        # A fixed time axis keeps its length whatever `time_steps` asks for: the graph accepts no other.
        time_steps = fixed_time_steps(manifest) or time_steps
        return make_inputs(manifest["io"]["inputs"], manifest.get("sample_inputs", {}), batch=batch, time_steps=time_steps,
                           seed=seed, temporal=temporal_inputs(manifest), padded=True)

    def stream_inputs(self, manifest: dict[str, Any], *, steps: int, seed: int) -> Arrays:
        # One unpadded stream: a device feeds real steps, not padding.
        return make_inputs(manifest["step"]["inputs"], manifest.get("sample_inputs", {}), batch=1, time_steps=steps,
                           seed=seed, temporal=temporal_inputs(manifest), padded=False)

    def reference(self, source, inputs: Arrays, *, io: dict[str, Any]) -> Arrays:
        from ..export.keras_onnx import _sanitise

        keras = require("keras", "train")
        batch = len(next(iter(inputs.values())))
        args = []
        for kt in source.inputs:
            name = _sanitise(kt._keras_history.operation.name)
            # An input no output depends on is not in the graph; Keras still wants a value for it.
            shape = [batch, *[1 if d is None else d for d in kt.shape[1:]]]
            args.append(inputs[name] if name in inputs else np.zeros(shape, kt.dtype))
        out = source(args[0] if len(args) == 1 else args, training=False)
        out = out if isinstance(out, (list, tuple)) else [out]
        names = [spec["name"] for spec in io["outputs"]]
        return {name: np.asarray(keras.ops.convert_to_numpy(o)) for name, o in zip(names, out)}

    def tolerance(self, output: str, reference: npt.NDArray, *, stepped: bool) -> tuple[float, str]:
        # Outputs of scale ~1 get the absolute tolerance; larger ones (a regression target ~10²) the relative one.
        scale = float(np.max(np.abs(reference))) if reference.size else 0.0
        atol = max(KERAS_ONNX_ATOL, KERAS_ONNX_RTOL * scale)
        text = (f"atol {KERAS_ONNX_ATOL:g}" if atol == KERAS_ONNX_ATOL
                else f"rtol {KERAS_ONNX_RTOL:g} × max|ref| {scale:.3g} = {atol:.3g}")
        if stepped:
            # Step vs Keras = (step vs sequence, same kernels) + (sequence vs Keras): the sum bounds it.
            atol += STEP_SEQUENCE_ATOL
            text += f" + step {STEP_SEQUENCE_ATOL:g}"
        return atol, text

    def calibration_feeds(self, model_dir: Path, manifest: dict[str, Any], fp32_path: Path, *, samples: int, batch: int,
                          data: dict[str, str] | None = None) -> list[Arrays]:
        specs = manifest["io"]["inputs"]
        if not data:
            raise EdgeRnnError(
                f"int8-static needs calibration data for {manifest['model']}: --calibration-data FILE.npy "
                f"(or NAME=FILE.npy for each of {[s['name'] for s in specs]}), real inputs shaped like the model's"
            )
        if set(data) == {""} and len(specs) == 1:
            data = {specs[0]["name"]: data[""]}
        missing = [s["name"] for s in specs if s["name"] not in data]
        unknown = sorted(set(data) - {s["name"] for s in specs})
        if missing or unknown:
            raise EdgeRnnError(f"--calibration-data: the model's inputs are {[s['name'] for s in specs]}; "
                               f"missing {missing}, unknown {unknown} — give NAME=FILE.npy for each input")
        arrays = {}
        for spec in specs:
            x = load_npy(data[spec["name"]], what=f"calibration data for {spec['name']!r}")
            fixed = [(a, d) for a, d in enumerate(spec["shape"]) if isinstance(d, int)]
            if x.ndim != len(spec["shape"]) or any(x.shape[a] != d for a, d in fixed):
                raise EdgeRnnError(f"calibration data for {spec['name']!r} has shape {x.shape}, the model takes {spec['shape']}")
            integer = np.issubdtype(np.dtype(spec["dtype"]), np.integer)
            if integer != np.issubdtype(x.dtype, np.integer):
                raise EdgeRnnError(f"calibration data for {spec['name']!r} is {x.dtype}, the model takes {spec['dtype']}")
            arrays[spec["name"]] = x[:samples].astype(spec["dtype"])
        counts = {len(x) for x in arrays.values()}
        if len(counts) != 1:
            raise EdgeRnnError(f"calibration arrays have different numbers of samples: { {k: len(v) for k, v in arrays.items()} }")
        n = counts.pop()
        return [{k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, n, batch)]
