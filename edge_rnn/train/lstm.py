"""The notebook's Keras LSTM MNIST classifier: build and train. Imports keras only inside functions."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..config import LstmConfig
from .data import Digits
from ..errors import EdgeRnnError, ModelFileError, require
from ..device.manifest import atomic_path, load_manifest, record_file, save_manifest
from .distribute import EpochCallback

MODEL_NAME = "mnist-lstm"
KERAS_FILE = "model.keras"
# Inside the model folder: `train mnist-lstm --resume` continues a killed run from here.
BACKUP_DIR = ".train-backup"
INPUT_NAME = "input"
OUTPUT_NAME = "probs"
PIXEL_SCALE = 1.0 / 255.0
# step-anneal: the notebook's 1e-3 for the first 70% of the steps, then 0.3× until 85%, then 0.1×. A relu
# LSTM at 1e-3 spikes now and then (held-out accuracy 0.95 → 0.88 → 0.95 between epochs); an anneal
# at the end keeps the last epochs, which the EMA averages, out of a spike.
STEP_ANNEAL_AT = (0.7, 0.85)
STEP_ANNEAL_FACTORS = (1.0, 0.3, 0.1)
# Streamed training images are shuffled through a buffer of this many (7.5 MiB of uint8 rows), not the whole set.
STREAM_SHUFFLE_BUFFER = 10_000


def preprocess(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """uint8 (N, 28, 28) → float32 (N, 28, 28) in [0, 1]: each row is a time step."""
    return images.astype(np.float32) * np.float32(PIXEL_SCALE)


def augment(x: Any, seed: Any, cfg: LstmConfig) -> Any:
    """(B, 28, 28) float32 digits → each moved by its own random affine map (bilinear, zero fill), in TensorFlow.

    Shift up to `cfg.augment_shift` pixels each way, rotation up to `cfg.augment_rotate` degrees and scale
    up to ±`cfg.augment_scale`, drawn uniformly from the stateless `seed` (2 ints): the same seed moves the
    same batch the same way, on any worker and after a resume."""
    tf = require("tensorflow", "train")
    draws = tf.random.stateless_uniform((tf.shape(x)[0], 4), seed=seed, minval=-1.0, maxval=1.0)  # (B, 4)
    angle = draws[:, 0] * np.float32(np.deg2rad(cfg.augment_rotate))
    scale = 1.0 + draws[:, 1] * np.float32(cfg.augment_scale)
    shift_x, shift_y = draws[:, 2] * np.float32(cfg.augment_shift), draws[:, 3] * np.float32(cfg.augment_shift)
    # Output pixel (u, v) reads input pixel (cos·u − sin·v + a2, sin·u + cos·v + b2): the inverse map, rotated and
    # scaled about the image centre (cx, cy) and shifted, so (cx + shift_x, cy + shift_y) reads the centre.
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    cx, cy = (cfg.features - 1) / 2, (cfg.timesteps - 1) / 2
    a2 = cx - cos * (cx + shift_x) + sin * (cy + shift_y)
    b2 = cy - sin * (cx + shift_x) - cos * (cy + shift_y)
    zero = tf.zeros_like(angle)
    transforms = tf.stack([cos, -sin, a2, sin, cos, b2, zero, zero], axis=1)  # (B, 8)
    moved = tf.raw_ops.ImageProjectiveTransformV3(
        images=x[..., None], transforms=transforms, output_shape=tf.shape(x)[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT",
    )
    return moved[..., 0]


def preprocessing_spec(cfg: LstmConfig) -> dict[str, Any]:
    """The manifest's `preprocessing` block: everything a device needs to feed the model."""
    return {
        "input": INPUT_NAME,
        "dtype": "float32",
        "shape": ["batch", cfg.timesteps, cfg.features],
        "layout": "NTC: batch, time step = image row (top to bottom), features = pixels of the row",
        "image": {"height": cfg.timesteps, "width": cfg.features, "mode": "L", "invert": False},
        "scale": PIXEL_SCALE,
        "offset": 0.0,
        "output": OUTPUT_NAME,
        "output_meaning": "softmax probabilities over labels, shape (batch, 10)",
    }


def learning_rate(cfg: LstmConfig) -> float:
    """The peak learning rate for `cfg.batch_size` (the global batch): square-root scaled from the reference."""
    return cfg.learning_rate * (cfg.batch_size / cfg.reference_batch) ** 0.5


def build_model(cfg: LstmConfig = LstmConfig(), *, train_samples: int = 60_000):
    """Input (batch, 28, 28) float32 → softmax probabilities (batch, 10), compiled as in the notebook.

    `train_samples` sets the length of the step-anneal schedule (epochs × steps per epoch)."""
    keras = require("keras", "train")
    keras.utils.set_random_seed(cfg.seed)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((cfg.timesteps, cfg.features), name=INPUT_NAME),
            layers.LSTM(cfg.units, activation="relu", return_sequences=True),
            layers.Dropout(cfg.dropout),
            layers.LSTM(cfg.units, activation="relu"),
            layers.Dropout(cfg.dropout),
            layers.Dense(cfg.dense, activation="relu"),
            layers.Dropout(cfg.dropout),
            # Named after the output: keras_onnx names graph outputs after their layer, and the manifest says "probs".
            layers.Dense(cfg.classes, activation="softmax", name=OUTPUT_NAME),
        ],
        name="mnist_lstm",
    )
    rate = learning_rate(cfg)
    # Keras 2's Adam(decay=1e-5) is lr / (1 + 1e-5 * step): Keras 3 spells it InverseTimeDecay.
    if cfg.schedule == "step-anneal":
        steps = cfg.epochs * -(-train_samples // cfg.batch_size)
        bounds = [int(f * steps) for f in STEP_ANNEAL_AT]
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay(bounds, [rate * f for f in STEP_ANNEAL_FACTORS])
    elif cfg.schedule == "inverse-time":
        schedule = keras.optimizers.schedules.InverseTimeDecay(rate, decay_steps=1, decay_rate=cfg.decay)
    else:
        raise EdgeRnnError(f"unknown learning-rate schedule {cfg.schedule!r}; choose step-anneal or inverse-time")
    ema = {"use_ema": True, "ema_momentum": cfg.ema_momentum} if cfg.ema_momentum else {}
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=schedule, **ema),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=cfg.steps_per_execution,
    )
    return model


@dataclass
class TrainResult:
    model: Any
    history: dict[str, list[float]]
    heldout_accuracy: float
    # The manifest's `training` block: how the model was trained (strategy, workers, global batch, …).
    training: dict[str, Any] = dataclasses.field(default_factory=dict)


def backup_path(out_dir: str | os.PathLike[str], *, resume: bool) -> Path:
    """OUT/.train-backup, the epoch backups of a run in OUT; with `resume`, raise EdgeRnnError if there is none."""
    path = Path(out_dir) / BACKUP_DIR
    if resume and not path.is_dir():
        raise EdgeRnnError(f"no interrupted run to resume in {out_dir} — train without --resume")
    return path


def train(
    digits: Digits,
    *,
    cfg: LstmConfig = LstmConfig(),
    on_epoch: EpochCallback | None = None,
    backup_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    strategy: Any = None,
    worker: int = 0,
) -> TrainResult:
    """Train on `digits.x_train`, validating on the held-out split; reproducible for a given seed.

    One loop for every strategy: `distribute.fit_classifier` over `train_batches` (each epoch's shuffled,
    augmented batches), in one process under TensorFlow's default strategy, or under a tf.distribute `strategy`
    (mirrored or multi-worker; `worker` is this process's index) — see `_train_loop`. With EMA on, the
    per-epoch val_accuracy is of the raw weights; the averaged weights are swapped in at the end and are what
    is saved and what `heldout_accuracy` measures. With `backup_dir`, every epoch's weights, optimizer and
    epoch count are backed up there and deleted when training ends; `resume` continues a killed run from its
    last finished epoch.
    """
    if strategy is None and digits.train_images is not None:
        raise EdgeRnnError("streamed training images feed the tf.distribute loop only — pass a strategy (mirrored or multi-worker)")
    if backup_dir is None and resume:
        raise EdgeRnnError("resume needs the backup folder of the interrupted run")
    if strategy is None and backup_dir is not None:
        backup_dir = backup_path(Path(backup_dir).parent, resume=resume)
    tf = require("tensorflow", "train")
    return _train_loop(
        digits, cfg=cfg, strategy=strategy or tf.distribute.get_strategy(), default=strategy is None, worker=worker,
        on_epoch=on_epoch, backup_dir=backup_dir, resume=resume,
    )


def train_batches(digits: Digits, cfg: LstmConfig, global_batch: int):
    """epoch → a tf.data dataset of that epoch's shuffled global batches (uint8 in, float32 [0, 1] out).

    Every worker builds the same order (seed and epoch), auto-sharded by DATA: each keeps its share of every
    global batch, so the workers' shards partition it. A resumed run sees each epoch's order unchanged.
    With `digits.train_images` the images stream from their file through a bounded shuffle buffer."""
    tf = require("tensorflow", "train")
    pixels = cfg.timesteps * cfg.features
    if digits.train_images is not None:
        source = digits.train_images
        images = tf.data.FixedLengthRecordDataset(
            str(source.path), pixels, header_bytes=source.header, footer_bytes=source.footer, compression_type="GZIP" if source.gzip else ""
        )
        # The labels are small and in memory; the images come record by record.
        records = tf.data.Dataset.zip((images, tf.data.Dataset.from_tensor_slices(digits.y_train))).map(
            lambda a, b: (tf.reshape(tf.io.decode_raw(a, tf.uint8), (cfg.timesteps, cfg.features)), b)
        )
        buffer = min(len(digits.y_train), STREAM_SHUFFLE_BUFFER)
    else:
        records = tf.data.Dataset.from_tensor_slices((digits.x_train, digits.y_train))
        buffer = len(digits.y_train)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA

    moves = bool(cfg.augment_shift or cfg.augment_rotate or cfg.augment_scale)

    def batches(epoch: int):
        epoch_seed = cfg.seed * 100_003 + epoch
        shuffled = records.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)
        # drop_remainder: every worker runs the same number of steps (a last partial batch is left out).
        scaled = shuffled.batch(global_batch, drop_remainder=True).map(lambda x, y: (tf.cast(x, tf.float32) * PIXEL_SCALE, tf.cast(y, tf.int64)))
        if moves:
            # Batch i of this epoch is moved by the draws of seed (epoch_seed, i): the same on every worker. Plain
            # TensorFlow ops, traced as they are (autograph would try to convert `require` and warn about it).
            move = tf.autograph.experimental.do_not_convert(
                lambda i, xy: (augment(xy[0], tf.stack([tf.constant(epoch_seed, tf.int64), i]), cfg), xy[1])
            )
            scaled = scaled.enumerate().map(move)
        return scaled.prefetch(2).with_options(options)

    return batches


def _train_loop(
    digits: Digits,
    *,
    cfg: LstmConfig,
    strategy: Any,
    default: bool,
    worker: int,
    on_epoch: EpochCallback | None,
    backup_dir: str | os.PathLike[str] | None,
    resume: bool,
) -> TrainResult:
    """The model, schedule and EMA of the recipe, trained with `distribute.fit_classifier` under `strategy`
    (TensorFlow's default strategy when `default`: one process, one replica).

    `cfg.batch_size` is the GLOBAL batch, split evenly over the replicas: with the same batch the steps per
    epoch, hence the step-anneal schedule, are the single-process ones step for step. Raising --batch-size
    (to keep each worker's share) shortens the epoch; the schedule's bounds follow (they are fractions of all
    steps) and the peak rate is square-root scaled (`learning_rate`), as in one process."""
    from .distribute import EpochBackup, PeerLostError, fit_classifier

    tf = require("tensorflow", "train")
    replicas = int(strategy.num_replicas_in_sync)
    if cfg.batch_size % replicas:
        raise EdgeRnnError(f"--batch-size {cfg.batch_size} does not split over {replicas} replicas — give a multiple of {replicas}")
    if len(digits.y_train) < cfg.batch_size:
        raise EdgeRnnError(f"{len(digits.y_train)} training images make no global batch of {cfg.batch_size} — give a smaller --batch-size")
    tf.config.experimental.enable_op_determinism()
    steps_per_epoch = len(digits.y_train) // cfg.batch_size  # full global batches only: see train_batches
    with strategy.scope():
        # The schedule counts the steps this loop takes: the recipe's, step for step, when the batch divides the set.
        model = build_model(cfg, train_samples=steps_per_epoch * cfg.batch_size)
    x_test, y_test = preprocess(digits.x_test), digits.y_test.astype(np.int64)
    try:
        backup = None
        if backup_dir is not None:
            backup = EpochBackup(Path(backup_dir), worker=worker, model=model, optimizer=model.optimizer, resume=resume)
        history, start, seconds = fit_classifier(
            strategy, model, batches=train_batches(digits, cfg, cfg.batch_size), global_batch=cfg.batch_size,
            steps_per_epoch=steps_per_epoch, steps_per_call=cfg.steps_per_execution,
            validation=(x_test, y_test), epochs=cfg.epochs, backup=backup, on_epoch=on_epoch,
        )
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError, tf.errors.DeadlineExceededError) as exc:
        raise PeerLostError(
            f"worker {worker}: lost contact with another worker ({type(exc).__name__}) — restart every worker with "
            "--resume; each goes on from the last epoch all of them finished"
        ) from exc
    except tf.errors.OpError as exc:
        raise EdgeRnnError(
            f"worker {worker}: training stopped ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}) — "
            "check the data files; --resume goes on from the last finished epoch"
        ) from exc
    if not np.isfinite(history["loss"][-1]):
        raise EdgeRnnError(f"training diverged (loss {history['loss'][-1]}) — relu LSTMs can blow up; retry with another --seed")
    probs = np.concatenate([np.asarray(model(x_test[i : i + 1024], training=False)) for i in range(0, len(x_test), 1024)])
    accuracy = float(np.mean(probs.argmax(axis=1) == y_test))
    workers = int(getattr(strategy.extended, "_num_workers", 1))
    if backup is not None:
        shutil.rmtree(backup.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            backup.folder.parent.rmdir()  # when the other workers' backups are gone too
    if default:
        name = "default"
    else:
        name = "multi-worker" if workers > 1 or "Collective" in type(strategy.extended).__name__ else "mirrored"
    training = {
        "strategy": name,
        "workers": workers,
        "replicas": replicas,
        "global_batch": cfg.batch_size,
        "per_replica_batch": cfg.batch_size // replicas,
        "learning_rate": learning_rate(cfg),
        "resumed_from_epoch": start,
        "streamed": digits.train_images is not None,
        "epoch_seconds": seconds,
    }
    return TrainResult(model, history, accuracy, training)


def versions() -> dict[str, str]:
    """Versions of the libraries that made the model (imported lazily)."""
    out: dict[str, str] = {"numpy": np.__version__}
    for name in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            continue
    return out


def save_trained(result: TrainResult, digits: Digits, out_dir: str | os.PathLike[str], *, cfg: LstmConfig) -> Path:
    """Write DIR/model.keras and a fresh DIR/manifest.json (both atomically); return the model path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / KERAS_FILE) as tmp:
        # Keras insists on the .keras suffix, which the temporary name keeps.
        result.model.save(tmp)
    manifest: dict[str, Any] = {
        "model": MODEL_NAME,
        "task": "classify",
        "data": digits.describe(),
        "preprocessing": preprocessing_spec(cfg),
        "labels": digits.labels,
        "io": {
            "inputs": [{"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", cfg.timesteps, cfg.features]}],
            "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", cfg.classes]}],
        },
        "config": dataclasses.asdict(cfg),
        "training": result.training,
        "versions": versions(),
        "history": result.history,
        "metrics": {"keras_accuracy": result.heldout_accuracy},
        "files": {},
    }
    # A retrain replaces the model, so exported files of the old one are no longer described.
    record_file(manifest, out_dir, "keras", KERAS_FILE)
    save_manifest(out_dir, manifest)
    return out_dir / KERAS_FILE


def load_keras_model(model_dir: str | os.PathLike[str]):
    """Load DIR/model.keras after verifying it against the manifest."""
    from ..device.manifest import verified_file

    keras = require("keras", "train")
    manifest = load_manifest(model_dir)
    path = verified_file(manifest, model_dir, "keras")
    try:
        return keras.saving.load_model(path, compile=False), manifest
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ModelFileError(f"cannot load {path} as a Keras model ({str(exc).splitlines()[0]}) — retrain the folder") from exc
