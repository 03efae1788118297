"""Issue 22, "a new user's first hour", through the real CLI on real models: quantize's coverage table and verdict
(and --json), coverage read from the produced graph (an Embedding's table stored int8), re-exports that keep the
user's labels and remove the variants made from the previous weights, and errors that name the real next step."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from typer.testing import CliRunner

from conftest import one_line_error
from edge_rnn.cli import app
from edge_rnn.device.manifest import load_manifest, sha256_file
from edge_rnn.device.text import shown

runner = CliRunner()
# Lines of quantize's coverage table are drawn for an 80-column terminal.
COLUMNS = 80
LABELS = ("vowel", "consonant", "space", "other")
LINE = 24


def flat(text: str) -> str:
    """Output as one line: rich wraps long lines at spaces for an 80-column terminal."""
    return " ".join(text.split())


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def char_classes(text: str):
    """Real Shakespeare lines → (ids of LINE characters, the class of the character after them: LABELS)."""
    vocab = sorted(set(text))
    index = {c: i + 1 for i, c in enumerate(vocab)}
    lines = [line for line in text.split("\n") if len(line) > LINE]
    ids = np.array([[index[c] for c in line[:LINE]] for line in lines], np.int32)
    nxt = [line[LINE] for line in lines]
    y = np.array([0 if c.lower() in "aeiou" else 1 if c.isalpha() else 2 if c == " " else 3 for c in nxt], np.int64)
    return ids, y, len(vocab) + 1


def build(keras, vocab: int):
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((None,), dtype="int32", name="ids"),
        layers.Embedding(vocab, 16, name="embed"),
        layers.LSTM(32, name="lstm"),
        layers.Dense(len(LABELS), activation="softmax", name="cls"),
    ])
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


@pytest.fixture(scope="module")
def embedding(tmp_path_factory):
    """A real Embedding → LSTM → Dense classifier of the next character's kind, briefly trained on Shakespeare, saved
    twice (`first.keras`, and `retrained.keras` after another epoch), with held-out data and a labels file."""
    import keras

    from edge_rnn.train.data import load_text

    root = tmp_path_factory.mktemp("first-hour")
    ids, y, vocab = char_classes(load_text(None)[:200_000])
    split = int(0.9 * len(ids))
    keras.utils.set_random_seed(0)
    model = build(keras, vocab)
    model.fit(ids[:split], y[:split], epochs=1, batch_size=64, verbose=0)
    model.save(root / "first.keras")
    model.fit(ids[:split], y[:split], epochs=1, batch_size=64, verbose=0)
    model.save(root / "retrained.keras")
    np.savez(root / "heldout.npz", ids=ids[split:][:300], cls=y[split:][:300])
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return root


@pytest.fixture(scope="module")
def kws(embedding, tmp_path_factory):
    """`first.keras` exported with labels and int8-quantized through the CLI (read-only: copy to modify)."""
    folder = tmp_path_factory.mktemp("kws") / "kws"
    result = run("export", embedding / "first.keras", "--out", folder, "--labels", embedding / "labels.txt")
    assert result.exit_code == 0, result.output
    result = run("quantize", folder, "--variant", "int8")
    assert result.exit_code == 0, result.output
    return folder, result.output


@pytest.fixture()
def kws_copy(kws, tmp_path):
    return shutil.copytree(kws[0], tmp_path / "kws")


# --- 1. quantize prints a coverage table and a verdict; JSON only with --json -------------------------------------


def test_quantize_prints_a_coverage_table_and_a_verdict_at_80_columns(mnist_copy):
    result = run("quantize", mnist_copy, "--variant", "int8", "--variant", "fp16")
    assert result.exit_code == 0, result.output
    text = result.output
    assert "coverage: {" not in text and '"weight_ratio"' not in text  # no raw JSON
    assert all(len(line) <= COLUMNS for line in text.splitlines()), text
    assert text.count("node (layer)") == 3  # one table per file: int8, step int8, fp16
    manifest = load_manifest(mnist_copy)
    for role, op_row in (("onnx_int8", "DynamicQuantizeLSTM (int8)"), ("onnx_fp16", "LSTM, float16")):
        cov = manifest["quantization"][role]
        # One row per node computing with weights, named after its Keras layer, with its weights' bytes.
        for node in cov["nodes"]:
            row = next(line for line in text.splitlines() if line.startswith(f"  {shown(node['node'], limit=28)} ") and node["form"] in line)
            assert row.rstrip().endswith(f"{node['weight_bytes']:,}"), row
        assert op_row in text
        # The verdict: the weights vs fp32 from the record, and what to do to judge it.
        ratio = cov["size"]["weight_ratio"]
        variant = role.removeprefix("onnx_")
        assert f"verdict {variant}: {ratio:.2f}× the weights of fp32 ({cov['size']['weight_bytes']:,} of" in flat(text)
        assert "judged on synthetic inputs only, not against its promise" in flat(text) and "--data FILE" in text
    int8 = manifest["quantization"]["onnx_int8"]
    assert int8["size"]["weight_ratio"] < 0.3  # an LSTM model's int8 weights are about a quarter of fp32's
    step = manifest["quantization"]["onnx_step_int8"]["step_drift"]
    outputs = max(step["outputs_max_abs_diff"].values())
    assert f"outputs' step drift {outputs:.1e} over {step['steps']:,} steps" in flat(text)
    assert int8["quantized"] == {"DynamicQuantizeLSTM": 2, "MatMulInteger": 2} and not int8["still_float"]
    assert "int8: DynamicQuantizeLSTM×2, MatMulInteger×2" in text


def test_quantize_json_is_one_json_document_on_stdout(mnist_copy):
    result = run("quantize", mnist_copy, "--variant", "int8", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # nothing else on stdout
    manifest = load_manifest(mnist_copy)
    by_role = {v["role"]: v for v in doc["variants"]}
    assert set(by_role) == {"onnx_int8", "onnx_step_int8"}
    for role, entry in by_role.items():
        assert entry["coverage"]["size"] == manifest["quantization"][role]["size"]
        assert entry["bytes"] == manifest["files"][role]["bytes"]
        assert entry["verdict"].startswith("int8: ")


def test_quantize_verdict_on_the_users_data(kws_copy, embedding):
    # int8 with --data: judged on the held-out rows (accuracy control keeps nodes float where int8 breaks the budget).
    result = run("quantize", kws_copy, "--variant", "int8", "--data", embedding / "heldout.npz")
    assert result.exit_code == 0, result.output
    cov = load_manifest(kws_copy)["quantization"]["onnx_int8"]
    verdict, size = cov["verdict"], cov["size"]
    assert verdict["ok"] and verdict["metric"] == "accuracy" and verdict["drop"] <= verdict["budget"] == 1.0
    change = round(-verdict["drop"], 2) + 0.0
    assert (f"verdict int8: {size['weight_ratio']:.2f}× the weights of fp32 ({size['weight_bytes']:,} of {size['fp32_weight_bytes']:,} "
            f"bytes) — within its promise on your data: accuracy {verdict['fp32']:.4g} → {verdict['value']:.4g} "
            f"({change:+.2f} pp, budget 1 pp)") in flat(result.output)


# --- 2. coverage from the produced graph: the Embedding's table is int8 ---------------------------------------------


def test_an_embedding_table_quantized_int8_is_reported_int8(kws):
    folder, output = kws
    model = onnx.load(str(folder / "model.int8.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    (gather,) = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits]
    assert inits[gather.input[0]].data_type in (TensorProto.UINT8, TensorProto.INT8)  # what the file holds
    cov = load_manifest(folder)["quantization"]["onnx_int8"]
    assert "Gather" not in cov["still_float"], cov["still_float"]
    assert cov["quantized"]["Gather (int8 weights)"] == 1
    (node,) = [n for n in cov["nodes"] if n["op"] == "Gather"]
    assert node["node"] == gather.name and node["int8"] and node["stored"] in ("uint8", "int8")
    assert node["weight_bytes"] >= inits[gather.input[0]].dims[0] * inits[gather.input[0]].dims[1]
    assert "embed/Gather" in output and "Gather, rows dequantized" in output
    assert "kept float" not in output and "float: Gather" not in output
    # Every weight of the file is int8 but the biases and scales: nothing is reported float.
    assert not cov["still_float"]


# --- 3. re-exports keep the labels and remove the variants of the previous weights -----------------------------------


def test_re_export_into_the_folder_keeps_labels_and_removes_stale_variants(kws_copy, embedding):
    folder = kws_copy
    assert run("quantize", folder, "--variant", "fp16").exit_code == 0
    assert run("ort", folder, "--variant", "int8").exit_code == 0
    stale = ["model.int8.onnx", "model.step.int8.onnx", "model.fp16.onnx", "model.int8.ort", "model.step.int8.ort",
             "required_operators.config"]
    assert all((folder / name).is_file() for name in stale)
    before = load_manifest(folder)
    result = run("export", embedding / "retrained.keras", "--out", folder)
    assert result.exit_code == 0, result.output
    manifest = load_manifest(folder)
    assert manifest["labels"] == list(LABELS)
    assert "kept the previous export's 4 labels" in result.output
    assert manifest["files"]["onnx"]["sha256"] != before["files"]["onnx"]["sha256"]  # the new weights
    assert set(manifest["files"]) == {"onnx", "onnx_step", "keras"}
    assert [name for name in stale if (folder / name).exists()] == []
    text = flat(result.output)
    assert (f"removed model.int8.onnx, model.step.int8.onnx (made from the previous weights) — run edge-rnn quantize {folder} "
            "--variant int8 again") in text
    assert f"run edge-rnn quantize {folder} --variant fp16 again" in text and f"run edge-rnn ort {folder} again" in text
    # The labels are the user's: infer still names the classes.
    x = folder.parent / "x.npy"
    np.save(x, np.load(embedding / "heldout.npz")["ids"][:1])
    result = run("infer", folder / "model.onnx", x)
    assert result.exit_code == 0, result.output
    assert any(label in result.output for label in LABELS)


def test_retrained_weights_saved_over_the_folder_copy_are_exported_in_place(kws_copy, embedding):
    folder = kws_copy
    before = load_manifest(folder)
    shutil.copyfile(embedding / "retrained.keras", folder / "model.keras")
    result = run("export", folder)
    assert result.exit_code == 0, result.output
    manifest = load_manifest(folder)
    assert manifest["labels"] == list(LABELS)
    assert manifest["files"]["keras"]["sha256"] == sha256_file(embedding / "retrained.keras")
    assert manifest["files"]["onnx"]["sha256"] != before["files"]["onnx"]["sha256"]
    assert not (folder / "model.int8.onnx").exists() and "onnx_int8" not in manifest["files"]
    assert "changed since the last export" in result.output and "removed model.int8.onnx" in result.output
    # And again, with nothing changed: the labels stay, nothing is removed.
    result = run("export", folder)
    assert result.exit_code == 0, result.output
    assert load_manifest(folder)["labels"] == list(LABELS) and "removed" not in result.output


def test_labels_that_no_longer_fit_are_dropped_and_said(kws_copy, tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((None,), dtype="int32", name="ids"), keras.layers.Embedding(70, 8),
                              keras.layers.LSTM(8), keras.layers.Dense(3, activation="softmax", name="cls")])
    model.save(tmp_path / "three.keras")
    result = run("export", tmp_path / "three.keras", "--out", kws_copy)
    assert result.exit_code == 0, result.output
    assert "labels" not in load_manifest(kws_copy)
    assert "labels dropped; give --labels FILE" in flat(result.output)


# --- 4. errors that name the real problem and the real next step ----------------------------------------------------


def test_quantize_a_keras_file_says_export_it_first(embedding):
    keras_file = embedding / "first.keras"
    one_line_error(run("quantize", keras_file), "is a Keras model file", f"edge-rnn export {keras_file}")
    one_line_error(run("evaluate", keras_file, "--data", embedding / "heldout.npz"), f"edge-rnn export {keras_file}")
    one_line_error(run("check", keras_file), f"edge-rnn export {keras_file}")
    one_line_error(run("bundle", keras_file, "-o", embedding / "x.tar.gz"), f"edge-rnn export {keras_file}")
    one_line_error(run("verify", keras_file), "is not a bundle", f"edge-rnn export {keras_file}", "edge-rnn bundle")


def test_quantize_a_missing_folder_or_a_model_file(kws, tmp_path):
    one_line_error(run("quantize", tmp_path / "nowhere"), "no such folder", "edge-rnn export MODEL.keras --out")
    one_line_error(run("quantize", kws[0] / "model.onnx"), "is a model file", f"give {kws[0]}")


def test_quantize_before_export_names_the_export_command(mnist_copy):
    manifest = json.loads((mnist_copy / "manifest.json").read_text())
    manifest["files"] = {r: e for r, e in manifest["files"].items() if not r.startswith("onnx")}  # trained, not exported
    (mnist_copy / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(run("quantize", mnist_copy), "lists no 'onnx' file", f"edge-rnn export {mnist_copy}")


def test_ort_names_the_variants_there_are(kws):
    folder = kws[0]
    one_line_error(run("ort", folder, "--variant", "fp61"), "no variant 'fp61'", "it has: fp32, int8")
    one_line_error(run("ort", folder, "--variant", "fp16"), "no fp16 model yet", f"edge-rnn quantize {folder} --variant fp16")


def test_bundle_check_and_verify_name_the_command(kws):
    folder = kws[0]
    one_line_error(run("bundle", folder, "--variant", "fp16", "-o", folder.parent / "b.tar.gz"),
                   "it has: fp32, int8, step, step-int8", f"edge-rnn quantize {folder} --variant fp16")
    # check takes the folder's int8 variant itself (at its bundle bound); a step role it sends to bundle + verify.
    one_line_error(run("check", folder, "--role", "onnx_step_int8"), f"edge-rnn bundle {folder} --variant step-int8",
                   "verify BUNDLE --run", "choose from onnx, onnx_int8")
    one_line_error(run("verify", folder), "is not a bundle", f"edge-rnn bundle {folder} -o kws.tar.gz")


def test_a_changed_variant_names_the_command_that_remakes_it(kws_copy):
    with open(kws_copy / "model.int8.onnx", "ab") as f:
        f.write(b"\0")
    one_line_error(run("bundle", kws_copy, "--variant", "int8", "-o", kws_copy.parent / "b.tar.gz"),
                   "does not match the sha256", f"edge-rnn quantize {kws_copy} --variant int8")


def test_export_of_a_missing_file_answers_before_loading_tensorflow(tmp_path):
    code = ("import sys\nsys.argv = ['edge-rnn', 'export', 'nothere.keras']\nfrom edge_rnn.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('HEAVY=' + ','.join(m for m in ('tensorflow', 'keras', 'onnxruntime', 'onnx') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "HEAVY=\n" in proc.stdout, proc.stdout + proc.stderr
    assert "no file or folder nothere.keras" in proc.stderr and "edge-rnn export MODEL.keras" in proc.stderr


# --- 5. the sweep of every device command's errors: the real problem and the real next step -------------------------


@pytest.fixture()
def x_npy(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((1, LINE), np.int32))
    return path


def test_a_keras_file_given_to_a_device_command_says_export_it(embedding, x_npy):
    keras_file = embedding / "first.keras"
    for args in (("infer", keras_file, x_npy), ("generate", keras_file), ("stream", keras_file, "--input", x_npy)):
        one_line_error(run(*args), "is a Keras model file", f"edge-rnn export {keras_file}")


def test_a_file_that_is_no_model_names_the_folder_or_the_command_that_makes_it(kws, x_npy):
    folder = kws[0]
    one_line_error(run("infer", folder / "model.fp16.onnx", x_npy), "no model file", "model.int8.onnx",
                   f"edge-rnn quantize {folder} --variant fp16")
    one_line_error(run("infer", folder / "model.int8.ort", x_npy), f"edge-rnn ort {folder}")
    one_line_error(run("infer", folder / "manifest.json", x_npy), "is not a model file (.onnx or .ort)", f"give its folder {folder}")
    one_line_error(run("evaluate", folder / "manifest.json", "--data", x_npy), f"give its folder {folder}")


def test_a_folder_trained_but_not_exported_names_the_export(mnist_copy, x_npy):
    manifest = json.loads((mnist_copy / "manifest.json").read_text())
    manifest["files"] = {r: e for r, e in manifest["files"].items() if not r.startswith("onnx")}
    (mnist_copy / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(run("infer", mnist_copy, x_npy), "lists no 'onnx' file", f"edge-rnn export {mnist_copy}")
    one_line_error(run("evaluate", mnist_copy, "--data", x_npy), f"make one with `edge-rnn export {mnist_copy}`")
    one_line_error(run("bundle", mnist_copy, "-o", mnist_copy.parent / "b.tar.gz"),
                   f"export it first: `edge-rnn export {mnist_copy}`, then `edge-rnn quantize {mnist_copy} --variant int8`")
    # ort (was an UnboundLocalError traceback) and bench --budget (was "re-export the folder with edge-rnn").
    one_line_error(run("ort", mnist_copy), "lists no 'onnx' file", f"edge-rnn export {mnist_copy}")
    one_line_error(run("check", mnist_copy), "lists no 'onnx' file", f"edge-rnn export {mnist_copy}")
    one_line_error(run("bench", mnist_copy, "--budget"), "no per-step budget", f"edge-rnn export {mnist_copy}")


def test_stream_of_a_sequence_role_names_the_step_role(kws, x_npy):
    """Was "stream model.step.onnx (its step form) instead", a path a folder or a bundle given with --role cannot take."""
    one_line_error(run("stream", kws[0], "--role", "onnx_int8", "--input", x_npy), "runs whole sequences",
                   "--role onnx_step_int8 (a folder or a bundle), or the file model.step.int8.onnx")


def test_bench_refuses_bad_output_paths_and_a_keras_file_before_measuring(kws, embedding, tmp_path):
    import time

    start = time.monotonic()
    one_line_error(run("bench", kws[0], "--json", tmp_path), "is a folder", f"--json {tmp_path / 'bench.json'}")
    one_line_error(run("bench", kws[0], "--json", tmp_path / "no" / "b.json"), "does not exist", f"mkdir -p {tmp_path / 'no'}")
    one_line_error(run("bench", kws[0], "--plot", tmp_path), "is a folder")
    one_line_error(run("bench", embedding / "first.keras", "--budget"), f"edge-rnn export {embedding / 'first.keras'}")
    one_line_error(run("bench", kws[0] / "model.onnx", "--budget"), f"one file of the model folder {kws[0]}")
    assert time.monotonic() - start < 30  # refused before any row is measured


def test_a_misspelt_role_lists_the_roles_there_are(kws, x_npy):
    folder = kws[0]
    for args in (("infer", folder, x_npy, "--role", "onnx_int9"), ("stream", folder, "--input", x_npy, "--role", "onnx_int9")):
        one_line_error(run(*args), "lists no 'onnx_int9' file", "choose --role from onnx, onnx_step")
    one_line_error(run("infer", folder / "model.onnx", x_npy, "--role", "onnx_int8"), "drop --role")


def test_the_wrong_command_for_a_model_names_the_right_one_with_its_path(mnist_dir, char_dir, x_npy):
    one_line_error(run("generate", mnist_dir), "is a 'classify' model", f"edge-rnn infer {mnist_dir} FILE.npy")
    one_line_error(run("infer", char_dir, x_npy), "is a 'generate' model", f"edge-rnn generate {char_dir} --prime")
    one_line_error(run("sample", mnist_dir), "lists no 'checkpoint' file", "edge-rnn train char-rnn",
                   f"edge-rnn infer {mnist_dir} FILE.npy")
    one_line_error(run("generate", char_dir / "checkpoint.npz"), "is not a model file", f"give its folder {char_dir}")
    one_line_error(run("sample", char_dir / "checkpoint.npz"), "is a file of the model folder", f"give {char_dir}")


def test_a_lost_checkpoint_names_the_training_command(char_dir, tmp_path):
    folder = shutil.copytree(char_dir, tmp_path / "char")
    (folder / "checkpoint.npz").unlink()
    one_line_error(run("sample", folder), "listed in the manifest but missing", f"edge-rnn train char-rnn --out {folder}")


def test_a_bundle_where_a_folder_is_wanted_and_a_file_where_a_bundle_is(kws, x_npy, tmp_path):
    folder = kws[0]
    bundle = tmp_path / "kws.tar.gz"
    assert run("bundle", folder, "-o", bundle).exit_code == 0
    for args in (("sample", bundle), ("bench", bundle, "--quick"), ("ort", bundle)):
        one_line_error(run(*args), "is a bundle", "give the folder the bundle was made from")
    one_line_error(run("generate", bundle), "is a 'keras' model", f"edge-rnn infer {bundle} FILE.npy")
    one_line_error(run("verify", x_npy), "is not a bundle", "edge-rnn bundle DIR -o NAME.tar.gz")


def test_a_folder_given_as_an_input_file(kws, tmp_path):
    folder = kws[0]
    for args in (("infer", folder, tmp_path), ("stream", folder, "--input", tmp_path)):
        one_line_error(run(*args), "is a directory", "give a .npy file")
