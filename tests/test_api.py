"""The public Python API (edge_rnn.load / Model / Stream) on real models: folders, files and bundles of the built-ins
and of users' Keras models; 64 streams started, reset and skipped at different steps against each stream alone; int8
answers independent of their batch neighbours; one-line errors; the README's example run as written; no TensorFlow."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import edge_rnn
from edge_rnn.cli import app
from edge_rnn.device.runtime import infer
from edge_rnn.device.session import create_session

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
# A stream stepped beside others (fp32, a sub-batch of the same kernels) vs the same stream stepped alone.
FP32_STREAM_ATOL = 1e-6


def _bundle(folder: Path, out: Path, *variants: str) -> Path:
    from edge_rnn.bundle import make_bundle

    return make_bundle(folder, variants=variants, out=out)


def _one_line(exc_info, *fragments: str) -> str:
    message = str(exc_info.value)
    assert isinstance(exc_info.value, edge_rnn.EdgeRnnError) and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture(scope="module")
def mnist_bundle(mnist_dir, tmp_path_factory) -> Path:
    return _bundle(mnist_dir, tmp_path_factory.mktemp("api-bundles") / "mnist.tar.gz", "int8", "step-int8", "step")


# ---------------------------------------------------------------------------------------------
# load: folder, file, bundle; predict equals infer


def test_load_a_folder_a_file_and_a_bundle(mnist_dir, mnist_bundle, digits, tmp_path):
    folder, file, bundle = edge_rnn.load(mnist_dir), edge_rnn.load(mnist_dir / "model.int8.onnx"), edge_rnn.load(mnist_bundle)
    assert (folder.role, file.role, bundle.role) == ("onnx", "onnx_int8", "onnx_int8")
    assert (folder.rows_alone, file.rows_alone, bundle.rows_alone) == (False, True, True)
    for model in (folder, file, bundle):
        assert [(i.name, i.dtype, i.shape) for i in model.inputs] == [("input", np.float32, ("batch", 28, 28))]
        assert [o.name for o in model.outputs] == ["probs"] and model.labels == [str(i) for i in range(10)]
    pixels = digits.x_test[:100]
    np.save(tmp_path / "d.npy", pixels)
    for model, path in ((folder, mnist_dir / "model.onnx"), (file, mnist_dir / "model.int8.onnx"), (bundle, mnist_bundle)):
        probs = model.predict(pixels)["probs"]
        assert probs.shape == (100, 10) and np.mean(probs.argmax(1) == digits.y_test[:100]) >= 0.75
        # uint8 pixels get the manifest's scaling; floats already in [0, 1] are taken as they are; infer agrees.
        scaled = pixels.astype(np.float32) * np.float32(model.manifest["preprocessing"]["scale"])
        np.testing.assert_array_equal(model.predict(scaled)["probs"], probs)
        shown = [p.probability for p in infer(path, [tmp_path / "d.npy"]).predictions]
        np.testing.assert_array_equal(shown, probs.max(1))
    np.testing.assert_array_equal(bundle.predict(pixels)["probs"], file.predict(pixels)["probs"])  # the same bytes
    assert bundle.stream().role == "onnx_step_int8" and folder.stream().role == "onnx_step"  # the step twin
    assert bundle.stream(role="onnx_step").role == "onnx_step"
    report = bundle.self_test()
    assert report.ok and {r.role for r in report.results} == {"onnx_int8", "onnx_step_int8", "onnx_step"}
    with pytest.raises(edge_rnn.InputError) as exc:
        folder.self_test()
    _one_line(exc, "model folder", "edge-rnn bundle")


def test_predict_equals_infer_on_users_models(user_models, tmp_path):
    for name, (folder, data) in user_models.items():
        with np.load(data) as npz:
            x = npz["ids" if "ids" in npz.files else "x"][:24]
        np.save(tmp_path / f"{name}.npy", x)
        for role, file in (("onnx", "model.onnx"), ("onnx_int8", "model.int8.onnx")):
            got = edge_rnn.load(folder, role=role).predict(x)
            result = runner.invoke(app, ["infer", str(folder / file), str(tmp_path / f"{name}.npy"), "--json"])
            assert result.exit_code == 0, result.output
            outputs = json.loads(result.output)["outputs"]
            assert sorted(outputs) == sorted(got)
            for out, values in outputs.items():
                np.testing.assert_allclose(got[out], np.array(values), atol=1e-6, rtol=0)


def test_users_keras_model_as_folder_file_and_bundle(user_models, tmp_path):
    folder, data = user_models["text"]
    with np.load(data) as npz:
        ids = npz["ids"][:8]
    bundle = edge_rnn.load(_bundle(folder, tmp_path / "text.tar.gz", "int8", "step-int8"))
    assert bundle.self_test().ok
    file = edge_rnn.load(folder / "model.int8.onnx")
    np.testing.assert_array_equal(bundle.predict(ids)["next_char"], file.predict(ids)["next_char"])
    # Stepping the step model over each line (8 streams at once, post-padded ids) gives the sequence model's answers.
    stream = edge_rnn.load(folder).stream(streams=8)
    whole = edge_rnn.load(folder).predict(ids)["next_char"]  # (8, T, V)
    lengths = (ids != 0).sum(1)
    for t in range(int(lengths.max())):
        live = np.flatnonzero(lengths > t)
        out = stream.step(ids[live, t], slots=live)["next_char"]  # (n, 1, V)
        np.testing.assert_allclose(out[:, 0], whole[live, t], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# int8: a row's answer does not depend on its neighbours


def test_int8_answers_do_not_depend_on_their_batch_neighbours(user_models):
    """The users' digit classifier (int8): each of 8 digits alone, beside 63 digits ×3 louder, and beside 63 quiet
    ones (×0.2). A plain batched onnxruntime call moves the answers (so this test can fail); the API's do not move."""
    folder, data = user_models["digits"]
    with np.load(data) as npz:
        x = npz["x"][:72]
    targets, others = x[:8], x[8:71]
    session = create_session(folder / "model.int8.onnx", threads=1)
    model = edge_rnn.load(folder / "model.int8.onnx")
    assert model.rows_alone
    moved = 0.0
    for one in targets:
        alone = session.run(None, {"rows": one[None]})[0][0]
        for neighbours in (others * np.float32(3), others * np.float32(0.2)):
            batch = np.concatenate([one[None], neighbours])
            moved = max(moved, float(np.abs(session.run(None, {"rows": batch})[0][0] - alone).max()))
            np.testing.assert_array_equal(model.predict(batch)["digit"][0], alone)
    assert moved > 1e-2, moved
    # The step model, 64 streams stepped together: stream 0 answers as it does alone, beside loud or quiet streams.
    stream = edge_rnn.load(folder, role="onnx_int8").stream(streams=64)
    single = edge_rnn.load(folder, role="onnx_int8").stream()
    assert stream.role == "onnx_step_int8" and stream.rows_alone
    for neighbours in (others * np.float32(3), others * np.float32(0.2)):
        stream.reset()
        single.reset()
        batch = np.concatenate([targets[:1], neighbours])
        for t in range(28):
            together = stream.step(batch[:, t])["digit"][0]
            np.testing.assert_array_equal(together, single.step(targets[:1, t])["digit"][0])


# ---------------------------------------------------------------------------------------------
# 64 streams: started, reset and skipped at different steps == each stream alone


def _schedule(streams: int, steps: int):
    """Per global step: the slots stepped and the slots reset before it. Stream s starts at step s % 5, skips the odd
    steps where (t + s) % 7 == 0, and (every fourth stream) is reset at step 10 + s % 9; even steps from 6 on step all."""
    plan = []
    for t in range(steps):
        reset = [s for s in range(streams) if s % 4 == 0 and t == 10 + s % 9]
        stepped = [s for s in range(streams) if t >= s % 5 and not (t % 2 == 1 and (t + s) % 7 == 0)]
        plan.append((reset, stepped))
    return plan


@pytest.mark.parametrize("role", ["onnx_step", "onnx_step_int8"])
def test_64_streams_equal_each_stream_alone(mnist_dir, digits, role):
    streams, steps = 64, 34
    model = edge_rnn.load(mnist_dir)
    many = model.stream(streams=streams, role=role)
    rows = digits.x_test[:streams]  # stream s reads digit s row by row (uint8 pixels), from row 0 after a reset
    position = np.zeros(streams, int)
    got: dict[int, list[np.ndarray]] = {s: [] for s in range(streams)}
    events: dict[int, list[str]] = {s: [] for s in range(streams)}
    full_steps = 0
    for reset, stepped in _schedule(streams, steps):
        if reset:
            many.reset(reset)
            position[reset] = 0
            for s in reset:
                events[s].append("reset")
        idle = [s for s in range(streams) if s not in stepped]
        before = many.state(idle) if idle else None
        frames = rows[stepped, position[stepped] % 28]  # (n, 28)
        out = many.step(frames, slots=None if not idle else stepped)["probs"]
        full_steps += not idle
        if idle:  # the streams not stepped keep their state bit for bit
            after = many.state(idle)
            assert all(np.array_equal(before[k], after[k]) for k in before)
        for i, s in enumerate(stepped):
            got[s].append(out[i])
            events[s].append("step")
        position[stepped] += 1
    assert full_steps >= 10  # the all-streams path (IOBinding) ran too
    alone = model.stream(role=role)
    for s in range(streams):
        alone.reset()
        answers, position_s = [], 0
        for event in events[s]:
            if event == "reset":
                alone.reset()
                position_s = 0
                continue
            answers.append(alone.step(rows[s, position_s % 28])["probs"][0])
            position_s += 1
        if role == "onnx_step_int8":
            np.testing.assert_array_equal(np.array(got[s]), np.array(answers))
        else:
            np.testing.assert_allclose(np.array(got[s]), np.array(answers), atol=FP32_STREAM_ATOL, rtol=0)


def test_state_checkpoint_and_migration(mnist_dir, digits):
    model = edge_rnn.load(mnist_dir)
    a, b = model.stream(streams=8), model.stream(streams=3)
    x = digits.x_test[:8]
    for t in range(10):
        a.step(x[:, t])
    saved = a.state([5])
    assert set(saved) == {t.name for t in a.state_tensors} and all(v.shape == (1, 128) for v in saved.values())
    b.set_state(saved, slots=[2])  # stream 5 of `a` moves to slot 2 of `b`
    for t in range(10, 28):
        moved = b.step(x[5:6, t], slots=[2])["probs"]
        np.testing.assert_array_equal(moved, a.step(x[:, t])["probs"][5:6])
    checkpoint = a.state()
    a.reset()
    assert not any(v.any() for v in a.state().values())
    a.set_state(checkpoint)
    assert all(np.array_equal(a.state()[k], v) for k, v in checkpoint.items())


def test_char_rnn_streams_and_predict(char_dir, tmp_path):
    model = edge_rnn.load(_bundle(char_dir, tmp_path / "char.tar.gz", "fp32", "int8"))
    assert model.role == "onnx" and not model.rows_alone and model.self_test().ok
    ids = np.random.default_rng(0).integers(0, len(model.manifest["vocab"]), (6, 12))
    whole = model.predict(ids)  # the char RNN's file takes h0 (zeros unless given) and returns h
    stream = model.stream(streams=6)  # the same file steps: it takes the state itself
    assert stream.role == "onnx"
    for t in range(12):
        out = stream.step(ids[:, t])
    np.testing.assert_allclose(out["logits"][:, 0], whole["logits"][:, -1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(stream.state()["h0"], whole["h"], atol=1e-5, rtol=0)
    h0 = np.full((6, whole["h"].shape[1]), 0.1, np.float32)
    assert not np.allclose(model.predict(ids, h0=h0)["h"], whole["h"])


# ---------------------------------------------------------------------------------------------
# Errors: EdgeRnnError subclasses, one line each


def test_errors_are_one_line(mnist_dir, user_models, tmp_path):
    model = edge_rnn.load(mnist_dir)
    stream = model.stream(streams=4)
    # The state names follow Keras' layer names (state.lstm.h, or state.lstm_3.h where other LSTMs were built first).
    h_name = next(name for name in stream.state() if name.endswith(".h"))
    cases = [
        (lambda: model.predict(np.zeros((2, 28, 27), np.uint8)), ("shape (2, 28, 27)", "(batch, 28, 28)")),
        (lambda: model.predict(np.full((1, 28, 28), 2.0)), ("[0, 1]",)),
        (lambda: model.predict(pixels=np.zeros((1, 28, 28), np.uint8)), ("unknown input 'pixels'", "input")),
        (lambda: model.predict(), ("no array for input 'input'",)),
        (lambda: stream.step(np.zeros((4, 27), np.float32)), ("shape (4, 27)",)),
        (lambda: stream.step(np.zeros((3, 28), np.float32)), ("3 rows for 4 stream(s)",)),
        (lambda: stream.step(np.zeros((1, 28), np.float32), slots=[4]), ("slot 4 is out of range", "slots 0–3")),
        (lambda: stream.step(np.zeros((2, 28), np.float32), slots=[1, 1]), ("slot 1 appears twice",)),
        (lambda: stream.step(frame=np.zeros((4, 28), np.float32)), ("unknown input 'frame'",)),
        (lambda: stream.reset([-1]), ("slot -1 is out of range",)),
        (lambda: stream.set_state({h_name[:-1] + "x": np.zeros((4, 128))}), ("unknown state tensor",)),
        (lambda: stream.set_state({h_name: np.full((4, 128), np.nan)}), ("NaN",)),
        (lambda: model.stream(streams=0), ("streams must be",)),
        (lambda: edge_rnn.load(tmp_path / "nope.onnx"), ("no model file",)),
        (lambda: edge_rnn.load(mnist_dir, role="onnx_fp16"), ("lists no 'onnx_fp16' file", f"edge-rnn quantize {mnist_dir} --variant fp16")),
        (lambda: edge_rnn.load(mnist_dir / "model.onnx", role="onnx_int8"), ("drop --role",)),
        (lambda: model.self_test(), ("bundle",)),
    ]
    for call, fragments in cases:
        with pytest.raises(edge_rnn.EdgeRnnError) as exc:
            call()
        _one_line(exc, *fragments)
    text = edge_rnn.load(user_models["text"][0]).stream(streams=2)
    text.step(np.array([3, 0]))  # stream 1 pads
    with pytest.raises(edge_rnn.InputError) as exc:
        text.step(np.array([4, 5]))
    _one_line(exc, "stream 1", "post-padded")
    text.reset([1])
    text.step(np.array([4, 5]))  # a reset stream starts a new sequence
    with pytest.raises(edge_rnn.InputError) as exc:
        edge_rnn.load(user_models["text"][0]).predict(np.array([[0, 3, 4]]))
    _one_line(exc, "post-padded")


# ---------------------------------------------------------------------------------------------
# The device path: no TensorFlow, and `import edge_rnn` stays cheap


DEVICE_SCRIPT = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"tensorflow", "tf2onnx", "keras", "onnx"}:
                raise ImportError(f"{name} is not installed on this device")
    sys.meta_path.insert(0, _Block())
    import numpy as np
    import edge_rnn
    assert "onnxruntime" not in sys.modules, "import edge_rnn loaded onnxruntime"
    model = edge_rnn.load(sys.argv[1])
    assert model.self_test().ok
    x = np.load(sys.argv[2])
    probs = model.predict(x)["probs"]
    stream = model.stream(streams=len(x))
    for t in range(28):
        out = stream.step(x[:, t])
    stream.reset([0])
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"tensorflow", "tf2onnx", "keras", "onnx"})
    print(f"HEAVY_MODULES={','.join(heavy)}")
    print(f"LABELS={','.join(str(int(i)) for i in probs.argmax(1))}")
    """
)


def test_the_api_runs_without_tensorflow(mnist_bundle, digits, tmp_path):
    np.save(tmp_path / "x.npy", digits.x_test[:8])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, str(mnist_bundle), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY_MODULES=\n" in proc.stdout
    labels = [int(v) for v in proc.stdout.split("LABELS=")[1].strip().split(",")]
    assert labels == list(edge_rnn.load(mnist_bundle).predict(digits.x_test[:8])["probs"].argmax(1))


# ---------------------------------------------------------------------------------------------
# The README's "Use it from Python" section runs as written


def _readme_examples() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Use it from Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)\n```", section, flags=re.S)


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    """A sensor classifier (LSTM over 6 channels → walk/run/sit) bundled as sensor.tar.gz in a temporary folder: the
    README's blocks are executed there, in order, in one namespace."""
    keras = pytest.importorskip("keras")
    from edge_rnn.exporter import export
    from edge_rnn.quantize import quantize

    keras.utils.set_random_seed(0)
    keras.Sequential([keras.Input((None, 6), name="sensor"), keras.layers.LSTM(12),
                      keras.layers.Dense(3, activation="softmax", name="activity")]).save(tmp_path / "sensor.keras")
    (tmp_path / "labels.txt").write_text("walk\nrun\nsit\n")
    export(tmp_path / "sensor.keras", out=tmp_path / "sensor", labels=tmp_path / "labels.txt")
    quantize(tmp_path / "sensor", variants=("int8",))
    _bundle(tmp_path / "sensor", tmp_path / "sensor.tar.gz", "int8", "step-int8")
    blocks = _readme_examples()
    assert len(blocks) >= 2 and "edge_rnn.load" in blocks[0] and "slots=" in blocks[1]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example code
    assert namespace["report"].ok and namespace["stream"].streams == 1 and namespace["gateway"].streams == 256
    assert "self-test ok" in capsys.readouterr().out
