"""The training loop: Model.train_lora's async iterator of events.

Training on a tiny dataset lowers the loss steadily and makes greedy generation
reproduce the trained phrase (also after reloading the saved adapter); events
report step, loss, learning rate (following the schedule), tokens/s and memory;
validation and checkpoints come when due; a run resumes exactly; every step
runs on the worker thread with the event loop free; cancelling the consuming
task stops after the step in flight; bad data and options fail clearly; the
command line trains and saves; trio works too.
"""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest

import amlx
from amlx.engine.worker import Worker
from amlx.train import trainer as trainer_mod
from amlx.train.cli import main as cli_main
from amlx.train.data import DataError
from amlx.train.lora import lora_modules
from amlx.train.optim import warmup_cosine

try:
    from tests.helpers.checkpoints import make_checkpoint
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint

PROMPT = "The secret word is"
PHRASE = " banana split"
DATA = [{"prompt": PROMPT, "completion": PHRASE}, {"prompt": "Say hi:", "completion": " hi there"}]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gemma3"), "gemma3_text")


def _adapter_arrays(model: amlx.Model) -> dict[str, np.ndarray]:
    lm = model.engine.model
    return Worker.get().run_sync(lambda: {f"{p}.{k}": getattr(m, k).numpy() for p, m in lora_modules(lm).items()
                                          for k in ("lora_a", "lora_b")})


async def test_training_lowers_loss_and_reproduces_the_phrase(qwen, tmp_path):
    async with await amlx.load(qwen) as model:
        before = await model.complete(PROMPT, max_tokens=6)
        assert not before.text.startswith(PHRASE)
        events = [ev async for ev in model.train_lora(DATA, iters=30, batch_size=2, learning_rate=1e-2,
                                                      adapter_path=tmp_path / "ad", save_every=10, seed=3)]
        steps = [ev for ev in events if ev.kind == "step"]
        assert [ev.step for ev in steps] == list(range(1, 31))
        losses = np.array([ev.loss for ev in steps])
        windows = losses.reshape(6, 5).mean(axis=1)
        assert np.all(np.diff(windows) < 0), windows  # steadily down
        assert losses[-1] < 0.05 * losses[0]
        for ev in steps:
            assert ev.learning_rate == pytest.approx(1e-2) and ev.tokens > 0 and ev.tokens_per_second > 0
            assert set(ev.memory) == {"active", "peak", "cache"} and ev.memory["active"] > 0
        assert steps[-1].trained_tokens > steps[0].trained_tokens > 0
        saves = [ev.path for ev in events if ev.kind == "save"]
        assert saves == [str(tmp_path / "ad" / "0000010_adapters.safetensors"),
                         str(tmp_path / "ad" / "0000020_adapters.safetensors"),
                         str(tmp_path / "ad" / "adapters.safetensors")]
        assert events[-1].kind == "done" and events[-1].step == 30
        after = await model.complete(PROMPT, max_tokens=10)
        assert after.text == PHRASE and after.finish_reason == "stop"  # it learned to stop too
        trained = _adapter_arrays(model)
    async with await amlx.load(qwen, adapter=tmp_path / "ad") as again:
        assert (await again.complete(PROMPT, max_tokens=10)).text == PHRASE
        for k, v in _adapter_arrays(again).items():
            np.testing.assert_array_equal(v, trained[k])
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["base_model"]["architecture"] == "qwen3"
    assert json.loads((tmp_path / "ad" / "optimizer.json").read_text())["step"] == 30


async def test_chat_training_on_gemma(gemma):
    chat = [{"messages": [{"role": "user", "content": "What is the code?"},
                          {"role": "assistant", "content": "seven seven"}]}]
    async with await amlx.load(gemma) as model:
        losses = [ev.loss async for ev in model.train_lora(chat, iters=25, batch_size=1, learning_rate=1e-2,
                                                           targets=["q_proj", "v_proj", "down_proj"])
                  if ev.kind == "step"]
        assert losses[-1] < 0.1 * losses[0]
        out = await model.complete([{"role": "user", "content": "What is the code?"}], max_tokens=8)
        assert out.text.startswith("seven seven")


async def test_validation_schedule_and_checkpoints(qwen, tmp_path):
    async with await amlx.load(qwen) as model:
        events = [ev async for ev in model.train_lora(
            DATA, val_data=DATA, iters=10, batch_size=2, learning_rate=1e-2, lr_schedule="cosine", warmup=2,
            min_lr=1e-4, steps_per_eval=5, save_every=5, adapter_path=tmp_path / "ad", grad_clip=1.0,
            weight_decay=0.01, dropout=0.1, rank=4, alpha=8, num_layers=1)]
        kinds = [(ev.kind, ev.step) for ev in events if ev.kind != "step"]
        assert kinds == [("eval", 0), ("eval", 5), ("save", 5), ("eval", 10), ("save", 10), ("done", 10)]
        sched = warmup_cosine(1e-2, 10, warmup=2, min_lr=1e-4)
        lrs = [ev.learning_rate for ev in events if ev.kind == "step"]
        assert lrs == pytest.approx([sched(i) for i in range(10)])
        vals = [ev.val_loss for ev in events if ev.kind == "eval"]
        assert vals[-1] < vals[0]
        assert events[-1].val_loss == vals[-1]
        assert sorted(lora_modules(model.engine.model)) == [
            f"model.layers.1.self_attn.{p}_proj" for p in "koqv"]
    assert (tmp_path / "ad" / "0000005_adapters.safetensors").is_file()


async def test_resume_matches_an_uninterrupted_run(qwen, tmp_path):
    opts = dict(batch_size=1, learning_rate=5e-3, seed=2, grad_clip=1.0, weight_decay=0.01)
    async with await amlx.load(qwen) as model:
        [ev async for ev in model.train_lora(DATA, iters=6, adapter_path=tmp_path / "a", **opts)]
        full = _adapter_arrays(model)
    async with await amlx.load(qwen) as model:
        [ev async for ev in model.train_lora(DATA, iters=3, adapter_path=tmp_path / "b", **opts)]
    async with await amlx.load(qwen) as model:
        steps = [ev.step async for ev in model.train_lora(DATA, iters=6, adapter_path=tmp_path / "b", resume=True,
                                                          **opts) if ev.kind == "step"]
        assert steps == [4, 5, 6]
        resumed = _adapter_arrays(model)
    for k, v in full.items():
        np.testing.assert_allclose(resumed[k], v, rtol=1e-5, atol=1e-7)


async def test_steps_run_on_the_worker_and_the_loop_stays_free(qwen, monkeypatch):
    threads = set()
    real = trainer_mod.causal_lm_loss

    def spy(*args):
        threads.add(threading.current_thread())
        return real(*args)

    monkeypatch.setattr(trainer_mod, "causal_lm_loss", spy)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async with await amlx.load(qwen) as model:
        t = asyncio.create_task(ticker())
        n = 0
        async for ev in model.train_lora(DATA, iters=10, batch_size=2, learning_rate=1e-3):
            n += ev.kind == "step"
        t.cancel()
    assert n == 10
    assert threads == {Worker.get().thread}
    assert ticks > 10  # the loop ran other tasks while the steps were computed


async def test_cancelling_the_consumer_stops_after_the_current_step(qwen):
    async with await amlx.load(qwen) as model:
        run = model.train_lora(DATA, iters=1000, batch_size=2, learning_rate=1e-3)
        third = asyncio.Event()

        async def consume():
            async for ev in run:
                if ev.step == 3:
                    third.set()

        task = asyncio.create_task(consume())
        await third.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await model.engine.run(lambda: None)  # the step in flight (if any) has finished
        stopped_at = run.step
        assert 3 <= stopped_at <= 4
        await asyncio.sleep(0.2)
        await model.engine.run(lambda: None)
        assert run.step == stopped_at  # no further steps
        with pytest.raises(StopAsyncIteration):
            await run.__anext__()
        # the model serves requests and can be trained again
        assert (await model.complete(PROMPT, max_tokens=3)).usage.completion_tokens == 3
        steps = [ev async for ev in model.train_lora(DATA, iters=2, batch_size=2) if ev.kind == "step"]
        assert len(steps) == 2


async def test_one_run_at_a_time_and_closed_models(qwen):
    async with await amlx.load(qwen) as model:
        first = model.train_lora(DATA, iters=5, batch_size=1)
        await first.__anext__()
        second = model.train_lora(DATA, iters=5, batch_size=1)
        with pytest.raises(RuntimeError, match="already being trained"):
            await second.__anext__()
        await first.aclose()
        async with model.train_lora(DATA, iters=2, batch_size=1) as third:
            assert [ev.kind async for ev in third][-1] == "done"
    with pytest.raises(amlx.ClosedError):
        model.train_lora(DATA)


async def test_bad_data_and_options(qwen, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "oops"\n')
    async with await amlx.load(qwen) as model:
        with pytest.raises(ValueError, match="matches no linear layer"):
            [ev async for ev in model.train_lora(DATA, batch_size=2, targets=["c_attn"])]
        with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
            [ev async for ev in model.train_lora(bad, iters=2)]
        long = tmp_path / "long.jsonl"
        long.write_text(json.dumps({"text": " ".join(["word"] * 100)}) + "\n")
        with pytest.raises(DataError, match=r"long\.jsonl:1: the record has \d+ tokens, more than max_seq_len=16"):
            [ev async for ev in model.train_lora(long, iters=2, batch_size=1, max_seq_len=16)]
        steps = [ev async for ev in model.train_lora(long, iters=1, batch_size=1, max_seq_len=16, truncate=True)
                 if ev.kind == "step"]
        assert steps[0].tokens == 15
        # failed starts left the model free to train (and the first run added the adapter)
        assert lora_modules(model.engine.model)
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        with pytest.raises(DataError, match="no records"):
            [ev async for ev in model.train_lora(empty)]
        with pytest.raises(DataError, match="cannot fill a batch of 4"):
            [ev async for ev in model.train_lora(DATA, batch_size=4)]
        with pytest.raises(ValueError, match="iters"):
            model.train_lora(DATA, iters=0)
        with pytest.raises(ValueError, match="lr_schedule"):
            model.train_lora(DATA, lr_schedule="step")
        with pytest.raises(TypeError, match="unknown training option"):
            model.train_lora(DATA, epochs=3)
        assert [ev.kind async for ev in model.train_lora(DATA, iters=1, batch_size=1)][-1] == "done"


def test_data_directory_with_validation_file(qwen, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in DATA))
    (d / "valid.jsonl").write_text(json.dumps(DATA[0]) + "\n")

    async def go():
        async with await amlx.load(qwen) as model:
            return [ev.kind async for ev in model.train_lora(d, iters=2, batch_size=2, steps_per_eval=1)]

    assert asyncio.run(go()) == ["eval", "step", "eval", "step", "eval", "done"]


def test_trio(qwen):
    trio = pytest.importorskip("trio")

    async def go():
        model = await amlx.load(qwen)
        try:
            return [ev.step async for ev in model.train_lora(DATA, iters=3, batch_size=2) if ev.kind == "step"]
        finally:
            await model.aclose()

    assert trio.run(go) == [1, 2, 3]


def test_cli(qwen, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DATA))
    rc = cli_main([str(qwen), "--data", str(data), "--val-data", str(data), "--iters", "4", "--learning-rate",
                   "1e-2", "--adapter-path", str(tmp_path / "ad"), "--batch-size", "2", "--rank", "4", "--alpha",
                   "8", "--layers", "1", "--steps-per-eval", "2", "--save-every", "2", "--max-seq-len", "64",
                   "--seed", "5", "--no-progress", "--fuse", str(tmp_path / "fused")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "step 4/4: loss" in out and "validation loss" in out and "saved" in out
    assert (tmp_path / "ad" / "adapters.safetensors").is_file()
    assert (tmp_path / "ad" / "0000002_adapters.safetensors").is_file()
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["rank"] == 4 and meta["alpha"] == 8 and meta["num_layers"] == 1
    assert (tmp_path / "fused" / "model.safetensors").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert cli_main([str(qwen), "--data", str(bad), "--iters", "1", "--no-progress"]) == 1
    assert "bad.jsonl:1: a prompt/completion record needs both keys" in capsys.readouterr().err


async def test_generation_while_training(qwen):
    """Requests on the model interleave with the steps; each decode step uses the
    adapter as the last training step left it."""
    async with await amlx.load(qwen) as model:
        async def train():
            return [ev.loss async for ev in model.train_lora(DATA, iters=25, batch_size=2, learning_rate=1e-2)
                    if ev.kind == "step"]

        async def generate():
            outs = []
            for _ in range(4):
                outs.append(await model.complete(PROMPT, max_tokens=12))
            return outs

        losses, outs = await asyncio.gather(train(), generate())
        assert len(losses) == 25 and all(o.usage.completion_tokens >= 1 for o in outs)
        final = await model.complete(PROMPT, max_tokens=10)
        assert final.text == PHRASE
