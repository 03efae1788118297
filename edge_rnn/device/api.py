"""The public Python API: `load` a model, `predict` batches, `stream` many independent streams, `self_test` a bundle.

Device path: numpy and onnxruntime only (bundles add the standard library's tarfile and gzip, on demand).
`edge_rnn.load` / `edge_rnn.Model` / `edge_rnn.Stream` are these names, re-exported lazily by edge_rnn/__init__.py,
and the CLI's `infer`, `stream`, `generate` and `verify` run through them::

    model = edge_rnn.load("sensor.tar.gz")      # a bundle, a model folder, or a model file with its manifest.json
    report = model.self_test()                  # a bundle's reference inputs on this machine: report.ok
    y = model.predict(x)                        # {output: (N, …)}
    stream = model.stream(streams=64)           # the step model; each stream (slot) has its own state
    out = stream.step(frame)                    # frame (64, features) → {output: (64, …)}
    out = stream.step(rows, slots=[0, 4, 9])    # only those streams step; the others' state is untouched
    stream.reset([3])                           # stream 3 starts again from the initial state
    model.classify(x)                           # a Decision per row where the manifest has labels (labels.py):
                                                # softmax top-1, binary (one sigmoid: [neg, pos] at 0.5), multilabel

Row independence: a dynamically quantized graph (`DynamicQuantizeLinear`, `DynamicQuantizeLSTM`, onnxruntime's
int8 variant) computes one activation scale over its whole batch, so a row's answer would depend on the rows
beside it. `predict` and `Stream.step` run such graphs one row per call (`Model.rows_alone`); float and
statically quantized graphs run batched. Every answer is then the one the row gets alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from ..errors import InputError, ModelFileError
from .inputs import MASKS, ORT_DTYPES, check_post_padded, convert_array, preprocess_pixels
from .labels import Decision, decide, first_activation, label_kind, labels_problem
from .manifest import BUNDLE_SUFFIX, load_manifest, missing_role
from .session import LoadedModel, load_model
from .stepper import Stepper, check_steppable, step_role_of

if TYPE_CHECKING:  # the bundle reader (tarfile, gzip) is imported only when a bundle is opened
    from .bundle import Bundle, RecordedMetrics
    from .selftest import SelfTest

__all__ = ["BATCH_COUPLED_OPS", "Decision", "Model", "Stream", "TensorInfo", "Verification", "load", "load_stream", "verify_bundle"]

# Ops whose arithmetic couples the rows of a batch: each quantizes its float input with one scale and zero point
# computed over the whole tensor (onnxruntime's dynamic int8; DynamicQuantizeMatMul is the fused form onnxruntime
# may write into an optimised file). A graph holding any of them runs one row per call.
BATCH_COUPLED_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul"})
# Rows per session call in `predict` (batched graphs): bounds the activations' memory for big batches.
PREDICT_BATCH = 256
# Streams one Stream may hold: state is streams × units × 4 bytes per tensor (mnist-lstm: 2 KiB a stream),
# so this caps it near 130 MiB for the built-ins; a gateway past it runs several Streams.
MAX_STREAMS = 65_536
# Where a folder's models are found when `load` is given a folder.
FOLDER_ROLE = "onnx"


@dataclass(frozen=True)
class TensorInfo:
    """One input, output or state tensor: its graph name, numpy dtype and shape ("batch"/"time"/"streams" are free axes)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str, ...]


def _infos(specs: Iterable[dict[str, Any]], dtypes: Mapping[str, Any]) -> list[TensorInfo]:
    return [TensorInfo(s["name"], np.dtype(dtypes.get(s["name"], s.get("dtype", "float32"))), tuple(s.get("shape", []))) for s in specs]


def _with_vocab(specs: Iterable[dict[str, Any]], manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Input specs with their vocabulary size (ids must lie below it): the spec's own `vocab` (recorded at export for
    an input an Embedding reads), else, for a folder exported before that, the id range its `sample_inputs` records."""
    described = manifest.get("sample_inputs") if isinstance(manifest.get("sample_inputs"), dict) else {}
    out = []
    for spec in specs:
        how = described.get(spec["name"])
        if "vocab" not in spec and isinstance(how, dict) and how.get("kind") == "ids" and isinstance(how.get("high"), int) and how["high"] > 0:
            spec = {**spec, "vocab": how["high"]}
        out.append(spec)
    return out


def _graph_dtypes(loaded: LoadedModel) -> dict[str, Any]:
    nodes = [*loaded.session.get_inputs(), *loaded.session.get_outputs()]
    return {n.name: ORT_DTYPES.get(n.type, np.float32) for n in nodes}


def _batch_coupled(data: bytes, *, where: Path) -> bool:
    """Whether a model's bytes hold an op in BATCH_COUPLED_OPS. `.ort` files are FlatBuffers, whose op types are
    stored as plain strings: a byte search, which can only err towards running rows alone (a slower, same answer)."""
    if where.suffix == ".ort":
        return any(op.encode() in data for op in BATCH_COUPLED_OPS)
    from .onnxfile import op_counts

    return bool(BATCH_COUPLED_OPS & set(op_counts(data, where=where)))


def _image_input(array: np.ndarray, *, spec: dict[str, Any], preprocessing: dict[str, Any], where: str) -> npt.NDArray[np.float32]:
    """Pixels for an image model's input, as `infer` reads a .npy: integers in 0–255 (uint8, or whole numbers from
    JSON) get the manifest's preprocessing; floats must already be preprocessed pixels in [0, 1]."""
    name = spec["name"]
    if array.dtype.kind in "iu":
        if array.size and (array.min() < 0 or array.max() > 255):
            raise InputError(f"{where} (input {name!r}) holds pixel values outside 0–255; give uint8 pixels or floats in [0, 1]")
        pixels = convert_array(array.astype(np.uint8), spec={**spec, "vocab": 256}, dtype=np.uint8, where=where)
        return preprocess_pixels(pixels, preprocessing=preprocessing)
    if array.dtype.kind == "f":
        x = convert_array(array, spec=spec, dtype=np.float32, where=where)
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise InputError(f"{where} (input {name!r}): float pixels must be preprocessed, in [0, 1]; give raw pixels as uint8")
        return x
    raise InputError(f"{where} (input {name!r}) has dtype {array.dtype}; give uint8 pixels or floats in [0, 1]")


def _as_array(value: Any, *, name: str, where: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise InputError(f"{where} (input {name!r}) is not a rectangular array of numbers") from exc
    if array.dtype.kind not in "biuf":
        raise InputError(f"{where} (input {name!r}) has dtype {array.dtype}; give an array of numbers")
    return array


def _bind_arguments(arrays: Sequence[Any], named: Mapping[str, Any], *, names: list[str], extra: Sequence[str] = (),
                    where: str, file: str) -> dict[str, Any]:
    """Positional arrays (in input order) and named ones → {input name: value}; unknown, doubled and missing names refused.
    `extra` names (state tensors) may be given by name, and need not be."""
    if len(arrays) > len(names):
        raise InputError(f"{where}: {len(arrays)} arrays for {len(names)} input(s) of {file} ({', '.join(names)})")
    given = dict(zip(names, arrays))
    for name, value in named.items():
        if name not in names and name not in extra:
            raise InputError(f"{where}: unknown input {name!r} — {file} takes {', '.join([*names, *extra])}")
        if name in given:
            raise InputError(f"{where}: input {name!r} is given twice (by position and by name)")
        given[name] = value
    missing = [n for n in names if n not in given]
    if missing:
        raise InputError(f"{where}: no array for input {', '.join(repr(m) for m in missing)} — {file} takes {', '.join(names)}")
    return given


def _same_batch(feeds: Mapping[str, np.ndarray], *, where: str) -> int:
    batches = {name: x.shape[0] for name, x in feeds.items()}
    if len(set(batches.values())) > 1:
        raise InputError(f"{where}: the inputs hold different batch sizes {batches}; give every input the same number of rows")
    return next(iter(batches.values()))


class Model:
    """A verified model file (from a bundle, a folder or a file with its manifest) on an onnxruntime session.

    `inputs` / `outputs`: what `predict` takes and returns (TensorInfo: name, dtype, shape); `labels`: class names
    of the first output where the manifest has them, else None; `rows_alone`: whether the graph runs one row per
    call to keep each row's answer independent of its batch (dynamic int8).
    """

    def __init__(self, loaded: LoadedModel, *, threads: int | None, bundle: Bundle | None = None) -> None:
        self.loaded = loaded
        self.threads = threads
        self._bundle = bundle
        self._loaded_roles: dict[str, LoadedModel] = {loaded.role: loaded}
        self._coupled: dict[str, bool] = {}
        dtypes = _graph_dtypes(loaded)
        state_in = {s["input"] for s in loaded.state}
        # A sequence file that takes the state itself (the char RNN's: ids (batch, time) and h0) is read over whole
        # sequences, as its manifest's `io` says; a step file's inputs are one step each.
        sequence_specs = {s["name"]: s for s in loaded.manifest["io"]["inputs"]}
        takes_sequences = bool(state_in) and state_in <= set(sequence_specs)
        self._input_specs = _with_vocab([sequence_specs[s["name"]] if takes_sequences else s for s in loaded.io["inputs"] if s["name"] not in state_in],
                                        loaded.manifest)
        self._dtypes = dtypes
        self.inputs: list[TensorInfo] = _infos(self._input_specs, dtypes)
        self.outputs: list[TensorInfo] = _infos(loaded.io["outputs"], dtypes)
        labels = loaded.manifest.get("labels")
        self.labels: list[str] | None = list(labels) if isinstance(labels, list) else None
        self.rows_alone: bool = self._rows_alone(loaded)

    @property
    def label_kind(self) -> str | None:
        """How the first output's scores become labels (labels.py): softmax (top class), binary (one sigmoid unit,
        labels [negative, positive], positive at p ≥ 0.5) or multilabel (a sigmoid unit per label, each ≥ 0.5 chosen);
        None without labels."""
        return _label_kind(self.labels, self.outputs, self.manifest)

    def classify(self, *arrays: Any, top_k: int = 1, **named: Any) -> list[Decision]:
        """`predict`, then a Decision per row from the first output (labels.py): `label` and `probability` (a binary
        classifier's: of the label chosen), `chosen` (multilabel: every label at ≥ 0.5), `top` the k best."""
        return _classify(self.labels, self.outputs, self.manifest, self.predict(*arrays, **named), top_k=top_k, where="classify")

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r}, role={self.role!r}, inputs={[i.name for i in self.inputs]}, outputs={[o.name for o in self.outputs]})"

    @property
    def path(self) -> Path:
        """The model file (inside a bundle: BUNDLE/member)."""
        return self.loaded.path

    @property
    def role(self) -> str:
        """The manifest role of the file: onnx, onnx_int8, onnx_step, …"""
        return self.loaded.role

    @property
    def manifest(self) -> dict[str, Any]:
        return self.loaded.manifest

    @property
    def roles(self) -> list[str]:
        """Every model role this bundle or folder holds (a `role=` for `load` or `stream`)."""
        if self._bundle is not None:
            return [r for r in self._bundle.roles if not r.endswith("_config")]
        files = self.manifest.get("files", {})
        return [r for r, e in files.items() if isinstance(e, dict) and str(e.get("path", "")).endswith((".onnx", ".ort"))]

    # -- predict --------------------------------------------------------------------------------------

    def predict(self, *arrays: Any, **named: Any) -> dict[str, np.ndarray]:
        """Run the model on a batch: arrays in input order, or by name → {output name: (N, …)}, every output.

        Each input is (N, …) as `inputs` gives its shape (one example without the batch axis gets one); dtypes are
        converted without changing a value (ids must be whole numbers in the vocabulary, floats finite), masked
        inputs must be post-padded. An image model (mnist-lstm) takes uint8 pixels (N, H, W), scaled as its
        manifest says, or floats already in [0, 1]. A step file's state inputs start at zeros unless given by name.
        """
        return self._run(self._feeds(arrays, named, where="predict"))

    def _feeds(self, arrays: Sequence[Any], named: Mapping[str, Any], *, where: str) -> dict[str, np.ndarray]:
        state = {s["input"]: s for s in self.loaded.state}
        names = [s["name"] for s in self._input_specs]
        given = _bind_arguments(arrays, named, names=names, extra=list(state), where=where, file=self.path.name)
        pre = self.manifest.get("preprocessing")
        image = pre if isinstance(pre, dict) and "image" in pre else None
        feeds = {}
        for spec in self._input_specs:
            array = _as_array(given[spec["name"]], name=spec["name"], where=where)
            if image is not None:
                feeds[spec["name"]] = _image_input(array, spec=spec, preprocessing=image, where=where)
            else:
                feeds[spec["name"]] = convert_array(array, spec=spec, dtype=self._dtypes[spec["name"]], where=where)
        n = _same_batch(feeds, where=where)
        for m in self.manifest.get("masking", []):
            if m["input"] in feeds:
                check_post_padded(feeds[m["input"]], kind=m["kind"], value=m.get("value", 0.0), where=where)
        for name, s in state.items():
            spec = {"name": name, "shape": ["batch", s["shape"][1]]}
            if name in given:
                feeds[name] = convert_array(_as_array(given[name], name=name, where=where), spec=spec, dtype=np.float32, where=where, batched=True)
            else:
                feeds[name] = np.zeros((n, s["shape"][1]), np.float32)
        _same_batch(feeds, where=where)
        return feeds

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Converted feeds {input: (N, …)} (state inputs included) → {output: (N, …)}: one row per call when
        `rows_alone`, else batches of PREDICT_BATCH."""
        n = len(next(iter(feeds.values())))
        size = 1 if self.rows_alone else PREDICT_BATCH
        names = [o.name for o in self.outputs]
        chunks: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for i in range(0, n, size):
            for name, y in zip(names, self.loaded.run({k: v[i : i + size] for k, v in feeds.items()})):
                chunks[name].append(y)
        return {name: ys[0] if len(ys) == 1 else np.concatenate(ys) for name, ys in chunks.items()}

    # -- stream -----------------------------------------------------------------------------------------

    def stream(self, *, streams: int = 1, role: str | None = None) -> Stream:
        """A Stream of `streams` independent streams over the step model: this file when it takes the state itself
        (the char RNN), else its step twin (onnx → onnx_step, onnx_int8 → onnx_step_int8), else a bundle's first
        step form; `role` picks another file of the bundle or folder."""
        loaded = self._role(role) if role is not None else self._stream_model()
        return Stream(loaded, streams=streams, rows_alone=self._rows_alone(loaded))

    def _stream_model(self) -> LoadedModel:
        if self.loaded.steppable:
            return self.loaded
        twin = step_role_of(self.role)
        if twin in self.roles:
            return self._role(twin)
        if self._bundle is not None:
            from .bundle import default_role

            return self._role(default_role(self._bundle, step=True))
        check_steppable(self.loaded)  # raises, saying why and what to stream instead
        raise AssertionError("unreachable: check_steppable raises for a sequence file")

    def _role(self, role: str) -> LoadedModel:
        """The LoadedModel of another role of this bundle or folder (loaded once, verified like the first)."""
        if role not in self._loaded_roles:
            if role not in self.roles:
                raise InputError(f"{self.loaded.model_dir} holds no {role!r} model — choose a role from {self.roles}")
            if self._bundle is not None:
                from .session import load_bundle_model

                loaded = load_bundle_model(self._bundle.path, role=role, threads=self.threads, bundle=self._bundle)
            else:
                loaded = load_model(self.loaded.model_dir / self.manifest["files"][role]["path"], threads=self.threads)
            self._loaded_roles[role] = loaded
        return self._loaded_roles[role]

    def _rows_alone(self, loaded: LoadedModel) -> bool:
        if loaded.role not in self._coupled:
            data = self._bundle.data(loaded.role) if self._bundle is not None else loaded.path.read_bytes()
            self._coupled[loaded.role] = _batch_coupled(data, where=loaded.path)
        return self._coupled[loaded.role]

    # -- self-test --------------------------------------------------------------------------------------

    def self_test(self) -> SelfTest:
        """Run a bundle's reference inputs through every model it holds on this machine's onnxruntime (what
        `edge-rnn verify --run` does) → SelfTest: `.ok`, and `.results`, one row per role and output (max |Δ| vs the
        source model's answers, the stored tolerance, top-1 agreement). A folder has no reference answers: InputError."""
        if self._bundle is None:
            raise InputError(
                f"{self.loaded.model_dir} is a model folder: a self-test needs a bundle's reference answers — make one with "
                f"`edge-rnn bundle {self.loaded.model_dir}` and load the .tar.gz (or run `edge-rnn check` on the workstation)"
            )
        from .selftest import self_test

        return self_test(self._bundle, threads=self.threads)


class Stream:
    """`streams` independent streams over a step model, each in its own slot with its own state, stepped together.

    `inputs`: one time step of each input, (streams, 1, …) or (streams, …); `outputs`: what a step returns;
    `state_tensors`: each recurrent state tensor, float32 (streams, units). A slot is an int in [0, streams).
    """

    def __init__(self, loaded: LoadedModel, *, streams: int = 1, rows_alone: bool = False) -> None:
        if isinstance(streams, bool) or not isinstance(streams, (int, np.integer)) or not 1 <= streams <= MAX_STREAMS:
            raise InputError(f"streams must be a whole number from 1 to {MAX_STREAMS:,}, got {streams!r}")
        check_steppable(loaded)
        self.loaded = loaded
        self.streams = int(streams)
        self.rows_alone = rows_alone
        self._stepper = Stepper(loaded, batch=self.streams, rows_alone=rows_alone)
        dtypes = _graph_dtypes(loaded)
        self._dtypes = dtypes
        self._specs = _with_vocab(self._stepper.input_specs, loaded.manifest)
        self.inputs: list[TensorInfo] = _infos(self._specs, dtypes)
        self.outputs: list[TensorInfo] = _infos(self._stepper.output_specs, dtypes)
        self.state_tensors: list[TensorInfo] = [TensorInfo(s["input"], np.dtype(np.float32), ("streams", s["shape"][1])) for s in loaded.state]
        pre = loaded.manifest.get("preprocessing")
        self._image = pre if isinstance(pre, dict) and "image" in pre else None
        temporal = self._stepper.temporal
        # The common case, checked without the general reader: an ndarray already of the graph's float dtype and of
        # shape (n, features…) — one step per stream, no time axis. Its values must still be finite (or pixels in [0, 1]).
        rows_of = {s["name"]: s["shape"][2:] if s["name"] in temporal else s["shape"][1:] for s in self._specs}
        self._plain = {
            name: (tuple(dims), np.dtype(dtypes[name])) for name, dims in rows_of.items()
            if all(isinstance(d, int) for d in dims) and np.dtype(dtypes[name]).kind == "f"
        }
        # Post-padding, per stream: once a stream has taken a padding step, a real step is refused until reset.
        self._masking = [m for m in loaded.manifest.get("masking", []) if m["input"] in temporal]
        self._padded = {m["input"]: np.zeros(self.streams, bool) for m in self._masking}
        labels = loaded.manifest.get("labels")
        self.labels: list[str] | None = list(labels) if isinstance(labels, list) else None

    @property
    def label_kind(self) -> str | None:
        """As Model.label_kind, for a step's first output."""
        return _label_kind(self.labels, self.outputs, self.loaded.manifest)

    def classify(self, outputs: Mapping[str, np.ndarray], *, top_k: int = 1) -> list[Decision]:
        """A Decision per stream from what `step` returned (its first output's last step), as Model.classify."""
        return _classify(self.labels, self.outputs, self.loaded.manifest, outputs, top_k=top_k, where="classify")

    def __repr__(self) -> str:
        return f"Stream({str(self.loaded.path)!r}, role={self.role!r}, streams={self.streams}, rows_alone={self.rows_alone})"

    @property
    def role(self) -> str:
        return self.loaded.role

    def _slots(self, slots: Any, *, where: str) -> npt.NDArray[np.intp] | None:
        """None (every stream) or the slots as distinct ints in range, in the order given."""
        if slots is None:
            return None
        rows = np.asarray(slots)
        if rows.ndim == 0:
            rows = rows[None]
        if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
            raise InputError(f"{where}: slots must be a list of stream numbers (ints), got {np.shape(slots)} of {rows.dtype}")
        bad = rows[(rows < 0) | (rows >= self.streams)]
        if bad.size:
            raise InputError(f"{where}: slot {int(bad[0])} is out of range — this Stream has {self.streams} streams (slots 0–{self.streams - 1})")
        if len(np.unique(rows)) != len(rows):
            values, counts = np.unique(rows, return_counts=True)
            raise InputError(f"{where}: slot {int(values[counts > 1][0])} appears twice — give each stream at most once per step")
        return rows.astype(np.intp)

    # -- stepping ---------------------------------------------------------------------------------------

    def step(self, *arrays: Any, slots: Sequence[int] | npt.NDArray[np.integer] | None = None, **named: Any) -> dict[str, np.ndarray]:
        """One time step of every stream, or of `slots` only → {output name: (n, …)}, n streams in slot order.

        Each input is (n, features…) or (n, 1, features…) — one row per stream stepped — in input order or by
        name; a one-stream step may drop the stream axis. The streams not in `slots` keep their state exactly.
        Image models take uint8 pixels (scaled as the manifest says) or floats in [0, 1].
        """
        if not arrays and not named:
            raise InputError(f"step: no input given — {self.loaded.path.name} takes {', '.join(s['name'] for s in self._specs)}")
        rows = self._slots(slots, where="step")
        if rows is not None and not rows.size:
            raise InputError("step: slots is empty — give at least one stream to step")
        feeds = self._convert(arrays, named, rows=rows, where="step")
        return self._step_converted(feeds, rows=rows, where="step")

    def _convert(self, arrays: Sequence[Any], named: Mapping[str, Any], *, rows: npt.NDArray[np.intp] | None, where: str) -> dict[str, np.ndarray]:
        """One step's inputs → {input: (n, 1, …) for sequence inputs, (n, …) others}, graph dtypes, checked."""
        n = self.streams if rows is None else len(rows)
        given = _bind_arguments(arrays, named, names=[s["name"] for s in self._specs], where=where, file=self.loaded.path.name)
        feeds = {}
        for spec in self._specs:
            name = spec["name"]
            temporal = name in self._stepper.temporal
            plain = self._plain.get(name)
            array = given[name]
            if plain is not None and type(array) is np.ndarray and array.dtype == plain[1] and array.shape == (n, *plain[0]):
                low, high = array.min(), array.max()  # NaN propagates into both
                if (0.0 <= low and high <= 1.0) if self._image is not None else (np.isfinite(low) and np.isfinite(high)):
                    feeds[name] = array[:, None] if temporal else array
                    continue
            array = _as_array(array, name=name, where=where)
            # A sequence input's step is read without its time axis (length 1), which is added back after.
            shown = {**spec, "shape": [spec["shape"][0], *spec["shape"][2:]]} if temporal else spec
            if temporal and array.ndim == len(spec["shape"]):
                if array.shape[1] != 1:
                    raise InputError(f"{where} (input {name!r}) has shape {array.shape}: {array.shape[1]} time steps; a step takes one")
                array = array[:, 0]
            if self._image is not None:
                x = _image_input(array, spec=shown, preprocessing=self._image, where=where)
            else:
                x = convert_array(array, spec=shown, dtype=self._dtypes[name], where=where)
            if x.shape[0] != n:
                raise InputError(f"{where} (input {name!r}) holds {x.shape[0]} rows for {n} stream(s) — give one row per stream stepped")
            feeds[name] = x[:, None] if temporal else x
        return feeds

    def _step_converted(self, feeds: dict[str, np.ndarray], *, rows: npt.NDArray[np.intp] | None, where: str) -> dict[str, np.ndarray]:
        """Post-padding checked per stream, then one step of the Stepper (every stream, or `rows`)."""
        updates = {}
        for m in self._masking:
            name = m["input"]
            x = feeds[name]
            real = MASKS[m["kind"]](x, m.get("value", 0.0)).reshape(len(x), -1).all(axis=1)  # (n,)
            padded = self._padded[name] if rows is None else self._padded[name][rows]
            late = real & padded
            if late.any():
                slot = int(np.flatnonzero(late)[0]) if rows is None else int(rows[np.flatnonzero(late)[0]])
                raise InputError(
                    f"{where} (input {name!r}) is a real step after padding in stream {slot} — masked inputs must be post-padded "
                    "(real steps first, padding at the end), as the whole-sequence model would differ from Keras otherwise; "
                    "reset the stream to start a new sequence"
                )
            updates[name] = ~real
        for name, pad in updates.items():
            if rows is None:
                self._padded[name] |= pad
            else:
                self._padded[name][rows] |= pad
        return self._stepper.step(feeds, rows=rows)

    # -- state ------------------------------------------------------------------------------------------

    def reset(self, slots: Sequence[int] | npt.NDArray[np.integer] | None = None) -> None:
        """Every stream, or `slots`, back to the initial state (zeros): they start a new sequence."""
        rows = self._slots(slots, where="reset")
        self._stepper.reset(rows)
        for padded in self._padded.values():
            padded[slice(None) if rows is None else rows] = False

    def state(self, slots: Sequence[int] | npt.NDArray[np.integer] | None = None) -> dict[str, npt.NDArray[np.float32]]:
        """{state tensor name: float32 (n, units)} of every stream, or of `slots` in their order (copies)."""
        return self._stepper.state_rows(self._slots(slots, where="state"))

    def set_state(self, state: Mapping[str, Any], slots: Sequence[int] | npt.NDArray[np.integer] | None = None) -> None:
        """Set the state of every stream, or of `slots`, from {state tensor name: (n, units)} (as `state` returns;
        a name left out keeps its value). Those streams continue from it; their post-padding record starts afresh."""
        rows = self._slots(slots, where="set_state")
        n = self.streams if rows is None else len(rows)
        shapes = {t.name: (n, t.shape[1]) for t in self.state_tensors}
        unknown = sorted(set(state) - set(shapes))
        if unknown:
            raise InputError(f"set_state: unknown state tensor {unknown[0]!r} — this model's are {', '.join(shapes)}")
        values = {}
        for name, value in state.items():
            array = _as_array(value, name=name, where="set_state")
            if array.shape != shapes[name]:
                raise InputError(f"set_state (input {name!r}) has shape {array.shape}; expected {shapes[name]} (one row per stream set)")
            with np.errstate(over="ignore"):
                values[name] = array.astype(np.float32)
            if not np.all(np.isfinite(values[name])):
                raise InputError(f"set_state (input {name!r}) holds NaN or Inf; a state is finite numbers")
        self._stepper.set_rows(values, rows)
        for padded in self._padded.values():
            padded[slice(None) if rows is None else rows] = False


def _label_kind(labels: list[str] | None, outputs: list[TensorInfo], manifest: dict[str, Any]) -> str | None:
    dims = outputs[0].shape if outputs else ()
    if not labels or not dims or not isinstance(dims[-1], int):
        return None
    classes = dims[-1]
    return label_kind(manifest, classes=classes) if labels_problem(len(labels), classes=classes, activation=first_activation(manifest)) is None else None


def _classify(labels: list[str] | None, outputs: list[TensorInfo], manifest: dict[str, Any], answers: Mapping[str, np.ndarray], *,
              top_k: int, where: str) -> list[Decision]:
    kind = _label_kind(labels, outputs, manifest)
    if kind is None or labels is None:
        raise InputError(f"{where}: this model has no labels for its first output — use predict (or export with --labels)")
    if not 1 <= top_k <= len(labels):
        raise InputError(f"{where}: top_k must be between 1 and {len(labels)}")
    first = outputs[0].name
    if not isinstance(answers, Mapping) or first not in answers:
        got = f"a {type(answers).__name__}" if not isinstance(answers, Mapping) else f"a dict of {', '.join(map(repr, answers)) or 'nothing'}"
        raise InputError(f"{where} takes what step returned — a dict holding {first!r} — got {got}; "
                         "step first (outputs = stream.step(x)), then classify(outputs)")
    scores = np.asarray(answers[first])
    want = outputs[0].shape[-1] if outputs[0].shape else None
    if scores.dtype.kind not in "fiu":
        raise InputError(f"{where}: {first!r} holds {scores.dtype} values, not numbers — give what step returned")
    if scores.ndim < 2 or not scores.size or (isinstance(want, int) and scores.shape[-1] != want):
        raise InputError(f"{where}: {first!r} has shape {scores.shape}; it should be (streams, {want}) as step returns it")
    return decide(scores.reshape(len(scores), -1)[:, -scores.shape[-1]:], labels=labels, kind=kind, top_k=top_k)


# ---------------------------------------------------------------------------------------------
# Loading


def load(path: str | os.PathLike[str], *, role: str | None = None, threads: int | None = 1) -> Model:
    """A Model from a bundle (`.tar.gz`: every member's sha256 checked; default role its first variant), a model folder
    (its `onnx` file unless `role` names another) or a model file with its manifest.json beside it (sha256 checked).
    `threads`: onnxruntime intra-op threads (None: onnxruntime's default). Raises an EdgeRnnError subclass, one line."""
    path = Path(path)
    if path.name.endswith(BUNDLE_SUFFIX):
        from .session import load_bundle_model
        from .bundle import open_bundle

        bundle = open_bundle(path)
        return Model(load_bundle_model(path, role=role, threads=threads, bundle=bundle), threads=threads, bundle=bundle)
    if path.is_dir():
        manifest = load_manifest(path)
        role = role or FOLDER_ROLE
        entry = manifest["files"].get(role)
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise missing_role(manifest, path, role)
        # The folder and its role: the file is checked as listed (a directory or FIFO in its place is named as such).
        return Model(load_model(path, role=role, threads=threads), threads=threads)
    # A model file: load_model refuses a role for it, and says what the path is when it is no model file.
    return Model(load_model(path, role=role, threads=threads), threads=threads)


def load_stream(path: str | os.PathLike[str], *, streams: int = 1, role: str | None = None, threads: int | None = 1) -> Stream:
    """A Stream straight from a step file, or a bundle's step form (`role`, default its first), loading only that
    model (what `edge-rnn stream` runs)."""
    path = Path(path)
    if path.name.endswith(BUNDLE_SUFFIX):
        from .session import load_bundle_model
        from .bundle import open_bundle

        bundle = open_bundle(path)
        loaded = load_bundle_model(path, role=role, step=True, threads=threads, bundle=bundle)
        data = bundle.data(loaded.role)
    else:
        loaded = load_model(path, threads=threads, role=role, step=True)
        data = loaded.path.read_bytes()
    check_steppable(loaded)
    return Stream(loaded, streams=streams, rows_alone=_batch_coupled(data, where=loaded.path))


# ---------------------------------------------------------------------------------------------
# Bundles: integrity and the self-test, for `edge-rnn verify`


@dataclass
class Verification:
    """A bundle checked: one line per member, the metrics recorded at bundling (or None), the self-test (or None)."""

    path: Path
    lines: list[str]
    metrics: RecordedMetrics | None = None
    self_test: SelfTest | None = None

    @property
    def ok(self) -> bool:
        return self.self_test is None or self.self_test.ok

    @property
    def failure(self) -> str:
        """One line saying which roles failed the self-test ('' when none did)."""
        if self.ok:
            return ""
        failed = sorted({r.role for r in self.self_test.results if not r.ok})
        return f"self-test failed for {', '.join(failed)}: this machine's answers differ from the source model's beyond the stored tolerance"


def verify_bundle(path: str | os.PathLike[str], *, run: bool = False, threads: int | None = 1) -> Verification:
    """Every member of a bundle against its manifest (sha256, size, reference block, recorded metrics); with `run`,
    the self-test too (see Model.self_test). Integrity failures raise ModelFileError; a failed self-test is reported."""
    from .bundle import not_a_bundle, open_bundle, recorded_metrics, verify
    from .selftest import self_test

    problem = not_a_bundle(Path(path))
    if problem is not None:
        raise ModelFileError(problem)
    opened = open_bundle(path)
    checked = Verification(Path(path), verify(opened), recorded_metrics(opened))
    if run:
        checked.self_test = self_test(opened, threads=threads)
    return checked

