"""Full fine-tuning: Model.train and `amlx lora --full`.

Training every weight on a tiny dataset lowers the loss and makes greedy
generation reproduce the memorised line; the checkpoint written to save_path
loads with amlx.load and holds exactly the trained weights (same greedy tokens
and log-probabilities as the in-memory model); one step equals torch autograd +
torch.optim.AdamW on the transformers twin; quantized models, LoRA options,
models carrying an adapter and bad save paths are refused clearly; the command
line trains and saves.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import amlx
from amlx.train.cli import main as cli_main
from amlx.train.data import load_dataset, make_batch

try:
    from tests.helpers.checkpoints import load_reference, make_checkpoint
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import load_reference, make_checkpoint

PROMPT = "The secret word is"
PHRASE = " banana split"
DATA = [{"prompt": PROMPT, "completion": PHRASE}, {"prompt": "Say hi:", "completion": " hi there"}]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


async def _greedy(model: amlx.Model, prompt: str, n: int = 12):
    out = await model.complete(prompt, max_tokens=n, logprobs=True)
    return out.text, out.token_ids, out.logprobs


async def test_full_training_memorises_and_round_trips(qwen, tmp_path):
    save = tmp_path / "trained"
    async with await amlx.load(qwen) as model:
        before = await model.complete(PROMPT, max_tokens=6)
        assert not before.text.startswith(PHRASE)
        events = [ev async for ev in model.train(DATA, iters=30, batch_size=2, learning_rate=3e-3, save_every=10,
                                                 save_path=save, seed=1)]
        steps = [ev for ev in events if ev.kind == "step"]
        assert [ev.step for ev in steps] == list(range(1, 31))
        losses = np.array([ev.loss for ev in steps])
        windows = losses.reshape(6, 5).mean(axis=1)
        assert np.all(np.diff(windows) < 0), windows  # steadily down
        assert losses[-1] < 0.05 * losses[0]
        assert [(ev.kind, ev.step, ev.path) for ev in events if ev.kind != "step"] == [
            ("save", 10, str(save)), ("save", 20, str(save)), ("save", 30, str(save)), ("done", 30, str(save))]
        text, ids, logprobs = await _greedy(model, PROMPT)
        assert text == PHRASE  # memorised, and it learned to stop
        other = await _greedy(model, "Say hi:")
        longer = await _greedy(model, "A different prompt the model never saw", 24)
    assert sorted(p.name for p in save.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((save / "config.json").read_text())["torch_dtype"] == "float32"
    async with await amlx.load(save) as again:
        assert await _greedy(again, PROMPT) == (text, ids, logprobs)
        assert await _greedy(again, "Say hi:") == other
        assert await _greedy(again, "A different prompt the model never saw", 24) == longer
    # every weight changed, none is missing
    start, trained = load_file(str(qwen / "model.safetensors")), load_file(str(save / "model.safetensors"))
    assert set(trained) == set(start) - {"lm_head.weight"}  # tied embeddings: no duplicate
    assert all(not np.array_equal(trained[k], start[k]) for k in trained)


def _torch_adamw_step(path, batch, lr, betas, eps, weight_decay, clip):
    ref = load_reference(path)
    logits = ref(input_ids=torch.tensor(batch.inputs).long()).logits.float()
    logp = torch.log_softmax(logits, -1)
    tok = -logp.gather(-1, torch.tensor(batch.targets).long()[..., None])[..., 0]
    m = torch.tensor(batch.mask)
    loss = (tok * m).sum() / m.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(ref.parameters()), clip)
    opt = torch.optim.AdamW(ref.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    opt.step()
    return loss.item(), {k: v.detach().numpy() for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("record", [DATA[0], {"prompt": "Hi", "completion": " ok"}], ids=["long", "short"])
@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
async def test_one_step_matches_torch_adamw(tmp_path, arch, record):
    """One update of every weight equals torch autograd + clip_grad_norm_ + AdamW. (A batch of a
    few rows, "short", goes through the CPU's few-row kernels, which had no weight gradients:
    the step failed.)"""
    path = make_checkpoint(tmp_path / arch, arch)
    hp = dict(learning_rate=1e-2, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.1, grad_clip=5.0)
    async with await amlx.load(path) as model:
        dataset = load_dataset([record], model.tokenizer)
        events = [ev async for ev in model.train([record], iters=1, batch_size=1, save_path=tmp_path / "out", **hp)]
    batch = make_batch(dataset.examples)
    ref_loss, want = _torch_adamw_step(path, batch, hp["learning_rate"], hp["betas"], hp["eps"],
                                       hp["weight_decay"], hp["grad_clip"])
    assert events[0].loss == pytest.approx(ref_loss, rel=1e-5)
    start, got = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(got) <= set(want) and len(got) >= len(want) - 1  # all but a tied lm_head
    for name, value in got.items():
        moved = want[name] - start[name]
        assert np.abs(moved).max() > 0, name
        # An element moves by at most about lr; float32 noise in the gradient moves the update
        # by far less (measured: <= 3e-4 * lr per element, 1e-5 relative over a tensor).
        delta = value - start[name]
        np.testing.assert_allclose(delta, moved, rtol=0, atol=1e-3 * hp["learning_rate"], err_msg=name)
        assert np.linalg.norm(delta - moved) <= 1e-4 * np.linalg.norm(moved), name


async def test_refusals(qwen, tmp_path):
    quantized = amlx.convert(qwen, tmp_path / "q4", quantize=4, group_size=32)
    async with await amlx.load(quantized) as model:
        with pytest.raises(ValueError, match="quantized model .*cannot be fully fine-tuned"):
            model.train(DATA)
    async with await amlx.load(qwen) as model:
        with pytest.raises(TypeError, match="rank: LoRA option"):
            model.train(DATA, rank=4)
        with pytest.raises(TypeError, match="adapter_path: LoRA option"):
            model.train(DATA, adapter_path=tmp_path / "ad")
        with pytest.raises(ValueError, match="must lie outside the checkpoint"):
            model.train(DATA, save_path=qwen / "sub")
        busy = tmp_path / "busy"
        busy.mkdir()
        (busy / "notes.txt").write_text("keep me")
        with pytest.raises(ValueError, match="neither empty nor a checkpoint"):
            model.train(DATA, save_path=busy)
        with pytest.raises(ValueError, match="iters"):
            model.train(DATA, iters=0)
        # an adapter on the model: fuse first
        [ev async for ev in model.train_lora(DATA, iters=1, batch_size=1)]
        with pytest.raises(ValueError, match="carries a LoRA adapter"):
            [ev async for ev in model.train(DATA, iters=1, batch_size=1)]
    with pytest.raises(amlx.ClosedError):
        model.train(DATA)


def test_cli_full(qwen, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DATA))
    out_dir = tmp_path / "full"
    rc = cli_main([str(qwen), "--data", str(data), "--full", "--save-path", str(out_dir), "--iters", "3",
                   "--batch-size", "2", "--learning-rate", "1e-3", "--save-every", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "step 3/3: loss" in out and f"step 2: saved {out_dir}" in out and "done: 3 steps" in out
    assert (out_dir / "model.safetensors").is_file() and (out_dir / "tokenizer.json").is_file()
    with amlx.load_sync(out_dir) as model:
        assert model.complete_sync(PROMPT, max_tokens=2).usage.completion_tokens >= 1
    assert cli_main([str(qwen), "--data", str(data), "--full", "--save-path", str(out_dir), "--rank", "4"]) == 1
    assert "--rank: LoRA option(s), not used with --full" in capsys.readouterr().err
    assert cli_main([str(qwen), "--data", str(data), "--full"]) == 1
    assert "--full needs --save-path" in capsys.readouterr().err
    assert cli_main([str(qwen), "--data", str(data), "--save-path", str(out_dir)]) == 1
    assert "--save-path is for --full" in capsys.readouterr().err
