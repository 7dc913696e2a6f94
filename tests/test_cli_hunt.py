"""The `amlx` command line as a first-hour user meets it: pipes, stdin, bytes that are not
UTF-8, closed standard files, Ctrl-C, and `amlx serve` on a port or host it cannot have.

Each end-to-end check runs `python -m amlx` in a subprocess with a timeout, so a hang fails
the test instead of blocking the run; the embedded demo model (no MODEL) keeps them fast.
Checks that never reach a model load run `main()` in this process. Found by this hunt:

- `amlx generate ... | head -c 10`: "amlx: error: Broken pipe" on stderr and status 1; now
  silent, status 141 (as a process that SIGPIPE ended).
- a prompt on stdin, PROMPT, --system or --stop holding bytes that are not UTF-8: the error
  spoke of "an unpaired surrogate at character 20" of the rendered chat template (and a bad
  --stop was taken silently); now one line naming stdin or the option and the byte.
- `amlx chat`: one such line ended the whole conversation with status 1; now it is skipped
  with a notice.
- a closed stdin/stderr (`<&-`, `2>&-`): the model's weights took descriptor 0 (MLX then
  refused to read them) or 2 (the process hung); a closed stdin with `-` was an
  AttributeError traceback. They now point at /dev/null.
- Ctrl-C while the parser was built (it imports the serve and train modules): a traceback.
- `amlx serve` on a port in use or a host it cannot bind: the model loaded, the banner said
  "on http://...", then uvicorn logged a bare errno and exited 3; now one line before the
  load. A binary --api-key-file was a bare codec error; a key that is not printable ASCII
  (which no HTTP client can send) locked every client out; both are now refused by name.
- `amlx demo --tokens 0` printed its banner, then an error about `max_tokens`; now argparse
  refuses --tokens by name.
- a bad sampling value (`--temperature nan`, `--max-tokens 0`) was found only after the model
  loaded (minutes for a large one), and by `amlx chat` only at the first message; now before.
- `--tensor-parallel 1000` started 999 local processes each loading the model, 10**20 was an
  OverflowError traceback; without AMLX_TP_HOSTFILE N is now at most the CPU cores.
- `amlx serve`: --max-context 0 and --kv-cache-memory 0 were refused only after the load; an empty
  --model-name was served as the model id "".
- `amlx lora --no-progress | head -1`: "amlx lora: error: Broken pipe"; now quiet, status 141.
- `amlx generate -` at a terminal waited without a word; it now says Ctrl-D ends the prompt.
- `--draft prompt-lookup` (a typo) said "prompt-lookup: not a directory", as if MODEL were
  missing; now the error names --draft, before the load.
- an empty path (`amlx generate "$MODEL" Hi`, MODEL unset) was taken for the current directory:
  "config.json: file not found"; now "MODEL is empty".
- `amlx serve --host ""` (an unset variable) listened on every interface (asyncio's rule for an
  empty host) while the banner said http://:8000; now refused.
- `AMLX_API_KEY=""` (set to nothing) served without a key, where `--api-key ""` is refused.
- a stdout whose encoding cannot hold the model's text (PYTHONIOENCODING=ascii, a Windows code
  page) ended the reply with "'ascii' codec can't encode character"; such characters are now '?'.
- `amlx serve --host ::1` announced http://::1:8000 (no URL); now http://[::1]:8000.
- errors named options in the library's spelling (`max_tokens must be ...`, `resume=True: ...`,
  `adapter_path ...`); generate/chat/lora now name them as typed (--max-tokens, --resume, ...).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amlx.cli import main
from helpers.environment import python_path

try:
    from tests.helpers.cli import main_in_process
except ImportError:  # tests/ itself on sys.path
    from helpers.cli import main_in_process

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds: a hung command fails its test


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHONIOENCODING", "LC_"))}
    # MLX's CPU kernel compile is not what these tests are about (it can take a minute on a cold cache)
    env.update(PYTHONPATH=python_path(ROOT), HF_HUB_OFFLINE="1", MLX_DISABLE_COMPILE="1", LC_ALL="C.UTF-8", **extra)
    return env


def amlx_cli(*args: str, input: bytes | None = None, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    if input is None and "stdin" not in kwargs:
        kwargs["stdin"] = subprocess.DEVNULL
    return subprocess.run([sys.executable, "-m", "amlx", *args], input=input, env=env or _env(), cwd=ROOT,
                          timeout=TIMEOUT, **kwargs)




def _one_error_line(stderr: str | bytes, pattern: str) -> None:
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if "error:" in line]
    assert len(lines) == 1, text
    assert re.search(pattern, lines[0]), lines[0]


# -- stdout to a pipe whose reader is gone ---------------------------------------------------

@pytest.mark.parametrize("command", [["generate", "Tell me a story", "--max-tokens", "20"],
                                     ["chat", "--max-tokens", "20"], ["demo", "--tokens", "8"]])
def test_a_closed_pipe_on_stdout_ends_quietly_with_sigpipes_status(command):
    # `amlx generate ... | head -c 10`: the reader is gone before the first token (its end closed
    # before the process starts, so there is no race with how much the model says)
    read, write = os.pipe()
    os.close(read)
    try:
        r = amlx_cli(*command, input=b"hello\n" if command[0] == "chat" else None, stdout=write)
    finally:
        os.close(write)
    err = r.stderr.decode()
    assert r.returncode == 141, err
    assert "error" not in err and "Traceback" not in err and "Exception ignored" not in err, err


# -- text that is not UTF-8 ------------------------------------------------------------------

@pytest.mark.parametrize("env", [{}, {"PYTHONIOENCODING": "utf-8"}], ids=["surrogateescape", "strict"])
def test_a_prompt_on_stdin_that_is_not_utf8_is_one_line_naming_stdin(env):
    r = amlx_cli("generate", "-", "--max-tokens", "4", input=b"Hel\xff\xfelo\n", env=_env(**env))
    assert r.returncode == 1
    _one_error_line(r.stderr, r"^amlx: error: the prompt on stdin is not utf-8 text \(.*byte 0xff at offset 3\)$")
    assert r.stdout == b""


def test_a_non_ascii_prompt_on_stdin_is_the_same_prompt_as_in_argv():
    # stdin is read as bytes and decoded; its CRLF line end is dropped whole (the text read left the \r)
    via_argv = amlx_cli("generate", "Héllo ✓ wörld", "--max-tokens", "8", "-v")
    via_stdin = amlx_cli("generate", "-", "--max-tokens", "8", "-v", input="Héllo ✓ wörld\r\n".encode())
    assert via_argv.returncode == via_stdin.returncode == 0, via_stdin.stderr
    assert via_argv.stdout == via_stdin.stdout and via_argv.stdout.strip()
    prompt_tokens = [re.search(rb"prompt: (\d+) tokens", r.stderr).group(1) for r in (via_argv, via_stdin)]
    assert prompt_tokens[0] == prompt_tokens[1]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(["PROMPT", "--system", "--stop"]),
       before=st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF, blacklist_categories=["Cs"]),
                      max_size=12).filter(lambda t: not t.startswith("-")),  # not an option
       byte=st.integers(0x80, 0xFF), after=st.text(max_size=4))
def test_arguments_holding_bytes_that_are_not_utf8_are_refused_by_name(capsys, where, before, byte, after):
    # what Python makes of `amlx generate $'Hel\xfflo'` in a UTF-8 locale: the byte as a lone surrogate
    bad = before + chr(0xDC00 + byte) + after
    argv = {"PROMPT": ["generate", bad], "--system": ["chat", "--system", bad],
            "--stop": ["generate", "Hi", "--stop", bad]}[where]
    rc, err = main_in_process(capsys, *argv, "--max-tokens", "2")
    assert rc == 1
    _one_error_line(err, rf"^amlx: error: {re.escape(where)} is not UTF-8 text \(byte {byte:#04x} at character "
                         rf"{len(before)}\)$")


def test_chat_skips_a_line_that_is_not_utf8_and_goes_on():
    r = amlx_cli("chat", "--max-tokens", "4", input=b"hi\nab\xffcd\nhello\n")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "(the line is not UTF-8 text and was not sent)" in err and "error" not in err
    assert len(r.stdout.decode().strip().splitlines()) == 2  # the replies to "hi" and to "hello"


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory) -> Path:
    """A tiny random checkpoint: its greedy text is full of characters outside ASCII."""
    try:
        from tests.helpers.checkpoints import make_checkpoint
    except ImportError:  # tests/ itself on sys.path
        from helpers.checkpoints import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_text_a_stdout_encoding_cannot_hold_is_replaced_not_an_error(random_ckpt, encoding):
    # PYTHONIOENCODING=ascii (or a Windows code page for `> out.txt`): the reply ended at its first
    # such character with "amlx: error: 'ascii' codec can't encode character"
    args = ("generate", str(random_ckpt), "Héllo", "--raw", "--max-tokens", "30")
    utf8 = amlx_cli(*args)
    narrow = amlx_cli(*args, env=_env(PYTHONIOENCODING=encoding))
    assert utf8.returncode == 0 and narrow.returncode == 0, narrow.stderr
    text = utf8.stdout.decode("utf-8")
    assert any(ord(c) > 255 for c in text), text  # else the check below proves nothing
    assert narrow.stdout == text.encode(encoding, "replace")
    assert b"error" not in narrow.stderr


# -- closed standard files -------------------------------------------------------------------

@pytest.mark.parametrize("fd", [0, 2])
def test_a_closed_stdin_or_stderr_is_no_home_for_the_weights(fd):
    # `amlx generate Hi <&-` failed to read the weights, which had taken descriptor 0;
    # `amlx generate Hi 2>&-` hung, the weights' file standing in for stderr
    r = amlx_cli("generate", "Hi", "--max-tokens", "4", preexec_fn=lambda: os.close(fd),
                 **({"stdin": None} if fd == 0 else {"stderr": None}))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_a_prompt_from_a_closed_stdin_is_empty_not_a_traceback():
    r = amlx_cli("generate", "-", "--max-tokens", "4", stdin=None, preexec_fn=lambda: os.close(0))
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr


# -- Ctrl-C ----------------------------------------------------------------------------------

def test_ctrl_c_while_the_parser_is_built_exits_130(capsys, monkeypatch):
    # building the parser imports the serve and train modules: a Ctrl-C there was a traceback
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr("amlx.cli.parser", interrupted)
    try:
        rc = main(["generate", "Hi"])
    except KeyboardInterrupt:  # uncaught, pytest would take it as the user's and stop the session
        pytest.fail("the KeyboardInterrupt escaped main()")
    assert rc == 130 and capsys.readouterr().err == "\n"


def test_ctrl_c_while_a_reply_streams_exits_130_without_a_traceback():
    proc = subprocess.Popen([sys.executable, "-m", "amlx", "generate", "Tell me a long story", "--max-tokens",
                             "100000", "--temperature", "1", "--seed", "3", "--raw", "-v"], env=_env(), cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.read(1)  # the reply has started
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert first, err
    if proc.returncode == 0:  # the reply ended (eos) before the signal came: nothing to check
        pytest.skip("the reply ended before Ctrl-C")
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and b"[interrupted]" in err


# -- amlx demo -------------------------------------------------------------------------------

@pytest.mark.parametrize("value, cause", [("0", "must be at least 1, not 0"), ("-3", "must be at least 1, not -3"),
                                          ("x", "not an integer: 'x'")])
def test_demo_refuses_a_token_count_by_name_before_loading(capsys, value, cause):
    rc, err = main_in_process(capsys, "demo", "--tokens", value)
    assert rc == 2
    assert err.splitlines()[-1] == f"amlx demo: error: argument --tokens: {cause}"


# -- amlx serve: where it listens and its keys ---------------------------------------------

@pytest.fixture
def busy_port():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def test_serve_on_a_port_in_use_says_so_before_loading(capsys, tmp_path, busy_port):
    # the model is a missing directory: an error about it would mean the load came first
    rc, err = main_in_process(capsys, "serve", str(tmp_path / "no-model"), "--port", str(busy_port))
    assert rc == 1
    _one_error_line(err, rf"^amlx serve: error: cannot listen on 127\.0\.0\.1 port {busy_port}: Address already "
                         r"in use \(another program holds it; pick another --port\)$")


@pytest.mark.parametrize("host, cause", [
    ("no-such-host.invalid", r"--host no-such-host\.invalid: not a host name or address"),
    ("192.0.2.1", r"cannot listen on 192\.0\.2\.1 port \d+: Cannot assign requested address \(no network interface"),
    ("::zz", r"--host ::zz: not a host name or address"),
])
def test_serve_on_a_host_it_cannot_bind_says_so_before_loading(capsys, tmp_path, host, cause):
    rc, err = main_in_process(capsys, "serve", str(tmp_path / "no-model"), "--host", host, "--port", "18765")
    assert rc == 1
    _one_error_line(err, rf"^amlx serve: error: {cause}")


def test_serve_on_a_port_in_use_as_a_subprocess(busy_port):
    r = amlx_cli("serve", "--port", str(busy_port))
    assert r.returncode == 1
    _one_error_line(r.stderr, rf"^amlx serve: error: cannot listen on 127\.0\.0\.1 port {busy_port}: ")
    assert b"amlx serve: embedded" not in r.stderr  # no banner of a server that never ran


def test_serve_refuses_a_binary_key_file_by_name(capsys, tmp_path):
    keys = tmp_path / "keys.bin"
    keys.write_bytes(b"\xff\xfe\x00k\n")
    rc, err = main_in_process(capsys, "serve", str(tmp_path / "no-model"), "--api-key-file", str(keys))
    assert rc == 1
    _one_error_line(err, rf"^amlx serve: error: --api-key-file {re.escape(str(keys))}: not UTF-8 text \(invalid "
                         r"start byte at byte 0\)$")


@pytest.mark.parametrize("source", ["--api-key", "--api-key-file", "$AMLX_API_KEY"])
@pytest.mark.parametrize("key", ["kéy", "k\udcffey", "a\x07b", "k\u2009ey"])
def test_serve_refuses_a_key_no_http_client_can_send(capsys, tmp_path, monkeypatch, source, key):
    # a key goes in the Authorization header, printable ASCII only: any other locked every client out
    monkeypatch.delenv("AMLX_API_KEY", raising=False)
    args = ["serve", str(tmp_path / "no-model")]
    if source == "--api-key":
        args += ["--api-key", key]
    elif source == "--api-key-file":
        (tmp_path / "keys").write_text(key + "\n", encoding="utf-8", errors="surrogateescape")
        args += ["--api-key-file", str(tmp_path / "keys")]
    else:
        monkeypatch.setenv("AMLX_API_KEY", key.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
    rc, err = main_in_process(capsys, *args)
    assert rc == 1
    where = re.escape(source if source != "--api-key-file" else f"--api-key-file {tmp_path / 'keys'}")
    cause = "not UTF-8 text" if source == "--api-key-file" and "\udcff" in key else \
        "a key holds a character other than printable ASCII"
    _one_error_line(err, rf"^amlx serve: error: {where}: {cause}")
    assert key not in err  # the key itself is not written to the terminal


def test_ctrl_c_on_a_running_server_ends_it_cleanly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "amlx", "serve", "--port", str(port)], env=_env(), cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen = b""
        while b"Uvicorn running" not in seen:
            line = proc.stderr.readline()
            assert line, seen
            seen += line
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err and b"Finished server process" in err


# -- option values, refused before anything loads -------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["generate", "chat"]), case=st.one_of(
    st.tuples(st.just("--max-tokens"), st.integers(max_value=0) | st.integers(min_value=2**31)),
    st.tuples(st.just("--temperature"), st.sampled_from(["nan", "-1", "inf", "1e9"])),
    st.tuples(st.just("--top-p"), st.sampled_from(["nan", "0", "-0.5", "1.5"])),
    st.tuples(st.just("--min-p"), st.sampled_from(["nan", "-1", "2"])),
    st.tuples(st.just("--top-k"), st.integers(max_value=-1)),
    st.tuples(st.just("--repetition-penalty"), st.sampled_from(["nan", "0", "-1", "inf"])),
))
def test_bad_sampling_values_are_refused_before_the_model_loads(capsys, tmp_path, command, case):
    # the model is a missing directory: an error about it would mean the load came first (a load of
    # minutes for a large model; `amlx chat` found the value only at the first message)
    flag, value = case
    args = [command, str(tmp_path / "no-model"), *(["Hi"] if command == "generate" else []), f"{flag}={value}"]
    rc, err = main_in_process(capsys, *args)
    assert rc == 1
    _one_error_line(err, rf"^amlx: error: {flag} must be ")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["generate", "chat", "serve"]),
       size=st.integers(min_value=(os.cpu_count() or 1) + 3, max_value=10**30))
def test_a_tensor_parallel_size_past_this_machines_cores_is_refused(capsys, monkeypatch, tmp_path, command, size):
    # every rank is a local process without a hostfile: 1000 started 999 processes each loading
    # the model, and 10**20 was an OverflowError traceback. (MODEL is a missing directory, so that
    # should the check go, the load fails before any rank is started.)
    monkeypatch.delenv("AMLX_TP_HOSTFILE", raising=False)
    rc, err = main_in_process(capsys, command, str(tmp_path / "no-model"), *(["Hi"] if command == "generate" else []),
                    "--tensor-parallel", str(size))
    assert rc == 2
    assert re.fullmatch(rf"amlx {command}: error: argument --tensor-parallel: {size} ranks would be {size} "
                        r"processes on this machine's \d+ CPU cores \(AMLX_TP_HOSTFILE spreads ranks over hosts; "
                        r"docs/scaling\.md\)", err.splitlines()[-1]), err


@pytest.mark.parametrize("value, cause", [("0", "must be at least 1, not 0"), ("-2", "must be at least 1, not -2"),
                                          ("two", "not an integer: 'two'")])
def test_a_tensor_parallel_size_below_one_is_refused_by_argparse(capsys, tmp_path, value, cause):
    rc, err = main_in_process(capsys, "generate", str(tmp_path / "no-model"), "Hi", "--tensor-parallel", value)
    assert rc == 2 and err.splitlines()[-1] == f"amlx generate: error: argument --tensor-parallel: {cause}"


@pytest.mark.parametrize("args, message", [
    (["--max-context", "0"], "--max-context must be at least 2 tokens, not 0"),
    (["--max-context", "-5"], "--max-context must be at least 2 tokens, not -5"),
    (["--kv-cache-memory", "0"], "--kv-cache-memory must be more than 0, not 0"),
    (["--kv-cache-memory=-1GB"], "--kv-cache-memory must be more than 0, not -1000000000"),
    (["--kv-cache-memory", "0.0"], "--kv-cache-memory must be more than 0, not 0.0"),
    (["--model-name", ""], "--model-name is empty (clients name the model they ask for with it)"),
    (["--model-name", "  "], "--model-name is empty (clients name the model they ask for with it)"),
])
def test_serve_refuses_sizes_and_names_the_load_would_refuse_before_loading(capsys, tmp_path, args, message):
    # --max-context 0 and --kv-cache-memory 0 were refused by the load, after it had read the weights;
    # an empty --model-name served a model whose id was ""
    rc, err = main_in_process(capsys, "serve", str(tmp_path / "no-model"), *args)
    assert rc == 2
    assert err.splitlines()[-1] == f"amlx serve: error: {message}"


def test_lora_with_no_progress_into_a_closed_pipe_ends_quietly(tmp_path):
    # `amlx lora ... --no-progress | head -1` said "amlx lora: error: Broken pipe" and exited 1
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n{"text": "foo bar"}\n')
    read, write = os.pipe()
    os.close(read)
    try:
        r = amlx_cli("lora", str(ROOT / "amlx" / "embedded"), "--data", str(data), "--iters", "3", "--batch-size", "1",
                     "--no-progress", "--adapter-path", str(tmp_path / "ad"), stdout=write)
    finally:
        os.close(write)
    err = r.stderr.decode()
    assert r.returncode == 141, err
    assert "error" not in err and "Traceback" not in err and "Exception ignored" not in err, err


def test_a_prompt_read_from_a_terminal_says_how_to_end_it():
    # `amlx generate -` at a terminal waited for stdin without a word, which looked like a hang
    pexpect = pytest.importorskip("pexpect")
    env = _env(TERM="dumb")
    child = pexpect.spawn(sys.executable, ["-m", "amlx", "generate", "-", "--max-tokens", "4"], cwd=str(ROOT),
                          env=env, encoding="utf-8", codec_errors="replace", timeout=TIMEOUT)
    try:
        child.expect_exact("amlx: reading the prompt from the terminal; end it with Ctrl-D", timeout=60)
        child.sendline("Hi")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
    assert "Hello!" in child.before


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
@pytest.mark.parametrize("draft, what", [("prompt-lookup", "does not exist"), ("no/such/dir", "does not exist"),
                                         ("README.md", "is not a directory")])
def test_a_draft_that_is_no_directory_is_named_as_the_draft(capsys, command, draft, what):
    # "amlx: error: prompt-lookup: not a directory" read as if MODEL were missing
    rc, err = main_in_process(capsys, command, *(["Hi"] if command == "generate" else []), "--draft", draft)
    assert rc == (2 if command == "serve" else 1)
    prefix = "amlx serve" if command == "serve" else "amlx"
    assert err.splitlines()[-1] == (f"{prefix}: error: --draft {draft}: {what} (a draft model's checkpoint "
                                    f"directory, or 'prompt_lookup')")


@pytest.mark.parametrize("argv, name", [
    (["generate", "", "Hi"], "MODEL"), (["chat", ""], "MODEL"), (["serve", ""], "MODEL"),
    (["convert", "", "out"], "SRC"), (["convert", "amlx/embedded", ""], "DST"),
    (["lora", "amlx/embedded", "--data", ""], "--data"), (["generate", "Hi", "--adapter", ""], "--adapter"),
    (["serve", "--log-requests", ""], "--log-requests"), (["serve", "--api-key-file", ""], "--api-key-file"),
])
def test_an_empty_path_is_named_not_taken_for_the_current_directory(capsys, argv, name):
    # `amlx generate "$MODEL" Hi` with MODEL unset: "config.json: file not found" (of the current
    # directory); `amlx convert SRC ""`: "dst . must lie outside the source checkpoint ."
    rc, err = main_in_process(capsys, *argv)
    assert rc == 1
    assert err.splitlines()[-1] == f"amlx: error: {name} is empty (an unset shell variable?)"


@pytest.mark.parametrize("host", ["", " "])
def test_serve_refuses_an_empty_host_which_would_listen_everywhere(capsys, tmp_path, host):
    # asyncio's create_server binds every interface for host "": an unset variable exposed the server
    rc, err = main_in_process(capsys, "serve", str(tmp_path / "no-model"), "--host", host)
    assert rc == 2
    assert err.splitlines()[-1] == ("amlx serve: error: --host is empty (--host 0.0.0.0 listens on every interface, "
                                    "if that is what you want)")


@pytest.mark.parametrize("value", ["", "  ", "\t\n"])
def test_serve_refuses_an_api_key_variable_set_to_nothing(capsys, tmp_path, monkeypatch, value):
    # AMLX_API_KEY="$(cat missing-file)" served without a key, where --api-key "" is refused
    monkeypatch.setenv("AMLX_API_KEY", value)
    rc, err = main_in_process(capsys, "serve", str(tmp_path / "no-model"))
    assert rc == 1
    assert err.splitlines()[-1] == ("amlx serve: error: $AMLX_API_KEY is set but empty (the server would run "
                                    "without a key; unset it for that)")


def test_the_banner_of_a_server_on_an_ipv6_address_is_a_url_that_answers():
    # it said http://::1:PORT, which no browser or client takes
    import httpx

    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "amlx", "serve", "--host", "::1", "--port", str(port)], env=_env(),
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        banner = ""
        while "amlx serve: " not in banner:  # notices (a first-run compile) may come first
            banner = proc.stderr.readline().decode()
            assert banner, "the server ended before its banner"
        assert f" on http://[::1]:{port}  (chat page at /" in banner, banner
        url = banner.split(" on ", 1)[1].split()[0]
        seen = b""
        while b"Uvicorn running" not in seen:
            line = proc.stderr.readline()
            assert line, seen
            seen += line
        assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()


@pytest.mark.parametrize("args, message", [
    (["--iters", "0"], "--iters must be an integer >= 1, not 0"),
    (["--dropout", "1.5"], "--dropout must lie in [0, 1), not 1.5"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number >= 0.0, not nan"),
    (["--resume"], "--resume: {ad} holds no adapters.safetensors to resume from (an adapter saved by a training run)"),
    (["--adapter-path", "amlx/embedded"], "--adapter-path amlx/embedded is the checkpoint directory being trained; "
                                          "give the adapter a directory of its own (a subdirectory will do)"),
])
def test_lora_errors_name_the_option_as_typed(capsys, tmp_path, args, message):
    # "iters must be ...", "resume=True: ...", "adapter_path ...": the library's names, not the flags
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n')
    rc, err = main_in_process(capsys, "lora", str(ROOT / "amlx" / "embedded"), "--data", str(data), "--no-progress",
                    "--adapter-path", str(tmp_path / "ad"), *args)
    assert rc == 1
    assert err.splitlines()[-1] == "amlx lora: error: " + message.format(ad=tmp_path / "ad")


def test_lora_leaves_a_message_about_a_data_file_named_like_an_option_alone(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("iters").write_text('{"text": "hello"}\n{"nope": 1}\n')
    rc, err = main_in_process(capsys, "lora", str(ROOT / "amlx" / "embedded"), "--data", "iters", "--no-progress")
    assert rc == 1 and err.splitlines()[-1].startswith("amlx lora: error: iters:2: "), err


@pytest.mark.parametrize("argv, message", [
    (["generate", "Hi", "--num-draft-tokens", "0"], "amlx: error: --num-draft-tokens must be an integer in [1, 16]"),
    (["convert", "amlx/embedded", "{tmp}/out", "-q", "4", "--group-size", "7"],
     "amlx: error: --group-size must be one of 32, 64, 128, not 7"),
    (["convert", "amlx/embedded", "amlx/embedded/out"], "amlx: error: dst amlx/embedded/out must lie outside"),
])
def test_errors_of_generate_and_convert_name_the_option_as_typed(capsys, tmp_path, argv, message):
    rc, err = main_in_process(capsys, *(a.format(tmp=tmp_path) for a in argv))
    assert rc == 1
    assert err.splitlines()[-1].startswith(message), err


# -- any value for any option ----------------------------------------------------------------

_OPTIONS = {
    "generate": ["--max-tokens", "--temperature", "--top-p", "--top-k", "--min-p", "--repetition-penalty", "--seed",
                 "--stop", "--num-draft-tokens", "--tensor-parallel", "--device", "--dtype", "--adapter", "--draft"],
    "serve": ["--port", "--host", "--max-batch-size", "--max-queue", "--max-context", "--kv-cache-memory", "--kv-bits",
              "--keepalive", "--model-name", "--api-key", "--num-draft-tokens", "--tensor-parallel", "--draft"],
    "convert": ["-q", "--group-size", "--dtype"],
}
_ODD = ["nan", "inf", "-inf", "1e400", "-0", "0x10", "1_000", "١٢", "²", " 5 ", "5GB", "1e5GB", ".5", "5.", "-1e-9",
        "99999999999999999999999", "\x85", ""]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(sorted(_OPTIONS)), data=st.data())
def test_any_value_of_any_option_is_an_exit_status_and_one_error_line(capsys, tmp_path, command, data):
    # MODEL/SRC is a missing directory, so nothing loads: every run ends in an error, which must be
    # a status and a line of text, never an exception out of main()
    option = data.draw(st.sampled_from(_OPTIONS[command]))
    value = data.draw(st.sampled_from(_ODD) | st.text(max_size=10))
    missing = str(tmp_path / "no-model")
    before = {"generate": [missing, "Hi"], "serve": [missing, "--port", "1"], "convert": [missing, str(tmp_path / "o")]}
    rc, err = main_in_process(capsys, command, *before[command], f"{option}={value}")
    assert rc in (1, 2), err
    last = err.rstrip("\n").split("\n")[-1]
    assert "error:" in last and "Traceback" not in err, err
