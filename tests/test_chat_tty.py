"""`amlx chat` in a terminal (a pty driven by pexpect): /help and /exit are
commands, Ctrl-C stops a streaming reply (its request cancelled) and keeps the
conversation (the next turn's prompt holds the first exchange), Ctrl-C at the
prompt discards the line, and the chat goes on after each.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest

import amlx
from helpers.environment import python_path

pexpect = pytest.importorskip("pexpect")

try:
    from tests.helpers.checkpoints import make_checkpoint
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STATS = re.compile(r"\[(\w+)\] prompt: (\d+) tokens?, time to first token: [^;]*; generation: (\d+) tokens?")  # "1 token"
CANDIDATES = ["Tell me a story", "What is the capital of France?", "Describe the sea", "Count to ten",
              "Write a long poem", "Explain gravity"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny checkpoint and two prompts whose greedy replies run long (no EOS in
    400 tokens), so a Ctrl-C lands while they stream; plus what the library says
    about them."""
    ckpt = make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")
    with amlx.load_sync(ckpt) as model:
        long = [p for p in CANDIDATES
                if model.complete_sync([{"role": "user", "content": p}], max_tokens=400).finish_reason == "length"]
        assert len(long) >= 2, "no prompt with a long reply: pick other candidates"
        first, second = long[:2]
        tok = model.tokenizer

        def prompt_tokens(messages):
            return len(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True),
                                  add_special_tokens=False))

        fresh_second = prompt_tokens([{"role": "user", "content": second}])
        first_alone = len(tok.encode(first, add_special_tokens=False))
    return dict(ckpt=ckpt, first=first, second=second, fresh_second=fresh_second,
                first_alone=first_alone)


def _spawn(ckpt: Path, *args: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(PYTHONPATH=python_path(ROOT), PYTHONIOENCODING="utf-8", HF_HUB_OFFLINE="1", TERM="dumb")
    # SIGINT back to its default in the child: a runner started in the background by a shell
    # without job control has it ignored, and the child would inherit that (Ctrl-C lost)
    child = pexpect.spawn(sys.executable, ["-m", "amlx", "chat", str(ckpt), *args], cwd=str(ROOT), env=env,
                          encoding="utf-8", codec_errors="replace", timeout=180, dimensions=(40, 200),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect_exact("/help lists the commands")
    child.expect_exact("> ")
    return child


def test_help_and_exit(setup):
    child = _spawn(setup["ckpt"])
    child.sendline("/help")
    child.expect_exact("/reset")
    child.expect_exact("/exit")
    child.expect_exact("> ")
    child.sendintr()  # at the prompt: the line is discarded, the chat goes on
    child.expect_exact("/exit or Ctrl-D leaves")
    child.expect_exact("> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation(setup):
    child = _spawn(setup["ckpt"], "--max-tokens", "30000", "-v")
    child.sendline(setup["first"])
    child.expect_exact(setup["first"])  # the terminal's echo
    child.expect(r"\S")  # the reply is streaming
    child.sendintr()
    child.expect_exact("(stopped; the reply so far stays in the conversation)")
    child.expect(STATS)
    how, prompt1, generated = child.match.group(1), int(child.match.group(2)), int(child.match.group(3))
    assert how == "interrupted" and 1 <= generated < 30000
    child.expect_exact("> ")

    child.sendline(setup["second"])
    child.expect_exact(setup["second"])  # the terminal's echo
    child.expect(r"\S")  # then the reply
    child.sendintr()  # stops it (or, had it ended already, discards an empty line)
    child.expect(STATS)
    prompt2 = int(child.match.group(2))
    # the second turn's prompt holds the first exchange: the first message and the partial reply
    assert prompt2 > setup["fresh_second"] + setup["first_alone"]
    assert prompt2 > prompt1
    child.expect_exact("> ")
    child.sendline("/reset")
    child.expect_exact("afresh")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
