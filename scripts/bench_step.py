"""Step model vs whole-sequence model at batch 1: does streaming T steps cost ≤ 2× one sequence call?

The notebook's MNIST LSTM (LSTM(128, relu) ×2 → Dense(32) → Dense(10), 28 steps of 28 features) with
seeded random weights, converted by keras_onnx in both forms and written to a temporary folder (deleted
afterwards; nothing is written elsewhere) with a manifest in the exporter's schema. Timed:
- sequence: one `session.run` over (1, 28, 28), as `edge-rnn infer` runs it;
- steps: 28 `Stepper.step` calls over (1, 1, 28), as `edge-rnn stream` runs them (state carried, IOBinding).
Interleaved rounds, one intra-op thread for both; the figures are medians over rounds. Also prints the
max |Δ| between the last step's output and the sequence output.

    python scripts/bench_step.py --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np


def mnist_folder(folder: Path, *, seed: int) -> None:
    import keras
    import onnx

    from edge_rnn.device.manifest import record_file, save_manifest
    from edge_rnn.export.keras_onnx import convert

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((28, 28), name="pixels"),
        layers.LSTM(128, activation="relu", return_sequences=True),
        layers.LSTM(128, activation="relu"),
        layers.Dense(32, activation="relu"),
        layers.Dense(10, activation="softmax", name="probs"),
    ])
    sequence, step = convert(model), convert(model, step=True)
    onnx.save(sequence.model, folder / "model.onnx")
    onnx.save(step.model, folder / "model.step.onnx")
    state_in, state_out = {s["input"] for s in step.state}, {s["output"] for s in step.state}
    manifest = {
        "schema": 1, "model": "mnist-size-lstm", "adapter": "keras", "task": "keras", "io": sequence.io, "masking": [],
        "step": {"inputs": [s for s in step.io["inputs"] if s["name"] not in state_in],
                 "outputs": [s for s in step.io["outputs"] if s["name"] not in state_out], "state": step.state},
    }
    record_file(manifest, folder, "onnx", "model.onnx")
    record_file(manifest, folder, "onnx_step", "model.step.onnx")
    save_manifest(folder, manifest)


def per_call_us(fn, *, min_seconds: float) -> float:
    """Mean µs of one call of `fn`, over at least `min_seconds` (after 20 warm-up calls)."""
    for _ in range(20):
        fn()
    calls, start = 0, time.perf_counter()
    while True:
        for _ in range(50):
            fn()
        calls += 50
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds (medians are reported)")
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum timed seconds per row and round")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from edge_rnn.device.hostinfo import cpu_features, describe
    from edge_rnn.device.session import load_model
    from edge_rnn.device.stepper import Stepper

    x = np.random.default_rng(args.seed).random((1, 28, 28), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        folder = Path(tmp)
        mnist_folder(folder, seed=args.seed)
        sequence = load_model(folder / "model.onnx", threads=1)
        stepper = Stepper(load_model(folder / "model.step.onnx", threads=1))
        name = sequence.io["inputs"][0]["name"]
        rows = [np.ascontiguousarray(x[:, t : t + 1]) for t in range(x.shape[1])]  # the stream's (1, 1, 28) steps

        def whole() -> None:
            sequence.run({name: x})

        def steps() -> None:
            stepper.reset()
            for row in rows:
                stepper.step({name: row})

        expected = sequence.run({name: x})[0]
        stepper.reset()
        last = [stepper.step({name: row}) for row in rows][-1]["probs"]
        max_diff = float(np.max(np.abs(last - expected)))

        timings: dict[str, list[float]] = {"sequence call": [], f"{len(rows)} steps": []}
        for _ in range(args.rounds):
            for label, fn in zip(timings, (whole, steps)):
                timings[label].append(per_call_us(fn, min_seconds=args.seconds))

    print(f"host: {describe(cpu_features())}")
    print(f"MNIST-size LSTM (LSTM(128) ×2, 28 steps × 28), batch 1, one thread, {args.rounds} interleaved rounds (median µs):")
    medians = {label: statistics.median(ts) for label, ts in timings.items()}
    for label, us in medians.items():
        print(f"  {label:>14}: {us:8.1f} µs   (rounds: {', '.join(f'{t:.1f}' for t in timings[label])})")
    seq_us, step_us = medians.values()
    print(f"  per step: {step_us / len(rows):.2f} µs; cost ratio steps / sequence = {step_us / seq_us:.2f} (target ≤ 2)")
    print(f"  last step vs sequence: max |Δ| = {max_diff:.2e}")


if __name__ == "__main__":
    main()
