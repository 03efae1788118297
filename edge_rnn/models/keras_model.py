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

import contextlib
import math
import os
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import numpy.typing as npt

from ..config import MAX_KERAS_ARCHIVE_BYTES, MAX_KERAS_CONFIG_BYTES, MAX_KERAS_MEMBERS, MAX_MODEL_WEIGHT_BYTES
from ..device.bounded import check_member_sizes, open_regular, open_zip, parse_json_bounded, read_member, size_text
from ..errors import EdgeRnnError, ModelFileError, require
from ..tolerances import KERAS_ONNX_ATOL, KERAS_ONNX_RTOL, STEP_SEQUENCE_ATOL
from .base import Adapter, Arrays, Exported, Graph, load_npy

KERAS_FILE = "model.keras"
ONNX_FILE = "model.onnx"
STEP_FILE = "model.step.onnx"
HDF5_SUFFIXES = (".h5", ".hdf5")
RECURRENT_LAYERS = ("LSTM", "GRU", "SimpleRNN")
# Weight matrices per recurrent layer (its cell's gates), for the weight estimate made from a config.
RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "SimpleRNN": 1}
WEIGHTS_H5 = "model.weights.h5"
WEIGHTS_NPZ = "model.weights.npz"
_KERAS_HINT = "save it with model.save('x.keras')"
# Rows of a validation batch get these fractions of the time axis as their unpadded length (at least 1):
# a full row, a partial one, a short one and a single step, so masking is exercised where the model masks.
PADDED_LENGTHS = (1.0, 2 / 3, 1 / 3, 0.0)
# Modules whose classes a safe .keras file may name (Keras itself, and Python's builtins for tuples and the like).
SAFE_MODULE_PREFIXES = ("keras", "builtins")
# The packages keras.saving imports a class's module from (keras/src/saving/serialization_lib.py).
KERAS_PACKAGES = ("keras", "keras_hub", "keras_cv", "keras_nlp")


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


def _objects(config: Any) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(layer name, class name, the whole entry) of every serialized Keras object in a config tree, walked without
    recursion (the tree is bounded in depth by the JSON reader, but a walk need not rely on that)."""
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            cls, inner = node.get("class_name"), node.get("config")
            if isinstance(cls, str) and isinstance(inner, dict):
                name = inner.get("name", node.get("name", cls))
                yield str(name), cls, node
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, list):
            stack.extend(reversed(node))


def _count(value: Any) -> int:
    """A size field of a layer config as a count (0 when it is not a non-negative number; Keras refuses those)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return 0
    return max(0, int(value))


def _weights(cls: str, entry: dict[str, Any]) -> tuple[int, str]:
    """(weights a layer would create, how they follow from its config), from the config alone: Embedding rows ×
    width, gates × units × (inputs + units + 1) for a recurrent layer or cell, units × (inputs + 1) for any other
    layer with units, and its input width for the rest (normalisation layers hold a few per input)."""
    config = entry["config"]
    shape = entry.get("build_config", {}).get("input_shape") if isinstance(entry.get("build_config"), dict) else None
    fan_in = _count(shape[-1]) if isinstance(shape, list) and shape and not isinstance(shape[-1], list) else 0
    if "input_dim" in config and "output_dim" in config:
        rows, width = _count(config["input_dim"]), _count(config["output_dim"])
        return rows * width, f"{rows:,} rows × {width:,}"
    if "units" in config:
        units = _count(config["units"])
        gates = RECURRENT_GATES.get(cls.removesuffix("Cell"), 0)
        if gates:
            return gates * units * (fan_in + units + 2), f"units={units:,}"
        return units * (fan_in + 1), f"units={units:,} on {fan_in:,} inputs"
    return fan_in, f"{fan_in:,} inputs"


def _check_weights(path: Path, config: Any) -> None:
    """Refuse, before Keras builds anything, a layer (or a model) whose config implies more float32 weights than
    MAX_MODEL_WEIGHT_BYTES, naming the layer and the setting that asks for them."""
    total, largest = 0, []
    for name, cls, entry in _objects(config):
        count, why = _weights(cls, entry)
        if count * 4 > MAX_MODEL_WEIGHT_BYTES:
            raise ModelFileError(
                f"{path}: layer {name!r} ({cls}, {why}) would hold {count:,} weights ({size_text(count * 4)} as float32), over the "
                f"{size_text(MAX_MODEL_WEIGHT_BYTES)} a model may hold (MAX_MODEL_WEIGHT_BYTES) — refused before Keras builds it; "
                "check the layer's size"
            )
        total += count
        largest.append((count, name))
    if total * 4 > MAX_MODEL_WEIGHT_BYTES:
        top = ", ".join(f"{n!r} ({c:,})" for c, n in sorted(largest, reverse=True)[:3])
        raise ModelFileError(
            f"{path}: its layers would hold {total:,} weights together ({size_text(total * 4)} as float32), over the "
            f"{size_text(MAX_MODEL_WEIGHT_BYTES)} a model may hold (MAX_MODEL_WEIGHT_BYTES); largest: {top}"
        )


def _check_stored_weights(path: Path, archive: zipfile.ZipFile) -> None:
    """The weights file's arrays, by their declared shapes (no data read), within MAX_MODEL_WEIGHT_BYTES before Keras
    reads them: an HDF5 dataset may declare a shape far larger than the bytes it stores (chunked, compressed, or a
    fill value only), and Keras reads each one whole before comparing it with the layer's shape."""
    names = set(archive.namelist())
    if WEIGHTS_NPZ in names:
        with archive.open(WEIGHTS_NPZ) as member:
            inner = open_zip(member, where=f"{path}: {WEIGHTS_NPZ}", error=ModelFileError, hint=_KERAS_HINT,
                             max_members=MAX_KERAS_MEMBERS)
            with inner:
                check_member_sizes(inner.infolist(), where=f"{path}: {WEIGHTS_NPZ}", error=ModelFileError, hint=_KERAS_HINT,
                                   max_member_bytes=MAX_MODEL_WEIGHT_BYTES, max_total_bytes=MAX_MODEL_WEIGHT_BYTES)
    if WEIGHTS_H5 not in names:
        return
    h5py = require("h5py", "train")
    declared: list[tuple[int, str]] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            declared.append((math.prod(obj.shape or ()) * obj.dtype.itemsize, name))

    try:
        with archive.open(WEIGHTS_H5) as member, h5py.File(member, "r") as h5:
            h5.visititems(visit)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFileError(f"{path}: {WEIGHTS_H5} is not a readable HDF5 file ({first}) — {_KERAS_HINT}") from None
    biggest = max(declared, default=(0, ""))
    if biggest[0] > MAX_MODEL_WEIGHT_BYTES or sum(n for n, _ in declared) > MAX_MODEL_WEIGHT_BYTES:
        raise ModelFileError(
            f"{path}: {WEIGHTS_H5} declares {size_text(sum(n for n, _ in declared))} of weights (largest: {biggest[1]!r}, "
            f"{size_text(biggest[0])}), over the {size_text(MAX_MODEL_WEIGHT_BYTES)} a model may hold (MAX_MODEL_WEIGHT_BYTES) — "
            "not read; a damaged or hostile file"
        )


def read_keras_config(path: Path) -> Any:
    """config.json of a .keras archive, after the archive's members are checked by their declared sizes (each and
    together, MAX_KERAS_ARCHIVE_BYTES) and count; read to MAX_KERAS_CONFIG_BYTES and MAX_JSON_DEPTH."""
    with open_regular(path, what="Keras model file", max_bytes=MAX_KERAS_ARCHIVE_BYTES, error=ModelFileError, hint=_KERAS_HINT) as f:
        if not zipfile.is_zipfile(f):
            raise ModelFileError(f"{path} is not a Keras model file (a .keras zip or a trusted .h5) — {_KERAS_HINT}")
        with open_zip(f, where=path, error=ModelFileError, hint=_KERAS_HINT, max_members=MAX_KERAS_MEMBERS) as archive:
            infos = archive.infolist()
            check_member_sizes(infos, where=path, error=ModelFileError, hint="not read; a damaged or hostile file",
                               max_member_bytes=MAX_KERAS_ARCHIVE_BYTES, max_total_bytes=MAX_KERAS_ARCHIVE_BYTES)
            try:
                info = archive.getinfo("config.json")
            except KeyError:
                raise ModelFileError(f"{path} is not a Keras model file (no config.json) — {_KERAS_HINT}") from None
            data = read_member(archive, info, max_bytes=MAX_KERAS_CONFIG_BYTES, where=path, error=ModelFileError, hint=_KERAS_HINT)
            config = parse_json_bounded(data, where=f"{path}: config.json", error=ModelFileError, hint=_KERAS_HINT)
            unsafe = _unsafe_layers(config)
            if unsafe:
                raise ModelFileError(f"{path}: layer {unsafe[0]} is refused for safety — rebuild the model from Keras layers only")
            _check_weights(path, config)
            _check_stored_weights(path, archive)
    return config


def load_keras_file(path: str | os.PathLike[str], *, trust_h5: bool = False):
    """A Keras model from a .keras file (checked by read_keras_config first: sizes, nesting, safety, weights) or, if
    trusted, an .h5 file."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"no file {path} — give a .keras model file or a model folder")
    suffix = path.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        if not trust_h5:
            raise ModelFileError(
                f"{path} is an HDF5 file, whose loader can run code stored in it (Lambda layers are pickled bytecode) — "
                "re-save it as .keras, or pass --trust-h5 if you trust where it came from"
            )
        return _load(require("keras", "train"), path, config=None, safe_mode=False)
    if suffix != ".keras":
        raise ModelFileError(f"{path} is not a Keras model file (a .keras zip or a trusted .h5) — {_KERAS_HINT}")
    config = read_keras_config(path)
    return _load(require("keras", "train"), path, config=config, safe_mode=True)


def _missing_class(config: Any) -> tuple[str, str, str | None] | None:
    """(layer name, class, module or None where the file names none) of the first Keras object in `config` whose class this Keras does not have. Only
    the packages Keras itself imports classes from are imported (as it would); any other module counts as missing."""
    import importlib

    from keras.saving import get_registered_object

    for name, cls, entry in _objects(config):
        module = entry.get("module")
        if module is None and "module" in entry and not cls.startswith("__"):
            # A class defined in a script or notebook: Keras records no module, only the name it was registered
            # under, which nothing has registered in this process.
            if get_registered_object(entry.get("registered_name") or cls) is None:
                return name, cls, None
            continue
        if not isinstance(module, str) or module == "builtins":
            continue
        found = None
        if module.split(".")[0] in KERAS_PACKAGES:
            with contextlib.suppress(ImportError):
                found = getattr(importlib.import_module(module), cls, None)
        if found is None:
            return name, cls, module
    return None


def _load(keras, path: Path, *, config: Any, safe_mode: bool):
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        missing = _missing_class(config) if config is not None else None
        if missing:
            name, cls, module = missing
            if module is None:
                raise ModelFileError(
                    f"{path}: layer {name!r} is class {cls!r}, defined in a script or notebook (the file names no module) — "
                    "a custom class: edge-rnn loads Keras' own layers only; rebuild the model from them (LSTM, GRU, "
                    "SimpleRNN or RNN of their cells)"
                ) from exc
            raise ModelFileError(
                f"{path}: layer {name!r} is class {cls!r} from {module!r}, which Keras {keras.__version__} does not have — a custom "
                "class (edge-rnn loads Keras' own layers only: rebuild the model from them) or one from a newer Keras (upgrade it)"
            ) from exc
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


def input_vocab(keras_model, io: dict[str, Any]) -> dict[str, int]:
    """{input name: vocabulary size} for the model inputs an Embedding reads directly (the smallest, where several
    read one): the device refuses ids outside it before onnxruntime's Gather sees them."""
    found: dict[str, int] = {}
    pairs = list(zip(keras_model.inputs, [spec["name"] for spec in io["inputs"]]))
    for layer in _layers(keras_model):
        if type(layer).__name__ != "Embedding":
            continue
        try:
            tensor = layer.input
        except (AttributeError, ValueError):  # a layer called more than once, or never
            continue
        for kt, name in pairs:
            if tensor is kt:
                found[name] = min(int(layer.input_dim), found.get(name, int(layer.input_dim)))
    return found


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


def feed_shape(spec: dict[str, Any], *, batch: int, time_steps: int, temporal: set[str]) -> list[int]:
    """The shape an input is fed at: axis 0 the batch, a temporal input's axis 1 `time_steps`, other free axes 1."""
    return [batch if axis == 0 else time_steps if axis == 1 and spec["name"] in temporal else d if isinstance(d, int) else 1
            for axis, d in enumerate(spec["shape"])]


def make_inputs(specs: list[dict], described: dict[str, dict], *, batch: int, time_steps: int, seed: int,
                temporal: set[str], padded: bool) -> Arrays:
    """Arrays for `specs` as `described`: symbolic dims → batch / time_steps; the time axis of the
    inputs in `temporal` is `time_steps` long; masked inputs are post-padded when `padded`."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        shape = feed_shape(spec, batch=batch, time_steps=time_steps, temporal=temporal)
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
    from ..export.keras_onnx import _flat, _functional

    graph = _functional(keras_model)
    inputs = {id(kt) for kt in graph.inputs}
    for nodes in graph._nodes_by_depth.values():
        for node in nodes:
            layer = node.operation
            initial = node.arguments.kwargs.get("initial_state") if layer is not None else None
            if initial is None:
                continue
            initial = _flat(initial)  # a stacked RNN's nests one list per cell
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
        vocab = input_vocab(source, exported.fields["io"])
        for spec in [*exported.fields["io"]["inputs"], *exported.fields.get("step", {}).get("inputs", [])]:
            if spec["name"] in vocab:
                spec["vocab"] = vocab[spec["name"]]
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
        from ..export.keras_onnx import _sanitise, reset_states, stateful_batch

        keras = require("keras", "train")
        batch = len(next(iter(inputs.values())))
        args = []
        for kt in source.inputs:
            name = _sanitise(kt._keras_history.operation.name)
            # An input no output depends on is not in the graph; Keras still wants a value for it.
            shape = [batch, *[1 if d is None else d for d in kt.shape[1:]]]
            args.append(inputs[name] if name in inputs else np.zeros(shape, kt.dtype))

        def run(xs: list) -> list[np.ndarray]:
            out = source(xs[0] if len(xs) == 1 else xs, training=False)
            return [np.asarray(keras.ops.convert_to_numpy(o)) for o in (out if isinstance(out, (list, tuple)) else [out])]

        fixed = stateful_batch(source)
        if fixed is None:
            outs = run(args)
        else:
            # A stateful model takes only its fixed batch and carries its state from call to call; the ONNX graphs
            # start from zeros: every `fixed` rows from reset states, the last chunk padded with zero rows.
            chunks = []
            for start in range(0, batch, fixed):
                xs = [x[start:start + fixed] for x in args]
                rows = len(xs[0])
                xs = [np.concatenate([x, np.zeros((fixed - rows, *x.shape[1:]), x.dtype)]) for x in xs]
                reset_states(source)
                chunks.append([o[:rows] for o in run(xs)])
            reset_states(source)
            outs = [np.concatenate(parts) for parts in zip(*chunks)]
        names = [spec["name"] for spec in io["outputs"]]
        return dict(zip(names, outs))

    def tolerance(self, output: str, reference: npt.NDArray, *, stepped: bool, source: Any = None,
                  inputs: Arrays | None = None) -> tuple[float, str]:
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
