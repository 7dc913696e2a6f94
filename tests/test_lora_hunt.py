"""LoRA adapter directories probed with what careless hands leave in them: the error names the
file that is wrong and what is wrong with it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from amlx.errors import ModelLoadError
from amlx.models import load_model
from amlx.train import lora

try:
    from tests.helpers.checkpoints import make_checkpoint
    from tests.test_models import _mlx_lm_logits
    from tests.test_train_lora import IDS, _logits, _randomize_b, on_worker
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint
    from test_models import _mlx_lm_logits
    from test_train_lora import IDS, _logits, _randomize_b, on_worker


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")
    lm = on_worker(lambda: load_model(path, progress=False))
    yield lm
    on_worker(lm.model.close)


@pytest.mark.parametrize("meta", [{"lora_alpha": 16, "target_modules": ["q_proj"]}, {"format": "amlx-lora"}])
def test_peft_weights_with_a_config_that_is_not_peft_are_named(loaded, tmp_path, meta):
    """adapter_model.safetensors beside a config without 'peft_type' or 'r' (hand-written, or an
    amlx config beside renamed weights) was refused as "no adapters.safetensors or
    adapter_model.safetensors": the file it said was missing is there."""
    src = tmp_path / "trained"
    on_worker(lambda: lora.apply_lora(loaded.model, rank=2, targets=["q_proj"]))
    try:
        on_worker(lambda: lora.save_adapter(loaded.model, src))
    finally:
        on_worker(lambda: lora.remove_lora(loaded.model))
    d = tmp_path / "adapter"
    d.mkdir()
    shutil.copy(src / lora.ADAPTER_WEIGHTS, d / lora.PEFT_WEIGHTS)
    (d / lora.ADAPTER_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError) as info:
        on_worker(lambda: lora.load_adapter(loaded.model, d))
    assert str(info.value) == (f"{d / 'adapter_config.json'}: not a PEFT adapter config (it has neither "
                               f"'peft_type' nor 'r'), though the directory holds adapter_model.safetensors")
    assert on_worker(lambda: lora.lora_modules(loaded.model)) == {}  # the model is left as it was


_EMPTY_CONFIGS = {
    "amlx": (lora.ADAPTER_WEIGHTS, {"format": "amlx-lora", "version": 1, "modules": {}}),
    "peft": (lora.PEFT_WEIGHTS, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}),
    "mlx-lm": (lora.ADAPTER_WEIGHTS, {"fine_tune_type": "lora", "lora_parameters": {"rank": 4, "scale": 2.0}}),
}


@pytest.mark.parametrize("kind", sorted(_EMPTY_CONFIGS))
def test_an_adapter_without_matrices_is_refused(loaded, tmp_path, kind):
    """An adapter file holding no LoRA matrix loaded as if applied (amlx, PEFT) and the model ran
    without it; mlx-lm's was refused as "targets must be a non-empty list of module names"."""
    name, meta = _EMPTY_CONFIGS[kind]
    save_file({}, str(tmp_path / name))
    (tmp_path / lora.ADAPTER_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError) as info:
        on_worker(lambda: lora.load_adapter(loaded.model, tmp_path))
    assert str(info.value) == (f"{tmp_path / name}: no LoRA matrices for a layer of the language model: the "
                               f"adapter would change nothing")


def test_a_peft_adapter_of_the_vision_tower_alone_is_refused(loaded, tmp_path):
    """A PEFT adapter of a multimodal checkpoint that adapts only the vision tower (which amlx
    does not run) loaded silently and changed nothing."""
    name = "base_model.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"
    save_file({f"{name}.lora_A.weight": np.zeros((4, 8), np.float32),
               f"{name}.lora_B.weight": np.zeros((8, 4), np.float32)}, str(tmp_path / lora.PEFT_WEIGHTS))
    (tmp_path / lora.ADAPTER_CONFIG).write_text(json.dumps(_EMPTY_CONFIGS["peft"][1]))
    with pytest.raises(ModelLoadError, match="no LoRA matrices for a layer of the language model"):
        on_worker(lambda: lora.load_adapter(loaded.model, tmp_path, {"multimodal": True}))


@pytest.mark.parametrize("adapter", [None, "missing"])
def test_fuse_checks_its_adapter_before_loading_the_model(tmp_path, monkeypatch, adapter):
    """fuse loaded the whole model before it looked at the adapter: a mistyped adapter directory
    was reported only after that, and None was a raw TypeError from pathlib."""
    src = make_checkpoint(tmp_path / "src", "qwen3", tokenizer=False, num_hidden_layers=1)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lora, "read_checkpoint", no_load)
    if adapter is None:
        with pytest.raises(ValueError, match="^adapter must be the path of an adapter directory, not NoneType$"):
            lora.fuse(src, adapter, tmp_path / "out", progress=False)
    else:
        with pytest.raises(ModelLoadError, match=f"^{tmp_path / adapter}: not a directory"):
            lora.fuse(src, tmp_path / adapter, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_fusing_into_floats_drops_the_layers_quantization_entries(tmp_path):
    """fuse(dequantize=True) of a mixed-precision checkpoint (mlx-lm's per-layer quantization
    entries) kept the entries of the layers it wrote as floats: amlx read them as plain layers,
    mlx-lm quantized them and refused the checkpoint ("Missing 2 parameters: ...scales")."""
    import mlx_lm

    mixed = tmp_path / "mixed"
    mlx_lm.convert(str(make_checkpoint(tmp_path / "src", "qwen3")), str(mixed), quantize=True, q_group_size=32,
                   quant_predicate="mixed_4_6")
    lm = on_worker(lambda: load_model(mixed, progress=False))
    on_worker(lambda: lora.apply_lora(lm.model, rank=2, targets=["v_proj", "down_proj"]))
    _randomize_b(lm.model)
    want = _logits(lm.model)
    on_worker(lambda: lora.save_adapter(lm.model, tmp_path / "adapter"))
    on_worker(lm.model.close)
    fused = lora.fuse(mixed, tmp_path / "adapter", tmp_path / "fused", dequantize=True, progress=False)
    config = json.loads((fused / "config.json").read_text())
    before = json.loads((mixed / "config.json").read_text())["quantization"]
    adapted = {k for k in before if k.endswith(("v_proj", "down_proj"))}
    assert len(adapted) == 4 and config["quantization"] == {k: v for k, v in before.items() if k not in adapted}
    assert config["quantization_config"] == config["quantization"]
    np.testing.assert_allclose(_mlx_lm_logits(mlx_lm, fused, IDS), want, rtol=1e-4, atol=1e-4)
