"""NumPy char-RNN: gradient check, clipping, training, checkpoints, sampling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from edge_rnn.train import char_rnn
from edge_rnn.train.data import load_text
from edge_rnn.train.char_rnn import PARAM_NAMES, loss_and_grads
from edge_rnn.config import CharRnnConfig
from edge_rnn.errors import InputError, ModelFileError
from edge_rnn.tolerances import GRADCHECK_MAX_REL_ERROR

# Centred-difference step: float64 truncation error ~ step², rounding error ~ eps / step.
FD_STEP = 1e-5


@pytest.fixture(scope="module")
def text() -> str:
    return load_text(None)[:20_000]


def random_model(seed: int, *, V: int = 7, H: int = 5, T: int = 10):
    rng = np.random.default_rng(seed)
    # Weights large enough that tanh is well away from linear, so every term of the gradient matters.
    params = {name: rng.standard_normal(shape) * 0.5 for name, shape in char_rnn.param_shapes(V, hidden=H).items()}
    inputs = rng.integers(0, V, T).tolist()
    targets = rng.integers(0, V, T).tolist()
    h_prev = rng.standard_normal((H, 1)) * 0.5  # non-zero: dWhh at step 0 depends on it
    return params, inputs, targets, h_prev


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_gradients_match_centred_differences(seed):
    params, inputs, targets, h_prev = random_model(seed)
    _, grads, _ = loss_and_grads(params, inputs, targets, h_prev)
    errors = {}
    for name in PARAM_NAMES:
        numeric = np.zeros_like(params[name])
        for i in np.ndindex(params[name].shape):
            old = params[name][i]
            params[name][i] = old + FD_STEP
            loss_plus = loss_and_grads(params, inputs, targets, h_prev)[0]
            params[name][i] = old - FD_STEP
            loss_minus = loss_and_grads(params, inputs, targets, h_prev)[0]
            params[name][i] = old
            numeric[i] = (loss_plus - loss_minus) / (2 * FD_STEP)
        diff = np.linalg.norm(numeric - grads[name])
        errors[name] = diff / (np.linalg.norm(numeric) + np.linalg.norm(grads[name]))
    assert all(err < GRADCHECK_MAX_REL_ERROR for err in errors.values()), errors


def test_loss_and_grads_shapes_and_h_last():
    params, inputs, targets, h_prev = random_model(0)
    loss, grads, h_last = loss_and_grads(params, inputs, targets, h_prev)
    assert {name: g.shape for name, g in grads.items()} == {name: p.shape for name, p in params.items()}
    assert all(g.dtype == np.float64 for g in grads.values())
    logits, h_forward = char_rnn.forward(params, ids=inputs, h_prev=h_prev)
    assert h_last.shape == (5, 1)
    np.testing.assert_allclose(h_last, h_forward, rtol=0, atol=1e-15)
    assert loss == pytest.approx(char_rnn.cross_entropy(logits, targets=targets), rel=1e-12)


def test_clipping_happens_in_the_training_step_only():
    V, H, T = 7, 5, 10
    params = {name: np.zeros(shape) for name, shape in char_rnn.param_shapes(V, hidden=H).items()}
    params["Wxh"][:] = 3.0  # saturated h = tanh(3) ≈ 1 at every step
    _, grads, _ = loss_and_grads(params, [0] * T, [1] * T, np.zeros((H, 1)))
    raw = {name: g.copy() for name, g in grads.items()}
    clip = CharRnnConfig().clip
    assert np.abs(grads["Why"]).max() > clip  # T steps of |dy·h| ≈ 1 each add up past the clip
    memory = np.zeros_like(params["Why"])
    char_rnn.adagrad_step(params["Why"], grad=grads["Why"], memory=memory, learning_rate=0.1, clip=clip)
    np.testing.assert_array_equal(memory, np.clip(raw["Why"], -clip, clip) ** 2)
    np.testing.assert_array_equal(grads["Why"], raw["Why"])  # the caller's gradient is not clipped in place


def test_adagrad_with_scratch_buffers_matches_without():
    rng = np.random.default_rng(0)
    param, grad, memory = rng.standard_normal(50), rng.standard_normal(50) * 8, rng.random(50)
    fresh = (param.copy(), memory.copy())
    reused = (param.copy(), memory.copy())
    char_rnn.adagrad_step(fresh[0], grad=grad, memory=fresh[1], learning_rate=0.1, clip=5.0)
    scratch = (np.full(50, np.nan), np.full(50, np.nan))  # stale contents must not leak into the update
    char_rnn.adagrad_step(reused[0], grad=grad, memory=reused[1], learning_rate=0.1, clip=5.0, scratch=scratch)
    np.testing.assert_array_equal(reused[0], fresh[0])
    np.testing.assert_array_equal(reused[1], fresh[1])


def test_each_call_returns_its_own_grads():
    params, inputs, targets, h_prev = random_model(0)
    _, first, _ = loss_and_grads(params, inputs, targets, h_prev)
    kept = {name: g.copy() for name, g in first.items()}
    loss_and_grads(params, targets, inputs, h_prev)  # a different chunk must not overwrite the first grads
    for name in PARAM_NAMES:
        np.testing.assert_array_equal(first[name], kept[name])


def test_training_lowers_the_loss_on_real_text(text):
    config = CharRnnConfig(hidden=32, iters=400, seed=0)
    vocab = char_rnn.build_vocab(text)
    _, val_text = char_rnn.split_text(text, val_fraction=config.val_fraction)
    before = char_rnn.evaluate(char_rnn.init_params(len(vocab), hidden=32, seed=0), ids=char_rnn.encode(val_text, vocab=vocab))
    progress = []
    result = char_rnn.train(text, config=config, on_progress=progress.append, progress_every=100)
    assert result.val_loss < min(before, np.log(len(vocab))) - 0.5  # better than untrained and than a uniform guess
    assert [p.step for p in progress] == [100, 200, 300, 400]
    assert progress[-1].smooth_loss < progress[0].smooth_loss
    assert result.checkpoint.step == 400 and result.steps == 400


def test_checkpoint_round_trip(tmp_path, text):
    checkpoint = char_rnn.train(text, config=CharRnnConfig(hidden=8, iters=50)).checkpoint
    path = tmp_path / "model.npz"
    char_rnn.save_checkpoint(checkpoint, path=path)
    loaded = char_rnn.load_checkpoint(path)
    assert loaded.vocab == checkpoint.vocab and loaded.step == 50
    assert loaded.smooth_loss == checkpoint.smooth_loss
    np.testing.assert_array_equal(loaded.h, checkpoint.h)
    for name in PARAM_NAMES:
        np.testing.assert_array_equal(loaded.params[name], checkpoint.params[name])
        np.testing.assert_array_equal(loaded.memory[name], checkpoint.memory[name])
    with np.load(path, allow_pickle=False) as npz:
        assert npz["vocab"].dtype == np.int32
    assert list(tmp_path.iterdir()) == [path]  # the atomic write left no temporary file


class Interrupted(Exception):
    pass


def interrupt_at(step: int):
    def on_progress(progress: char_rnn.Progress) -> None:
        if progress.step == step:
            raise Interrupted
    return on_progress


def test_resume_continues_exactly(tmp_path, text):
    # 2,000 steps cross the end of the 18k-char training text, so the rewind and h reset are covered too.
    config = CharRnnConfig(hidden=16, iters=2000)
    unbroken = char_rnn.train(text, config=config).checkpoint
    path = tmp_path / "run.npz"
    with pytest.raises(Interrupted):  # a run killed after its checkpoint at step 1,000
        char_rnn.train(text, config=config, save_to=path, save_every=1000, on_progress=interrupt_at(1000), progress_every=1000)
    halfway = char_rnn.load_checkpoint(path)
    assert halfway.step == 1000
    resumed = char_rnn.train(text, config=config, resume=halfway).checkpoint
    assert resumed.step == unbroken.step == 2000
    for name in PARAM_NAMES:
        np.testing.assert_array_equal(resumed.params[name], unbroken.params[name])
        np.testing.assert_array_equal(resumed.memory[name], unbroken.memory[name])
    np.testing.assert_array_equal(resumed.h, unbroken.h)
    assert resumed.smooth_loss == unbroken.smooth_loss


def test_resume_does_not_modify_the_given_checkpoint(text):
    start = char_rnn.train(text, config=CharRnnConfig(hidden=8, iters=10)).checkpoint
    before = {name: value.copy() for name, value in start.params.items()}
    char_rnn.train(text, config=CharRnnConfig(hidden=8, iters=20), resume=start)
    assert start.step == 10
    for name in PARAM_NAMES:
        np.testing.assert_array_equal(start.params[name], before[name])


@pytest.fixture(scope="module")
def good_arrays(text) -> dict[str, np.ndarray]:
    checkpoint = char_rnn.new_checkpoint(char_rnn.build_vocab(text), hidden=4, seed=0)
    arrays = {**checkpoint.params, **{f"m{k}": v for k, v in checkpoint.memory.items()}}
    arrays.update(vocab=np.array([ord(c) for c in checkpoint.vocab], np.int32), step=np.array(0, np.int64))
    arrays.update(h=checkpoint.h, smooth_loss=np.array(1.0))
    return arrays


def _corrupt(kind: str, arrays: dict[str, np.ndarray], path):
    arrays = dict(arrays)
    if kind == "missing key":
        del arrays["Whh"]
    elif kind == "wrong shape":
        arrays["Why"] = arrays["Why"][:, :3]
    elif kind == "float32":
        arrays["Wxh"] = arrays["Wxh"].astype(np.float32)
    elif kind == "nan":
        arrays["bh"] = np.full_like(arrays["bh"], np.nan)
    elif kind == "object vocab":
        arrays["vocab"] = np.array(list("abc"), dtype=object)
    elif kind == "unicode vocab":
        arrays["vocab"] = np.array(list("abc"))
    if kind in {"object vocab"}:
        with open(path, "wb") as f:
            np.savez(f, **arrays)  # numpy pickles object arrays; the loader must refuse them
        return
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "flipped bytes":
        path.write_bytes(data[:200] + bytes(b ^ 0xFF for b in data[200:400]) + data[400:])
    elif kind == "not an npz":
        path.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    elif kind == "pickle":
        path.write_bytes(pickle.dumps(arrays))
    elif kind == "single npy":
        np.save(path.with_suffix(".npy"), arrays["Wxh"])
        path.with_suffix(".npy").replace(path)


@pytest.mark.parametrize(
    "kind",
    ["missing key", "wrong shape", "float32", "nan", "object vocab", "unicode vocab", "truncated",
     "flipped bytes", "not an npz", "pickle", "single npy"],
)
def test_bad_checkpoints_raise_model_file_error(tmp_path, good_arrays, kind):
    path = tmp_path / "model.npz"
    _corrupt(kind, good_arrays, path)
    with pytest.raises(ModelFileError) as info:
        char_rnn.load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_missing_checkpoint_raises_model_file_error(tmp_path):
    with pytest.raises(ModelFileError, match="no checkpoint"):
        char_rnn.load_checkpoint(tmp_path / "absent.npz")


def test_unmodified_arrays_load(tmp_path, good_arrays):
    path = tmp_path / "model.npz"
    _corrupt("none", good_arrays, path)
    assert char_rnn.load_checkpoint(path).hidden == 4


@pytest.fixture(scope="module")
def trained(text) -> char_rnn.Checkpoint:
    return char_rnn.train(text, config=CharRnnConfig(hidden=16, iters=300)).checkpoint


def test_sampling_is_seeded(trained):
    first = char_rnn.sample(trained, prime="ROMEO:", length=100, temperature=0.8, seed=7)
    again = char_rnn.sample(trained, prime="ROMEO:", length=100, temperature=0.8, seed=7)
    other = char_rnn.sample(trained, prime="ROMEO:", length=100, temperature=0.8, seed=8)
    assert first == again != other
    assert len(first) == 100 and set(first) <= set(trained.vocab)


def test_unknown_prime_characters_are_named(trained):
    with pytest.raises(InputError) as info:
        char_rnn.sample(trained, prime="Hi é~", length=10)
    message = str(info.value)
    assert "é" in message and "~" in message and "\n" not in message


@pytest.mark.parametrize("bad", [dict(prime=""), dict(length=-1), dict(temperature=0.0)])
def test_bad_sampling_arguments_raise_input_error(trained, bad):
    kwargs = dict(prime="A", length=5, temperature=1.0) | bad
    with pytest.raises(InputError):
        char_rnn.sample(trained, **kwargs)
