"""A new user's classifiers (issue 22): binary and multi-label sigmoid outputs get the right labels, out-of-vocabulary
ids are refused before onnxruntime, and an input name the user never chose is named back to them.

Real Keras models with fixed weights (so every probability is known), exported and run through the real CLI and API;
each answer is checked against a plain onnxruntime session's probabilities.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import one_line_error, ort_answers
from edge_rnn.cli import app

runner = CliRunner()
NEG, POS = "benign", "malignant"
TAGS = ["cat", "dog", "bird"]


def run(*args, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def _fixed_weights(model, seed: int, scale: float) -> None:
    """Every weight drawn from one seeded generator (the last layer's scaled up, so probabilities spread out)."""
    rng = np.random.default_rng(seed)
    last = model.layers[-1]
    for layer in model.layers:
        weights = [rng.normal(0.0, 0.5, w.shape).astype(np.float32) for w in layer.get_weights()]
        if layer is last:
            weights = [weights[0] * scale, np.zeros_like(weights[1])]
        layer.set_weights(weights)


def _pick(p: np.ndarray, wanted) -> list[int]:
    """The first row of `p` meeting each test in `wanted`."""
    rows = []
    for test in wanted:
        hits = [i for i in range(len(p)) if test(p[i]) and i not in rows]
        assert hits, f"no row for {test}: {p}"
        rows.append(hits[0])
    return rows


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    import keras

    root = tmp_path_factory.mktemp("kinds")
    layers = keras.layers
    rng = np.random.default_rng(1)

    # Binary: LSTM → Dense(1, sigmoid); the rows kept include one near p = 0.014 and ones above 0.5.
    binary = keras.Sequential([keras.Input((6, 2)), layers.LSTM(4), layers.Dense(1, activation="sigmoid", name="score")])
    _fixed_weights(binary, seed=0, scale=40.0)
    pool = rng.normal(size=(256, 6, 2)).astype(np.float32)
    p = binary.predict(pool, verbose=0)[:, 0]
    rows = _pick(p, [lambda q: 0.01 <= q <= 0.02, lambda q: q > 0.5, lambda q: q > 0.5, lambda q: 0.2 < q < 0.5])
    np.save(root / "bx.npy", pool[rows])
    binary.save(root / "binary.keras")

    # Multi-label: GRU → Dense(3, sigmoid); rows with no label, one, and several above 0.5.
    multi = keras.Sequential([keras.Input((5, 3)), layers.GRU(4), layers.Dense(3, activation="sigmoid", name="tags")])
    _fixed_weights(multi, seed=2, scale=6.0)
    pool = rng.normal(size=(256, 5, 3)).astype(np.float32)
    p = multi.predict(pool, verbose=0)
    rows = _pick(p, [lambda q: (q < 0.5).all(), lambda q: (q >= 0.5).sum() == 1, lambda q: (q >= 0.5).sum() >= 2])
    np.save(root / "mx.npy", pool[rows])
    multi.save(root / "multi.keras")

    # Ids: Embedding(500) → LSTM → Dense(2, softmax), its input named by Keras (input_layer…).
    embed = keras.Sequential([keras.Input((None,), dtype="int32"), layers.Embedding(500, 4), layers.LSTM(3),
                              layers.Dense(2, activation="softmax")])
    embed.save(root / "embed.keras")
    ids = rng.integers(0, 500, size=(3, 7))
    np.save(root / "ids.npy", ids)
    ids[1, 3] = 9999
    np.save(root / "oov.npy", ids)

    (root / "two.txt").write_text(f"{NEG}\n{POS}\n")
    (root / "one.txt").write_text(f"{POS}\n")
    (root / "three.txt").write_text("\n".join(TAGS) + "\n")
    (root / "pair.txt").write_text("neg\npos\n")
    exports = {}
    for name, source, labels in (("binary", "binary.keras", "two.txt"), ("single", "binary.keras", "one.txt"),
                                 ("multi", "multi.keras", "three.txt"), ("embed", "embed.keras", "pair.txt")):
        exports[name] = run("export", root / source, "--out", root / name, "--labels", root / labels)
    return root, Exported(root, exports)


class Exported(dict):
    """{name: folder}, each export's failure (a refused labels file) reported by the test that needs that folder."""

    def __init__(self, root, results) -> None:
        super().__init__()
        self.root, self.results = root, results

    def __missing__(self, name):
        result = self.results[name]
        assert result.exit_code == 0, result.output
        return self.root / name


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# --- 1. binary and multi-label classifiers ---------------------------------------------------------


def test_export_takes_two_labels_for_one_sigmoid_and_refuses_three(kinds):
    root, folders = kinds
    manifest = json.loads((folders["binary"] / "manifest.json").read_text())
    assert manifest["labels"] == [NEG, POS] and manifest["output_activations"] == {"score": "sigmoid"}
    one_line_error(run("export", root / "binary.keras", "--out", root / "bad", "--labels", root / "three.txt"),
                   "3 labels for one sigmoid unit", "give 2, negative then positive")
    one_line_error(run("export", root / "multi.keras", "--out", root / "bad", "--labels", root / "two.txt"),
                   "2 labels for 3 sigmoid units")


def test_infer_binary_labels_by_threshold_with_the_chosen_labels_probability(kinds):
    root, folders = kinds
    p = ort_answers(folders["binary"] / "model.onnx", np.load(root / "bx.npy"))[:, 0].astype(np.float64)
    payload = _json(run("infer", folders["binary"] / "model.onnx", root / "bx.npy", "--json", "--top-k", "2"))
    rows = payload["predictions"]
    assert len(rows) == 4 and 0.01 <= p[0] <= 0.02 and p[1] > 0.5 and p[2] > 0.5 and p[3] < 0.5
    for row, q in zip(rows, p):
        want, prob = (POS, q) if q >= 0.5 else (NEG, 1.0 - q)
        assert row["kind"] == "binary" and row["label"] == want and row["labels"] == [want]
        assert row["probability"] == pytest.approx(prob, abs=1e-6)
        assert [t["label"] for t in row["top"]] == [want, NEG if want == POS else POS]
    assert rows[0]["label"] == NEG and rows[0]["probability"] == pytest.approx(1.0 - p[0], abs=1e-6) and rows[0]["probability"] > 0.98

    table = run("infer", folders["binary"] / "model.onnx", root / "bx.npy")
    assert table.exit_code == 0, table.output
    lines = [line.split() for line in table.output.splitlines() if line.startswith("bx.npy[")][:4]
    assert [(cells[1], float(cells[2])) for cells in lines] == [
        (POS if q >= 0.5 else NEG, pytest.approx(max(q, 1.0 - q), abs=1e-4)) for q in p]


def test_one_label_for_one_sigmoid_is_a_yes_no_label(kinds):
    root, folders = kinds
    p = ort_answers(folders["single"] / "model.onnx", np.load(root / "bx.npy"))[:, 0]
    payload = _json(run("infer", folders["single"] / "model.onnx", root / "bx.npy", "--json"))
    assert [row["labels"] for row in payload["predictions"]] == [[POS] if q >= 0.5 else [] for q in p]
    assert payload["predictions"][0]["label"] is None  # p ≈ 0.014: not positive


def test_multilabel_rows_list_exactly_the_labels_at_half_or_above(kinds):
    root, folders = kinds
    p = ort_answers(folders["multi"] / "model.onnx", np.load(root / "mx.npy"))
    payload = _json(run("infer", folders["multi"] / "model.onnx", root / "mx.npy", "--json"))
    want = [[t for t, q in zip(TAGS, row) if q >= 0.5] for row in p]
    assert [row["labels"] for row in payload["predictions"]] == want
    assert len(want[0]) == 0 and len(want[1]) == 1 and len(want[2]) >= 2
    for row, q in zip(payload["predictions"], p):
        assert row["kind"] == "multilabel"
        assert [s["label"] for s in row["scores"]] == TAGS
        assert [s["probability"] for s in row["scores"]] == pytest.approx(q.tolist(), abs=1e-6)
        assert [s["chosen"] for s in row["scores"]] == [bool(v >= 0.5) for v in q]

    table = run("infer", folders["multi"] / "model.onnx", root / "mx.npy")
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split()[-3:] == TAGS
    assert "(none)" in lines[2] and ", ".join(want[2]) in lines[4]


def test_stream_prints_the_steps_label_and_short_floats(kinds):
    root, folders = kinds
    x = np.load(root / "bx.npy")[0]
    np.save(root / "seq.npy", x)
    result = run("stream", folders["binary"] / "model.step.onnx", "--input", root / "seq.npy", "--digits", "0")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert len(lines) == 6
    for line in lines:
        q = line["outputs"]["score"][0]
        assert line["label"] == (POS if q >= 0.5 else NEG) and line["labels"] == [line["label"]]
        assert line["probability"] == pytest.approx(max(q, 1 - q), abs=1e-6)
        assert len(repr(q)) <= 12  # float32's own digits, not the 17 of its double
    # By default, floats rounded to 4 decimals as infer prints them; the labels are the same.
    rounded = [json.loads(line) for line in run("stream", folders["binary"] / "model.step.onnx", "--input", root / "seq.npy").output.splitlines()]
    for line, exact in zip(rounded, lines):
        assert line["outputs"]["score"][0] == round(exact["outputs"]["score"][0], 4) and line["label"] == exact["label"]
        assert line["probability"] == round(exact["probability"], 4) and len(repr(line["probability"])) <= 6
    assert lines[-1]["outputs"]["score"][0] == pytest.approx(float(ort_answers(folders["binary"] / "model.onnx", x[None])[0, 0]), abs=1e-5)


def test_api_classify_follows_the_kind(kinds):
    import edge_rnn

    root, folders = kinds
    x = np.load(root / "bx.npy")
    model = edge_rnn.load(folders["binary"])
    p = model.predict(x)["score"][:, 0]
    assert model.label_kind == "binary"
    decisions = model.classify(x)
    assert [d.label for d in decisions] == [POS if q >= 0.5 else NEG for q in p]
    assert decisions[0].probability == pytest.approx(1.0 - float(p[0]), abs=1e-6)

    stream = model.stream()
    for t in range(x.shape[1]):
        out = stream.step(x[0, t][None])
    (last,) = stream.classify(out)
    assert last.label == (POS if out["score"][0, -1] >= 0.5 else NEG)
    # What step did not return is one line saying what classify takes (it was a bare IndexError).
    for wrong, needle in ((x[0, 0][None], "step first"), ({"score": np.array([0.3])}, "should be (streams, 1)")):
        with pytest.raises(edge_rnn.InputError) as exc:
            stream.classify(wrong)
        assert needle in str(exc.value) and "\n" not in str(exc.value)

    multi = edge_rnn.load(folders["multi"])
    mx = np.load(root / "mx.npy")
    q = multi.predict(mx)["tags"]
    assert multi.label_kind == "multilabel"
    assert [d.chosen for d in multi.classify(mx)] == [[t for t, v in zip(TAGS, row) if v >= 0.5] for row in q]


def test_bundle_of_a_binary_classifier_self_tests(kinds, tmp_path):
    import edge_rnn

    root, folders = kinds
    import shutil

    folder = tmp_path / "binary"
    shutil.copytree(folders["binary"], folder)
    assert run("quantize", folder).exit_code == 0
    made = run("bundle", folder, "--variant", "int8", "-o", tmp_path / "b.tar.gz")
    assert made.exit_code == 0, made.output
    verified = run("verify", tmp_path / "b.tar.gz", "--run")
    assert verified.exit_code == 0, verified.output
    model = edge_rnn.load(tmp_path / "b.tar.gz")
    report = model.self_test()
    assert report.ok and all(r.agreement is None or r.agreement == 1.0 for r in report.results)
    payload = _json(run("infer", tmp_path / "b.tar.gz", root / "bx.npy", "--json"))
    assert payload["predictions"][0]["label"] == NEG and payload["predictions"][1]["label"] == POS


# --- 2. out-of-vocabulary ids --------------------------------------------------------------------


def test_out_of_vocabulary_id_is_refused_before_onnxruntime(kinds):
    import edge_rnn
    from edge_rnn.errors import InputError

    root, folders = kinds
    manifest = json.loads((folders["embed"] / "manifest.json").read_text())
    name = manifest["io"]["inputs"][0]["name"]
    assert manifest["io"]["inputs"][0]["vocab"] == 500 and manifest["step"]["inputs"][0]["vocab"] == 500
    line = one_line_error(run("infer", folders["embed"] / "model.onnx", root / "oov.npy"),
                          f"input {name!r}", "9999", "row 1, position 3", "0–499")
    assert "ONNXRuntime" not in line and "Gather" not in line
    with pytest.raises(InputError, match="row 1, position 3.*0–499"):
        edge_rnn.load(folders["embed"]).predict(np.load(root / "oov.npy"))
    streamed = run("stream", folders["embed"] / "model.step.onnx", input="[[3]]\n[[9999]]\n")  # step 0 runs, step 1 is refused
    assert streamed.exit_code == 1 and "Traceback" not in streamed.output
    first, refused = streamed.output.strip().splitlines()
    assert json.loads(first)["step"] == 0 and refused.startswith("error: stdin line 2") and "9999" in refused and "0–499" in refused


# --- 3. names the user never chose ---------------------------------------------------------------


def test_a_wrong_input_name_is_named_back_with_the_models_names(kinds):
    root, folders = kinds
    name = json.loads((folders["embed"] / "manifest.json").read_text())["io"]["inputs"][0]["name"]
    one_line_error(run("infer", folders["embed"] / "model.onnx", "--input", f"ids={root / 'ids.npy'}"),
                   "no input 'ids'", repr(name))
    one_line_error(run("stream", folders["embed"] / "model.step.onnx", "--input", f"ids={root / 'ids.npy'}"),
                   "no input 'ids'", repr(name))
    unnamed = _json(run("infer", folders["embed"] / "model.onnx", root / "ids.npy", "--json"))
    named = _json(run("infer", folders["embed"] / "model.onnx", "--input", f"{name}={root / 'ids.npy'}", "--json"))
    assert [r["label"] for r in unnamed["predictions"]] == [r["label"] for r in named["predictions"]]
    assert len(unnamed["predictions"]) == 3
