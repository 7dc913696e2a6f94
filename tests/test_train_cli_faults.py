"""Robustness of fine-tuning inputs and of the command line.

Bad training data (records that are not Unicode text, JSON lines Python's json
cannot take, chat records of the wrong types) is a `DataError` naming the file,
the line and the cause; bad options are a ValueError / TypeError before any
training step; a loss that turns non-finite stops the run with an error instead
of training on NaN; the command line answers bad arguments with one error line
and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amlx
from amlx.tokenizer import Tokenizer
from amlx.train.data import DataError, load_dataset
from helpers.environment import python_path

try:
    from tests.helpers.checkpoints import make_checkpoint
    from tests.helpers.cli import main_in_process
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint
    from helpers.cli import main_in_process

ROOT = Path(__file__).resolve().parents[1]
DATA = [{"text": "hello world"}, {"text": "bye now"}]
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="module")
def tok(ckpt) -> Tokenizer:
    return Tokenizer.from_dir(ckpt)


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# -- data ---------------------------------------------------------------------------

_SURROGATE = st.integers(0xD800, 0xDFFF).map(chr)
_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)


@FAST
@given(before=_TEXT, lone=_SURROGATE, after=_TEXT,
       shape=st.sampled_from(["text", "prompt", "completion", "chat"]))
def test_a_lone_surrogate_is_a_data_error_naming_the_line(tok, tmp_path, before, lone, after, shape):
    bad = before + lone + after
    record = {"text": {"text": bad}, "prompt": {"prompt": bad, "completion": " x"},
              "completion": {"prompt": "p", "completion": bad},
              "chat": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": bad}]}}[shape]
    # json.dumps writes the lone surrogate as its \\udxxx escape, as other JSON writers do
    path = _jsonl(tmp_path / "sur.jsonl", [{"text": "fine"}, record])
    with pytest.raises(DataError, match=rf"sur\.jsonl:2: .*unpaired surrogate, U\+{ord(lone):04X}, at character "
                                        rf"{len(before)}"):
        load_dataset(path, tok)


@FAST
@given(digits=st.integers(4301, 20000), depth=st.integers(50_000, 200_000), which=st.booleans())
def test_json_that_python_cannot_read_is_a_data_error_naming_the_line(tok, tmp_path, digits, depth, which):
    # valid JSON that json.loads refuses with a ValueError / RecursionError of its own
    line = ('{"text": "x", "n": ' + "7" * digits + "}") if which else \
        ('{"text": "x", "n": ' + "[" * depth + "]" * depth + "}")
    path = tmp_path / "odd.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n", encoding="utf-8")
    cause = "unreadable JSON .*digits" if which else "JSON nested too deeply"
    with pytest.raises(DataError, match=rf"odd\.jsonl:3: {cause}"):
        load_dataset(path, tok)


_NOT_A_LIST = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.text(min_size=1),
                        st.dictionaries(st.text(max_size=3), st.integers(), min_size=1))


@FAST
@given(tools=_NOT_A_LIST)
def test_tools_that_are_not_a_list_are_a_data_error_naming_the_line(tok, tmp_path, tools):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = _jsonl(tmp_path / "tools.jsonl", [{"messages": chat}, {"messages": chat, "tools": tools}])
    with pytest.raises(DataError, match=r"tools\.jsonl:2: 'tools' must be a list of tool \(function\) definitions"):
        load_dataset(path, tok)


@FAST
@given(role=st.one_of(st.none(), st.integers(), st.booleans(), st.just(""), st.lists(st.text(), max_size=2)),
       index=st.integers(0, 1))
def test_a_role_that_is_not_a_string_is_named_with_the_line(tok, tmp_path, role, index):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    chat[index] = {**chat[index], "role": role}
    path = _jsonl(tmp_path / "roles.jsonl", [{"messages": chat}])
    with pytest.raises(DataError, match=rf"roles\.jsonl:1: messages\[{index}\] has role .*: a role is a non-empty "
                                        rf"string"):
        load_dataset(path, tok)


# -- options ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(ckpt):
    m = amlx.load_sync(ckpt)
    yield m
    m.close()


@FAST
@given(name=st.sampled_from(["learning_rate", "min_lr", "weight_decay", "eps", "alpha", "dropout", "grad_clip"]),
       exponent=st.integers(309, 2000), sign=st.sampled_from([1, -1]))
def test_an_integer_too_large_for_a_float_is_a_value_error(model, name, exponent, sign):
    # math.isfinite(10**400) raises OverflowError: it escaped the option check
    with pytest.raises(ValueError, match=rf"{name} must be a finite number"):
        model.train_lora(DATA, **{name: sign * 10 ** exponent})


@FAST
@given(seed=st.integers(2**64 - 1, 2**200))
def test_a_seed_past_64_bits_is_refused_up_front(model, seed):
    # it went on to read the data and failed in MLX's random.key with a bare OverflowError
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0 and <= 18446744073709551614"):
        model.train_lora(DATA, seed=seed)


@FAST
@given(rank=st.integers(2**31, 2**100))
def test_a_rank_past_a_c_int_is_refused_up_front(model, rank):
    # amlx lora --rank 1000000000000 read the data, then died in cffi with an OverflowError traceback
    with pytest.raises(ValueError, match=r"rank must be an integer >= 1 and <= 2147483647"):
        model.train_lora(DATA, rank=rank)


@FAST
@given(name=st.sampled_from(["truncate", "resume", "use_rslora"]),
       value=st.one_of(st.text(), st.integers(), st.none(), st.lists(st.booleans())))
def test_boolean_options_take_only_booleans(model, tmp_path, name, value):
    # truncate="no" truncated; resume="no" resumed
    with pytest.raises(TypeError, match=rf"{name} must be True or False, not "):
        model.train_lora(DATA, adapter_path=tmp_path / "ad", **{name: value})


async def test_output_paths_that_cannot_be_written_fail_before_any_step(ckpt, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    async with await amlx.load(ckpt) as m:
        with pytest.raises(TypeError, match="adapter_path must be a directory path"):
            m.train_lora(DATA, adapter_path=5)
        with pytest.raises(TypeError, match="adapter_path must be a directory path"):
            m.train_lora(DATA, adapter_path=bytes(tmp_path / "ad"))
        # an existing file: refused at the call (it trained every step, then failed to save)
        with pytest.raises(ValueError, match=rf"adapter_path {afile} exists and is not a directory"):
            m.train_lora(DATA, adapter_path=afile)
        # a path that cannot be created: refused when the run starts, before its first step
        for run, option in ((lambda p: m.train_lora(DATA, iters=2, batch_size=1, adapter_path=p), "adapter_path"),
                            (lambda p: m.train(DATA, iters=2, batch_size=1, save_path=p), "save_path")):
            bad = afile / "sub"
            r = run(bad)
            with pytest.raises(ValueError, match=rf"{option} {bad} cannot be written: {afile} exists and is not a directory"):
                await r.__anext__()
            assert r.step == 0
        # the model is still free to train and serve
        assert [ev.kind async for ev in m.train_lora(DATA, iters=1, batch_size=1)][-1] == "done"
        assert (await m.complete("hi", max_tokens=2)).usage.completion_tokens == 2


@pytest.mark.parametrize("layers, num_layers", [([], None), ((0,), 1)])
async def test_layers_that_select_nothing_are_a_value_error(ckpt, layers, num_layers):
    # it failed in MLX: "value_and_grad: [grad] Must specify at least one argument"
    async with await amlx.load(ckpt) as m:
        with pytest.raises(ValueError, match=r"nothing to train: layers=.* selects no layer"):
            [ev async for ev in m.train_lora(DATA, iters=1, batch_size=1, layers=layers, num_layers=num_layers)]
        assert [ev.kind async for ev in m.train_lora(DATA, iters=1, batch_size=1)][-1] == "done"


async def test_a_rank_above_a_layer_dimension_is_refused_before_any_layer_changes(ckpt):
    """rank=100000 made LoRA matrices of 100000 x in and out x 100000 per layer (gigabytes for
    a real model) for a rank that cannot exceed the layer's smaller dimension."""
    async with await amlx.load(ckpt) as m:
        with pytest.raises(ValueError, match=r"rank 100000 is more than .*smaller dimension"):
            [ev async for ev in m.train_lora(DATA, iters=1, batch_size=1, rank=100000)]
        assert [ev.kind async for ev in m.train_lora(DATA, iters=1, batch_size=1, rank=4)][-1] == "done"


# -- non-finite loss ----------------------------------------------------------------

def _lora_b(m) -> list:
    from amlx.engine.worker import Worker
    from amlx.train.lora import lora_modules

    return Worker.get().run_sync(lambda: [mod.lora_b.numpy().copy() for mod in lora_modules(m.engine.model).values()])


async def test_a_non_finite_loss_stops_the_run_without_taking_the_update(ckpt):
    import numpy as np

    async with await amlx.load(ckpt) as m:
        before = (await m.complete("hi", max_tokens=4)).token_ids
        # 1e308 as a float32 step is infinite: the first update would make the adapter infinite
        run = m.train_lora(DATA, iters=5, batch_size=1, learning_rate=1e308)
        with pytest.raises(amlx.AmlxError, match=r"step 1: the update made weights non-finite .*training "
                                                     r"stopped without this update.*Lower the learning rate"):
            [ev async for ev in run]
        assert run.step == 0 and all(np.all(b == 0) for b in _lora_b(m))  # the adapter is still its zero init
        assert (await m.complete("hi", max_tokens=4)).token_ids == before
        # 1e30 keeps the first update finite, but the next loss is NaN: reported, not trained on
        losses = []
        run = m.train_lora(DATA, iters=5, batch_size=1, learning_rate=1e30)
        with pytest.raises(amlx.AmlxError, match=r"step 2: the training loss is nan; .* the weights are those "
                                                     r"after step 1"):
            async for ev in run:
                losses.append(ev.loss)
        assert run.step == 1 and all(np.isfinite(losses))
        assert all(np.all(np.isfinite(b)) for b in _lora_b(m))
        # a later run on those weights says where the NaN comes from
        with pytest.raises(amlx.AmlxError, match=r"step 1: the training loss is nan before this run changed any "
                                                     r"weight: the model and its adapter"):
            [ev async for ev in m.train_lora(DATA, iters=2, batch_size=1)]
        assert (await m.complete("hi", max_tokens=2)).usage.completion_tokens == 2


async def test_full_fine_tuning_that_diverges_keeps_the_weights(ckpt, tmp_path):
    async with await amlx.load(ckpt) as m:
        before = (await m.complete("hello", max_tokens=6)).token_ids
        with pytest.raises(amlx.AmlxError, match=r"step 1: the update made weights non-finite"):
            [ev async for ev in m.train(DATA, iters=3, batch_size=2, learning_rate=1e308,
                                        save_path=tmp_path / "out")]
        assert (await m.complete("hello", max_tokens=6)).token_ids == before
        assert not (tmp_path / "out").exists()
        assert [ev.kind async for ev in m.train(DATA, iters=1, batch_size=2, learning_rate=1e-4)][-1] == "done"


# -- the command line ---------------------------------------------------------------

def amlx_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amlx", *args], capture_output=True, text=True, encoding="utf-8",
                          cwd=ROOT, timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**__import__("os").environ, "PYTHONPATH": python_path(ROOT), "HF_HUB_OFFLINE": "1"})


def _one_line_error(r: subprocess.CompletedProcess, pattern: str, status: int = 1) -> None:
    assert r.returncode == status, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, r.stderr
    assert __import__("re").search(pattern, lines[0]), lines[0]


def test_files_that_cannot_be_written_are_one_line_errors(ckpt, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    # convert into a directory under a file: a FileExistsError traceback
    _one_line_error(amlx_cli("convert", str(ckpt), str(afile / "out")), rf"^amlx: error: {afile} exists and is not a directory$")
    # a save that fails during the run (the optimizer state's name taken by a directory)
    data = _jsonl(tmp_path / "d.jsonl", DATA)
    (tmp_path / "ad" / "optimizer.json").mkdir(parents=True)
    r = amlx_cli("lora", str(ckpt), "--data", str(data), "--iters", "1", "--batch-size", "1", "--no-progress",
                 "--adapter-path", str(tmp_path / "ad"))
    # (optimizer.json is written to a temporary name and moved: the error names both)
    _one_line_error(r, rf"^amlx lora: error: (.* -> )?{tmp_path / 'ad' / 'optimizer.json'}: Is a directory$")




def test_serve_help_shows_its_defaults_and_an_example(capsys):
    from amlx.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "where to run (default: auto)" in out and "(default: 1)" in out and "Example:\n  amlx serve" in out
    assert "(default: True)" not in out.replace("\n", " ").replace("  ", "")  # --no-prefix-cache


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.one_of(
    st.tuples(st.just("--port"), st.integers(65536, 10**6).map(str), st.just(r"--port must lie in 1\.\.65535")),
    st.tuples(st.just("--keepalive"), st.sampled_from(["nan", "-1", "0", "inf", "-inf", "-0.5"]),
              st.just(r"--keepalive must be a number of seconds > 0")),
    st.tuples(st.just("--api-key"), st.sampled_from(["", " ", "\t"]), st.just(r"--api-key is empty")),
    st.tuples(st.just("--kv-cache-memory"), st.sampled_from(["infGB", "-infMB", "infkib", "inf"]),
              st.just(r"argument --kv-cache-memory: not a memory size")),
))
def test_serve_refuses_bad_numbers_and_keys_before_loading(capsys, tmp_path, case):
    # --port 70000 loaded the model, then died in bind() with a traceback; --keepalive nan / -1
    # were taken (a busy loop of keep-alive comments); --api-key "" served without a key;
    # --kv-cache-memory infGB was an OverflowError traceback
    flag, value, pattern = case
    rc, err = main_in_process(capsys, "serve", str(tmp_path / "no-model"), f"{flag}={value}")
    assert rc == 2, err
    assert __import__("re").search(rf"^amlx serve: error: {pattern}", err.splitlines()[-1]), err


def test_serve_refuses_a_request_log_it_cannot_write_and_an_empty_key_file(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, err = main_in_process(capsys, "serve", str(tmp_path / "no-model"), "--log-requests", str(afile / "log.jsonl"))
    assert rc == 2 and err.startswith(f"amlx serve: error: --log-requests: {afile / 'log.jsonl'}: Not a directory")
    keys = tmp_path / "keys.txt"
    keys.write_text("# no keys yet\n\n")
    rc, err = main_in_process(capsys, "serve", str(tmp_path / "no-model"), "--api-key-file", str(keys))
    assert rc == 1 and f"--api-key-file {keys} holds no key" in err


def test_serve_argument_errors_as_a_subprocess(ckpt):
    for args, pattern in ((["--port", "70000"], r"--port must lie in 1\.\.65535, not 70000"),
                          (["--kv-cache-memory", "infGB"], r"not a memory size: 'infGB'")):
        _one_line_error(amlx_cli("serve", str(ckpt), *args, timeout=60), pattern, status=2)


@pytest.mark.parametrize("where", ["non-empty", "under-a-file", "inside-the-model"])
def test_lora_checks_the_fuse_destination_before_training(ckpt, tmp_path, where):
    # it trained every step, saved the adapter, and only then refused DST
    data = _jsonl(tmp_path / "d.jsonl", DATA)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    dst = {"non-empty": full, "under-a-file": full / "x" / "fused", "inside-the-model": ckpt / "fused"}[where]
    cause = {"non-empty": "already exists and is not an empty directory",
             "under-a-file": f"{full / 'x'} exists and is not a directory",
             "inside-the-model": "must lie outside the source checkpoint"}[where]
    r = amlx_cli("lora", str(ckpt), "--data", str(data), "--iters", "2", "--batch-size", "1", "--no-progress",
                 "--adapter-path", str(tmp_path / "ad"), "--fuse", str(dst))
    _one_line_error(r, rf"^amlx lora: error: --fuse {dst}: .*{cause}")
    assert "step" not in r.stdout and not (tmp_path / "ad").exists()
