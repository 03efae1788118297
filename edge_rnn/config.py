"""Every default in one place: model shapes, training recipes, export settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LstmConfig:
    """The notebook's Keras LSTM MNIST classifier and its training recipe."""

    timesteps: int = 28  # image rows
    features: int = 28  # pixels per row
    units: int = 128
    dense: int = 32
    dropout: float = 0.2
    classes: int = 10
    learning_rate: float = 1e-3
    decay: float = 1e-5  # Keras 2 `decay`: lr / (1 + decay * step)
    # Held-out accuracy on seeds 0 / 1 / 2 with the step anneal: 95.9 / 95.5 / 95.6% after 20 epochs,
    # 96.5 / 95.6 / 96.4% after 25 (the notebook's schedule, 25 epochs: 96.5 / 94.2%). 20 epochs keep the
    # pipeline under 5 minutes with a margin on the ~3× slower AVX2 host class (see the README's figures).
    epochs: int = 20
    batch_size: int = 32
    # The batch `learning_rate` is tuned for. Another (global) batch — e.g. 32 per worker on several — scales
    # the rate by sqrt(batch_size / reference_batch), the square-root rule for Adam: batch 64 gets 1.41e-3,
    # next to the 1.5e-3 measured at 64 (95.8 / 96.3 / 95.2% on seeds 0–2 after 25 epochs, against the
    # recipe's 96.5 / 95.6 / 96.4% at 32).
    reference_batch: int = 32
    # relu LSTMs spike now and then: keep an exponential moving average of the weights (Keras' own
    # Adam(use_ema=True)) and finish on it. Measured on the sample: +1 pp and far less epoch-to-epoch noise.
    ema_momentum: float | None = 0.99
    # Training steps per call into the compiled graph: fewer Python round trips per epoch, bit-identical
    # weights (tests/test_mnist_lstm.py); epochs 15–20% faster here.
    steps_per_execution: int = 32
    # "step-anneal": learning_rate, then ×0.3 at 70% and ×0.1 at 85% of the steps (lstm.STEP_ANNEAL_*);
    # "inverse-time": the notebook's Keras 2 decay, lr / (1 + decay·step).
    schedule: str = "step-anneal"
    # Every epoch each training digit is moved a little (lstm.augment: its own random shift up to `augment_shift`
    # pixels, rotation up to `augment_rotate` degrees, scale up to ±`augment_scale`), in the batches both the
    # single-process and the tf.distribute loop train on; all three 0 trains on the digits as they are.
    # Held-out accuracy on seeds 0 / 1 / 2, each with its own 4,000 / 1,000 split of the sample (SampleSplit seed
    # = this seed), 20 epochs: 96.2 / 97.4 / 95.9% (2,895 of 3,000: 96.5%, Wilson 95% 95.8–97.1%) against
    # 95.7 / 96.5 / 95.5% unmoved (95.9%, 95.1–96.6%); 22 epochs on seeds 0 / 1: 96.3 / 97.4%. No slower per
    # epoch (2-core AVX2 host, shared: 213–324 s for 20 epochs against 230–242 s for the unmoved recipe under fit()).
    augment_shift: float = 2.0
    augment_rotate: float = 10.0
    augment_scale: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class CharRnnConfig:
    """min-char-rnn's defaults, plus a learning-rate anneal and enough steps for ~60 s on 2 cores."""

    hidden: int = 100
    seq_length: int = 25
    learning_rate: float = 0.1
    # The learning rate falls linearly to 0 over this last part of `iters`, which takes the Adagrad
    # noise out of the final weights (measured: ~0.03 nats/char lower held-out loss).
    anneal_fraction: float = 0.3
    # Held-out nats/char (AVX-512 host, ~3,700 steps/s): 2.000 at 120k, 1.975 at 130k (35 s), 1.986 at 140k, 1.968
    # at 180k (50 s). 130k keeps the pipeline's char phase near 70 s on the 2× slower AVX2 host class.
    iters: int = 130_000
    clip: float = 5.0
    val_fraction: float = 0.1  # held-out tail of the text
    seed: int = 0


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 17


@dataclass(frozen=True)
class BundleConfig:
    """A bundle's reference vectors: how many real inputs, how long a sequence where the time axis is free, which."""

    # 16 real inputs: a softmax layer's weight scale ×4 (argmax kept, probabilities off ~0.1) breaks the mean
    # bound on 99.8% of random 16-input sets of held-out digits against 91% of 8-input sets; ~50 KB a bundle.
    count: int = 16
    time_steps: int = 16
    seed: int = 0
    # Without --data, a classifier's reference inputs are picked from `count` × this many candidates: the inputs the
    # source model is sure of first (up to half), so the self-test's "top-1 (sure)" has inputs to judge.
    candidates: int = 8
    # With --data, every bundled model is scored at this batch: the device's (a dynamic int8 model quantizes its
    # activations with a scale spanning its batch, so only the deployed batch gives the device's figure).
    data_batch: int = 1


@dataclass(frozen=True)
class SampleSplit:
    """How the bundled 5,000-digit sample is split (deterministic, stratified)."""

    heldout_per_class: int = 100
    seed: int = 0


DEFAULT_OUT = "artifacts"
MNIST_DIRNAME = "mnist-lstm"
CHAR_RNN_DIRNAME = "char-rnn"


# ---------------------------------------------------------------------------------------------
# Caps on the counts a user gives (typer's `max=`: past one, a usage error naming the range, exit 2).
# Each is far above any real use and low enough that a typo (an extra zero or three) cannot pin the
# host for hours or ask for more memory than a workstation has. Generation and `stream` print as they go,
# so their memory stays flat whatever the count; their caps bound time only.

# Characters `generate` / `sample` make after the prime: one session call (or NumPy step) each, so a million
# is minutes of work, not hours; both stream, so memory is flat either way. Longer texts: the library's
# device.runtime.iter_generate, which has no cap (its caller decides when to stop).
MAX_GENERATE_LENGTH = 1_000_000
# LSTM epochs: the recipe uses 20 (under 5 minutes on the bundled sample); 1,000 is 50 times that.
MAX_EPOCHS = 1_000
# Mini-batch rows for Keras training: beyond 65,536 one batch is all of MNIST's 60,000 images.
MAX_BATCH_SIZE = 65_536
# Char-RNN Adagrad steps: the recipe uses 130,000 (~35 s at ~3,700 steps/s); 10M is ~45 min.
MAX_CHAR_ITERS = 10_000_000
# Char-RNN hidden units: Whh, its gradient and its Adagrad memory are H×H float64 each: 3 × 128 MB at 4,096.
MAX_HIDDEN = 4_096
# Truncated-BPTT chunk: the forward pass keeps H floats per step; 10,000 is 400× the recipe's 25.
MAX_SEQ_LENGTH = 10_000
# `bench --runs`: timed batch-1 runs per row (default 1,000; slow runtimes stop after 15 s anyway).
MAX_BENCH_RUNS = 1_000_000
# `bench --rounds`: every row is measured this many times; each round re-times every row.
MAX_BENCH_ROUNDS = 50
# `bench --time-steps` and a bundle's free time axis: 100,000 steps of (1, T, 28) float32 input is 11 MB,
# and a step-by-step row runs T session calls per timed run.
MAX_TIME_STEPS = 100_000
# `check --batch`: the random batch every runtime answers, onnx.reference (pure Python) among them.
MAX_CHECK_BATCH = 65_536

# `train --strategy multi-worker`: seconds a worker waits for every peer to accept a TCP connection before
# giving up (`--connect-timeout`). Peers start by hand on several machines, so half a minute of slack; past
# it, an unreachable cluster is an error, never a hang.
CONNECT_TIMEOUT_S = 30.0


# ---------------------------------------------------------------------------------------------
# Caps on what a file may declare (issue 20: readers check before they allocate). A command's resident memory
# stays under a ~2 GiB budget whatever a file says about itself; the device path's own caps (.npy/.npz arrays,
# zip directories, JSON nesting, the budget itself) are in edge_rnn/device/bounded.py, which cannot import this
# module. The README's table of caps lists both.

# Digits `train --data` loads into memory (an .npz's members, IDX files other than --stream's training images),
# by their declared sizes, together: 5× MNIST's 55 MB. Training holds them with a float32 copy of the held-out
# images (×4) — at most ~1.3 GiB. Bigger sets train with --stream, which leaves the training images on disk.
MAX_TRAIN_DATA_BYTES = 256 * 1024**2
# A char-RNN corpus is read whole: training keeps it as a str (1–4 bytes a character) and as int64 ids (8 bytes a
# character), ~0.9 GiB at this cap; tiny Shakespeare is 1.1 MB and a 130,000-step run reads 3.3 M characters.
MAX_TEXT_BYTES = 64 * 1024**2
# A char-RNN checkpoint (weights and Adagrad memory, float64): hidden 4,096 (MAX_HIDDEN) with a 1,000-character
# vocabulary is 390 MB; training makes gradients and flat buffers beside it.
MAX_CHECKPOINT_BYTES = 512 * 1024**2
# A labels file (`export --labels`): one line per class, each at most 200 characters — a million classes fit.
MAX_LABELS_BYTES = 16 * 1024**2
# TF_CONFIG (an environment variable, parsed as JSON): a cluster of a thousand workers is ~30 KB (Linux passes at
# most 128 KiB in one variable to a new process anyway).
MAX_TF_CONFIG_BYTES = 64 * 1024
# Weights a Keras model may hold (float32), estimated from its config.json before Keras builds it — per layer and
# for the whole model — and checked again on model.weights.h5's declared datasets before Keras reads them: a
# model over it would export to a model.onnx over the device's 512 MiB cap anyway (device/onnxfile.py).
MAX_MODEL_WEIGHT_BYTES = 512 * 1024**2
# A .keras archive's members, by the sizes its zip declares, before Keras opens it: the weights plus room for
# the HDF5 layout, config.json and assets. Keras reads model.weights.h5 into memory whole.
MAX_KERAS_ARCHIVE_BYTES = MAX_MODEL_WEIGHT_BYTES + 64 * 1024**2
# config.json of a .keras file (read whole and parsed before Keras sees it): real RNN configs are 5–100 KB.
MAX_KERAS_CONFIG_BYTES = 16 * 1024**2
# Members of a .keras archive: Keras writes three (metadata.json, config.json, model.weights.h5) plus assets.
MAX_KERAS_MEMBERS = 1_000
