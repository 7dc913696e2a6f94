"""The C layer's binding of MLX's collectives (amlx._mlx.distributed), run
across two processes on this machine over MLX's ring backend (TCP on
localhost), checked against numpy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from amlx._mlx import distributed as dist
from amlx.errors import MLXError
from amlx.tp import hosts
from helpers.environment import python_path
from tests.helpers.dist_ops import rank_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # seconds: a hung collective fails the test instead of hanging it


def run_ranks(hostfile, size: int = 2) -> list[tuple[int, dict]]:
    procs = []
    for rank in range(size):
        env = {**os.environ, **hosts.rank_env(rank, size, "ring", hostfile), "PYTHONPATH": python_path(ROOT)}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.helpers.dist_ops"], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            results.append((p.returncode, json.loads(lines[-1]) if lines else {"stderr": err}))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def test_ring_backend_is_built_in():
    assert dist.is_available("ring")
    with pytest.raises(ValueError, match="unknown distributed backend"):
        dist.is_available("carrier-pigeon")


def test_collectives_across_two_processes(tmp_path):
    hostfile = hosts.write_hostfile(tmp_path / "hosts.json", hosts.local_hosts(2))
    results = run_ranks(hostfile)
    data = [rank_data(r) for r in range(2)]
    for rc, out in results:
        assert rc == 0, out
        assert out["size"] == 2
        np.testing.assert_array_equal(np.asarray(out["sum"], np.float32), data[0] + data[1])
        assert out["sum_int"] == [3, 14]
        assert out["dtype_kept"]
        np.testing.assert_array_equal(np.asarray(out["gather"], np.float32), np.concatenate(data, axis=0))
        # with two ranks, the left neighbour is the other rank
        np.testing.assert_array_equal(np.asarray(out["recv"], np.float32), data[1 - out["rank"]])
    assert sorted(out["rank"] for _, out in results) == [0, 1]


def test_malformed_hostfile_is_a_clear_error(tmp_path):
    bad = tmp_path / "hosts.json"
    bad.write_text('[["127.0.0.1:1"')
    results = run_ranks(bad)
    for rc, out in results:
        assert rc == 2
        assert "MLXError" in out["error"] and "parse error" in out["error"]
    with pytest.raises(ValueError, match="hosts.json"):
        hosts.read_hostfile(bad)


def test_hostfile_checks(tmp_path):
    p = tmp_path / "h.json"
    p.write_text(json.dumps([["127.0.0.1:80"], ["10.0.0.2:81"]]))
    assert hosts.read_hostfile(p) == [["127.0.0.1:80"], ["10.0.0.2:81"]]
    for bad in ([], [["nohost"]], [["h:99999"]], {"a": 1}, [[]]):
        p.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="one list of"):
            hosts.read_hostfile(p)
    with pytest.raises(ValueError, match="not a readable JSON hostfile"):
        hosts.read_hostfile(tmp_path / "missing.json")
    assert hosts.is_local("127.0.0.1:5000") and hosts.is_local("localhost:1")
    assert not hosts.is_local("192.0.2.1:5000")  # TEST-NET-1: never this machine


def test_ring_without_environment_is_an_mlx_error(monkeypatch):
    monkeypatch.delenv("MLX_RANK", raising=False)
    monkeypatch.delenv("MLX_HOSTFILE", raising=False)
    with pytest.raises(MLXError, match="MLX_RANK"):
        dist.init("ring")
    single = dist.init("ring", strict=False)  # a group of one process
    assert (single.rank, single.size) == (0, 1)
    single.close()


def test_tensor_parallel_messages_span_buffers(monkeypatch):
    """A step description longer than one collective's buffer (a large batch, many
    rows freed) arrives whole: amlx.tp.protocol continues it in more buffers."""
    from amlx.tp import protocol

    frees, body = list(range(1000, 1300)), [7] * 500
    words = protocol.encode(protocol.DECODE, frees, body)
    assert len(words) % protocol.WORDS == 0 and len(words) > protocol.WORDS
    blocks = iter(words.reshape(-1, protocol.WORDS))
    monkeypatch.setattr(protocol, "_block", lambda group: next(blocks))
    msg = protocol.receive(None)
    assert (msg.kind, msg.frees, msg.body) == (protocol.DECODE, frees, body)
    monkeypatch.setattr(protocol, "_block", lambda group: np.zeros(protocol.WORDS, np.int32))
    with pytest.raises(ValueError, match="lost step"):
        protocol.receive(None)


def test_nccl_environment_keeps_nvlink_multicast_off():
    env = hosts.rank_env(1, 2, "nccl", None, "10.0.0.1:1234")
    assert (env["MLX_RANK"], env["MLX_WORLD_SIZE"], env["NCCL_HOST_IP"], env["NCCL_PORT"]) == ("1", "2", "10.0.0.1",
                                                                                               "1234")
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["NVSHMEM_DISABLE_NVLS"] == "1"
