"""The `amlx` command line, run as `python -m amlx` in subprocesses.

`--version`; every subcommand's `--help` shows defaults and an example;
`generate` wraps the prompt in the chat template by default and sends it as it
is with `--raw` (the prompt token count in `-v`'s line and the text both match
the library's output for the same prompt), reads the prompt from stdin with
`-`; `org/name` ids resolve from a Hugging Face cache laid out in a temp dir
exactly as huggingface_hub lays it out (HF_HUB_CACHE and HF_HOME), and a
missing id says where it looked and why downloading failed; `--adapter`
applies an adapter trained by `amlx lora`; `chat` on a pipe prints only the
replies on stdout and treats /commands as commands; `amlx lora` rejects a bad
record before drawing a progress bar, and Ctrl-C during training saves the
adapter trained so far and says where.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import amlx
from amlx.cli import main
from amlx.hub import resolve_model
from helpers.environment import python_path

try:
    from tests.helpers.checkpoints import make_checkpoint
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Hello there"
# (one token reads "1 token", and a rate over no interval "-")
STATS = re.compile(r"\[(\w+)\] prompt: (\d+) tokens?, time to first token: [\d.]+ s; generation: (\d+) tokens?, "
                   r"(?:[\d.]+|-) tokens/s; peak memory: [\d.]+ [KMG]?B")
COMMANDS = ["generate", "chat", "demo", "convert", "lora"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(PYTHONPATH=python_path(ROOT), PYTHONIOENCODING="utf-8", HF_HUB_OFFLINE="1", **extra)
    return env


def amlx_cli(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 300
             ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amlx", *args], input=input, capture_output=True, text=True,
                          encoding="utf-8", env=env or _env(HF_HUB_CACHE=str(ROOT / "no-such-cache")), cwd=ROOT,
                          timeout=timeout)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="module")
def model(ckpt):
    m = amlx.load_sync(ckpt)
    yield m
    m.close()


def _chat_ids(model, text: str) -> list[int]:
    rendered = model.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return model.tokenizer.encode(rendered, add_special_tokens=False)


def test_version():
    r = amlx_cli("--version")
    assert r.returncode == 0, r.stderr
    from amlx._mlx import version

    assert r.stdout.strip() == f"amlx {amlx.__version__} (MLX {version()})"
    assert re.fullmatch(r"amlx \d+\.\d+\.\d+\S* \(MLX \d+\.\d+\.\d+\S*\)", r.stdout.strip())


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_defaults_and_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"] if command else ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "Example:\n  amlx " in out
    if command is not None:
        assert "(default: " in out
    if command in ("generate", "chat"):
        assert "--max-tokens MAX_TOKENS" in out and "(default: 256)" in out and "--adapter DIR" in out
    if command == "lora":
        assert "(default: adapters)" in out and "(default: 1000)" in out


def test_generate_applies_the_chat_template_unless_raw(ckpt, model):
    templated = model.complete_sync([{"role": "user", "content": PROMPT}], max_tokens=12)
    raw = model.complete_sync(PROMPT, max_tokens=12)
    assert templated.text != raw.text
    cases = [((), templated, _chat_ids(model, PROMPT)), (("--raw",), raw, model.tokenizer.encode(PROMPT))]
    for flags, want, ids in cases:
        r = amlx_cli("generate", str(ckpt), PROMPT, "--max-tokens", "12", "-v", *flags)
        assert r.returncode == 0, r.stderr
        assert r.stdout == want.text + "\n"
        m = STATS.search(r.stderr)
        assert m, r.stderr
        assert int(m.group(2)) == len(ids) == want.usage.prompt_tokens
        assert int(m.group(3)) == want.usage.completion_tokens
        assert m.group(1) == want.finish_reason


def test_generate_reads_the_prompt_from_stdin(ckpt, model):
    want = model.complete_sync([{"role": "user", "content": PROMPT}], max_tokens=8)
    r = amlx_cli("generate", str(ckpt), "-", "--max-tokens", "8", "-v", input=PROMPT + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.text + "\n"
    assert int(STATS.search(r.stderr).group(2)) == len(_chat_ids(model, PROMPT))


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _hub_cache(cache: Path, repo_id: str, ckpt: Path) -> Path:
    """Lays `ckpt` out in `cache` the way huggingface_hub's downloads do:
    models--org--name/{blobs/<etag>, refs/main, snapshots/<commit>/<file> -> ../../blobs/<etag>}
    (LFS files' etag: their sha256; other files': their git blob sha1)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snapshot.mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for f in sorted(ckpt.iterdir()):
        data = f.read_bytes()
        etag = hashlib.sha256(data).hexdigest() if f.suffix == ".safetensors" else _git_blob_sha1(data)
        (repo / "blobs" / etag).write_bytes(data)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", etag))
    return snapshot


def test_model_ids_resolve_from_the_hugging_face_cache(ckpt, model, tmp_path, monkeypatch):
    snapshot = _hub_cache(tmp_path / "hub", "acme/tiny-qwen", ckpt)
    from huggingface_hub import scan_cache_dir

    scan = scan_cache_dir(tmp_path / "hub")  # huggingface_hub reads the layout as its own
    assert not scan.warnings and [r.repo_id for r in scan.repos] == ["acme/tiny-qwen"]
    (repo,) = scan.repos
    assert [(r.commit_hash, r.refs) for r in repo.revisions] == [(snapshot.name, frozenset({"main"}))]
    assert {f.file_name for f in next(iter(repo.revisions)).files} == {f.name for f in ckpt.iterdir()}
    want = model.complete_sync([{"role": "user", "content": PROMPT}], max_tokens=6).text + "\n"
    r = amlx_cli("generate", "acme/tiny-qwen", PROMPT, "--max-tokens", "6",
                 env=_env(HF_HUB_CACHE=str(tmp_path / "hub")))
    assert r.returncode == 0, r.stderr
    assert r.stdout == want
    # HF_HOME: the hub cache is its hub/ folder
    (tmp_path / "home").mkdir()
    (tmp_path / "hub").rename(tmp_path / "home" / "hub")
    r = amlx_cli("generate", "acme/tiny-qwen", PROMPT, "--max-tokens", "6", env=_env(HF_HOME=str(tmp_path / "home")))
    assert r.returncode == 0, r.stderr
    assert r.stdout == want
    # convert takes an id too
    r = amlx_cli("convert", "acme/tiny-qwen", str(tmp_path / "mlx"), env=_env(HF_HOME=str(tmp_path / "home")))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "mlx" / "config.json").is_file()
    # the library function, and amlx.load through it
    assert resolve_model("acme/tiny-qwen", cache_dir=tmp_path / "home" / "hub") == \
        tmp_path / "home" / "hub" / snapshot.relative_to(tmp_path / "hub")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "home" / "hub"))
    with amlx.load_sync("acme/tiny-qwen") as m:
        assert Path(m.info.path).parent.parent.name == "models--acme--tiny-qwen"
    # an existing directory wins over an id of the same spelling
    local = tmp_path / "acme" / "tiny-qwen"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("acme/tiny-qwen") == Path("acme/tiny-qwen")


def test_a_missing_model_id_says_where_it_looked_and_why_downloading_failed(tmp_path):
    cache = tmp_path / "hub"
    r = amlx_cli("generate", "acme/missing", PROMPT, env=_env(HF_HUB_CACHE=str(cache)))
    assert r.returncode == 1 and r.stdout == ""
    assert f"not found in the local Hugging Face cache at {cache}, and downloading failed: HF_HUB_OFFLINE is set" \
        in r.stderr
    # online, with a hub that refuses the connection
    env = _env(HF_HUB_CACHE=str(cache), HF_ENDPOINT="http://127.0.0.1:9")
    env.pop("HF_HUB_OFFLINE")
    r = amlx_cli("generate", "acme/missing", PROMPT, env=env)
    assert r.returncode == 1
    assert f"not found in the local Hugging Face cache at {cache}, and downloading failed: " in r.stderr
    assert "Connect" in r.stderr.split("downloading failed: ")[1]
    with pytest.raises(amlx.ModelLoadError, match="downloading is off"):
        resolve_model("acme/missing", cache_dir=cache, download=False)


def test_a_missing_directory_is_a_clear_error(tmp_path):
    r = amlx_cli("generate", str(tmp_path / "nope"), PROMPT)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert str(tmp_path / "nope") in r.stderr


def test_chat_on_a_pipe(ckpt, model):
    """Replies alone on stdout (banner and notices on stderr); /commands are not sent
    to the model; /reset forgets the conversation; /exit ends."""
    first = model.complete_sync([{"role": "user", "content": PROMPT}], max_tokens=8).text
    r = amlx_cli("chat", str(ckpt), "--max-tokens", "8", "-v",
                 input=f"{PROMPT}\n/help\n\n/nonsense\n/reset\n{PROMPT}\n/exit\nnever sent\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{first}\n{first}\n"
    assert "amlx chat" in r.stderr and "/reset" in r.stderr and "unknown command /nonsense" in r.stderr
    counts = [int(m.group(2)) for m in STATS.finditer(r.stderr)]
    assert counts == [len(_chat_ids(model, PROMPT))] * 2


def test_chat_keeps_the_history(ckpt, model):
    first = model.complete_sync([{"role": "user", "content": PROMPT}], max_tokens=8).text
    history = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": first},
               {"role": "user", "content": "and then?"}]
    second = model.complete_sync(history, max_tokens=8)
    r = amlx_cli("chat", str(ckpt), "--max-tokens", "8", "-v", input=f"{PROMPT}\nand then?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{first}\n{second.text}\n"
    assert int(list(STATS.finditer(r.stderr))[1].group(2)) == second.usage.prompt_tokens


def test_chat_needs_a_chat_template(ckpt, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in ckpt.iterdir():
        (plain / f.name).symlink_to(f)
    (plain / "tokenizer_config.json").unlink()
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = amlx_cli("chat", str(plain), input="hi\n")
    assert r.returncode == 1 and "has no chat template" in r.stderr
    # generate sends a template-less model's prompt as it is
    r = amlx_cli("generate", str(plain), PROMPT, "--max-tokens", "2", "-v")
    assert r.returncode == 0, r.stderr
    with amlx.load_sync(plain) as m:
        assert int(STATS.search(r.stderr).group(2)) == len(m.tokenizer.encode(PROMPT))


DATA = [{"prompt": "The secret word is", "completion": " banana split"}, {"prompt": "Say hi:", "completion": " hi"}]


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_lora_then_generate_with_the_adapter(ckpt, tmp_path):
    data = _write_jsonl(tmp_path / "train.jsonl", DATA)
    r = amlx_cli("lora", str(ckpt), "--data", str(data), "--iters", "3", "--batch-size", "2", "--learning-rate", "1e-2",
                 "--adapter-path", str(tmp_path / "ad"), "--rank", "4")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ad" / "adapters.safetensors").is_file()
    with amlx.load_sync(ckpt, adapter=tmp_path / "ad") as tuned:
        want = tuned.complete_sync("The secret word is", max_tokens=6).text
    for command in ("generate", "chat"):
        r = amlx_cli(command, str(ckpt), *(["The secret word is", "--raw"] if command == "generate" else []),
                     "--max-tokens", "6", "--adapter", str(tmp_path / "ad"), input="The secret word is\n")
        assert r.returncode == 0, r.stderr
        if command == "generate":
            assert r.stdout == want + "\n"
    r = amlx_cli("generate", str(ckpt), PROMPT, "--adapter", str(tmp_path / "none"))
    assert r.returncode == 1 and str(tmp_path / "none") in r.stderr


def test_lora_rejects_a_bad_record_before_the_progress_bar(ckpt, tmp_path):
    data = _write_jsonl(tmp_path / "train.jsonl", [DATA[0], DATA[1], '{"prompt": "x"}', DATA[0]])
    r = amlx_cli("lora", str(ckpt), "--data", str(data), "--iters", "2", "--batch-size", "1")
    assert r.returncode == 1
    # the error alone: no progress bar was drawn
    assert r.stderr.startswith(f"amlx lora: error: {data}:3: a prompt/completion record needs both keys")
    assert r.stderr.count("\n") == 1 and "%|" not in r.stderr
    bad_json = _write_jsonl(tmp_path / "bad.jsonl", [DATA[0], "{oops"])
    r = amlx_cli("lora", str(ckpt), "--data", str(bad_json), "--iters", "2", "--batch-size", "1")
    assert r.returncode == 1 and r.stderr.startswith(f"amlx lora: error: {bad_json}:2: malformed JSON")
    assert r.stderr.count("\n") == 1


def test_ctrl_c_during_lora_saves_the_adapter_so_far(ckpt, tmp_path):
    data = _write_jsonl(tmp_path / "train.jsonl", DATA)
    adapters = tmp_path / "ad"
    proc = subprocess.Popen(
        [sys.executable, "-m", "amlx", "lora", str(ckpt), "--data", str(data), "--iters", "100000", "--batch-size",
         "2", "--learning-rate", "1e-2", "--adapter-path", str(adapters), "--save-every", "100000", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    try:
        for line in proc.stdout:
            if line.startswith("step 2/"):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    m = re.search(r"interrupted at step (\d+) of 100000: saved the adapter trained so far to (\S+)", err)
    assert m, err
    assert int(m.group(1)) >= 2
    assert Path(m.group(2)) == adapters / "adapters.safetensors" and Path(m.group(2)).is_file()
    assert "Traceback" not in err
    with amlx.load_sync(ckpt, adapter=adapters) as tuned:  # what was saved loads
        assert tuned.complete_sync("The secret word is", max_tokens=2).usage.completion_tokens >= 1


def test_an_interrupted_reply_cancels_its_request(model):
    """Ctrl-C (a KeyboardInterrupt where the reply is read or written) ends the
    reply and takes its request out of the engine."""
    from amlx.reply import stream_reply

    class Terminal:
        def __init__(self):
            self.writes = []

        def write(self, text: str) -> None:
            self.writes.append(text)
            if len(self.writes) == 3:
                raise KeyboardInterrupt

        def flush(self) -> None:
            pass

    out = Terminal()
    reply = stream_reply(model, "Tell me a story", {"max_tokens": 5000}, out=out)
    assert reply.interrupted and reply.tokens == 3 and reply.text == "".join(out.writes[:3])
    assert out.writes[-1] == "\n"
    for _ in range(500):  # the engine drops the request at its next round
        s = model.stats()
        if s["active_requests"] == s["waiting_requests"] == 0:
            break
        time.sleep(0.02)
    assert s["active_requests"] == s["waiting_requests"] == 0


def test_generate_and_chat_without_a_model_use_the_embedded_demo_model():
    """`amlx generate PROMPT` and `amlx chat` with no MODEL run the embedded demo model, as
    `amlx serve` does; a lone argument that names a model is the prompt forgotten, said so."""
    from amlx.demo import default_model_dir

    with amlx.load_sync(default_model_dir()) as demo:
        want = demo.complete_sync([{"role": "user", "content": "Hello!"}], max_tokens=8).text
    r = amlx_cli("generate", "Hello!", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    r = amlx_cli("chat", "--max-tokens", "8", input="Hello!\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    for lone in ("Qwen/Qwen3-0.6B", str(ROOT)):
        r = amlx_cli("generate", lone)
        assert r.returncode == 1 and "Traceback" not in r.stderr and r.stdout == ""
        assert "the prompt is missing" in r.stderr and lone in r.stderr
