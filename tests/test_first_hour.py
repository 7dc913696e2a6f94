"""First-hour problems of the command line and the README, each fixed with a test here:

- `amlx serve` on a cold CPU kernel cache said nothing, and its first requests waited up to a
  minute in silence while MLX compiled its kernels (generate, chat and demo said so).
- `amlx generate "TCP/IP"`: a lone prompt that looks like a model id is refused as naming a model
  (rightly: `amlx generate org/name` is a forgotten prompt more often), but the error showed no way
  to send it; it now says: on stdin, `echo TCP/IP | amlx generate -`, and --help says so too.
- `--api-key-file`: a line starting with `#` is a comment, which neither `amlx serve --help` nor the
  README said (a key starting with `#` was silently not a key).
- `train_lora` / `amlx lora` made the adapter's output directory (and missing parents) before reading
  the data, and left it behind, empty, when the data was then refused; a directory that existed
  before the run is kept as it was.
- `-v` after a one-token reply: "generation: 1 tokens, 0.0 tokens/s" (a decode rate needs two tokens);
  now "1 token, - tokens/s".
- `amlx --help` described `lora` as "fine-tune a LoRA adapter", though it also fine-tunes every
  weight with --full.
- the README said constrained JSON "comes out as `json.dumps` writes it"; only the separators are
  json.dumps's: a `{"type": "number"}` schema's reply may be `0.0000`, which json.dumps writes `0.0`.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

try:
    from tests.helpers.cli import main_in_process
except ImportError:  # tests/ itself on sys.path
    from helpers.cli import main_in_process

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- 1. amlx serve on a cold kernel cache ---------------------------------------------------------------

@pytest.mark.parametrize("disabled", [False, True])
def test_serve_says_its_first_requests_wait_on_a_cold_kernel_cache(capsys, tmp_path, monkeypatch, disabled):
    from amlx.kernel_cache import SERVE_NOTICE

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # a cold cache: no compiled kernel there
    monkeypatch.delenv("MLX_DISABLE_COMPILE", raising=False)
    if disabled:  # then nothing compiles, and nothing is to be said
        monkeypatch.setenv("MLX_DISABLE_COMPILE", "1")
    # the model is a missing directory: the notice comes at startup, before the load (which fails)
    rc, err = main_in_process(capsys, "serve", str(tmp_path / "no-model"), "--device", "cpu",
                              "--port", str(_free_port()))
    assert rc == 1
    lines = err.splitlines()
    assert lines[-1].startswith("amlx serve: error: ") and "no-model" in lines[-1], err
    if disabled:
        assert len(lines) == 1, err
    else:
        assert lines[:-1] == [SERVE_NOTICE], err
        assert "first requests will wait" in SERVE_NOTICE and "once per machine" in SERVE_NOTICE


# -- 2. a prompt alone that looks like a model id -------------------------------------------------------

def test_a_lone_prompt_that_looks_like_a_model_is_told_how_to_pass_it(capsys, monkeypatch):
    import io
    import re
    import shlex

    import amlx
    from amlx.cli import main
    from amlx.demo import default_model_dir

    with pytest.raises(SystemExit) as refused:
        main(["generate", "TCP/IP"])
    message = str(refused.value.code)
    assert "the prompt is missing" in message
    # the error shows a way to send this very prompt to the embedded demo model
    way = re.search(r"echo (.+?) \| amlx generate -\)", message)
    assert way, message
    prompt = " ".join(shlex.split(way.group(1)))
    assert prompt == "TCP/IP"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "TCP/IP" in " ".join(capsys.readouterr().out.split())  # --help says so too
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(f"{prompt}\n".encode()), encoding="utf-8"))
    rc = main(["generate", "-", "--raw", "--max-tokens", "2", "-v"])
    err = capsys.readouterr().err
    assert rc == 0, err
    with amlx.load_sync(default_model_dir()) as demo:
        ids = demo.tokenizer.encode("TCP/IP")
    assert f"prompt: {len(ids)} tokens" in err or f"prompt: {len(ids)} token," in err, err


# -- 3. comments in --api-key-file ----------------------------------------------------------------------

def _readme_bullet(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"- **{title}**")
    end = text.find("\n- ", start + 1)
    return " ".join(text[start:end].split())


def test_api_key_file_comments_are_documented_where_the_file_is(capsys, tmp_path):
    from amlx.cli import main
    from amlx.serve.auth import collect_keys

    keys = tmp_path / "keys"
    keys.write_text("# the team's key\nsecret-1\n\n  #old-key\n#second\nsecret-2\n", encoding="utf-8")
    assert collect_keys((), keys, environ={}) == ["secret-1", "secret-2"]  # what happens
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    option = help_text[help_text.rindex("--api-key-file FILE"):][:300]  # (not the usage line)
    assert "'#'" in option and "comment" in option, option
    auth = _readme_bullet("Auth")
    assert "--api-key-file FILE" in auth and "`#`" in auth and "comment" in auth, auth


# -- 4. no empty output directory left by a run refused at its start ---------------------------------

def _bad_data(tmp_path: Path) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello world"}\n{"prompt": "x"}\n', encoding="utf-8")  # line 2: no completion
    return data


@pytest.mark.parametrize("full", [False, True])
def test_refused_training_data_leaves_no_output_directory_behind(capsys, tmp_path, full):
    from amlx.demo import default_model_dir

    data = _bad_data(tmp_path)
    out = tmp_path / "new" / "deeper" / "out"
    where = ["--full", "--save-path", str(out)] if full else ["--adapter-path", str(out)]
    rc, err = main_in_process(capsys, "lora", str(default_model_dir()), "--data", str(data), "--iters", "2",
                              "--batch-size", "1", "--no-progress", *where)
    assert rc == 1 and "a prompt/completion record needs both keys" in err, err
    assert not (tmp_path / "new").exists(), list((tmp_path / "new").rglob("*"))


def test_a_refused_run_keeps_the_directories_the_user_had(tmp_path):
    import amlx
    from amlx.demo import default_model_dir

    data = _bad_data(tmp_path)
    mine = tmp_path / "mine"  # an (empty) directory of the user's, and one inside it the run would make
    mine.mkdir()
    with amlx.load_sync(default_model_dir()) as model:
        for out in (mine, mine / "adapters"):
            async def train() -> None:
                async for _ in model.train_lora(str(data), adapter_path=str(out), iters=2, batch_size=1):
                    pass

            import asyncio

            with pytest.raises(ValueError, match="needs both keys"):
                asyncio.run(train())
            assert mine.is_dir() and not (mine / "adapters").exists()


# -- 5. -v after a one-token reply -------------------------------------------------------------------

def test_v_after_a_one_token_reply_counts_one_token_and_claims_no_rate(capsys):
    from amlx.cli import main

    rc = main(["generate", "Hello!", "--max-tokens", "1", "-v"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "generation: 1 token, - tokens/s;" in err, err
    assert "1 tokens" not in err and "0.0 tokens/s" not in err, err


def test_v_counts_and_rates_of_longer_replies_are_unchanged():
    import io
    import re

    from amlx.reply import Reply, report

    for tokens, prompt, want in ((3, 1, "prompt: 1 token, .*generation: 3 tokens, 4\\.0 tokens/s;"),
                                 (0, 5, "prompt: 5 tokens, time to first token: -; generation: 0 tokens, - tokens/s;")):
        reply = Reply(prompt_tokens=prompt, tokens=tokens, started=10.0, first_token_at=None if tokens == 0 else 10.5,
                      ended=11.0, finish_reason="length")
        out = io.StringIO()
        report(reply, out)
        assert re.search(want, out.getvalue()), out.getvalue()


# -- 6. amlx --help on lora ----------------------------------------------------------------------------

def test_top_level_help_says_lora_also_fine_tunes_every_weight(capsys):
    from amlx.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:1] == ["lora"])
    entry = " ".join(" ".join(lines[at:at + 3]).split())
    assert "LoRA" in entry and "--full" in entry, entry
    with pytest.raises(SystemExit):
        main(["lora", "--help"])
    out = capsys.readouterr().out
    assert "--full" in out.split("Example:")[-1], out  # an example of it too


# -- 7. what the README says of constrained JSON's form --------------------------------------------------

def test_the_readme_claims_json_dumps_separators_not_json_dumps_values():
    import json

    import amlx
    from amlx.demo import default_model_dir

    with amlx.load_sync(default_model_dir()) as model:
        tok = model.tokenizer
        zero, point = tok.encode("0"), tok.encode(".")
        assert len(zero) == len(point) == 1
        # biased towards "0" then ".": a number that is valid JSON but not json.dumps's spelling
        number = model.complete_sync("x", max_tokens=6, logit_bias={zero[0]: 100.0, point[0]: 50.0},
                                     response_format={"type": "json_schema", "json_schema": {
                                         "name": "n", "schema": {"type": "number"}}}).text
    assert number.startswith("0.0"), number
    assert json.dumps(json.loads(number)) != number  # e.g. "0.0000": json.dumps writes 0.0
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert "as `json.dumps` writes it" not in readme
    claim = readme[readme.index("JSON comes out"):][:300]
    assert "separators" in claim and "`1.000`" in claim and "json.loads" in claim, claim
