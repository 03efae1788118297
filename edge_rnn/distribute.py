"""The cluster side of multi-worker training (issue 11): TF_CONFIG, a bounded wait for peers, the chief's folder.

No tensorflow here: TF's own start-up waits for absent peers without a deadline, so reachability is checked first."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import EdgeRnnError

# How long a worker waits for every peer to accept a TCP connection before giving up: peers start by hand
# on several machines, so half a minute of slack; past it, an unreachable cluster is an error, never a hang.
CONNECT_TIMEOUT_S = 30.0


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
    if not host or not port.isdigit():
        raise EdgeRnnError(f"worker address {address!r} is not host:port — e.g. 10.0.0.2:12345")
    return host, int(port)


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
        try:
            config = json.loads(raw)
            addresses = tuple(config["cluster"]["worker"])
            index = int(config["task"]["index"])
        except (ValueError, KeyError, TypeError) as exc:
            raise EdgeRnnError(f"TF_CONFIG is not {{\"cluster\": {{\"worker\": [...]}}, \"task\": {{\"index\": N}}}} ({exc})") from exc
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


@contextmanager
def worker_folder(out_dir: str | os.PathLike[str], *, cluster: Cluster | None) -> Iterator[Path]:
    """OUT for the chief (or a single process); for another worker a private temp folder, removed afterwards.

    Every worker saves (Keras expects it in multi-worker runs), but only the chief's files are kept."""
    if cluster is None or cluster.is_chief:
        yield Path(out_dir)
        return
    with tempfile.TemporaryDirectory(prefix=f"edge-rnn-worker{cluster.index}-") as tmp:
        yield Path(tmp)
