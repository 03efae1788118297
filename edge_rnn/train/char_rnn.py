"""NumPy character RNN after min-char-rnn: loss_and_grads, Adagrad, training, sampling, checkpoints.

The math follows Karpathy's min-char-rnn (Wxh, Whh, Why, bh, by; tanh hidden state; softmax output)
with the work that does not depend on the recurrence vectorised across time:

- the input projection indexes the columns of Wxh instead of multiplying one-hot vectors;
- the output layer, softmax and loss run on all T steps at once, as do dWhy, dby, dWhh, dbh, dWxh;
- only h_t = tanh(Wxh[:, x_t] + Whh h_{t-1} + bh) and its backward pass loop over time, one
  matrix-vector product and two in-place ufuncs a step on preallocated rows;
- train() keeps params, grads, Adagrad memory and scratch in flat buffers, so a step allocates no
  whole-model temporaries and Adagrad is eight whole-vector operations.

Hidden states are rows (T, H) inside this module; the public arrays keep min-char-rnn's column
shapes (bh (H, 1), h_prev (H, 1)). Device path: numpy only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from ..config import MAX_CHECKPOINT_BYTES, CharRnnConfig
from .data import load_text
from ..device.sampling import StepFn, sample_with
from ..errors import DataError, InputError, ModelFileError
from ..device.bounded import open_regular, read_npz
from ..device.manifest import atomic_path

PARAM_NAMES = ("Wxh", "Whh", "Why", "bh", "by")
# Adagrad's guard against dividing by zero, as in min-char-rnn.
ADAGRAD_EPS = 1e-8
# Weight of the newest loss in the progress bar's exponential moving average (min-char-rnn's 0.001).
SMOOTHING = 0.001
# Characters per forward chunk when scoring long texts: bounds memory at ~CHUNK * V floats.
EVAL_CHUNK = 8192
# The largest Unicode code point; vocab is stored as int32 code points in checkpoints.
MAX_CODE_POINT = 0x10FFFF

Params = dict[str, npt.NDArray[np.float64]]


def param_shapes(vocab_size: int, *, hidden: int) -> dict[str, tuple[int, int]]:
    """min-char-rnn's parameter shapes: Wxh (H, V), Whh (H, H), Why (V, H), bh (H, 1), by (V, 1)."""
    return {
        "Wxh": (hidden, vocab_size),
        "Whh": (hidden, hidden),
        "Why": (vocab_size, hidden),
        "bh": (hidden, 1),
        "by": (vocab_size, 1),
    }


def init_params(vocab_size: int, *, hidden: int, seed: int) -> Params:
    """Weights N(0, 1/hidden), biases zero; float64."""
    rng = np.random.default_rng(seed)
    shapes = param_shapes(vocab_size, hidden=hidden)
    # 1/sqrt(H) rather than min-char-rnn's 0.01: the recurrence starts out carrying signal instead of
    # near-zero states. Measured at the defaults, 100k steps: held-out 1.97 vs 2.04 nats/char.
    params = {name: rng.standard_normal(shapes[name]) / np.sqrt(hidden) for name in ("Wxh", "Whh", "Why")}
    params["bh"] = np.zeros(shapes["bh"])
    params["by"] = np.zeros(shapes["by"])
    return params


def loss_and_grads(
    params: Mapping[str, npt.NDArray[np.float64]],
    inputs: Sequence[int] | npt.NDArray[np.integer],
    targets: Sequence[int] | npt.NDArray[np.integer],
    h_prev: npt.NDArray[np.float64],
) -> tuple[float, Params, npt.NDArray[np.float64]]:
    """Summed cross-entropy (nats) over T chars, raw (unclipped) grads keyed like params, and h_last (H, 1)."""
    # Positional like min-char-rnn's lossFun(inputs, targets, hprev): the issue fixes this signature.
    xs = np.asarray(inputs, dtype=np.intp)
    ys = np.asarray(targets, dtype=np.intp)
    if len(xs) == 0 or len(ys) != len(xs):
        raise InputError(f"inputs and targets must be equally long and non-empty, got {len(xs)} and {len(ys)}")
    _, grads = flat_buffer({name: params[name].shape for name in PARAM_NAMES})
    loss, h_last = _backprop(params, xs, ys, h_prev, grads)
    return loss, grads, h_last


def _backprop(
    params: Mapping[str, npt.NDArray[np.float64]],
    xs: npt.NDArray[np.intp],
    ys: npt.NDArray[np.intp],
    h_prev: npt.NDArray[np.float64],
    grads: Params,
) -> tuple[float, npt.NDArray[np.float64]]:
    """loss_and_grads' work, writing the grads into the given arrays; returns (loss, h_last (H, 1)).

    The two loops over time are the whole cost at min-char-rnn's size (H=100, T=25), so each step
    is one matrix-vector product and two in-place ufuncs on preallocated rows: per-call overhead
    (~0.3 µs a ufunc, ~1.2 µs a 100×100 float64 product) is what is left to pay.
    """
    Wxh, Whh, Why, bh, by = (params[name] for name in PARAM_NAMES)
    T, (H, V) = len(xs), Wxh.shape
    add, mul, tanh = np.add, np.multiply, np.tanh
    hs = np.empty((T + 1, H))  # hs[0] = h_prev is the explicit h0 (min-char-rnn's hs[-1]); hs[t + 1] follows input t
    hs[0] = h_prev[:, 0]
    add(Wxh.T[xs], bh[:, 0], out=hs[1:])  # input projection by column lookup, plus bh: the pre-activations
    for h, a in zip(hs[:-1], hs[1:]):
        add(a, Whh.dot(h), a)
        tanh(a, a)
    dy = hs[1:] @ Why.T  # (T, V) logits, turned in place into probabilities, then into d loss / d logits
    dy += by[:, 0]
    dy -= dy.max(axis=1, keepdims=True)  # shifted so exp cannot overflow
    np.exp(dy, out=dy)
    dy /= dy.sum(axis=1, keepdims=True)
    steps = np.arange(T)
    loss = float(-np.log(dy[steps, ys]).sum())
    dy[steps, ys] -= 1.0  # softmax - one_hot(target)
    dh = dy @ Why  # (T, H): gradient reaching each h_t from its own output; the loop adds the rest
    dtanh = hs[1:] * hs[1:]
    np.subtract(1.0, dtanh, out=dtanh)  # (T, H): tanh' in terms of its output
    dhraw = np.empty((T, H))  # gradient at each step's tanh input
    mul(dh[-1], dtanh[-1], dhraw[-1])
    WhhT = Whh.T
    # Backwards over t = T-2 … 0: dh_t += Whhᵀ dhraw_{t+1} (from step t + 1), dhraw_t = dh_t * tanh'_t.
    for d, g, later, now in zip(dh[-2::-1], dtanh[-2::-1], dhraw[:0:-1], dhraw[-2::-1]):
        add(d, WhhT.dot(later), d)
        mul(d, g, now)
    onehot = np.zeros((T, V))
    onehot[steps, xs] = 1.0
    np.dot(dhraw.T, onehot, grads["Wxh"])  # scatter-add of each step's dhraw into its input's column, as one product
    np.dot(dhraw.T, hs[:-1], grads["Whh"])  # uses hs[0] = h_prev for the first step
    np.dot(dy.T, hs[1:], grads["Why"])
    dhraw.sum(axis=0, out=grads["bh"][:, 0])
    dy.sum(axis=0, out=grads["by"][:, 0])
    return loss, hs[T][:, None].copy()


def forward(
    params: Mapping[str, npt.NDArray[np.float64]],
    *,
    ids: Sequence[int] | npt.NDArray[np.integer],
    h_prev: npt.NDArray[np.floating],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Logits (T, V) float64 for each input id, and the last hidden state (H, 1)."""
    Wxh, Whh, Why, bh, by = (params[name] for name in PARAM_NAMES)
    xs = np.asarray(ids, dtype=np.intp)
    hs = np.empty((len(xs), Whh.shape[0]))
    xh = Wxh[:, xs].T + bh[:, 0]  # (T, H)
    h = np.asarray(h_prev, dtype=np.float64)[:, 0]
    for t in range(len(xs)):
        h = np.tanh(xh[t] + Whh @ h, out=hs[t])
    logits = hs @ Why.T + by[:, 0]
    return logits, h[:, None].copy()


def cross_entropy(logits: npt.NDArray[np.floating], *, targets: Sequence[int] | npt.NDArray[np.integer]) -> float:
    """Summed cross-entropy in nats of (T, V) logits against T target ids, computed in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1))
    return float((log_z - shifted[np.arange(len(shifted)), np.asarray(targets, dtype=np.intp)]).sum())


def evaluate(params: Mapping[str, npt.NDArray[np.float64]], *, ids: npt.NDArray[np.integer]) -> float:
    """Mean cross-entropy in nats/char of predicting ids[1:] from ids[:-1], starting from h = 0."""
    if len(ids) < 2:
        raise DataError(f"need at least 2 characters to score a text, got {len(ids)} — use a longer text")
    h = np.zeros((params["Whh"].shape[0], 1))
    total = 0.0
    for start in range(0, len(ids) - 1, EVAL_CHUNK):
        stop = min(start + EVAL_CHUNK, len(ids) - 1)
        logits, h = forward(params, ids=ids[start:stop], h_prev=h)
        total += cross_entropy(logits, targets=ids[start + 1 : stop + 1])
    return total / (len(ids) - 1)


def adagrad_step(
    param: npt.NDArray[np.float64],
    *,
    grad: npt.NDArray[np.float64],
    memory: npt.NDArray[np.float64],
    learning_rate: float,
    clip: float,
    scratch: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None,
) -> None:
    """Clip grad to [-clip, clip] (as min-char-rnn does), then one Adagrad update of param and memory in place; any shape.

    grad is left raw. `scratch`, two float64 arrays shaped like param, is reused for the temporaries:
    a training loop passes it so no step allocates (whole-model temporaries are ~185 KB at the defaults).
    """
    g, s = scratch if scratch is not None else (np.empty_like(param), np.empty_like(param))
    np.clip(grad, -clip, clip, out=g)  # mitigates exploding gradients
    np.multiply(g, g, out=s)
    memory += s
    np.add(memory, ADAGRAD_EPS, out=s)
    np.sqrt(s, out=s)
    g /= s
    g *= learning_rate
    param -= g


def flat_buffer(shapes: Mapping[str, tuple[int, ...]]) -> tuple[npt.NDArray[np.float64], Params]:
    """An uninitialised flat (N,) float64 buffer and a dict of views into it, in PARAM_NAMES order, with the given shapes."""
    sizes = [int(np.prod(shapes[name])) for name in PARAM_NAMES]
    flat = np.empty(sum(sizes))
    views = {}
    offset = 0
    for name, size in zip(PARAM_NAMES, sizes):
        views[name] = flat[offset : offset + size].reshape(shapes[name])
        offset += size
    return flat, views


def flat_views(arrays: Mapping[str, npt.NDArray[np.float64]]) -> tuple[npt.NDArray[np.float64], Params]:
    """A flat (N,) float64 copy of the arrays in PARAM_NAMES order, and a dict of views into it with their shapes."""
    flat, views = flat_buffer({name: np.shape(arrays[name]) for name in PARAM_NAMES})
    for name in PARAM_NAMES:
        views[name][...] = arrays[name]
    return flat, views


# --- corpus -----------------------------------------------------------------------------------


def build_vocab(text: str) -> str:
    """The characters of `text`, sorted by code point: character i has id i."""
    if not text:
        raise DataError("the text is empty — give a corpus with at least a few characters")
    return "".join(sorted(set(text)))


def encode(text: str, *, vocab: str) -> npt.NDArray[np.int64]:
    """Char ids (N,) int64 of `text`; raise DataError naming characters missing from `vocab`."""
    index = {ch: i for i, ch in enumerate(vocab)}
    missing = sorted(set(text) - index.keys())
    if missing:
        raise DataError(
            f"the text has characters not in the model's vocabulary: {''.join(missing)!r} — train a new model on this text"
        )
    return np.fromiter((index[ch] for ch in text), dtype=np.int64, count=len(text))


def split_text(text: str, *, val_fraction: float) -> tuple[str, str]:
    """(train, validation): the validation part is the last `val_fraction` of the text."""
    n_val = int(len(text) * val_fraction)
    return text[: len(text) - n_val], text[len(text) - n_val :]


# --- checkpoints -------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """Everything training needs to resume: params, vocab, Adagrad memory, step and carried state."""

    params: Params
    vocab: str  # characters in id order
    memory: Params  # Adagrad's sum of squared (clipped) gradients, keyed like params
    step: int  # Adagrad updates done so far
    h: npt.NDArray[np.float64]  # (H, 1) state carried into the next training chunk
    smooth_loss: float  # exponential moving average of the training loss, nats/char

    @property
    def hidden(self) -> int:
        return int(self.params["Whh"].shape[0])


def new_checkpoint(vocab: str, *, hidden: int, seed: int) -> Checkpoint:
    """A fresh model at step 0: min-char-rnn initialisation, zero Adagrad memory and state."""
    params = init_params(len(vocab), hidden=hidden, seed=seed)
    return Checkpoint(
        params=params,
        vocab=vocab,
        memory={name: np.zeros_like(value) for name, value in params.items()},
        step=0,
        h=np.zeros((hidden, 1)),
        smooth_loss=float(np.log(len(vocab))),  # the loss of a uniform guess
    )


def save_checkpoint(checkpoint: Checkpoint, *, path: str | Path) -> None:
    """Write `checkpoint` atomically as an .npz of plain arrays (no pickle; vocab as int32 code points)."""
    arrays: dict[str, np.ndarray] = dict(checkpoint.params)
    arrays.update({f"m{name}": value for name, value in checkpoint.memory.items()})
    arrays["vocab"] = np.array([ord(ch) for ch in checkpoint.vocab], dtype=np.int32)
    arrays["step"] = np.array(checkpoint.step, dtype=np.int64)
    arrays["h"] = checkpoint.h
    arrays["smooth_loss"] = np.array(checkpoint.smooth_loss, dtype=np.float64)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append a second ".npz"
            np.savez(f, **arrays)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array in an .npz, refusing pickles and, by their declared sizes, more than MAX_CHECKPOINT_BYTES;
    ModelFileError for anything that is not a readable npz."""
    if not path.exists():
        raise ModelFileError(f"no checkpoint at {path} — train one first (edge-rnn train char-rnn)")
    hint = "it is truncated, corrupt, pickled or not a char-rnn checkpoint; re-train or restore it"
    with open_regular(path, what="checkpoint", error=ModelFileError, hint=hint) as f:
        if f.read(6) == b"\x93NUMPY":
            raise ModelFileError(f"{path} holds a single array, not a char-rnn .npz checkpoint — point at the .npz training wrote")
    return read_npz(path, where=str(path), what="checkpoint", error=ModelFileError, hint=hint,
                    max_array_bytes=MAX_CHECKPOINT_BYTES, max_total_bytes=MAX_CHECKPOINT_BYTES)


def _vocab_from_code_points(path: Path, codes: np.ndarray) -> str:
    if codes.dtype != np.int32 or codes.ndim != 1 or codes.size == 0:
        raise ModelFileError(f"{path}: 'vocab' must be a non-empty 1-D int32 array of code points, got {codes.dtype} {codes.shape} — re-train it")
    if codes.min() < 0 or codes.max() > MAX_CODE_POINT or np.any((codes >= 0xD800) & (codes <= 0xDFFF)):
        raise ModelFileError(f"{path}: 'vocab' holds values that are not Unicode characters — re-train it")
    if len(np.unique(codes)) != len(codes):
        raise ModelFileError(f"{path}: 'vocab' repeats characters — re-train it")
    return "".join(map(chr, codes.tolist()))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint written by save_checkpoint; raise ModelFileError if it is unusable."""
    path = Path(path)
    arrays = _read_npz(path)
    required = [*PARAM_NAMES, *(f"m{name}" for name in PARAM_NAMES), "vocab", "step", "h", "smooth_loss"]
    missing = [key for key in required if key not in arrays]
    if missing:
        raise ModelFileError(f"{path} is missing {', '.join(missing)} — not a char-rnn checkpoint; re-train or point at the right file")
    vocab = _vocab_from_code_points(path, arrays["vocab"])
    if arrays["Whh"].ndim != 2:
        raise ModelFileError(f"{path}: Whh must be 2-D (H, H), got shape {arrays['Whh'].shape} — re-train it")
    hidden = arrays["Whh"].shape[0]
    expected = param_shapes(len(vocab), hidden=hidden)
    expected.update({f"m{name}": shape for name, shape in list(expected.items())})
    expected["h"] = (hidden, 1)
    expected["smooth_loss"] = ()
    for key, shape in expected.items():
        value = arrays[key]
        if value.dtype != np.float64 or value.shape != shape:
            raise ModelFileError(f"{path}: {key} should be float64 {shape}, got {value.dtype} {value.shape} — re-train it")
        if not np.all(np.isfinite(value)):
            raise ModelFileError(f"{path}: {key} contains NaN or infinity — training diverged; re-train with a lower learning rate")
    step = arrays["step"]
    if step.dtype != np.int64 or step.shape != () or step < 0:
        raise ModelFileError(f"{path}: 'step' should be a non-negative int64 scalar, got {step.dtype} {step.shape} — re-train it")
    if any(np.any(arrays[f"m{name}"] < 0) for name in PARAM_NAMES):
        raise ModelFileError(f"{path}: Adagrad memory is negative — the file is corrupt; re-train it")
    return Checkpoint(
        params={name: arrays[name] for name in PARAM_NAMES},
        vocab=vocab,
        memory={name: arrays[f"m{name}"] for name in PARAM_NAMES},
        step=int(step),
        h=arrays["h"],
        smooth_loss=float(arrays["smooth_loss"]),
    )


# --- training ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """What the progress callback sees: steps done, the target, and the smoothed loss in nats/char."""

    step: int
    iters: int
    smooth_loss: float


@dataclass
class TrainResult:
    checkpoint: Checkpoint
    val_loss: float  # nats/char on the held-out tail
    seconds: float  # wall time of the Adagrad loop, excluding validation
    steps: int  # updates done in this call


def chunks_per_pass(n_chars: int, *, seq_length: int) -> int:
    """Training chunks per pass over n_chars: min-char-rnn rewinds when p + seq_length + 1 >= n."""
    if n_chars < seq_length + 2:
        raise DataError(f"the training text has {n_chars} characters; need at least {seq_length + 2} for seq_length {seq_length}")
    return -(-(n_chars - seq_length - 1) // seq_length)


def train(
    text: str | None = None,
    *,
    config: CharRnnConfig = CharRnnConfig(),
    resume: Checkpoint | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    progress_every: int = 100,
    save_to: str | Path | None = None,
    save_every: int = 10_000,
) -> TrainResult:
    """Adagrad with truncated BPTT until step == config.iters (resuming from `resume`); text default: Shakespeare.

    The state h is carried across chunks and reset to zero at the start of each pass, as in
    min-char-rnn; the chunk position follows from the step, so a resumed run repeats an unbroken one
    exactly. Resuming takes the model's shape and vocabulary from the checkpoint.
    """
    text = load_text(None) if text is None else text
    train_text, val_text = split_text(text, val_fraction=config.val_fraction)
    state = resume if resume is not None else new_checkpoint(build_vocab(text), hidden=config.hidden, seed=config.seed)
    data = encode(train_text, vocab=state.vocab)
    val_ids = encode(val_text, vocab=state.vocab)
    T = config.seq_length
    n_chunks = chunks_per_pass(len(data), seq_length=T)
    # One flat vector each, so Adagrad is a few whole-model operations instead of five small loops.
    theta, params = flat_views(state.params)
    memory_flat, memory = flat_views(state.memory)
    grad, grads = flat_buffer({name: value.shape for name, value in params.items()})
    scratch = (np.empty_like(theta), np.empty_like(theta))
    h = state.h
    smooth_loss = state.smooth_loss
    first_step = state.step
    # The schedule depends only on (step, iters), so resuming with the same iters repeats an unbroken run.
    anneal_steps = max(1.0, config.anneal_fraction * config.iters)
    start = time.perf_counter()
    for n in range(first_step, config.iters):
        p = (n % n_chunks) * T
        if p == 0:
            h = np.zeros_like(h)  # a new pass starts from a blank state
        loss, h = _backprop(params, data[p : p + T], data[p + 1 : p + T + 1], h, grads)  # grads are views of grad
        learning_rate = config.learning_rate * min(1.0, (config.iters - n) / anneal_steps)
        adagrad_step(theta, grad=grad, memory=memory_flat, learning_rate=learning_rate, clip=config.clip, scratch=scratch)
        smooth_loss = (1 - SMOOTHING) * smooth_loss + SMOOTHING * loss / T
        done = n + 1
        if save_to is not None and done % save_every == 0:
            save_checkpoint(Checkpoint(params, state.vocab, memory, done, h, smooth_loss), path=save_to)
        if on_progress is not None and (done % progress_every == 0 or done == config.iters):
            on_progress(Progress(step=done, iters=config.iters, smooth_loss=smooth_loss))
    seconds = time.perf_counter() - start
    checkpoint = Checkpoint(params, state.vocab, memory, max(first_step, config.iters), h, smooth_loss)
    if save_to is not None:
        save_checkpoint(checkpoint, path=save_to)
    val_loss = evaluate(params, ids=val_ids) if len(val_ids) >= 2 else float("nan")
    return TrainResult(checkpoint=checkpoint, val_loss=val_loss, seconds=seconds, steps=max(0, config.iters - first_step))


# --- sampling ---------------------------------------------------------------------------------


def numpy_step(params: Mapping[str, npt.NDArray[np.float64]]) -> StepFn:
    """A step function over the NumPy model: (ids int64 (1, T), h (1, H)) -> (logits float64 (1, T, V), h (1, H))."""

    def step(ids: npt.NDArray[np.int64], h: npt.NDArray[np.floating]) -> tuple[np.ndarray, np.ndarray]:
        logits, h_last = forward(params, ids=ids[0], h_prev=np.asarray(h, dtype=np.float64).T)
        return logits[None], h_last.T

    return step


def sample(
    checkpoint: Checkpoint,
    *,
    prime: str,
    length: int,
    temperature: float = 1.0,
    seed: int = 0,
    h0: npt.NDArray[np.floating] | None = None,
) -> str:
    """`length` characters from the NumPy model continuing `prime` (see sample_with)."""
    return sample_with(
        numpy_step(checkpoint.params),
        vocab=checkpoint.vocab,
        hidden=checkpoint.hidden,
        prime=prime,
        length=length,
        temperature=temperature,
        seed=seed,
        h0=h0,
    )


# Characters of the training text read to make the start state for generation.
START_STATE_CHARS = 1000


def start_state(params: Mapping[str, npt.NDArray[np.float64]], *, vocab: str, text: str) -> npt.NDArray[np.float32]:
    """float32 (1, H): the state after reading the first ~1,000 chars of `text` up to a line end, from zeros.

    Truncated BPTT resets h to zero only once per pass, so the all-zero state is one the trained model
    has hardly seen: a short prime read from zeros can fall into a loop ("ROMEO:3VXXXXXXXK…"). A state
    reached on real text starts generation in the model's own regime.
    """
    head = text[:START_STATE_CHARS]
    head = head[: head.rfind("\n") + 1] or head
    _, h = forward(params, ids=encode(head, vocab=vocab), h_prev=np.zeros((params["Whh"].shape[0], 1)))
    return h.T.astype(np.float32)


# --- model folder (checkpoint + manifest) ------------------------------------------------------

MODEL_NAME = "char-rnn"
CHECKPOINT_FILE = "checkpoint.npz"
BUNDLED_TEXT = "bundled"


def io_spec(*, hidden: int, vocab_size: int) -> dict:
    """The manifest's `io` block: the ONNX graph's inputs and outputs (batch and time dynamic)."""
    return {
        "inputs": [
            {"name": "ids", "dtype": "int64", "shape": ["batch", "time"], "meaning": "char ids (see vocab)"},
            {"name": "h0", "dtype": "float32", "shape": ["batch", hidden], "meaning": "hidden state before the first char (zeros to start)"},
        ],
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": ["batch", "time", vocab_size], "meaning": "unnormalised log-probabilities of the next char"},
            {"name": "h", "dtype": "float32", "shape": ["batch", hidden], "meaning": "hidden state after the last char: feed it back as h0"},
        ],
    }


def save_trained(result: TrainResult, *, out_dir: str | Path, text: str, text_source: str | None, config: CharRnnConfig) -> Path:
    """Write OUT/checkpoint.npz and a fresh OUT/manifest.json (both atomically); return the checkpoint path."""
    import dataclasses

    from ..device.manifest import record_file, save_manifest

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = result.checkpoint
    save_checkpoint(ckpt, path=out_dir / CHECKPOINT_FILE)
    text_chars = len(text)
    n_val = int(text_chars * config.val_fraction)
    manifest = {
        "model": MODEL_NAME,
        "task": "generate",
        "data": {
            "name": "tinyshakespeare" if text_source is None else Path(text_source).name,
            "source": BUNDLED_TEXT if text_source is None else str(Path(text_source).resolve()),
            "train_chars": text_chars - n_val,
            "val_chars": n_val,
            "val_fraction": config.val_fraction,
        },
        "vocab": list(ckpt.vocab),
        "preprocessing": {"encoding": "utf-8", "ids": "index of each character in vocab"},
        "generation": {
            "h0": start_state(ckpt.params, vocab=ckpt.vocab, text=split_text(text, val_fraction=config.val_fraction)[0])[0].tolist(),
            "why": "start state for generate/sample: the state after reading the head of the training text",
        },
        "io": io_spec(hidden=ckpt.hidden, vocab_size=len(ckpt.vocab)),
        "config": {**dataclasses.asdict(config), "hidden": ckpt.hidden},
        "versions": {"numpy": np.__version__},
        "metrics": {"val_nats_per_char": result.val_loss, "train_steps": ckpt.step, "train_smooth_loss": ckpt.smooth_loss},
        "files": {},
    }
    record_file(manifest, out_dir, "checkpoint", CHECKPOINT_FILE)
    save_manifest(out_dir, manifest)
    return out_dir / CHECKPOINT_FILE


def load_trained(model_dir: str | Path) -> tuple[Checkpoint, dict]:
    """The checkpoint of a char-rnn folder, verified against its manifest, and the manifest."""
    from ..device.manifest import load_manifest, verified_file

    manifest = load_manifest(model_dir)
    return load_checkpoint(verified_file(manifest, model_dir, "checkpoint")), manifest


def text_split(manifest: dict) -> tuple[str, str]:
    """(training part, held-out tail) of the text a char-rnn folder was trained on, as its manifest says."""
    data = manifest.get("data", {})
    source = data.get("source")
    text = load_text(None if source in (None, BUNDLED_TEXT) else source)
    return split_text(text, val_fraction=float(data["val_fraction"]))


def heldout_text(manifest: dict) -> str:
    """The validation tail of the text a char-rnn folder was trained on."""
    return text_split(manifest)[1]
