"""Three users' Keras models on real data, every variant scored on the user's own held-out data (README
"Your data, every verdict"): a digit classifier (bundled MNIST), a CO2 forecaster (Mauna Loa weekly record)
and a masked next-character model (Shakespeare lines) — fp32, int8, fp16, the step models and Keras, each
with its metric, 95% interval, difference to fp32 and the promise's verdict, at batch 1.

The models are the test suite's (tests/user_models.py), trained the same way; here they also get fp16.

    python scripts/user_data_report.py [--out /tmp/user-models]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The models are built by the tests' own module, so the figures here are the figures the tests check.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from user_models import make_user_models  # noqa: E402

from edge_rnn.device.hostinfo import cpu_features, describe  # noqa: E402
from edge_rnn.evaluate import evaluate  # noqa: E402
from edge_rnn.quantize import quantize  # noqa: E402


def fmt(name: str, value: float) -> str:
    return f"{100 * value:.2f}%" if "accuracy" in name else f"{value:.4g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to build the models (default: a temporary folder)")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="edge-rnn-users-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"host: {describe(cpu_features())}")
    t0 = time.perf_counter()
    made = make_user_models(root)
    print(f"trained and exported in {time.perf_counter() - t0:.0f} s → {root}")
    for name, (folder, data) in made.items():
        quantize(folder, variants=("fp16",))
        t0 = time.perf_counter()
        result = evaluate(folder, data=data)
        print(f"\n### {name}: {result.count} held-out examples, batch {result.batch}, {time.perf_counter() - t0:.1f} s")
        print("| variant | metric | value | 95% interval | vs fp32 | agreement with fp32 | mean max\\|Δ\\| | promise |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for v in result.variants:
            h = v.headline
            vs = "" if v.vs_fp32 is None or v.role == result.baseline else (
                f"{100 * v.vs_fp32:+.2f} pp" if "accuracy" in h.name else f"{v.vs_fp32:+.3g}")
            agree = "" if v.agreement is None or v.role == result.baseline else f"{v.agreement:.2%}"
            mean = "" if v.mean_max_abs_diff is None or v.role == result.baseline else f"{v.mean_max_abs_diff:.1e}"
            verdict = {True: "holds", False: "**fails**: " + "; ".join(v.verdict.failures), None: "(fp32)"}[v.verdict.ok]
            print(f"| {v.role} | {h.name} | {fmt(h.name, h.value)} | {fmt(h.name, h.low)}–{fmt(h.name, h.high)} | {vs} | {agree} | {mean} | {verdict} |")


if __name__ == "__main__":
    main()
