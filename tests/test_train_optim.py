"""AdamW against torch.optim.AdamW (+ clip_grad_norm_), schedules, saved state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from amlx._mlx import array
from amlx.engine.worker import Worker
from amlx.train.optim import AdamW, clip_grad_norm, make_schedule, warmup_cosine, warmup_linear


def on_worker(fn):
    return Worker.get().run_sync(fn)


SHAPES = {"layer.lora_a": (4, 16), "layer.lora_b": (8, 4), "norm": (8,)}


def _run(steps: int, *, lr, weight_decay: float, clip: float | None, betas=(0.9, 0.99), eps=1e-6, seed=0,
         torch_scheduler=None):
    rng = np.random.default_rng(seed)
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: (rng.standard_normal(s) * 2).astype(np.float32) for k, s in SHAPES.items()} for _ in range(steps)]

    tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
    topt = torch.optim.AdamW(list(tparams.values()), lr=lr if not callable(lr) else 1.0, betas=betas, eps=eps,
                             weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, lr) if callable(lr) else None
    want = []
    for g in grads:
        for k, p in tparams.items():
            p.grad = torch.tensor(g[k])
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(tparams.values()), clip)
        topt.step()
        if sched is not None:
            sched.step()
        want.append({k: p.detach().numpy().copy() for k, p in tparams.items()})

    def ours():
        opt = AdamW(lr, betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=clip)
        params = {k: array(v) for k, v in init.items()}
        got = []
        for g in grads:
            params = opt.update(params, {k: array(v) for k, v in g.items()})
            got.append({k: v.numpy() for k, v in params.items()})
        return got

    return on_worker(ours), want


@pytest.mark.parametrize("clip", [None, 1.0])
def test_one_step_matches_torch(clip):
    got, want = _run(1, lr=1e-2, weight_decay=0.1, clip=clip)
    for k in SHAPES:
        np.testing.assert_allclose(got[0][k], want[0][k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("clip", [None, 0.5, 100.0])
def test_twenty_steps_match_torch(clip):
    got, want = _run(20, lr=3e-2, weight_decay=0.05, clip=clip)
    for step in range(20):
        for k in SHAPES:
            np.testing.assert_allclose(got[step][k], want[step][k], rtol=1e-5, atol=1e-6, err_msg=f"step {step} {k}")


def test_scheduled_steps_match_torch_lambda_lr():
    schedule = warmup_cosine(1.0, total_steps=20, warmup=5, min_lr=0.1)
    got, want = _run(20, lr=lambda step: 2e-2 * schedule(step), weight_decay=0.01, clip=1.0)
    for step in range(20):
        for k in SHAPES:
            np.testing.assert_allclose(got[step][k], want[step][k], rtol=1e-5, atol=1e-6, err_msg=f"step {step}")


def test_clip_grad_norm_like_torch():
    rng = np.random.default_rng(3)
    g = {k: (rng.standard_normal(s) * 5).astype(np.float32) for k, s in SHAPES.items()}
    tg = [torch.tensor(v) for v in g.values()]
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in tg]
    for p, t in zip(params, tg):
        p.grad = t.clone()
    norm = torch.nn.utils.clip_grad_norm_(params, 2.0)
    clipped, ours = on_worker(lambda: (lambda c, n: ({k: v.numpy() for k, v in c.items()}, float(n.item())))(
        *clip_grad_norm({k: array(v) for k, v in g.items()}, 2.0)))
    assert ours == pytest.approx(float(norm), rel=1e-6)
    for (k, v), p in zip(clipped.items(), params):
        np.testing.assert_allclose(v, p.grad.numpy(), rtol=1e-6)


def test_schedules():
    cos = warmup_cosine(1e-3, total_steps=110, warmup=10, min_lr=1e-5)
    assert [cos(i) for i in range(3)] == pytest.approx([1e-4, 2e-4, 3e-4])
    assert cos(9) == pytest.approx(1e-3)
    assert cos(10) == pytest.approx(1e-3)
    assert cos(60) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert cos(110) == pytest.approx(1e-5) and cos(500) == pytest.approx(1e-5)
    lin = warmup_linear(1.0, total_steps=10, warmup=0)
    assert [lin(i) for i in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    const = make_schedule("constant", 0.5, 100, warmup=2)
    assert [const(i) for i in (0, 1, 2, 50)] == pytest.approx([0.25, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="lr_schedule"):
        make_schedule("exponential", 1.0, 10)
    with pytest.raises(ValueError, match="learning rate"):
        warmup_cosine(-1.0, 10)


def test_state_save_load_continues_identically(tmp_path):
    rng = np.random.default_rng(5)
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(6)]

    def run():
        sched = warmup_cosine(1e-2, 6, warmup=2)
        a = AdamW(sched, weight_decay=0.1, max_grad_norm=1.0)
        pa = {k: array(v) for k, v in init.items()}
        for g in grads[:3]:
            pa = a.update(pa, {k: array(v) for k, v in g.items()})
        a.save(tmp_path)
        b = AdamW(sched, weight_decay=0.1, max_grad_norm=1.0)
        b.load(tmp_path)
        pb = dict(pa)
        for g in grads[3:]:
            pa = a.update(pa, {k: array(v) for k, v in g.items()})
            pb = b.update(pb, {k: array(v) for k, v in g.items()})
        return a.step, b.step, {k: v.numpy() for k, v in pa.items()}, {k: v.numpy() for k, v in pb.items()}

    sa, sb, pa, pb = on_worker(run)
    assert sa == sb == 6
    for k in SHAPES:
        np.testing.assert_array_equal(pa[k], pb[k])
    meta = json.loads((tmp_path / "optimizer.json").read_text())
    assert meta["format"] == "amlx-adamw" and meta["step"] == 3
    assert meta["hyperparameters"]["weight_decay"] == 0.1
    state = on_worker(lambda: AdamW(1e-3).state_dict())
    assert state["step"] == 0 and state["m"] == {}


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="beta1"):
        AdamW(1e-3, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="max_grad_norm"):
        AdamW(1e-3, max_grad_norm=0)
    with pytest.raises(ValueError, match="weight_decay"):
        AdamW(1e-3, weight_decay=math.nan)
