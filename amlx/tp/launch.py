"""Starting the other ranks of a tensor-parallel model and joining them.

Rank 0 is the user's process. It starts one `python -m amlx.tp.follower`
process per other rank of this machine, with MLX's launcher environment
(MLX_RANK and MLX_HOSTFILE for the ring backend; MLX_RANK, MLX_WORLD_SIZE,
NCCL_HOST_IP and NCCL_PORT for NCCL, one GPU per process). Each follower gets
two pipes: a heartbeat (a byte per finished step, read by rank 0's watchdog;
EOF when it dies) and a lifeline (EOF when rank 0 dies, and it exits).

Joining is bounded: MLX's ring backend waits for its peers without a timeout,
so rank 0 joins on a helper thread while it watches the followers; a follower
that exits or a join that takes longer than `timeout` fails the load with the
follower's own error output.
"""

from __future__ import annotations

import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from amlx._mlx import distributed as dist
from amlx.errors import TensorParallelError
from amlx.tp import hosts



def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable `name`; a
    ValueError naming the variable otherwise (float()'s own message named
    neither it nor what it is for)."""
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:  # (nan too; inf stays: no limit)
        raise ValueError(f"{name} must be a positive number of seconds, not {text!r}")
    return value


def join_timeout() -> float:
    """Seconds rank 0 waits for the other ranks to load and connect (AMLX_TP_JOIN_TIMEOUT)."""
    return env_seconds("AMLX_TP_JOIN_TIMEOUT", 600.0)


def step_timeout() -> float:
    """Seconds a rank may lag behind a step before the model fails (AMLX_TP_STEP_TIMEOUT)."""
    return env_seconds("AMLX_TP_STEP_TIMEOUT", 300.0)


@dataclass
class Rank:
    """A follower process of this machine and rank 0's ends of its pipes."""

    rank: int
    process: subprocess.Popen
    heartbeat: int  # read end
    lifeline: int  # write end
    log: pathlib.Path
    steps: int = 0  # heartbeats read
    ready: bool = False

    def error_tail(self, limit: int = 2000) -> str:
        try:
            text = self.log.read_text(errors="replace").strip()
        except OSError:
            return ""
        return text[-limit:]

    def describe_exit(self) -> str:
        code = self.process.poll()
        how = "is running" if code is None else (
            f"was killed by signal {-code}" if code < 0 else f"exited with code {code}")
        return f"tensor-parallel rank {self.rank} (pid {self.process.pid}) {how}"


@dataclass
class Launch:
    """What `start` made: the hostfile, the environment and the followers."""

    size: int
    backend: str
    workdir: pathlib.Path
    env: dict[str, str]
    ranks: list[Rank] = field(default_factory=list)


def backend_for(device: str) -> str:
    chosen = os.environ.get("AMLX_TP_BACKEND") or ("nccl" if device == "gpu" else "ring")
    if not dist.is_available(chosen):
        raise TensorParallelError(f"MLX's {chosen!r} distributed backend is not in this libmlx build")
    return chosen


def start(model: str, size: int, device: str, dtype: str | None, hostfile: str | None = None,
          kv_bits: int | None = None, head: str = "replicated") -> Launch:
    """Starts ranks 1..size-1 (those of this machine: all of them without a
    hostfile). `hostfile`: a ring hostfile naming every rank's address; ranks
    on other hosts are started there by the user with the same command.
    `kv_bits`: the KV cache's storage (the followers' pools match rank 0's).
    `head`: how the output head is split (amlx.tp.shard.head_mode)."""
    backend = backend_for(device)
    # Everything that can refuse the options runs before the work folder and the
    # processes exist: a refused hostfile left an empty amlx-tp-* folder per try.
    entries, local = None, list(range(1, size))
    if backend == "ring":
        entries = hosts.read_hostfile(hostfile) if hostfile else hosts.local_hosts(size)
        if len(entries) != size:
            raise ValueError(f"{hostfile}: names {len(entries)} ranks, tensor_parallel is {size}")
        if not hosts.is_local(entries[0][0]):
            raise ValueError(f"{hostfile}: rank 0 (this process) must be on this host, not {entries[0][0]}")
        local = [r for r in local if hosts.is_local(entries[r][0])]  # the others are started on their hosts
    gpus = _visible_gpus(size) if backend == "nccl" else None
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="amlx-tp-"))
    launch = None
    try:
        path = hosts.write_hostfile(workdir / "hosts.json", entries) if entries is not None else None
        launch = Launch(size, backend, workdir, hosts.rank_env(0, size, backend, path))
        for rank in local:
            env = {**launch.env, "MLX_RANK": str(rank)}
            if gpus is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpus[rank]
            launch.ranks.append(_spawn(rank, model, backend, device, dtype, env, workdir, kv_bits, head))
    except BaseException:
        # (e.g. the OS refused a process or a pipe): nobody else knows of these
        # ranks yet, so they go now rather than run on without a rank 0
        for r in launch.ranks if launch is not None else []:
            stop_rank(r)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return launch


def stop_rank(r: Rank) -> None:
    """Kills a follower, reaps it and closes rank 0's ends of its pipes."""
    kill_rank(r)
    r.process.wait()
    close_pipes(r)


def kill_rank(r: Rank) -> None:
    """Kills a follower that still runs: its process group (it started a session of its own)."""
    if r.process.poll() is None:
        try:
            os.killpg(r.process.pid, signal.SIGKILL)
        except OSError:
            r.process.kill()


def close_pipes(r: Rank) -> None:
    """Closes rank 0's ends of a follower's pipes (heartbeat, lifeline); closed ones are skipped."""
    for fd in (r.heartbeat, r.lifeline):
        try:
            os.close(fd)
        except OSError:
            pass


def _visible_gpus(size: int) -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g for g in listed.split(",") if g] if listed else [str(i) for i in range(size)]
    if len(gpus) < size:
        raise TensorParallelError(f"tensor_parallel={size} needs {size} GPUs; CUDA_VISIBLE_DEVICES lists {listed}")
    return gpus


def _spawn(rank: int, model: str, backend: str, device: str, dtype: str | None, env: dict[str, str],
           workdir: pathlib.Path, kv_bits: int | None = None, head: str = "replicated") -> Rank:
    beat_r, beat_w = os.pipe()
    life_r, life_w = os.pipe()
    log = workdir / f"rank{rank}.log"
    cmd = [sys.executable, "-m", "amlx.tp.follower", str(model), "--backend", backend, "--device", device,
           "--heartbeat-fd", str(beat_w), "--lifeline-fd", str(life_r), "--head", head,
           "--workdir", str(workdir)]
    if dtype is not None:
        cmd += ["--dtype", str(dtype)]
    if kv_bits is not None:
        cmd += ["--kv-bits", str(kv_bits)]
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, pass_fds=(beat_w, life_r), start_new_session=True)
    except BaseException:
        for fd in (beat_r, life_w):  # (the other two ends are closed below either way)
            os.close(fd)
        raise
    finally:
        os.close(beat_w)
        os.close(life_r)
    return Rank(rank, proc, beat_r, life_w, log)
