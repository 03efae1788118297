"""Run exported models with onnxruntime: sessions, input checks, infer, generate.

Device path: imports numpy, onnxruntime, Pillow (for images) and this package's device modules only —
never tensorflow, tf2onnx or onnx.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from ..errors import InputError, ModelFileError
from .manifest import load_manifest, role_of, verified_file

# Every error onnxruntime raises derives straight from Exception; these are the ones it defines.
ORT_ERRORS = tuple(
    value for value in vars(_ort_state).values() if isinstance(value, type) and issubclass(value, Exception)
)
# .npy inputs bigger than this are refused before loading (a batch of 28×28 float32 digits is ~3 KB each).
MAX_NPY_BYTES = 512 * 1024 * 1024
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".tif", ".tiff", ".webp")


def session_options(*, threads: int | None = None, opt_level: str = "all") -> ort.SessionOptions:
    """SessionOptions for latency on small devices: sequential execution, `threads` intra-op threads."""
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def create_session(path: str | os.PathLike[str], *, threads: int | None = None, opt_level: str = "all") -> ort.InferenceSession:
    """An onnxruntime CPU session; a broken file becomes ModelFileError."""
    try:
        return ort.InferenceSession(
            str(path), sess_options=session_options(threads=threads, opt_level=opt_level), providers=["CPUExecutionProvider"]
        )
    except ORT_ERRORS as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFileError(f"onnxruntime cannot load {path}: {first} — re-export it") from exc


@dataclass
class LoadedModel:
    """A verified model file, its folder's manifest and an onnxruntime session."""

    path: Path
    model_dir: Path
    role: str
    manifest: dict[str, Any]
    session: ort.InferenceSession

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(None, feeds)
        except ORT_ERRORS as exc:
            raise InputError(f"{self.path.name} rejected the input: {str(exc).splitlines()[0]}") from exc


def load_model(model_path: str | os.PathLike[str], *, threads: int | None = None, opt_level: str = "all") -> LoadedModel:
    """Load MODEL.onnx after verifying it against the manifest beside it (sha256, size, I/O names)."""
    path = Path(model_path)
    if not path.is_file():
        raise ModelFileError(f"no model file {path} — run `edge-rnn export` (and `edge-rnn quantize`) first")
    model_dir = path.parent
    manifest = load_manifest(model_dir)
    role = role_of(manifest, model_dir, path)
    verified_file(manifest, model_dir, role)
    io = manifest.get("io")
    specs_ok = isinstance(io, dict) and all(
        isinstance(io.get(side), list) and all(isinstance(spec, dict) and isinstance(spec.get("name"), str) for spec in io[side])
        for side in ("inputs", "outputs")
    )
    if not specs_ok:
        raise ModelFileError(f"manifest in {model_dir}: 'io' must list inputs and outputs with names — re-export the folder")
    session = create_session(path, threads=threads, opt_level=opt_level)
    expected = ([s["name"] for s in io["inputs"]], [s["name"] for s in io["outputs"]])
    actual = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if expected != actual:
        raise ModelFileError(f"{path} has inputs/outputs {actual}, the manifest says {expected} — re-export it")
    _check_task_fields(manifest, session, model_dir)
    return LoadedModel(path, model_dir, role, manifest, session)


def _check_task_fields(manifest: dict[str, Any], session: ort.InferenceSession, model_dir: Path) -> None:
    """The manifest fields infer/generate read have the right types and match the graph's sizes."""

    def bad(what: str) -> ModelFileError:
        return ModelFileError(f"manifest in {model_dir}: {what} — re-export the folder with edge-rnn")

    last_dim = session.get_outputs()[0].shape[-1]
    task = manifest.get("task")
    if task == "classify":
        pre = manifest.get("preprocessing")
        image = pre.get("image") if isinstance(pre, dict) else None
        if not (isinstance(image, dict) and all(isinstance(image.get(k), int) and image[k] > 0 for k in ("height", "width"))):
            raise bad("preprocessing.image needs positive integer height and width")
        if not all(isinstance(pre.get(k, 0.0), (int, float)) and np.isfinite(pre.get(k, 0.0)) for k in ("scale", "offset")):
            raise bad("preprocessing.scale and offset must be numbers")
        labels = manifest.get("labels")
        if not (isinstance(labels, list) and labels and all(isinstance(label, str) for label in labels)):
            raise bad("labels must be a list of strings")
        if isinstance(last_dim, int) and len(labels) != last_dim:
            raise bad(f"{len(labels)} labels for a model with {last_dim} outputs")
    elif task == "generate":
        vocab = manifest.get("vocab")
        if not (isinstance(vocab, list) and vocab and all(isinstance(c, str) and len(c) == 1 for c in vocab) and len(set(vocab)) == len(vocab)):
            raise bad("vocab must be a list of distinct single characters")
        if isinstance(last_dim, int) and len(vocab) != last_dim:
            raise bad(f"vocab has {len(vocab)} characters but the model scores {last_dim}")
        config = manifest.get("config")
        hidden = config.get("hidden") if isinstance(config, dict) else None
        h_dim = session.get_inputs()[-1].shape[-1]
        if not isinstance(hidden, int) or (isinstance(h_dim, int) and h_dim != hidden):
            raise bad(f"config.hidden must be the model's hidden size ({h_dim})")
    else:
        raise bad(f"unknown task {task!r}")


# ---------------------------------------------------------------------------------------------
# Classifiers (mnist-lstm): images / .npy arrays → probabilities


def _image_pixels(path: Path, *, height: int, width: int) -> npt.NDArray[np.uint8]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            size = img.size
            if size != (width, height):
                raise InputError(f"{path} is {size[0]}×{size[1]} pixels; the model takes {width}×{height} images — resize it first")
            if img.mode not in ("L", "RGB", "RGBA", "P", "LA", "1", "I;16", "I"):
                raise InputError(f"{path} has pixel mode {img.mode}; give an 8-bit grey or RGB image")
            if img.mode in ("I;16", "I"):
                raise InputError(f"{path} is a 16/32-bit image; give an 8-bit grey or RGB image")
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot read {path} as an image ({exc}) — give a 28×28 PNG or a .npy array") from exc


def _npy_pixels(path: Path, *, height: int, width: int) -> npt.NDArray[np.float32]:
    """A .npy of one image (28, 28) or a batch (N, 28, 28): uint8 raw pixels or float already in [0, 1]."""
    if path.stat().st_size > MAX_NPY_BYTES:
        raise InputError(f"{path} is larger than {MAX_NPY_BYTES // 2**20} MiB — split it into smaller batches")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"cannot read {path} as a .npy array ({str(exc).splitlines()[0]}) — save it with numpy.save") from exc
    if not isinstance(array, np.ndarray):
        raise InputError(f"{path} is an .npz archive; give one .npy array per file")
    shape = array.shape
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (height, width) or array.shape[0] == 0:
        raise InputError(f"{path} has shape {shape}; expected ({height}, {width}) or (N, {height}, {width})")
    return array


def preprocess_pixels(images: npt.NDArray[np.uint8], *, preprocessing: dict[str, Any]) -> npt.NDArray[np.float32]:
    """uint8 pixels (N, H, W) → float32 model input, exactly as the manifest's preprocessing says."""
    x = images.astype(np.float32) * np.float32(preprocessing["scale"]) + np.float32(preprocessing.get("offset", 0.0))
    if preprocessing["image"].get("invert"):
        x = np.float32(1.0) - x
    return x.astype(np.float32, copy=False)


def load_inputs(
    paths: Sequence[str | os.PathLike[str]], *, preprocessing: dict[str, Any]
) -> tuple[npt.NDArray[np.float32], list[str]]:
    """Read PNGs and .npy files → float32 (N, H, W) preprocessed as the manifest says, and a name per row."""
    height, width = preprocessing["image"]["height"], preprocessing["image"]["width"]
    batches, names = [], []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise InputError(f"no such input file: {path}")
        if path.suffix.lower() == ".npy":
            array = _npy_pixels(path, height=height, width=width)
            if array.dtype == np.uint8:
                x = preprocess_pixels(array, preprocessing=preprocessing)
            elif np.issubdtype(array.dtype, np.floating):
                if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
                    raise InputError(f"{path}: float arrays must be preprocessed pixels in [0, 1]; save raw pixels as uint8")
                x = array.astype(np.float32)
            else:
                raise InputError(f"{path} has dtype {array.dtype}; give uint8 pixels or float32 in [0, 1]")
            names += [f"{path.name}[{i}]" for i in range(len(x))] if len(x) > 1 else [path.name]
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            x = preprocess_pixels(_image_pixels(path, height=height, width=width)[None], preprocessing=preprocessing)
            names.append(path.name)
        else:
            raise InputError(f"{path}: unsupported input type {path.suffix!r}; give .png (or another image) or .npy")
        batches.append(x.astype(np.float32))
    if not batches:
        raise InputError("no inputs given — pass one or more .png or .npy files")
    return np.concatenate(batches), names


def predict_probs(model: LoadedModel, x: npt.NDArray[np.float32], *, batch_size: int = 256) -> npt.NDArray[np.float32]:
    """float32 (N, T, F) → probabilities (N, classes), in batches."""
    name = model.manifest["io"]["inputs"][0]["name"]
    out = [model.run({name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(out)


@dataclass
class Prediction:
    input: str
    label: str
    probability: float
    top: list[tuple[str, float]]


def infer(
    model_path: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    *,
    top_k: int = 1,
    threads: int | None = None,
) -> list[Prediction]:
    """Classify each image / array row with MODEL.onnx: the top-k labels and their probabilities."""
    model = load_model(model_path, threads=threads)
    if model.manifest.get("task") != "classify":
        raise InputError(f"{model.path} is a {model.manifest.get('task')!r} model — use `edge-rnn generate` for it")
    labels = model.manifest["labels"]
    if not 1 <= top_k <= len(labels):
        raise InputError(f"--top-k must be between 1 and {len(labels)}")
    x, names = load_inputs(inputs, preprocessing=model.manifest["preprocessing"])
    probs = predict_probs(model, x)
    results = []
    for name, p in zip(names, probs):
        order = np.argsort(-p, kind="stable")[:top_k]
        top = [(labels[i], float(p[i])) for i in order]
        results.append(Prediction(name, top[0][0], top[0][1], top))
    return results


# ---------------------------------------------------------------------------------------------
# Generators (char-rnn): state carried between calls


def onnx_step(model: LoadedModel):
    """A char-RNN step function over the session: (ids int64 (B, T), h (B, H)) → (logits float32 (B, T, V), h float32 (B, H)).

    One character of one sequence — generation's case — runs through an IOBinding over numpy
    buffers bound once, which skips session.run's per-call conversion of inputs and outputs
    (H=100, one thread, a step alone: ~10 µs instead of ~13 µs); other shapes go through session.run.
    Either way the returned arrays are the caller's own.
    """
    session = model.session
    (ids_in, h_in), (logits_out, h_out) = session.get_inputs(), session.get_outputs()
    hidden, vocab_size = h_in.shape[1], logits_out.shape[2]

    def run(ids: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, h_next = model.run({ids_in.name: ids.astype(np.int64, copy=False), h_in.name: h.astype(np.float32, copy=False)})
        return logits, h_next

    if not (isinstance(hidden, int) and isinstance(vocab_size, int)):
        return run  # sizes not fixed in the graph: nothing to preallocate
    ids_buf = np.zeros((1, 1), np.int64)
    h_buf = np.zeros((1, hidden), np.float32)
    logits_buf = np.zeros((1, 1, vocab_size), np.float32)
    h_next_buf = np.zeros((1, hidden), np.float32)
    binding = session.io_binding()  # the OrtValues share the buffers' memory, which the closure keeps alive
    binding.bind_ortvalue_input(ids_in.name, ort.OrtValue.ortvalue_from_numpy(ids_buf))
    binding.bind_ortvalue_input(h_in.name, ort.OrtValue.ortvalue_from_numpy(h_buf))
    binding.bind_ortvalue_output(logits_out.name, ort.OrtValue.ortvalue_from_numpy(logits_buf))
    binding.bind_ortvalue_output(h_out.name, ort.OrtValue.ortvalue_from_numpy(h_next_buf))

    def step(ids: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if ids.shape != (1, 1) or h.shape != (1, hidden):
            return run(ids, h)
        ids_buf[0, 0] = ids[0, 0]
        np.copyto(h_buf, h)
        try:
            session.run_with_iobinding(binding)
        except ORT_ERRORS as exc:
            raise InputError(f"{model.path.name} rejected the input: {str(exc).splitlines()[0]}") from exc
        return logits_buf.copy(), h_next_buf.copy()

    return step


def generate(
    model_path: str | os.PathLike[str],
    *,
    prime: str,
    length: int,
    temperature: float = 1.0,
    seed: int = 0,
    threads: int | None = None,
) -> str:
    """Sample `length` characters after `prime` with the ONNX char RNN; same seed → same text as NumPy."""
    from .sampling import generation_h0, sample_with

    model = load_model(model_path, threads=threads)
    if model.manifest.get("task") != "generate":
        raise InputError(f"{model.path} is a {model.manifest.get('task')!r} model — use `edge-rnn infer` for it")
    hidden = int(model.manifest["config"]["hidden"])
    return sample_with(
        onnx_step(model),
        vocab="".join(model.manifest["vocab"]),
        hidden=hidden,
        prime=prime,
        length=length,
        temperature=temperature,
        seed=seed,
        h0=generation_h0(model.manifest, hidden=hidden),
    )
