"""Run a steppable model one time step at a time, carrying the state of every recurrent layer.

Device path: numpy and onnxruntime only.

A steppable file takes one time step of each input plus the state of every recurrent layer
(`state.{layer}.h`, `.c` for LSTMs; the char RNN's `h0`) and returns the outputs for the sequence so
far plus the new state (`state_out.{layer}.h`, …; the char RNN's `h`). The Stepper keeps two sets of
preallocated state buffers and two IOBindings that read one set and write the other, so a step costs
one copy of each input into its bound buffer, one `run_with_iobinding` and a copy of each output —
no per-call conversion of inputs and outputs, no rebinding, no state copies. Shapes the buffers do not
fit (another batch size, several time steps at once where the graph allows it) go through session.run.

Rows of the batch are independent streams: `step(feeds, rows=…)` steps only those rows (their state gathered,
run as a sub-batch, scattered back; every other row's state is not touched), and `reset`, `state_rows` and
`set_rows` work per row. With `rows_alone`, every row runs in a call of its own (batch 1): a dynamically
quantized graph (DynamicQuantizeLinear, DynamicQuantizeLSTM) computes one activation scale over its whole
batch, so a row stepped beside others would answer differently than alone.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from ..errors import InputError, ModelFileError
from .inputs import ORT_DTYPES
from .session import ORT_ERRORS, LoadedModel, load_model

TIME_DIM = "time"


def _step_shape(shape: list, *, batch: int) -> tuple[int, ...] | None:
    """A spec's shape for one step of `batch` examples: batch → batch, time → 1; None if another axis is free."""
    dims = []
    for axis, d in enumerate(shape):
        if axis == 0:
            dims.append(batch)
        elif d == TIME_DIM:
            dims.append(1)
        elif isinstance(d, int):
            dims.append(d)
        else:
            return None
    return tuple(dims)


class Stepper:
    """One step at a time through a steppable model; `state` carries over between `step` calls."""

    def __init__(
        self,
        model: LoadedModel | str | os.PathLike[str],
        *,
        batch: int = 1,
        threads: int | None = None,
        initial_state: dict[str, np.ndarray] | None = None,
        rows_alone: bool = False,
    ) -> None:
        self.model = model if isinstance(model, LoadedModel) else load_model(model, threads=threads)
        check_steppable(self.model)
        if batch < 1:
            raise InputError(f"batch must be at least 1, got {batch}")
        self.batch = batch
        self.rows_alone = rows_alone
        # rows_alone: the batch-1 Stepper every row runs through, its state loaded from the row and stored back.
        self._single = Stepper(self.model) if rows_alone and batch > 1 else None
        session = self.model.session
        state_in = {s["input"] for s in self.model.state}
        state_out = {s["output"] for s in self.model.state}
        self.input_specs = [s for s in self.model.io["inputs"] if s["name"] not in state_in]
        self.output_specs = [s for s in self.model.io["outputs"] if s["name"] not in state_out]
        self.output_names = [s["name"] for s in self.output_specs]
        # Inputs fed one step per call: those the sequence form (`io`) reads over time and the step form at length 1.
        sequence_specs = {s["name"]: s for s in self.model.manifest.get("io", {}).get("inputs", [])}
        self.temporal = {s["name"] for s in self.input_specs if _is_temporal(s, sequence_specs.get(s["name"]))}
        self.dtypes = {i.name: np.dtype(ORT_DTYPES.get(i.type, np.float32)) for i in session.get_inputs()}
        self._initial = {s["input"]: self._state_array(s, (initial_state or {}).get(s["input"])) for s in self.model.state}
        # Two state sets: binding k reads set k and writes set 1 - k; `_cur` is the set holding the state.
        self._states = [{s["input"]: np.zeros((batch, s["shape"][1]), np.float32) for s in self.model.state} for _ in range(2)]
        self._cur = 0
        self.reset()
        self._inputs: dict[str, np.ndarray] = {}
        self._outputs: dict[str, np.ndarray] = {}
        self._bindings: list[Any] = []
        shapes_in = {s["name"]: _step_shape(s["shape"], batch=batch) for s in self.input_specs}
        shapes_out = {s["name"]: _step_shape(s["shape"], batch=batch) for s in self.output_specs}
        if all(shape is not None for shape in (*shapes_in.values(), *shapes_out.values())):
            out_dtypes = {o.name: np.dtype(ORT_DTYPES.get(o.type, np.float32)) for o in session.get_outputs()}
            self._inputs = {name: np.zeros(shape, self.dtypes[name]) for name, shape in shapes_in.items()}
            self._outputs = {name: np.zeros(shape, out_dtypes[name]) for name, shape in shapes_out.items()}
            # The OrtValues share the buffers' memory; the Stepper keeps both alive together.
            for k in (0, 1):
                binding = session.io_binding()
                for name, buf in self._inputs.items():
                    binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(buf))
                for name, buf in self._outputs.items():
                    binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(buf))
                for s in self.model.state:
                    binding.bind_ortvalue_input(s["input"], ort.OrtValue.ortvalue_from_numpy(self._states[k][s["input"]]))
                    binding.bind_ortvalue_output(s["output"], ort.OrtValue.ortvalue_from_numpy(self._states[1 - k][s["input"]]))
                self._bindings.append(binding)

    def _state_array(self, spec: dict[str, Any], value: np.ndarray | None) -> np.ndarray:
        shape = (self.batch, spec["shape"][1])
        if value is None:
            return np.zeros(shape, np.float32)
        array = np.asarray(value, dtype=np.float32)
        if array.shape == shape[1:]:
            array = np.broadcast_to(array, shape)
        if array.shape != shape or not np.all(np.isfinite(array)):
            raise InputError(f"state {spec['input']!r} must be finite numbers of shape {shape} or {shape[1:]}, got {np.shape(value)}")
        return array

    @property
    def state(self) -> dict[str, np.ndarray]:
        """The current state of every recurrent layer, {state input name: float32 (batch, units)} (copies)."""
        return {name: buf.copy() for name, buf in self._states[self._cur].items()}

    @state.setter
    def state(self, values: dict[str, np.ndarray]) -> None:
        for s in self.model.state:
            if s["input"] in values:
                np.copyto(self._states[self._cur][s["input"]], self._state_array(s, values[s["input"]]))

    def reset(self, rows: npt.NDArray[np.intp] | None = None) -> None:
        """Back to the initial state (zeros unless given): every row, or only `rows`."""
        for name, value in self._initial.items():
            if rows is None:
                np.copyto(self._states[self._cur][name], value)
            else:
                self._states[self._cur][name][rows] = value[rows]

    def state_rows(self, rows: npt.NDArray[np.intp] | None = None) -> dict[str, np.ndarray]:
        """{state input name: float32 (len(rows), units)}: copies of the state of `rows` (every row when None)."""
        return {name: (buf.copy() if rows is None else buf[rows]) for name, buf in self._states[self._cur].items()}

    def set_rows(self, values: dict[str, np.ndarray], rows: npt.NDArray[np.intp] | None = None) -> None:
        """Set the state of `rows` (every row when None) from {state input name: (len(rows), units)}, already checked."""
        for name, value in values.items():
            if rows is None:
                np.copyto(self._states[self._cur][name], value)
            else:
                self._states[self._cur][name][rows] = value

    def step(self, feeds: dict[str, np.ndarray], *, rows: npt.NDArray[np.intp] | None = None) -> dict[str, np.ndarray]:
        """One step: {input: (n, 1, …) or (n, …)} → {output: (n, …)} (the caller's own), state carried.

        n is the batch, or len(rows) when only `rows` (distinct row indices, in the order of the feeds) are stepped:
        the other rows' state is left exactly as it was.
        """
        missing = [s["name"] for s in self.input_specs if s["name"] not in feeds]
        if missing:
            raise InputError(f"no value for input {', '.join(missing)} of {self.model.path.name}")
        if self.rows_alone and self._single is not None:
            return self._step_alone(feeds, rows)
        if rows is not None:
            return self._run(feeds, rows=rows)
        if self._bindings and all(feeds[n].shape == buf.shape for n, buf in self._inputs.items()):
            for name, buf in self._inputs.items():
                self._copy_in(name, buf, feeds[name])
            self._run_bound()
            return {name: buf.copy() for name, buf in self._outputs.items()}
        return self._run(feeds)

    @staticmethod
    def _copy_in(name: str, buf: np.ndarray, x: np.ndarray) -> None:
        """One input into its bound buffer."""
        try:
            np.copyto(buf, x, casting="same_kind")
        except TypeError as exc:
            raise InputError(f"input {name!r} has dtype {x.dtype}; the model takes {buf.dtype}") from exc

    def _run_bound(self) -> None:
        """One run through the binding that reads the current state set and writes the other; that one is then current."""
        try:
            self.model.session.run_with_iobinding(self._bindings[self._cur])
        except ORT_ERRORS as exc:
            raise InputError(f"{self.model.path.name} rejected the input: {str(exc).splitlines()[0]}") from exc
        self._cur = 1 - self._cur

    def bound_step(self, name: str, output: str) -> Callable[[np.ndarray], np.ndarray] | None:
        """For a model stepped through one input: x → a copy of `output`, state carried, as `step({name: x})[output]`
        answers, without building or checking dicts per call (generation's inner loop: one character, ~15 µs of
        Python saved per step). None where the buffers are not bound or rows run alone."""
        if not self._bindings or self._single is not None or set(self._inputs) != {name} or output not in self._outputs:
            return None
        buf, out = self._inputs[name], self._outputs[output]

        def step(x: np.ndarray) -> np.ndarray:
            if x.shape != buf.shape:
                return self.step({name: x})[output]
            self._copy_in(name, buf, x)
            self._run_bound()
            return out.copy()

        return step

    def current(self, name: str) -> np.ndarray:
        """A copy of one state input's current value, float32 (batch, units)."""
        return self._states[self._cur][name].copy()

    def _run(self, feeds: dict[str, np.ndarray], *, rows: npt.NDArray[np.intp] | None = None) -> dict[str, np.ndarray]:
        """The same step through session.run, for shapes the bound buffers do not fit and for some rows only
        (their state gathered into a sub-batch, and the new state scattered back)."""
        state = self._states[self._cur]
        size = self.batch if rows is None else len(rows)
        batches = {n: feeds[n].shape[0] for n in (s["name"] for s in self.input_specs) if np.ndim(feeds[n])}
        if any(b != size for b in batches.values()):
            raise InputError(f"the stepper runs a batch of {size}; the inputs hold {batches}")
        model_feeds = {s["name"]: np.asarray(feeds[s["name"]], dtype=self.dtypes[s["name"]]) for s in self.input_specs}
        state_feeds = state if rows is None else {name: buf[rows] for name, buf in state.items()}
        results = dict(zip((o.name for o in self.model.session.get_outputs()), self.model.run({**model_feeds, **state_feeds})))
        for s in self.model.state:
            if rows is None:
                np.copyto(state[s["input"]], results[s["output"]])
            else:
                state[s["input"]][rows] = results[s["output"]]
        return {name: results[name] for name in self.output_names}

    def _step_alone(self, feeds: dict[str, np.ndarray], rows: npt.NDArray[np.intp] | None) -> dict[str, np.ndarray]:
        """Each row in a call of its own through the batch-1 Stepper: its state in, one step, its new state back."""
        single = self._single
        state = self._states[self._cur]
        order = range(self.batch) if rows is None else rows
        answers: list[dict[str, np.ndarray]] = []
        for i, row in enumerate(order):
            inner = single._states[single._cur]
            for name, buf in state.items():
                inner[name][0] = buf[row]
            answers.append(single.step({s["name"]: feeds[s["name"]][i : i + 1] for s in self.input_specs}))
            inner = single._states[single._cur]
            for name, buf in state.items():
                buf[row] = inner[name][0]
        return {name: np.concatenate([a[name] for a in answers]) for name in self.output_names}

    def run_sequence(self, x_by_input: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Sequences {input: (batch, T, …)} → one {output: array} per step; inputs without a time axis repeat each step.

        The sequence inputs are `self.temporal`; others (e.g. a feature vector) are given once, (batch, …).
        """
        temporal = {n for n in x_by_input if n in self.temporal}
        lengths = {x_by_input[n].shape[1] for n in temporal}
        if len(lengths) > 1:
            raise InputError(f"the sequences have different lengths {sorted(lengths)}; give every sequence input the same number of steps")
        steps = lengths.pop() if lengths else 1
        for t in range(steps):
            yield self.step({n: x[:, t : t + 1] if n in temporal else x for n, x in x_by_input.items()})


def _is_temporal(step_spec: dict[str, Any], sequence_spec: dict[str, Any] | None) -> bool:
    """A step input is one time step of a sequence when its sequence form differs at axis 1 (time or T vs 1)."""
    shape = step_spec["shape"]
    if len(shape) < 2 or shape[1] not in (1, TIME_DIM):
        return False
    if sequence_spec is None:
        return True
    seq_shape = sequence_spec.get("shape", [])
    return len(seq_shape) == len(shape) and seq_shape[1] != shape[1]


def check_steppable(model: LoadedModel) -> None:
    """Raise unless `model`'s file is a step form, saying why and what to stream instead."""
    if model.steppable:
        return
    refused = model.manifest.get("step_refused")
    if isinstance(refused, str) and refused:
        raise InputError(f"{model.path.name} has no step form: {refused}")
    step_role = step_role_of(model.role)
    entry = model.manifest.get("files", {}).get(step_role)
    if isinstance(entry, dict):
        raise InputError(f"{model.path.name} runs whole sequences; stream its step form instead: --role {step_role} "
                         f"(a folder or a bundle), or the file {entry.get('path')}")
    raise ModelFileError(f"{model.path.name} runs whole sequences and {model.model_dir} holds no step form of it — re-export the folder with edge-rnn")


def step_role_of(role: str) -> str:
    """The role of a sequence file's step twin: onnx → onnx_step, onnx_int8 → onnx_step_int8."""
    return role.replace("onnx", "onnx_step", 1)
