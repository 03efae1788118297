"""A user's own model for the README's bench: a GRU(128) digit classifier on the bundled MNIST sample.

Built and trained with plain Keras (no edge-rnn code), saved as a .keras file, so that `edge-rnn export`,
`quantize` and `bench` meet it the way they meet any user's model:

    python scripts/demo_gru.py OUT/gru-mnist.keras [EPOCHS]     # ~30 s on 2 cores for the default 8 epochs
    edge-rnn export OUT/gru-mnist.keras --out OUT/gru-mnist
    edge-rnn bench OUT/gru-mnist --threads 1

tf2onnx turns this GRU into a `Loop`; edge-rnn's exporter into one fused ONNX `GRU`.
"""

from __future__ import annotations

import sys

import numpy as np


def main(path: str, epochs: int = 8) -> None:
    from edge_rnn.train.data import load_sample
    from edge_rnn.errors import require

    keras = require("keras", "train")  # imported quietly: TensorFlow's C++ start-up lines go to /dev/null

    digits = load_sample()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28), name="rows"),
            keras.layers.GRU(128),
            keras.layers.Dense(10, activation="softmax", name="probs"),
        ],
        name="gru_mnist",
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  steps_per_execution=32)
    x_train, x_test = digits.x_train.astype(np.float32) / 255.0, digits.x_test.astype(np.float32) / 255.0
    model.fit(x_train, digits.y_train, epochs=epochs, batch_size=32, verbose=0)
    _, accuracy = model.evaluate(x_test, digits.y_test, verbose=0)
    model.save(path)
    print(f"{path}: held-out accuracy {accuracy:.2%} on {len(x_test)} real digits")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gru-mnist.keras", int(sys.argv[2]) if len(sys.argv) > 2 else 8)
