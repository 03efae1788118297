"""Three users' own Keras models, trained briefly on real data, with labelled data files as a user would give them.

- `digits`: a digit classifier (LSTM(32) over image rows → Dense(10, softmax)) on the bundled real MNIST digits;
  data: the 1,000 held-out digits as float32 in [0, 1] (`x`) and their labels (`y`).
- `co2`: a forecaster (LSTM(16) → Dense(1)) of next week's CO2 at Mauna Loa from the last 26 weeks, on the real
  weekly record (tests/data/co2_mauna_loa_weekly.csv, public domain, shipped by statsmodels); data: the last
  20% of the record (time-ordered split), standardised as the model was trained.
- `text`: a character model (Embedding(mask_zero) → LSTM(64, return_sequences) → Dense(vocab, softmax)) that
  predicts the next character of each line of the bundled Shakespeare, lines post-padded with id 0; data:
  held-out lines (`ids`) and next-character targets per step (`next_char`), padding masked out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
CO2_CSV = DATA / "co2_mauna_loa_weekly.csv"
CO2_WINDOW = 26
CO2_MEAN, CO2_STD = 340.0, 15.0
TEXT_LEN = 48


def co2_series() -> np.ndarray:
    """The weekly record 1958–2001 in ppm, its 59 missing weeks filled by linear interpolation."""
    rows = [line.split(",") for line in CO2_CSV.read_text().splitlines()[1:]]
    values = np.array([float(v) if v else np.nan for _, v in rows])
    missing = np.isnan(values)
    values[missing] = np.interp(np.flatnonzero(missing), np.flatnonzero(~missing), values[~missing])
    return values


def co2_windows() -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test): 26-week standardised windows → the next week, time-ordered 80/20 split."""
    z = ((co2_series() - CO2_MEAN) / CO2_STD).astype(np.float32)
    x = np.stack([z[i : i + CO2_WINDOW] for i in range(len(z) - CO2_WINDOW)])[..., None]
    y = z[CO2_WINDOW:][:, None]
    split = int(0.8 * len(x))
    return x[:split], y[:split], x[split:], y[split:]


def text_lines(text: str, *, vocab: str) -> tuple[np.ndarray, np.ndarray]:
    """Non-empty lines → ids (N, TEXT_LEN) post-padded with 0 (ids 1…) and the next character's id at each step."""
    index = {c: i + 1 for i, c in enumerate(vocab)}
    lines = [line[: TEXT_LEN + 1] for line in text.split("\n") if len(line) >= 8]
    ids = np.zeros((len(lines), TEXT_LEN), np.int32)
    nxt = np.zeros((len(lines), TEXT_LEN), np.int32)
    for row, line in enumerate(lines):
        codes = [index[c] for c in line]
        n = min(len(codes) - 1, TEXT_LEN)
        ids[row, :n] = codes[:n]
        nxt[row, :n] = [c - 1 for c in codes[1 : n + 1]]  # classes 0…V-1: the softmax has no padding class
    return ids, nxt


def build_digits(keras):
    layers = keras.layers
    model = keras.Sequential([keras.Input((28, 28), name="rows"), layers.LSTM(32), layers.Dense(10, activation="softmax", name="digit")])
    model.compile("adam", "sparse_categorical_crossentropy")
    return model


def build_co2(keras):
    layers = keras.layers
    model = keras.Sequential([keras.Input((CO2_WINDOW, 1), name="weeks"), layers.LSTM(16), layers.Dense(1, name="next_week")])
    model.compile(keras.optimizers.Adam(3e-3), "mse")
    return model


def build_text(keras, vocab_size: int):
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((None,), dtype="int32", name="ids"),
        layers.Embedding(vocab_size + 1, 16, mask_zero=True),
        layers.LSTM(64, return_sequences=True),
        layers.Dense(vocab_size, activation="softmax", name="next_char"),
    ])
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    return model


def make_user_models(root: Path) -> dict[str, tuple[Path, Path]]:
    """Train, save (.keras), export and int8-quantize the three models under `root`; return
    {name: (model folder, data .npz)}."""
    import keras

    from edge_rnn.train.data import load_sample, load_text
    from edge_rnn.exporter import export
    from edge_rnn.quantize import quantize

    keras.utils.set_random_seed(0)
    made = {}
    digits = load_sample()
    model = build_digits(keras)
    model.fit(digits.x_train.astype(np.float32) / 255, digits.y_train, epochs=10, batch_size=32, verbose=0)
    data = root / "digits_test.npz"
    np.savez(data, x=digits.x_test.astype(np.float32) / 255, y=digits.y_test.astype(np.int64))
    made["digits"] = (_export(model, root / "digits.keras", export, quantize), data)

    x_tr, y_tr, x_te, y_te = co2_windows()
    model = build_co2(keras)
    model.fit(x_tr, y_tr, epochs=8, batch_size=32, verbose=0)
    data = root / "co2_test.npz"
    np.savez(data, x=x_te, y=y_te)
    made["co2"] = (_export(model, root / "co2.keras", export, quantize), data)

    text = load_text(None)[:300_000]
    vocab = "".join(sorted(set(text)))
    ids, nxt = text_lines(text, vocab=vocab)
    split = int(0.9 * len(ids))
    model = build_text(keras, len(vocab))
    model.fit(ids[:split], nxt[:split], epochs=2, batch_size=64, verbose=0)
    data = root / "text_test.npz"
    np.savez(data, ids=ids[split:][:800], next_char=nxt[split:][:800])
    made["text"] = (_export(model, root / "text.keras", export, quantize), data)
    return made


def _export(model, path: Path, export, quantize) -> Path:
    model.save(path)
    out = path.with_suffix("")
    export(path, out=out)
    quantize(out, variants=("int8",))
    return out
