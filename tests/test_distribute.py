"""Multi-worker plumbing (issue 11): cluster from --workers or TF_CONFIG, a bounded wait for peers, the chief's folder."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from edge_rnn.train.distribute import Cluster, resolve_cluster, tf_config, wait_for_peers
from edge_rnn.errors import EdgeRnnError


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def test_cluster_from_workers_and_from_tf_config_agree(monkeypatch):
    flags = resolve_cluster(workers="127.0.0.1:2222, 127.0.0.1:2223", index=1)
    monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config(flags)))
    assert resolve_cluster() == flags == Cluster(("127.0.0.1:2222", "127.0.0.1:2223"), 1)
    assert not flags.is_chief and resolve_cluster(workers="h:1,h:2", index=0).is_chief


@pytest.mark.parametrize("workers, index, tf_config_env, fragment", [
    ("h:1,h:2", 2, None, "--index must be 0…1"),
    ("h:1,h:2", None, None, "--index must be 0…1"),
    ("h:1,nope", 0, None, "'nope' is not host:port"),
    (None, None, None, "set TF_CONFIG or pass --workers"),
    (None, None, "{not json", "TF_CONFIG is not"),
    (None, None, '{"cluster": {"worker": ["h:1"]}, "task": {"index": 3}}', "task index 3 is outside its 1 workers"),
    (None, None, '{"cluster": {"chief": ["h:0"], "worker": ["h:1"]}, "task": {"type": "chief", "index": 0}}', "TF_CONFIG has chief tasks"),
    (None, None, '{"cluster": {"worker": ["h:1"], "ps": ["h:2"]}, "task": {"type": "worker", "index": 0}}', "TF_CONFIG has ps tasks"),
    (None, None, '{"cluster": ["h:1"], "task": {"index": 0}}', "TF_CONFIG is not"),
])
def test_a_bad_cluster_is_a_clear_error(monkeypatch, workers, index, tf_config_env, fragment):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    if tf_config_env is not None:
        monkeypatch.setenv("TF_CONFIG", tf_config_env)
    with pytest.raises(EdgeRnnError, match=fragment):
        resolve_cluster(workers=workers, index=index)


def test_workers_waiting_for_each_other_meet():
    addresses = tuple(f"127.0.0.1:{p}" for p in free_ports(2))
    errors: list[BaseException] = []

    servers: list[socket.socket] = []

    def worker(index: int) -> None:
        try:
            wait_for_peers(Cluster(addresses, index), timeout_s=20)
        except BaseException as exc:  # reported by the assert below
            errors.append(exc)
            return
        # What TF's server does next: take the port over, so a peer still checking finds it.
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("", int(addresses[index].rpartition(":")[2])))
        server.listen()
        servers.append(server)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads) and errors == []
    finally:
        for server in servers:
            server.close()


def test_a_cluster_nobody_answers_on_fails_within_the_deadline():
    mine, nobody = free_ports(2)
    start = time.monotonic()
    with pytest.raises(EdgeRnnError, match=f"worker 0: no answer from 127.0.0.1:{nobody} within 2 s"):
        wait_for_peers(Cluster((f"127.0.0.1:{mine}", f"127.0.0.1:{nobody}"), 0), timeout_s=2)
    assert time.monotonic() - start < 10
