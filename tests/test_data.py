"""Data loaders on real data: the bundled sample, IDX folders the tests write (plain and .gz), npz, text.

The check against Debian's full-size Fashion-MNIST files is scripts/check_fashion_mnist.py: the suite needs no system package."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from edge_rnn.train.data import load_digits, load_idx_folder, load_npz, load_text, read_idx
from edge_rnn.errors import DataError


def test_sample_split_is_stratified_disjoint_and_deterministic():
    a, b = load_digits("sample"), load_digits("sample")
    assert a.x_train.shape == (4000, 28, 28) and a.x_test.shape == (1000, 28, 28)
    assert np.array_equal(a.x_test, b.x_test) and np.array_equal(a.y_train, b.y_train)
    assert np.bincount(a.y_test, minlength=10).tolist() == [100] * 10
    train_rows = {row.tobytes() for row in a.x_train}
    assert not any(row.tobytes() in train_rows for row in a.x_test)


def _write_idx(path, array: np.ndarray, *, gz: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_round_trip(tmp_path, digits, gz):
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", digits.x_train[:300], gz=gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", digits.y_train[:300], gz=gz)
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", digits.x_test[:100], gz=gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", digits.y_test[:100], gz=gz)
    loaded = load_digits(str(tmp_path))
    assert np.array_equal(loaded.x_train, digits.x_train[:300]) and np.array_equal(loaded.y_test, digits.y_test[:100])


def test_broken_idx_files_are_refused(tmp_path, digits):
    good = tmp_path / "x-idx3-ubyte"
    _write_idx(good, digits.x_train[:10], gz=False)
    truncated = tmp_path / "t-idx3-ubyte"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        read_idx(truncated)
    bad_magic = tmp_path / "m-idx3-ubyte"
    bad_magic.write_bytes(b"\x12\x34" + good.read_bytes()[2:])
    with pytest.raises(DataError, match="magic"):
        read_idx(bad_magic)
    huge = tmp_path / "h-idx3-ubyte"
    huge.write_bytes(struct.pack(">BBBB3I", 0, 0, 8, 3, 4_000_000_000, 28, 28))
    with pytest.raises(DataError, match="too large"):
        read_idx(huge)
    with pytest.raises(DataError, match="IDX"):
        load_idx_folder(tmp_path)  # no train/t10k files


def test_npz_formats(tmp_path, digits):
    keras_style = tmp_path / "mnist.npz"
    np.savez(keras_style, x_train=digits.x_train[:50], y_train=digits.y_train[:50], x_test=digits.x_test[:20], y_test=digits.y_test[:20])
    loaded = load_npz(keras_style)
    assert loaded.x_train.shape == (50, 28, 28) and len(loaded.y_test) == 20
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=digits.x_train[:5])
    with pytest.raises(DataError, match="expected x_train"):
        load_npz(wrong)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x_train=np.array([object()]), y_train=digits.y_train[:1], x_test=digits.x_test[:1], y_test=digits.y_test[:1])
    with pytest.raises(DataError):
        load_npz(pickled)
    floats = tmp_path / "floats.npz"
    np.savez(floats, x_train=digits.x_train[:5] / 255.0, y_train=digits.y_train[:5], x_test=digits.x_test[:5], y_test=digits.y_test[:5])
    with pytest.raises(DataError, match="uint8"):
        load_npz(floats)


def test_default_mnist_downloads_or_falls_back_loudly(tmp_path, monkeypatch):
    # An empty keras cache: with a network this downloads the real MNIST, without one it must fall back.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    digits = load_digits("mnist")
    if digits.name == "mnist":
        assert digits.x_train.shape == (60000, 28, 28) and digits.x_test.shape == (10000, 28, 28)
    else:
        assert digits.name == "sample" and len(digits.y_train) == 4000
        assert len(digits.warnings) == 1 and "FELL BACK" in digits.warnings[0] and "mnist" in digits.warnings[0]
        assert digits.describe()["warnings"] == digits.warnings


def test_text_loader(tmp_path):
    text = load_text(None)
    assert len(text) == 1_115_394 and text.startswith("First Citizen:")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe" + "x".encode() * 200)
    with pytest.raises(DataError, match="not UTF-8"):
        load_text(bad)
    short = tmp_path / "short.txt"
    short.write_text("hi", encoding="utf-8")
    with pytest.raises(DataError, match="only 2 characters"):
        load_text(short)
