"""A device per model: each engine computes on its own device and MLX streams.

Two models loaded at once, on different devices (CPU and GPU where MLX has a
GPU) or on the CPU with different shard counts, decode concurrently and each
gives exactly its solo output; loading never changes the process's default
device. The shard count is an engine option read once when the engine is built
(AMLX_SHARDS overrides it for benchmarks and these tests)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest

import amlx
from amlx._mlx import device
from tests.helpers.checkpoints import make_checkpoint

# (prompt ids, options): greedy and seeded sampling, prompts of different lengths
REQUESTS = [
    ([5, 17, 300, 42, 99, 7], {"max_tokens": 20}),
    ([250, 3, 64] * 9, {"max_tokens": 16}),
    ([11, 12, 13, 14], {"max_tokens": 20, "temperature": 0.9, "seed": 1234}),
    ([600, 1, 2, 700, 4] * 3, {"max_tokens": 18, "temperature": 0.7, "top_k": 40, "seed": 7}),
]


@pytest.fixture(scope="module")
def ckpt():
    root = Path(tempfile.mkdtemp(prefix="amlx-devices-"))
    yield make_checkpoint(root / "qwen3", "qwen3", seed=0)
    shutil.rmtree(root, ignore_errors=True)


def load(ckpt, monkeypatch, device_name: str, shards: int | None = None):
    if shards is None:
        monkeypatch.delenv("AMLX_SHARDS", raising=False)
    else:
        monkeypatch.setenv("AMLX_SHARDS", str(shards))
    model = amlx.load_sync(ckpt, device=device_name)
    monkeypatch.delenv("AMLX_SHARDS", raising=False)  # read once: changing it now changes nothing
    return model


async def tokens(model, prompt, options) -> list[int]:
    return (await model.complete(prompt, **options)).token_ids


async def concurrently(jobs):
    """jobs: (model, prompt, options); all submitted at once, results in order."""
    return await asyncio.gather(*[tokens(m, p, o) for m, p, o in jobs])


def solo(jobs):
    """Each job alone on its model, one after another."""
    return [asyncio.run(tokens(m, p, o)) for m, p, o in jobs]


def test_loading_leaves_the_default_device_alone(ckpt, monkeypatch):
    before = device.default_device()
    for name in ["cpu"] + (["gpu"] if device.gpu_available() else []):
        model = load(ckpt, monkeypatch, name)
        try:
            assert device.default_device() == before
            assert model.info.device == name
            assert model.engine.placement.device == name
            asyncio.run(tokens(model, [1, 2, 3], {"max_tokens": 3}))
            assert device.default_device() == before
        finally:
            model.close()
        assert device.default_device() == before


def test_two_cpu_models_with_different_shards_match_their_solo_runs(ckpt, monkeypatch):
    one = load(ckpt, monkeypatch, "cpu", shards=1)
    two = load(ckpt, monkeypatch, "cpu", shards=2)
    try:
        assert len(one.engine.scheduler.shards) == 1 and len(two.engine.scheduler.shards) == 2
        assert not set(one.engine.placement.streams) & set(two.engine.placement.streams)
        jobs = [(m, p, o) for p, o in REQUESTS for m in (one, two)]
        together = asyncio.run(concurrently(jobs))
        alone = solo(jobs)
        assert together == alone
        for k in range(0, len(jobs), 2):  # the same checkpoint: both models agree too
            assert together[k] == together[k + 1]
        assert all(len(t) > 1 for t in together)
    finally:
        one.close()
        two.close()


@pytest.mark.skipif(not device.gpu_available(), reason="MLX sees no GPU here: the CPU+GPU pair needs one "
                    "(the two-CPU-models test covers the CPU side)")
def test_a_cpu_and_a_gpu_model_decode_concurrently(ckpt, monkeypatch):
    cpu = load(ckpt, monkeypatch, "cpu")
    gpu = load(ckpt, monkeypatch, "gpu")
    try:
        assert cpu.info.device == "cpu" and gpu.info.device == "gpu"
        for prompt, options in REQUESTS:
            # one request per model at a time: each batch has one row, so the GPU's
            # batched-matmul rounding (TF32) cannot enter the comparison
            jobs = [(cpu, prompt, options), (gpu, prompt, options)]
            assert asyncio.run(concurrently(jobs)) == solo(jobs)
    finally:
        cpu.close()
        gpu.close()
