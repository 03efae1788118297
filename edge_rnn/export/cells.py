"""Keras recurrent cell weights → ONNX `W`, `R`, `B` and activation attributes, one function per cell kind.

Workstation side: reads Keras variables (numpy only here; the caller imports keras).

Gate layouts, written down once (columns of the Keras kernel, rows of the ONNX weight):

    Keras LSTM kernel (F, 4U): i f c o        ONNX LSTM W (1, 4U, F): i o f c
    Keras GRU  kernel (F, 3U): z r h          ONNX GRU  W (1, 3U, F): z r h
    Keras SimpleRNN   (F, U)                  ONNX RNN  W (1, U, F)

ONNX stores W as (gates·U, F), the transpose of Keras' (F, gates·U), and B as [Wb, Rb] (1, 2·gates·U).
Keras adds one bias per gate except GRU(reset_after=True), whose bias (2, 3U) is [input bias, recurrent
bias] — exactly ONNX's Wb, Rb with `linear_before_reset=1` (the recurrent bias sits inside r ⊙ (…)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import numpy.typing as npt

from ..errors import EdgeRnnError

KERAS_LSTM_GATES = "ifco"
ONNX_LSTM_GATES = "iofc"
KERAS_GRU_GATES = "zrh"
ONNX_GRU_GATES = "zrh"

# Keras activation name → (ONNX recurrent activation, alpha, beta). alpha/beta are None where the ONNX
# function takes no such parameter: onnxruntime consumes `activation_alpha`/`activation_beta` only for the
# functions that use them, in order, so a list entry for any other function would shift the rest.
# Keras 3's hard_sigmoid is relu6(x + 3) / 6 = clip(x/6 + 1/2, 0, 1), not Keras 2's 0.2x + 0.5.
RECURRENT_ACTIVATIONS: dict[str, tuple[str, float | None, float | None]] = {
    "sigmoid": ("Sigmoid", None, None),
    "tanh": ("Tanh", None, None),
    "relu": ("Relu", None, None),
    "linear": ("Affine", 1.0, 0.0),
    "hard_sigmoid": ("HardSigmoid", 1.0 / 6.0, 0.5),
    "softsign": ("Softsign", None, None),
    "softplus": ("Softplus", None, None),
    "elu": ("Elu", 1.0, None),
}


class UnsupportedCellError(EdgeRnnError):
    """A recurrent cell uses an activation or option that has no ONNX recurrent-op equivalent."""


@dataclass
class CellWeights:
    """One direction of a fused ONNX recurrent op: weights in ONNX layout plus its attributes."""

    op: str  # "LSTM" | "GRU" | "RNN"
    hidden_size: int
    W: npt.NDArray[np.float32]  # (1, G·U, F)
    R: npt.NDArray[np.float32]  # (1, G·U, U)
    B: npt.NDArray[np.float32]  # (1, 2·G·U)
    activations: list[str]
    activation_alpha: list[float] = field(default_factory=list)
    activation_beta: list[float] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)  # op-specific, e.g. linear_before_reset

    def signature(self) -> tuple:
        """What must match for two directions to share one op with direction="bidirectional"."""
        return (self.op, self.hidden_size, tuple(self.activations), tuple(self.activation_alpha),
                tuple(self.activation_beta), tuple(sorted(self.attrs.items())), self.W.shape[2])


def _activation_name(fn) -> str:
    import keras

    name = getattr(fn, "__name__", None)
    return name if name is not None and keras.activations.get(name) is fn else repr(fn)


def _activations(layer_name: str, fns: list) -> tuple[list[str], list[float], list[float]]:
    names, alphas, betas = [], [], []
    for fn in fns:
        keras_name = _activation_name(fn)
        if keras_name not in RECURRENT_ACTIVATIONS:
            raise UnsupportedCellError(
                f"layer {layer_name!r}: activation {keras_name!r} has no ONNX recurrent equivalent "
                f"(supported: {', '.join(RECURRENT_ACTIVATIONS)})"
            )
        onnx_name, alpha, beta = RECURRENT_ACTIVATIONS[keras_name]
        names.append(onnx_name)
        if alpha is not None:
            alphas.append(alpha)
        if beta is not None:
            betas.append(beta)
    return names, alphas, betas


def _numpy(variable) -> np.ndarray:
    # Variable.numpy(): np.array(variable) goes through an __array__ that NumPy 2 deprecates.
    return np.asarray(variable.numpy(), dtype=np.float32)


def _regroup(kernel: np.ndarray, *, units: int, keras_gates: str, onnx_gates: str) -> np.ndarray:
    """(rows, G·U) in Keras gate order → (G·U, rows) in ONNX gate order."""
    blocks = {gate: kernel[..., k * units:(k + 1) * units] for k, gate in enumerate(keras_gates)}
    return np.concatenate([blocks[gate] for gate in onnx_gates], axis=-1).T


def lstm_weights(cell, *, layer_name: str) -> CellWeights:
    """Keras LSTMCell → ONNX LSTM weights W (1, 4U, F), R (1, 4U, U), B (1, 8U) float32; activations f, g, h."""
    U = cell.units
    kernel, recurrent = _numpy(cell.kernel), _numpy(cell.recurrent_kernel)  # (F, 4U), (U, 4U)
    F = kernel.shape[0]
    bias = _numpy(cell.bias) if cell.use_bias else np.zeros(4 * U, np.float32)  # (4U,)
    assert kernel.shape == (F, 4 * U) and recurrent.shape == (U, 4 * U) and bias.shape == (4 * U,)
    W = _regroup(kernel, units=U, keras_gates=KERAS_LSTM_GATES, onnx_gates=ONNX_LSTM_GATES)[None]
    R = _regroup(recurrent, units=U, keras_gates=KERAS_LSTM_GATES, onnx_gates=ONNX_LSTM_GATES)[None]
    Wb = _regroup(bias[None], units=U, keras_gates=KERAS_LSTM_GATES, onnx_gates=ONNX_LSTM_GATES)[:, 0]
    B = np.concatenate([Wb, np.zeros(4 * U, np.float32)])[None]  # Keras has one bias: Rb = 0
    assert W.shape == (1, 4 * U, F) and R.shape == (1, 4 * U, U) and B.shape == (1, 8 * U)
    # ONNX LSTM: f = gates (i, o, f), g = cell input, h = cell output — Keras' recurrent_activation,
    # activation, activation.
    names, alphas, betas = _activations(layer_name, [cell.recurrent_activation, cell.activation, cell.activation])
    return CellWeights("LSTM", U, W, R, B, names, alphas, betas)


def gru_weights(cell, *, layer_name: str) -> CellWeights:
    """Keras GRUCell → ONNX GRU weights W (1, 3U, F), R (1, 3U, U), B (1, 6U) float32 and linear_before_reset."""
    U = cell.units
    kernel, recurrent = _numpy(cell.kernel), _numpy(cell.recurrent_kernel)  # (F, 3U), (U, 3U)
    F = kernel.shape[0]
    assert kernel.shape == (F, 3 * U) and recurrent.shape == (U, 3 * U)
    if not cell.use_bias:
        Wb, Rb = np.zeros(3 * U, np.float32), np.zeros(3 * U, np.float32)
    elif cell.reset_after:
        bias = _numpy(cell.bias)
        assert bias.shape == (2, 3 * U)
        Wb, Rb = bias[0], bias[1]
    else:
        bias = _numpy(cell.bias)
        assert bias.shape == (3 * U,)
        # reset_after=False adds the bias outside r ⊙ (…): that is ONNX's Wb, and Rb stays zero.
        Wb, Rb = bias, np.zeros(3 * U, np.float32)
    W = _regroup(kernel, units=U, keras_gates=KERAS_GRU_GATES, onnx_gates=ONNX_GRU_GATES)[None]
    R = _regroup(recurrent, units=U, keras_gates=KERAS_GRU_GATES, onnx_gates=ONNX_GRU_GATES)[None]
    B = np.concatenate([
        _regroup(Wb[None], units=U, keras_gates=KERAS_GRU_GATES, onnx_gates=ONNX_GRU_GATES)[:, 0],
        _regroup(Rb[None], units=U, keras_gates=KERAS_GRU_GATES, onnx_gates=ONNX_GRU_GATES)[:, 0],
    ])[None]
    assert W.shape == (1, 3 * U, F) and R.shape == (1, 3 * U, U) and B.shape == (1, 6 * U)
    names, alphas, betas = _activations(layer_name, [cell.recurrent_activation, cell.activation])
    return CellWeights("GRU", U, W, R, B, names, alphas, betas, {"linear_before_reset": int(bool(cell.reset_after))})


def simple_rnn_weights(cell, *, layer_name: str) -> CellWeights:
    """Keras SimpleRNNCell → ONNX RNN weights W (1, U, F), R (1, U, U), B (1, 2U) float32."""
    U = cell.units
    kernel, recurrent = _numpy(cell.kernel), _numpy(cell.recurrent_kernel)  # (F, U), (U, U)
    F = kernel.shape[0]
    bias = _numpy(cell.bias) if cell.use_bias else np.zeros(U, np.float32)
    assert kernel.shape == (F, U) and recurrent.shape == (U, U) and bias.shape == (U,)
    W, R = kernel.T[None], recurrent.T[None]
    B = np.concatenate([bias, np.zeros(U, np.float32)])[None]
    assert W.shape == (1, U, F) and R.shape == (1, U, U) and B.shape == (1, 2 * U)
    names, alphas, betas = _activations(layer_name, [cell.activation])
    return CellWeights("RNN", U, W, R, B, names, alphas, betas)


# Keras cell class → converter: the single truth of which recurrent cells become fused ONNX ops.
CELL_CONVERTERS: dict[str, Callable[..., CellWeights]] = {
    "LSTMCell": lstm_weights,
    "GRUCell": gru_weights,
    "SimpleRNNCell": simple_rnn_weights,
}
# The state tensors each ONNX op carries, in Keras' return_state order.
STATE_NAMES: dict[str, tuple[str, ...]] = {"LSTM": ("h", "c"), "GRU": ("h",), "RNN": ("h",)}
