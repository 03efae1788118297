"""One time step: the fused ONNX LSTM/GRU/RNN op against the decomposed cell (export/decomposed.py), per kind and size.

Parts (onnxruntime, one intra-op thread everywhere; interleaved rounds, medians; seeded random weights; models live in
a temporary folder deleted afterwards, nothing is written elsewhere):

- cells: one recurrent layer (input 28, units 32/128/256) converted by keras_onnx as a step model, fused and
  decomposed (each linear form of decomposed.LINEAR_FORMS), p50 µs per `session.run` at batch 1 and 64;
- mnist: the MNIST LSTM (scripts/bench_step.py's model) — 28 `Stepper.step` calls against one sequence call at
  batch 1, fused and decomposed step models, and the last step's max |Δ| to the sequence output;
- char-rnn: one generation step (batch 1, time 1) of the NumPy model, the fused graph (graphs.char_rnn_model) and
  the decomposed one (graphs.char_rnn_step_model), and generated chars/s through sampling.sample_with;
- int8: onnxruntime's quantize_dynamic on each step model (GRU, SimpleRNN, LSTM; fused and decomposed): file size
  against fp32 and the max |Δ| of h after 28 steps.

    python scripts/bench_step_cells.py --rounds 5 [--parts cells,mnist,char-rnn,int8]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

KINDS = ("LSTM", "GRU", "SimpleRNN")
UNITS = (32, 128, 256)
BATCHES = (1, 64)
FEATURES = 28


def call_us(fn, *, min_seconds: float) -> list[float]:
    """µs of each call of `fn`, timed one by one for at least `min_seconds` (after 20 warm-up calls): the p50 of such
    samples is what one call costs when nothing else on the (shared) machine gets in the way."""
    for _ in range(20):
        fn()
    samples: list[float] = []
    clock = time.perf_counter
    end = clock() + min_seconds
    while clock() < end:
        start = clock()
        fn()
        samples.append((clock() - start) * 1e6)
    return samples


def p50(rounds: list[list[float]]) -> float:
    return statistics.median([t for samples in rounds for t in samples])


def session(model, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def step_model(layer_cls: str, units: int, *, form: str, linear: str | None = None, seed: int = 0):
    """keras_onnx step model of Input((None, 28)) → one recurrent layer; `linear` picks decomposed.LINEAR_FORMS."""
    import keras

    from edge_rnn.export import decomposed
    from edge_rnn.export.keras_onnx import convert

    keras.utils.set_random_seed(seed)
    layer = getattr(keras.layers, layer_cls)(units)
    model = keras.Sequential([keras.Input((None, FEATURES), name="x"), layer])
    saved = dict(decomposed.STEP_CELLS)
    if linear is not None:
        decomposed.STEP_CELLS.update({k: functools.partial(f, linear=linear) for k, f in saved.items()})
    try:
        return convert(model, step=True, step_form=form)
    finally:
        decomposed.STEP_CELLS.update(saved)


def feeds(conversion, *, batch: int, rng) -> dict:
    return {spec["name"]: rng.standard_normal([batch if d == "batch" else d for d in spec["shape"]]).astype(np.float32)
            for spec in conversion.io["inputs"]}


def cells(args) -> None:
    forms = [("fused", None)] + [("decomposed", linear) for linear in ("concat_matmul", "concat_gemm", "two_matmuls")]
    labels = ["fused"] + [linear for _, linear in forms[1:]]
    rng = np.random.default_rng(args.seed)
    print(f"cells: p50 µs per step (one session.run), input {FEATURES}, one thread, {args.rounds} rounds")
    print(f"  {'cell':<10} {'units':>5} {'batch':>5}  " + "  ".join(f"{label:>13}" for label in labels) + "   best/fused")
    for kind in args.kinds.split(","):
        for units in UNITS:
            runs = {label: session(step_model(kind, units, form=form, linear=linear).model)
                    for label, (form, linear) in zip(labels, forms)}
            conversion = step_model(kind, units, form="fused")
            for batch in BATCHES:
                arrays = list(feeds(conversion, batch=batch, rng=rng).values())  # x, then the states, in every model
                times: dict[str, list[list[float]]] = {label: [] for label in labels}
                for _ in range(args.rounds):
                    for label, sess in runs.items():
                        feed = dict(zip((i.name for i in sess.get_inputs()), arrays))
                        times[label].append(call_us(functools.partial(sess.run, None, feed), min_seconds=args.seconds))
                med = {label: p50(ts) for label, ts in times.items()}
                best = min(labels[1:], key=med.get)
                print(f"  {kind:<10} {units:>5} {batch:>5}  " + "  ".join(f"{med[label]:13.1f}" for label in labels)
                      + f"   {med[best] / med['fused']:.2f} ({best})")


def mnist(args) -> None:
    from edge_rnn.device.session import load_model
    from edge_rnn.device.stepper import Stepper
    from edge_rnn.export import decomposed
    from bench_step import mnist_folder

    x = np.random.default_rng(args.seed).random((1, 28, 28), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="bench-step-cells-") as tmp:
        steppers = {}
        saved = dict(decomposed.STEP_FORMS)
        for form in ("fused", "decomposed"):
            folder = Path(tmp) / form
            folder.mkdir()
            decomposed.STEP_FORMS.update({kind: form for kind in saved})  # same seed: same weights, other step form
            try:
                mnist_folder(folder, seed=args.seed)
            finally:
                decomposed.STEP_FORMS.update(saved)
            steppers[form] = Stepper(load_model(folder / "model.step.onnx", threads=1))
        # The floor: a graph with the step model's inputs and outputs that computes nothing (states passed through),
        # through the same Stepper: what a call costs before any cell runs.
        fused = steppers["fused"].model
        steppers["floor"] = Stepper(dataclasses.replace(fused, session=session(_floor_graph(fused.session))))
        sequence = load_model(folder / "model.onnx", threads=1)
        name = sequence.io["inputs"][0]["name"]
        rows = [np.ascontiguousarray(x[:, t : t + 1]) for t in range(x.shape[1])]
        expected = sequence.run({name: x})[0]

        def whole() -> None:
            sequence.run({name: x})

        def stepping(stepper) -> None:
            stepper.reset()
            for row in rows:
                stepper.step({name: row})

        diffs = {}
        for form, stepper in steppers.items():
            if form == "floor":
                continue
            stepper.reset()
            last = [stepper.step({name: row}) for row in rows][-1]["probs"]
            diffs[form] = float(np.max(np.abs(last - expected)))
        runs = {"sequence call": whole, **{f"28 steps, {form}": functools.partial(stepping, s) for form, s in steppers.items()}}
        timings: dict[str, list[list[float]]] = {label: [] for label in runs}
        for _ in range(args.rounds):
            for label, fn in runs.items():
                timings[label].append(call_us(fn, min_seconds=args.seconds))
    med = {label: p50(ts) for label, ts in timings.items()}
    print(f"mnist: LSTM(128, relu) ×2 → Dense, batch 1, one thread, {args.rounds} rounds (median µs)")
    for label, us in med.items():
        form = label.split(", ")[-1]
        ratio = "" if label == "sequence call" else (f"   ratio to sequence {us / med['sequence call']:.2f}, {us / 28:.2f} µs/step"
                                                       + (f", last step max |Δ| {diffs[form]:.1e}" if form in diffs else ""))
        print(f"  {label:<22} {us:9.1f}{ratio}")


def _floor_graph(sess):
    """An onnx.ModelProto with `sess`'s inputs and outputs (first input (B, 1, F) → first output (B, K) by a Slice, every
    state passed through by Identity)."""
    import onnx
    from onnx import TensorProto, helper

    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    x, y = inputs[0], outputs[0]
    K = y.shape[-1]
    nodes = [helper.make_node("Reshape", [x.name, "flat"], ["x2"]),
             helper.make_node("Slice", ["x2", "starts", "ends", "axes"], [y.name])]
    nodes += [helper.make_node("Identity", [i.name], [o.name]) for i, o in zip(inputs[1:], outputs[1:])]
    consts = [onnx.numpy_helper.from_array(np.array(v, np.int64), n)
              for n, v in (("flat", [0, -1]), ("starts", [0]), ("ends", [K]), ("axes", [1]))]
    graph = helper.make_graph(
        nodes, "floor",
        [helper.make_tensor_value_info(i.name, TensorProto.FLOAT, i.shape) for i in inputs],
        [helper.make_tensor_value_info(o.name, TensorProto.FLOAT, o.shape) for o in outputs], initializer=consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def char_rnn(args) -> None:
    from edge_rnn.device import sampling
    from edge_rnn.device.runtime import LoadedModel, onnx_step
    from edge_rnn.export.graphs import char_rnn_model, char_rnn_step_model
    from edge_rnn.train import char_rnn as cr
    from edge_rnn.train.data import load_text

    text = load_text(None)
    vocab = cr.build_vocab(text)
    H, V = 100, len(vocab)  # CharRnnConfig's hidden size and the corpus' vocabulary
    params = cr.init_params(V, hidden=H, seed=args.seed)
    state = [{"layer": "rnn", "name": "h", "input": "h0", "output": "h", "dtype": "float32", "shape": ["batch", H]}]
    io = {"inputs": [{"name": "ids", "dtype": "int64", "shape": ["batch", 1]},
                     {"name": "h0", "dtype": "float32", "shape": ["batch", H]}],
          "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 1, V]},
                      {"name": "h", "dtype": "float32", "shape": ["batch", H]}]}

    def device_step(model):
        """runtime.onnx_step — `edge-rnn generate`'s Stepper with IOBinding — over `model`, one id per call."""
        loaded = LoadedModel(Path("char_rnn.onnx"), Path("."), "model", {}, session(model), io, state)
        step = onnx_step(loaded)

        def one_by_one(ids, h):
            # The step graph takes one id per call, so a prime of several characters goes through it one by one.
            logits = []
            for t in range(ids.shape[1]):
                out, h = step(ids[:, t : t + 1], h)
                logits.append(out)
            return np.concatenate(logits, axis=1), h
        return one_by_one

    def plain_step(model):
        """The bare session.run over `model`, one id per call: the graph's own cost without the Stepper."""
        sess = session(model)

        def one_by_one(ids, h):
            h = np.asarray(h, np.float32)
            logits = []
            for t in range(ids.shape[1]):
                out, h = sess.run(None, {"ids": ids[:, t : t + 1], "h0": h})
                logits.append(out)
            return np.concatenate(logits, axis=1), h
        return one_by_one

    fused, step_graph = char_rnn_model(params, vocab=vocab), char_rnn_step_model(params, vocab=vocab)
    steps = {"numpy": cr.numpy_step(params), "onnx fused": device_step(fused), "onnx decomposed": device_step(step_graph),
             "fused, session.run": plain_step(fused), "decomposed, session.run": plain_step(step_graph)}
    ids = np.array([[vocab.index("R")]], np.int64)
    h = np.zeros((1, H), np.float32)
    ref = steps["numpy"](ids, h)
    for name, fn in steps.items():
        got = fn(ids, h)
        assert np.abs(got[0] - ref[0]).max() < 1e-4 and np.abs(got[1] - ref[1]).max() < 1e-5, name
    step_us: dict[str, list[list[float]]] = {name: [] for name in steps}
    gen: dict[str, list[float]] = {name: [] for name in steps}
    kwargs = dict(vocab=vocab, hidden=H, prime="ROMEO:", length=args.chars, temperature=1.0, seed=0)
    texts = {}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            step_us[name].append(call_us(functools.partial(fn, ids, h), min_seconds=args.seconds))
            start = time.perf_counter()
            texts[name] = sampling.sample_with(fn, **kwargs)
            gen[name].append(args.chars / (time.perf_counter() - start))
    med_us = {name: p50(v) for name, v in step_us.items()}
    med_gen = {name: statistics.median(v) for name, v in gen.items()}
    print(f"char-rnn: H {H}, V {V}, batch 1, one thread, {args.rounds} rounds (p50 step, median generation); "
          f"same text for seed 0: {len(set(texts.values())) == 1}")
    for name in steps:
        print(f"  {name:<24} step {med_us[name]:6.1f} µs  generation {med_gen[name]:8.0f} chars/s"
              f"  = {med_gen[name] / med_gen['numpy']:.2f}× numpy")


def int8(args) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import onnx

    from edge_rnn.export.graphs import op_counts

    rng = np.random.default_rng(args.seed)
    print("int8: quantize_dynamic (QInt8 per-tensor, reduce_range as edge-rnn quantize) of a one-layer step model, units 128, input 28; "
          "max |Δh| after 28 steps from zero state, batch 8")
    with tempfile.TemporaryDirectory(prefix="bench-step-int8-") as tmp:
        for kind in KINDS:
            for form in ("fused", "decomposed"):
                conversion = step_model(kind, 128, form=form)
                fp32, q8 = Path(tmp) / f"{kind}.{form}.onnx", Path(tmp) / f"{kind}.{form}.int8.onnx"
                onnx.save(conversion.model, fp32)
                quantize_dynamic(fp32, q8, weight_type=QuantType.QInt8, reduce_range=True)
                x = rng.standard_normal((8, 28, FEATURES)).astype(np.float32)
                hs = [_run_steps(session(onnx.load(str(p))), conversion, x) for p in (fp32, q8)]
                ops = {k: v for k, v in op_counts(onnx.load(str(q8))).items()
                       if k in ("LSTM", "GRU", "RNN", "DynamicQuantizeLSTM", "MatMulInteger", "DynamicQuantizeMatMul")}
                print(f"  {kind:<10} {form:<10} fp32 {fp32.stat().st_size / 1024:7.1f} KiB  int8 {q8.stat().st_size / 1024:7.1f} KiB"
                      f"  = {q8.stat().st_size / fp32.stat().st_size:.2f}×   max |Δh| {np.abs(hs[1] - hs[0]).max():.1e}   {ops}")


def _run_steps(sess, conversion, x: np.ndarray) -> np.ndarray:
    state = {s["input"]: np.zeros((x.shape[0], s["shape"][1]), np.float32) for s in conversion.state}
    names = [o.name for o in sess.get_outputs()]
    for t in range(x.shape[1]):
        out = dict(zip(names, sess.run(None, {"x": x[:, t : t + 1], **state})))
        state = {s["input"]: out[s["output"]] for s in conversion.state}
    return state[conversion.state[0]["input"]]


PARTS = {"cells": cells, "mnist": mnist, "char-rnn": char_rnn, "int8": int8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds (medians are reported)")
    parser.add_argument("--seconds", type=float, default=0.2, help="minimum timed seconds per row and round")
    parser.add_argument("--chars", type=int, default=1000, help="characters generated per round (char-rnn part)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--kinds", default=",".join(KINDS), help="recurrent layers for the cells part")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from edge_rnn.device.hostinfo import cpu_features, describe
    import onnxruntime

    print(f"host: {describe(cpu_features())}; onnxruntime {onnxruntime.__version__}")
    for part in args.parts.split(","):
        PARTS[part](args)


if __name__ == "__main__":
    main()
