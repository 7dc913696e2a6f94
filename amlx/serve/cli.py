"""`amlx serve`: the subcommand's arguments and its main (loads the model, runs uvicorn)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import math
import os
import signal
import socket
import sys
from pathlib import Path

from amlx.cli import HelpFormatter, add_engine_options, as_typed, draft_problem, os_error

_EXAMPLE = """\
Example:
  amlx serve                                   # the embedded demo model on http://127.0.0.1:8000
  amlx serve ~/models/Qwen3-0.6B --port 8080 --api-key secret
  curl http://127.0.0.1:8080/v1/chat/completions -H 'Authorization: Bearer secret' \\
       -H 'Content-Type: application/json' \\
       -d '{"model": "Qwen3-0.6B", "messages": [{"role": "user", "content": "Hi"}]}'
"""


def add_serve_command(sub: "argparse._SubParsersAction") -> None:
    """Registers `serve` on the `amlx` command's subparsers; `args.run(args)` runs it."""
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with a chat page",
                       description="Serve one model over HTTP, OpenAI-compatible (/v1/chat/completions, "
                       "/v1/completions, /v1/models), with /health, /metrics and a chat page at /.",
                       epilog=_EXAMPLE, formatter_class=HelpFormatter)
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="checkpoint directory (Hugging Face or MLX format) or a Hugging Face model id (org/name), "
                        "looked up in the local Hugging Face cache and downloaded when missing (default: the "
                        "embedded demo model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health and the page's files "
                        "(repeatable; also $AMLX_API_KEY; default: no key)")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="a file of API keys, one per line; blank lines and lines starting with '#' (comments) are "
                        "skipped, so a key that starts with '#' goes in --api-key or $AMLX_API_KEY")
    p.add_argument("--max-batch-size", type=int, default=32, metavar="N",
                   help="requests decoded together (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="requests waiting beyond the batch before new ones get 429 (default: %(default)s)")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id clients send (default: the checkpoint directory's name)")
    p.add_argument("--adapter", default=None, metavar="DIR", help="a LoRA adapter directory to apply")
    add_engine_options(p)
    p.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="cap on prompt + reply tokens (default: the model's context length)")
    p.add_argument("--kv-cache-memory", type=_memory, default=None, metavar="SIZE",
                   help="most memory the KV cache may take: bytes (e.g. 4000000000, 4GB, 512MiB) or a fraction "
                        "of the device's memory (e.g. 0.5) (default: a share of the device's)")
    p.add_argument("--kv-bits", type=int, default=None, choices=[8, 4],
                   help="store the KV cache quantized to 8 or 4 bits (default: full precision)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="do not reuse the KV cache of earlier prompts with the same beginning")
    p.add_argument("--keepalive", type=float, default=1.0, metavar="SECONDS",
                   help="SSE keep-alive comment after this long without a token, e.g. during a long prefill "
                        "(default: %(default)s)")
    p.add_argument("--log-requests", default=None, metavar="FILE",
                   help="append each generation request's body to FILE (JSON lines; for debugging clients)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="default: %(default)s")
    p.set_defaults(run=main)


_UNITS = {"kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "b": 1}


def _memory(text: str) -> int | float:
    """--kv-cache-memory: a fraction (has a point, below 1), or bytes with an optional unit."""
    raw = text.strip().lower()
    try:
        if "." in raw and raw.replace(".", "", 1).isdigit() and float(raw) <= 1.0:
            return float(raw)
        for unit in sorted(_UNITS, key=len, reverse=True):
            if raw.endswith(unit):
                return int(float(raw[:-len(unit)]) * _UNITS[unit])
        return int(raw)
    except (ValueError, OverflowError):  # OverflowError: "infGB"
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (bytes, e.g. 4GB, or a fraction "
                                         f"such as 0.5)") from None


async def _serve(args: argparse.Namespace, keys: list[str]) -> None:
    import uvicorn

    import amlx
    from amlx.serve.app import Settings, create_app

    path = args.model
    if path is None:
        from amlx.demo import default_model_dir

        path = default_model_dir()
    name = args.model_name or Path(path).resolve().name
    async with await amlx.load(path, device=args.device, dtype=args.dtype, max_batch_size=args.max_batch_size,
                               max_context=args.max_context, adapter=args.adapter,
                               kv_cache_memory=args.kv_cache_memory, prefix_cache=args.prefix_cache,
                               kv_bits=args.kv_bits, draft=args.draft, num_draft_tokens=args.num_draft_tokens,
                               tensor_parallel=args.tensor_parallel) as model:
        settings = Settings(model_name=name, api_keys=tuple(keys), max_batch_size=args.max_batch_size,
                            max_queue=args.max_queue, keepalive=args.keepalive,
                            request_log=Path(args.log_requests) if args.log_requests else None)
        app = create_app(model, settings)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                timeout_graceful_shutdown=5, access_log=args.log_level == "debug")
        print(f"amlx serve: {name} ({model.info.architecture}, {model.info.device}) on "
              f"{_url(args.host, args.port)}  (chat page at /, API keys: {'on' if keys else 'off'})",
              file=sys.stderr, flush=True)
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the
        # previous handler; these take it, so the model is closed and the exit is clean.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        await uvicorn.Server(config).serve()


def _url(host: str, port: int) -> str:
    """The server's address as a URL: an IPv6 host in brackets (http://::1:8000 is no URL)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def main(args: argparse.Namespace) -> int:
    import amlx

    problem = _check_arguments(args)
    if problem:
        print(f"amlx serve: error: {problem}", file=sys.stderr)
        return 2
    try:
        keys = _keys(args)
        problem = _check_bind(args.host, args.port)
        if problem:
            print(f"amlx serve: error: {problem}", file=sys.stderr)
            return 1
        from amlx.kernel_cache import SERVE_NOTICE, first_run_notice

        # a cold CPU kernel cache: the first requests would wait a minute in silence
        first_run_notice(args.device, text=SERVE_NOTICE)
        asyncio.run(_serve(args, keys))
    except (amlx.AmlxError, ValueError) as exc:
        print(f"amlx serve: error: {as_typed(str(exc), args)}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"amlx serve: error: {os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _keys(args: argparse.Namespace) -> list[str]:
    """The API keys of --api-key, --api-key-file and $AMLX_API_KEY (ValueError naming the bad one)."""
    from amlx.serve.auth import ENV_VAR, collect_keys

    try:
        keys = collect_keys(args.api_key, args.api_key_file)
    except UnicodeDecodeError as exc:  # a binary file: say which option's file, not only the codec's words
        raise ValueError(f"--api-key-file {args.api_key_file}: not UTF-8 text ({exc.reason} at byte {exc.start})"
                         ) from None
    if args.api_key_file is not None and not keys:
        raise ValueError(f"--api-key-file {args.api_key_file} holds no key (the server would run without one)")
    if ENV_VAR in os.environ and not os.environ[ENV_VAR].strip():
        # as --api-key "": set, but to nothing (a failed `$(cat keyfile)`), it served without a key
        raise ValueError(f"${ENV_VAR} is set but empty (the server would run without a key; unset it for that)")
    env = os.environ.get(ENV_VAR, "").strip()
    for key in keys:
        # a client sends the key in an HTTP header, which carries only printable ASCII: any other key
        # (or a non-UTF-8 byte from the command line) would lock every client out
        if not (key.isascii() and key.isprintable()):
            where = "--api-key" if key in (k.strip() for k in args.api_key) else \
                f"${ENV_VAR}" if key == env else f"--api-key-file {args.api_key_file}"
            raise ValueError(f"{where}: a key holds a character other than printable ASCII (keys travel in the "
                             f"Authorization header, which carries only ASCII)")
    return keys


def _check_bind(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (None: it can), found before the model loads:
    uvicorn would find out only after a load that may take minutes, and then log a bare errno."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        return f"--host {host}: not a host name or address ({getattr(exc, 'strerror', None) or exc})"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no clash
            try:
                probe.bind(address)
            except OSError as exc:
                hint = {errno.EADDRINUSE: " (another program holds it; pick another --port)",
                        errno.EADDRNOTAVAIL: " (no network interface of this machine has that --host address)"}
                return f"cannot listen on {host} port {port}: {exc.strerror or exc}{hint.get(exc.errno or 0, '')}"
    return None


def _check_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, before the model loads (None: nothing)."""
    if args.max_batch_size < 1:
        return "--max-batch-size must be >= 1"
    if not 1 <= args.port <= 65535:
        return f"--port must lie in 1..65535, not {args.port}"
    if args.max_queue < 0:
        return "--max-queue must be >= 0"
    if not math.isfinite(args.keepalive) or args.keepalive <= 0:
        return f"--keepalive must be a number of seconds > 0, not {args.keepalive}"
    if any(not k.strip() for k in args.api_key):
        return "--api-key is empty (the server would run without a key)"
    # these the load would refuse too, but only after a load that may take minutes
    if args.max_context is not None and args.max_context < 2:
        return f"--max-context must be at least 2 tokens, not {args.max_context}"
    if args.kv_cache_memory is not None and not args.kv_cache_memory > 0:
        return f"--kv-cache-memory must be more than 0, not {args.kv_cache_memory}"
    if args.model_name is not None and not args.model_name.strip():
        return "--model-name is empty (clients name the model they ask for with it)"
    if not args.host.strip():
        # asyncio binds every interface for an empty host: `--host "$HOST"` with HOST unset would
        # have exposed the server to the network while the banner showed http://:8000
        return "--host is empty (--host 0.0.0.0 listens on every interface, if that is what you want)"
    if draft_problem(args.draft):
        return draft_problem(args.draft)
    if args.log_requests is not None:
        try:
            with open(args.log_requests, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            return f"--log-requests: {os_error(exc)}"
    return None
