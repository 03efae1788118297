"""Training on tf.distribute: the cluster (TF_CONFIG, a bounded wait for peers), the strategy, and a training loop.

tensorflow is imported only inside functions. TF's own start-up waits for absent peers without a deadline, so
reachability is checked first with plain sockets.

Why a loop of our own instead of `model.fit()`: with Keras 3.15 + TF 2.21, fit() under
MultiWorkerMirroredStrategy fails with two real workers (`strategy.reduce` on the (x, y) pair while building,
then "Invalid reduction dimension 0" on the scalar loss — tensorflow/tensorflow#72388). The loop below is
TensorFlow's documented custom-loop recipe: `strategy.run` per replica, the loss summed and divided by the
global batch, gradients all-reduced by the Keras optimizer, epoch sums in ON_READ variables. For the same reason
`keras.callbacks.BackupAndRestore` (a fit() callback) is replaced by a `tf.train.CheckpointManager` per worker.
One process trains with the same loop under TensorFlow's default strategy (lstm.train): each epoch's batches are
`lstm.train_batches(epoch)` (seeded shuffle and augmentation) for one process and for many, which fit() cannot
take epoch by epoch; on the same batches the loop ends at fit()'s weights (tests/test_multi_worker.py).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import CONNECT_TIMEOUT_S, MAX_TF_CONFIG_BYTES
from ..device.bounded import parse_json_bounded, read_json_capped, size_text
from ..device.manifest import MAX_MANIFEST_BYTES
from ..errors import EdgeRnnError, require

STRATEGIES = ("default", "mirrored", "multi-worker")

# No timeout on collectives (gradient all-reduce): TF 2.21 starts one thread per collective op to enforce it,
# which sleeps out the whole timeout — measured +140 threads a second on two workers, and a full-size run with
# 600 s died of it ("std::system_error: Resource temporarily unavailable" when no more threads could start; with
# 60 s, 2 of 3 runs had an all-reduce stall for a minute). A dead worker is caught without it: TF's coordination
# service (on the chief) notices its heartbeats stopping and aborts every collective — 1–11 s in timed kills;
# a killed chief is noticed too (tests/test_multi_worker.py).
COLLECTIVE_TIMEOUT_S = None
# Every worker keeps its last two epoch checkpoints: a worker killed between its last step and its save is
# one epoch behind the others, and all resume from the newest epoch every one of them has.
BACKUPS_KEPT = 2


@dataclass(frozen=True)
class Cluster:
    """The workers' host:port addresses and this process's index among them (0 is the chief)."""

    workers: tuple[str, ...]
    index: int

    @property
    def is_chief(self) -> bool:
        return self.index == 0


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise EdgeRnnError(f"worker address {address!r} is not host:port with a port 1–65535 — e.g. 10.0.0.2:12345")
    return host, int(port)


class PeerLostError(EdgeRnnError):
    """Another worker died or stopped answering mid-training: restart every worker with --resume."""


def resolve_cluster(*, workers: str | None = None, index: int | None = None) -> Cluster:
    """The cluster from `--workers host:port,… --index N`, else from the TF_CONFIG environment variable."""
    if workers:
        addresses = tuple(a.strip() for a in workers.split(",") if a.strip())
        if index is None or not 0 <= index < len(addresses):
            raise EdgeRnnError(f"--index must be 0…{len(addresses) - 1} for {len(addresses)} --workers")
    else:
        raw = os.environ.get("TF_CONFIG")
        if not raw:
            raise EdgeRnnError("multi-worker needs a cluster: set TF_CONFIG or pass --workers host:port,host:port --index N")
        size = len(raw.encode("utf-8", errors="replace"))
        if size > MAX_TF_CONFIG_BYTES:
            raise EdgeRnnError(f"TF_CONFIG is {size_text(size)}, over the {size_text(MAX_TF_CONFIG_BYTES)} cap (MAX_TF_CONFIG_BYTES) "
                               "— list only the workers, or pass --workers")
        config = parse_json_bounded(raw, where="TF_CONFIG", error=EdgeRnnError,
                                    hint='give {"cluster": {"worker": [...]}, "task": {"index": N}}')
        try:
            addresses = tuple(config["cluster"]["worker"])
            index = int(config["task"]["index"])
            jobs = sorted(set(config["cluster"]) - {"worker"} | ({config["task"].get("type", "worker")} - {"worker"}))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EdgeRnnError(f"TF_CONFIG is not {{\"cluster\": {{\"worker\": [...]}}, \"task\": {{\"index\": N}}}} ({exc})") from exc
        if jobs:
            raise EdgeRnnError(
                f"TF_CONFIG has {', '.join(jobs)} tasks; multi-worker training uses workers only — list every machine "
                "under cluster.worker (worker 0 is the chief)"
            )
        if not 0 <= index < len(addresses):
            raise EdgeRnnError(f"TF_CONFIG task index {index} is outside its {len(addresses)} workers")
    for address in addresses:
        _split_address(address)
    return Cluster(addresses, index)


def tf_config(cluster: Cluster) -> dict[str, Any]:
    """TF_CONFIG for `cluster`: every worker gets the same `cluster` and its own `task`."""
    return {"cluster": {"worker": list(cluster.workers)}, "task": {"type": "worker", "index": cluster.index}}


def wait_for_peers(cluster: Cluster, *, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Block until every other worker accepts a TCP connection; raise EdgeRnnError after `timeout_s`.

    TF's own start-up waits for peers without a deadline. Each worker listens on its own port meanwhile, so
    workers waiting for each other see each other; TF's server takes the port over right after."""
    host, port = _split_address(cluster.workers[cluster.index])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", port))
        listener.listen()
    except OSError as exc:
        listener.close()
        raise EdgeRnnError(f"cannot listen on {host}:{port} for worker {cluster.index} ({exc.strerror}) — pick a free port") from exc
    deadline = time.monotonic() + timeout_s
    waiting = [a for i, a in enumerate(cluster.workers) if i != cluster.index]
    try:
        while waiting:
            peer_host, peer_port = _split_address(waiting[0])
            try:
                with socket.create_connection((peer_host, peer_port), timeout=1.0):
                    waiting.pop(0)
                    continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise EdgeRnnError(
                    f"worker {cluster.index}: no answer from {', '.join(waiting)} within {timeout_s:.0f} s — "
                    "start every worker, check the addresses and firewalls"
                )
            time.sleep(0.2)
    finally:
        listener.close()


def make_strategy(name: str, *, cluster: Cluster | None = None, connect_timeout_s: float = CONNECT_TIMEOUT_S):
    """The tf.distribute strategy `name`: mirrored over this process's devices, or multi-worker over `cluster`.

    Call before any other TF op: a process makes its strategy once. Multi-worker first waits (bounded) for
    every peer, then sets TF_CONFIG from `cluster`, which is what TensorFlow reads."""
    if name not in STRATEGIES or name == "default":
        raise EdgeRnnError(f"no tf.distribute strategy {name!r}; choose mirrored or multi-worker")
    if name == "multi-worker":
        if cluster is None:
            raise EdgeRnnError("multi-worker needs a cluster: set TF_CONFIG or pass --workers host:port,host:port --index N")
    # Imported before the wait: a worker that has seen its peers stops listening and starts TF's server on its
    # port, and a peer still checking it must not find the port closed for the seconds an import takes.
    tf = require("tensorflow", "train")
    if name == "multi-worker":
        wait_for_peers(cluster, timeout_s=connect_timeout_s)
        os.environ["TF_CONFIG"] = json.dumps(tf_config(cluster))
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING, timeout_seconds=COLLECTIVE_TIMEOUT_S
    )
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


class EpochBackup:
    """One worker's epoch checkpoints (model variables incl. dropout seeds, optimizer incl. step count and
    EMA, history) in DIR/worker-N.

    Every worker writes its own (TensorFlow wants every worker to take part in a save; their folders may
    share a disk or not). On resume the workers agree on the newest epoch all of them have."""

    def __init__(self, folder: Path, *, worker: int, model: Any, optimizer: Any, resume: bool) -> None:
        import shutil

        tf = require("tensorflow", "train")
        self.folder = Path(folder) / f"worker-{worker}"
        if not resume:
            shutil.rmtree(self.folder, ignore_errors=True)  # a fresh run must not pick up an old one's epochs
        # Every variable of the model: weights, and the dropout layers' seed-generator states, which a Checkpoint of
        # the Keras 3 model object leaves out — without them a resumed run draws other dropout masks. Keyed by their
        # place in the model, not by path: Keras numbers auto-named objects per process (`seed_generator_4` in a
        # fresh process is `seed_generator_22` in one that built models before), so paths differ between the run
        # that was killed and the one that resumes it in a longer-lived process.
        variables = {f"v{i:03d}": v.value for i, v in enumerate(model.variables)}
        self.checkpoint = tf.train.Checkpoint(optimizer=optimizer, model_variables=variables)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.folder), max_to_keep=BACKUPS_KEPT)

    def epochs(self) -> list[int]:
        return [int(path.rsplit("-", 1)[1]) for path in self.manager.checkpoints]

    def restore(self, epoch: int) -> dict[str, list[float]]:
        """Load epoch `epoch`'s checkpoint (0: none, start afresh) and return the history up to it."""
        if epoch == 0:
            return {}
        if epoch not in self.epochs():
            raise EdgeRnnError(
                f"{self.folder} has no backup of epoch {epoch}, the newest every worker has (it has {self.epochs() or 'none'}) "
                "— a backup folder was lost; train again without --resume"
            )
        self.checkpoint.restore(str(self.folder / f"ckpt-{epoch}")).assert_existing_objects_matched()
        history = read_json_capped(self.folder / "history.json", what="history file", max_bytes=MAX_MANIFEST_BYTES,
                                   error=EdgeRnnError, hint="train again without --resume")
        try:
            return {str(key): [float(v) for v in values[:epoch]] for key, values in history.items()}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise EdgeRnnError(f"{self.folder / 'history.json'} is missing or broken ({exc}) — train again without --resume") from exc

    def save(self, epoch: int, history: dict[str, list[float]]) -> None:
        from ..device.manifest import atomic_path

        # History first: a worker killed between the two writes has history for an epoch it has no checkpoint
        # of, which restore() cuts off — never a checkpoint without its history.
        with atomic_path(self.folder / "history.json") as tmp:
            tmp.write_text(json.dumps(history))
        self.manager.save(checkpoint_number=epoch)


def agreed_epoch(strategy: Any, epoch: int) -> int:
    """The smallest `epoch` over all workers (each passes its newest checkpoint's): the one every worker has."""
    tf = require("tensorflow", "train")

    @tf.function
    def gather():
        return strategy.gather(strategy.run(lambda: tf.constant([epoch], dtype=tf.int64)), axis=0)

    return int(tf.reduce_min(gather()))


# Called after each epoch with (epoch index from 1, total epochs, that epoch's logs).
EpochCallback = Callable[[int, int, dict[str, float]], None]


def fit_classifier(
    strategy: Any,
    model: Any,
    *,
    batches: Callable[[int], Any],
    global_batch: int,
    steps_per_epoch: int,
    validation: tuple[Any, Any],
    epochs: int,
    steps_per_call: int = 32,
    backup: EpochBackup | None = None,
    on_epoch: EpochCallback | None = None,
) -> tuple[dict[str, list[float]], int, list[float]]:
    """Train a compiled softmax classifier (made under `strategy.scope()`) on `batches(epoch)`, a tf.data
    dataset of at least `steps_per_epoch` global batches for epoch 0, 1, …; return the history (loss,
    accuracy, val_loss, val_accuracy), the epoch training resumed from (0: from scratch) and the wall seconds
    of each epoch this process ran.

    Per epoch, like fit(): the training loss/accuracy over the epoch's batches, then loss/accuracy of the raw
    (not EMA) weights on `validation`, scored by every worker on its own copy. With the optimizer's EMA on, the
    averaged weights are swapped in at the end, as fit() does. `steps_per_call` steps run per call into the
    graph (fit()'s steps_per_execution); the only collective per step is the gradient all-reduce — the
    epoch's loss and accuracy sums stay on each replica (ON_READ variables) and are summed once per epoch."""
    import numpy as np

    tf = require("tensorflow", "train")
    keras = require("keras", "train")
    optimizer = model.optimizer
    per_example = keras.losses.SparseCategoricalCrossentropy(reduction=None)
    with strategy.scope():
        optimizer.build(model.trainable_variables)
        # loss sum, correct predictions, examples: summed over replicas when read.
        sums = [
            tf.Variable(0.0, trainable=False, synchronization=tf.VariableSynchronization.ON_READ, aggregation=tf.VariableAggregation.SUM)
            for _ in range(3)
        ]
    start = agreed_epoch(strategy, backup.epochs()[-1] if backup and backup.epochs() else 0) if backup else 0
    history: dict[str, list[float]] = backup.restore(start) if backup else {}

    def step(x, y):
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            losses = per_example(y, probs)
            # Summed over the replica's examples, divided by the global batch: the all-reduced (summed)
            # gradient is then the gradient of the global batch's mean loss, as in one process.
            loss = tf.nn.compute_average_loss(losses, global_batch_size=global_batch)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        hits = tf.cast(tf.equal(tf.argmax(probs, axis=-1), tf.cast(y, tf.int64)), tf.float32)
        for total, value in zip(sums, (tf.reduce_sum(losses), tf.reduce_sum(hits), tf.cast(tf.size(y), tf.float32))):
            total.assign_add(value)

    @tf.function
    def train_steps(iterator, count):
        for _ in tf.range(count):
            strategy.run(step, args=next(iterator))

    predict = tf.function(lambda x: model(x, training=False))
    x_val, y_val = validation

    seconds: list[float] = []
    for epoch in range(start, epochs):
        started = time.perf_counter()
        for total in sums:
            total.assign(0.0)
        iterator = iter(strategy.experimental_distribute_dataset(batches(epoch)))
        for first in range(0, steps_per_epoch, steps_per_call):
            train_steps(iterator, tf.constant(min(steps_per_call, steps_per_epoch - first)))
        loss_sum, hit_sum, count = (float(total.read_value()) for total in sums)
        probs = np.concatenate([predict(x_val[i : i + 1024]).numpy() for i in range(0, len(x_val), 1024)])
        picked = np.clip(probs[np.arange(len(y_val)), y_val], 1e-7, 1.0)
        logs = {
            "loss": loss_sum / max(count, 1.0),
            "accuracy": hit_sum / max(count, 1.0),
            "val_loss": float(-np.log(picked).mean()),
            "val_accuracy": float((probs.argmax(axis=1) == y_val).mean()),
        }
        for key, value in logs.items():
            history.setdefault(key, []).append(float(value))
        seconds.append(round(time.perf_counter() - started, 2))
        if not np.isfinite(logs["loss"]):
            break  # diverged: no backup of these weights, so --resume goes on from the last sound epoch
        if backup is not None:
            backup.save(epoch + 1, history)
        if on_epoch is not None:
            on_epoch(epoch + 1, epochs, logs)
    if optimizer.use_ema:
        with strategy.scope():
            optimizer.finalize_variable_values(model.trainable_variables)
    return history, start, seconds
