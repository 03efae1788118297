"""The `edge-rnn` command line: parse options → one library call → print. No numerics here."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .config import CHAR_RNN_DIRNAME, DEFAULT_OUT, MNIST_DIRNAME, CharRnnConfig, ExportConfig, LstmConfig
from .errors import EdgeRnnError

app = typer.Typer(
    help="Train recurrent networks, export them to ONNX, quantize, run on devices, prove parity, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(help="Train a model.", no_args_is_help=True)
app.add_typer(train_app, name="train")

out = Console()
err = Console(stderr=True)


def clean_errors(fn: Callable) -> Callable:
    """Turn the library's EdgeRnnError into a one-line message on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgeRnnError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _warn(messages: list[str]) -> None:
    for message in messages:
        err.print(f"[bold yellow]WARNING:[/] {message}", highlight=False, soft_wrap=True)


def _epoch_progress(total: int):
    """A rich progress bar and the `on_epoch` callback that advances it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]epoch"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[logs]}"), TimeElapsedColumn(),
        console=err,
    )
    task = progress.add_task("train", total=total, logs="")

    def on_epoch(epoch: int, epochs: int, logs: dict[str, float]) -> None:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in logs.items() if k in ("loss", "accuracy", "val_loss", "val_accuracy"))
        progress.update(task, completed=epoch, logs=shown)

    return progress, on_epoch


def _history_table(history: dict[str, list[float]]) -> Table:
    table = Table(title="training history")
    table.add_column("epoch", justify="right")
    keys = [k for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in history]
    for key in keys:
        table.add_column(key, justify="right")
    for i in range(len(history[keys[0]])):
        table.add_row(str(i + 1), *(f"{history[k][i]:.4f}" for k in keys))
    return table


@train_app.command("mnist-lstm")
@clean_errors
def train_mnist_lstm(
    data: str = typer.Option("mnist", help="mnist | fashion-mnist | sample | PATH.npz | IDX folder"),
    epochs: int = typer.Option(LstmConfig.epochs, min=1, help="Training epochs."),
    batch_size: int = typer.Option(LstmConfig.batch_size, min=1, help="Mini-batch size."),
    seed: int = typer.Option(LstmConfig.seed, help="Seed for weights, dropout and shuffling."),
    out_dir: Path = typer.Option(Path(DEFAULT_OUT) / MNIST_DIRNAME, "--out", help="Model folder to write."),
) -> None:
    """Train the notebook's LSTM MNIST classifier → OUT/model.keras and OUT/manifest.json.

    Example: edge-rnn train mnist-lstm --data sample --epochs 20 --out artifacts/mnist-lstm
    """
    from .data import load_digits
    from .lstm import save_trained, train

    cfg = LstmConfig(epochs=epochs, batch_size=batch_size, seed=seed)
    digits = load_digits(data)
    _warn(digits.warnings)
    err.print(f"data: {digits.source} — {len(digits.y_train)} train, {len(digits.y_test)} held out")
    progress, on_epoch = _epoch_progress(cfg.epochs)
    with progress:
        result = train(digits, cfg=cfg, on_epoch=on_epoch)
    path = save_trained(result, digits, out_dir, cfg=cfg)
    out.print(_history_table(result.history))
    out.print(f"held-out accuracy {result.heldout_accuracy:.2%} → {path}")


@train_app.command("char-rnn")
@clean_errors
def train_char_rnn(
    text: Optional[Path] = typer.Option(None, help="UTF-8 training text (default: the bundled tiny Shakespeare)."),
    hidden: int = typer.Option(CharRnnConfig.hidden, min=1, help="Hidden units."),
    seq_length: int = typer.Option(CharRnnConfig.seq_length, min=1, help="Truncated-BPTT chunk length."),
    learning_rate: float = typer.Option(CharRnnConfig.learning_rate, min=0.0, help="Adagrad learning rate."),
    iters: int = typer.Option(CharRnnConfig.iters, min=1, help="Total Adagrad steps (a resumed run continues up to this)."),
    seed: int = typer.Option(CharRnnConfig.seed, help="Seed for the initial weights."),
    out_dir: Path = typer.Option(Path(DEFAULT_OUT) / CHAR_RNN_DIRNAME, "--out", help="Model folder to write."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint.npz."),
) -> None:
    """Train the NumPy reference char RNN (min-char-rnn, Adagrad) → OUT/checkpoint.npz and OUT/manifest.json.

    Example: edge-rnn train char-rnn --iters 180000 --out artifacts/char-rnn
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .char_rnn import load_trained, save_trained, train
    from .data import load_text

    cfg = CharRnnConfig(hidden=hidden, seq_length=seq_length, learning_rate=learning_rate, iters=iters, seed=seed)
    corpus = load_text(text)
    start = load_trained(out_dir)[0] if resume else None
    progress = Progress(
        TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TextColumn("smoothed loss {task.fields[loss]:.3f} nats/char"),
        TimeElapsedColumn(), console=err,
    )
    with progress:
        task = progress.add_task("train", total=cfg.iters, completed=start.step if start else 0, loss=float("nan"))
        result = train(corpus, config=cfg, resume=start, on_progress=lambda p: progress.update(task, completed=p.step, loss=p.smooth_loss))
    path = save_trained(result, out_dir=out_dir, text_source=str(text) if text else None, config=cfg, text_chars=len(corpus))
    out.print(
        f"{result.steps:,} steps in {result.seconds:.1f} s ({result.steps / max(result.seconds, 1e-9):,.0f}/s); "
        f"held-out loss {result.val_loss:.4f} nats/char → {path}"
    )


@app.command()
@clean_errors
def export(
    model_dir: Path = typer.Argument(..., help="Model folder (with manifest.json) to export."),
    opset: int = typer.Option(ExportConfig.opset, min=11, help="ONNX opset."),
) -> None:
    """Export a trained model folder to DIR/model.onnx (fused recurrent ops, dynamic batch axis).

    Example: edge-rnn export artifacts/mnist-lstm --opset 17
    """
    from .export import export as run_export

    report = run_export(model_dir, cfg=ExportConfig(opset=opset))
    for note in report.notes:
        err.print(note, highlight=False)
    ops = ", ".join(f"{op}×{n}" for op, n in report.op_counts.items())
    diff = f", max |Δ| vs source {report.max_abs_diff:.2e}" if report.max_abs_diff is not None else ""
    out.print(f"{report.path} (opset {report.opset}{diff}): {ops}")


@app.command()
@clean_errors
def quantize(
    model_dir: Path = typer.Argument(..., help="Model folder holding model.onnx."),
    variant: List[str] = typer.Option(["int8"], "--variant", help="int8 (dynamic) and/or fp16; repeat for several."),
) -> None:
    """Quantize DIR/model.onnx with onnxruntime.quantization and report what was quantized.

    Example: edge-rnn quantize artifacts/mnist-lstm --variant int8 --variant fp16
    """
    from .quantize import quantize as run_quantize

    for report in run_quantize(model_dir, variants=tuple(variant)):
        ops = ", ".join(f"{op}×{n}" for op, n in report.op_counts.items())
        out.print(f"{report.path}: {report.bytes:,} bytes ({report.bytes / report.fp32_bytes:.2f}× fp32) — {ops}")
        out.print(f"  coverage: {json.dumps(report.coverage)}", highlight=False)


@app.command()
@clean_errors
def infer(
    model: Path = typer.Argument(..., help="MODEL.onnx with its manifest.json beside it."),
    inputs: List[Path] = typer.Argument(..., help="28×28 images (PNG, grey or RGB) or .npy arrays (one image or a batch)."),
    top_k: int = typer.Option(1, "--top-k", min=1, help="How many labels to show per input."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    threads: int = typer.Option(0, min=0, help="onnxruntime intra-op threads (0 = onnxruntime's default)."),
) -> None:
    """Classify images with an exported model on onnxruntime (no TensorFlow needed).

    Example: edge-rnn infer artifacts/mnist-lstm/model.int8.onnx digit.png batch.npy --top-k 3
    """
    from .runtime import infer as run_infer

    predictions = run_infer(model, inputs, top_k=top_k, threads=threads or None)
    if as_json:
        rows = [
            {"input": p.input, "label": p.label, "probability": p.probability, "top": [{"label": l, "probability": q} for l, q in p.top]}
            for p in predictions
        ]
        print(json.dumps({"model": str(model), "predictions": rows}, indent=2))
        return
    table = Table()
    table.add_column("input")
    table.add_column("label", justify="right")
    table.add_column("probability", justify="right")
    if top_k > 1:
        table.add_column(f"top {top_k}")
    for p in predictions:
        row = [p.input, p.label, f"{p.probability:.4f}"]
        if top_k > 1:
            row.append("  ".join(f"{l}:{q:.3f}" for l, q in p.top))
        table.add_row(*row)
    out.print(table)


@app.command()
@clean_errors
def generate(
    model: Path = typer.Argument(..., help="char-rnn MODEL.onnx with its manifest.json beside it."),
    prime: str = typer.Option("\n", help="Text to start from; every character must be in the model's vocabulary."),
    length: int = typer.Option(300, min=0, help="Characters to generate after the prime."),
    temperature: float = typer.Option(1.0, help="Softmax temperature (> 0): lower is safer, higher is wilder."),
    seed: int = typer.Option(0, help="Sampling seed: the same seed prints the same text as the NumPy sampler."),
    threads: int = typer.Option(1, min=0, help="onnxruntime intra-op threads (0 = onnxruntime's default)."),
) -> None:
    """Generate text with an exported char RNN on onnxruntime, carrying the hidden state between steps.

    Example: edge-rnn generate artifacts/char-rnn/model.onnx --prime "ROMEO:" --length 300 --seed 1
    """
    from .runtime import generate as run_generate

    text = run_generate(model, prime=prime, length=length, temperature=temperature, seed=seed, threads=threads or None)
    print(prime + text)


@app.command("sample")
@clean_errors
def sample_numpy(
    model_dir: Path = typer.Argument(..., help="char-rnn folder holding checkpoint.npz."),
    prime: str = typer.Option("\n", help="Text to start from."),
    length: int = typer.Option(300, min=0, help="Characters to generate after the prime."),
    temperature: float = typer.Option(1.0, help="Softmax temperature (> 0)."),
    seed: int = typer.Option(0, help="Sampling seed."),
) -> None:
    """Generate text with the NumPy reference char RNN from its checkpoint (the ONNX model's oracle).

    Example: edge-rnn sample artifacts/char-rnn --prime "ROMEO:" --length 300 --seed 1
    """
    from .char_rnn import load_trained, sample

    checkpoint, _ = load_trained(model_dir)
    print(prime + sample(checkpoint, prime=prime, length=length, temperature=temperature, seed=seed))


def _pipeline_table(rows) -> Table:
    table = Table(title="edge-rnn pipeline")
    for name, justify in (("model", "left"), ("variant", "left"), ("size", "right"), ("metric", "right"), ("parity", "left"), ("file", "left")):
        table.add_column(name, justify=justify)
    for row in rows:
        metric = f"{row.metric:.2%} acc" if row.metric_name == "accuracy" else f"{row.metric:.4f} {row.metric_name}"
        table.add_row(row.model, row.variant, f"{row.bytes / 1024:,.0f} KiB", metric, row.parity, row.path)
    return table


@app.command()
@clean_errors
def pipeline(
    data: str = typer.Option("mnist", help="MNIST source for the LSTM: mnist | fashion-mnist | sample | PATH.npz | IDX folder"),
    out_dir: Path = typer.Option(Path(DEFAULT_OUT), "--out", help="Output folder; each model gets a sub-folder."),
    epochs: int = typer.Option(LstmConfig.epochs, min=1, help="LSTM training epochs."),
    char_iters: int = typer.Option(CharRnnConfig.iters, min=1, help="Char-RNN Adagrad iterations."),
    text: Optional[Path] = typer.Option(None, help="UTF-8 corpus for the char RNN (default: bundled Shakespeare)."),
    seed: int = typer.Option(0, help="Seed for both models."),
) -> None:
    """Train, export, quantize, check parity and evaluate both models; print one table.

    Example: edge-rnn pipeline --data sample --out artifacts
    """
    from .pipeline import run

    progress, on_epoch = _epoch_progress(epochs)
    with progress:
        result = run(
            data=data, out_dir=out_dir, lstm_cfg=LstmConfig(epochs=epochs, seed=seed),
            char_cfg=CharRnnConfig(iters=char_iters, seed=seed), text=text,
            on_step=lambda step, message: progress.console.print(f"[bold]{step}[/]: {message}", highlight=False),
            on_epoch=on_epoch,
        )
    _warn(result.warnings)
    out.print(_pipeline_table(result.rows))
    out.print("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()))
    if result.failures:
        for failure in result.failures:
            err.print(f"[bold red]parity FAILED:[/] {failure}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="edge-rnn")


if __name__ == "__main__":
    sys.exit(main())
