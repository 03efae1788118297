"""The bench report: JSON, the latency-vs-size plot, Markdown, and the figures as text for tables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..device.hostinfo import describe
from ..device.manifest import atomic_path
from ..errors import EdgeRnnError, require
from .budget import BudgetReport
from .harness import MIN_LATENCY_RUNS, BenchReport

def write_json(report: BenchReport | BudgetReport, *, path: str | os.PathLike[str]) -> None:
    """Write the report (`bench`, or `bench --budget`) as JSON (atomically)."""
    from ..device.manifest import atomic_write_json

    atomic_write_json(path, report.to_json())


RUNTIME_MARKERS = {"onnxruntime": "o", "litert": "s", "keras-predict": "^", "tf.function": "v", "numpy": "D", "openvino": "P", "tract": "X"}


PLOT_FORMATS = ("png", "svg", "pdf")


def check_output_path(path: str | os.PathLike[str], *, flag: str) -> None:
    """Fail before measuring, not after: an output file's place must be a file name in a folder that exists."""
    path = Path(path)
    if path.is_dir():
        raise EdgeRnnError(f"{flag} {path} is a folder — give a file name, e.g. {flag} {path / ('bench.json' if flag == '--json' else 'bench.png')}")
    if not path.parent.is_dir():
        raise EdgeRnnError(f"{flag} {path}: the folder {path.parent} does not exist — create it (mkdir -p {path.parent}) or give another path")


def check_plot_path(path: str | os.PathLike[str]) -> None:
    """Fail before measuring, not after: the plot needs matplotlib and a .png, .svg or .pdf name."""
    check_output_path(path, flag="--plot")
    if Path(path).suffix[1:].lower() not in PLOT_FORMATS:
        raise EdgeRnnError(f"--plot {path}: give a file name ending in {', '.join('.' + f for f in PLOT_FORMATS)}")
    require("matplotlib", "bench")


def accuracy_text(metric: str, accuracy: float | None, interval: Sequence[float | None] | None = None) -> str:
    """The accuracy column: held-out accuracy, nats/char, a metric on the user's data with its 95% interval, or —
    for rows scored by max |Δ|."""
    if accuracy is None:
        return "—"
    if metric.endswith("accuracy"):
        text, bound = f"{accuracy:.2%}", "{:.1%}"
    elif "nats" in metric:
        text, bound = f"{accuracy:.4f} nats/char", "{:.4f}"
    else:
        text, bound = f"{metric} {accuracy:.4g}", "{:.3g}"
    if interval is None or None in interval:
        return text
    low, high = interval
    return f"{text} ({bound.format(low)}–{bound.format(high)})"


def max_abs_diff_text(max_abs_diff: dict[str, float] | None) -> str:
    """The max |Δ| column: the largest over the row's outputs (each one is in the JSON), or —."""
    return f"{max(max_abs_diff.values()):.1e}" if max_abs_diff else "—"


def plot(report: BenchReport, *, path: str | os.PathLike[str]) -> None:
    """Latency (batch-1 p50) vs file size, log-log, one panel per model, a marker per runtime, accuracy annotated."""
    matplotlib = require("matplotlib", "bench")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullFormatter

    models = list(dict.fromkeys(r.model for r in report.results))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5.5), squeeze=False)
    colours = dict(zip(models, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, model in zip(axes[0], models):
        rows = [r for r in report.results if r.model == model]
        placed: list[tuple[float, float]] = []
        # Top to bottom, so a label that steps down to clear a neighbour's stays in the same order as the points.
        for r in sorted(rows, key=lambda r: -r.latency_ms["p50"]):
            x, y = r.size_bytes / 1024, r.latency_ms["p50"]
            ax.scatter(x, y, marker=RUNTIME_MARKERS.get(r.runtime, "x"), color=colours[model], s=60, edgecolors="black", linewidths=0.5)
            near = sum(abs(np.log10(x / px)) < 0.15 and abs(np.log10(y / py)) < 0.06 for px, py in placed)
            placed.append((x, y))
            acc = accuracy_text(r.metric, r.accuracy, r.accuracy_interval) if r.accuracy is not None else f"max|Δ| {max_abs_diff_text(r.max_abs_diff)}"
            label = f"{r.variant} {acc}" if r.runtime == "onnxruntime" else f"{r.runtime} {r.variant} {acc}"
            ax.annotate(label, (x, y), fontsize=7, textcoords="offset points", xytext=(6, -9 * near), va="center")
        for values, set_scale, axis in (
            ([p[0] for p in placed], ax.set_xscale, ax.xaxis),
            ([p[1] for p in placed], ax.set_yscale, ax.yaxis),
        ):
            # Log scale where the values span a decade or more; a narrower span reads better linear.
            if max(values) >= 10 * min(values):
                set_scale("log")
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("file size (KiB)")
        ax.set_ylabel("latency, batch 1, p50 (ms)")
        ax.set_title(model, fontsize=10)
        ax.set_ylim(bottom=0 if ax.get_yscale() == "linear" else None)
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(x=0.25, y=0.15)
    runtimes = list(dict.fromkeys(r.runtime for r in report.results))
    fig.legend(
        [Line2D([], [], marker=RUNTIME_MARKERS.get(rt, "x"), color="grey", linestyle="") for rt in runtimes], runtimes,
        title="runtime", fontsize=8, loc="lower center", ncol=len(runtimes),
    )
    m = report.machine
    fig.suptitle(f"edge-rnn bench — {m['cpu']}, {m['threads']} thread(s); labels: held-out accuracy, validation nats/char or max |Δ| vs ONNX fp32", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=Path(path).suffix[1:].lower())
    plt.close(fig)


def markdown(doc: dict[str, Any]) -> str:
    """A `--json` document as Markdown: the machine, the results table and the targets (for the README)."""
    m = doc["machine"]
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items())
    batches = [str(b) for b in doc["config"]["batch_sizes"]]
    diffs = any(r.get("max_abs_diff") for r in doc["results"])
    lines = [
        f"Machine: {describe(m['cpu_features']) if 'cpu_features' in m else m['cpu']}, {m['platform']}, Python {m['python']}; {libs}.",
        f"Threads {m['threads']}, onnxruntime opt level `{doc['config']['opt_level']}`; latency p50/p90/p99 at batch 1 over "
        f"≥ {min(doc['config']['runs'], MIN_LATENCY_RUNS)} runs after warm-up (at least {doc['config']['runs']} and "
        f"{doc['config']['min_seconds']:g} s unless a row takes over {doc['config']['max_seconds']:g} s; counts in the JSON).",
        "",
        "| model | variant | runtime | size KiB | load ms | p50 ms | p90 ms | p99 ms | "
        + " | ".join(f"/s @{b}" for b in batches) + " | peak MB | accuracy |" + (" max\\|Δ\\| fp32 |" if diffs else "") + " agree fp32 |",
        "|" + "---|" * (11 + diffs + len(batches)),
    ]
    for r in doc["results"]:
        acc = accuracy_text(r["metric"], r["accuracy"], r.get("accuracy_interval")) + (f" | {max_abs_diff_text(r.get('max_abs_diff'))}" if diffs else "")
        agree = "—" if r["agreement_with_fp32"] is None else f"{r['agreement_with_fp32']:.2%}"
        lat = r["latency_ms"]
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['runtime']} | {r['size_bytes'] / 1024:,.0f} | {r['load_ms']:.1f} | "
            f"{lat['p50']:.3f} | {lat['p90']:.3f} | {lat['p99']:.3f} | "
            + " | ".join(f"{r['throughput_per_s'][b]:,.0f}" for b in batches)
            + f" | {r['peak_rss_mb']:.0f} | {acc} | {agree} |"
        )
    lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['ratio']:.3g} | {t['goal']} | {'yes' if t['met'] else '**no**'} |" for t in doc["targets"]]
    if doc.get("budget"):
        lines += ["", *budget_markdown(doc["budget"])]
    return "\n".join(lines) + "\n"


def budget_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The per-step budget rows (a JSON document's `budget`) as a Markdown table."""
    lines = ["| model | variant | state B/stream | weights B | peak MiB | +model MiB | step p50 µs | step p99 µs |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        weights = "—" if r["weights_bytes"] is None else f"{r['weights_bytes']:,}"
        lines.append(f"| {r['model']} | {r['variant']} | {r['state_bytes_per_stream']:,} | {weights} | {r['peak_rss_mib']:.1f} | "
                     f"{r['model_rss_mib']:.1f} | {r['step_us']['p50']:.1f} | {r['step_us']['p99']:.1f} |")
    return lines
