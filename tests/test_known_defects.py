"""Regressions for defects that were known and left open: a tokenizer.json whose post-processor
or normalizer multiplies every text, huggingface_hub's cached file listings read with a plain
open(), Ctrl-C while `amlx` starts, tool calls with `"arguments": null`, and a reasoning section
opened further back than the prompt's last few tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from amlx.errors import ModelLoadError
from amlx.tokenizer import Tokenizer
from helpers.tokenizers import write_tokenizer
from helpers.environment import python_path
from helpers.hub import COMMIT, hub_cache


# -- 1. a tokenizer.json that multiplies every text ------------------------------------------------

def _tokenizer_dir(tmp_path: Path, kind: str, **replace) -> Path:
    """A test tokenizer of `kind` with tokenizer.json's top-level entries `replace`d."""
    d = tmp_path / f"tok-{kind}"
    write_tokenizer(d, kind)
    data = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    data.update(replace)
    (d / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return d


def _template(single: list) -> dict:
    return {"type": "TemplateProcessing", "single": single, "pair": single, "special_tokens": {}}


_A = {"Sequence": {"id": "A", "type_id": 0}}


@pytest.mark.parametrize("kind", ["bpe", "spm"])
@pytest.mark.parametrize("entries, cause", [
    # the text's tokens written 1000 times: a 10 KB prompt was 600,000 ids before any length check
    ({"post_processor": _template([_A] * 1000)}, "writes the tokens of every text 1000 times"),
    ({"post_processor": _template([_A, {"Sequence": {"id": "B", "type_id": 1}}])}, "2 times"),
    # ten doublings, one after another
    ({"post_processor": {"type": "Sequence", "processors": [_template([_A, _A])] * 10}}, "1024 times"),
    # a "special token" of 5000 ids before every text
    ({"post_processor": {**_template([{"SpecialToken": {"id": "<x>", "type_id": 0}}, _A]), "special_tokens": {
        "<x>": {"id": "<x>", "ids": [1] * 5000, "tokens": ["x"] * 5000}}}}, "adds 5000 special-token ids"),
    # every space a thousand characters; every gap between characters (a regex matching nothing)
    ({"normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "x" * 1000}},
     "normalizer (Replace) can make one character into more than 128"),
    ({"normalizer": {"type": "Sequence", "normalizers": [
        {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": "a*"}, "content": "y" * 200}]}},
     "normalizer (Sequence)"),
    ({"normalizer": {"type": "Prepend", "prepend": "z" * 500}}, "normalizer (Prepend)"),
])
def test_a_tokenizer_that_multiplies_every_text_is_refused_at_load(tmp_path, kind, entries, cause):
    """A hostile tokenizer.json could make any prompt millions of ids (and as much time and
    memory) before the context-length check refused it: refused at load instead, naming the
    file and the cause, so that encoding stays bounded in the text's length."""
    d = _tokenizer_dir(tmp_path, kind, **entries)
    with pytest.raises(ModelLoadError) as info:
        Tokenizer.from_dir(d)
    msg = str(info.value)
    assert msg.startswith(f"{d / 'tokenizer.json'}: refused: ") and cause in msg, msg


_LLAMA3_POST = {"type": "Sequence", "processors": [
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
    {"type": "TemplateProcessing",
     "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, _A],
     "pair": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, _A,
              {"SpecialToken": {"id": "<|im_start|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
     "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [0], "tokens": ["<|im_start|>"]}}}]}


@pytest.mark.parametrize("kind, entries", [
    ("bpe", {}),  # Qwen: NFC, ByteLevel post-processor
    ("spm", {}),  # Gemma: Replace " " -> "▁", "<bos> $A"
    ("bpe", {"post_processor": _LLAMA3_POST, "normalizer": None}),  # Llama 3
    ("spm", {"normalizer": {"type": "Sequence", "normalizers": [  # Mistral / Llama 2
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}}),
    ("bpe", {"normalizer": {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]}}),
    ("bpe", {"normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                            "strip_accents": None, "lowercase": True}}),
])
def test_real_tokenizer_shapes_still_load(tmp_path, kind, entries):
    d = _tokenizer_dir(tmp_path, kind, **entries)
    tok = Tokenizer.from_dir(d)
    assert tok.decode(tok.encode("hello world", add_special_tokens=False)).lower().strip() in (
        "hello world", "▁hello world", "hello▁world")


# -- 2. huggingface_hub's cached file listings -------------------------------------------------------


def _cache(tmp_path: Path) -> tuple[Path, Path]:
    """A Hugging Face cache holding acme/tiny at COMMIT; (the cache, its trees/<commit>.json path)."""
    cache, repo = hub_cache(tmp_path)
    (repo / "trees").mkdir()
    return cache, repo / "trees" / f"{COMMIT}.json"


def _resolve(cache: Path) -> Path:
    from amlx.hub import resolve_model

    return resolve_model("acme/tiny", cache_dir=cache, download=False)


def test_a_fifo_as_the_cached_file_listing_does_not_block(tmp_path):
    """huggingface_hub 2.x reads trees/<commit>.json (the revision's file listing, to tell a
    complete snapshot) whole with a plain open(): a FIFO there blocked amlx.load("org/name")
    forever, as refs/main did. (A watchdog writes to the FIFO should the lookup block, so a
    regression fails instead of hanging the suite.)"""
    cache, tree = _cache(tmp_path)
    os.mkfifo(tree)
    result: dict = {}

    def lookup():
        try:
            result["path"] = _resolve(cache)
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(60)
    if thread.is_alive():
        with open(tree, "w") as f:  # the blocked reader takes this and goes on
            f.write("{}")
        thread.join()
        pytest.fail("the lookup blocked reading a FIFO at trees/<commit>.json")
    assert isinstance(result.get("error"), ModelLoadError), result
    msg = str(result["error"])
    assert str(tree) in msg and "not a regular file" in msg


def test_a_huge_cached_file_listing_is_refused_unread(tmp_path):
    """A listing of gigabytes was read whole into memory (and parsed) by huggingface_hub."""
    cache, tree = _cache(tmp_path)
    with open(tree, "wb") as f:
        f.truncate((64 << 20) + 1)  # (sparse: no disk space)
    with pytest.raises(ModelLoadError) as info:
        _resolve(cache)
    assert str(tree) in str(info.value) and "more than the 67108864 bytes" in str(info.value)


def test_a_plain_cached_file_listing_still_resolves(tmp_path):
    cache, tree = _cache(tmp_path)
    tree.write_text(json.dumps({"format_version": 1, "files": {"config.json": {"size": 2, "blob_id": "x"}}}))
    (tree.parent / "tmpab12.tmp").mkdir()  # (not a listing: never read)
    assert _resolve(cache) == cache / "models--acme--tiny" / "snapshots" / COMMIT


@pytest.mark.parametrize("text", ["../../outside", "main", COMMIT[:39], COMMIT + "/.."])
def test_a_cached_ref_that_is_not_a_commit_is_refused(tmp_path, text):
    """huggingface_hub joins refs/main's text onto snapshots/ as it is: "../../outside" there
    had the load read a checkpoint from a folder outside the cache."""
    cache, _ = _cache(tmp_path)
    outside = cache / "models--acme--tiny" / "snapshots" / text
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "config.json").write_text("{}")
    (cache / "models--acme--tiny" / "refs" / "main").write_text(text)
    with pytest.raises(ModelLoadError) as info:
        _resolve(cache)
    assert "refs/main" in str(info.value) and "40 hex digits" in str(info.value)



# -- 3. Ctrl-C while `amlx` starts --------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]

# Put on PYTHONPATH as sitecustomize: at the first lookup of module $SIGINT_AT, this process
# sends itself SIGINT (and writes the module's name to $SIGINT_MARK, to show it came): a Ctrl-C
# at that moment of start-up, every run alike.
_HOOK = """
import os, signal, sys

class _Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["SIGINT_AT"]:
            sys.meta_path.remove(self)
            with open(os.environ["SIGINT_MARK"], "w") as f:
                f.write(name)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, _Interrupt())
"""


def _amlx_script() -> str | None:
    """The installed `amlx` console script of this Python, if there is one."""
    script = Path(sys.executable).parent / "amlx"
    return str(script) if script.is_file() else None


@pytest.mark.parametrize("entry", ["python -m amlx", "amlx"])
@pytest.mark.parametrize("module", [
    "amlx.errors",  # the package's first import
    "amlx.model", "amlx._mlx", "amlx.engine",  # the heavy part: MLX, the engine
    "amlx.convert",  # the package's last import
    "amlx.cli", "argparse", "amlx.cli_streams",  # the command line's module, and what it imports
])
def test_ctrl_c_while_amlx_starts_exits_130_without_a_traceback(tmp_path, entry, module):
    """A Ctrl-C in the second or so that `amlx` spends importing (before its main() runs, which
    exits 130 quietly on one) printed a KeyboardInterrupt traceback and the process died of the
    signal."""
    if entry == "amlx" and _amlx_script() is None:
        pytest.skip("no amlx console script installed beside this Python")
    command = [sys.executable, "-m", "amlx"] if entry == "python -m amlx" else [_amlx_script()]
    r = _interrupted([*command, "generate", "--help"], tmp_path, module)
    assert (r.returncode, r.stderr) == (130, b"\n"), r.stderr.decode(errors="replace")
    assert r.stdout == b""


def _interrupted(command: list[str], tmp_path: Path, module: str) -> subprocess.CompletedProcess:
    """`command` run with a Ctrl-C at the first lookup of `module` (checked to have come)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOOK)
    mark = tmp_path / "mark"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHONIOENCODING"))}
    env.update(PYTHONPATH=python_path(hook, ROOT), HF_HUB_OFFLINE="1", MLX_DISABLE_COMPILE="1",
               SIGINT_AT=module, SIGINT_MARK=str(mark))
    r = subprocess.run(command, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    assert mark.read_text() == module  # (the Ctrl-C came where meant)
    return r


def test_ctrl_c_while_a_program_imports_amlx_stays_its_own(tmp_path):
    """Only the command turns a Ctrl-C during the import into its quiet exit: a program that
    imports the library gets the KeyboardInterrupt, to handle or die of as it will."""
    r = _interrupted([sys.executable, "-c", "import amlx"], tmp_path, "amlx.model")
    assert r.returncode != 130 and b"KeyboardInterrupt" in r.stderr


# -- 4. tool calls with "arguments": null ------------------------------------------------------------

@pytest.mark.parametrize("fmt, text", [
    ("qwen", '<tool_call>{"name": "now", "arguments": null}</tool_call>'),
    ("qwen", '<tool_call>\n{"name": "now", "arguments": null}\n'),  # unclosed at the end
    ("llama3", '{"name": "now", "parameters": null}'),
    ("llama3", '<|python_tag|>{"name": "now", "arguments": null}'),
    ("mistral", '[TOOL_CALLS][{"name": "now", "arguments": null}]'),
    ("mistral", '[TOOL_CALLS]now[ARGS]null'),
])
def test_null_arguments_are_no_arguments(fmt, text):
    """`"arguments": null` (a model's way to call a function that takes none) made the whole
    call plain text. It is a call with {} arguments, as `""` and a missing key already were.
    What others do: OpenAI's API always sends `arguments` as a string holding a JSON object
    ("{}" for a function without parameters; the SDKs JSON.parse it), and vLLM's parsers
    json.dumps what the model wrote, so a client receives "null" and must cope with it; amlx
    sends "{}", which every client that expects an object reads."""
    from amlx.toolcalls import ToolCallParser, parse_tool_calls

    content, [call] = parse_tool_calls(text, fmt)
    assert (content, call.name, call.arguments) == ("", "now", "{}")
    parser = ToolCallParser(fmt)  # one character at a time, as a stream
    events = [e for ch in text for e in parser.feed(ch)] + parser.finish()
    assert [(e.name, e.arguments) for e in events if not isinstance(e, str)] == [("now", "{}")]
    assert "".join(e for e in events if isinstance(e, str)) == ""
    # other non-objects are still no call
    for other in ("[]", "3", "true"):
        assert parse_tool_calls(text.replace("null", other), fmt)[1] == []


# -- 5. a reasoning section opened further back than the prompt's last few tokens ---------------------

_PREAMBLE = "The user can see none of this. Think step by step, and check each step twice before answering."


def test_a_reasoning_section_opened_before_fixed_text_is_open():
    """Only the prompt's end counted (text ending in `<think>`; from token ids, its last 8
    decoded): a template whose generation prompt writes `<think>\\n` and then fixed text, or a
    continued assistant message stopped inside its reasoning, left the reply taken as outside
    the section, so a call the model wrote while reasoning went out as a real one."""
    from amlx.toolcalls import opens_reasoning

    assert opens_reasoning("<|im_start|>assistant\n<think>\n" + _PREAMBLE, "qwen")
    assert opens_reasoning("[INST]hi[/INST][THINK]" + _PREAMBLE, "mistral")
    # as before: a closed section, a marker in an earlier turn, a format without reasoning
    assert not opens_reasoning("<|im_start|>assistant\n<think>\n" + _PREAMBLE + "</think>\n\nSo", "qwen")
    assert not opens_reasoning("<|im_start|>system\nUse <think>. " + _PREAMBLE + "<|im_end|>\n"
                               "<|im_start|>assistant\n", "qwen")
    assert not opens_reasoning("[SYSTEM_PROMPT]Write [THINK] first[/SYSTEM_PROMPT][INST]hi[/INST]", "mistral")
    assert not opens_reasoning("<think>\n" + _PREAMBLE, "llama3")


class _Counting:
    """A tokenizer that records how many ids each decode was given."""

    def __init__(self, tok):
        self._tok = tok
        self.decoded: list[int] = []
        self.special_token_ids = tok.special_token_ids

    def token_to_id(self, token):
        return self._tok.token_to_id(token)

    def decode(self, ids):
        self.decoded.append(len(ids))
        return self._tok.decode(ids)


@pytest.mark.parametrize("kind, head", [
    ("bpe", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),  # `<think>` one added token, not special
    ("spm", "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"),  # `<think>` several pieces
])
def test_prompt_ids_that_open_reasoning_further_back(tmp_path, kind, head):
    from amlx.toolcalls import prompt_opens_reasoning

    write_tokenizer(tmp_path / kind, kind)
    tok = _Counting(Tokenizer.from_dir(tmp_path / kind))

    def opens(text):
        ids = tok._tok.encode(text, add_special_tokens=False)
        return prompt_opens_reasoning(tok, ids, "qwen")

    assert len(tok._tok.encode(_PREAMBLE, add_special_tokens=False)) > 8
    assert opens(head + "<think>\n" + _PREAMBLE)
    assert opens(head + "<think>\n")
    assert not opens(head + "<think>\n" + _PREAMBLE + "\n</think>\n\n")
    assert not opens(head + "<think>\n\n</think>\n\n" + _PREAMBLE)
    assert not opens(head.replace("hi", "Use <think>. " + _PREAMBLE) + "Sure")
    assert not opens(head)
    # a prompt without turns: all of it is the reply's, read back a bounded number of ids
    long = (_PREAMBLE + " ") * 400
    tok.decoded.clear()
    assert opens("<think>\n" + _PREAMBLE) and not opens(long)
    assert max(tok.decoded) <= 4096 < len(tok._tok.encode(long, add_special_tokens=False))


def test_prompt_ids_of_mistral_control_tokens(tmp_path):
    """Magistral's [THINK] and [TOOL_CALLS] are special (control) tokens: they are no turn's
    start, as [/INST] is."""
    import tokenizers

    from amlx.toolcalls import prompt_opens_reasoning

    write_tokenizer(tmp_path, "bpe")
    backend = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    backend.add_special_tokens(["[INST]", "[/INST]", "[THINK]", "[/THINK]", "[TOOL_CALLS]"])
    tok = Tokenizer(backend)

    def opens(text):
        return prompt_opens_reasoning(tok, tok.encode(text, add_special_tokens=False), "mistral")

    assert opens("[INST]hi[/INST][THINK]" + _PREAMBLE)
    assert opens("[INST]hi[/INST][THINK]" + _PREAMBLE + " maybe [TOOL_CALLS]f")
    assert not opens("[INST]hi[/INST][THINK]" + _PREAMBLE + "[/THINK]Answer")
    assert not opens("[INST]Write [THINK] first. " + _PREAMBLE + "[/INST]")

