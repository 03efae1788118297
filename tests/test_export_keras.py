"""`edge-rnn export MODEL.keras` and `edge-rnn quantize` on users' own Keras models, through the real CLI.

Small real models of the kinds the Keras RNN guide and keras.io show (IMDB bidirectional LSTM, weather
regressor, seq2seq with RepeatVector, encoder–decoder with return_state/initial_state, GRU+SimpleRNN,
Masking+LSTM), saved as .keras files by the test, exported once per module; then the folder, the
manifest, the graphs, parity, step models, int8 files and the clean one-line errors are checked.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from conftest import in_role, one_line_error
from edge_rnn.cli import app
from edge_rnn.device.manifest import load_manifest, sha256_file

keras = pytest.importorskip("keras")
layers = keras.layers

runner = CliRunner()
VOCAB = 30
RECURRENT = ("LSTM", "GRU", "RNN")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def ops(path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


# --- the models -------------------------------------------------------------------------------------
# name → (builder, fused recurrent ops in model.onnx, step model expected (True) or the refusal's words)

def imdb():
    return keras.Sequential([
        keras.Input((None,), dtype="int32", name="ids"),
        layers.Embedding(VOCAB, 8, mask_zero=True),
        layers.Bidirectional(layers.LSTM(8)),
        layers.Dense(2, activation="softmax", name="sentiment"),
    ])


def weather():
    model = keras.Sequential([keras.Input((None, 5), name="readings"), layers.LSTM(16), layers.Dense(1, name="temperature")])
    dense = model.layers[-1]
    # An unnormalised target (kelvin): outputs ~290, judged with the relative tolerance.
    dense.kernel.assign(dense.kernel * 40.0)
    dense.bias.assign(np.array([290.0], np.float32))
    return model


def seq2seq():
    return keras.Sequential([
        keras.Input((None, 3), name="series"),
        layers.LSTM(12),
        layers.RepeatVector(5),
        layers.LSTM(12, return_sequences=True),
        layers.TimeDistributed(layers.Dense(4, activation="softmax"), name="forecast"),
    ])


def encoder_decoder():
    enc_in = keras.Input((None, 4), name="encoder_inputs")
    dec_in = keras.Input((None, 5), name="decoder_inputs")
    _, h, c = layers.LSTM(10, return_state=True, name="encoder")(enc_in)
    dec = layers.LSTM(10, return_sequences=True, name="decoder")(dec_in, initial_state=[h, c])
    return keras.Model([enc_in, dec_in], layers.Dense(5, activation="softmax", name="next_token")(dec))


def gru_stack():
    return keras.Sequential([
        keras.Input((None, 3), name="sensor"),
        layers.GRU(12, return_sequences=True),
        layers.SimpleRNN(8),
        layers.Dense(3, activation="softmax", name="activity"),
    ])


def masked_lstm():
    return keras.Sequential([
        keras.Input((None, 3), name="frames"),
        layers.Masking(0.0),
        layers.LSTM(8, return_sequences=True, name="lstm"),
        layers.TimeDistributed(layers.Dense(2), name="per_frame"),
    ])


MODELS = {
    "imdb": (imdb, {"LSTM": 1}, "reads the sequence backwards"),
    "weather": (weather, {"LSTM": 1}, True),
    "seq2seq": (seq2seq, {"LSTM": 2}, "(RepeatVector)"),
    "encoder_decoder": (encoder_decoder, {"LSTM": 2}, "starts from the final state of 'encoder'"),
    "gru_stack": (gru_stack, {"GRU": 1, "RNN": 1}, True),
    "masked_lstm": (masked_lstm, {"LSTM": 1}, True),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Each model saved as a .keras file (seeded), plus the refused and fallback cases."""
    root = tmp_path_factory.mktemp("keras")
    out = {}
    for name, (build, _, _) in MODELS.items():
        keras.utils.set_random_seed(0)
        out[name] = root / f"{name}.keras"
        build().save(out[name])
    keras.utils.set_random_seed(0)
    lam = keras.Sequential([keras.Input((None, 3)), layers.LSTM(4), layers.Lambda(lambda t: t * 2, name="double")])
    out["lambda"] = root / "lambda.keras"
    lam.save(out["lambda"])
    out["h5"] = root / "weather.h5"
    keras.saving.load_model(out["weather"]).save(out["h5"])
    # selu is no recurrent activation ONNX's GRU knows: keras_onnx refuses it, tf2onnx writes a Loop.
    loop = keras.Sequential([keras.Input((None, 3), name="x"), layers.GRU(6, activation="selu", name="gru_selu"), layers.Dense(2)])
    out["loop"] = root / "loop.keras"
    loop.save(out["loop"])
    return out


@pytest.fixture(scope="module")
def exported(files, tmp_path_factory):
    """Every model exported through the CLI (imdb beside its file, the others into --out folders)."""
    root = tmp_path_factory.mktemp("exported")
    labels = root / "labels.txt"
    labels.write_text("negative\npositive\n")
    dirs, outputs = {}, {}
    for name in MODELS:
        if name == "imdb":
            result = run("export", files[name], "--labels", labels)
            dirs[name] = files[name].parent / name
        else:
            dirs[name] = root / name
            result = run("export", files[name], "--out", dirs[name])
        assert result.exit_code == 0, result.output
        outputs[name] = result.output
    return dirs, outputs


# --- folders, manifests, graphs, parity ------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_folder_manifest_and_fused_graphs(name, files, exported):
    dirs, outputs = exported
    _, fused, step = MODELS[name]
    folder = dirs[name]
    manifest = load_manifest(folder)
    assert manifest["schema"] == 1 and manifest["model"] == name
    assert manifest["adapter"] == "keras" and manifest["task"] == "keras" and manifest["opset"] == 17
    assert manifest["source"] == {"file": str(files[name]), "sha256": sha256_file(files[name])}
    roles = {"keras", "onnx"} | ({"onnx_step"} if step is True else set())
    assert set(manifest["files"]) == roles
    assert sorted(p.name for p in folder.iterdir()) == sorted(["manifest.json", *(e["path"] for e in manifest["files"].values())])
    for entry in manifest["files"].values():
        assert entry["sha256"] == sha256_file(folder / entry["path"]) and entry["bytes"] == (folder / entry["path"]).stat().st_size
    # The copy is the user's file, byte for byte.
    assert manifest["files"]["keras"]["sha256"] == manifest["source"]["sha256"]
    for role in roles - {"keras"}:
        counts = ops(folder / manifest["files"][role]["path"])
        assert {op: counts[op] for op in RECURRENT if counts[op]} == in_role(fused, role), (role, counts)
        assert counts["Loop"] == counts["Scan"] == 0
        assert manifest["graphs"][role] == dict(sorted(counts.items()))
    # The audit: one entry per Keras layer, printed by export and kept in the ONNX file too.
    audit = manifest["audit"]
    assert sum(a["fused"] for a in audit) == sum(fused.values())
    assert all(a["fused"] == any(op in RECURRENT for op in a["onnx_ops"]) for a in audit)
    meta = {p.key: p.value for p in onnx.load(str(folder / "model.onnx")).metadata_props}
    assert json.loads(meta["edge_rnn.audit"]) == audit and meta["edge_rnn.adapter"] == "keras"
    assert "graph audit" in outputs[name] and "fused" in outputs[name]
    # Parity: every output of model.onnx (and of the step model, fed one step at a time) within its tolerance.
    parity = manifest["metrics"]["export_parity"]
    assert set(parity) == ({"onnx", "onnx_step"} if step is True else {"onnx"})
    assert [*parity["onnx"]] == [o["name"] for o in manifest["io"]["outputs"]]
    for checks in parity.values():
        for output, check in checks.items():
            assert check["ok"] and check["max_abs_diff"] < 1e-4, (output, check)
            assert f"{output}: max|Δ|" in outputs[name]
    if step is True:
        assert "step_refused" not in manifest
        assert not {s["name"] for s in manifest["step"]["inputs"]} & {s["input"] for s in manifest["step"]["state"]}
        for spec in manifest["step"]["inputs"]:
            assert spec["shape"][:2] == ["batch", 1]
    else:
        assert "step" not in manifest and step in manifest["step_refused"]
        assert "\n" not in manifest["step_refused"]


def test_io_masking_labels_and_tolerances(exported):
    dirs, _ = exported
    imdb_manifest = load_manifest(dirs["imdb"])
    # The vocabulary the device checks ids against: the Embedding's input_dim.
    assert imdb_manifest["io"]["inputs"] == [{"name": "ids", "dtype": "int32", "shape": ["batch", "time"], "vocab": 30}]
    assert imdb_manifest["io"]["outputs"] == [{"name": "sentiment", "dtype": "float32", "shape": ["batch", 2]}]
    assert imdb_manifest["masking"] == [{"input": "ids", "kind": "mask_zero", "value": 0.0}]
    assert imdb_manifest["labels"] == ["negative", "positive"]
    # Validation ids stay inside the Embedding's vocabulary, with 0 kept for padding.
    assert imdb_manifest["sample_inputs"]["ids"] == {"kind": "ids", "low": 1, "high": VOCAB, "padding": 0.0}
    encdec = load_manifest(dirs["encoder_decoder"])
    assert [s["name"] for s in encdec["io"]["inputs"]] == ["encoder_inputs", "decoder_inputs"]
    assert [s["shape"] for s in encdec["io"]["inputs"]] == [["batch", "time", 4], ["batch", "time", 5]]
    masked = load_manifest(dirs["masked_lstm"])
    assert masked["masking"] == [{"input": "frames", "kind": "mask_value", "value": 0.0}]
    assert [(s["input"], s["output"]) for s in masked["step"]["state"]] == [
        ("state.lstm.h", "state_out.lstm.h"), ("state.lstm.c", "state_out.lstm.c")]
    # A regression target ~290 is judged relative to its size; probabilities absolutely.
    temperature = load_manifest(dirs["weather"])["metrics"]["export_parity"]["onnx"]["temperature"]
    assert temperature["tolerance"].startswith("rtol")
    assert imdb_manifest["metrics"]["export_parity"]["onnx"]["sentiment"]["tolerance"] == "atol 1e-05"


# --- quantize --------------------------------------------------------------------------------------

def test_int8_of_whole_and_step_models(exported):
    dirs, _ = exported
    for name, int8_op in (("gru_stack", None), ("masked_lstm", "DynamicQuantizeLSTM")):
        folder = dirs[name]
        result = run("quantize", folder, "--variant", "int8")
        assert result.exit_code == 0, result.output
        manifest = load_manifest(folder)
        assert {"onnx_int8", "onnx_step_int8"} <= set(manifest["files"])
        for role, file in (("onnx_int8", "model.int8.onnx"), ("onnx_step_int8", "model.step.int8.onnx")):
            assert manifest["files"][role]["sha256"] == sha256_file(folder / file)
            counts = ops(folder / file)
            cov = manifest["quantization"][role]
            if int8_op:
                assert counts[int8_op] == 1 and cov["quantized"][int8_op] == 1
            elif role == "onnx_int8":
                # onnxruntime has no int8 GRU/RNN kernels: the fused cells keep float compute over int8 weights
                # (per gate row, dequantized when the file loads), and the coverage says so.
                assert counts["GRU"] == counts["RNN"] == 1 and not cov["still_float"]
                assert cov["quantized"] == {"MatMulInteger": 1, "GRU (int8 weights, float compute)": 1,
                                            "RNN (int8 weights, float compute)": 1}
                assert {layer["op"]: layer["W"] for layer in cov["layers"]} == {"GRU": "int8 (Cast + Mul by its row scales)",
                                                                               "RNN": "int8 (Cast + Mul by its row scales)"}
                assert cov["size"]["weight_ratio"] < 0.5
            else:
                # The step model runs both cells decomposed (MatMul + gates): its MatMuls are int8 compute.
                # x·W and h·R of each cell, and the Dense head.
                assert counts["GRU"] == counts["RNN"] == 0 and not cov["still_float"]
                assert cov["quantized"] == {"MatMulInteger": 5} and cov["runtime_int8_ops"] == {"DynamicQuantizeMatMul": 5}
        drift = manifest["quantization"]["onnx_step_int8"]["step_drift"]
        assert drift["steps"] == 1000 and set(drift["state_max_abs_diff"]) == {s["output"] for s in manifest["step"]["state"]}
        assert 0 <= drift["max_abs_diff"] < 0.5
        assert "step drift vs fp32 over 1,000 steps" in result.output
        assert "step_drift" not in manifest["quantization"]["onnx_int8"]


def test_static_int8_with_calibration_files(exported, tmp_path):
    dirs, _ = exported
    folder = dirs["encoder_decoder"]
    rng = np.random.default_rng(0)
    enc, dec = tmp_path / "enc.npy", tmp_path / "dec.npy"
    np.save(enc, rng.standard_normal((40, 6, 4)).astype(np.float32))
    np.save(dec, rng.standard_normal((40, 5, 5)).astype(np.float32))
    one_line_error(run("quantize", folder, "--variant", "int8-static"), "needs calibration data", "--calibration-data")
    one_line_error(run("quantize", folder, "--variant", "int8-static", "--calibration-data", f"encoder_inputs={enc}"),
                   "missing ['decoder_inputs']")
    result = run("quantize", folder, "--variant", "int8-static",
                 "--calibration-data", f"encoder_inputs={enc}", "--calibration-data", f"decoder_inputs={dec}")
    assert result.exit_code == 0, result.output
    manifest = load_manifest(folder)
    settings = manifest["quantization"]["onnx_int8_static"]["settings"]
    assert settings["calibration_samples"] == 40 and "enc.npy" in settings["calibration_data"]
    assert ops(folder / "model.int8-static.onnx")["QuantizeLinear"] > 0


# --- errors: one line, exit 1, nothing written --------------------------------------------------

def test_lambda_layer_is_refused_by_name(files):
    one_line_error(run("export", files["lambda"]), "'double'", "Lambda")
    assert not (files["lambda"].parent / "lambda").exists()


def test_h5_needs_trust(files, tmp_path):
    one_line_error(run("export", files["h5"], "--out", tmp_path / "h5"), "HDF5", "--trust-h5")
    assert not (tmp_path / "h5").exists()
    result = run("export", files["h5"], "--out", tmp_path / "h5", "--trust-h5")
    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "h5")
    assert manifest["files"]["keras"]["path"] == "model.keras" and "onnx_step" in manifest["files"]


def test_not_a_keras_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    one_line_error(run("export", notes), "not a Keras model file")
    fake = tmp_path / "fake.keras"
    fake.write_bytes(b"PK\x03\x04 not a zip")
    one_line_error(run("export", fake), "not a Keras model file")
    one_line_error(run("export", tmp_path / "missing.keras"), "no file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.keras", "notes.txt"]


def test_fallback_to_tf2onnx_and_fail_on_loop(files, tmp_path):
    one_line_error(run("export", files["loop"], "--out", tmp_path / "strict", "--fail-on-loop"), "'gru_selu' (GRU)", "--fail-on-loop")
    assert not (tmp_path / "strict").exists()
    result = run("export", files["loop"], "--out", tmp_path / "loose")
    assert result.exit_code == 0, result.output
    assert "tf2onnx fallback" in result.output and "LOOP" in result.output
    manifest = load_manifest(tmp_path / "loose")
    refused = next(a for a in manifest["audit"] if a["layer"] == "gru_selu")
    assert refused["cls"] == "GRU" and "converted by tf2onnx: may contain Loop" in refused["note"]
    assert ops(tmp_path / "loose" / "model.onnx")["Loop"] >= 1
    assert "tf2onnx" in manifest["step_refused"] and manifest["metrics"]["export_parity"]["onnx"]


def test_labels_must_match_the_output(files, tmp_path):
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    one_line_error(run("export", files["imdb"], "--out", tmp_path / "x", "--labels", three), "3 labels", "2 values")
    assert not (tmp_path / "x").exists()


def test_a_damaged_conversion_fails_parity_and_keeps_the_previous_files(files, exported, monkeypatch):
    """The parity gate is not vacuous: a recurrent weight ×1.05 in both graphs fails every output of both,
    reported in one line, and the folder keeps the files of the last good export."""
    from onnx import numpy_helper

    import edge_rnn.export.keras_onnx as keras_onnx

    dirs, _ = exported
    folder = dirs["gru_stack"]
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    convert = keras_onnx.convert

    def damaged(model, **kwargs):
        conversion = convert(model, **kwargs)
        # The first cell's input weights: W of a fused op, Wx of a decomposed step cell (export/decomposed.py).
        w = next(t for t in conversion.model.graph.initializer if t.name.endswith(("/W", "/Wx")))
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float32(1.05), w.name))
        return conversion

    monkeypatch.setattr(keras_onnx, "convert", damaged)
    one_line_error(run("export", files["gru_stack"], "--out", folder), "not saved", "onnx activity", "onnx_step activity")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_keras_folder_exports_again_in_place(exported):
    """`edge-rnn export DIR` on a folder made from a .keras file: same source, labels kept, another opset."""
    dirs, _ = exported
    folder = dirs["imdb"]
    before = load_manifest(folder)
    result = run("export", folder, "--opset", "15")
    assert result.exit_code == 0, result.output
    manifest = load_manifest(folder)
    assert manifest["opset"] == 15 and onnx.load(str(folder / "model.onnx")).opset_import[0].version == 15
    assert manifest["source"] == before["source"] and manifest["labels"] == ["negative", "positive"]
    assert manifest["files"]["keras"] == before["files"]["keras"]
    one_line_error(run("export", folder, "--out", folder.parent / "elsewhere"), "--out is for a Keras file")


def test_drift_of_a_stream_fp32_cannot_finish(tmp_path):
    """A relu LSTM with a large recurrent kernel overflows fp32 itself within 1,000 steps: the drift record
    says where and compares the steps before, instead of writing NaN."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((None, 3), name="x"), layers.LSTM(8, activation="relu", name="lstm"), layers.Dense(2)])
    model.layers[0].cell.recurrent_kernel.assign(model.layers[0].cell.recurrent_kernel * 8.0)
    model.save(tmp_path / "unbounded.keras")
    assert run("export", tmp_path / "unbounded.keras").exit_code == 0
    result = run("quantize", tmp_path / "unbounded", "--variant", "int8")
    assert result.exit_code == 0, result.output
    drift = load_manifest(tmp_path / "unbounded")["quantization"]["onnx_step_int8"]["step_drift"]
    assert "overflows at step" in drift["note"] and 0 < drift["steps"] < 1000
    assert np.isfinite(drift["max_abs_diff"]) and "overflows at step" in result.output
