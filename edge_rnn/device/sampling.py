"""Sampling characters from any step function: the NumPy reference and onnxruntime share this code.

Device path: numpy only.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import numpy.typing as npt

from ..errors import InputError, ModelFileError

# step(ids int64 (1, T), h float (1, H)) -> (logits float (1, T, V), h float (1, H)).
StepFn = Callable[[npt.NDArray[np.int64], npt.NDArray[np.floating]], tuple[npt.NDArray[np.floating], npt.NDArray[np.floating]]]


def check_prime(prime: str, *, vocab: str) -> None:
    """Raise InputError if `prime` is empty or has characters outside `vocab`, naming them."""
    if not prime:
        raise InputError("the prime text is empty — give at least one character to start from (e.g. --prime 'ROMEO:')")
    unknown = sorted(set(prime) - set(vocab))
    if unknown:
        raise InputError(
            f"the prime has characters the model never saw: {''.join(unknown)!r} — use only characters from its vocabulary"
        )


# Beyond these, logits / temperature overflows float64 (→ NaN draws) or sampling is uniform noise.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


def sample_with(
    step: StepFn,
    *,
    vocab: str,
    hidden: int,
    prime: str,
    length: int,
    temperature: float = 1.0,
    seed: int = 0,
    h0: npt.NDArray[np.floating] | None = None,
) -> str:
    """`length` characters continuing `prime`, drawn from softmax(logits / temperature) by any step function (see iter_sample)."""
    chars = iter_sample(step, vocab=vocab, hidden=hidden, prime=prime, length=length, temperature=temperature, seed=seed, h0=h0)
    return "".join(chars)


def iter_sample(
    step: StepFn,
    *,
    vocab: str,
    hidden: int,
    prime: str,
    length: int,
    temperature: float = 1.0,
    seed: int = 0,
    h0: npt.NDArray[np.floating] | None = None,
) -> Iterator[str]:
    """Yield `length` characters continuing `prime` one at a time, drawn from softmax(logits / temperature).

    The arguments are checked here, before the first character is asked for; the characters come one per
    step, so a long generation holds one character at a time, never the whole text.

    The prime is read from `h0` (1, H) — the model folder's start state, see `start_state` — or zeros.

    The draw is computed here in float64 from np.random.default_rng(seed), so the NumPy model and an
    onnxruntime session (float32 logits) give the same text unless a probability lands within ~1e-6
    of a sampling boundary.
    """
    check_prime(prime, vocab=vocab)
    if length < 0:
        raise InputError(f"length must be >= 0, got {length}")
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise InputError(
            f"temperature must be between {MIN_TEMPERATURE} and {MAX_TEMPERATURE:g}, got {temperature} — try 1.0, or 0.5 for safer text"
        )
    return _draw(step, vocab=vocab, hidden=hidden, prime=prime, length=length, temperature=temperature, seed=seed, h0=h0)


def _draw(
    step: StepFn, *, vocab: str, hidden: int, prime: str, length: int, temperature: float, seed: int, h0: npt.NDArray[np.floating] | None
) -> Iterator[str]:
    """iter_sample's loop, a generator apart from it so that the checks above run at the call."""
    rng = np.random.default_rng(seed)
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = np.array([[index[ch] for ch in prime]], dtype=np.int64)  # (1, T)
    h = np.zeros((1, hidden), dtype=np.float32) if h0 is None else np.asarray(h0, dtype=np.float32).reshape(1, hidden)
    one_char = [np.full((1, 1), i, dtype=np.int64) for i in range(len(vocab))]  # each step's (1, 1) input, made once
    for array in one_char:
        array.flags.writeable = False  # shared across steps, so a step function must not change it
    last = len(vocab) - 1
    for _ in range(length):
        logits, h = step(ids, h)
        if logits.shape[-1] != len(vocab):
            raise ModelFileError(f"the model scores {logits.shape[-1]} characters but its vocabulary has {len(vocab)}")
        z = logits[0, -1].astype(np.float64)  # (V,): a fresh float64 copy, worked on in place
        if temperature != 1.0:  # dividing by 1.0 is exact, so skipping it changes no draw
            z /= temperature
        z -= z.max()
        np.exp(z, out=z)
        np.cumsum(z, out=z)  # the unnormalised CDF: the draw scales by its last entry instead of dividing
        nxt = min(int(z.searchsorted(rng.random() * z[-1], side="right")), last)
        ids = one_char[nxt]
        yield vocab[nxt]


def generation_h0(manifest: dict, *, hidden: int) -> npt.NDArray[np.float32]:
    """The manifest's start state (1, H) for generation, checked; raises ModelFileError if malformed."""
    try:
        h0 = np.asarray(manifest["generation"]["h0"], dtype=np.float32).reshape(1, hidden)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"the manifest has no valid generation.h0 of {hidden} numbers — retrain the folder") from exc
    if not np.all(np.isfinite(h0)):
        raise ModelFileError("the manifest's generation.h0 holds NaN or Inf — retrain the folder")
    return h0
