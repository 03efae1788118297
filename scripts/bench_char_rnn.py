"""Benchmark the NumPy char-RNN against min-char-rnn's one-hot loop, and ONNX against NumPy generation.

Usage: python scripts/bench_char_rnn.py [--rounds 5] [--iters 400] [--chars 2000]

Prints training iterations/s for both loops (same model size, same data, same process, rounds
interleaved so machine load hits both alike; best round of each) and their ratio; then generation
chars/s of the shared sampler driven by the NumPy model and by an onnxruntime session over
edge_rnn.graphs.char_rnn_model, plus the ONNX-vs-NumPy logit difference on real text.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from edge_rnn import char_rnn
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
    """edge_rnn.char_rnn.train for `iters` steps (no validation cost counted); returns iters/s."""
    result = char_rnn.train(text, config=CharRnnConfig(**{**config.__dict__, "iters": iters}))
    return result.steps / result.seconds


def generation(checkpoint: char_rnn.Checkpoint, *, chars: int, rounds: int) -> None:
    """Chars/s of sample_with over the NumPy model and over onnxruntime, and their text and logit agreement."""
    import onnxruntime as ort

    from edge_rnn.graphs import char_rnn_model

    model = char_rnn_model(checkpoint.params, vocab=checkpoint.vocab)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # batch 1, time 1: threads only add wake-up latency
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def onnx_step(ids, h):
        logits, h_next = session.run(None, {"ids": ids, "h0": h})
        return logits, h_next

    kwargs = dict(vocab=checkpoint.vocab, hidden=checkpoint.hidden, prime="ROMEO:", length=chars, temperature=1.0, seed=0)
    best = {"numpy": 0.0, "onnx": 0.0}
    texts = {}
    for _ in range(rounds):
        for name, step in (("numpy", char_rnn.numpy_step(checkpoint.params)), ("onnx", onnx_step)):
            start = time.perf_counter()
            texts[name] = char_rnn.sample_with(step, **kwargs)
            best[name] = max(best[name], chars / (time.perf_counter() - start))
    print(f"generation, numpy sampler : {best['numpy']:9.0f} chars/s")
    print(f"generation, onnxruntime   : {best['onnx']:9.0f} chars/s  ({best['onnx'] / best['numpy']:.2f}x numpy)")
    print(f"same text for seed 0      : {texts['numpy'] == texts['onnx']}")

    ids = char_rnn.encode(char_rnn.bundled_text()[-5000:], vocab=checkpoint.vocab)
    ref, _ = char_rnn.forward(checkpoint.params, ids=ids, h_prev=np.zeros((checkpoint.hidden, 1)))
    got, _ = session.run(None, {"ids": ids[None], "h0": np.zeros((1, checkpoint.hidden), np.float32)})
    print(f"max |dlogit| onnx fp32 vs numpy fp64 over {len(ids)} chars: {np.abs(got[0] - ref).max():.2e}")

    start = time.perf_counter()
    session.run(None, {"ids": ids[None], "h0": np.zeros((1, checkpoint.hidden), np.float32)})
    onnx_score = len(ids) / (time.perf_counter() - start)
    start = time.perf_counter()
    char_rnn.forward(checkpoint.params, ids=ids, h_prev=np.zeros((checkpoint.hidden, 1)))
    numpy_score = len(ids) / (time.perf_counter() - start)
    print(f"scoring {len(ids)} chars in one call: onnx {onnx_score:.0f} chars/s, numpy {numpy_score:.0f} chars/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=400, help="training steps per round and loop")
    parser.add_argument("--chars", type=int, default=2000, help="characters generated per round")
    parser.add_argument("--checkpoint", help="a trained checkpoint for the generation part (default: 2,000 quick steps)")
    args = parser.parse_args()

    config = CharRnnConfig()
    text = char_rnn.bundled_text()
    vocab = char_rnn.build_vocab(text)
    train_text, _ = char_rnn.split_text(text, val_fraction=config.val_fraction)
    data = char_rnn.encode(train_text, vocab=vocab).tolist()
    best_one_hot = best_ours = 0.0
    for _ in range(args.rounds):
        best_one_hot = max(best_one_hot, one_hot_loop(data, vocab_size=len(vocab), iters=args.iters, config=config))
        best_ours = max(best_ours, vectorised_loop(text, iters=args.iters, config=config))
    print(f"training, one-hot min-char-rnn loop: {best_one_hot:7.0f} iters/s  (hidden {config.hidden}, seq {config.seq_length})")
    print(f"training, edge_rnn.char_rnn        : {best_ours:7.0f} iters/s")
    print(f"speed-up                           : {best_ours / best_one_hot:7.2f}x")

    if args.checkpoint:
        checkpoint = char_rnn.load_checkpoint(args.checkpoint)
    else:
        checkpoint = char_rnn.train(text, config=CharRnnConfig(iters=2000)).checkpoint
    generation(checkpoint, chars=args.chars, rounds=args.rounds)


if __name__ == "__main__":
    main()
