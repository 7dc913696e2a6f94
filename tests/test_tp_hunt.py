"""A bug hunt of tensor parallelism (`tensor_parallel=2` over MLX's ring backend
on this CPU machine), beside tests/test_tensor_parallel.py (which has the
greedy-equality, cancellation, killed/hung-rank and option tests this file does
not repeat).

Here: logprobs against one process (bound below), messages longer than one
protocol buffer, quantized checkpoints whose parts do not fall on quantization
groups, refused options (hostfiles, timeouts, adapters) that must leave no folder
or process behind, loopback and remote ranks, a close while requests run or while
a follower hangs, a follower stuck right after its heartbeat, a follower dying
under several requests, a malformed message, cancellations in a full batch, and
two models joining at once.

Logprob bound: the ranks add two partial sums per layer where one process adds
one, so logits differ by float32 rounding; over these tiny models the largest
difference seen was 6e-5 (Gemma 3, 4 layers), and the bound is 1e-3, far below
the gaps between these random models' logprobs that would change a token.

Failure scenarios run in a process of their own (`python -m tests.test_tp_hunt
SCENARIO CKPT`, printing one RESULT line), as tests/helpers/tp_failure.py does:
a regression there must fail the test, not hang or crash the test process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import amlx
from amlx.errors import TensorParallelError
from helpers.environment import python_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # seconds: a hang fails the test instead of hanging the suite
LOGPROB_BOUND = 1e-3


def run(coro_fn, *args):
    return asyncio.run(asyncio.wait_for(coro_fn(*args), TIMEOUT))


def processes_of(workdir) -> list[int]:
    """Pids of live processes whose command line names a launch's work folder: its
    followers, and their keepers (amlx.tp.keeper: forks of a follower in a session
    of their own, whose parent is no longer this process)."""
    needle = str(workdir).encode()
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmd and state != "Z":
            found.append(int(entry))
    return found


def gone(workdir, wait: float = 20.0) -> bool:
    """Whether every process of the launch has exited (a keeper exits once rank 0
    closed its end of the lifeline: allowed a moment)."""
    deadline = time.monotonic() + wait
    while processes_of(workdir):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from tests.helpers.checkpoints import make_checkpoint

    root = tmp_path_factory.mktemp("tp_hunt")
    return {arch: make_checkpoint(root / arch, arch, seed=4) for arch in ("qwen3", "gemma3_text")}


# -- options refused before anything starts ----------------------------------------------

def test_refused_hostfiles_leave_no_work_folder(ckpts, tmp_path, monkeypatch):
    """A hostfile refused (wrong rank count, rank 0 elsewhere, not JSON, bad address)
    leaves no amlx-tp-* folder: the work folder was made before the checks, and
    every refused load left an empty one in the temp folder."""
    import tempfile

    from amlx.tp import hosts

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    hostfile = tmp_path / "hosts.json"
    monkeypatch.setenv("AMLX_TP_HOSTFILE", str(hostfile))
    port = hosts.free_ports(1)[0]
    bad = {json.dumps([[f"127.0.0.1:{port}"]]): "names 1 ranks",
           json.dumps([["192.0.2.1:4000"], [f"127.0.0.1:{port}"]]): "rank 0 .* must be on this host",
           "not json": "not a readable JSON hostfile",
           json.dumps([["127.0.0.1:0"], ["127.0.0.1:70000"]]): "one list of \"host:port\" strings"}
    for text, why in bad.items():
        hostfile.write_text(text)
        with pytest.raises(ValueError, match=why):
            amlx.load_sync(ckpts["qwen3"], device="cpu", tensor_parallel=2)
        assert list(temp.iterdir()) == [], text


def test_hostfile_addresses_are_checked():
    from amlx.tp.hosts import _is_address

    for good in ("127.0.0.1:1", "localhost:65535", "[::1]:5000", "node-3.example:4000"):
        assert _is_address(good), good
    for bad in ("127.0.0.1", "127.0.0.1:", ":5000", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:-1",
                "127.0.0.1:5e3", "127.0.0.1: 80"):
        assert not _is_address(bad), bad


def test_loopback_addresses_are_this_host():
    """Every loopback address is this host (amlx starts its ranks): 127.0.0.2 was taken
    for another host's, and the load waited out the join timeout for a rank that
    nobody would start."""
    from amlx.tp.hosts import is_local

    for here in ("127.0.0.1:5000", "127.0.0.2:5000", "127.1.2.3:80", "[::1]:5000", "localhost:5000",
                 "0.0.0.0:5000"):
        assert is_local(here), here
    for there in ("192.0.2.1:4000", "[2001:db8::1]:4000", "10.255.255.1:5000"):
        assert not is_local(there), there


def test_a_remote_rank_that_never_joins_is_named(ckpts, tmp_path, monkeypatch):
    """The join timeout names the ranks amlx did not start because the hostfile places
    them on other hosts (it said only that the ranks "did not start in time")."""
    from amlx.tp import hosts

    hostfile = hosts.write_hostfile(tmp_path / "hosts.json", [hosts.local_hosts(1)[0], ["192.0.2.1:4000"]])
    monkeypatch.setenv("AMLX_TP_HOSTFILE", str(hostfile))
    monkeypatch.setenv("AMLX_TP_JOIN_TIMEOUT", "2")
    with pytest.raises(TensorParallelError, match="did not start in time .the hostfile places rank 1 on other "
                                                   "hosts: start them there"):
        amlx.load_sync(ckpts["qwen3"], device="cpu", tensor_parallel=2)


@pytest.mark.parametrize("var", ["AMLX_TP_STEP_TIMEOUT", "AMLX_TP_JOIN_TIMEOUT"])
def test_bad_timeouts_are_refused_before_any_rank_starts(ckpts, var, monkeypatch):
    """A timeout that is no positive number: a ValueError naming the variable, and
    no rank started (float()'s "could not convert string to float: 'abc'" came once
    the followers had loaded, or, for the step timeout, once they had joined)."""
    from amlx.tp import launch

    started = []
    spawn = launch._spawn
    monkeypatch.setattr(launch, "_spawn", lambda *a, **k: started.append(spawn(*a, **k)) or started[-1])
    for value in ("abc", "0", "-5", "nan"):
        monkeypatch.setenv(var, value)
        with pytest.raises(ValueError, match=f"{var} must be a positive number of seconds"):
            amlx.load_sync(ckpts["qwen3"], device="cpu", tensor_parallel=2)
    assert started == []
    monkeypatch.setenv(var, " ")  # blank: the default
    assert launch.join_timeout() == 600.0 and launch.step_timeout() == 300.0
    monkeypatch.setenv(var, "inf")  # no limit
    assert launch.env_seconds(var, 1.0) == float("inf")


def test_a_failed_spawn_stops_the_ranks_already_started(ckpts, monkeypatch):
    """The OS refusing rank 2's process (here: a fault injected in its spawn) ends
    rank 1, already started, and removes the work folder: before, rank 1 ran on
    (until its lifeline closed with this process) and its folder stayed."""
    from amlx.tp import launch

    started = []
    spawn = launch._spawn

    def spawn_once(*args, **kwargs):
        if started:
            raise OSError(24, "Too many open files")
        started.append(spawn(*args, **kwargs))
        return started[-1]
    monkeypatch.setattr(launch, "_spawn", spawn_once)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="Too many open files"):
        launch.start(str(ckpts["qwen3"]), 3, "cpu", None)
    (rank,) = started
    assert rank.process.returncode is not None  # killed and reaped
    assert not rank.log.parent.exists()
    assert len(os.listdir("/proc/self/fd")) == fds  # rank 0's ends of its pipes closed


# -- shapes that do not divide -------------------------------------------------------------

@pytest.mark.parametrize("group_size, what", [(32, "MLP down projection's 96 input features make parts of 48"),
                                              (64, "attention output projection's 64 input features make "
                                                   "parts of 32")])
def test_quantized_parts_off_the_groups_are_refused_clearly(tmp_path, group_size, what):
    """A 4-bit model whose per-rank parts of a row-parallel layer (o_proj: 2 heads of
    16 per rank; down_proj: 48 features per rank) are not whole quantization groups:
    refused like any shape that does not divide, naming tensor parallelism and the
    layer, before any layer changed. It was "inputs [0, 48) do not start and end on
    quantization groups of 32" from the middle of the sharding."""
    from tests.helpers.checkpoints import make_checkpoint
    from tests.test_tensor_parallel import followers

    path = make_checkpoint(tmp_path / "m", "qwen3", seed=1, intermediate_size=96)
    q = amlx.convert(path, tmp_path / "q", quantize=4, group_size=group_size, progress=False)
    with pytest.raises(ValueError, match=f"cannot be split over tensor_parallel=2 ranks: layer 0: the {what}"):
        amlx.load_sync(q, device="cpu", tensor_parallel=2)
    assert followers() == []


def test_shard_problems_leave_the_model_whole(tmp_path):
    """shard_model refuses before any change (its docstring's promise): after the
    refusal every layer still holds its full quantized arrays."""
    from amlx.models import build_model, prepare
    from amlx.tp.shard import shard_model
    from tests.helpers.checkpoints import make_checkpoint

    path = make_checkpoint(tmp_path / "m", "qwen3", seed=1, intermediate_size=96)
    q = amlx.convert(path, tmp_path / "q", quantize=4, group_size=32, progress=False)
    loaded = build_model(prepare(q, None), None, progress=False)
    try:
        def parts():  # (a sharded layer is an AllSum over its cut, with no weight of its own)
            return [(type(m).__name__, getattr(m, "weight", None) is not None and m.weight.shape)
                    for layer in loaded.model.layers
                    for m in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj)]
        before = parts()
        with pytest.raises(ValueError, match="quantization groups of 32"):
            shard_model(loaded.model, 0, 2, lambda x: x)
        assert parts() == before
    finally:
        loaded.model.close()


# -- the protocol ----------------------------------------------------------------------------

def test_malformed_messages_are_refused(monkeypatch):
    """What a follower reads: a message in several buffers decodes whole; a buffer
    that is not a message, or whose counts are impossible, is a ValueError (the
    follower exits with it and rank 0's watchdog fails the model)."""
    from amlx.tp import protocol

    def feed(words: np.ndarray):
        blocks = iter(words.reshape(-1, protocol.WORDS))
        monkeypatch.setattr(protocol, "_block", lambda group: next(blocks).copy())

    body = list(range(1, 3 * protocol.WORDS))  # three buffers and some
    feed(protocol.encode(protocol.PREFILL, [7, 8], body))
    assert protocol.receive(None) == protocol.Message(protocol.PREFILL, [7, 8], body)
    good = protocol.encode(protocol.DECODE, [], [1, 2, 3])
    for where, value in ((0, 0), (0, 12345), (1, 3), (1, 0), (2, -1), (3, -2)):
        bad = good.copy()
        bad[where] = value
        feed(bad)
        with pytest.raises(ValueError, match="lost step"):
            protocol.receive(None)


# -- scenarios in a process of their own -------------------------------------------------------

def scenario(name: str, path, env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-m", "tests.test_tp_hunt", name, str(path)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": python_path(ROOT, os.path.join(ROOT, "tests")), **(env or {})}, capture_output=True,
                          text=True, timeout=TIMEOUT)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"exit status {done.returncode}; stderr: {done.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


async def _closed_fully(m, out: dict) -> None:
    """Closes `m` and records whether its ranks' group closed (within 20 s) and no process of
    the launch is left."""
    mirror = m.engine.mirror
    await m.aclose()
    for _ in range(400):
        if mirror.closed:
            break
        await asyncio.sleep(0.05)
    out["closed_fully"] = mirror.closed
    out["gone"] = gone(mirror.launch.workdir)


async def _hung_close(path: str) -> dict:
    """A follower stopped (SIGSTOP) while the model is idle, then close(): STOP's
    collective never completed and the close waited for good (the watchdog stops
    watching when a close begins)."""
    from amlx.tp import leader

    leader.STOP_TIMEOUT = 2.0  # (30 s by default)
    m = await amlx.load(path, device="cpu", tensor_parallel=2)
    mirror = m.engine.mirror
    out = {"first": (await m.complete([1, 2, 3], max_tokens=3)).token_ids}
    # Idle first: the engine may still run a step after the last token (a row leaves in the
    # round after it), and a rank stopped under that step holds the close before the STOP
    # (until AMLX_TP_STEP_TIMEOUT, the watchdog's case).
    for _ in range(400):
        if m.stats()["active_requests"] == 0 and all(r.steps >= mirror._sent for r in mirror.launch.ranks):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # (the follower's last step, launched before its heartbeat, ends)
    pid = mirror.alive[0]
    os.kill(pid, signal.SIGSTOP)
    # (if the close still waits after 40 s, the stopped follower is killed so that it
    # cannot stay behind; the test then fails on the time taken)
    rescue = threading.Timer(40, lambda: os.kill(pid, signal.SIGKILL))
    rescue.daemon = True
    rescue.start()
    start = time.monotonic()
    await m.aclose()
    out["seconds"] = time.monotonic() - start
    rescue.cancel()
    out["closed_fully"] = mirror.closed
    out["gone"] = gone(mirror.launch.workdir)
    try:
        mirror.group.handle
        out["group_kept"] = True
    except ValueError:
        out["group_kept"] = False
    other = await asyncio.wait_for(amlx.load(path, device="cpu"), 30)  # MLX still works here
    out["after"] = (await asyncio.wait_for(other.complete([1, 2, 3], max_tokens=3), 30)).token_ids
    await other.aclose()
    return out


async def _kill_many(path: str) -> dict:
    """Three requests, two in the batch and one waiting for a row; rank 1 killed
    mid-stream: every request ends with a TensorParallelError (none hangs), the
    model closes, close() returns, and no process of the launch is left."""
    m = await amlx.load(path, device="cpu", tensor_parallel=2, max_batch_size=2)
    mirror = m.engine.mirror
    workdir = mirror.launch.workdir
    killed = asyncio.Event()

    async def one(i: int):
        n = 0
        try:
            async for _ in m.generate([1 + i, 5, 9, 33], max_tokens=5000, max_buffer=65536):
                n += 1
                if i == 0 and n == 2:
                    os.kill(mirror.alive[0], signal.SIGKILL)
                    killed.set()
            return ["finished", n]
        except Exception as exc:  # noqa: BLE001 - reported to the test
            return [type(exc).__name__, str(exc)[:300]]
    out = {"streams": await asyncio.gather(*[one(i) for i in range(3)])}
    await m.aclose()
    await _closed_fully(m, out)  # (a second aclose: a no-op)
    out["workdir_removed"] = not os.path.exists(workdir)
    return out


async def _garbage(path: str) -> dict:
    """Rank 0 sends a message of an unknown kind: the follower refuses it and exits,
    and the next request fails with a TensorParallelError that quotes the
    follower's reason, instead of the ranks running different forwards."""
    m = await amlx.load(path, device="cpu", tensor_parallel=2)
    mirror = m.engine.mirror
    out = {"first": (await m.complete([1, 2, 3], max_tokens=2)).token_ids}
    await m.engine._worker.run(m.engine._at_home(lambda: mirror._send(99, [])))
    for _ in range(400):  # the watchdog sees the follower exit
        if m.closed:
            break
        await asyncio.sleep(0.05)
    try:
        await m.complete([1, 2, 3], max_tokens=2)
        out["error"] = None
    except amlx.AmlxError as exc:
        out["error"] = type(exc).__name__
        out["error_message"] = str(exc)
    out["message"] = str(mirror._failure)
    await _closed_fully(m, out)
    return out


async def _stopped_after_beat(path: str) -> dict:
    """Rank 1 stops itself right after its 7th heartbeat (the sitecustomize hook of
    test_a_rank_stuck_after_its_heartbeat_is_caught): the 7th message is the step
    that the first request's last round runs after its last token, which rank 0 reads
    before the second request's prefill. The heartbeat was written once the step was
    launched, not done: the stuck step looked finished, no rank was behind, and rank
    0 waited on it for good instead of failing after AMLX_TP_STEP_TIMEOUT."""
    m = await amlx.load(path, device="cpu", tensor_parallel=2)
    mirror = m.engine.mirror
    pid = mirror.alive[0]
    rescue = threading.Timer(40, lambda: os.kill(pid, signal.SIGKILL))  # (see _hung_close)
    rescue.daemon = True
    rescue.start()
    start = time.monotonic()
    out = {"requests": []}
    for _ in range(2):
        try:
            out["requests"].append(["ok", (await m.complete([1, 5, 9, 33], max_tokens=6)).token_ids])
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out["requests"].append([type(exc).__name__, str(exc)[:200]])
    out["seconds"] = time.monotonic() - start
    out["sent"] = mirror._sent
    rescue.cancel()
    await _closed_fully(m, out)
    return out


SCENARIOS = {"hung_close": _hung_close, "kill_many": _kill_many, "garbage": _garbage,
             "stopped_after_beat": _stopped_after_beat}


def test_close_with_a_hung_follower_is_bounded(ckpts):
    out = scenario("hung_close", ckpts["qwen3"])
    assert out["seconds"] < 30, out  # STOP_TIMEOUT (2 s here), then the kill
    assert out["closed_fully"] and out["gone"], out
    assert out["group_kept"], out  # killed at close: kept, as after a failure (amlx.tp.leader)
    assert out["after"] == out["first"], out


def test_a_killed_follower_fails_every_request(ckpts):
    out = scenario("kill_many", ckpts["qwen3"])
    for kind, message in out["streams"]:
        assert kind == "TensorParallelError", out
        assert "rank 1" in message and "killed by signal 9" in message, out
    assert out["closed_fully"] and out["gone"] and out["workdir_removed"], out


STOP_AFTER_BEAT = """\
import os, sys
if "amlx.tp.follower" in " ".join(sys.orig_argv):  # (rank 0 reads this file too)
    from amlx._mlx import ops as _ops

    _write, _launch, _beats = os.write, _ops.async_eval, [0]

    def _write_and_stop(fd, data):
        done = _write(fd, data)
        if data == b".":
            _beats[0] += 1
            if _beats[0] == int(os.environ["AMLX_TP_HUNT_STOP_AT"]):
                os.kill(os.getpid(), 19)  # SIGSTOP
        return done

    def _slow_launch(*arrays):
        # a decode step waits on the stream behind a few matmuls: the stop lands
        # inside the step whether the heartbeat comes before its end or after
        if sys._getframe(1).f_code.co_name == "_decode":
            w = _ops.ones((384, 384)) * 0.001
            s = w
            for _ in range(6):
                s = _ops.matmul(s, w)
            _launch(s)
        return _launch(*arrays)
    os.write, _ops.async_eval = _write_and_stop, _slow_launch
"""


def test_a_rank_stuck_after_its_heartbeat_is_caught(ckpts, tmp_path):
    """A follower stuck inside a step after its heartbeat (here: stopped right after
    it): the watchdog fails the model within AMLX_TP_STEP_TIMEOUT (3 s) instead of
    rank 0 waiting on the step for good (it waited until the test's rescue, 40 s)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STOP_AFTER_BEAT)
    out = scenario("stopped_after_beat", ckpts["qwen3"],
                   {"PYTHONPATH": python_path(hook, ROOT, os.path.join(ROOT, "tests")), "AMLX_TP_HUNT_STOP_AT": "7",
                    "AMLX_TP_STEP_TIMEOUT": "3"})
    failed = [r for r in out["requests"] if r[0] != "ok"]
    assert failed and failed[0] == ["TensorParallelError",
                                    "a tensor-parallel rank made no progress for 3 s; the model is closed"], out
    assert out["seconds"] < 30, out
    assert out["closed_fully"] and out["gone"], out


def test_a_malformed_message_fails_the_model_clearly(ckpts):
    out = scenario("garbage", ckpts["qwen3"])
    assert out["first"] and out["error"] in ("TensorParallelError", "ClosedError"), out
    assert "rank 1" in out["message"] and "lost step" in out["message"], out
    # a request after the failure is told why the model closed, not only that it is closed
    assert "rank 1" in out["error_message"] and "lost step" in out["error_message"], out
    assert out["closed_fully"] and out["gone"], out


# -- outputs against one process ---------------------------------------------------------------

def _prompts() -> list[list[int]]:
    """Three long prompts and 80 short ones: the decode steps of 83 rows (four words
    each) take more than one protocol buffer."""
    rng = np.random.default_rng(0)
    return [[int(x) for x in rng.integers(10, 200, n)] for n in (700, 650, 900, *rng.integers(2, 9, 80))]


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_logprobs_equal_one_process(ckpts, arch, monkeypatch):
    """Greedy tokens exact and logprobs (top 3 too) within LOGPROB_BOUND of one
    process's, for long and short prompts run together: the steps of 83 rows make
    messages longer than one protocol buffer (checked), which the followers read
    in pieces."""
    from amlx.tp import protocol

    path = ckpts[arch]
    prompts = _prompts()
    longest = []
    encode = protocol.encode
    monkeypatch.setattr(protocol, "encode", lambda *a: longest.append(len(encode(*a))) or encode(*a))

    async def go(tp):
        async with await amlx.load(path, device="cpu", tensor_parallel=tp, max_batch_size=96) as m:
            cs = await asyncio.gather(*[m.complete(p, max_tokens=6, top_logprobs=3) for p in prompts])
            return [(c.token_ids, c.logprobs, c.top_logprobs) for c in cs]
    one, two = run(go, 1), run(go, 2)
    assert max(longest) > protocol.WORDS
    for (ids1, lp1, top1), (ids2, lp2, top2) in zip(one, two):
        assert ids2 == ids1
        assert np.allclose(lp2, lp1, rtol=0, atol=LOGPROB_BOUND)
        assert [[i for i, _ in s] for s in top2] == [[i for i, _ in s] for s in top1]
        assert np.allclose([[v for _, v in s] for s in top2], [[v for _, v in s] for s in top1], rtol=0,
                           atol=LOGPROB_BOUND)



# -- lifetime and batching ---------------------------------------------------------------------

def test_close_while_requests_run(ckpts):
    """aclose() with two rows decoding and a third waiting for a row: every stream ends
    (ClosedError), the close returns, the followers exit on STOP and the group is
    freed (a clean close), the work folder is gone; a second close is a no-op."""
    async def go():
        m = await amlx.load(ckpts["gemma3_text"], device="cpu", tensor_parallel=2, max_batch_size=2)
        mirror = m.engine.mirror
        started = asyncio.Event()

        async def one(i: int):
            n = 0
            try:
                async for _ in m.generate([2 + i, 7, 11], max_tokens=5000, max_buffer=65536):
                    n += 1
                    if n == 3:
                        started.set()
                return "finished"
            except amlx.ClosedError:
                return "closed"
        streams = [asyncio.create_task(one(i)) for i in range(3)]
        await started.wait()
        await m.aclose()
        ends = await asyncio.gather(*streams)
        await m.aclose()
        return ends, mirror
    ends, mirror = run(go)
    assert ends == ["closed"] * 3
    assert mirror.closed and mirror.alive == [] and gone(mirror.launch.workdir)
    assert not mirror._stop_killed and mirror._failure is None
    with pytest.raises(ValueError, match="closed"):  # freed
        mirror.group.handle
    assert not mirror.launch.workdir.exists()


def test_adapter_is_refused(ckpts, tmp_path):
    """LoRA adapters are not applied over the ranks: a clear ValueError before any rank starts."""
    from tests.test_tensor_parallel import followers

    with pytest.raises(ValueError, match="adapter cannot be applied to a tensor_parallel model"):
        amlx.load_sync(ckpts["qwen3"], device="cpu", tensor_parallel=2, adapter=tmp_path)
    assert followers() == []


def test_cancellations_in_a_full_batch_equal_one_process(ckpts):
    """Six requests over a batch of two (the rest wait for rows), with prefills in
    chunks; streams broken off at different points (one before its first token), a
    waiting request cancelled before it got a row. The streams that run to the end
    are one process's greedy tokens, and the ranks' mirrored tables drop every
    cancelled row (rank 0 holds no request afterwards)."""
    rng = np.random.default_rng(5)
    prompts = [[int(x) for x in rng.integers(10, 200, n)] for n in (40, 3, 70, 9, 25, 5)]
    stop_after = [None, 2, None, 0, 5, None]  # tokens read before breaking off (0: at once)

    async def go(tp):
        async with await amlx.load(ckpts["qwen3"], device="cpu", tensor_parallel=tp, max_batch_size=2) as m:
            async def one(i: int):
                out = []
                async for tok in m.generate(prompts[i], max_tokens=12):
                    if stop_after[i] is not None and len(out) >= stop_after[i]:
                        break
                    out.append(tok.id)
                return out
            tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
            waiting = asyncio.create_task(m.complete(prompts[0], max_tokens=12))
            await asyncio.sleep(0)
            waiting.cancel()  # (queued behind the others: never gets a row)
            got = await asyncio.gather(*tasks)
            with pytest.raises(asyncio.CancelledError):
                await waiting
            for _ in range(250):
                if m.stats()["active_requests"] == 0:
                    break
                await asyncio.sleep(0.02)
            assert m.stats()["active_requests"] == 0
            if tp > 1:
                assert m.engine.mirror._ids == {} and m.engine.mirror._known == {}
            # the model still serves, in step with the followers
            return got, (await m.complete(prompts[1], max_tokens=12)).token_ids
    one_process, two = run(go, 1), run(go, 2)
    assert two == one_process



def test_two_models_join_at_once(ckpts, monkeypatch):
    """Two tensor-parallel models loading at once (each on a worker of its own) join
    one after the other: MLX's ring reads MLX_RANK / MLX_HOSTFILE from the process's
    environment, which each join set and restored around its own init, and
    distributed.init clears MLX's cached backends. Here every init waits a moment
    first, so the joins overlap: one model's init read the other's hostfile (or none)
    and a load failed ("Couldn't connect", or the join timeout)."""
    from amlx._mlx import distributed
    from amlx.models.registry import architectures

    architectures()  # (filled once, before the loads race: see test_registry_fills_once_under_threads)
    init = distributed.init

    def slow_init(*args, **kwargs):
        time.sleep(1.0)
        return init(*args, **kwargs)
    monkeypatch.setattr(distributed, "init", slow_init)
    monkeypatch.setenv("AMLX_TP_JOIN_TIMEOUT", "30")
    paths = [ckpts["qwen3"], ckpts["gemma3_text"]]

    async def go(tp):
        models = await asyncio.gather(*[amlx.load(p, device="cpu", tensor_parallel=tp) for p in paths])
        try:
            return [(await m.complete([1, 5, 9], max_tokens=5)).token_ids for m in models]
        finally:
            for m in models:
                await m.aclose()
    assert run(go, 2) == run(go, 1)


def test_registry_fills_once_under_threads(monkeypatch):
    """Two threads filling the empty registry at once (two tensor_parallel loads, each on a
    worker of its own): the second raised 'registered twice', or a reader saw it half filled."""
    import importlib
    import threading

    from amlx.models import registry

    monkeypatch.setattr(registry, "_by_model_type", {})
    real = importlib.import_module

    def slow_import(name, *args):
        time.sleep(0.05)  # (a first import of an architecture's module takes this long and more)
        return real(name, *args)
    monkeypatch.setattr(registry.importlib, "import_module", slow_import)
    errors = []

    def fill():
        try:
            registry.architectures()
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)
    threads = [threading.Thread(target=fill) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


if __name__ == "__main__":
    result = asyncio.run(SCENARIOS[sys.argv[1]](sys.argv[2]))
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # (a failed ring's threads may still wait in MLX: see tests/helpers/tp_failure.py)
