"""LoRA layers and adapter files: a fresh adapter changes nothing, saved adapters
reload (also through amlx.load(adapter=...)) to identical logits, fused
checkpoints equal base + adapter, PEFT adapters give PEFT's logits, QLoRA on a
4-bit base trains, bad adapters are refused with the file and the reason."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import amlx
from amlx._mlx import array
from amlx.engine.worker import Worker
from amlx.errors import ModelLoadError
from amlx.models import load_model
from amlx.models.nn import Linear, QuantizedLinear
from amlx.train import lora

try:
    from tests.helpers.checkpoints import load_reference, make_checkpoint, reference_logits
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import load_reference, make_checkpoint, reference_logits

IDS = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 21]  # longer than Gemma's window of 8


def on_worker(fn):
    return Worker.get().run_sync(fn)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gemma3"), "gemma3_text")


def _logits(model, ids=IDS) -> np.ndarray:
    return on_worker(lambda: model(array(np.asarray([ids], np.int32))).numpy()[0])


def _model_logits(m: amlx.Model, ids=IDS) -> np.ndarray:
    return _logits(m.engine.model, ids)


def _randomize_b(model, seed=0, std=0.3):
    """Nonzero B matrices, so the adapter changes the output."""
    rng = np.random.default_rng(seed)

    def go():
        for m in lora.lora_modules(model).values():
            m.lora_b = array((rng.standard_normal(m.lora_b.shape) * std).astype(np.float32))

    on_worker(go)


@pytest.mark.parametrize("fixture", ["qwen", "gemma"])
def test_fresh_lora_leaves_logits_unchanged(request, fixture):
    path = request.getfixturevalue(fixture)
    loaded = on_worker(lambda: load_model(path, progress=False))
    before = _logits(loaded.model)
    wrapped = on_worker(lambda: lora.apply_lora(loaded.model, rank=4, alpha=8,
                                                targets=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]))
    n_layers = loaded.config["num_hidden_layers"]
    assert len(wrapped) == 5 * n_layers
    mod = on_worker(lambda: loaded.model.get_module("model.layers.0.self_attn.q_proj"))
    assert isinstance(mod, lora.LoRALinear) and mod.scale == 2.0 and mod.rank == 4
    a, b = on_worker(lambda: (mod.lora_a.numpy(), mod.lora_b.numpy()))
    assert a.shape == (4, loaded.config["hidden_size"]) and not b.any()
    bound = 1 / np.sqrt(a.shape[1])
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound  # PEFT's kaiming-uniform range
    names = on_worker(lambda: [n for n, _ in loaded.model.named_parameters()])
    assert "model.layers.0.self_attn.q_proj.weight" in names  # base names unchanged
    assert "model.layers.0.self_attn.q_proj.lora_a" in names
    # The wrapped layer itself adds exactly nothing...
    x = array(np.random.default_rng(0).standard_normal((1, len(IDS), a.shape[1])).astype(np.float32))
    with_lora, base = on_worker(lambda: (mod(x).numpy(), mod.base_layer()(x).numpy()))
    np.testing.assert_array_equal(with_lora, base)
    # ...and the model differs only by float32 summation order: before the adapter,
    # q/k/v were one fused product, and OpenBLAS's sum order depends on the width.
    np.testing.assert_allclose(_logits(loaded.model), before, rtol=0, atol=2e-5)
    on_worker(loaded.model.close)


def test_layer_selection_and_bad_targets(qwen):
    loaded = on_worker(lambda: load_model(qwen, progress=False))
    wrapped = on_worker(lambda: lora.apply_lora(loaded.model, targets=["self_attn.v_proj", "mlp.up_proj"],
                                                num_layers=1))
    assert wrapped == ["model.layers.1.self_attn.v_proj", "model.layers.1.mlp.up_proj"]
    with pytest.raises(ValueError, match="matches no linear layer"):
        on_worker(lambda: lora.apply_lora(loaded.model, targets=["qkv_proj"]))
    with pytest.raises(ValueError, match="linear layers only"):
        on_worker(lambda: lora.apply_lora(loaded.model, targets=["input_layernorm"]))
    with pytest.raises(ValueError, match="num_layers"):
        on_worker(lambda: lora.apply_lora(loaded.model, num_layers=3))
    with pytest.raises(ValueError, match="rank"):
        on_worker(lambda: lora.apply_lora(loaded.model, rank=0))
    on_worker(lambda: lora.remove_lora(loaded.model))
    assert on_worker(lambda: lora.lora_modules(loaded.model)) == {}
    on_worker(loaded.model.close)


async def test_save_load_and_fuse_give_identical_logits(qwen, tmp_path):
    model = await amlx.load(qwen)
    base = _model_logits(model)
    lm = model.engine.model
    on_worker(lambda: lora.apply_lora(lm, rank=4, alpha=16, targets=["q_proj", "v_proj", "gate_proj", "down_proj"]))
    _randomize_b(lm)
    with_adapter = _model_logits(model)
    assert np.abs(with_adapter - base).max() > 0.1
    on_worker(lambda: lora.save_adapter(lm, tmp_path / "ad", base_model={"architecture": "qwen3"}))
    await model.aclose()

    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["format"] == "amlx-lora" and meta["rank"] == 4 and meta["alpha"] == 16
    assert meta["modules"]["model.layers.0.self_attn.q_proj"] == {"rank": 4, "scale": 4.0}

    async with await amlx.load(qwen, adapter=tmp_path / "ad") as reloaded:
        np.testing.assert_array_equal(_model_logits(reloaded), with_adapter)
        # generation through the engine (compiled decode step) uses the adapter too
        out = await reloaded.complete(IDS, max_tokens=3)
        assert out.token_ids[0] == int(np.argmax(with_adapter[-1]))

    fused = lora.fuse(qwen, tmp_path / "ad", tmp_path / "fused")
    assert (fused / "config.json").is_file() and (fused / "tokenizer.json").is_file()
    async with await amlx.load(fused) as fm:
        got = _model_logits(fm)
        assert not any(isinstance(m, lora.LoRALinear) for _, m in fm.engine.model.named_modules())
    np.testing.assert_allclose(got, with_adapter, rtol=1e-4, atol=1e-4)
    # the fused checkpoint is a plain Hugging Face one: transformers reads it and agrees
    np.testing.assert_allclose(reference_logits(load_reference(fused), IDS), with_adapter, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "qwen2", "llama"])
async def test_peft_adapter_gives_peft_logits(tmp_path, arch):
    """arch "gemma3" is the multimodal checkpoint: PEFT also adapts its vision tower,
    which amlx does not run, and names the text layers model.language_model.*.
    qwen2 has biased q/k/v bases and a config saying fan_in_fan_out (which PEFT
    itself turns off for nn.Linear)."""
    from peft import LoraConfig, get_peft_model

    path = make_checkpoint(tmp_path / arch, arch)
    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj"],
                     use_rslora=arch != "llama", alpha_pattern={"k_proj": 3.0}, lora_dropout=0.1,
                     fan_in_fan_out=arch == "qwen2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(load_reference(path), cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    peft_model.eval()
    want = reference_logits(peft_model, IDS)
    async with await amlx.load(path, adapter=tmp_path / "peft") as model:
        got = _model_logits(model)
        n_adapted = len(lora.lora_modules(model.engine.model))
        n_layers = model.config["num_hidden_layers"]
    assert n_adapted == 4 * n_layers  # the text layers only
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        with peft_model.disable_adapter():
            plain = reference_logits(peft_model, IDS)
    assert np.abs(plain - want).max() > 0.1  # the adapter matters


def test_peft_layers_to_transform(qwen, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(load_reference(qwen), LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"],
                                                                 layers_to_transform=[1]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.full_like(p, 0.5))
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = on_worker(lambda: load_model(qwen, progress=False))
    on_worker(lambda: lora.load_adapter(loaded.model, tmp_path / "peft", loaded.config))
    assert list(on_worker(lambda: lora.lora_modules(loaded.model))) == ["model.layers.1.self_attn.v_proj"]
    np.testing.assert_allclose(_logits(loaded.model), reference_logits(peft_model, IDS), rtol=1e-4, atol=1e-4)
    on_worker(loaded.model.close)


async def test_qlora_trains_on_a_4bit_base(qwen, tmp_path, monkeypatch):
    from amlx.models import cpu_matmul

    # the fused check is exact: the logits' rows (up to cpu_matmul.ROWS["int8"]) would round x to int8
    monkeypatch.setattr(cpu_matmul, "INT8", False)
    q4 = amlx.convert(qwen, tmp_path / "q4", quantize=4, group_size=32, progress=False)
    async with await amlx.load(q4) as model:
        losses = []
        async for ev in model.train_lora([{"text": "alpha beta gamma delta epsilon"},
                                          {"text": "one two three four five six"}],
                                         iters=30, batch_size=2, learning_rate=5e-3,
                                         targets=["q_proj", "v_proj", "down_proj"], adapter_path=tmp_path / "ad"):
            if ev.kind == "step":
                losses.append(ev.loss)
        lm = model.engine.model
        mods = lora.lora_modules(lm)
        assert mods and all(m._quantized for m in mods.values())
        assert isinstance(lm.get_module("model.layers.0.mlp.up_proj"), QuantizedLinear)  # untouched, still 4-bit
        trained = _model_logits(model)
    assert losses[-1] < 0.5 * losses[0]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    async with await amlx.load(q4, adapter=tmp_path / "ad") as again:
        np.testing.assert_array_equal(_model_logits(again), trained)
    # fused onto the 4-bit base: exact when written dequantized, re-quantized otherwise
    fused = lora.fuse(q4, tmp_path / "ad", tmp_path / "fused", dequantize=True)
    async with await amlx.load(fused) as fm:
        np.testing.assert_allclose(_model_logits(fm), trained, rtol=1e-4, atol=1e-4)
        assert isinstance(fm.engine.model.get_module("model.layers.0.self_attn.q_proj"), Linear)
    requant = lora.fuse(q4, tmp_path / "ad", tmp_path / "fused4")
    async with await amlx.load(requant) as fm:
        assert isinstance(fm.engine.model.get_module("model.layers.0.self_attn.q_proj"), QuantizedLinear)


def test_mlx_lm_adapter_format(qwen, tmp_path):
    """mlx-lm stores lora_a (in, r) / lora_b (r, out) and a plain `scale`."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    hidden, kv = 64, 32
    a = (rng.standard_normal((hidden, 2)) * 0.1).astype(np.float32)
    b = (rng.standard_normal((2, kv)) * 0.1).astype(np.float32)
    d = tmp_path / "mlxlm"
    d.mkdir()
    save_file({"model.layers.1.self_attn.v_proj.lora_a": a, "model.layers.1.self_attn.v_proj.lora_b": b},
              str(d / "adapters.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 1,
                                                       "lora_parameters": {"rank": 2, "scale": 10.0,
                                                                           "dropout": 0.0}}))
    loaded = on_worker(lambda: load_model(qwen, progress=False))
    base = _logits(loaded.model)
    on_worker(lambda: lora.load_adapter(loaded.model, d))
    m = on_worker(lambda: loaded.model.get_module("model.layers.1.self_attn.v_proj"))
    assert m.scale == 10.0
    got_delta = on_worker(lambda: m.delta().numpy())
    np.testing.assert_allclose(got_delta, 10.0 * (a @ b).T, rtol=1e-5, atol=1e-6)
    assert np.abs(_logits(loaded.model) - base).max() > 0
    on_worker(loaded.model.close)


async def test_bad_adapters_are_refused(qwen, gemma, tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory"):
        await amlx.load(qwen, adapter=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        await amlx.load(qwen, adapter=tmp_path / "empty")
    with pytest.raises(ValueError, match="adapter must be the path"):
        await amlx.load(qwen, adapter=42)
    # an adapter made for another architecture names layers this model lacks
    loaded = on_worker(lambda: load_model(gemma, progress=False))
    on_worker(lambda: lora.apply_lora(loaded.model, targets=["q_proj"]))
    on_worker(lambda: lora.save_adapter(loaded.model, tmp_path / "gemma_ad"))
    on_worker(loaded.model.close)
    with pytest.raises(ModelLoadError, match="model.layers.2.self_attn.q_proj"):
        await amlx.load(qwen, adapter=tmp_path / "gemma_ad")
    # corrupt weights
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((tmp_path / "gemma_ad" / "adapter_config.json").read_text())
    (bad / "adapters.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ModelLoadError, match="adapters.safetensors"):
        await amlx.load(qwen, adapter=bad)
    # DoRA is not LoRA
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                         "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="DoRA"):
        await amlx.load(qwen, adapter=dora)
    # a failed adapter does not leak the model's memory
    before = amlx.memory()["active"]
    with pytest.raises(ModelLoadError):
        await amlx.load(qwen, adapter=tmp_path / "gemma_ad")
    assert amlx.memory()["active"] <= before


def test_dropout_applies_only_in_training(qwen):
    from amlx._mlx import random

    loaded = on_worker(lambda: load_model(qwen, progress=False))
    on_worker(lambda: lora.apply_lora(loaded.model, rank=4, dropout=0.5))
    _randomize_b(loaded.model)
    plain = _logits(loaded.model)
    np.testing.assert_array_equal(_logits(loaded.model), plain)  # inference: no dropout
    on_worker(lambda: lora.set_dropout_keys(loaded.model, random.key(1)))
    dropped = _logits(loaded.model)
    assert np.abs(dropped - plain).max() > 1e-3
    np.testing.assert_array_equal(_logits(loaded.model), dropped)  # the same keys drop the same inputs
    on_worker(lambda: lora.set_dropout_keys(loaded.model, None))
    np.testing.assert_array_equal(_logits(loaded.model), plain)
    on_worker(loaded.model.close)
