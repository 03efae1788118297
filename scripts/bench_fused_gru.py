"""Benchmark a GRU(128) model exported by tf2onnx (Loop under Keras 3) against edge_rnn.export.keras_onnx (fused GRU).

Usage: python scripts/bench_fused_gru.py [--rounds 9] [--iters 200]

The model is the MNIST-row shape: (28, 28) input → GRU(128) → Dense(10, softmax), seeded, untrained
(speed does not depend on the weights). Three graphs are timed, batch 1, one onnxruntime thread:

- tf2onnx: edge_rnn.export.keras_to_onnx (tf2onnx.convert.from_function on a tf.function with an
  input_signature), as the pipeline exports;
- tf2onnx + cleanup: the same after edge_rnn.export.optimize.clean_recurrent_graph, what the pipeline ships;
- keras_onnx: edge_rnn.export.keras_onnx.convert.

Rounds alternate between the graphs so load from other jobs hits all alike; each round times `iters`
calls; the script prints per-call medians over rounds, the best rounds, the ratios, each graph's op
counts and max |Δ| against Keras, and the CPU flags onnxruntime's kernels can use. Writes no files.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import Counter

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni")


def cpu_flags() -> dict[str, bool]:
    """Which of CPU_FLAGS /proc/cpuinfo lists (all False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return {flag: flag in flags for flag in CPU_FLAGS}


def build_model(*, seed: int = 0):
    """Keras GRU(128) classifier over (batch, 28, 28) float32 → (batch, 10) probabilities."""
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((28, 28), name="pixels"),
        keras.layers.GRU(128),
        keras.layers.Dense(10, activation="softmax", name="probs"),
    ])


def session(model_proto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def time_round(run, *, iters: int) -> float:
    """Seconds per call over `iters` calls."""
    start = time.perf_counter()
    for _ in range(iters):
        run()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()

    from edge_rnn.export.tf2onnx_fallback import keras_to_onnx
    from edge_rnn.export.keras_onnx import convert
    from edge_rnn.export.optimize import clean_recurrent_graph

    keras_model = build_model()
    io = {"inputs": [{"name": "pixels", "dtype": "float32", "shape": ["batch", 28, 28]}],
          "outputs": [{"name": "probs", "dtype": "float32", "shape": ["batch", 10]}]}
    tf2onnx_model = keras_to_onnx(keras_model, io=io, opset=17)
    cleaned, _ = clean_recurrent_graph(tf2onnx_model)
    graphs = {"tf2onnx": tf2onnx_model, "tf2onnx + cleanup": cleaned, "keras_onnx": convert(keras_model).model}

    x = np.random.default_rng(0).random((1, 28, 28), dtype=np.float32)
    check = np.random.default_rng(1).random((16, 28, 28), dtype=np.float32)
    expected = np.asarray(keras_model(check, training=False))
    runners = {}
    for name, proto in graphs.items():
        sess = session(proto)
        input_name = sess.get_inputs()[0].name
        diff = float(np.max(np.abs(sess.run(None, {input_name: check})[0] - expected)))
        counts = Counter(node.op_type for node in proto.graph.node)
        recurrent = {op: counts[op] for op in ("GRU", "Loop", "Scan") if counts[op]}
        print(f"{name:18s} nodes {sum(counts.values()):4d}  {recurrent}  max |Δ| vs Keras {diff:.2e}")
        runners[name] = (lambda s=sess, n=input_name: s.run(None, {n: x}))
        runners[name]()  # warm-up: first-run allocations stay out of the timings

    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            times[name].append(time_round(run, iters=args.iters))

    print(f"\nbatch 1, one onnxruntime thread, {args.rounds} interleaved rounds × {args.iters} calls")
    base = statistics.median(times["keras_onnx"])
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"{name:18s} median {median * 1e6:8.1f} µs/call  best {min(ts) * 1e6:8.1f} µs/call  "
              f"median ratio to keras_onnx {median / base:5.2f}×")
    print("CPU flags:", ", ".join(f"{flag}={'yes' if on else 'no'}" for flag, on in cpu_flags().items()))


if __name__ == "__main__":
    main()
