"""Benchmark the NumPy char-RNN against min-char-rnn's one-hot loop, and ONNX against NumPy generation.

Usage: python scripts/bench_char_rnn.py [--rounds 7] [--iters 400] [--chars 2000]

Every comparison runs both sides in the same process, alternating round by round so load from
other jobs on the machine hits both alike, and prints the best and the median round of each and
their ratios (best/best and median/median). Parts:

- training iterations/s: min-char-rnn's lossFun + Adagrad as written vs edge_rnn.train.char_rnn.train,
  same model size (the CharRnnConfig defaults), same data;
- generation chars/s: the shared sampler (sampling.sample_with) driven by the NumPy model and by
  runtime.onnx_step over an onnxruntime session (one intra-op thread) of
  edge_rnn.export.graphs.char_rnn_model, plus the bare step times behind them, whether the texts agree,
  and the ONNX-vs-NumPy logit difference on real text;
- scoring chars/s: one call over 5,000 characters, batch 1 and batch 64.

BLAS and onnxruntime threads are left at their defaults except where stated.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edge_rnn.train import char_rnn
from edge_rnn.device import sampling
from edge_rnn.train.data import load_text
from edge_rnn.config import CharRnnConfig


def one_hot_loop(data: list[int], *, vocab_size: int, iters: int, config: CharRnnConfig) -> float:
    """min-char-rnn's lossFun + Adagrad as written (per-step one-hot vectors, column products); returns iters/s."""
    V, H, T = vocab_size, config.hidden, config.seq_length
    params = char_rnn.init_params(V, hidden=H, seed=config.seed)
    Wxh, Whh, Why, bh, by = (params[name] for name in char_rnn.PARAM_NAMES)
    mems = [np.zeros_like(params[name]) for name in char_rnn.PARAM_NAMES]

    def lossFun(inputs, targets, hprev):
        xs, hs, ys, ps = {}, {}, {}, {}
        hs[-1] = np.copy(hprev)
        loss = 0
        for t in range(len(inputs)):
            xs[t] = np.zeros((V, 1))
            xs[t][inputs[t]] = 1
            hs[t] = np.tanh(np.dot(Wxh, xs[t]) + np.dot(Whh, hs[t - 1]) + bh)
            ys[t] = np.dot(Why, hs[t]) + by
            ps[t] = np.exp(ys[t]) / np.sum(np.exp(ys[t]))
            loss += -np.log(ps[t][targets[t], 0])
        dWxh, dWhh, dWhy = np.zeros_like(Wxh), np.zeros_like(Whh), np.zeros_like(Why)
        dbh, dby = np.zeros_like(bh), np.zeros_like(by)
        dhnext = np.zeros_like(hs[0])
        for t in reversed(range(len(inputs))):
            dy = np.copy(ps[t])
            dy[targets[t]] -= 1
            dWhy += np.dot(dy, hs[t].T)
            dby += dy
            dh = np.dot(Why.T, dy) + dhnext
            dhraw = (1 - hs[t] * hs[t]) * dh
            dbh += dhraw
            dWxh += np.dot(dhraw, xs[t].T)
            dWhh += np.dot(dhraw, hs[t - 1].T)
            dhnext = np.dot(Whh.T, dhraw)
        for dparam in [dWxh, dWhh, dWhy, dbh, dby]:
            np.clip(dparam, -config.clip, config.clip, out=dparam)
        return loss, dWxh, dWhh, dWhy, dbh, dby, hs[len(inputs) - 1]

    hprev = np.zeros((H, 1))
    p = 0
    start = time.perf_counter()
    for _ in range(iters):
        if p + T + 1 >= len(data):
            hprev, p = np.zeros((H, 1)), 0
        loss, dWxh, dWhh, dWhy, dbh, dby, hprev = lossFun(data[p : p + T], data[p + 1 : p + T + 1], hprev)
        for param, dparam, mem in zip([Wxh, Whh, Why, bh, by], [dWxh, dWhh, dWhy, dbh, dby], mems):
            mem += dparam * dparam
            param += -config.learning_rate * dparam / np.sqrt(mem + 1e-8)
        p += T
    return iters / (time.perf_counter() - start)


def vectorised_loop(text: str, *, iters: int, config: CharRnnConfig) -> float:
    """edge_rnn.train.char_rnn.train for `iters` steps (no validation cost counted); returns iters/s."""
    result = char_rnn.train(text, config=CharRnnConfig(**{**config.__dict__, "iters": iters}))
    return result.steps / result.seconds


def interleaved(sides: dict[str, Callable[[], float]], *, rounds: int) -> dict[str, list[float]]:
    """Rates of each side over `rounds` rounds, the sides alternating within every round."""
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, run in sides.items():
            rates[name].append(run())
    return rates


def report(rates: dict[str, list[float]], *, unit: str, against: str) -> None:
    """One line per side: best and median of its rounds, and both as ratios to side `against`."""
    best = {name: max(values) for name, values in rates.items()}
    median = {name: statistics.median(values) for name, values in rates.items()}
    for name in rates:
        ratio = "" if name == against else f"  = {best[name] / best[against]:.2f}x / {median[name] / median[against]:.2f}x {against} (best / median)"
        print(f"  {name:<34} best {best[name]:9.0f}  median {median[name]:9.0f} {unit}{ratio}")


def per_call_us(fn: Callable[[], object], *, calls: int = 3000) -> float:
    """Median over 5 repeats of the mean time of one call, µs."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def generation(checkpoint: char_rnn.Checkpoint, *, chars: int, rounds: int) -> None:
    """Chars/s of sample_with over the NumPy model and over onnxruntime, their step times, and their agreement."""
    import onnxruntime as ort

    from edge_rnn.export.graphs import char_rnn_model
    from edge_rnn.device.runtime import LoadedModel, onnx_step, session_options

    model = char_rnn_model(checkpoint.params, vocab=checkpoint.vocab)
    # One intra-op thread (`edge-rnn generate --threads 1`): at batch 1, time 1 more threads only add wake-ups.
    session = ort.InferenceSession(model.SerializeToString(), session_options(threads=1), providers=["CPUExecutionProvider"])
    hidden, vocab_size = checkpoint.hidden, len(checkpoint.vocab)
    state = [{"layer": "rnn", "name": "h", "input": "h0", "output": "h", "dtype": "float32", "shape": ["batch", hidden]}]
    io = {"inputs": [{"name": "ids", "dtype": "int64", "shape": ["batch", 1]}, {"name": "h0", "dtype": "float32", "shape": ["batch", hidden]}],
          "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 1, vocab_size]}, {"name": "h", "dtype": "float32", "shape": ["batch", hidden]}]}
    loaded = LoadedModel(Path("char_rnn.onnx"), Path("."), "model", {}, session, io, state)

    def session_run_step(ids, h):  # the plain session.run path, for comparison
        logits, h_next = session.run(None, {"ids": ids, "h0": h})
        return logits, h_next

    steps = {"numpy": char_rnn.numpy_step(checkpoint.params), "onnx (runtime.onnx_step)": onnx_step(loaded), "onnx (session.run)": session_run_step}
    kwargs = dict(vocab=checkpoint.vocab, hidden=checkpoint.hidden, prime="ROMEO:", length=chars, temperature=1.0, seed=0)
    texts = {}

    def chars_per_s(name: str) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            texts[name] = sampling.sample_with(steps[name], **kwargs)
            return chars / (time.perf_counter() - start)
        return run

    print(f"generation, {chars} chars a round, {rounds} rounds, one thread for onnxruntime:")
    report(interleaved({name: chars_per_s(name) for name in steps}, rounds=rounds), unit="chars/s", against="numpy")
    print(f"  same text for seed 0: {all(text == texts['numpy'] for text in texts.values())}")
    # Where a generated character's time goes: the step function, timed from inside sample_with, and
    # the rest (the shared sampling math). Interleaved rounds; medians.
    split = {name: ([], []) for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            spent = [0.0]

            def timed(ids, h, step=step, spent=spent):
                start = time.perf_counter()
                result = step(ids, h)
                spent[0] += time.perf_counter() - start
                return result

            start = time.perf_counter()
            sampling.sample_with(timed, **kwargs)
            total = time.perf_counter() - start
            split[name][0].append(spent[0] / chars * 1e6)
            split[name][1].append((total - spent[0]) / chars * 1e6)
    print("  per generated char, µs (median): "
          + ", ".join(f"{name} step {statistics.median(a):.1f} + sampling {statistics.median(b):.1f}" for name, (a, b) in split.items()))
    ids = np.array([[char_rnn.build_vocab(checkpoint.vocab).index("R")]], dtype=np.int64)
    h = np.zeros((1, checkpoint.hidden), np.float32)
    step_us = {name: [] for name in steps}
    for _ in range(3):
        for name, step in steps.items():
            step_us[name].append(per_call_us(lambda: step(ids, h)))
    print("  one step alone (batch 1, time 1, same input in a tight loop), µs, median of interleaved repeats: "
          + ", ".join(f"{name} {statistics.median(values):.1f}" for name, values in step_us.items()))

    text_ids = char_rnn.encode(load_text(None)[-5000:], vocab=checkpoint.vocab)
    ref, _ = char_rnn.forward(checkpoint.params, ids=text_ids, h_prev=np.zeros((checkpoint.hidden, 1)))
    got, _ = session.run(None, {"ids": text_ids[None], "h0": np.zeros((1, checkpoint.hidden), np.float32)})
    print(f"  max |dlogit| onnx fp32 vs numpy fp64 over {len(text_ids)} chars: {np.abs(got[0] - ref).max():.2e}")

    batch = np.stack([np.roll(text_ids, 37 * row) for row in range(64)])  # 64 different 5,000-char texts

    def score(fn: Callable[[], object], n_chars: int) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            fn()
            return n_chars / (time.perf_counter() - start)
        return run

    h0 = np.zeros((checkpoint.hidden, 1))
    print(f"scoring {len(text_ids)} chars in one call:")
    report(
        interleaved(
            {
                "numpy, batch 1": score(lambda: char_rnn.forward(checkpoint.params, ids=text_ids, h_prev=h0), len(text_ids)),
                "onnx, batch 1": score(lambda: session.run(None, {"ids": text_ids[None], "h0": np.zeros((1, checkpoint.hidden), np.float32)}), len(text_ids)),
                "numpy, batch 64 (row by row)": score(lambda: [char_rnn.forward(checkpoint.params, ids=row, h_prev=h0) for row in batch], batch.size),
                "onnx, batch 64": score(lambda: session.run(None, {"ids": batch, "h0": np.zeros((64, checkpoint.hidden), np.float32)}), batch.size),
            },
            rounds=3,
        ),
        unit="chars/s",
        against="numpy, batch 1",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=400, help="training steps per round and loop")
    parser.add_argument("--chars", type=int, default=2000, help="characters generated per round")
    parser.add_argument("--checkpoint", help="a trained checkpoint for the generation part (default: 2,000 quick steps)")
    args = parser.parse_args()

    config = CharRnnConfig()
    text = load_text(None)
    vocab = char_rnn.build_vocab(text)
    train_text, _ = char_rnn.split_text(text, val_fraction=config.val_fraction)
    data = char_rnn.encode(train_text, vocab=vocab).tolist()
    print(f"training, hidden {config.hidden}, seq_length {config.seq_length}, vocab {len(vocab)}, float64, {args.iters} iters a round, {args.rounds} rounds:")
    rates = interleaved(
        {
            "one-hot min-char-rnn loop": lambda: one_hot_loop(data, vocab_size=len(vocab), iters=args.iters, config=config),
            "edge_rnn.train.char_rnn.train": lambda: vectorised_loop(text, iters=args.iters, config=config),
        },
        rounds=args.rounds,
    )
    report(rates, unit="iters/s", against="one-hot min-char-rnn loop")

    if args.checkpoint:
        checkpoint = char_rnn.load_checkpoint(args.checkpoint)
    else:
        checkpoint = char_rnn.train(text, config=CharRnnConfig(iters=2000)).checkpoint
    generation(checkpoint, chars=args.chars, rounds=args.rounds)


if __name__ == "__main__":
    main()
