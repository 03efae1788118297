"""Multi-worker training on tf.distribute (issue 11), with real worker processes on 127.0.0.1.

Every process here is bounded: workers are started with a deadline and killed when it passes, so a hang fails
the test instead of stopping the suite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edge_rnn.cli import app
from edge_rnn.device.manifest import load_manifest
from test_distribute import free_ports

runner = CliRunner()
EPOCHS = 3
SEED = 0
# A worker process must end within this; the runs below take 20–40 s on a 2-core host.
DEADLINE_S = 300
# TF's C++ logging off, so stderr holds what edge-rnn says.
QUIET = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
# "Comparable" accuracy, two workers vs one process, same seed, epochs and global batch. The runs differ in
# dropout masks (each replica draws its own) and in the order float sums are taken, which is what another seed
# changes too — and after 3 epochs on the 4,000-digit sample one process reaches 64.5 / 67.7 / 71.7 / 76.2 /
# 76.5% held out with seeds 3 / 0 / 4 / 2 / 1 (EMA weights; measured on the AMD EPYC AVX-512 host), two workers
# with seed 0 71.6–71.8%. So "comparable" is: within that 12-point seed-to-seed range (15 points with a margin
# for other hosts' rounding), and both far above chance (10%). An accuracy this noisy only catches gross
# breakage; the exact check of the arithmetic is test_the_loop_takes_the_steps_fit_takes below.
COMPARABLE_PP = 0.15


def worker(index: int, addresses: list[str], out: Path, *extra: str, epochs: int = EPOCHS) -> subprocess.Popen:
    args = ["train", "mnist-lstm", "--data", "sample", "--epochs", str(epochs), "--seed", str(SEED),
            "--strategy", "multi-worker", "--workers", ",".join(addresses), "--index", str(index), "--out", str(out), *extra]
    # Output to a file, not a pipe: a worker blocked on a full pipe would stall the other inside an all-reduce.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-m", "edge_rnn", *args], stdout=log, stderr=subprocess.STDOUT, text=True, env=QUIET)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def threads(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))


def finish(*procs: subprocess.Popen, deadline_s: float = DEADLINE_S, thread_counts: list[int] | None = None) -> list[tuple[int, str]]:
    """(exit code, output) of each process; kills them all and fails if one outlives the deadline.

    With `thread_counts`, the first process's thread count is appended to it every 0.25 s while it runs."""
    end = time.monotonic() + deadline_s
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > end:
                pytest.fail(f"a worker was still running after {deadline_s} s")
            if thread_counts is not None and procs[0].poll() is None:
                thread_counts.append(threads(procs[0].pid))
            time.sleep(0.25)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = []
    for proc in procs:
        proc.log.seek(0)  # type: ignore[attr-defined]
        results.append((proc.returncode, proc.log.read()))  # type: ignore[attr-defined]
        proc.log.close()  # type: ignore[attr-defined]
    return results


def cluster() -> list[str]:
    return [f"127.0.0.1:{port}" for port in free_ports(2)]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """Two workers, 3 epochs on the bundled sample: (chief's folder, worker 1's folder, their outputs, the
    chief's thread count sampled through the run)."""
    root = tmp_path_factory.mktemp("two-workers")
    addresses = cluster()
    procs = [worker(i, addresses, root / f"w{i}") for i in (0, 1)]
    thread_counts: list[int] = []
    results = finish(*procs, thread_counts=thread_counts)
    for code, output in results:
        assert code == 0, output
    return root / "w0", root / "w1", results, thread_counts


def test_two_workers_train_only_the_chief_writes_and_the_manifest_says_how(two_workers):
    chief, other, results, thread_counts = two_workers
    manifest = load_manifest(chief)
    training = dict(manifest["training"])
    seconds = training.pop("epoch_seconds")
    assert training == {
        "strategy": "multi-worker", "workers": 2, "replicas": 2, "global_batch": 32, "per_replica_batch": 16,
        "learning_rate": 1e-3, "resumed_from_epoch": 0, "streamed": False,
    }
    assert len(seconds) == EPOCHS and all(0 < s < DEADLINE_S for s in seconds)
    assert len(manifest["history"]["loss"]) == EPOCHS
    assert sorted(p.name for p in chief.iterdir()) == ["manifest.json", "model.keras"]  # the backups are gone
    assert not other.exists()  # worker 1 wrote nothing that outlived the run
    # Both workers trained the same weights: each scores the held-out split itself and prints it.
    accuracy = manifest["metrics"]["keras_accuracy"]
    assert f"worker 1: held-out accuracy {accuracy:.2%}" in results[1][1]
    # No thread per collective op: with a collective timeout set, TF 2.21 starts one sleeping thread per
    # all-reduce — the chief grew by ~140 threads a second, ~2,000 after these 3 epochs (a full-size run died of
    # it); without, its count stays flat (~127 here; thread pools scale with the host's cores, so the test
    # looks at growth over the second half of the run — several seconds, so ~1,000 with the leak — not at the count).
    late = thread_counts[len(thread_counts) // 2 :]
    assert len(late) > 4 and max(late) - late[0] < 300, thread_counts  # (the count drops as the process exits)


def test_the_chiefs_model_exports_passes_parity_and_matches_one_process(two_workers, tmp_path):
    import shutil

    chief = shutil.copytree(two_workers[0], tmp_path / "chief")  # the fixture's folder stays as training left it
    exported = runner.invoke(app, ["export", str(chief)])
    assert exported.exit_code == 0, exported.output
    parity = load_manifest(chief)["metrics"]["export_parity"]
    for role in ("onnx", "onnx_step"):
        assert parity[role]["probs"]["ok"] and parity[role]["probs"]["max_abs_diff"] < 1e-5, parity
    single = runner.invoke(app, ["train", "mnist-lstm", "--data", "sample", "--epochs", str(EPOCHS), "--seed", str(SEED), "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    one, two = (load_manifest(d)["metrics"]["keras_accuracy"] for d in (tmp_path / "one", chief))
    assert one > 0.55 and two > 0.55, (one, two)
    assert abs(one - two) <= COMPARABLE_PP, (one, two)


def backed_up(out: Path, index: int) -> bool:
    """Worker `index` has backed up epoch 1: its CheckpointManager state file, written after the checkpoint, lists it."""
    try:
        return '"ckpt-1"' in (out / ".train-backup" / f"worker-{index}" / "checkpoint").read_text()
    except OSError:
        return False


def kill_after_first_epoch(tmp_path: Path, victim: int):
    """Two workers; once both have backed up epoch 1, SIGKILL worker `victim`. Return the addresses, both --out
    folders, the survivor's (exit code, output) and the seconds from the kill to the survivor's exit."""
    addresses = cluster()
    out = [tmp_path / "w0", tmp_path / "w1"]
    procs = [worker(i, addresses, out[i]) for i in (0, 1)]
    end = time.monotonic() + DEADLINE_S
    while not all(backed_up(out[i], i) for i in (0, 1)) and time.monotonic() < end and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    assert all(backed_up(out[i], i) for i in (0, 1)), finish(*procs)
    procs[victim].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    results = finish(*procs)
    assert results[victim][0] == -signal.SIGKILL
    return addresses, out, results[1 - victim], time.monotonic() - killed_at


def test_a_killed_worker_resumes_from_its_backup_and_finishes(two_workers, tmp_path):
    addresses, out, (code, output), seconds = kill_after_first_epoch(tmp_path, victim=1)
    # The chief notices (TF's coordination service: worker 1's heartbeats stopped), says so in one line and
    # leaves its backup behind.
    assert code == 1 and seconds < 120, output
    assert "Traceback" not in output
    assert len(error_lines(output)) == 1 and "restart every worker with --resume" in output, output
    assert not (out[0] / "model.keras").exists() and backed_up(out[0], 0)

    procs = [worker(i, addresses, out[i], "--resume") for i in (0, 1)]
    for code, output in finish(*procs):
        assert code == 0, output
    manifest = load_manifest(out[0])
    assert manifest["training"]["resumed_from_epoch"] >= 1
    assert len(manifest["history"]["loss"]) == EPOCHS
    assert not (out[0] / ".train-backup").exists() and not out[1].exists()
    # Resumed from the backup (weights, optimizer, step count, EMA, dropout seeds) with each epoch's data order
    # rebuilt from the seed: the same weights as the unbroken two-worker run.
    import keras

    chief = two_workers[0]
    weights = [keras.saving.load_model(d / "model.keras", compile=False).get_weights() for d in (out[0], chief)]
    worst = max(float(np.abs(a - b).max()) for a, b in zip(*weights))
    assert worst <= 1e-5, worst
    history = [load_manifest(d)["history"]["loss"] for d in (out[0], chief)]
    np.testing.assert_allclose(history[0], history[1], rtol=1e-5)


def test_a_killed_chief_stops_the_other_worker_with_one_line(tmp_path):
    """The chief also hosts TF's coordination service: when it dies, worker 1 must still stop, not hang."""
    _, out, (code, output), seconds = kill_after_first_epoch(tmp_path, victim=0)
    assert code == 1 and seconds < 120, output
    assert "Traceback" not in output
    assert len(error_lines(output)) == 1 and "worker 1: lost contact" in output, output
    assert backed_up(out[1], 1)  # its backup stays for --resume


def test_a_cluster_nobody_answers_on_is_a_clear_error_not_a_hang(tmp_path):
    addresses = cluster()  # nobody listens on the second address
    start = time.monotonic()
    [(code, output)] = finish(worker(0, addresses, tmp_path / "w0", "--connect-timeout", "3"), deadline_s=60)
    assert code == 1 and time.monotonic() - start < 60, output
    assert "Traceback" not in output
    [line] = error_lines(output)
    assert f"no answer from {addresses[1]} within 3 s" in line, output
    assert not (tmp_path / "w0" / "model.keras").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--strategy", "parameter-server"], "--strategy 'parameter-server': choose default | mirrored | multi-worker"),
    (["--workers", "h:1,h:2", "--index", "0"], "add --strategy multi-worker"),
    (["--stream"], "add --strategy mirrored"),
    (["--strategy", "mirrored", "--stream"], "--stream reads files, and --data 'sample' is neither an IDX folder nor an .npz"),
    (["--strategy", "multi-worker", "--workers", "h:1,h:2", "--index", "2"], "--index must be 0…1"),
])
def test_bad_strategy_flags_are_one_line_errors(tmp_path, args, fragment, monkeypatch):
    from conftest import one_line_error

    monkeypatch.delenv("TF_CONFIG", raising=False)
    result = runner.invoke(app, ["train", "mnist-lstm", "--data", "sample", "--epochs", "1", "--out", str(tmp_path / "m"), *args])
    one_line_error(result, fragment)
    assert not (tmp_path / "m" / "model.keras").exists()


SAME_STEPS = """
import sys
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from edge_rnn.config import LstmConfig
from edge_rnn.train.data import load_sample
from edge_rnn.train.distribute import fit_classifier
from edge_rnn.train.lstm import train_batches, build_model, preprocess

digits = load_sample()
digits.x_train, digits.y_train = digits.x_train[:512], digits.y_train[:512]
cfg = LstmConfig(units=16, dense=8, dropout=0.0, epochs=2, batch_size=32, steps_per_execution=1)
batches = train_batches(digits, cfg, cfg.batch_size)
validation = (preprocess(digits.x_test[:100]), digits.y_test[:100].astype(np.int64))
tf.config.experimental.enable_op_determinism()
model = build_model(cfg, train_samples=512)
model.fit(batches(0).concatenate(batches(1)), epochs=1, verbose=0)  # fit() swaps the EMA weights in at its end
reference = model.get_weights()
for devices in (["/cpu:0"], ["/cpu:0", "/cpu:1"]):
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        model = build_model(cfg, train_samples=512)
    # argv[1] scales the batch the loss is divided by: 1 is right, anything else is the classic bug.
    fit_classifier(strategy, model, batches=batches, global_batch=int(cfg.batch_size * float(sys.argv[1])),
                   steps_per_epoch=16, steps_per_call=int(sys.argv[2]), validation=validation, epochs=cfg.epochs)
    print(len(devices), max(float(np.abs(a - b).max()) for a, b in zip(reference, model.get_weights())))
"""


@pytest.mark.parametrize("loss_scale, steps_per_call", [(1.0, 1), (1.0, 5), (2.0, 5)])
def test_the_loop_takes_the_steps_fit_takes(loss_scale, steps_per_call):
    """The distributed loop on one replica and on two (two logical CPUs, one global batch split in halves) ends
    at Keras fit()'s weights, given the same batches, without dropout: the loss is divided by the global batch,
    the gradients summed over replicas, the schedule and EMA are fit()'s, one step per call into the graph or
    several (16 steps as 5 + 5 + 5 + 1). Measured: 0.0 (one replica) and 6e-8 (two). Dividing the loss by a wrong batch (x2) moves the weights by 7.6e-4 even through Adam's scale
    invariance — the test shows that failing."""
    done = subprocess.run([sys.executable, "-c", SAME_STEPS, str(loss_scale), str(steps_per_call)], capture_output=True, text=True,
                          env=QUIET, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr
    worst = {int(n): float(d) for n, d in (line.split() for line in done.stdout.strip().splitlines())}
    assert set(worst) == {1, 2}
    if loss_scale == 1.0:
        assert worst[1] <= 1e-6 and worst[2] <= 1e-5, worst
    else:
        assert min(worst.values()) > 1e-4, worst


# --- streaming from IDX files ---------------------------------------------------------------------------

def idx_folder(folder: Path, digits, *, gz: bool, train: int = 4000) -> Path:
    from test_data import _write_idx

    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for stem, x, y in (("train", digits.x_train[:train], digits.y_train[:train]), ("t10k", digits.x_test, digits.y_test)):
        _write_idx(folder / f"{stem}-images-idx3-ubyte{suffix}", x, gz=gz)
        _write_idx(folder / f"{stem}-labels-idx1-ubyte{suffix}", y, gz=gz)
    return folder


@pytest.mark.parametrize("source", ["idx.gz", "idx", "npz"])
def test_streamed_batches_are_the_in_memory_batches(tmp_path, digits, source):
    """Streamed from IDX files (.gz or raw) or from an uncompressed .npz, the training images are never loaded,
    and each epoch's batches equal the in-memory pipeline's: same records, same seeded order while the set fits
    the shuffle buffer."""
    from edge_rnn.config import LstmConfig
    from edge_rnn.train.data import load_digits
    from edge_rnn.train.lstm import train_batches

    if source == "npz":
        data = tmp_path / "mnist.npz"
        np.savez(data, x_test=digits.x_test, y_test=digits.y_test, x_train=digits.x_train[:1024], y_train=digits.y_train[:1024])
    else:
        data = idx_folder(tmp_path, digits, gz=source == "idx.gz", train=1024)
    streamed = load_digits(str(data), stream=True)
    assert streamed.x_train.shape == (0, 28, 28) and len(streamed.y_train) == 1024 and streamed.train_images
    assert streamed.describe()["streamed_from"] == str(streamed.train_images.path)
    in_memory = load_digits(str(data))
    cfg = LstmConfig(seed=5)
    for epoch in (0, 1):
        a = list(train_batches(streamed, cfg, 64)(epoch).as_numpy_iterator())
        b = list(train_batches(in_memory, cfg, 64)(epoch).as_numpy_iterator())
        assert len(a) == len(b) == 16
        for (xa, ya), (xb, yb) in zip(a, b):
            assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    first = [y for _, y in train_batches(streamed, cfg, 64)(0).as_numpy_iterator()]
    second = [y for _, y in train_batches(streamed, cfg, 64)(1).as_numpy_iterator()]
    assert not all(np.array_equal(p, q) for p, q in zip(first, second))  # each epoch has its own order
    assert sorted(np.concatenate(first).tolist()) == sorted(digits.y_train[:1024].tolist())


def test_an_npz_that_cannot_stream_says_why(tmp_path, digits):
    from edge_rnn.train.data import load_digits
    from edge_rnn.errors import DataError

    arrays = {"x_train": digits.x_train[:64], "y_train": digits.y_train[:64], "x_test": digits.x_test[:8], "y_test": digits.y_test[:8]}
    np.savez_compressed(tmp_path / "packed.npz", **arrays)
    with pytest.raises(DataError, match="x_train is compressed .* cannot be streamed — save it with np.savez"):
        load_digits(str(tmp_path / "packed.npz"), stream=True)
    np.savez(tmp_path / "floats.npz", **{**arrays, "x_train": arrays["x_train"].astype(np.float32)})
    with pytest.raises(DataError, match="x_train is float32; streaming reads uint8"):
        load_digits(str(tmp_path / "floats.npz"), stream=True)
    np.savez(tmp_path / "split.npz", x=digits.x_train[:64], y=digits.y_train[:64])
    with pytest.raises(DataError, match="cannot stream x_train"):
        load_digits(str(tmp_path / "split.npz"), stream=True)


def test_a_truncated_streamed_file_is_refused_before_training(tmp_path, digits):
    import gzip

    folder = idx_folder(tmp_path, digits, gz=True, train=200)
    images = folder / "train-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-784]))
    from conftest import one_line_error

    result = runner.invoke(app, ["train", "mnist-lstm", "--data", str(folder), "--stream", "--strategy", "mirrored",
                                 "--epochs", "1", "--out", str(tmp_path / "m")])
    one_line_error(result, "truncated or corrupt")
    assert not (tmp_path / "m" / "model.keras").exists()


def test_mirrored_training_streams_an_idx_folder_end_to_end(tmp_path, digits):
    folder = idx_folder(tmp_path / "idx", digits, gz=True)
    result = runner.invoke(app, ["train", "mnist-lstm", "--data", str(folder), "--stream", "--strategy", "mirrored",
                                 "--epochs", "2", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "m")
    assert manifest["training"]["strategy"] == "mirrored" and manifest["training"]["streamed"] is True
    assert manifest["data"]["train"] == 4000 and len(manifest["history"]["loss"]) == 2
    # Two epochs on 4,000 digits, seed 0: 53.5% with fit(), 50.9% with the loop, 57.0% on two workers; chance is 10%.
    assert manifest["metrics"]["keras_accuracy"] > 0.35
    assert not (tmp_path / "m" / ".train-backup").exists()


def test_the_learning_rate_is_square_root_scaled_with_the_global_batch():
    from edge_rnn.config import LstmConfig
    from edge_rnn.train.lstm import learning_rate

    assert learning_rate(LstmConfig()) == pytest.approx(1e-3)
    assert learning_rate(LstmConfig(batch_size=64)) == pytest.approx(1e-3 * 2**0.5)
    assert learning_rate(LstmConfig(batch_size=128)) == pytest.approx(2e-3)


def test_epoch_backups_restore_what_was_saved_and_refuse_a_missing_epoch(tmp_path):
    from edge_rnn.config import LstmConfig
    from edge_rnn.train.distribute import EpochBackup
    from edge_rnn.errors import EdgeRnnError
    from edge_rnn.train.lstm import build_model

    cfg = LstmConfig(units=8, dense=4)
    model = build_model(cfg, train_samples=64)
    model.optimizer.build(model.trainable_variables)
    backup = EpochBackup(tmp_path, worker=1, model=model, optimizer=model.optimizer, resume=False)
    saved = [w.copy() for w in model.get_weights()]
    seeds = [np.array(v.value) for v in model.variables if "seed_generator" in v.path]
    assert len(seeds) >= 3  # one per Dropout layer (and LSTM): in the backup, so a resumed run draws the same masks
    for epoch in (1, 2, 3):
        backup.save(epoch, {"loss": [0.5, 0.4, 0.3][:epoch]})
    assert backup.epochs() == [2, 3]  # the last two
    model.set_weights([w + 1 for w in saved])
    for v in model.variables:
        if "seed_generator" in v.path:
            v.assign(v.value + 7)
    assert backup.restore(2) == {"loss": [0.5, 0.4]}  # the history is cut at the epoch restored
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), saved))
    assert all(np.array_equal(np.array(v.value), s) for v, s in zip((v for v in model.variables if "seed_generator" in v.path), seeds))
    with pytest.raises(EdgeRnnError, match="has no backup of epoch 1, the newest every worker has"):
        backup.restore(1)
    fresh = EpochBackup(tmp_path, worker=1, model=model, optimizer=model.optimizer, resume=False)
    assert fresh.epochs() == [] and not (tmp_path / "worker-1").exists()  # a fresh run starts clean
