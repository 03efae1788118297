"""The tf2onnx path: a whole Keras model through tf2onnx, for layers edge-rnn's own converter (keras_onnx) refuses,
and as the plain baseline `bench` compares the fused export with. tf2onnx may emit Loop; optimize.py cleans its graph.

Workstation side: imports tensorflow and tf2onnx inside functions.
"""

from __future__ import annotations

from typing import Any

from ..errors import require

# tf2onnx names the dynamic batch axis `unk__N`; edge-rnn's graphs call it this.
BATCH_DIM = "batch"


def _name_batch_axis(model) -> None:
    """tf2onnx names the dynamic batch axis `unk__N`; call it `batch` on every graph input and output."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_param = BATCH_DIM


def _stateless(config: Any) -> Any:
    """A Keras config tree with every `stateful` flag off."""
    if isinstance(config, dict):
        return {k: False if k == "stateful" else _stateless(v) for k, v in config.items()}
    if isinstance(config, list):
        return [_stateless(v) for v in config]
    return config


def stateless_twin(keras_model):
    """The model itself, or where a layer is stateful=True a copy with stateful=False and the same weights: what
    the ONNX graphs compute (Keras from zero state), and what tf2onnx can trace with a free batch axis (a stateful
    layer's state variables are fixed at the model's batch)."""
    keras = require("keras", "train")
    from .keras_onnx import stateful_layers

    if not stateful_layers(keras_model):
        return keras_model
    twin = keras.models.clone_model(
        keras_model, clone_function=lambda layer: layer.__class__.from_config(_stateless(layer.get_config())))
    # The state variables are no weights (Keras does not track them), so both models list the same weights.
    twin.set_weights(keras_model.get_weights())
    return twin


def keras_to_onnx(keras_model, *, io: dict[str, Any], opset: int):
    """Keras 3 model → onnx.ModelProto with fused recurrent ops, via tf2onnx.convert.from_function.

    (tf2onnx.convert.from_keras fails under Keras 3; a tf.function with an input_signature works.) A stateful
    model is traced as its stateless twin: the graph starts from zero state, like keras_onnx's.
    """
    tf = require("tensorflow", "train")
    tf2onnx = require("tf2onnx", "train")
    keras_model = stateless_twin(keras_model)
    specs = [
        tf.TensorSpec([None if isinstance(d, str) else d for d in spec["shape"]], spec["dtype"], name=spec["name"])
        for spec in io["inputs"]
    ]
    output_names = [spec["name"] for spec in io["outputs"]]

    @tf.function(input_signature=specs)
    def serve(*inputs):
        outputs = keras_model(inputs[0] if len(inputs) == 1 else list(inputs), training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        return dict(zip(output_names, outputs))

    model, _ = tf2onnx.convert.from_function(serve, input_signature=specs, opset=opset)
    _name_batch_axis(model)
    return model
