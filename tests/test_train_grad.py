"""Gradients of the causal-LM loss equal torch autograd on the transformers twin.

Small random Qwen 3 and Gemma 3 checkpoints in float32; the loss masks some
positions (prompt-like and padding-like), the sequence is longer than Gemma's
sliding window, and every parameter's gradient (tied embeddings included) is
compared with a relative error bound of 1e-4. LoRA gradients are checked
against PEFT's the same way.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amlx._mlx import array
from amlx.engine.worker import Worker
from amlx.models import load_model
from amlx.train import lora
from amlx.train.grad import causal_lm_loss, trainable_parameters, value_and_grad

try:
    from tests.helpers.checkpoints import load_reference, make_checkpoint
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import load_reference, make_checkpoint


def on_worker(fn):
    return Worker.get().run_sync(fn)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _batch(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (2, 14)).astype(np.int32)  # 13 positions > Gemma's window of 8
    mask = np.ones((2, 13), np.float32)
    mask[0, :4] = 0  # prompt of row 0
    mask[1, 9:] = 0  # padding of row 1
    return ids, mask


def _torch_loss(model, ids, mask):
    logits = model(input_ids=torch.tensor(ids[:, :-1]).long()).logits.float()
    logp = torch.log_softmax(logits, -1)
    tok = -logp.gather(-1, torch.tensor(ids[:, 1:]).long()[..., None])[..., 0]
    m = torch.tensor(mask)
    return (tok * m).sum() / m.sum()


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_gradients_match_torch_for_every_parameter(tmp_path, arch):
    path = make_checkpoint(tmp_path / arch, arch)
    loaded = on_worker(lambda: load_model(path, progress=False))
    ids, mask = _batch(loaded.config["vocab_size"])

    def compute():
        vg = value_and_grad(loaded.model)
        (loss, count), grads = vg(loaded.model.parameters(), array(ids[:, :-1]), array(ids[:, 1:]), array(mask))
        return float(loss.item()), float(count.item()), {k: g.numpy() for k, g in grads.items()}

    loss, count, grads = on_worker(compute)
    ref = load_reference(path)
    ref_loss = _torch_loss(ref, ids, mask)
    ref_loss.backward()
    assert count == mask.sum()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    ref_params = dict(ref.named_parameters())
    assert set(grads) == set(ref_params)  # every parameter, named as in the checkpoint
    errors = {k: _rel(g, ref_params[k].grad.numpy()) for k, g in grads.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, f"{worst}: relative error {errors[worst]:.2e}"
    # the model is left as it was: its parameters are the loaded arrays again
    after = on_worker(lambda: causal_lm_loss(loaded.model, array(ids[:, :-1]), array(ids[:, 1:]),
                                             array(mask))[0].item())
    assert after == pytest.approx(loss, rel=1e-6)
    on_worker(loaded.model.close)


def test_lora_gradients_match_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    path = make_checkpoint(tmp_path / "q", "qwen3")
    loaded = on_worker(lambda: load_model(path, progress=False))
    ids, mask = _batch(loaded.config["vocab_size"], seed=1)
    ref = get_peft_model(load_reference(path), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                               "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.2)  # nonzero B: A's gradient is nonzero too
    ref.save_pretrained(tmp_path / "peft")
    _torch_loss(ref, ids, mask).backward()
    want = {n: p.grad.numpy() for n, p in ref.named_parameters() if p.requires_grad}

    def compute():
        lora.load_adapter(loaded.model, tmp_path / "peft", loaded.config)
        params = trainable_parameters(loaded.model)
        _, grads = value_and_grad(loaded.model)(params, array(ids[:, :-1]), array(ids[:, 1:]), array(mask))
        return {k: g.numpy() for k, g in grads.items()}

    grads = on_worker(compute)
    assert len(grads) == len(want) == 2 * 3 * 2
    for name, g in grads.items():
        path_, leaf = name.rsplit(".", 1)
        peft_name = f"base_model.model.{path_}.lora_{leaf[-1].upper()}.default.weight"
        assert _rel(g, want[peft_name]) <= 1e-4, name
    on_worker(loaded.model.close)
