"""Keras 3 model → ONNX with fused LSTM / GRU / RNN ops (never Loop/Scan), built with onnx.helper.

Workstation side: imports keras (inside `convert`) and onnx; nothing on the device path imports it.

Why not tf2onnx: under Keras 3, tf2onnx 1.17 turns GRU, SimpleRNN, Bidirectional(GRU) and Masking+LSTM
into `Loop` nodes that onnxruntime runs step by step through its graph executor. Here the Keras model's
own layer graph is walked (a Sequential model is a functional graph once built) and every layer is
translated by one converter from a registry (layer class → function); anything else is refused with
`UnsupportedLayerError` so the caller may fall back to tf2onnx.

Recurrent ops run time-major (T, B, F) with Transposes around them: onnxruntime's CPU kernels reject
layout=1. A sequence handed from one recurrent op to the next keeps its time-major form, so stacked
layers pay no Transpose pair in between.

Masking (what Keras 3 does, read from keras/src/backend/tensorflow/rnn.py and checked in the tests):
- Keras 3 writes a model's mask computation into the graph as ops (Embedding(mask_zero) → NotEqual,
  Masking → NotEqual + Any, Concatenate → ExpandDims/LogicalOr/Concatenate/Any…); they are converted
  like any op into a boolean (batch, time) tensor, and a recurrent layer receiving it gets
  sequence_lens = the count of True steps. That equals Keras only for post-padded inputs (every True
  before every False in a row), which `Conversion.masking` records for the device runtime to enforce.
- At a masked step Keras keeps the state, and its *output* is the previous step's output
  (`zero_output_for_mask=False`, the default), or zeros (`zero_output_for_mask=True`, which
  Bidirectional forces for return_sequences). ONNX writes zeros at t ≥ len, so for the default the
  converter emits Where(t < len, Y, Y_h): the last valid output carried forward.
- A fully masked row (len 0): Keras outputs zeros and returns the initial state; onnxruntime returns
  zeros for Y, Y_h and Y_c. With a non-zero initial state the states become Where(len > 0, Y_h, h0).
- Keras 3.15 records no mask for a recurrent layer called with `initial_state=` in a functional model
  (it ignores an upstream Masking/mask_zero; an explicit `mask=` is kept). The converter follows the
  recorded graph, so it agrees with Keras either way.
- go_backwards: Keras returns the sequence in reversed time order (post-padding becomes pre-padding,
  whose carried-forward "previous output" is zero), i.e. exactly ONNX direction="reverse" flipped in time.

Stacked cells (`RNN([LSTMCell(…), GRUCell(…)])`, a StackedRNNCells) become one fused op per cell, cell k+1
reading cell k's whole time-major sequence, as stacked layers do; the output is the last cell's and the states
(return_state, initial_state, the step model's) are every cell's in order, as Keras nests them. `RNN(cell)`
over one built-in cell is the LSTM / GRU / SimpleRNN layer of that cell.

Stateful layers (`stateful=True`, whose Keras state lives in layer variables at the model's fixed batch and
carries over from call to call): the whole-sequence model starts from zero state — Keras right after
`reset_states()` — and the step model takes the state as inputs like any other, so Keras' `layer.states`
(batch rows as Keras fixed them) can be fed to it to continue; the graphs keep a free batch axis. The audit notes
it on the layer.

Step models (`step=True`): every time-distributed input has time length 1, each recurrent layer reads
its state from `state.{layer}.h` (and `.c`; `state.{layer}.{k}.h` for cell k of a stack) and returns
`state_out.{layer}.h` (and `.c`). A masked step keeps the state (Where(len > 0, new, old), as Keras does)
and outputs the previous output, taken to be the state h — equal to Keras unless the state starts non-zero and
the sequence starts with masked steps. A step model's cell is the fused op at T = 1 or, per cell kind
(decomposed.STEP_FORMS, or `step_form=` for every cell), the decomposed step of export/decomposed.py (MatMul +
element-wise gates, reading and writing (B, U) tensors directly); the audit note and the graph's doc string say which.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .cells import CELL_CONVERTERS, STATE_NAMES, CellWeights, UnsupportedCellError
from .decomposed import DECOMPOSED_NOTE, STEP_CELLS, STEP_FORMS
from ..errors import EdgeRnnError, require

PRODUCER = "edge-rnn.keras_onnx"
BATCH_DIM = "batch"
TIME_DIM = "time"
# 13: Squeeze/Unsqueeze/Split/ReduceSum take axes as inputs; 18: the newest opset onnxruntime 1.32's
# fused recurrent kernels are tested against here.
SUPPORTED_OPSETS = range(13, 19)
# ONNX LayerNormalization exists from opset 17; below that it is decomposed.
LAYER_NORM_OPSET = 17
# ReduceMax/ReduceMin/ReduceMean take `axes` as an input from opset 18 (ReduceSum from 13).
REDUCE_AXES_INPUT_OPSET = 18
FUSED_RECURRENT_OPS = ("LSTM", "GRU", "RNN")
INT64_MIN = np.iinfo(np.int64).min
# The audit's word on a stateful=True layer: what the graphs do with the state Keras keeps between calls.
STATEFUL_REMARK = ("stateful=True: model.onnx starts from zero state (Keras after reset_states()); the step model's "
                   "state inputs take Keras' layer.states")
# Dropout-like layers: identity at inference (training=False), so no ONNX node at all.
IDENTITY_LAYERS = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
                   "GaussianDropout", "AlphaDropout")


class UnsupportedLayerError(EdgeRnnError):
    """A Keras layer (or graph op) has no converter here; the caller may fall back to tf2onnx."""

    def __init__(self, message: str, *, layer: str | None = None, cls: str | None = None) -> None:
        super().__init__(message)
        self.layer = layer  # the refused layer's name and class, for the fallback's audit
        self.cls = cls


class NotStreamableError(EdgeRnnError):
    """step=True on a model that needs the whole sequence (bidirectional, backwards, time reshapes…)."""


@dataclass
class LayerAudit:
    """One per Keras layer: the ONNX ops it became and what that means for speed and quantization."""

    layer: str
    cls: str
    onnx_ops: list[str]
    fused: bool  # its time loop runs inside one fused ONNX LSTM/GRU/RNN op (False: no time loop)
    note: str


@dataclass
class Conversion:
    model: onnx.ModelProto
    io: dict
    audit: list[LayerAudit]
    masking: list[dict]
    state: list[dict] = field(default_factory=list)


@dataclass
class _Value:
    """A converted tensor: ONNX name, ONNX dtype, Keras shape (None = dynamic) and where it came from."""

    name: str
    dtype: int
    shape: tuple
    temporal: bool  # axis 1 is the sequence's time axis (length 1 in a step model)
    origin: str  # the graph input it derives from (first one, for merges)
    time_major: str | None = None  # the same tensor as (T, B, …) when a recurrent op produced it
    step_2d: str | None = None  # the same tensor as (B, U) when a decomposed step cell produced it (T = 1)


def output_names(keras_tensors) -> list[str]:
    """Graph output names: the producing layer's name, with ".{index}" for a layer's further outputs
    (return_state, merge_mode=None), made unique."""
    names: list[str] = []
    for kt in keras_tensors:
        operation, _, tensor_index = kt._keras_history
        name = _sanitise(operation.name if tensor_index == 0 else f"{operation.name}.{tensor_index}")
        while name in names:
            name += "_"
        names.append(name)
    return names


def _sanitise(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


class _Builder:
    """Collects nodes and initializers; names every node after the Keras layer being converted."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.owner_of: dict[str, str] = {}  # node name → Keras layer name
        self.owner = "graph"
        self._counts: Counter[str] = Counter()
        self.used: set[str] = set()  # tensor names the pruned graph reads (set by _prune)

    def unique(self, hint: str) -> str:
        self._counts[hint] += 1
        return hint if self._counts[hint] == 1 else f"{hint}_{self._counts[hint] - 1}"

    def const(self, array: np.ndarray, hint: str = "const") -> str:
        name = self.unique(f"{self.owner}/{hint}")
        self.initializers[name] = numpy_helper.from_array(np.ascontiguousarray(array), name=name)
        return name

    def op(self, op_type: str, inputs: list[str], *, n_out: int = 1, **attrs) -> Any:
        name = self.unique(f"{self.owner}/{op_type}")
        outputs = [name] if n_out == 1 else [f"{name}:{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        self.owner_of[name] = self.owner
        return outputs[0] if n_out == 1 else outputs

    def axes(self, values: list[int]) -> str:
        return self.const(np.array(values, dtype=np.int64), "axes")

    def unsqueeze(self, x: str, axes: list[int]) -> str:
        return self.op("Unsqueeze", [x, self.axes(axes)])

    def squeeze(self, x: str, axes: list[int]) -> str:
        return self.op("Squeeze", [x, self.axes(axes)])

    def reduce(self, op_type: str, x: str, axes: list[int], *, keepdims: bool) -> str:
        if op_type == "ReduceSum" or self.opset >= REDUCE_AXES_INPUT_OPSET:
            return self.op(op_type, [x, self.axes(axes)], keepdims=int(keepdims))
        return self.op(op_type, [x], axes=axes, keepdims=int(keepdims))

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", [x], to=to)

    def flip_time(self, x_tm: str) -> str:
        """Reverse axis 0 of a time-major tensor (Slice with step -1: ONNX has no Reverse op)."""
        return self.op("Slice", [x_tm, self.const(np.array([-1], np.int64), "starts"),
                                 self.const(np.array([INT64_MIN], np.int64), "ends"), self.axes([0]),
                                 self.const(np.array([-1], np.int64), "steps")])


def _onnx_dtype(dtype: str) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


# ---------------------------------------------------------------------------------------------------
# Element-wise activations (Dense / Activation), Keras name → emitter.

def _act_simple(op_type: str, **attrs) -> Callable[[_Builder, str], str]:
    return lambda b, x: b.op(op_type, [x], **attrs)


def _relu6(b: _Builder, x: str) -> str:
    return b.op("Clip", [x, b.const(np.array(0.0, np.float32), "zero"), b.const(np.array(6.0, np.float32), "six")])


def _silu(b: _Builder, x: str) -> str:
    return b.op("Mul", [x, b.op("Sigmoid", [x])])


def _gelu_erf(b: _Builder, x: str) -> str:
    """0.5·x·(1 + erf(x/√2)): Keras' gelu default (approximate=False); ONNX Gelu only exists from opset 20."""
    erf = b.op("Erf", [b.op("Mul", [x, b.const(np.array(1.0 / np.sqrt(2.0), np.float32), "inv_sqrt2")])])
    one_plus = b.op("Add", [erf, b.const(np.array(1.0, np.float32), "one")])
    return b.op("Mul", [b.op("Mul", [x, b.const(np.array(0.5, np.float32), "half")]), one_plus])


ACTIVATIONS: dict[str, Callable[[_Builder, str], str]] = {
    "linear": lambda b, x: x,
    "relu": _act_simple("Relu"),
    "sigmoid": _act_simple("Sigmoid"),
    "tanh": _act_simple("Tanh"),
    "softmax": _act_simple("Softmax", axis=-1),
    "hard_sigmoid": _act_simple("HardSigmoid", alpha=1.0 / 6.0, beta=0.5),  # Keras 3: relu6(x + 3) / 6
    "elu": _act_simple("Elu", alpha=1.0),
    "selu": _act_simple("Selu"),  # ONNX's default alpha/gamma are Keras' constants in float32
    "softplus": _act_simple("Softplus"),
    "softsign": _act_simple("Softsign"),
    "silu": _silu,
    "swish": _silu,
    "gelu": _gelu_erf,
    "relu6": _relu6,
    "leaky_relu": _act_simple("LeakyRelu", alpha=0.2),  # Keras 3's default negative_slope
}


def _activation_name(fn) -> str:
    import keras

    name = getattr(fn, "__name__", None)
    return name if name is not None and keras.activations.get(name) is fn else repr(fn)


# ---------------------------------------------------------------------------------------------------
# The converter state shared by all layer converters.

class _Converter:
    def __init__(self, *, opset: int, step: bool, step_form: str | None = None) -> None:
        self.b = _Builder(opset)
        self.step = step
        self.step_form = step_form  # None: STEP_FORMS per cell kind; "fused" | "decomposed" for every cell
        self.masking: list[dict] = []
        self.state: list[dict] = []
        self.state_inputs: list[onnx.ValueInfoProto] = []
        self.state_outputs: list[tuple[str, str]] = []  # (internal name, graph output name)
        self._lengths: dict[str, str] = {}
        self._valid: dict[str, str] = {}
        self.remarks: dict[str, str] = {}  # layer name → what its audit note adds (e.g. stateful)
        self.decomposed: set[str] = set()  # layers whose step cells are decomposed (export/decomposed.py)
        self.layer = None

    def remark(self, text: str) -> None:
        """Add `text` to the audit note of the layer being converted."""
        name = self.layer.name
        self.remarks[name] = f"{self.remarks[name]}; {text}" if name in self.remarks else text

    def refuse(self, reason: str, *, todo: str = "export it with tf2onnx instead") -> UnsupportedLayerError:
        layer = self.layer
        return UnsupportedLayerError(f"layer {layer.name!r} ({type(layer).__name__}): {reason} — {todo}",
                                     layer=layer.name, cls=type(layer).__name__)

    def not_streamable(self, reason: str) -> NotStreamableError:
        layer = self.layer
        return NotStreamableError(
            f"layer {layer.name!r} ({type(layer).__name__}) {reason}, so the model has no step form — "
            "export it with step=False and run whole sequences"
        )

    def value(self, name: str, kt, *, like: _Value, temporal: bool | None = None, dtype: int | None = None) -> _Value:
        return _Value(name, _onnx_dtype(kt.dtype) if dtype is None else dtype, tuple(kt.shape),
                      like.temporal if temporal is None else temporal, like.origin)

    def time_major(self, x: _Value) -> str:
        return x.time_major or self.b.op("Transpose", [x.name], perm=[1, 0, 2])

    def lengths(self, mask: _Value) -> str:
        """(B,) int32 count of unmasked steps of a boolean (B, T) mask: ONNX sequence_lens."""
        if mask.name not in self._lengths:
            self._lengths[mask.name] = self.b.reduce("ReduceSum", self.b.cast(mask.name, TensorProto.INT32), [1],
                                                     keepdims=False)
        return self._lengths[mask.name]

    def valid_steps(self, lengths: str, y_tm: str) -> str:
        """(T, B, 1) bool: t < len for each row, T taken from a time-major tensor."""
        # Every recurrent op fed by one mask runs over the same T, so one (T, B, 1) tensor serves them all.
        key = lengths
        if key not in self._valid:
            b = self.b
            T = b.op("Gather", [b.op("Shape", [y_tm]), b.const(np.array(0, np.int64), "time_axis")], axis=0)
            t = b.op("Range", [b.const(np.array(0, np.int64), "zero"), T, b.const(np.array(1, np.int64), "one")])
            lens = b.unsqueeze(b.cast(lengths, TensorProto.INT64), [0])  # (1, B)
            self._valid[key] = b.unsqueeze(b.op("Less", [b.unsqueeze(t, [1]), lens]), [2])  # (T, B, 1)
        return self._valid[key]

    def state_input(self, layer_name: str, state: str, units: int) -> str:
        name, out = f"state.{layer_name}.{state}", f"state_out.{layer_name}.{state}"
        self.state_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH_DIM, units]))
        self.state.append({"layer": layer_name, "name": state, "input": name, "output": out,
                           "dtype": "float32", "shape": [BATCH_DIM, units]})
        return name


# ---------------------------------------------------------------------------------------------------
# Fused recurrent ops.

def _cells(cv: _Converter, layer) -> list[CellWeights]:
    """The layer's cells in ONNX form: its one cell, or every cell of a StackedRNNCells (`RNN([cell, cell])`) in order."""
    import keras

    stacked = isinstance(layer.cell, keras.layers.StackedRNNCells)
    cells = list(layer.cell.cells) if stacked else [layer.cell]
    converted = []
    for k, cell in enumerate(cells):
        cell_cls = type(cell).__name__
        where = f"stacked cell {k} ({cell_cls})" if stacked else f"cell {cell_cls}"
        if cell_cls not in CELL_CONVERTERS:
            raise cv.refuse(f"{where} has no fused ONNX op")
        try:
            converted.append(CELL_CONVERTERS[cell_cls](cell, layer_name=layer.name))
        except UnsupportedCellError as exc:
            raise cv.refuse(f"{where}: {str(exc).split(': ', 1)[1]}") from exc
    if layer.stateful:
        # Keras carries the state between calls in layer variables; here the whole-sequence model starts from
        # zeros (Keras right after reset_states()) and the step model takes the state as inputs.
        cv.remark(STATEFUL_REMARK)
    return converted


def _cell(cv: _Converter, layer) -> CellWeights:
    """The one cell of a layer that cannot hold a stack (each direction of a Bidirectional)."""
    cells = _cells(cv, layer)
    if len(cells) != 1:
        raise cv.refuse(f"{len(cells)} stacked cells inside {type(cv.layer).__name__} have no fused form here",
                        todo="wrap each cell in its own layer, or export it with tf2onnx")
    return cells[0]


@dataclass
class _Direction:
    Y: str  # (T, B, U) time-major, ONNX time order
    Y_h: str  # (B, U)
    Y_c: str | None  # (B, U), LSTM only


def _fused(cv: _Converter, cells: list[CellWeights], *, direction: str, xt: str, lengths: str | None,
           initial: list[list[str]] | None) -> list[_Direction]:
    """One ONNX LSTM/GRU/RNN over the time-major xt (T, B, F); `initial[d]` are direction d's (B, U) states,
    None = zeros (omitted)."""
    b = cv.b
    cell = cells[0]
    D = len(cells)
    op = cell.op

    def stack(arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays, axis=0)

    inputs = [xt, b.const(stack([c.W for c in cells]), "W"), b.const(stack([c.R for c in cells]), "R"),
              b.const(stack([c.B for c in cells]), "B"), lengths or ""]
    if initial is not None:
        for k in range(len(STATE_NAMES[op])):
            parts = [b.unsqueeze(initial[d][k], [0]) for d in range(D)]  # (1, B, U) each
            inputs.append(parts[0] if D == 1 else b.op("Concat", parts, axis=0))
    while inputs[-1] == "":
        inputs.pop()
    attrs: dict[str, Any] = dict(hidden_size=cell.hidden_size, direction=direction,
                                 activations=[a for c in cells for a in c.activations], **cell.attrs)
    alphas = [a for c in cells for a in c.activation_alpha]
    betas = [a for c in cells for a in c.activation_beta]
    if alphas:
        attrs["activation_alpha"] = alphas
    if betas:
        attrs["activation_beta"] = betas
    n_states = len(STATE_NAMES[op])
    outputs = b.op(op, inputs, n_out=1 + n_states, **attrs)
    Y, states = outputs[0], outputs[1:]  # Y (T, D, B, U); states (D, B, U)
    if D == 1:
        per_state = [[b.squeeze(s, [0])] for s in states]
        Ys = [b.squeeze(Y, [1])]
    else:
        two = b.const(np.array([1, 1], np.int64), "split")
        Ys = [b.squeeze(y, [1]) for y in b.op("Split", [Y, two], n_out=2, axis=1)]
        per_state = [[b.squeeze(s_d, [0]) for s_d in b.op("Split", [s, two], n_out=2, axis=0)] for s in states]
    return [_Direction(Ys[d], per_state[0][d], per_state[1][d] if n_states == 2 else None) for d in range(D)]


def _keras_states(cv: _Converter, out: _Direction, *, lengths: str | None, initial: list[str] | None) -> list[str]:
    """The layer's final states as Keras returns them: a fully masked row keeps its initial state."""
    states = [s for s in (out.Y_h, out.Y_c) if s is not None]
    if lengths is None or initial is None:
        return states  # onnxruntime's zeros for a len-0 row equal a zero initial state
    b = cv.b
    any_step = b.unsqueeze(b.op("Greater", [lengths, b.const(np.array(0, np.int32), "zero")]), [1])  # (B, 1)
    return [b.op("Where", [any_step, new, old]) for new, old in zip(states, initial)]


def _keras_sequence(cv: _Converter, out: _Direction, *, lengths: str | None, carry: str, zero_output: bool) -> str:
    """Forward-direction sequence output (T, B, U) with Keras' masked-step rule (carry vs zeros)."""
    if lengths is None or zero_output:
        return out.Y  # ONNX already writes zeros at t ≥ len
    return cv.b.op("Where", [cv.valid_steps(lengths, out.Y), out.Y, carry])


def _flat(values) -> list:
    """A stacked RNN's initial_state nests one list per cell ([[h0, c0], h1]); every other layer's is flat."""
    if isinstance(values, (list, tuple)):
        return [v for item in values for v in _flat(item)]
    return [values]


def _initial_states(cv: _Converter, layer, args: tuple, kwargs: dict, *, n: int) -> list[str] | None:
    given = kwargs.get("initial_state")
    if given is None and len(args) > 1:
        given = args[1]
    if given is None:
        return None
    given = _flat(given)
    if len(given) != n or not all(isinstance(v, _Value) for v in given):
        raise cv.refuse(f"initial_state must be {n} graph tensors (got {len(given)})")
    return [v.name for v in given]


def _batch_major(cv: _Converter, seq_tm: str, kt, x: _Value) -> _Value:
    v = cv.value(cv.b.op("Transpose", [seq_tm], perm=[1, 0, 2]), kt, like=x, temporal=True)
    v.time_major = seq_tm
    return v


def _recurrent(cv: _Converter, layer, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
    """LSTM / GRU / SimpleRNN, and RNN over one built-in cell or a stack of them: one fused op per cell, each
    cell reading the previous cell's whole sequence (time-major, no Transpose between them). The output is the
    last cell's; the states, as Keras returns them, are every cell's in order."""
    x, mask = args[0], kwargs.get("mask")
    cells = _cells(cv, layer)
    if cv.step and layer.go_backwards:
        raise cv.not_streamable("runs backwards (go_backwards=True) from the end of the sequence")
    # State tensors are named per cell: `{layer}` for one cell, `{layer}.{k}` for cell k of a stack.
    units = [layer.name] if len(cells) == 1 else [f"{layer.name}.{k}" for k in range(len(cells))]
    names = [STATE_NAMES[cell.op] for cell in cells]
    lengths = cv.lengths(mask) if isinstance(mask, _Value) else None
    flat = _initial_states(cv, layer, args, kwargs, n=sum(len(n) for n in names))
    if cv.step:  # the step model's state inputs replace any user-provided initial state
        flat = [cv.state_input(unit, s, cell.hidden_size) for unit, cell, cell_names in zip(units, cells, names)
                for s in cell_names]
    direction = "reverse" if layer.go_backwards else "forward"
    b = cv.b
    in_step = sorted({c.op for c in cells if STEP_FORMS[c.op] == "decomposed"})
    if not cv.step and not layer.go_backwards and in_step:
        # The manifest's audit comes from the whole-sequence conversion: it names the step model's form too.
        cv.remark(f"its step model runs the {'/'.join(in_step)} cell decomposed (MatMul + gates; int8 by quantize_dynamic)")
    # The input in whichever layout the next cell wants: time-major (1 or T, B, F) for a fused op, (B, F) for a
    # decomposed step cell; each is made once, on demand (_prune drops what no cell read).
    xt: str | None = x.time_major
    x2d: str | None = x.step_2d
    states: list[str] = []
    for unit, cell, cell_names in zip(units, cells, names):
        initial = None if flat is None else flat[len(states):len(states) + len(cell_names)]
        if cv.step and (cv.step_form or STEP_FORMS[cell.op]) == "decomposed":
            if x2d is None:
                x2d = b.squeeze(x.name, [1]) if xt is None else b.squeeze(xt, [0])
            new = STEP_CELLS[cell.op](b, cell, x=x2d, states=initial)
            if lengths is not None:
                # What the fused op returns for a masked step (len 0 at T = 1): zeros, which the rules below rely on.
                valid = b.unsqueeze(b.op("Greater", [lengths, b.const(np.array(0, np.int32), "zero")]), [1])  # (B, 1)
                zero = b.const(np.array(0.0, np.float32), "zero")
                new = [b.op("Where", [valid, s, zero]) for s in new]
            out = _Direction(b.unsqueeze(new[0], [0]), new[0], new[1] if len(new) == 2 else None)
            cv.decomposed.add(layer.name)
        else:
            if xt is None:
                xt = cv.time_major(x) if x2d is None else b.unsqueeze(x2d, [0])
            # A masked step reaches the next cell as ONNX's zeros, which that cell skips too (same sequence_lens).
            (out,) = _fused(cv, [cell], direction=direction, xt=xt, lengths=lengths,
                            initial=None if initial is None else [initial])
        cell_states = _keras_states(cv, out, lengths=lengths, initial=initial)
        if cv.step:
            for s, name in zip(cell_states, cell_names):
                cv.state_outputs.append((s, f"state_out.{unit}.{name}"))
        states += cell_states
        xt, x2d = out.Y, out.Y_h if cv.step else None
    last_h = cell_states[0]
    # The "previous output" Keras carries over masked steps: the last valid output (zero if none) over a
    # whole sequence, the incoming state h in a step model.
    carry = last_h if cv.step else out.Y_h
    if cv.step and lengths is None and layer.return_sequences:
        # One step, nothing masked: the sequence output is the new h; no Transpose, and the next step cell
        # reads the (B, U) tensor itself.
        output = cv.value(b.unsqueeze(out.Y_h, [1]), outs[0], like=x, temporal=True)
        output.time_major, output.step_2d = out.Y, out.Y_h
        results = [output]
        if layer.return_state:
            results += [cv.value(s, kt, like=x, temporal=False) for s, kt in zip(states, outs[1:])]
        return results
    if layer.go_backwards:
        # Post-padding reversed is pre-padding: masked steps come first and carry zeros, as ONNX has.
        seq = b.flip_time(out.Y)
        last = out.Y_h
    else:
        seq = _keras_sequence(cv, out, lengths=lengths, carry=carry, zero_output=layer.zero_output_for_mask)
        if lengths is not None and layer.zero_output_for_mask:
            last = b.op("Gather", [seq, b.const(np.array(-1, np.int64), "last")], axis=0)
        else:
            last = carry
    output = _batch_major(cv, seq, outs[0], x) if layer.return_sequences else cv.value(last, outs[0], like=x, temporal=False)
    results = [output]
    if layer.return_state:
        results += [cv.value(s, kt, like=x, temporal=False) for s, kt in zip(states, outs[1:])]
    return results


BIDIRECTIONAL_MERGES: dict[str | None, Callable[[_Builder, str, str], list[str]]] = {
    "concat": lambda b, y, r: [b.op("Concat", [y, r], axis=-1)],
    "sum": lambda b, y, r: [b.op("Add", [y, r])],
    "mul": lambda b, y, r: [b.op("Mul", [y, r])],
    "ave": lambda b, y, r: [b.op("Mul", [b.op("Add", [y, r]), b.const(np.array(0.5, np.float32), "half")])],
    None: lambda b, y, r: [y, r],
}


def _bidirectional(cv: _Converter, layer, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
    if cv.step:
        raise cv.not_streamable("reads the sequence backwards from its end")
    x, mask = args[0], kwargs.get("mask")
    fwd_layer, bwd_layer = layer.forward_layer, layer.backward_layer
    cells = [_cell(cv, fwd_layer), _cell(cv, bwd_layer)]
    names = STATE_NAMES[cells[0].op]
    lengths = cv.lengths(mask) if isinstance(mask, _Value) else None
    initial = _initial_states(cv, layer, args, kwargs, n=2 * len(names))
    per_dir = None if initial is None else [initial[:len(names)], initial[len(names):]]
    xt = cv.time_major(x)
    if cells[0].signature() == cells[1].signature():
        fwd, bwd = _fused(cv, cells, direction="bidirectional", xt=xt, lengths=lengths, initial=per_dir)
    else:  # e.g. a custom backward_layer with other activations: one op per direction
        (fwd,) = _fused(cv, cells[:1], direction="forward", xt=xt, lengths=lengths, initial=per_dir and per_dir[:1])
        (bwd,) = _fused(cv, cells[1:], direction="reverse", xt=xt, lengths=lengths, initial=per_dir and per_dir[1:])
    states = (_keras_states(cv, fwd, lengths=lengths, initial=per_dir and per_dir[0])
              + _keras_states(cv, bwd, lengths=lengths, initial=per_dir and per_dir[1]))
    if layer.return_sequences:
        # Keras forces zero_output_for_mask on both layers here, and flips the backward output back into
        # time order: both are ONNX's own Y.
        y = _keras_sequence(cv, fwd, lengths=lengths, carry=fwd.Y_h, zero_output=fwd_layer.zero_output_for_mask)
        merged = BIDIRECTIONAL_MERGES[layer.merge_mode](cv.b, y, bwd.Y)
        results = [_batch_major(cv, m, kt, x) for m, kt in zip(merged, outs)]
    else:
        merged = BIDIRECTIONAL_MERGES[layer.merge_mode](cv.b, fwd.Y_h, bwd.Y_h)
        results = [cv.value(m, kt, like=x, temporal=False) for m, kt in zip(merged, outs)]
    if layer.return_state:
        results += [cv.value(s, kt, like=x, temporal=False) for s, kt in zip(states, outs[len(results):])]
    return results


# ---------------------------------------------------------------------------------------------------
# Non-recurrent layers.

def _numpy(variable) -> np.ndarray:
    # Variable.numpy(): np.array(variable) goes through an __array__ that NumPy 2 deprecates.
    return np.asarray(variable.numpy(), dtype=np.float32)


def _activation(cv: _Converter, fn, x: str) -> str:
    name = _activation_name(fn)
    if name not in ACTIVATIONS:
        raise cv.refuse(f"activation {name!r} has no converter (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name](cv.b, x)


def _identity(cv: _Converter, layer, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
    return [args[0]]


def _dense(cv: _Converter, layer, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
    x, b = args[0], cv.b
    if getattr(layer, "quantization_mode", None) or getattr(layer, "lora_enabled", False):
        raise cv.refuse("quantized or LoRA Dense weights are not read by this converter")
    y = b.op("MatMul", [x.name, b.const(_numpy(layer.kernel), "kernel")])  # (…, F) @ (F, U)
    if layer.use_bias:
        y = b.op("Add", [y, b.const(_numpy(layer.bias), "bias")])
    return [cv.value(_activation(cv, layer.activation, y), outs[0], like=x)]


def _activation_layer(cv: _Converter, layer, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
    return [cv.value(_activation(cv, layer.activation, args[0].name), outs[0], like=args[0])]


# TimeDistributed applies its layer to each step: only layers acting on the last axis are the same
# layer applied to the whole (B, T, F) tensor.
TIME_DISTRIBUTABLE = ("Dense", "Activation") + IDENTITY_LAYERS


def _time_distributed(cv: _Converter, layer, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
    inner = layer.layer
    if type(inner).__name__ not in TIME_DISTRIBUTABLE:
        raise cv.refuse(f"TimeDistributed({type(inner).__name__}) is not supported (only {', '.join(TIME_DISTRIBUTABLE[:2])})")
    return LAYERS[type(inner).__name__](cv, inner, args[:1], {}, outs)


def _embedding(cv: _Converter, layer, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
    ids, b = args[0], cv.b
    if getattr(layer, "quantization_mode", None) or getattr(layer, "lora_enabled", False):
        raise cv.refuse("quantized or LoRA embeddings are not read by this converter")
    index = ids.name if ids.dtype in (TensorProto.INT32, TensorProto.INT64) else b.cast(ids.name, TensorProto.INT64)
    y = b.op("Gather", [b.const(_numpy(layer.embeddings), "embeddings"), index], axis=0)  # (B, T, D)
    if layer.mask_zero:
        cv.masking.append({"input": ids.origin, "kind": "mask_zero", "value": 0.0})
    return [cv.value(y, outs[0], like=ids, temporal=ids.temporal or len(ids.shape) == 2)]


def _masking(cv: _Converter, layer, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
    """outputs = x where any(x != mask_value, axis=-1) else 0; the mask itself is computed by graph ops."""
    x, b = args[0], cv.b
    value = b.const(np.array(layer.mask_value, np.float32), "mask_value")
    keep = b.reduce("ReduceMax", b.cast(b.op("Not", [b.op("Equal", [x.name, value])]), TensorProto.FLOAT), [-1],
                    keepdims=True)  # (B, T, 1) in {0, 1}
    cv.masking.append({"input": x.origin, "kind": "mask_value", "value": float(layer.mask_value)})
    return [cv.value(b.op("Mul", [x.name, keep]), outs[0], like=x)]


def _last_axis(cv: _Converter, layer, axis, rank: int) -> None:
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    if [a % rank for a in axes] != [rank - 1]:
        raise cv.refuse(f"normalizes over axis {axis}; only the last axis is supported")


def _batch_norm(cv: _Converter, layer, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
    """Inference BatchNormalization folded into x·scale + shift (scale = γ/√(var+ε), shift = β − mean·scale)."""
    x, b = args[0], cv.b
    _last_axis(cv, layer, layer.axis, len(x.shape))
    mean = _numpy(layer.moving_mean).astype(np.float64)
    var = _numpy(layer.moving_variance).astype(np.float64)
    scale = 1.0 / np.sqrt(var + layer.epsilon)
    if layer.scale:
        scale = scale * _numpy(layer.gamma)
    shift = -mean * scale + (_numpy(layer.beta) if layer.center else 0.0)
    y = b.op("Add", [b.op("Mul", [x.name, b.const(scale.astype(np.float32), "scale")]),
                     b.const(shift.astype(np.float32), "shift")])
    return [cv.value(y, outs[0], like=x)]


def _layer_norm(cv: _Converter, layer, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
    x, b = args[0], cv.b
    _last_axis(cv, layer, layer.axis, len(x.shape))
    if getattr(layer, "rms_scaling", False):
        raise cv.refuse("rms_scaling=True has no converter")
    C = x.shape[-1]
    gamma = _numpy(layer.gamma) if layer.scale else np.ones(C, np.float32)
    beta = _numpy(layer.beta) if layer.center else np.zeros(C, np.float32)
    if b.opset >= LAYER_NORM_OPSET:
        y = b.op("LayerNormalization", [x.name, b.const(gamma, "gamma"), b.const(beta, "beta")], axis=-1,
                 epsilon=float(layer.epsilon))
        return [cv.value(y, outs[0], like=x)]
    mean = b.reduce("ReduceMean", x.name, [-1], keepdims=True)
    centred = b.op("Sub", [x.name, mean])
    var = b.reduce("ReduceMean", b.op("Mul", [centred, centred]), [-1], keepdims=True)
    std = b.op("Sqrt", [b.op("Add", [var, b.const(np.array(layer.epsilon, np.float32), "epsilon")])])
    y = b.op("Add", [b.op("Mul", [b.op("Div", [centred, std]), b.const(gamma, "gamma")]), b.const(beta, "beta")])
    return [cv.value(y, outs[0], like=x)]


def _over_time(cv: _Converter, x: _Value, what: str) -> None:
    if cv.step and x.temporal:
        raise cv.not_streamable(f"{what} across the time axis")


def _flatten(cv: _Converter, layer, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
    _over_time(cv, args[0], "flattens")
    return [cv.value(cv.b.op("Flatten", [args[0].name], axis=1), outs[0], like=args[0], temporal=False)]


def _reshape(cv: _Converter, layer, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
    x = args[0]
    _over_time(cv, x, "reshapes")
    # 0 copies the batch dimension; Keras' target_shape excludes it and may hold one -1.
    shape = cv.b.const(np.array([0, *layer.target_shape], np.int64), "shape")
    return [cv.value(cv.b.op("Reshape", [x.name, shape]), outs[0], like=x, temporal=False)]


def _repeat_vector(cv: _Converter, layer, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
    if cv.step:
        raise cv.not_streamable("builds a time axis from a whole-sequence summary")
    x, b = args[0], cv.b
    y = b.op("Tile", [b.unsqueeze(x.name, [1]), b.const(np.array([1, layer.n, 1], np.int64), "repeats")])
    return [cv.value(y, outs[0], like=x, temporal=True)]


def _merged(cv: _Converter, xs: list[_Value], kt, y: str) -> _Value:
    v = cv.value(y, kt, like=xs[0])
    v.temporal = any(x.temporal for x in xs)
    return v


def _concatenate(cv: _Converter, layer, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
    xs = list(args[0])
    if layer.axis % len(xs[0].shape) == 1:
        for x in xs:
            _over_time(cv, x, "concatenates")
    return [_merged(cv, xs, outs[0], cv.b.op("Concat", [x.name for x in xs], axis=layer.axis))]


def _add(cv: _Converter, layer, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
    xs = list(args[0])
    return [_merged(cv, xs, outs[0], cv.b.op("Sum", [x.name for x in xs]))]


# Keras layer class → converter: the single truth of what this module converts.
LAYERS: dict[str, Callable[..., list[_Value]]] = {
    "LSTM": _recurrent,
    "GRU": _recurrent,
    "SimpleRNN": _recurrent,
    "RNN": _recurrent,  # over built-in cells only (CELL_CONVERTERS), one or a stack
    "Bidirectional": _bidirectional,
    "Dense": _dense,
    "Activation": _activation_layer,
    "TimeDistributed": _time_distributed,
    "Embedding": _embedding,
    "Masking": _masking,
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "RepeatVector": _repeat_vector,
    "Concatenate": _concatenate,
    "Add": _add,
    **{name: _identity for name in IDENTITY_LAYERS},
}


# ---------------------------------------------------------------------------------------------------
# Keras graph ops (how Keras 3 writes masks into the functional graph), op class → converter.

def _as_bool(b: _Builder, x: _Value) -> str:
    return x.name if x.dtype == TensorProto.BOOL else b.cast(x.name, TensorProto.BOOL)


def _op_not_equal(cv: _Converter, op, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
    x, other = args
    b = cv.b
    if isinstance(other, _Value):
        other_name = other.name
    else:
        other_name = b.const(np.array(other, dtype=helper.tensor_dtype_to_np_dtype(x.dtype)), "other")
    return [cv.value(b.op("Not", [b.op("Equal", [x.name, other_name])]), outs[0], like=x)]


def _op_reduce_bool(reduce_op: str) -> Callable[..., list[_Value]]:
    def convert(cv: _Converter, op, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
        x, b = args[0], cv.b
        axes = list(op.axis) if op.axis is not None else list(range(len(x.shape)))
        if cv.step and x.temporal and any(a % len(x.shape) == 1 for a in axes):
            raise NotStreamableError(f"graph op {op.name!r} reduces over the time axis, so the model has no step form")
        as_float = b.cast(_as_bool(b, x), TensorProto.FLOAT)
        y = b.cast(b.reduce(reduce_op, as_float, axes, keepdims=op.keepdims), TensorProto.BOOL)
        return [cv.value(y, outs[0], like=x)]
    return convert


def _op_logical(onnx_op: str) -> Callable[..., list[_Value]]:
    def convert(cv: _Converter, op, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
        x, y = args
        return [_merged(cv, [x, y], outs[0], cv.b.op(onnx_op, [_as_bool(cv.b, x), _as_bool(cv.b, y)]))]
    return convert


def _op_fill_like(fill: float) -> Callable[..., list[_Value]]:
    def convert(cv: _Converter, op, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
        x, b = args[0], cv.b
        dtype = _onnx_dtype(outs[0].dtype)
        value = numpy_helper.from_array(np.array([fill], dtype=helper.tensor_dtype_to_np_dtype(dtype)))
        return [cv.value(b.op("ConstantOfShape", [b.op("Shape", [x.name])], value=value), outs[0], like=x)]
    return convert


def _op_expand_dims(cv: _Converter, op, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
    axes = list(op.axis) if isinstance(op.axis, (list, tuple)) else [op.axis]
    return [cv.value(cv.b.unsqueeze(args[0].name, axes), outs[0], like=args[0])]


def _op_squeeze(cv: _Converter, op, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
    if op.axis is None:
        raise cv.refuse("squeeze without an axis has no fixed output rank")
    axes = list(op.axis) if isinstance(op.axis, (list, tuple)) else [op.axis]
    return [cv.value(cv.b.squeeze(args[0].name, axes), outs[0], like=args[0])]


def _op_concatenate(cv: _Converter, op, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
    xs = list(args[0])
    return [_merged(cv, xs, outs[0], cv.b.op("Concat", [x.name for x in xs], axis=op.axis))]


def _op_cast(cv: _Converter, op, args: tuple, kwargs: dict, outs: list) -> list[_Value]:
    return [cv.value(cv.b.cast(args[0].name, _onnx_dtype(outs[0].dtype)), outs[0], like=args[0])]


OPS: dict[str, Callable[..., list[_Value]]] = {
    "NotEqual": _op_not_equal,
    "Any": _op_reduce_bool("ReduceMax"),
    "All": _op_reduce_bool("ReduceMin"),
    "LogicalOr": _op_logical("Or"),
    "LogicalAnd": _op_logical("And"),
    "ZerosLike": _op_fill_like(0.0),
    "OnesLike": _op_fill_like(1.0),
    "ExpandDims": _op_expand_dims,
    "Squeeze": _op_squeeze,
    "Concatenate": _op_concatenate,
    "Cast": _op_cast,
}


# ---------------------------------------------------------------------------------------------------
# Audit: what each layer became, and what onnxruntime can do with it.

SPEED_NOTES: dict[str, str] = {
    "LSTM": "fused LSTM: the input projection is one GEMM over all steps, only the recurrence is sequential",
    "GRU": "fused GRU: the input projection is one GEMM over all steps, only the recurrence is sequential",
    "RNN": "fused RNN: the input projection is one GEMM over all steps, only the recurrence is sequential",
    "MatMul": "one MatMul over all steps",
    "Gather": "table lookup",
    "LayerNormalization": "one LayerNormalization kernel",
    "ReduceMean": "layer norm decomposed into element-wise ops (opset < 17)",
}


# Ops that hold the weights: the ones quantization is about (Transpose or Concat in onnxruntime's registry
# only pass int8 through).
WEIGHT_OPS = ("MatMul", "Gather") + FUSED_RECURRENT_OPS


def _note(cls: str, ops: list[str], *, speed: str | None = None) -> str:
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    if not ops:
        if cls == "InputLayer":
            return "graph input"
        return "no ONNX node (identity at inference)" if cls in IDENTITY_LAYERS else "no ONNX node"
    speed = speed or next((SPEED_NOTES[o] for o in ops if o in SPEED_NOTES), "element-wise ops")
    int8 = sorted({o for o in ops if o in WEIGHT_OPS and o in IntegerOpsRegistry})
    stays = sorted({o for o in ops if o in WEIGHT_OPS and o not in IntegerOpsRegistry})
    quant = f"quantize_dynamic makes {', '.join(int8)} int8" if int8 else "quantize_dynamic leaves it float32"
    if stays:
        quant += f"; {', '.join(stays)} stays float32 (not in onnxruntime's IntegerOps registry)"
    return f"{speed}; {quant}"


def _audit(b: _Builder, layers: list[tuple[str, str]], remarks: dict[str, str], decomposed: set[str]) -> list[LayerAudit]:
    ops_of: dict[str, list[str]] = defaultdict(list)
    for node in b.nodes:
        ops_of[b.owner_of[node.name]].append(node.op_type)
    audit = []
    for name, cls in layers:
        ops = ops_of.get(name, [])
        note = _note(cls, ops, speed=DECOMPOSED_NOTE if name in decomposed else None)
        note += f"; {remarks[name]}" if name in remarks else ""
        audit.append(LayerAudit(name, cls, ops, any(o in FUSED_RECURRENT_OPS for o in ops), note))
    return audit


# ---------------------------------------------------------------------------------------------------

def _functional(keras_model):
    import keras
    from keras.src.models.functional import Functional

    if isinstance(keras_model, keras.Sequential):
        if keras_model._functional is None:
            raise UnsupportedLayerError(
                f"model {keras_model.name!r} (Sequential) is not built — give it a keras.Input or call build()"
            )
        return keras_model._functional
    if isinstance(keras_model, Functional):
        return keras_model
    raise UnsupportedLayerError(
        f"model {keras_model.name!r} ({type(keras_model).__name__}) is a subclassed model with no layer graph — "
        "rebuild it as Sequential or functional, or export it with tf2onnx"
    )


def stateful_layers(keras_model) -> list:
    """Every recurrent layer of the model with stateful=True (inside Bidirectional too)."""
    import keras

    return [layer for layer in keras_model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.RNN) and layer.stateful]


def stateful_batch(keras_model) -> int | None:
    """The batch a stateful model is fixed at (its state variables' rows), None when no layer is stateful."""
    import keras

    rows = {int(keras.tree.flatten(layer.states)[0].shape[0]) for layer in stateful_layers(keras_model)}
    if len(rows) > 1:
        raise EdgeRnnError(f"model {keras_model.name!r}: stateful layers at different batch sizes {sorted(rows)}")
    return rows.pop() if rows else None


def reset_states(keras_model) -> None:
    """Zero every stateful layer's state (layer.reset_states() fails on a stacked RNN's nested state list)."""
    import keras

    for layer in stateful_layers(keras_model):
        for variable in keras.tree.flatten(layer.states):
            variable.assign(np.zeros(variable.shape, variable.dtype))


def _dims(shape: tuple, *, temporal: bool, step: bool) -> list:
    dims: list = []
    for axis, d in enumerate(shape):
        if axis == 0:
            dims.append(BATCH_DIM)
        elif axis == 1 and temporal and step:
            dims.append(1)
        elif d is None:
            dims.append(TIME_DIM if axis == 1 else f"dim{axis}")
        else:
            dims.append(int(d))
    return dims


def _prune(b: _Builder, outputs: list[str]) -> None:
    """Drop nodes and initializers no graph output needs (e.g. an encoder whose state a step input replaced)."""
    needed = set(outputs)
    kept = []
    for node in reversed(b.nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    b.nodes = kept[::-1]
    b.initializers = {k: v for k, v in b.initializers.items() if k in needed}
    b.used = needed


def _is_temporal_input(kt, embedded: set[int]) -> bool:
    """A (B, T, F…) float sequence or a (B, T) id sequence — integer, or of any dtype where an Embedding reads it
    (`embedded`: ids of such tensors; Keras' default float32 Input feeds ids as floats); (B, F) float features are not."""
    return len(kt.shape) >= 3 or (len(kt.shape) == 2 and ("int" in str(kt.dtype) or id(kt) in embedded))


def _embedded_inputs(graph_model, keras) -> set[int]:
    """ids of the tensors an Embedding layer reads (an id sequence whatever its dtype)."""
    found = set()
    for layer in graph_model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.Embedding):
            for node in getattr(layer, "_inbound_nodes", []):
                found.update(id(t) for t in node.input_tensors)
    return found


def convert(keras_model, *, opset: int = 17, step: bool = False, step_form: str | None = None) -> Conversion:
    """Keras 3 Sequential/functional model → ONNX (fused recurrent ops; inputs/outputs batch-major float32/int).

    step_form (step models only): None takes decomposed.STEP_FORMS per cell kind; "fused" or "decomposed" forces
    one form on every cell."""
    keras = require("keras", "train")
    if opset not in SUPPORTED_OPSETS:
        raise EdgeRnnError(f"opset {opset} is not supported; choose {SUPPORTED_OPSETS.start}–{SUPPORTED_OPSETS.stop - 1}")
    graph_model = _functional(keras_model)
    if step_form not in (None, "fused", "decomposed"):
        raise EdgeRnnError(f"step_form {step_form!r}: choose 'fused' or 'decomposed' (or None for the default per cell kind)")
    cv = _Converter(opset=opset, step=step, step_form=step_form)
    values: dict[int, _Value] = {}
    graph_inputs = []
    audited: list[tuple[str, str]] = []
    embedded = _embedded_inputs(graph_model, keras)
    for kt in graph_model.inputs:
        audited.append((kt._keras_history.operation.name, "InputLayer"))
        name = _sanitise(kt._keras_history.operation.name)
        temporal = _is_temporal_input(kt, embedded)
        values[id(kt)] = _Value(name, _onnx_dtype(kt.dtype), tuple(kt.shape), temporal, name)
        graph_inputs.append((name, _onnx_dtype(kt.dtype), _dims(tuple(kt.shape), temporal=temporal, step=step)))

    for depth in sorted(graph_model._nodes_by_depth, reverse=True):
        for node in graph_model._nodes_by_depth[depth]:
            operation = node.operation
            if operation is None or node.is_input:
                continue
            cls = type(operation).__name__
            is_layer = isinstance(operation, keras.layers.Layer)
            registry, key = (LAYERS, cls) if is_layer else (OPS, cls)
            cv.layer = operation
            cv.b.owner = operation.name
            if isinstance(operation, keras.Model):
                raise cv.refuse("nested models are not walked", todo="call the inner model's layers directly")
            if key not in registry:
                raise cv.refuse("no converter for this layer" if is_layer else "no converter for this graph op")
            args, kwargs = node.arguments.fill_in(values)
            outputs = registry[key](cv, operation, args, kwargs, list(node.outputs))
            assert len(outputs) == len(node.outputs), (operation.name, len(outputs), len(node.outputs))
            for kt, value in zip(node.outputs, outputs):
                values[id(kt)] = value
            audited.append((operation.name, cls if is_layer else f"ops.{cls}"))

    b = cv.b
    b.owner = "graph"
    graph_outputs: list[tuple[str, _Value, list]] = []
    for kt, name in zip(graph_model.outputs, output_names(graph_model.outputs)):
        v = values[id(kt)]
        b.nodes.append(helper.make_node("Identity", [v.name], [name], name=f"output/{name}"))
        b.owner_of[f"output/{name}"] = "graph"
        graph_outputs.append((name, v, _dims(tuple(kt.shape), temporal=v.temporal, step=step)))
    for internal, name in cv.state_outputs:
        b.nodes.append(helper.make_node("Identity", [internal], [name], name=f"output/{name}"))
        b.owner_of[f"output/{name}"] = "graph"

    out_names = [name for name, _, _ in graph_outputs] + [name for _, name in cv.state_outputs]
    _prune(b, out_names)
    inputs = [(n, d, s) for n, d, s in graph_inputs if n in b.used]
    state_inputs = [vi for vi in cv.state_inputs if vi.name in b.used]
    onnx_inputs = [helper.make_tensor_value_info(n, d, s) for n, d, s in inputs] + state_inputs
    state_shapes = {s["output"]: s["shape"] for s in cv.state}
    onnx_outputs = [helper.make_tensor_value_info(n, v.dtype, s) for n, v, s in graph_outputs] + [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, state_shapes[name]) for _, name in cv.state_outputs
    ]
    # The file says which form its step cells have, so a step model read on its own tells fused from decomposed.
    doc = f"{DECOMPOSED_NOTE}: {', '.join(sorted(cv.decomposed))}" if cv.decomposed else ""
    graph = helper.make_graph(b.nodes, _sanitise(keras_model.name), onnx_inputs, onnx_outputs,
                              initializer=list(b.initializers.values()), doc_string=doc)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=PRODUCER)
    # ir_version 8 is what opsets 17/18 shipped with, so older onnxruntime builds on devices can load it.
    model.ir_version = 8
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise EdgeRnnError(f"the converted graph of {keras_model.name!r} fails onnx.checker ({str(exc).splitlines()[0]})") from exc

    def spec(name: str, dtype: int, shape: list) -> dict:
        return {"name": name, "dtype": str(helper.tensor_dtype_to_np_dtype(dtype)), "shape": shape}

    io = {
        "inputs": [spec(n, d, s) for n, d, s in inputs] + [spec(s["input"], TensorProto.FLOAT, s["shape"]) for s in cv.state],
        "outputs": [spec(n, v.dtype, s) for n, v, s in graph_outputs]
        + [spec(s["output"], TensorProto.FLOAT, s["shape"]) for s in cv.state],
    }
    masking = [m for m in cv.masking if m["input"] in b.used]
    return Conversion(model, io, _audit(b, audited, cv.remarks, cv.decomposed), masking, cv.state)
