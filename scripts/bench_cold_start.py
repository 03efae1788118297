"""Cold start: `edge-rnn infer MODEL one.npy` as a whole process vs a bare onnxruntime script doing the same.

The issue's promise: the edge-rnn process within 1.5× of the bare one. Both commands are run as
subprocesses, interleaved (bare, edge-rnn, bare, edge-rnn, …) so drift on a shared host hits both alike;
each run's wall time covers spawn to exit, each run's peak RSS comes from `os.wait4` (that child only).
Reported: medians, the ratio of medians, the larger peak RSS of each command, and the host's CPU flags.

The bare script loads the same model file with onnxruntime's defaults, reads the same .npy (raw pixels of
one digit of the bundled sample), applies the manifest's scale and offset, runs once and prints the argmax: what
a user who skipped edge-rnn would write. The digit is written to a temporary folder, deleted afterwards;
nothing is written next to the model.

    python scripts/bench_cold_start.py artifacts/mnist-lstm/model.onnx --runs 20
    python scripts/bench_cold_start.py artifacts/mnist-lstm/model.onnx --importtime   # the slowest imports of `infer`
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_rnn.device.hostinfo import cpu_features, describe

SAMPLE = Path(__file__).resolve().parents[1] / "edge_rnn" / "data" / "mnist_sample_5k.npz"

BARE = """
import json, sys
import numpy as np
import onnxruntime as ort
model, npy, scale, offset = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
x = (np.load(npy).astype(np.float32) * scale + offset)[None]
probs = session.run(None, {session.get_inputs()[0].name: x})[0]
print(int(probs.argmax()))
"""


def run_once(argv: list[str]) -> tuple[float, float]:
    """(seconds from spawn to exit, peak RSS in MiB) of one child process; raises if it fails."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    stderr = child.stderr.read().decode(errors="replace")
    child.stderr.close()
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({child.returncode}):\n{stderr}")
    # ru_maxrss is in KiB on Linux.
    return seconds, usage.ru_maxrss / 1024


def slowest_imports(argv: list[str], *, top: int) -> list[tuple[float, str]]:
    """(cumulative ms, module) of the `top` slowest top-level imports under `python -X importtime`."""
    result = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, check=True)
    rows = []
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if match and len(match.group(2)) <= 1:  # top-level imports only: nested ones are inside their parent's figure
            rows.append((int(match.group(1)) / 1000, match.group(3)))
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="An image classifier's model file (mnist-lstm) with its manifest.json.")
    parser.add_argument("--runs", type=int, default=15, help="Runs of each command (interleaved).")
    parser.add_argument("--importtime", action="store_true", help="Also list the slowest imports of the infer process.")
    parser.add_argument("--json", action="store_true", help="Print the figures as JSON.")
    args = parser.parse_args()

    manifest = json.loads((args.model.parent / "manifest.json").read_text())
    pre = manifest["preprocessing"]
    edge_rnn = shutil.which("edge-rnn") or sys.exit("edge-rnn is not on PATH — activate the venv that has it")
    with tempfile.TemporaryDirectory() as tmp:
        npy = Path(tmp) / "one.npy"
        np.save(npy, np.load(SAMPLE)["x"][-1])
        bare_py = Path(tmp) / "bare.py"
        bare_py.write_text(BARE)
        commands = {
            "bare onnxruntime": [sys.executable, str(bare_py), str(args.model), str(npy), str(pre.get("scale", 1.0)), str(pre.get("offset", 0.0))],
            "edge-rnn infer": [edge_rnn, "infer", str(args.model), str(npy)],
        }
        for argv in commands.values():  # warm the page cache once
            run_once(argv)
        seconds: dict[str, list[float]] = {name: [] for name in commands}
        rss: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, argv in commands.items():
                s, m = run_once(argv)
                seconds[name].append(s)
                rss[name].append(m)
        imports = slowest_imports([edge_rnn, "infer", str(args.model), str(npy)], top=12) if args.importtime else []

    medians = {name: statistics.median(v) for name, v in seconds.items()}
    report = {
        "host": cpu_features(),
        "runs": args.runs,
        "median_ms": {name: round(1000 * v, 1) for name, v in medians.items()},
        "peak_rss_mib": {name: round(max(v), 1) for name, v in rss.items()},
        "ratio": round(medians["edge-rnn infer"] / medians["bare onnxruntime"], 2),
        "slowest_imports_ms": [[round(ms, 1), name] for ms, name in imports],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"host: {describe(report['host'])}")
    print(f"{args.runs} interleaved runs each, model {args.model}")
    for name in commands:
        print(f"  {name:18s} median {report['median_ms'][name]:7.1f} ms   peak RSS {report['peak_rss_mib'][name]:6.1f} MiB")
    print(f"  ratio (edge-rnn / bare): {report['ratio']:.2f}×  (promise ≤ 1.5×)")
    for ms, name in report["slowest_imports_ms"]:
        print(f"  import {name:40s} {ms:7.1f} ms")


if __name__ == "__main__":
    main()
