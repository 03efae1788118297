"""int8 of sequence models with fused GRU / RNN layers (issue 21 §1): file size and latency against fp32, one thread.

    python scripts/bench_int8_cells.py [MODEL_DIR ...] [--work DIR]

MODEL_DIR: exported model folders (e.g. gru-mnist from scripts/demo_gru.py, the pipeline's char-rnn); each is
copied into the work folder and quantized there (`quantize --variant int8`), the folder itself is not changed.
It also builds the keyword-spotter-sized models (40 features × 100 frames → GRU / SimpleRNN of 128 and 256
units → Dense(12), untrained Keras: size and speed do not depend on the weights' values) in the work folder
(a temporary folder unless --work is given; it says where).

For each: file bytes int8/fp32, batch-1 and batch-64 latency int8/fp32 (onnxruntime, intra-op threads 1,
ORT_ENABLE_ALL; interleaved rounds, medians), max |Δ| of the first output on random inputs, and each recurrent
layer's int8 form from the coverage report. Prints the host's CPU features first: int8 speed depends on them.

Where a model has one forward GRU over a fixed time axis, it also builds and times the unrolled integer form
(unrolled_gru, below; written as model.unrolled-int8.onnx in the work copy). Measured (AMD EPYC, AVX2, no VNNI,
onnxruntime 1.32, gru-mnist T=28): batch 1 2.4× fp32's time (370 nodes, each with its own per-call cost),
batch 64 0.76× (1.3× faster). It cannot hold "batch 1 no slower", so `quantize` makes the size-only form.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROUNDS = 15  # interleaved rounds; the median of each model's per-call time over them
BATCHES = (1, 64)
KWS_FRAMES, KWS_FEATURES, KWS_CLASSES = 100, 40, 12
CHAR_STEPS = 100  # time steps per call for a model whose time axis is dynamic (the char RNN)


def kws_models(work: Path) -> list[Path]:
    """Keyword-spotter-sized Keras models, exported with edge-rnn."""
    from edge_rnn.errors import require
    from edge_rnn.exporter import export

    keras = require("keras", "train")
    folders = []
    for kind, units in (("gru", 128), ("gru", 256), ("simple_rnn", 128), ("simple_rnn", 256)):
        keras.utils.set_random_seed(0)
        layer = keras.layers.GRU(units) if kind == "gru" else keras.layers.SimpleRNN(units)
        model = keras.Sequential([keras.Input((KWS_FRAMES, KWS_FEATURES), name="features"), layer,
                                  keras.layers.Dense(KWS_CLASSES, activation="softmax", name="keyword")])
        path = work / f"kws-{kind}-{units}.keras"
        model.save(path)
        out = work / path.stem
        export(path, out=out)
        folders.append(out)
    return folders


def feeds(session, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs for every graph input: the batch axis is `batch`, a dynamic time axis CHAR_STEPS."""
    out = {}
    for i in session.get_inputs():
        shape = [batch] + [d if isinstance(d, int) else CHAR_STEPS for d in i.shape[1:]]
        if "int" in i.type:
            out[i.name] = rng.integers(0, 10, shape).astype(np.int64 if "int64" in i.type else np.int32)
        else:
            out[i.name] = rng.random(shape, dtype=np.float32)
    return out


def latency_ms(paths: dict[str, Path], batch: int) -> dict[str, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    x = feeds(next(iter(sessions.values())), batch, np.random.default_rng(0))
    calls = max(3, 200 // batch)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, x)
    for _ in range(ROUNDS):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                s.run(None, x)
            times[k].append((time.perf_counter() - t0) / calls * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def max_diff(fp32: Path, int8: Path) -> float:
    import onnxruntime as ort

    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32, int8))
    x = feeds(a, 16, np.random.default_rng(1))
    return float(np.abs(a.run(None, x)[0] - b.run(None, x)[0]).max())


def bench(folder: Path) -> dict:
    from edge_rnn.device.manifest import load_manifest
    from edge_rnn.quantize import quantize

    (report,) = [r for r in quantize(folder, variants=("int8",)) if r.role == "onnx_int8"]
    fp32 = folder / load_manifest(folder)["files"]["onnx"]["path"]
    row = {"model": folder.name, "fp32_bytes": fp32.stat().st_size, "int8_bytes": report.bytes,
           "size_ratio": report.bytes / fp32.stat().st_size, "max_abs_diff": max_diff(fp32, report.path),
           "layers": [f"{c['node']}: {c['int8']}" for c in report.coverage["layers"]]}
    paths = {"fp32": fp32, "int8": report.path}
    if unrollable(fp32):
        import onnx

        paths["unrolled"] = folder / "model.unrolled-int8.onnx"
        onnx.save(unrolled_gru(fp32), str(paths["unrolled"]))
        row["unrolled_max_abs_diff"] = max_diff(fp32, paths["unrolled"])
    for batch in BATCHES:
        ms = latency_ms(paths, batch)
        row[f"batch{batch}_ms"] = ms
        row[f"batch{batch}_ratio"] = ms["int8"] / ms["fp32"]
        if "unrolled" in ms:
            row[f"batch{batch}_unrolled_ratio"] = ms["unrolled"] / ms["fp32"]
    return row


# ---------------------------------------------------------------------------------------------
# The unrolled integer form, measured and not made by `quantize` (see edge_rnn/quantize/cells.py): a GRU over a fixed, short time
# axis as the input projection for all steps in one DynamicQuantizeMatMul and, per step, h·Rᵀ as another plus the
# gates elementwise (no Loop). Built here for a forward GRU with linear_before_reset whose Y_h alone is used.

UNROLL_MAX_STEPS = 100  # the KWS models' 100 frames: longer than `quantize` would ever unroll, measured to show the trend
UNROLL_WEIGHT_MAX = 63  # 7-bit weights: int8 products on a host without VNNI must not saturate (quantize.REDUCE_RANGE)


def _columns_int8(wt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [K, N] → (int8 [K, N], scale [N]): symmetric, 7-bit, one scale per output column."""
    peak = np.abs(wt).max(axis=0)
    scale = np.where(peak > 0, peak / UNROLL_WEIGHT_MAX, 1.0).astype(np.float32)
    return np.clip(np.rint(wt / scale), -UNROLL_WEIGHT_MAX, UNROLL_WEIGHT_MAX).astype(np.int8), scale


def unrollable(path: Path) -> bool:
    """One forward GRU with linear_before_reset, a fixed time axis of at most UNROLL_MAX_STEPS, its Y unused."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    grus = [n for n in model.graph.node if n.op_type == "GRU"]
    if len(grus) != 1 or len(model.graph.input) != 1 or any(grus[0].output[0] in n.input for n in model.graph.node):
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in grus[0].attribute}
    steps = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    return attrs.get("linear_before_reset") == 1 and attrs.get("direction", b"forward") == b"forward" and 0 < steps <= UNROLL_MAX_STEPS


def unrolled_gru(path: Path):
    """model.onnx with one forward GRU (linear_before_reset=1, fixed T) → the same model, that GRU unrolled in int8."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    (gru,) = [n for n in g.node if n.op_type == "GRU"]
    attrs = {a.name: helper.get_attribute_value(a) for a in gru.attribute}
    assert attrs.get("linear_before_reset") == 1 and attrs.get("direction", b"forward") == b"forward"
    W, R, B = inits[gru.input[1]][0], inits[gru.input[2]][0], inits[gru.input[3]][0]  # (3H, I), (3H, H), (6H,)
    H = R.shape[1]
    assert W.shape[0] == R.shape[0] == 3 * H and B.shape == (6 * H,)
    (x_info,) = [i for i in g.input]
    T = x_info.type.tensor_type.shape.dim[1].dim_value
    assert 0 < T <= UNROLL_MAX_STEPS, T
    assert not any(gru.output[0] in n.input for n in g.node)  # Y (every step) unused: only Y_h
    new_inits, nodes = [], []

    def init(name, array):
        new_inits.append(numpy_helper.from_array(np.array(array, order="C"), name))  # ascontiguousarray makes 0-d 1-d
        return name

    def node(op, inputs, n_out=1, domain="", **kw):
        name = f"unrolled/{op}_{len(nodes)}"
        outs = [f"{name}:{i}" for i in range(n_out)]
        nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **kw))
        return outs if n_out > 1 else outs[0]

    wq, ws = _columns_int8(W.T)
    rq, rs = _columns_int8(R.T)
    xw = node("DynamicQuantizeMatMul", [gru.input[0], init("Wq", wq), init("Ws", ws), init("Wz", np.zeros_like(wq[0])),
                                        init("Wb", B[: 3 * H])], domain="com.microsoft")  # (T, B, 3H) in one product
    split = init("split", np.array([2 * H, H], np.int64))
    rb = init("Rb", B[3 * H:])
    h = None
    for t in range(T):
        xt = node("Gather", [xw, init(f"t{t}", np.array(t, np.int64))], axis=0)  # (B, 3H)
        x_zr, x_n = node("Split", [xt, split], 2, axis=1)
        if h is None:  # h0 = 0: h·Rᵀ + Rb is Rb
            h_zr, h_n = node("Split", [rb, split], 2, axis=0)
        else:
            hr = node("DynamicQuantizeMatMul", [h, init("Rq", rq) if t == 1 else "Rq", init("Rs", rs) if t == 1 else "Rs",
                                                init("Rz", np.zeros_like(rq[0])) if t == 1 else "Rz", rb], domain="com.microsoft")
            h_zr, h_n = node("Split", [hr, split], 2, axis=1)
        z, r = node("Split", [node("Sigmoid", [node("Add", [x_zr, h_zr])]), init(f"zr{t}", np.array([H, H], np.int64))], 2, axis=1)
        n = node("Tanh", [node("Add", [x_n, node("Mul", [r, h_n])])])
        h = node("Sub", [n, node("Mul", [z, n])]) if h is None else node("Add", [n, node("Mul", [z, node("Sub", [h, n])])])
    nodes.append(helper.make_node("Unsqueeze", [h, init("axis0", np.array([0], np.int64))], [gru.output[1]], name="unrolled/Y_h"))
    at = list(g.node).index(gru)
    rest = [n for n in g.node if n is not gru]
    del g.node[:]
    g.node.extend(rest[:at] + nodes + rest[at:])
    keep = [t for t in g.initializer if t.name not in gru.input[1:4]]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def main(argv: list[str]) -> None:
    from edge_rnn.device.hostinfo import cpu_features, describe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--work", type=Path, help="where the copies and KWS models go (default: a temporary folder)")
    args = parser.parse_args(argv)
    print("host:", describe(cpu_features()))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"work folder: {work}" + ("" if args.work else " (temporary, removed at the end)"))
        folders = [Path(shutil.copytree(m, work / m.name, dirs_exist_ok=True)) for m in args.models] + kws_models(work)
        rows = []
        for folder in folders:
            row = bench(folder)
            rows.append(row)
            print(f"{row['model']:<22} size {row['size_ratio']:.3f}× ({row['int8_bytes']:,} / {row['fp32_bytes']:,} B)  "
                  f"batch 1 {row['batch1_ratio']:.2f}× ({row['batch1_ms']['int8']:.3f} / {row['batch1_ms']['fp32']:.3f} ms)  "
                  f"batch 64 {row['batch64_ratio']:.2f}× ({row['batch64_ms']['int8']:.2f} / {row['batch64_ms']['fp32']:.2f} ms)  "
                  f"max|Δ| {row['max_abs_diff']:.2e}  " + "; ".join(row["layers"]), flush=True)
            if "unrolled_max_abs_diff" in row:
                print(f"{'  unrolled int8 GRU':<22} batch 1 {row['batch1_unrolled_ratio']:.2f}×  batch 64 "
                      f"{row['batch64_unrolled_ratio']:.2f}×  max|Δ| {row['unrolled_max_abs_diff']:.2e} (measured, not made by quantize)",
                      flush=True)
        print(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
