"""LoRA adapter directories probed with what careless hands leave in them: the error names the
file that is wrong and what is wrong with it."""

from __future__ import annotations

import json
import shutil

import pytest

from amlx.errors import ModelLoadError
from amlx.models import load_model
from amlx.train import lora

try:
    from tests.helpers.checkpoints import make_checkpoint
    from tests.test_train_lora import on_worker
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint
    from test_train_lora import on_worker


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
