"""The `edge-rnn` command line: parse options → one library call → print. No numerics here."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, List, Optional

import typer

from .config import (
    CHAR_RNN_DIRNAME, CONNECT_TIMEOUT_S, DEFAULT_OUT, MAX_BATCH_SIZE, MAX_BENCH_ROUNDS, MAX_BENCH_RUNS, MAX_CHAR_ITERS, MAX_CHECK_BATCH, MAX_EPOCHS,
    MAX_GENERATE_LENGTH, MAX_HIDDEN, MAX_SEQ_LENGTH, MAX_TIME_STEPS, MNIST_DIRNAME, CharRnnConfig, ExportConfig, LstmConfig,
)
from .errors import DEBUG_ENV, EdgeRnnError, ModelFileError, escaped_error
from .device.manifest import check_writable_dir
from .device.text import MAX_NAME_CHARS, MAX_PATH_CHARS, shown

# -h works as --help, for the app and every subcommand.
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    help="Train recurrent networks, export them to ONNX, quantize, run on devices, prove parity, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=HELP_OPTIONS,
)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"edge-rnn {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Train recurrent networks, export them to ONNX, quantize, run on devices, prove parity, benchmark."""


train_app = typer.Typer(help="Train a model.", no_args_is_help=True, context_settings=HELP_OPTIONS)
app.add_typer(train_app, name="train")

class _LazyConsole:
    """A rich Console made on first use: importing rich costs ~25 ms of a device command's start,
    and `infer --json`, `stream` and `generate` print without it."""

    def __init__(self, *, stderr: bool) -> None:
        self._stderr = stderr
        self._console = None

    def get(self):
        """The rich Console itself (for rich objects that take one, such as Progress)."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr)
        return self._console

    def __getattr__(self, name: str):
        return getattr(self.get(), name)


# An error or warning is one line, but may quote a few names: cut only past this.
MAX_MESSAGE_CHARS = 2000


def escape(text: object, *, limit: int | None = MAX_NAME_CHARS) -> str:
    """Text from a file (a name, a path, a message quoting them) for a rich string: its control characters made
    visible and cut (`shown`), then its markup escaped — rich imported on first use."""
    from rich.markup import escape as rich_escape

    return rich_escape(shown(text, limit=limit))


_FITTING_TABLE = None


def _fitting_table_class():
    """rich.table.Table that never cuts a cell with "…": drawn as a table when every column gets its widest word
    (its widest cell for a no_wrap column; a fold column folds), else one row after another as `header  value` lines."""
    global _FITTING_TABLE
    if _FITTING_TABLE is not None:
        return _FITTING_TABLE
    from rich import box
    from rich.measure import Measurement
    from rich.table import Table as RichTable

    class FittingTable(RichTable):
        def needed_width(self, console, options) -> int:
            """The narrowest this table draws without cutting a cell (wrapping text at spaces)."""
            total = self._extra_width
            for i, column in enumerate(self.columns):
                widest = 0
                for cell in [column.header, *column._cells]:
                    m = Measurement.get(console, options.update_width(10_000), cell)
                    widest = max(widest, m.maximum if column.no_wrap else (1 if column.overflow == "fold" else m.minimum))
                if column.min_width:
                    widest = max(widest, column.min_width)
                total += widest + self._get_padding_width(i)
            return total

        def vertical(self):
            """Each row as `header  value` lines, rows apart: what a table too wide for the terminal becomes."""
            grid = RichTable(title=self.title, caption=self.caption, caption_justify=self.caption_justify, box=None,
                             show_header=False, padding=(0, 1), pad_edge=False)
            grid.add_column(style="bold", no_wrap=True)
            grid.add_column(overflow="fold")
            for r in range(len(self.rows)):
                if r:
                    grid.add_row("", "")
                for column in self.columns:
                    header = column.header.replace("\n", " ") if isinstance(column.header, str) else column.header
                    grid.add_row(header, column._cells[r])
            return grid

        def __rich_console__(self, console, options):
            width = options.max_width if self.width is None else self.width
            if self.columns and self.rows and self.needed_width(console, options) > width:
                yield self.vertical()
                return
            if isinstance(self.title, str) and self.min_width is None:
                # As wide as its title where the terminal allows: a title on one line, not folded over a narrow table.
                from rich.text import Text

                self.min_width = min(Text.from_markup(self.title).cell_len, width)
                try:
                    yield from super().__rich_console__(console, options)
                finally:
                    self.min_width = None
                return
            yield from super().__rich_console__(console, options)

        def __rich_measure__(self, console, options):
            if self.columns and self.rows and self.needed_width(console, options) > options.max_width:
                return Measurement.get(console, options, self.vertical())
            return super().__rich_measure__(console, options)

    FittingTable.default_box = box.SIMPLE_HEAD
    _FITTING_TABLE = FittingTable
    return FittingTable


def _ms(value: float) -> str:
    """Milliseconds in at most 6 characters, 3–4 significant figures: 0.102, 35.12, 1,234 (the JSON keeps every digit)."""
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def _per_s(value: float) -> str:
    """A rate in at most 6 characters: 9,876, 12.3k, 123k, 1.23M (the JSON keeps every digit)."""
    if value < 10_000:
        return f"{value:,.0f}"
    if value < 100_000:
        return f"{value / 1e3:.1f}k"
    if value < 1e6:
        return f"{value / 1e3:.0f}k"
    return f"{value / 1e6:.3g}M"


def Table(*args, **kwargs):  # noqa: N802 - stands in for rich.table.Table, imported where a table is drawn
    """A rich Table readable at 80 columns: no vertical rules or edges (two characters between columns), and
    drawn row by row when even its widest words do not fit (see _fitting_table_class)."""
    cls = _fitting_table_class()
    kwargs.setdefault("box", cls.default_box)
    kwargs.setdefault("show_edge", False)
    kwargs.setdefault("padding", (0, 1))
    kwargs.setdefault("collapse_padding", True)
    return cls(*args, **kwargs)


out = _LazyConsole(stderr=False)
err = _LazyConsole(stderr=True)


def _print_error(exc: EdgeRnnError) -> None:
    err.print(f"[bold red]error:[/] {escape(exc, limit=MAX_MESSAGE_CHARS)}", highlight=False, soft_wrap=True)


def clean_errors(fn: Callable) -> Callable:
    """Turn the library's EdgeRnnError — and what `escaped_error` reads as one (out of memory, an OS error, a graph
    library failing on a graph) — into a one-line message on stderr and exit code 1. Anything else is a bug in
    edge-rnn: its traceback stays, as it does for every exception with EDGE_RNN_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgeRnnError as exc:
            _print_error(exc)
            raise typer.Exit(1) from None
        except BrokenPipeError:
            raise  # stdout's reader went away (`| head`): click exits with 1, quietly
        except Exception as exc:
            known = escaped_error(exc)
            if known is None or os.environ.get(DEBUG_ENV):
                raise
            _print_error(known)
            raise typer.Exit(1) from None

    return wrapper


def _warn(messages: list[str]) -> None:
    for message in messages:
        err.print(f"[bold yellow]WARNING:[/] {escape(message, limit=MAX_MESSAGE_CHARS)}", highlight=False, soft_wrap=True)


def _epoch_progress(total: int):
    """A rich progress bar and the `on_epoch` callback that advances it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]epoch"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[logs]}"), TimeElapsedColumn(),
        console=err.get(),
    )
    task = progress.add_task("train", total=total, logs="")

    def on_epoch(epoch: int, epochs: int, logs: dict[str, float]) -> None:
        short = {"loss": "loss", "accuracy": "acc", "val_accuracy": "held-out acc"}
        figures = "  ".join(f"{short[k]} {v:.3f}" for k, v in logs.items() if k in short)
        progress.update(task, completed=epoch, logs=figures)

    return progress, on_epoch


def _history_table(history: dict[str, list[float]]) -> Table:
    table = Table(title="training history")
    table.add_column("epoch", justify="right", no_wrap=True)
    keys = [k for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in history]
    for key in keys:
        table.add_column(key, justify="right", no_wrap=True)
    for i in range(len(history[keys[0]])):
        table.add_row(str(i + 1), *(f"{history[k][i]:.4f}" for k in keys))
    return table


@train_app.command("mnist-lstm")
@clean_errors
def train_mnist_lstm(
    data: str = typer.Option("mnist", help="mnist | fashion-mnist | sample | PATH.npz | IDX folder"),
    epochs: int = typer.Option(LstmConfig.epochs, min=1, max=MAX_EPOCHS, help="Training epochs."),
    batch_size: int = typer.Option(LstmConfig.batch_size, min=1, max=MAX_BATCH_SIZE, help="Mini-batch size; with a strategy, the global batch split over all replicas."),
    seed: int = typer.Option(LstmConfig.seed, help="Seed for weights, dropout and shuffling."),
    out_dir: Path = typer.Option(Path(DEFAULT_OUT) / MNIST_DIRNAME, "--out", help="Model folder to write."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last finished epoch (backed up in OUT/.train-backup)."),
    strategy: str = typer.Option("default", help="default (one process) | mirrored (this machine's devices) | multi-worker (TF_CONFIG or --workers/--index)."),
    workers: Optional[str] = typer.Option(None, help="multi-worker cluster instead of TF_CONFIG: host:port,host:port,… (the same list on every worker)."),
    index: Optional[int] = typer.Option(None, min=0, help="This worker's place in --workers; 0 is the chief, the only one that writes OUT."),
    connect_timeout: float = typer.Option(CONNECT_TIMEOUT_S, min=0.1, max=3600, help="Seconds a worker waits for every peer before giving up."),
    stream: bool = typer.Option(False, "--stream", help="Stream training images with tf.data from an IDX folder or an np.savez .npz instead of loading them (mirrored/multi-worker)."),
) -> None:
    """Train the notebook's LSTM MNIST classifier → OUT/model.keras and OUT/manifest.json.

    Example: edge-rnn train mnist-lstm --data sample --epochs 20 --out artifacts/mnist-lstm

    On two machines: edge-rnn train mnist-lstm --strategy multi-worker --workers 10.0.0.1:12345,10.0.0.2:12345 --index 0
    (and --index 1 on the second). --batch-size is the global batch, split over all replicas.
    """
    from .train.data import load_digits
    from .train.distribute import STRATEGIES, PeerLostError, make_strategy, resolve_cluster
    from .train.lstm import BACKUP_DIR, backup_path, save_trained, train

    if strategy not in STRATEGIES:
        raise EdgeRnnError(f"--strategy {strategy!r}: choose {' | '.join(STRATEGIES)}")
    if stream and strategy == "default":
        raise EdgeRnnError("--stream feeds the tf.distribute loop — add --strategy mirrored (one process) or multi-worker")
    if (workers is not None or index is not None) and strategy != "multi-worker":
        raise EdgeRnnError("--workers/--index describe a multi-worker cluster — add --strategy multi-worker")
    if (workers is None) != (index is None):
        raise EdgeRnnError("--workers and --index go together (or neither, with TF_CONFIG set)")
    cfg = LstmConfig(epochs=epochs, batch_size=batch_size, seed=seed)
    cluster = resolve_cluster(workers=workers, index=index) if strategy == "multi-worker" else None
    chief = cluster is None or cluster.is_chief
    digits = load_digits(data, stream=stream)
    _warn(digits.warnings)
    # A non-chief worker's OUT holds only its epoch backups (kept there to survive a kill); it goes when they go.
    made_out_dir = not out_dir.is_dir() or all(p.name == BACKUP_DIR for p in out_dir.iterdir())
    check_writable_dir(out_dir)
    backup = backup_path(out_dir, resume=resume)
    err.print(f"data: {escape(digits.source, limit=MAX_PATH_CHARS)} — {len(digits.y_train)} train, {len(digits.y_test)} held out", highlight=False)
    # Before any other TF op: a process makes its strategy once (multi-worker waits, bounded, for its peers).
    try:
        dist = None if strategy == "default" else make_strategy(strategy, cluster=cluster, connect_timeout_s=connect_timeout)
    except EdgeRnnError:
        if made_out_dir:  # nothing trained: leave no empty folder behind
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    progress, on_epoch = _epoch_progress(cfg.epochs)
    try:
        with progress:
            result = train(digits, cfg=cfg, on_epoch=on_epoch, backup_dir=backup, resume=resume, strategy=dist, worker=cluster.index if cluster else 0)
    except PeerLostError as exc:
        # After a lost peer TF's collective runtime is broken: its thread pools print tracebacks while the
        # interpreter shuts down. The backups are on disk; leave at once.
        _print_error(exc)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    out.print(_history_table(result.history))
    if not chief:
        # Only the chief writes the model; this worker's backups are gone and nothing else was written.
        if made_out_dir:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        out.print(f"worker {cluster.index}: held-out accuracy {result.heldout_accuracy:.2%}; the chief writes the model")
        return
    path = save_trained(result, digits, out_dir, cfg=cfg)
    out.print(f"held-out accuracy {result.heldout_accuracy:.2%} → {escape(path, limit=MAX_PATH_CHARS)}", highlight=False)


@train_app.command("char-rnn")
@clean_errors
def train_char_rnn(
    text: Optional[Path] = typer.Option(None, help="UTF-8 training text (default: the bundled tiny Shakespeare)."),
    hidden: int = typer.Option(CharRnnConfig.hidden, min=1, max=MAX_HIDDEN, help="Hidden units."),
    seq_length: int = typer.Option(CharRnnConfig.seq_length, min=1, max=MAX_SEQ_LENGTH, help="Truncated-BPTT chunk length."),
    learning_rate: float = typer.Option(CharRnnConfig.learning_rate, min=0.0, help="Adagrad learning rate."),
    iters: int = typer.Option(CharRnnConfig.iters, min=1, max=MAX_CHAR_ITERS, help="Total Adagrad steps (a resumed run continues up to this)."),
    seed: int = typer.Option(CharRnnConfig.seed, help="Seed for the initial weights."),
    out_dir: Path = typer.Option(Path(DEFAULT_OUT) / CHAR_RNN_DIRNAME, "--out", help="Model folder to write."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint.npz."),
) -> None:
    """Train the NumPy reference char RNN (min-char-rnn, Adagrad) → OUT/checkpoint.npz and OUT/manifest.json.

    Example: edge-rnn train char-rnn --iters 130000 --out artifacts/char-rnn
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .train.char_rnn import load_trained, save_trained, train
    from .train.data import load_text

    cfg = CharRnnConfig(hidden=hidden, seq_length=seq_length, learning_rate=learning_rate, iters=iters, seed=seed)
    corpus = load_text(text)
    start = load_trained(out_dir)[0] if resume else None
    if start is not None and start.step >= cfg.iters:
        raise EdgeRnnError(f"the checkpoint in {out_dir} is already at step {start.step:,} — give --iters above it to train on")
    check_writable_dir(out_dir)
    progress = Progress(
        TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TextColumn("smoothed loss {task.fields[loss]:.3f} nats/char"),
        TimeElapsedColumn(), console=err.get(),
    )
    with progress:
        task = progress.add_task("train", total=cfg.iters, completed=start.step if start else 0, loss=float("nan"))
        result = train(corpus, config=cfg, resume=start, on_progress=lambda p: progress.update(task, completed=p.step, loss=p.smooth_loss))
    path = save_trained(result, out_dir=out_dir, text=corpus, text_source=str(text) if text else None, config=cfg)
    out.print(
        f"{result.steps:,} steps in {result.seconds:.1f} s ({result.steps / max(result.seconds, 1e-9):,.0f}/s); "
        f"held-out loss {result.val_loss:.4f} nats/char → {escape(path, limit=MAX_PATH_CHARS)}", highlight=False
    )


def _audit_table(audit: list[dict]) -> Table:
    table = Table(title="graph audit: each Keras layer → the ONNX ops it became")
    # Names fold (a user's layer name can be long), op lists and notes wrap at their spaces: no cell is cut.
    for name in ("layer", "class", "ONNX ops", "time loop", "note"):
        table.add_column(name, overflow="fold", no_wrap=name == "time loop")
    for entry in audit:
        ops = entry["onnx_ops"]
        loop = "fused" if entry["fused"] else ("LOOP" if {"Loop", "Scan"} & set(ops) else "—")
        op_text = ", ".join(f"{op}×{n}" if n > 1 else op for op, n in Counter(ops).items()) or "—"
        table.add_row(escape(entry["layer"]), escape(entry["cls"]), escape(op_text, limit=None), loop, escape(entry["note"], limit=None))
    return table


@app.command()
@clean_errors
def export(
    model: Path = typer.Argument(..., help="MODEL.keras (a new folder is made) or a model folder with manifest.json (exported in place)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for a .keras file's export (default: beside it, named after it)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Class names, one per line, as many as the first output's last dimension."),
    fail_on_loop: bool = typer.Option(False, "--fail-on-loop", help="Fail instead of falling back to tf2onnx, and if any graph holds Loop/Scan."),
    trust_h5: bool = typer.Option(False, "--trust-h5", help="Load an .h5 file (its loader can run code stored in the file: only for files you trust)."),
    opset: int = typer.Option(ExportConfig.opset, min=13, max=18, help="ONNX opset (13–18)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Your data (FILE.npz or a folder of .npy, as for evaluate): parity is also checked on its first rows."),
) -> None:
    """Export a Keras model or a model folder to ONNX (fused LSTM/GRU/RNN ops, a step model where it streams),
    validated output by output against the source (with --data, on your first rows too).

    Example: edge-rnn export my_model.keras --out models/my_model --labels labels.txt --data test.npz
    """
    if not os.path.lexists(model):  # answered before the exporter imports onnx, onnxruntime and TensorFlow
        raise ModelFileError(f"no file or folder {model} — give a .keras model file or an exported model folder "
                             "(edge-rnn export MODEL.keras)")
    from .exporter import export as run_export

    report = run_export(model, cfg=ExportConfig(opset=opset), out=out_dir, labels=labels, fail_on_loop=fail_on_loop, trust_h5=trust_h5,
                        data=data)
    for note in report.notes:
        err.print(escape(note, limit=MAX_MESSAGE_CHARS), highlight=False, soft_wrap=True)
    if report.audit:
        out.print(_audit_table(report.audit))
    for validation in report.validations:
        for name, entry in validation.metrics().items():
            out.print(f"parity {validation.role} {escape(name)}: max|Δ| {entry['max_abs_diff']:.2e} ({entry['tolerance']}) ok", highlight=False)
    for validation in report.data_validations:
        for name, entry in validation.metrics().items():
            out.print(f"parity {validation.role} {escape(name)} on the first {report.data_rows} rows of {escape(report.data or '', limit=MAX_PATH_CHARS)}: "
                      f"max|Δ| {entry['max_abs_diff']:.2e} ({entry['tolerance']}) ok", highlight=False, soft_wrap=True)
    if report.step_refused:
        out.print(f"no step model: {escape(report.step_refused, limit=MAX_MESSAGE_CHARS)}", highlight=False, soft_wrap=True)
    for role, path in report.files.items():
        ops = ", ".join(f"{op}×{n}" for op, n in report.graphs.get(role, {}).items())
        out.print(escape(path, limit=MAX_PATH_CHARS) + (f" (opset {report.opset}): {escape(ops, limit=None)}" if ops else ""), highlight=False)
    by_command: dict[str, list[str]] = {}
    for name, command in report.removed.items():
        by_command.setdefault(command, []).append(name)
    for command, names in by_command.items():
        out.print(f"removed {escape(', '.join(names), limit=MAX_MESSAGE_CHARS)} (made from the previous weights) — "
                  f"{escape(command, limit=MAX_MESSAGE_CHARS)}", highlight=False, soft_wrap=True)


@app.command()
@clean_errors
def quantize(
    model_dir: Path = typer.Argument(..., help="Model folder holding model.onnx (and model.step.onnx, quantized too)."),
    variant: List[str] = typer.Option(
        ["int8"], "--variant", help="int8 (dynamic), int8-static (QDQ, calibrated), fp16; repeat for several."
    ),
    calibration: str = typer.Option("minmax", help="Calibration method for int8-static: minmax | entropy | percentile."),
    data: Optional[Path] = typer.Option(
        None, "--data",
        help="Your labelled data (.npz or a folder of .npy, as `evaluate` takes): int8-static calibrates on it, and every variant is judged on it at batch 1.",
    ),
    max_drop: Optional[float] = typer.Option(
        None, "--max-drop", min=0.0, max=1000.0,
        help="Budget of a variant's metric vs fp32 on --data: pp for accuracy (default 1), % for errors (default 2).",
    ),
    accuracy_aware: Optional[bool] = typer.Option(
        None, "--accuracy-aware/--judge-only",
        help="With --data: where int8 breaks the budget, keep the fewest nodes float that bring it inside (measured node by "
             "node; the default for int8 with --data), or only judge the fully quantized model (--judge-only).",
    ),
    metric: Optional[str] = typer.Option(None, "--metric", help="accuracy | binary-accuracy | mae | nats (default: from the model's output layer)."),
    max_rows: Optional[int] = typer.Option(None, "--max-rows", min=1, help="Judge on the first N rows of --data (default 2,000; batch 1 is slow on big data)."),
    calibration_data: List[str] = typer.Option(
        [], "--calibration-data",
        help="int8-static calibration only: an .npz or .npy folder (as --data), or FILE.npy / NAME=FILE.npy per input (default: --data, else a built-in's training data).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print each variant's full coverage record as one JSON document on stdout (nothing else on stdout)."),
) -> None:
    """Quantize DIR/model.onnx (and the step model) with onnxruntime.quantization; print per file what became int8 and
    how, node by node (read from the file), what stayed float and why, and a verdict. With --data, judge every variant
    on your data (exit 1 when one breaks its promise; it is still written and recorded).

    Example: edge-rnn quantize models/co2 --variant int8 --data co2_test.npz --max-drop 2
    """
    from .quantize import ACCURACY_VARIANTS
    from .quantize import quantize as run_quantize

    if accuracy_aware is None:  # accuracy control is what a budget on your data asks for, where it applies
        accuracy_aware = data is not None and any(v in ACCURACY_VARIANTS for v in variant)

    from .quantize import PromiseBroken

    try:
        reports = run_quantize(model_dir, variants=tuple(variant), calibration=calibration, calibration_data=calibration_data,
                               data=data, metric=metric, max_drop=max_drop, max_rows=max_rows, accuracy_aware=accuracy_aware)
    except PromiseBroken as broken:
        if not as_json:
            raise
        # Every variant was written and recorded: the report says which broke its promise; the error line follows.
        _print_quantize_json(model_dir, broken.reports)
        raise
    if as_json:
        _print_quantize_json(model_dir, reports)
        return
    for report in reports:
        out.print(f"{escape(report.path, limit=MAX_PATH_CHARS)} ({escape(report.role)}): {report.bytes:,} bytes, "
                  f"{report.bytes / report.fp32_bytes:.2f}× the fp32 file", highlight=False)
        for line in _coverage_lines(report):
            out.print(line, highlight=False)
        drift = report.coverage.get("step_drift")
        if drift and "note" in drift:
            out.print(f"  step drift: {escape(drift['note'], limit=MAX_MESSAGE_CHARS)}", highlight=False)
        if drift and drift["steps"]:
            streams = f" ({drift['streams']} streams × {drift['steps_per_stream']})" if drift["streams"] > 1 else ""
            out.print(f"  step drift vs fp32 over {drift['steps']:,} steps{streams}: outputs max|Δ| "
                      f"{max(drift['outputs_max_abs_diff'].values(), default=0.0):.2e}, state max|Δ| "
                      f"{max(drift['state_max_abs_diff'].values(), default=0.0):.2e}", highlight=False)
        if report.verdict is not None or report.accuracy_control:
            for line in report.judgement_lines():
                out.print(f"  {escape(line, limit=MAX_MESSAGE_CHARS)}", highlight=False, soft_wrap=True)
        out.print(f"  [bold]verdict[/] {escape(report.verdict_line(), limit=MAX_MESSAGE_CHARS)}", highlight=False)


def _print_quantize_json(model_dir: Path, reports) -> None:
    """quantize --json: one JSON document on stdout, every variant's verdict and full coverage record."""
    doc = {"model_dir": str(model_dir), "variants": [
        {"variant": r.variant, "role": r.role, "path": str(r.path), "bytes": r.bytes, "fp32_bytes": r.fp32_bytes,
         "ok": r.ok, "verdict": r.verdict_line(), "coverage": r.coverage} for r in reports]}
    typer.echo(json.dumps(doc, ensure_ascii=False))


# The coverage table's columns (node, weights stored as, computed as, weight bytes): 2 + 28 + 1 + 7 + 1 + 30 + 1 + 10 = 80.
_COVERAGE_WIDTHS = (28, 7, 30, 10)


def _coverage_lines(report) -> list[str]:
    """Per node that computes with weights: how they are stored and computed (read from the file), then the int8 and
    float totals and why each float op stayed float; lines of at most 80 columns, names escaped."""
    def cells(values: list[str]) -> str:
        node, stored, computed, size = (shown(v, limit=w) for v, w in zip(values, _COVERAGE_WIDTHS))
        w = _COVERAGE_WIDTHS
        return escape(f"  {node:<{w[0]}} {stored:<{w[1]}} {computed:<{w[2]}} {size:>{w[3]}}".rstrip(), limit=None)

    rows = report.coverage_rows()
    lines = [cells(["node (layer)", "weights", "computed as", "bytes"])]
    lines += [cells([r["node"], r["stored"], r["computed"], f"{r['bytes']:,}"]) for r in rows]
    if not rows:
        lines.append("  (no node computes with weights)")
    quantized = ", ".join(f"{op}×{n}" for op, n in report.coverage.get("quantized", {}).items()) or "nothing"
    lines.append(f"  int8: {escape(quantized, limit=None)}" if report.variant != "fp16" else
                 f"  float16: {escape(', '.join(f'{op}×{n}' for op, n in report.coverage.get('float16', {}).items()) or 'nothing', limit=None)}")
    for op, entry in report.coverage.get("still_float", {}).items():
        lines.append(f"  float: {escape(op)}×{entry['count']} ({entry['weight_bytes']:,} bytes) — {escape(entry['why'], limit=MAX_MESSAGE_CHARS)}")
    return lines


@app.command("ort")
@clean_errors
def ort_format(
    model_dir: Path = typer.Argument(..., help="Exported model folder (manifest.json beside its .onnx files)."),
    variants: List[str] = typer.Option([], "--variant", help="fp32, int8, fp16, int8-static… (each with its step form); repeat it. Default: every ONNX file."),
) -> None:
    """Add the ORT-format form (.ort, optimised at the portable `basic` level) of the folder's ONNX files and the
    required_operators.config a reduced onnxruntime build takes; infer, stream and generate run the .ort files.

    Example: edge-rnn ort artifacts/mnist-lstm --variant int8
    """
    from .export.ort_format import ORT_OPTIMIZATION, add_ort

    for role, name in add_ort(model_dir, variants=variants).items():
        print(f"{shown(role):20s} {shown(model_dir / name, limit=MAX_PATH_CHARS)}")
    print(f"optimisation level: {ORT_OPTIMIZATION} (portable across CPUs); recorded in {shown(model_dir / 'manifest.json', limit=MAX_PATH_CHARS)}")


@app.command()
@clean_errors
def infer(
    model: Path = typer.Argument(..., help="MODEL.onnx with its manifest.json beside it, or a bundle (.tar.gz, see `edge-rnn bundle`)."),
    inputs: Optional[List[Path]] = typer.Argument(
        None, help="Images (PNG, grey or RGB) or .npy arrays for image models; one .npy for a one-input model."
    ),
    named: List[str] = typer.Option([], "--input", help="NAME=FILE.npy for each input of a model with several; repeat it."),
    top_k: int = typer.Option(1, "--top-k", min=1, help="How many labels to show per input (models with labels)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    threads: int = typer.Option(0, min=0, max=256, help="onnxruntime intra-op threads (0 = onnxruntime's default)."),
    role: Optional[str] = typer.Option(None, "--role", help="Which file of a bundle to run (a manifest role such as onnx_int8; default: the first variant)."),
) -> None:
    """Run an exported model on onnxruntime (no TensorFlow needed): every output, labels where the model has them.

    Example: edge-rnn infer artifacts/mnist-lstm/model.int8.onnx digit.png batch.npy --top-k 3
    """
    from .device.runtime import infer as run_infer

    result = run_infer(model, inputs or [], named=named, top_k=top_k, threads=threads or None, role=role)
    if as_json:
        # Every row: `labels` those chosen; `label`/`probability` the one chosen (a binary classifier's probability is
        # of that label; multilabel: the surest of those chosen, null when none is) and `top` the k best; multilabel
        # rows add `scores`, each label's own probability and whether it is chosen (≥ 0.5).
        rows = []
        for p in result.predictions:
            row = {"input": p.input, "kind": p.kind, "label": p.label if p.chosen else None, "probability": p.probability,
                   "labels": p.chosen, "top": [{"label": l, "probability": q} for l, q in p.top]}
            if p.kind == "multilabel":
                row["scores"] = [{"label": l, "probability": q, "chosen": l in p.chosen} for l, q in p.scores]
            rows.append(row)
        payload = {"model": str(model), "predictions": rows}
        if result.outputs:
            payload["outputs"] = {name: y.tolist() for name, y in result.outputs.items()}
        # ASCII JSON (json.dumps escapes every control character); NaN is not JSON, and infer refuses it before here.
        print(json.dumps(payload, indent=2, allow_nan=False))
        return
    # Plain text, not a rich table: the device's answer should not wait for rich's ~25 ms import.
    if result.predictions and result.predictions[0].kind == "multilabel":
        # Each label its own yes/no at 0.5: the labels chosen, then every label's probability.
        names = [label for label, _ in result.predictions[0].scores]
        rows = [[shown(p.input), ", ".join(shown(l) for l in p.chosen) or "(none)", *(f"{q:.4f}" for _, q in p.scores)]
                for p in result.predictions]
        print(_plain_table(["input", "labels (p ≥ 0.5)", *(shown(n) for n in names)], rows))
    elif result.predictions:
        headers = ["input", "label", "probability"] + ([f"top {top_k}"] if top_k > 1 else [])
        rows = [[shown(p.input), shown(p.label), f"{p.probability:.4f}"]
                + (["  ".join(f"{shown(l)}:{q:.3f}" for l, q in p.top)] if top_k > 1 else []) for p in result.predictions]
        print(_plain_table(headers, rows))
    for name, y in result.outputs.items():
        print(f"{shown(name)} {tuple(y.shape)}:")
        for row, values in zip(result.rows, y):
            print(f"  {shown(row)}: {json.dumps(values.astype(float).round(4).tolist())}")


def _json_floats(y, digits: int, *, dtype: str | None = None):
    """An output for a JSON line: floats rounded to `digits` decimals (as infer prints them), or with 0 each the shortest
    decimal that reads back as the same float (float32: not the 17 digits of its double); other dtypes as they are."""
    import numpy as np

    from .device.runtime import short_floats

    y = np.asarray(y, dtype=dtype)
    if digits == 0 or y.dtype.kind != "f":
        return short_floats(y)
    return np.round(y.astype(np.float64), digits).tolist()


def _plain_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _print_as_made(prime: str, pieces) -> None:
    """Print the prime, then each piece of generated text as it comes (flushed); Ctrl-C ends it with exit 130.
    Text, but a model's vocabulary comes from a file: control characters other than newline and tab are shown escaped."""
    try:
        sys.stdout.write(shown(prime, limit=None, keep="\n\t"))
        for piece in pieces:
            sys.stdout.write(shown(piece, limit=None, keep="\n\t"))
            sys.stdout.flush()
        sys.stdout.write("\n")
    except KeyboardInterrupt:
        # The text so far is already out; end its line, and exit as a shell expects of SIGINT (128 + 2).
        sys.stdout.write("\n")
        sys.stdout.flush()
        raise typer.Exit(130) from None


@app.command()
@clean_errors
def generate(
    model: Path = typer.Argument(..., help="char-rnn MODEL.onnx with its manifest.json beside it, or a bundle (.tar.gz) of one."),
    prime: str = typer.Option("\n", help="Text to start from; every character must be in the model's vocabulary."),
    length: int = typer.Option(300, min=0, max=MAX_GENERATE_LENGTH, help="Characters to generate after the prime (printed as they are made)."),
    temperature: float = typer.Option(1.0, help="Softmax temperature (> 0): lower is safer, higher is wilder."),
    seed: int = typer.Option(0, help="Sampling seed: the same seed prints the same text as the NumPy sampler."),
    threads: int = typer.Option(1, min=0, max=256, help="onnxruntime intra-op threads (0 = onnxruntime's default)."),
    role: Optional[str] = typer.Option(None, "--role", help="Which file of a bundle to run (a manifest role such as onnx_int8; default: the first variant)."),
) -> None:
    """Generate text with an exported char RNN on onnxruntime, carrying the hidden state between steps.

    Example: edge-rnn generate artifacts/char-rnn/model.onnx --prime "ROMEO:" --length 300 --seed 1
    """
    from .device.runtime import iter_generate

    pieces = iter_generate(model, prime=prime, length=length, temperature=temperature, seed=seed, threads=threads or None, role=role)
    _print_as_made(prime, pieces)


@app.command()
@clean_errors
def stream(
    model: Path = typer.Argument(..., help="A step model (MODEL.step.onnx, or the char RNN's model.onnx) with its manifest.json beside it, or a bundle (.tar.gz) holding one."),
    inputs: List[str] = typer.Option(
        [], "--input",
        help="FILE.npy holding one sequence, (T, …) or (1, T, …), or NAME=FILE.npy per input. Without it: JSON rows from stdin, one step per line.",
    ),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after this many steps."),
    threads: int = typer.Option(1, min=0, max=256, help="onnxruntime intra-op threads (0 = onnxruntime's default)."),
    role: Optional[str] = typer.Option(None, "--role", help="Which file of a bundle to run (a manifest role such as onnx_int8; default: the first step form)."),
    digits: int = typer.Option(4, "--digits", min=0, max=12, help="Decimals of each float, as infer prints them (0: every float at its own float32 precision, for a program)."),
) -> None:
    """Feed a sequence one time step at a time, carrying the recurrent state; print each step's outputs as a JSON line
    (with the step's label and probability where the manifest has labels).

    Example: edge-rnn stream models/sensor/model.step.onnx --input window.npy --max-steps 100
    """
    from .device.inputs import MAX_JSON_LINE_BYTES
    from .device.runtime import labelled_stream
    from .device.text import utf8_lines

    # stdin's bytes, decoded as UTF-8 whatever the locale says (a line that is not UTF-8 is refused by number).
    stdin = getattr(sys.stdin, "buffer", None)
    if not inputs and stdin is None:
        raise EdgeRnnError("no --input and no stdin to read JSON rows from — give --input FILE.npy, or pipe one JSON row per line")
    lines = None if inputs else utf8_lines(stdin, max_bytes=MAX_JSON_LINE_BYTES)
    steps = labelled_stream(model, inputs=inputs, lines=lines, max_steps=max_steps, threads=threads or None, role=role)
    for t, (outputs, p) in enumerate(steps):
        # Batch 1: each output without its batch axis, floats at their own precision (float32: ~7 digits, not the 17 of
        # its double). Flushed line by line: this is the device loop. The steps are finite (the stream refuses a step
        # that overflowed), so every line is JSON. Where the manifest has labels: the step's label(s), as `infer`'s.
        line = {"step": t, "outputs": {name: _json_floats(y[0], digits) for name, y in outputs.items()}}
        if p is not None:
            line.update({"label": p.label if p.chosen else None, "probability": _json_floats(p.probability, digits, dtype="float32"),
                         "labels": p.chosen})
        print(json.dumps(line, allow_nan=False), flush=True)



@app.command("bundle")
@clean_errors
def bundle_cmd(
    model_dir: Path = typer.Argument(..., help="An exported model folder (manifest.json, model files, and its Keras file or checkpoint)."),
    variants: List[str] = typer.Option(["int8"], "--variant", help="fp32 | int8 | int8-static | fp16 | step | step-int8; repeat it."),
    ort: bool = typer.Option(False, "--ort", help="Add each model's .ort form and its required_operators.config."),
    out_file: Optional[Path] = typer.Option(None, "-o", "--out", help="The bundle to write (NAME.tar.gz; default: DIR.tar.gz beside DIR)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Labelled data (FILE.npz or a folder of .npy, as for evaluate): reference vectors drawn from it, each model's metric on it recorded."),
) -> None:
    """Pack what a device needs into one .tar.gz: the chosen model files, a device manifest and the source model's reference vectors
    (with --data: drawn from your data, one class after another, and each bundled model's metric on all of it recorded).

    Example: edge-rnn bundle artifacts/mnist-lstm --variant int8 --variant step --data test.npz -o mnist.tar.gz
    """
    from .bundle import make_bundle

    path = make_bundle(model_dir, variants=tuple(variants), ort=ort, out=out_file, data=data)
    out.print(f"bundle → {escape(path, limit=MAX_PATH_CHARS)} ({path.stat().st_size:,} bytes)", highlight=False)
    if data is not None:
        from .device.bundle import open_bundle

        out.print(_recorded_metrics_table(open_bundle(path)))


def _recorded_metrics_table(opened) -> Table | None:
    """The metrics a bundle records on its maker's data, one row per model (None for a bundle made without --data)."""
    from .device.bundle import recorded_metrics

    recorded = recorded_metrics(opened)
    return None if recorded is None else _metrics_table(recorded)


def _metrics_table(recorded) -> Table:
    """RecordedMetrics as a table: one row per bundled model."""
    table = Table(title=f"recorded at bundling on {escape(recorded.data)}: {recorded.examples:,} examples, batch {recorded.batch}")
    for column in ("role", "output", "metric", "value", "95% interval", "promise"):
        figure = column in ("value", "95% interval")
        table.add_column(column, justify="right" if figure else "left", no_wrap=figure, overflow="ellipsis" if figure else "fold")
    for m in recorded.roles:
        interval = "" if m.low is None or m.high is None else f"{_figure_text(m.metric, m.low, unit=False, digits=3)}–{_figure_text(m.metric, m.high, digits=3)}"
        promise = {True: "kept", False: "BROKEN", None: "—"}[m.ok]
        table.add_row(escape(m.role), escape(m.output), escape(m.metric), _figure_text(m.metric, m.value), interval, promise)
    return table


@app.command("verify")
@clean_errors
def verify_cmd(
    bundle: Path = typer.Argument(..., help="A bundle made by `edge-rnn bundle` (.tar.gz)."),
    run: bool = typer.Option(False, "--run", help="Also self-test: run the reference inputs on this machine's onnxruntime."),
) -> None:
    """Check a bundle's members against its manifest; with --run, prove this machine's onnxruntime answers like the source model.

    Example: edge-rnn verify mnist.tar.gz --run
    """
    from .device.api import verify_bundle

    checked = verify_bundle(bundle, run=run)
    for line in checked.lines:
        out.print(f"  {escape(line, limit=MAX_MESSAGE_CHARS)}", highlight=False)
    out.print(f"{escape(bundle, limit=MAX_PATH_CHARS)}: every member matches its manifest", highlight=False)
    if checked.metrics is not None:
        out.print(_metrics_table(checked.metrics))
    report = checked.self_test
    if report is None:
        return
    table = Table(title=f"self-test: {report.count} reference inputs, source {escape(report.source)}", caption=escape(report.ran_with))
    for column in ("role", "output", "max |Δ|", "tolerance", "top-1 (sure)", "result"):
        table.add_column(column, justify="left" if column in ("role", "output", "result") else "right")
    for r in report.results:
        # A classifier output with its top-1 promise: the agreement, or "none sure" when no reference input is sure enough
        # to judge it (the bound on |Δ| still holds); "—" for outputs without a top-1 promise (no labels: not a classifier).
        top1 = f"{r.agreement:.0%} of {r.sure}" if r.agreement is not None else "none sure" if r.argmax_min is not None else "—"
        table.add_row(escape(r.role), escape(r.output), f"{r.max_abs_diff:.2e}", f"{r.atol:.2e}", top1,
                      "ok" if r.ok else escape(f"FAIL {r.failure}".strip(), limit=MAX_MESSAGE_CHARS))
    out.print(table)
    if not checked.ok:
        raise EdgeRnnError(checked.failure)


@app.command("sample")
@clean_errors
def sample_numpy(
    model_dir: Path = typer.Argument(..., help="char-rnn folder holding checkpoint.npz."),
    prime: str = typer.Option("\n", help="Text to start from."),
    length: int = typer.Option(300, min=0, max=MAX_GENERATE_LENGTH, help="Characters to generate after the prime (printed as they are made)."),
    temperature: float = typer.Option(1.0, help="Softmax temperature (> 0)."),
    seed: int = typer.Option(0, help="Sampling seed."),
) -> None:
    """Generate text with the NumPy reference char RNN from its checkpoint (the ONNX model's oracle).

    Example: edge-rnn sample artifacts/char-rnn --prime "ROMEO:" --length 300 --seed 1
    """
    from .train.char_rnn import load_trained, numpy_step
    from .device.sampling import generation_h0, iter_sample

    checkpoint, manifest = load_trained(model_dir)
    h0 = generation_h0(manifest, hidden=checkpoint.hidden)
    chars = iter_sample(
        numpy_step(checkpoint.params), vocab=checkpoint.vocab, hidden=checkpoint.hidden, prime=prime, length=length,
        temperature=temperature, seed=seed, h0=h0,
    )
    _print_as_made(prime, chars)


BENCH_WIDE_ONLY = "load ms, p90, /s at the smaller batches, peak MB"


def _bench_score_text(r, head: str) -> str:
    """A bench row's accuracy cell under the compact table's heading: the figure, then its 95% interval (it wraps)."""
    from .bench.report import accuracy_text

    if r.accuracy is None:
        return "—"
    if head not in ("accuracy", "nats/char"):
        return accuracy_text(r.metric, r.accuracy, r.accuracy_interval)
    value, bound = (f"{r.accuracy:.2%}", "{:.1%}") if head == "accuracy" else (f"{r.accuracy:.4f}", "{:.4f}")
    iv = r.accuracy_interval
    return value + ("" if iv is None or None in iv else f" ({bound.format(iv[0])}–{bound.format(iv[1])})")


def _recommendation_table(model: str, results, big: str | None, *, budget=()) -> Table | None:
    """For a user's model: the row to ship for each use — smallest file, fastest at batch 1, fastest at the largest
    batch, most accurate where bench scored it on data — with its figure, fp32 onnxruntime's beside it, and its score.
    The candidates are the model's own files (not the plain tf2onnx baselines, which the caption names); streaming
    picks the fastest step file of the per-step budget at what a device program pays per step (Stream.step, with its
    input checks), else the step row (the graph alone)."""
    from .bench.report import accuracy_text, max_abs_diff_text

    fp32 = next((r for r in results if (r.variant, r.runtime) == ("fp32", "onnxruntime")), None)
    whole = [r for r in results if not r.variant.endswith("-plain") and r.variant != "step"]
    if not whole:
        return None
    score = lambda r: accuracy_text(r.metric, r.accuracy, None) if r.accuracy is not None else f"max|Δ| {max_abs_diff_text(r.max_abs_diff)}"  # noqa: E731
    kib = lambda r: f"{r.size_bytes / 1024:,.0f} KiB"  # noqa: E731
    ms = lambda r: f"{_ms(r.latency_ms['p50'])} ms"  # noqa: E731
    picks = [("smallest file", min(whole, key=lambda r: (r.size_bytes, r.latency_ms["p50"])), kib),
             ("fastest at batch 1", min(whole, key=lambda r: r.latency_ms["p50"]), ms)]
    if big:
        picks.append((f"fastest at batch {big}", max(whole, key=lambda r: r.throughput_per_s[big]), lambda r: f"{_per_s(r.throughput_per_s[big])}/s"))
    scored = [r for r in whole if r.accuracy is not None]
    if scored:
        lower = not scored[0].metric.endswith("accuracy")
        best = min(scored, key=lambda r: ((r.accuracy if lower else -r.accuracy), r.size_bytes))
        picks.append(("most accurate", best, lambda r: accuracy_text(r.metric, r.accuracy, None)))
    step = next((r for r in results if r.variant == "step"), None)
    stepped = min(budget, key=lambda b: b.step_us["p50"]) if budget else None
    if stepped is not None:
        picks.append(("streaming", stepped, None))
    elif step is not None:
        picks.append(("streaming", step, lambda r: f"{_ms(r.latency_ms['p50'])} ms/step"))
    plain = sorted({r.variant for r in results if r.variant.endswith("-plain")})
    caption = ("Picks among your model's own files. "
               + (f"{', '.join(plain)}: tf2onnx's plain export, a baseline, not a pick. " if plain else "")
               + ("streaming: Stream.step as a device program calls it (the per-step budget); the step row above times the graph alone."
                  if stepped is not None else "streaming: the step row, the graph alone (bench --budget adds Stream.step's input checks)."))
    table = Table(title=f"{escape(model)}: which file for which use (timings at batch 1 unless stated)", caption=caption,
                  pad_edge=False)
    for name in ("use", "pick", "figure", "fp32 ort", "answers"):
        table.add_column(name, no_wrap=name in ("figure", "fp32 ort"), justify="right" if name in ("figure", "fp32 ort") else "left")
    for use, r, figure in picks:
        if figure is None:  # a budget row: Stream.step p50 of that step file
            table.add_row(use, f"{escape(r.variant)} onnxruntime", f"{r.step_us['p50'] / 1e3:.3f} ms/step", "—",
                          score(step) if r.variant == "step" and step is not None else "—")
            continue
        versus = "—" if fp32 is None or r.variant == "step" else figure(fp32)
        table.add_row(use, f"{escape(r.variant)} {escape(r.runtime)}", figure(r), versus, score(r))
    return table


def _bench_tables(report, *, wide: bool = False, width: int = 80) -> list[Table]:
    """The measurements, the quantization coverage of each variant, and the targets as ratios.

    By default one table per model, of the columns that fit 80 characters: variant, runtime, KiB, p50 and p99 ms at
    batch 1, throughput at the largest batch, then accuracy (or the metric on --data), max |Δ| and top-1 agreement
    vs onnxruntime fp32 where any row has them. `wide`: every column, every model in one table (--json keeps all)."""
    m = report.machine
    from .bench.report import accuracy_text, max_abs_diff_text
    from .device.hostinfo import describe

    scored = report.config.get("data")
    quick = report.config.get("quick")
    on_data = f"; accuracy: on {escape(scored['file'])} at batch 1, 95% interval" if scored else ""
    host = f"{describe(m['cpu_features'])}, {m['threads']} thread(s), opt level {report.config['opt_level']}"
    timing = "QUICK: ~0.1 s of timing per row, one round — indicative figures (drop --quick to measure)." if quick else ""
    batches = [str(b) for b in report.config["batch_sizes"]]
    diffs = any(r.max_abs_diff for r in report.results)
    agree_text = lambda r: "—" if r.agreement_with_fp32 is None else f"{r.agreement_with_fp32:.2%}"  # noqa: E731
    from rich.console import Console

    console = Console(width=width)
    tables = []
    if wide:
        rows = Table(title=f"edge-rnn bench — {host}{on_data}", caption=timing or None, caption_justify="left", pad_edge=False)
        for name in ("model", "variant", "runtime", "size KiB", "load ms", "p50 ms", "p90 ms", "p99 ms",
                     *(f"/s @{b}" for b in batches), "peak MB", "accuracy", *(["max|Δ| fp32"] if diffs else []), "agree fp32"):
            text = name in ("model", "variant", "runtime", "accuracy")
            rows.add_column(name, justify="left" if text else "right", no_wrap=not text, overflow="fold")
        for r in report.results:
            rows.add_row(escape(r.model), escape(r.variant), escape(r.runtime), f"{r.size_bytes / 1024:,.0f}", _ms(r.load_ms),
                         *(_ms(r.latency_ms[p]) for p in ("p50", "p90", "p99")),
                         *(_per_s(r.throughput_per_s[b]) for b in batches), f"{r.peak_rss_mb:.0f}",
                         accuracy_text(r.metric, r.accuracy, r.accuracy_interval), *([max_abs_diff_text(r.max_abs_diff)] if diffs else []),
                         agree_text(r))
        tables.append(rows)
    else:
        big = batches[-1] if batches else None
        models = list(dict.fromkeys(r.model for r in report.results))
        for k, model in enumerate(models):
            results = [r for r in report.results if r.model == model]
            has_acc = any(r.accuracy is not None for r in results)
            has_diff = any(r.max_abs_diff for r in results)
            has_agree = any(r.agreement_with_fp32 is not None for r in results)
            metrics = {r.metric for r in results if r.accuracy is not None}
            acc_head = ("nats/char" if metrics == {"val_nats_per_char"} else "accuracy" if all(x.endswith("accuracy") for x in metrics)
                        else escape(metrics.pop()) if len(metrics) == 1 else "metric")
            cells = {"variant": lambda r: escape(r.variant), "runtime": lambda r: escape(r.runtime),
                     "KiB": lambda r: f"{r.size_bytes / 1024:,.0f}", "p50 ms": lambda r: _ms(r.latency_ms["p50"]),
                     "p99 ms": lambda r: _ms(r.latency_ms["p99"])}
            if big:
                cells[f"/s @{big}"] = lambda r: _per_s(r.throughput_per_s[big])
            if has_acc:
                cells[acc_head] = lambda r, head=acc_head: _bench_score_text(r, head)
            if has_diff:
                cells["max|Δ|"] = lambda r: max_abs_diff_text(r.max_abs_diff)
            if has_agree:
                cells["agree"] = agree_text
            # Narrower than the terminal: p99, then max|Δ| (kept in the JSON) give way before any figure is cut.
            left_out = []
            for drop in (None, "p99 ms", "max|Δ|"):
                if drop is not None and drop in cells and len(cells) > 2:
                    del cells[drop]
                    left_out.append(drop)
                table = Table(title=f"edge-rnn bench {escape(model)} — {host}{on_data}", caption_justify="left", pad_edge=False)
                for i, name in enumerate(cells):
                    text = i < 2 or name == acc_head
                    # The score wraps at its space (figure, then interval), never inside a figure.
                    table.add_column(name, justify="left" if text else "right", no_wrap=i < 2 or not text)
                for r in results:
                    table.add_row(*(cell(r) for cell in cells.values()))
                if table.needed_width(console, console.options) <= width:
                    break
            caption = [timing] if timing else []
            if left_out:
                caption.append(f"Left out at this width: {', '.join(left_out)} (--wide shows every column).")
            if k == len(models) - 1:
                caption.append(f"{'p50, p99' if 'p99 ms' in cells else 'p50'}: ms per call at batch 1; /s @{big}: samples (sequences) per second at batch {big}"
                               + ("; max|Δ|, agree: vs onnxruntime fp32" if diffs or has_agree else "")
                               + f". --wide adds {BENCH_WIDE_ONLY}; --json keeps every figure.")
            table.caption = " ".join(caption) or None
            tables.append(table)
    for model in dict.fromkeys(r.model for r in report.results):
        quantized_rows = [r for r in report.results if r.model == model and r.coverage is not None and r.variant != "fp32"]
        if not quantized_rows:
            continue
        # An op a line; why an op stayed float is a line under the table: the op names never fold.
        coverage = Table(title=f"{escape(model)}: quantization coverage (onnxruntime rows)", caption_justify="left", pad_edge=False)
        for name in ("variant", "quantized", "runs as int8", "still float", "weights\nvs fp32"):
            coverage.add_column(name, no_wrap=name != "still float", justify="right" if name.startswith("weights") else "left")
        whys = []
        for r in quantized_rows:
            c = r.coverage
            fmt = lambda ops: "\n".join(f"{escape(op)}×{n}" for op, n in ops.items()) or "—"  # noqa: E731
            still = c.get("still_float", {})
            whys += [f"{escape(r.variant)} {escape(op)}: {escape(v['why'], limit=MAX_MESSAGE_CHARS)}" for op, v in still.items()]
            quantized = fmt(c.get("quantized", {})) if c.get("quantized") else ("all weights\n→ float16" if "float16" in c else "—")
            coverage.add_row(escape(r.variant), quantized, fmt(c.get("runtime_int8_ops", {})), fmt({op: v["count"] for op, v in still.items()}),
                             f"{c['size']['weight_ratio']:.2f}×")
        coverage.caption = ("Still float: " + "; ".join(whys) + ".") if whys else None
        tables.append(coverage)
    # The targets are the built-in models' (mnist-lstm, char-rnn); a user's model gets a pick per use instead.
    kinds = report.config.get("kinds", {})
    users = [m for m in dict.fromkeys(r.model for r in report.results) if kinds.get(m) == "outputs"]
    built_in = [t for t in report.targets if not any(t.name.startswith(f"{m}: ") for m in users)]
    targets = Table(title="targets (batch-1 p50 latency unless stated)", pad_edge=False)
    for name in ("target", "measured", "goal", "met"):
        targets.add_column(name, no_wrap=name != "target", justify="right" if name == "measured" else "left")
    for t in built_in:
        targets.add_row(escape(t.name, limit=None), f"{t.ratio:.3g}", t.goal, "[green]yes[/]" if t.met else "[red]no[/]")
    tables += [targets] if built_in else []
    for model in users:
        budget = [b for b in (report.budget.rows if report.budget is not None else []) if b.model == model]
        table = _recommendation_table(model, [r for r in report.results if r.model == model], batches[-1] if batches else None,
                                      budget=budget)
        tables += [table] if table is not None else []
    return tables + ([_budget_table(report.budget)] if report.budget is not None and report.budget.rows else [])


def _budget_table(report) -> Table:
    """One row per steppable model file: state bytes per stream, weights bytes, peak memory, step latency; the host below."""
    from rich import box

    from .device.hostinfo import describe

    c, m = report.config, report.machine
    ort = m["libraries"].get("onnxruntime", "?")
    source = "/".join(sorted({row.memory_source for row in report.rows}))
    rounds = f", median of {c['rounds']} rounds" if c["rounds"] > 1 else ""
    caption = (f"{describe(m['cpu_features'])}; onnxruntime {ort}, {c['threads']} thread(s), opt level {c['opt_level']}. "
               f"Step: Stream.step at 1 stream, {c['steps']:,} timed steps after {c['warmup']:,} warm-up{rounds}. "
               f"Peak: {source} of a fresh process; (+model): over the same process after importing numpy and onnxruntime.")
    # No vertical rules and no edges: the eight columns fit 80 characters; a cell wider than its share folds, never "…".
    table = Table(title="per-step budget", caption=caption, caption_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name in ("model", "variant", "state\nB/stream", "weights\nB", "peak\nMiB", "+model\nMiB", "step\np50 µs", "step\np99 µs"):
        table.add_column(name, justify="left" if name in ("model", "variant") else "right", overflow="fold")
    us = lambda v: f"{v:.1f}" if v < 100 else f"{v:,.0f}"  # noqa: E731
    for r in report.rows:
        weights = "—" if r.weights_bytes is None else f"{r.weights_bytes:,}"
        table.add_row(escape(r.model), escape(r.variant), f"{r.state_bytes_per_stream:,}", weights, f"{r.peak_rss_mib:.1f}",
                      f"{r.model_rss_mib:.1f}", us(r.step_us["p50"]), us(r.step_us["p99"]))
    return table


@app.command()
@clean_errors
def bench(
    model_dirs: Optional[List[Path]] = typer.Argument(None, help="Model folders, built-in or from `edge-rnn export` (default: artifacts/mnist-lstm and artifacts/char-rnn that exist); with --budget, bundles too."),
    threads: int = typer.Option(1, min=1, max=256, help="Threads for every runtime (onnxruntime intra-op, TensorFlow, LiteRT)."),
    opt_level: str = typer.Option("all", "--opt-level", help="onnxruntime graph optimisation: disable | basic | extended | all."),
    runs: Optional[int] = typer.Option(None, min=1, max=MAX_BENCH_RUNS, help="Minimum timed batch-1 runs per row, over at least 1 s (default 1000; slow runtimes stop after 15 s, never below 200); with --budget, timed steps per row (default 2000)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON to this file."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw latency vs size to this PNG (needs matplotlib)."),
    calibration: str = typer.Option("minmax", help="Static int8 calibration: minmax | entropy | percentile."),
    rounds: Optional[int] = typer.Option(None, min=1, max=MAX_BENCH_ROUNDS, help="Measure every row this many times, interleaved; timings are medians over rounds (default 3; 1 with --budget)."),
    time_steps: Optional[int] = typer.Option(None, "--time-steps", min=1, max=MAX_TIME_STEPS, help="Time steps for models with a dynamic time axis (default 32; a fixed axis keeps its length)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Labelled data (FILE.npz or a folder of .npy, as for evaluate) every row answers at batch 1 (its first rows, up to a cap a note names): the accuracy column becomes its metric with a 95% interval. One model folder."),
    budget: bool = typer.Option(False, "--budget", help="Only the per-step budget of each step model: state bytes per stream, weights bytes, peak memory and step latency p50/p99 at one stream. Needs numpy and onnxruntime alone: runs on a board's device install."),
    quick: bool = typer.Option(False, "--quick", help="About 0.1 s of timing per row and one round (unless --runs/--rounds say otherwise): a first look in seconds, figures marked indicative in the table and the JSON."),
    wide: bool = typer.Option(False, "--wide", help=f"Every column in one table ({BENCH_WIDE_ONLY} too), for a wide terminal."),
    verbose: bool = typer.Option(False, "--verbose", help="Let onnxruntime, tf2onnx, TensorFlow and Python warnings print their logs."),
) -> None:
    """Measure size, load time, latency, throughput, memory and accuracy (max |Δ| vs ONNX fp32 for exported Keras models,
    or with --data the metric on your data) of every variant and baseline, side by side, and each step model's budget.

    Example: edge-rnn bench models/my_model --data test.npz --json bench.json --plot bench.png
    On a board (device install): edge-rnn bench mnist.tar.gz --budget --json budget.json
    """
    from .bench.harness import BenchConfig, default_model_dirs
    from .bench.report import check_output_path, check_plot_path
    from .bench.report import write_json

    if json_path is not None:
        check_output_path(json_path, flag="--json")
    if budget:
        for flag, value in (("--plot", plot), ("--data", data), ("--time-steps", time_steps), ("--quick", quick or None), ("--wide", wide or None)):
            if value is not None:
                raise EdgeRnnError(f"{flag} is not used with --budget, which steps each step model at one stream — drop it")
        _bench_budget(model_dirs or default_model_dirs(), threads=threads, opt_level=opt_level, steps=runs, rounds=rounds, json_path=json_path)
        return
    from .bench.harness import bench as run_bench
    from .bench.report import plot as draw_plot

    cfg = BenchConfig(threads=threads, opt_level=opt_level, runs=runs or BenchConfig.runs, calibration=calibration,
                      rounds=rounds or BenchConfig.rounds, time_steps=time_steps, verbose=verbose)
    if quick:
        cfg = cfg.quick_config(runs=runs, rounds=rounds)
    if plot is not None:
        check_plot_path(plot)
    report = run_bench(
        model_dirs or default_model_dirs(), cfg=cfg,
        on_row=lambda model, variant, runtime: err.print(f"measuring {escape(model)} {escape(variant)} on {escape(runtime)}", highlight=False), data=data,
    )
    # Wrapped to the terminal: a row missing and why, a variant made, a row that failed.
    for note in report.notes:
        err.print(f"[bold yellow]note:[/] {escape(note, limit=MAX_MESSAGE_CHARS)}", highlight=False)
    if json_path is not None:
        write_json(report, path=json_path)
    if plot is not None:
        draw_plot(report, path=plot)
    for table in _bench_tables(report, wide=wide, width=out.width):
        out.print(table)
    for path in (json_path, plot):
        if path is not None:
            out.print(f"→ {path}")


def _bench_budget(paths: List[Path], *, threads: int, opt_level: str, steps: Optional[int], rounds: Optional[int], json_path: Optional[Path]) -> None:
    """`bench --budget`: the per-step budget table (and JSON) of every step model in the folders or bundles."""
    from .bench.budget import BudgetConfig
    from .bench.budget import budget as run_budget
    from .bench.report import write_json

    cfg = BudgetConfig(threads=threads, opt_level=opt_level, steps=steps or BudgetConfig.steps, rounds=rounds or BudgetConfig.rounds)
    report = run_budget(paths, cfg=cfg, on_row=lambda model, variant: err.print(f"measuring the budget of {escape(model)} {escape(variant)}", highlight=False))
    _warn(report.notes)
    if json_path is not None:
        write_json(report, path=json_path)
    out.print(_budget_table(report))
    if json_path is not None:
        out.print(f"→ {json_path}")


CHECK_STATUS = {"ok": "[green]ok[/]", "wrong": "[bold red]WRONG[/]", "cannot load": "[yellow]cannot load[/]", "not installed": "[dim]not installed[/]",
                "unsupported": "[yellow]unsupported[/]"}


def _check_table(report) -> Table:
    """One row per runtime: version, status, max |Δ| per input set, top-1 agreement, batch-1 latency (reasons below it)."""
    sets = ", ".join(f"{n} {name}" for name, n in report.sets.items())
    table = Table(title=f"edge-rnn check: {escape(report.file, limit=MAX_PATH_CHARS)} vs the {escape(report.expected_from)} on {sets} inputs",
                  pad_edge=False)
    # Figures never wrap; a long version folds, a status wraps at its space: 80 columns hold every figure.
    short = {"reference": "ref", "random": "rand"}
    for name in ("runtime", "version", "answers", *(f"max|Δ| {escape(short.get(s, s))}" for s in report.sets), "top-1", "ms b1"):
        table.add_column(name, justify="right" if name.startswith(("max", "top", "ms")) else "left", no_wrap=name not in ("version", "answers"),
                         overflow="fold" if name == "version" else "ellipsis")
    for r in report.results:
        diffs = [f"{max(r.max_abs_diff[s].values()):.1e}" if r.max_abs_diff.get(s) else "—" for s in report.sets]
        agree = "—" if r.agreement is None else f"{r.agreement:.2%}"
        latency = "—" if r.latency_ms is None else _ms(r.latency_ms)
        table.add_row(escape(r.runtime), escape(r.version or "—"), CHECK_STATUS[r.status], *diffs, agree, latency)
    return table


@app.command()
@clean_errors
def check(
    target: Path = typer.Argument(..., help="A model folder (made by export or pipeline), or a bundle (.tar.gz made by edge-rnn bundle)."),
    runtimes: List[str] = typer.Option([], "--runtime", help="onnxruntime | openvino | tract | onnx.reference; repeat it (default: all of them)."),
    role: Optional[str] = typer.Option(None, help="Which model to run, by manifest role such as onnx_int8 (default: a folder's onnx, a bundle's default role)."),
    batch: int = typer.Option(256, min=1, max=MAX_CHECK_BATCH, help="Size of the random batch every runtime also answers, beside the reference vectors."),
    threads: int = typer.Option(1, min=1, max=256, help="Threads for every runtime."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    allow_wrong: bool = typer.Option(False, "--allow-wrong", help="Exit 0 even when a runtime answers wrong (still reported)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Your data (.npz or .npy folder, as for evaluate): its first --batch rows are one more input set."),
) -> None:
    """Which runtime answers right: run one model file on several runtimes against the source model's answers.

    Exit code 1 when a named, installed runtime answers wrong (outside the file's fp32 tolerance, or a bundle's
    stored tolerance for the role), or when onnxruntime — the device's runtime — cannot load the file; another runtime
    that is not installed or cannot load it is reported, not failed, and so is one known to ignore an attribute or
    input the graph uses (onnx.reference on the MNIST LSTM's Relu activations or a mask's sequence_lens: unsupported).
    A folder's quantized variant (--role onnx_int8) is judged at the bound its bundle would store.

    Example: edge-rnn check artifacts/mnist-lstm.tar.gz --role onnx_int8 --runtime onnxruntime --runtime openvino
    """
    from .check import check as run_check

    report = run_check(target, runtimes=runtimes or None, role=role, batch=batch, threads=threads, data=data)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _warn(report.notes)
        out.print(_check_table(report))
        tolerances = ", ".join(f"{escape(k)} {escape(v)}" for k, v in report.tolerances.items())
        out.print(f"tolerance: {tolerances}; host: {escape(report.machine['description'])}", highlight=False, soft_wrap=True)
        for r in report.results:
            if r.reason:
                out.print(f"{CHECK_STATUS[r.status]} {escape(r.runtime)}: {escape(r.reason, limit=MAX_MESSAGE_CHARS)}", highlight=False, soft_wrap=True)
    if report.wrong:
        names = ", ".join(r.runtime for r in report.wrong)
        err.print(f"[bold red]wrong answers from:[/] {escape(names)}"
                  + (" (--allow-wrong: exit 0)" if allow_wrong else ""), highlight=False)
        if not allow_wrong:
            raise typer.Exit(1)
    # onnxruntime is the device's runtime: a file it cannot load is not a finding about other runtimes, it is unusable.
    broken = next((r for r in report.results if r.runtime == "onnxruntime" and r.status == "cannot load"), None)
    if broken is not None:
        raise EdgeRnnError(f"onnxruntime, the runtime `infer`, `stream` and the device use, cannot load {report.file}: {broken.reason}"
                           " — re-export the model (edge-rnn export) or check the file")


def _figure_text(name: str, value: float, *, unit: bool = True, digits: int = 4) -> str:
    if "accuracy" in name:
        return f"{100 * value:.2f}" + ("%" if unit else "")
    return f"{value:.{digits}g}"


def _evaluate_table(evaluation) -> Table:
    """One row per variant, readable at 80 columns: the headline metric, its interval, the change from fp32, top-1
    (or sign) agreement with fp32, the mean over examples of max |Δ| from fp32, and the promise's verdict."""
    from rich import box

    heads = {v.headline.name for v in evaluation.variants if v.headline}
    metric = escape(heads.pop()) if len(heads) == 1 else "metric"
    kinds = ", ".join(f"{escape(n)}: {k}" for n, k in evaluation.kinds.items())
    table = Table(title=f"evaluate: {evaluation.count:,} examples, batch {evaluation.batch} ({kinds})",
                  box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    for name in ("variant", metric, "95% interval", "vs fp32", "agree", "mean|Δ|", "ok"):
        table.add_column(name, justify="left" if name in ("variant", "ok") else "right", no_wrap=True)
    for v in evaluation.variants:
        h = v.headline
        interval = "" if h is None or h.low is None else f"{_figure_text(h.name, h.low, unit=False, digits=3)}–{_figure_text(h.name, h.high, digits=3)}"
        baseline = v.role == evaluation.baseline
        vs = ""
        if h is not None and v.vs_fp32 is not None and not baseline:
            vs = f"{100 * v.vs_fp32:+.2f}pp" if "accuracy" in h.name else f"{v.vs_fp32:+.3g}"
        agree = "" if v.agreement is None or baseline else f"{100 * v.agreement:.1f}%"
        mean = "" if v.mean_max_abs_diff is None or baseline else f"{v.mean_max_abs_diff:.0e}"
        verdict = {True: "[green]ok[/]", False: "[bold red]FAIL[/]", None: "fp32" if baseline else "—"}[v.verdict.ok]
        table.add_row(escape(v.role), _figure_text(h.name, h.value) if h else "—", interval, vs, agree, mean, verdict)
    return table


@app.command()
@clean_errors
def evaluate(
    target: Path = typer.Argument(..., help="A model folder, a model file with its manifest.json beside it, or a bundle (.tar.gz)."),
    data: Path = typer.Option(..., "--data", help="Labelled data: FILE.npz (np.savez) or a folder of .npy files — one array per input (x for one), targets named after the outputs (y for one)."),
    batch: int = typer.Option(1, "--batch", min=1, max=65_536, help="Batch each variant runs at. Default 1: how edge-rnn's API and CLI run int8 (one row per call); a larger batch shows what a program calling onnxruntime itself with that batch gets (int8 answers depend on it)."),
    metric: Optional[str] = typer.Option(None, "--metric", help="accuracy | binary-accuracy | mae | nats (default: from the model's output layer)."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", min=0.0, max=1000.0, help="Budget of a quantized variant's metric vs fp32: pp for accuracy (default 1), % for errors (default 2)."),
    threads: int = typer.Option(1, min=0, max=256, help="onnxruntime intra-op threads (0 = onnxruntime's default)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Score every variant (fp32, int8, fp16, step models, .ort, the Keras source) on your labelled data, with 95%
    intervals, differences to fp32 and each quantized variant's promise. Exit 1 when a variant breaks its promise.

    Example: edge-rnn evaluate models/kws --data kws_test.npz --batch 1
    """
    from .evaluate import evaluate as run_evaluate

    progress = None
    on_progress = None
    if err.get().is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("[bold]examples"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(), console=err.get(), transient=True)
        task = progress.add_task("evaluate", total=None)
        on_progress = lambda done, total: progress.update(task, completed=done, total=total)  # noqa: E731
    with progress or contextlib.nullcontext():
        evaluation = run_evaluate(target, data=data, batch=batch, metric=metric, max_drop=max_drop, threads=threads or None,
                                  on_progress=on_progress)
    if as_json:
        print(json.dumps(evaluation.to_json(), indent=2))
    else:
        _warn(evaluation.notes)
        out.print(_evaluate_table(evaluation))
        for v in evaluation.variants:
            for failure in v.verdict.failures:
                out.print(f"[bold red]FAIL[/] {escape(failure, limit=MAX_MESSAGE_CHARS)}", highlight=False, soft_wrap=True)
    if not evaluation.ok:
        failed = ", ".join(escape(v.role) for v in evaluation.variants if v.verdict.ok is False)
        err.print(f"[bold red]error:[/] {failed} broke its promise on {escape(data, limit=MAX_PATH_CHARS)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _pipeline_table(rows) -> Table:
    from rich import box

    # No vertical rules: the table fits an 80-column terminal without wrapping or cutting a figure.
    table = Table(title="edge-rnn pipeline: held-out accuracy (nats/char for the char RNN) and parity", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    for name in ("model", "variant", "KiB", "held-out", "vs", "max|Δ|", "top-1"):
        table.add_column(name, justify="left" if name in ("model", "variant", "vs") else "right", no_wrap=True)
    for row in rows:
        metric = f"{row.metric:.2%}" if row.metric_name == "accuracy" else f"{row.metric:.4f}"
        diff = "" if row.max_abs_diff is None else f"{row.max_abs_diff:.1e}"
        top1 = "" if row.top1 is None else f"{row.top1:.1%}"
        table.add_row(escape(row.model), escape(row.variant), f"{row.bytes / 1024:,.0f}", metric, escape(row.versus), diff, top1)
    return table


@app.command()
@clean_errors
def pipeline(
    data: str = typer.Option("mnist", help="MNIST source for the LSTM: mnist | fashion-mnist | sample | PATH.npz | IDX folder"),
    out_dir: Path = typer.Option(Path(DEFAULT_OUT), "--out", help="Output folder; each model gets a sub-folder."),
    epochs: int = typer.Option(LstmConfig.epochs, min=1, max=MAX_EPOCHS, help="LSTM training epochs."),
    char_iters: int = typer.Option(CharRnnConfig.iters, min=1, max=MAX_CHAR_ITERS, help="Char-RNN Adagrad iterations."),
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
            on_step=lambda step, message: progress.console.print(f"[bold]{escape(step)}[/]: {escape(message, limit=MAX_MESSAGE_CHARS)}",
                                                                 highlight=False),
            on_epoch=on_epoch,
        )
    _warn(result.warnings)
    out.print(_pipeline_table(result.rows))
    for row in result.rows:
        if row.note:
            out.print(f"{escape(row.model)} {escape(row.variant)}: {escape(row.note, limit=MAX_MESSAGE_CHARS)}", highlight=False)
    out.print("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()))
    if result.failures:
        for failure in result.failures:
            err.print(f"[bold red]parity FAILED:[/] {escape(failure, limit=MAX_MESSAGE_CHARS)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _interrupted(signum, frame) -> None:
    # Ctrl-C anywhere (loading, training, writing) exits as a shell expects of SIGINT, 128 + 2, without a
    # traceback: SystemExit unwinds every `finally`, so an atomic write deletes its temporary file.
    sys.stdout.flush()
    raise SystemExit(130)


def main() -> None:
    """Console-script entry point."""
    import signal

    signal.signal(signal.SIGINT, _interrupted)
    app(prog_name="edge-rnn")


if __name__ == "__main__":
    sys.exit(main())
