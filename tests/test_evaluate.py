"""`edge-rnn evaluate`: every variant scored on a user's labelled data, each figure checked against one computed
independently here from onnxruntime's answers, and every gate shown failing on a damaged model or bad data.

Real models and real data only: three users' Keras models (tests/user_models.py: digits, CO2, Shakespeare
lines), the pipeline's mnist-lstm and the char RNN.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from conftest import damage_scale, one_line_error, ort_answers
from edge_rnn.cli import app
from edge_rnn.device.dataset import open_dataset, read_arrays
from edge_rnn.device.manifest import load_manifest, record_file, save_manifest
from edge_rnn.device.metrics import Tally, bootstrap_ratio, figures, score_batch, wilson
from edge_rnn.errors import DataError
from edge_rnn.evaluate import evaluate

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


# --- metrics ------------------------------------------------------------------------------------------


def test_wilson_interval_solves_its_quadratic():
    # Wilson's bounds are the p where (p̂ − p)² = z² p (1 − p) / n: solve that quadratic independently.
    z = 1.959963984540054
    for hits, n in ((81, 263), (957, 1000), (0, 20), (20, 20)):
        phat = hits / n
        a = 1 + z**2 / n
        roots = np.sort(np.roots([a, -(2 * phat + z**2 / n), phat**2]).real)
        np.testing.assert_allclose(wilson(hits, n), np.clip(roots, 0, 1), atol=1e-12)


def test_bootstrap_interval_covers_and_narrows():
    rng = np.random.default_rng(1)
    small, large = rng.exponential(1.0, 100), rng.exponential(1.0, 10_000)
    lo_s, hi_s = bootstrap_ratio(small, np.ones_like(small))
    lo_l, hi_l = bootstrap_ratio(large, np.ones_like(large))
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5  # ~√100 narrower with 100× the data
    assert bootstrap_ratio(small, np.ones_like(small)) == (lo_s, hi_s)  # seeded: the same data, the same interval


def test_per_step_accuracy_leaves_padding_out():
    tally = Tally("softmax")
    out = np.zeros((2, 3, 4))
    out[..., 1] = 1.0  # always predicts class 1
    target = np.array([[1, 1, 0], [1, 0, 0]])
    valid = np.array([[True, True, False], [True, False, False]])  # padding would count as wrong
    score_batch(tally, out, target, valid=valid)
    assert figures(tally)[0].value == 1.0


# --- evaluate on users' models --------------------------------------------------------------------


def test_classifier_accuracy_matches_onnxruntime_at_batch_1(user_models):
    folder, data = user_models["digits"]
    with np.load(data) as d:
        x, y = d["x"], d["y"]
    result = evaluate(folder, data=data)
    for role, file in (("onnx", "model.onnx"), ("onnx_int8", "model.int8.onnx")):
        expected = float(np.mean(ort_answers(folder / file, {"rows": x}).argmax(1) == y))
        score = result.variant(role)
        assert score.headline.name == "accuracy" and score.headline.value == expected, role
        assert score.headline.low < expected < score.headline.high
    assert [v.role for v in result.variants] == ["onnx", "onnx_int8", "onnx_step", "onnx_step_int8", "keras"]
    assert result.variant("onnx_step").max_abs_diff < 1e-5 and result.variant("keras").verdict.ok
    assert result.ok, [v.verdict.failures for v in result.variants]


def test_regressor_errors_match_numpy(user_models):
    folder, data = user_models["co2"]
    with np.load(data) as d:
        x, y = d["x"], d["y"]
    result = evaluate(folder, data=data, roles=["onnx"], source=False)
    err = np.abs(ort_answers(folder / "model.onnx", {"weeks": x}).astype(np.float64) - y.astype(np.float64))
    figs = {f.name: f for f in result.variant("onnx").figures["next_week"]}
    np.testing.assert_allclose(figs["mae"].value, err.mean(), rtol=1e-9)
    np.testing.assert_allclose(figs["rmse"].value, np.sqrt((err**2).mean()), rtol=1e-9)
    np.testing.assert_allclose(figs["max_error"].value, err.max(), rtol=1e-9)
    assert figs["mae"].low < figs["mae"].value < figs["mae"].high


def damaged_copy(folder, tmp_path, *, which: str, factor: float = 4.0):
    """A copy of a model folder whose int8 file has one weight scale × `factor` (a broken quantizer), re-recorded."""
    broken = tmp_path / folder.name
    shutil.copytree(folder, broken)
    damage_scale(folder / "model.int8.onnx", broken / "model.int8.onnx", factor=factor, which=which)
    manifest = load_manifest(broken)
    record_file(manifest, broken, "onnx_int8", "model.int8.onnx")
    save_manifest(broken, manifest)
    return broken


def test_int8_that_worsens_a_regressors_error_breaks_its_promise(user_models, tmp_path):
    folder, data = user_models["co2"]
    assert run("evaluate", folder, "--data", data, "--json").exit_code == 0  # sound int8 (7-bit weights) holds
    broken = damaged_copy(folder, tmp_path, which="dense", factor=1.5)
    result = run("evaluate", broken, "--data", data, "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    by_role = {v["role"]: v for v in doc["variants"]}
    assert by_role["onnx_int8"]["ok"] is False and by_role["onnx_step_int8"]["ok"] is True
    assert by_role["onnx_int8"]["value"] > 1.02 * by_role["onnx"]["value"]
    assert "budget 2%" in by_role["onnx_int8"]["failures"][0]
    # The budget is the user's: a large enough one lets it pass.
    drop = 100 * (by_role["onnx_int8"]["value"] / by_role["onnx"]["value"] - 1)
    assert run("evaluate", broken, "--data", data, "--max-drop", f"{drop + 1:.0f}").exit_code == 0


def test_sequence_output_scored_per_real_step(user_models):
    folder, data = user_models["text"]
    with np.load(data) as d:
        ids, nxt = d["ids"], d["next_char"]
    result = evaluate(folder, data=data, roles=["onnx", "onnx_int8"], source=False)
    probs = ort_answers(folder / "model.onnx", {"ids": ids})
    real = ids != 0
    expected = float(np.mean((probs.argmax(-1) == nxt)[real]))
    score = result.variant("onnx").headline
    assert score.value == pytest.approx(expected, abs=1e-12)
    assert score.low < expected < score.high
    assert result.variant("onnx_int8").verdict.ok


def test_json_has_the_promised_fields(user_models):
    folder, data = user_models["digits"]
    result = run("evaluate", folder, "--data", data, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # stdout is the JSON alone
    for entry in doc["variants"]:
        assert {"role", "metric", "value", "low", "high", "vs_fp32", "ok"} <= set(entry)
        assert entry["metric"] == "accuracy" and 0 <= entry["low"] <= entry["value"] <= entry["high"] <= 1
    assert doc["examples"] == 1000 and doc["batch"] == 1


def test_damaged_int8_fails_evaluate(user_models, tmp_path):
    folder, data = user_models["digits"]
    broken = damaged_copy(folder, tmp_path, which="lstm W")
    result = run("evaluate", broken, "--data", data)
    assert result.exit_code == 1
    assert "onnx_int8" in result.output and "broke its promise" in result.output


def test_int8_answers_depend_on_their_batch(user_models):
    # Why the default batch is 1: a dynamic int8 model's activation scale spans the batch it is given.
    folder, data = user_models["digits"]
    one = evaluate(folder, data=data, roles=["onnx", "onnx_int8"], source=False, batch=1)
    many = evaluate(folder, data=data, roles=["onnx", "onnx_int8"], source=False, batch=256)
    assert one.variant("onnx").headline.value == many.variant("onnx").headline.value
    assert one.variant("onnx_int8").mean_max_abs_diff != many.variant("onnx_int8").mean_max_abs_diff


def test_bundle_and_folder_of_npy_give_the_same_figures(user_models, tmp_path):
    from edge_rnn.bundle import make_bundle

    folder, data = user_models["digits"]
    bundle = make_bundle(folder, variants=("fp32", "int8"), out=tmp_path / "digits.tar.gz")
    split = tmp_path / "data"
    split.mkdir()
    with np.load(data) as d:
        np.save(split / "x.npy", d["x"])
        np.save(split / "y.npy", d["y"])
    arrays = read_arrays(split)
    assert all(isinstance(a, np.memmap) for a in arrays.values())  # read in chunks, never whole
    from_folder = evaluate(folder, data=data, roles=["onnx", "onnx_int8"], source=False)
    from_bundle = evaluate(bundle, data=split)
    for role in ("onnx", "onnx_int8"):
        assert from_bundle.variant(role).headline.value == from_folder.variant(role).headline.value


def test_image_model_takes_raw_pixels_and_char_rnn_scores_nats(mnist_dir, char_dir, digits, tmp_path):
    data = tmp_path / "digits.npz"
    np.savez(data, x=digits.x_test[:200], y=digits.y_test[:200])  # uint8, scaled as the manifest says
    result = evaluate(mnist_dir, data=data, roles=["onnx"], source=False)
    probs = ort_answers(mnist_dir / "model.onnx", {"input": digits.x_test[:200].astype(np.float32) / 255})
    assert result.variant("onnx").headline.value == float(np.mean(probs.argmax(1) == digits.y_test[:200]))

    vocab = load_manifest(char_dir)["vocab"]
    ids = np.array([[vocab.index(c) for c in line[:33]] for line in ("First Citizen:\nBefore we proceed any further, hear me",
                                                                       "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved")])
    chars = tmp_path / "chars.npz"
    np.savez(chars, ids=ids[:, :-1], y=ids[:, 1:])
    result = evaluate(char_dir, data=chars, roles=["onnx"], source=False)
    session = ort.InferenceSession(str(char_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"ids": ids[:, :-1].astype(np.int64), "h0": np.zeros((2, 64), np.float32)})[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nats = -np.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()
    score = result.variant("onnx").headline
    assert score.name == "nats_per_char" and score.value == pytest.approx(nats, rel=1e-6)


# --- bad data: one line each, before any model runs -----------------------------------------------


@pytest.mark.parametrize("case, fragment", [
    ("misnamed", "neither an input"),
    ("short", "different numbers of rows"),
    ("text", "dtype <U"),
    ("nan", "NaN or Inf at row 7"),
    ("ids", "ids must be below 63"),
    ("class", "classes 0–61"),
    ("device", "character device"),
    ("npy", "one .npy array"),
])
def test_bad_data_is_one_line(user_models, tmp_path, case, fragment):
    folder, data = user_models["text"]
    with np.load(data) as d:
        ids, nxt = d["ids"][:50].copy(), d["next_char"][:50].copy()
    path = tmp_path / "bad.npz"
    if case == "misnamed":
        np.savez(path, ids=ids, next_chars=nxt)
    elif case == "short":
        np.savez(path, ids=ids, next_char=nxt[:-1])
    elif case == "text":
        np.savez(path, ids=np.array([["a"] * ids.shape[1]] * len(ids)), next_char=nxt)
    elif case == "nan":
        target = nxt.astype(np.float32)
        target[7, 3] = np.nan
        np.savez(path, ids=ids, next_char=target)
    elif case == "ids":
        ids[4, 0] = 500
        np.savez(path, ids=ids, next_char=nxt)
    elif case == "class":
        nxt[2, 0] = 62
        np.savez(path, ids=ids, next_char=nxt)
    elif case == "device":
        path = "/dev/zero"
    else:
        path = tmp_path / "ids.npy"
        np.save(path, ids)
    one_line_error(run("evaluate", folder, "--data", path), fragment)


def test_missing_targets_compare_with_fp32_only(user_models, tmp_path):
    folder, data = user_models["digits"]
    with np.load(data) as d:
        np.savez(tmp_path / "x_only.npz", x=d["x"][:100])
    result = evaluate(folder, data=tmp_path / "x_only.npz", roles=["onnx", "onnx_int8"], source=False)
    assert result.variant("onnx_int8").headline is None and result.variant("onnx_int8").agreement > 0.9
    assert "no targets" in result.notes[0]
    with pytest.raises(DataError, match="has no targets"):
        open_dataset(tmp_path / "x_only.npz", inputs=[{"name": "rows", "dtype": "float32", "shape": ["batch", 28, 28]}],
                     outputs=[{"name": "digit", "dtype": "float32", "shape": ["batch", 10]}], need_targets=True)


def test_check_runs_the_users_rows_as_one_more_set(user_models):
    from edge_rnn.check import check

    folder, data = user_models["co2"]
    report = check(folder, runtimes=["onnxruntime"], batch=40, data=data)
    assert report.sets["data"] == 40
    (result,) = report.results
    assert result.status == "ok" and result.max_abs_diff["data"]["next_week"] < 1e-5


def test_a_compressed_npz_reads_like_an_uncompressed_one(user_models, tmp_path):
    folder, data = user_models["co2"]
    with np.load(data) as d:
        np.savez_compressed(tmp_path / "co2.npz", x=d["x"], y=d["y"])
    plain = evaluate(folder, data=data, roles=["onnx"], source=False).variant("onnx").headline
    packed = evaluate(folder, data=tmp_path / "co2.npz", roles=["onnx"], source=False).variant("onnx").headline
    assert packed.value == plain.value and (packed.low, packed.high) == (plain.low, plain.high)


@pytest.mark.parametrize("model, extra, fragment", [
    ("digits", ["--metric", "mae"], "class ids are scored with --metric accuracy"),
    ("digits", ["--metric", "nats"], "ends in softmax"),
    ("co2", ["--metric", "accuracy"], "holds 1 value(s) per example"),
    ("text", ["SHORT"], "has 40 time steps, the inputs 48"),
])
def test_a_metric_or_target_that_does_not_fit_is_one_line(user_models, tmp_path, model, extra, fragment):
    folder, data = user_models[model]
    if extra == ["SHORT"]:  # next-character targets for only the first 40 of 48 steps
        with np.load(data) as d:
            np.savez(tmp_path / "short.npz", ids=d["ids"][:20], next_char=d["next_char"][:20, :40])
        data, extra = tmp_path / "short.npz", []
    one_line_error(run("evaluate", folder, "--data", data, *extra), fragment)
