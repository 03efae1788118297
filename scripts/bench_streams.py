"""Many streams in one call: stream-steps per second, the API's cost over a bare `session.run`, p50/p99 per call.

One intra-op thread. For the folder's step models (`model.step.onnx`, and `model.step.int8.onnx` where it exists)
and 1, 8, 64 and 256 streams, each timed in interleaved rounds (medians over rounds):
- api: `Stream.step(frames)` on a `Stream(streams=n)` (inputs checked, state carried in its slots). The int8 step
  model runs each stream in a call of its own (row independence, see edge_rnn/device/api.py);
- bare: the same step of the same n streams with onnxruntime alone — `session.run` over the batch with the state
  fed back; for int8 also n batch-1 `session.run` calls (the same work the API does, so the fair overhead base);
- speed-up: stream-steps per second at n streams over one stream stepped alone (the API at n = 1).
Reads the folder only; writes nothing. Prints the host's CPU flags (edge_rnn.device.hostinfo).

    python scripts/bench_streams.py artifacts/mnist-lstm --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

STREAMS = (1, 8, 64, 256)


def timed(fn: Callable[[], object], *, min_seconds: float, min_calls: int = 20) -> list[float]:
    """Seconds per call of `fn`, over at least `min_seconds` and `min_calls` calls (after 10 warm-up calls)."""
    for _ in range(10):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def bare_runner(session, *, frames: np.ndarray, state: list[dict], per_row: bool) -> Callable[[], object]:
    """onnxruntime alone: one step of every stream with the state fed back (batched, or one batch-1 call per row)."""
    names = [o.name for o in session.get_outputs()]
    index = {s["output"]: names.index(s["output"]) for s in state}
    n = len(frames)
    if not per_row:
        feeds = {"input": frames[:, None], **{s["input"]: np.zeros((n, s["shape"][1]), np.float32) for s in state}}

        def run() -> object:
            out = session.run(None, feeds)
            for s in state:
                feeds[s["input"]] = out[index[s["output"]]]
            return out

        return run
    rows = [{"input": frames[i : i + 1, None], **{s["input"]: np.zeros((1, s["shape"][1]), np.float32) for s in state}} for i in range(n)]

    def run_rows() -> object:
        for feeds in rows:
            out = session.run(None, feeds)
            for s in state:
                feeds[s["input"]] = out[index[s["output"]]]
        return rows

    return run_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=Path("artifacts/mnist-lstm"), help="exported folder with model.step.onnx")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians over rounds")
    parser.add_argument("--seconds", type=float, default=0.4, help="minimum seconds per measurement and round")
    args = parser.parse_args()

    import edge_rnn
    from edge_rnn.device.hostinfo import cpu_features, describe
    from edge_rnn.device.session import create_session

    print(f"host: {describe(cpu_features())}; onnxruntime {__import__('onnxruntime').__version__}; 1 thread")
    model = edge_rnn.load(args.folder, threads=1)
    roles = [r for r in ("onnx_step", "onnx_step_int8") if r in model.roles]
    rng = np.random.default_rng(0)
    rows: list[tuple] = []
    for role in roles:
        template = model.stream(role=role)
        state = template.loaded.state
        features = int(template.inputs[0].shape[-1])
        session = create_session(template.loaded.path, threads=1)
        cases: dict[tuple[int, str], Callable[[], object]] = {}
        for n in STREAMS:
            frames = rng.random((n, features), dtype=np.float32)
            stream = model.stream(streams=n, role=role)
            cases[(n, "api")] = lambda stream=stream, frames=frames: stream.step(frames)
            cases[(n, "bare")] = bare_runner(session, frames=frames, state=state, per_row=False)
            if template.rows_alone:
                cases[(n, "bare per row")] = bare_runner(session, frames=frames, state=state, per_row=True)
        samples: dict[tuple[int, str], list[list[float]]] = {key: [] for key in cases}
        for _ in range(args.rounds):
            for key, fn in cases.items():
                samples[key].append(timed(fn, min_seconds=args.seconds))
        mean = {key: statistics.median(statistics.fmean(r) for r in rounds) for key, rounds in samples.items()}
        pct = {key: [statistics.median(float(np.percentile(r, p)) for r in rounds) for p in (50, 99)] for key, rounds in samples.items()}
        one = 1 / mean[(1, "api")]
        for n in STREAMS:
            base = "bare per row" if template.rows_alone else "bare"
            rate = n / mean[(n, "api")]
            rows.append((role, n, rate, rate / one, *(1e3 * v for v in pct[(n, "api")]), mean[(n, "api")] / mean[(n, base)],
                         1e3 * pct[(n, "bare")][0], n / mean[(n, "bare")]))
    print()
    print("| step model | streams | stream-steps/s (api) | × one stream | p50 ms/call | p99 ms/call | api ÷ bare (same work) "
          "| bare batched p50 ms | bare batched stream-steps/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for role, n, rate, speedup, p50, p99, ratio, bare_p50, bare_rate in rows:
        print(f"| {role} | {n} | {rate:,.0f} | {speedup:.1f}× | {p50:.3f} | {p99:.3f} | {ratio:.2f}× | {bare_p50:.3f} | {bare_rate:,.0f} |")
    print("\napi ÷ bare: the API's mean per call over onnxruntime alone doing the same work (int8: n batch-1 calls, "
          "as the API runs it; 'bare batched' for int8 is the row-dependent batched call, shown for its speed)")


if __name__ == "__main__":
    main()
