"""The whole job, step by step: train → export → quantize → parity → evaluate, for each model."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import CHAR_RNN_DIRNAME, MNIST_DIRNAME, CharRnnConfig, ExportConfig, LstmConfig
from .device.manifest import check_writable_dir, update_manifest
from .device.runtime import INFER_BATCH
from .device.parity import ParityReport, QuantGate, compare, quant_gate
from .tolerances import FP32_PROB_ATOL

# Reports progress as (step name, message); the CLI prints it, the library never does.
StepCallback = Callable[[str, str], None]


@dataclass
class Row:
    """One line of the final table: a model variant and what was measured for it."""

    model: str
    variant: str
    path: str
    bytes: int
    metric_name: str
    metric: float
    versus: str = ""  # the row this one is compared with ("" for a reference row)
    max_abs_diff: float | None = None  # of probabilities (classifier) or logits (char RNN)
    top1: float | None = None  # top-1 agreement with `versus`
    note: str = ""


@dataclass
class PipelineResult:
    rows: list[Row] = field(default_factory=list)
    parity: list[ParityReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # parity gates that failed, all of them
    seconds: dict[str, float] = field(default_factory=dict)


def _size(model_dir: Path, manifest: dict[str, Any], role: str) -> tuple[str, int]:
    entry = manifest["files"][role]
    return str(model_dir / entry["path"]), int(entry["bytes"])


def _whole_sequence_role(role: str) -> bool:
    """ONNX files that take whole sequences (step models are checked step by step where they are made)."""
    return role.startswith("onnx") and not role.startswith("onnx_step")


def _label(role: str) -> str:
    """Manifest role → table label: onnx_step_int8 → onnx step int8."""
    return role.replace("_", " ")


def _is_fp32(role: str) -> bool:
    return role in ("onnx", "onnx_step")


def classifier_probs(model_dir: Path, manifest: dict[str, Any], role: str, x: np.ndarray) -> np.ndarray:
    """(N, classes) probabilities of one ONNX file: whole sequences, or a step model fed row by row. A quantized file
    answers one digit per call, as a device runs it (a dynamic int8 model's activation scale spans its batch)."""
    from .device.evaluate import sequence_runner, step_runner
    from .device.runtime import load_model

    model = load_model(_size(model_dir, manifest, role)[0])  # verified against the manifest before it is run
    batch = INFER_BATCH if _is_fp32(role) else 1
    if _whole_sequence_role(role):
        run, outputs = sequence_runner(model, batch=batch), model.io["outputs"]
    else:
        run, outputs = step_runner(model, batch=batch), manifest["step"]["outputs"]
    return run({model.io["inputs"][0]["name"]: x})[outputs[0]["name"]]


def check_classifier(
    model_dir: str | os.PathLike[str], x_test: np.ndarray, y_test: np.ndarray
) -> tuple[list[Row], list[ParityReport], list[QuantGate]]:
    """Keras vs every fp32 ONNX file (whole-sequence and step model: max |Δprob|, argmax), every quantized
    file vs the fp32 export (the quantization promise); accuracies into the manifest."""
    from .train.lstm import load_keras_model, preprocess

    model_dir = Path(model_dir)
    keras_model, manifest = load_keras_model(model_dir)
    x = preprocess(x_test)
    probs = {"keras": keras_model.predict(x, batch_size=256, verbose=0)}
    roles = sorted((r for r in manifest["files"] if r.startswith("onnx")), key=lambda r: (not _is_fp32(r), r))
    for role in roles:
        probs[role] = classifier_probs(model_dir, manifest, role, x)
    accuracy = {name: float(np.mean(p.argmax(1) == y_test)) for name, p in probs.items()}
    metrics: dict[str, Any] = {f"{name}_accuracy": acc for name, acc in accuracy.items()}
    metrics["heldout_samples"] = int(len(y_test))
    rows = [Row(manifest["model"], "keras", *_size(model_dir, manifest, "keras"), "accuracy", accuracy["keras"])]
    reports, gates = [], []
    for role in roles:
        if _is_fp32(role):
            # fp32 files must give Keras' numbers (and so its decisions) on every held-out digit.
            report = compare({"probs": probs["keras"]}, {"probs": probs[role]}, atol=FP32_PROB_ATOL, names=("keras", role), argmax_of="probs")
            metrics[f"keras_vs_{role}_max_abs_prob_diff"] = report.checks[0].max_abs_diff
            metrics[f"keras_vs_{role}_argmax_agreement"] = report.argmax_agreement
            rows.append(Row(manifest["model"], _label(role) + " fp32", *_size(model_dir, manifest, role), "accuracy", accuracy[role],
                            "keras", report.checks[0].max_abs_diff, report.argmax_agreement))
        else:
            # Quantized parity is about decisions where fp32 is sure, average probabilities and the accuracy drop.
            report = compare({"probs": probs["onnx"]}, {"probs": probs[role]}, atol=1.0, names=("onnx", role), argmax_of="probs")
            gate = quant_gate(probs["onnx"], probs[role], labels=y_test, candidate=_label(role))
            gates.append(gate)
            metrics[f"{role}_vs_onnx_argmax_agreement"] = report.argmax_agreement
            metrics[f"{role}_vs_onnx_confident_agreement"] = gate.confident_agreement
            metrics[f"{role}_vs_onnx_confident_count"] = gate.confident_count
            metrics[f"{role}_vs_onnx_mean_max_abs_prob_diff"] = gate.mean_max_abs_diff
            metrics[f"{role}_vs_onnx_max_abs_prob_diff"] = report.checks[0].max_abs_diff
            rows.append(Row(manifest["model"], _label(role), *_size(model_dir, manifest, role), "accuracy",
                            accuracy[role], "onnx fp32", report.checks[0].max_abs_diff, report.argmax_agreement,
                            f"sure {gate.confident_agreement:.1%} of {gate.confident_count}"))
        reports.append(report)
    update_manifest(model_dir, metrics=metrics)
    return rows, reports, gates


def gate_classifier(reports: list[ParityReport], gates: list[QuantGate]) -> list[str]:
    """The parity promises the pipeline checks, all of them, returned as failures (empty = pass)."""
    failures = []
    for report in reports:
        if report.reference == "keras" and (not report.ok or report.argmax_agreement != 1.0):
            failures.append(report.summary().replace("\n", ";"))
    for gate in gates:
        failures += gate.failures
    return failures


def run_mnist(
    *, data: str, out_dir: Path, cfg: LstmConfig, export_cfg: ExportConfig, on_step: StepCallback, on_epoch=None
) -> PipelineResult:
    from .train.data import load_digits
    from .exporter import export
    from .train.lstm import save_trained, train
    from .quantize import quantize

    result = PipelineResult()
    model_dir = out_dir / MNIST_DIRNAME
    t = time.perf_counter()
    digits = load_digits(data)
    result.warnings += digits.warnings
    for warning in digits.warnings:
        on_step("WARNING", warning)  # now, and again under the final table
    check_writable_dir(model_dir)
    on_step("data", f"{digits.source}: {len(digits.y_train)} train, {len(digits.y_test)} held out")
    trained = train(digits, cfg=cfg, on_epoch=on_epoch)
    save_trained(trained, digits, model_dir, cfg=cfg)
    result.seconds["mnist train"] = time.perf_counter() - t
    on_step("train", f"held-out accuracy {trained.heldout_accuracy:.2%} in {result.seconds['mnist train']:.0f} s")
    t = time.perf_counter()
    report = export(model_dir, cfg=export_cfg)
    on_step("export", f"{report.path}: {report.op_counts}")
    for q in quantize(model_dir, variants=("int8",)):
        on_step("quantize", f"{q.path}: {q.op_counts}")
    result.seconds["mnist export+quantize"] = time.perf_counter() - t
    rows, reports, gates = check_classifier(model_dir, digits.x_test, digits.y_test)
    result.rows += rows
    result.parity += reports
    result.failures += [f"mnist-lstm: {f}" for f in gate_classifier(reports, gates)]
    return result


def score_onnx(model_path: str | os.PathLike[str], ids: np.ndarray, *, hidden: int, chunk: int = 4096) -> np.ndarray:
    """Logits (T, V) of a char-RNN ONNX model over ids (T,), in chunks with the state carried across."""
    from .device.runtime import load_model

    model = load_model(model_path)
    ids_name, h0_name = [spec["name"] for spec in model.manifest["io"]["inputs"]]
    h = np.zeros((1, hidden), np.float32)
    out = []
    for i in range(0, len(ids), chunk):
        logits, h = model.run({ids_name: ids[None, i : i + chunk].astype(np.int64), h0_name: h})
        out.append(logits[0])
    return np.concatenate(out)


def check_char_rnn(
    model_dir: str | os.PathLike[str], *, max_chars: int = 20_000, seed: int = 0
) -> tuple[list[Row], list[ParityReport], list[str]]:
    """NumPy (float64) vs ONNX fp32 logits on the held-out text, nats/char of every variant, same-seed text.

    Returns the table rows, the parity reports and the failed gates (empty when all hold).
    """
    from .train.char_rnn import cross_entropy, encode, forward, heldout_text, load_trained, sample
    from .device.sampling import generation_h0
    from .device.runtime import generate
    from .tolerances import FP32_LOGIT_ATOL, LOSS_RTOL, QUANT_MAX_NATS_INCREASE

    model_dir = Path(model_dir)
    ckpt, manifest = load_trained(model_dir)
    ids = encode(heldout_text(manifest)[: max_chars + 1], vocab=ckpt.vocab)
    inputs, targets = ids[:-1], ids[1:]
    reference, _ = forward(ckpt.params, ids=inputs, h_prev=np.zeros((ckpt.hidden, 1)))
    logits = {role: score_onnx(_size(model_dir, manifest, role)[0], inputs, hidden=ckpt.hidden)
              for role in manifest["files"] if _whole_sequence_role(role)}
    # cross_entropy sums over characters; the table and manifest report nats per character.
    nats = {"numpy": cross_entropy(reference, targets=targets) / len(targets)}
    nats.update({role: cross_entropy(l, targets=targets) / len(targets) for role, l in logits.items()})
    report = compare({"logits": reference}, {"logits": logits["onnx"]}, atol=FP32_LOGIT_ATOL, names=("numpy", "onnx"), argmax_of="logits")
    reports = [report]
    failures = [] if report.ok else [report.summary().replace("\n", ";")]
    prime = "".join(ckpt.vocab[i] for i in inputs[:8])
    text_numpy = sample(ckpt, prime=prime, length=300, seed=seed, h0=generation_h0(manifest, hidden=ckpt.hidden))
    text_onnx = generate(model_dir / manifest["files"]["onnx"]["path"], prime=prime, length=300, seed=seed)
    metrics: dict[str, Any] = {f"{role}_val_nats_per_char": v for role, v in nats.items()}
    metrics.update(
        heldout_chars_scored=int(len(targets)),
        numpy_vs_onnx_max_abs_logit_diff=report.checks[0].max_abs_diff,
        same_seed_text_equal=text_numpy == text_onnx,
    )
    loss_rel = abs(nats["onnx"] - nats["numpy"]) / nats["numpy"]
    rows = [Row(manifest["model"], "numpy fp64", *_size(model_dir, manifest, "checkpoint"), "nats/char", nats["numpy"])]
    rows.append(Row(manifest["model"], "onnx fp32", *_size(model_dir, manifest, "onnx"), "nats/char", nats["onnx"],
                    "numpy fp64", report.checks[0].max_abs_diff, report.argmax_agreement,
                    "same-seed text " + ("equal" if text_numpy == text_onnx else "DIFFERS")))
    for role in logits:
        if role == "onnx":
            continue
        q = compare({"logits": logits["onnx"]}, {"logits": logits[role]}, atol=float("inf"), names=("onnx", role), argmax_of="logits")
        reports.append(q)
        if nats[role] - nats["onnx"] > QUANT_MAX_NATS_INCREASE:
            failures.append(f"{role.replace('onnx_', 'onnx ')} scores {nats[role]:.4f} nats/char, "
                            f"{nats[role] - nats['onnx']:.4f} above fp32's > {QUANT_MAX_NATS_INCREASE:g}")
        metrics[f"{role}_vs_onnx_top1_agreement"] = q.argmax_agreement
        rows.append(Row(manifest["model"], role.replace("onnx_", "onnx "), *_size(model_dir, manifest, role), "nats/char", nats[role],
                        "onnx fp32", q.checks[0].max_abs_diff, q.argmax_agreement))
    update_manifest(model_dir, metrics=metrics)
    if loss_rel > LOSS_RTOL:
        failures.append(f"ONNX loss {nats['onnx']:.6f} vs NumPy {nats['numpy']:.6f}: relative {loss_rel:.1e} > {LOSS_RTOL:g}")
    if text_numpy != text_onnx:
        failures.append("same-seed generation differs between NumPy and ONNX")
    return rows, reports, failures


def run_char_rnn(*, text: Path | None, out_dir: Path, cfg: CharRnnConfig, export_cfg: ExportConfig, on_step: StepCallback) -> PipelineResult:
    from .train.char_rnn import save_trained, train
    from .train.data import load_text
    from .exporter import export
    from .quantize import quantize

    result = PipelineResult()
    model_dir = out_dir / CHAR_RNN_DIRNAME
    corpus = load_text(text)
    t = time.perf_counter()
    trained = train(corpus, config=cfg)
    save_trained(trained, out_dir=model_dir, text=corpus, text_source=str(text) if text else None, config=cfg)
    result.seconds["char-rnn train"] = time.perf_counter() - t
    on_step("train", f"char-rnn: {trained.steps:,} steps in {trained.seconds:.0f} s, held-out {trained.val_loss:.3f} nats/char")
    t = time.perf_counter()
    report = export(model_dir, cfg=export_cfg)
    on_step("export", f"{report.path}: {report.op_counts}")
    for q in quantize(model_dir, variants=("int8", "fp16")):
        on_step("quantize", f"{q.path}: {q.op_counts}")
    result.seconds["char-rnn export+quantize"] = time.perf_counter() - t
    rows, reports, failures = check_char_rnn(model_dir, seed=cfg.seed)
    result.rows += rows
    result.parity += reports
    result.failures += [f"char-rnn: {f}" for f in failures]
    return result


def run(
    *,
    data: str,
    out_dir: str | os.PathLike[str],
    lstm_cfg: LstmConfig = LstmConfig(),
    char_cfg: CharRnnConfig = CharRnnConfig(),
    text: Path | None = None,
    export_cfg: ExportConfig = ExportConfig(),
    on_step: StepCallback = lambda step, message: None,
    on_epoch=None,
) -> PipelineResult:
    """Both models through every stage; failed parity gates are collected in `failures`, not raised."""
    out_dir = Path(out_dir)
    t = time.perf_counter()
    mnist = run_mnist(data=data, out_dir=out_dir, cfg=lstm_cfg, export_cfg=export_cfg, on_step=on_step, on_epoch=on_epoch)
    char = run_char_rnn(text=text, out_dir=out_dir, cfg=char_cfg, export_cfg=export_cfg, on_step=on_step)
    result = PipelineResult(
        rows=mnist.rows + char.rows,
        parity=mnist.parity + char.parity,
        warnings=mnist.warnings + char.warnings,
        failures=mnist.failures + char.failures,
        seconds={**mnist.seconds, **char.seconds, "total": time.perf_counter() - t},
    )
    return result
