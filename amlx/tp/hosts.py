"""Where the ranks of a tensor-parallel group meet: ports, hostfiles and the
environment MLX's backends read (MLX's launcher conventions: MLX_RANK,
MLX_HOSTFILE for the ring backend; NCCL's MLX_WORLD_SIZE and NCCL_HOST_IP /
NCCL_PORT for the NCCL backend)."""

from __future__ import annotations

import ipaddress
import json
import os
import pathlib
import socket
from typing import Sequence


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct TCP ports free on `host` right now (the OS picks them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def local_hosts(n: int) -> list[list[str]]:
    """A ring hostfile's entries for `n` ranks on this machine."""
    return [[f"127.0.0.1:{p}"] for p in free_ports(n)]


def read_hostfile(path: str | os.PathLike) -> list[list[str]]:
    """The ranks' addresses from a ring hostfile (MLX's JSON: one list of
    "host:port" strings per rank); ValueError naming the file and the fault."""
    p = pathlib.Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{p}: not a readable JSON hostfile ({exc})") from None
    if not isinstance(data, list) or not data or not all(
            isinstance(h, list) and h and all(isinstance(a, str) and _is_address(a) for a in h) for h in data):
        raise ValueError(f"{p}: a hostfile is a JSON list with one list of \"host:port\" strings per rank")
    return data


def _is_address(a: str) -> bool:
    host, _, port = a.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def is_local(address: str) -> bool:
    """Whether a hostfile's "host:port" names this machine."""
    host = address.rpartition(":")[0].strip("[]")
    if host in ("localhost", "0.0.0.0", "::"):
        return True
    try:  # the whole loopback range (127.0.0.2 named a remote rank that nobody started)
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass  # a host name
    try:
        mine = {socket.gethostname(), socket.getfqdn(), *socket.gethostbyname_ex(socket.gethostname())[2]}
    except OSError:
        mine = {socket.gethostname()}
    return host in mine


def write_hostfile(path: str | os.PathLike, hosts: Sequence[Sequence[str]]) -> pathlib.Path:
    p = pathlib.Path(path)
    p.write_text(json.dumps([list(h) for h in hosts]))
    return p


def rank_env(rank: int, size: int, backend: str, hostfile: pathlib.Path | None,
             nccl_address: str | None = None) -> dict[str, str]:
    """The environment variables MLX's `backend` reads for this rank."""
    env = {"MLX_RANK": str(rank), "MLX_WORLD_SIZE": str(size)}
    if hostfile is not None:
        env["MLX_HOSTFILE"] = str(hostfile)
    if backend == "nccl":
        env["NCCL_HOST_IP"], _, env["NCCL_PORT"] = (nccl_address or f"127.0.0.1:{free_ports(1)[0]}").rpartition(":")
        # NVLink multicast stays off: on shared hosts it can take the GPUs out of service
        env.update(NCCL_NVLS_ENABLE="0", NVSHMEM_DISABLE_NVLS="1", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    return env
