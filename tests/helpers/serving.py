"""Test support for `amlx serve`: small checkpoints made for serving tests, and the server
run as a subprocess (`python -m amlx serve CKPT --port P`) on 127.0.0.1.

* `serve_checkpoint(dir)`: a tiny random Qwen3 (tests.helpers.checkpoints) whose EOS rows of
  lm_head are zero, so greedy decoding never ends early (EOS's logit is 0 while the best of
  ~700 random logits is far above it): streams run to max_tokens, or to a stop string.
* `tool_checkpoint(dir)`: a tiny Qwen3 whose weights make greedy decoding write one Qwen
  tool call after the chat template's generation prompt. Its tokenizer has the call's JSON as
  one added token; every block's output projection is zero (the residual stream is the token's
  embedding), the chain's tokens have one-hot embeddings and lm_head maps each to the next:
  "\\n" -> <tool_call> -> {json} -> </tool_call> -> <|im_end|> (EOS).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
from safetensors.numpy import load_file, save_file

from .checkpoints import make_checkpoint

REPO = Path(__file__).resolve().parents[2]
TOOL_CALL_JSON = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'


def _edit_weights(path: Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _eos_ids(path: Path) -> list[int]:
    eos = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    return eos if isinstance(eos, list) else [eos]


def serve_checkpoint(path, seed: int = 0) -> Path:
    path = make_checkpoint(path, "qwen3", seed=seed, tie_word_embeddings=False)
    eos = _eos_ids(path)

    def no_eos(t):
        for i in eos:
            t["lm_head.weight"][i] = 0.0

    _edit_weights(path, no_eos)
    return path


def tool_checkpoint(path) -> Path:
    from tokenizers import AddedToken, Tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    probe = make_checkpoint(path, "qwen3", tie_word_embeddings=False)  # writes the tokenizer
    tok = Tokenizer.from_file(str(probe / "tokenizer.json"))
    tok.add_tokens([AddedToken(TOOL_CALL_JSON, special=False, normalized=False)])
    vocab = tok.get_vocab_size(with_added_tokens=True)
    path = make_checkpoint(path, "qwen3", tie_word_embeddings=False, vocab_size=vocab)
    tok.save(str(path / "tokenizer.json"))  # make_checkpoint rewrote the plain one
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"][str(tok.token_to_id(TOOL_CALL_JSON))] = {
        "content": TOOL_CALL_JSON, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
        "special": False}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    chain = [tok.encode("<|im_start|>assistant\n").ids[-1], tok.token_to_id("<tool_call>"),
             tok.token_to_id(TOOL_CALL_JSON), tok.token_to_id("</tool_call>"), tok.token_to_id("<|im_end|>")]

    def forced(t):
        hidden = t["model.embed_tokens.weight"].shape[1]
        for name in t:
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                t[name][:] = 0.0
        t["model.norm.weight"][:] = 1.0
        t["lm_head.weight"][:] = 0.0
        for k, (src, dst) in enumerate(zip(chain, chain[1:])):
            t["model.embed_tokens.weight"][src] = np.eye(hidden, dtype=np.float32)[k]
            t["lm_head.weight"][dst, k] = 10.0

    _edit_weights(path, forced)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m amlx serve` in a subprocess; `url`, `base_url` (for openai), `client()`, `stop()`.
    A context manager: leaving it stops the server."""

    def __init__(self, checkpoint, *args: str, api_key: str | None = None, env: dict | None = None,
                 startup: float = 120.0, module: str = "amlx"):
        """`python -m amlx serve CHECKPOINT --port P ARGS...`; another `module` is run as
        `python -m MODULE CHECKPOINT P` (an app of its own on that port)."""
        self.api_key = api_key
        if api_key is not None:
            args = (*args, "--api-key", api_key)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"amlx-serve-{self.port}.log"
        model = [] if checkpoint is None else [str(checkpoint)]  # None: the embedded default model
        cmd = [sys.executable, "-m", "amlx", "serve", *model, "--port", str(self.port), "--log-level", "warning", *args]
        if module != "amlx":
            cmd = [sys.executable, "-m", module, str(checkpoint), str(self.port)]
        full_env = {k: v for k, v in os.environ.items() if k != "AMLX_API_KEY"}  # only keys the test gives
        full_env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
        full_env.update(env or {})
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=str(REPO), env=full_env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT)
        self._wait_healthy(startup)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.output()
                self.stop()
                raise RuntimeError(f"amlx serve exited with {self.proc.returncode}:\n{out}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        out = self.output()
        self.stop()
        raise RuntimeError(f"amlx serve did not become healthy in {timeout} s:\n{out}")

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def client(self, api_key: str | None = None, timeout: float = 300.0) -> openai.AsyncOpenAI:
        """An AsyncOpenAI client of this server (with its API key unless another is given)."""
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key or self.api_key or "none", max_retries=0,
                                  timeout=timeout)

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-5000:]

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def metrics(self, headers: dict | None = None) -> dict[str, float]:
        """The /metrics samples as {"name{labels}": value}."""
        return parse_metrics(httpx.get(self.url + "/metrics", headers=headers, timeout=10).text)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """Stops the server and removes its log (a failed start's error carries the log's tail)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log_file.close()
        self.log.unlink(missing_ok=True)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {"name{labels}": value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


class MountedApps:
    """uvicorn on a thread of its own, in this process, serving `apps` (name -> ASGI app, e.g.
    `amlx.serve.create_app(model, settings)`) at /NAME: several models or settings behind one
    port, without a subprocess per server."""

    def __init__(self, apps: dict):
        import threading

        import uvicorn
        from starlette.applications import Starlette
        from starlette.routing import Mount

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        routes = [Mount(f"/{name}", app=app) for name, app in apps.items()]
        self.server = uvicorn.Server(uvicorn.Config(Starlette(routes=routes), log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def client(self, name: str) -> openai.OpenAI:
        """The official client of the app at /NAME."""
        return openai.OpenAI(base_url=f"{self.url}/{name}/v1", api_key="none", max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
