"""Parity with transformers on less common but legal model configurations.

Found by fuzzing configurations (sizes, head layouts, rope scalings, windows,
config styles) against Hugging Face transformers on PyTorch CPU (float32,
eager attention); each test here is one fault that fuzzing found, on the
smallest checkpoint that shows it. Tolerance as in tests/test_models.py:
max|amlx - transformers| / max|transformers| < 1e-4 over every position.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amlx import _mlx as mx
from amlx.errors import ModelLoadError
from amlx.models import load_model

try:
    from tests.helpers.checkpoints import load_reference, make_checkpoint, reference_logits
except ImportError:  # tests/ itself on sys.path (rootdir-less run)
    from helpers.checkpoints import load_reference, make_checkpoint, reference_logits

RTOL_F32 = 1e-4
PROMPT = [5, 17, 42, 99, 3, 64, 120, 7, 250, 31, 8, 77, 150, 12, 90, 45, 33, 201, 66, 10]
# few examples: each builds a checkpoint and runs both models
HYPOTHESIS = settings(max_examples=6, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])
_BUILT: dict = {}


def _checkpoint(tmp_path_factory, arch: str, **kw):
    """A fresh copy of one checkpoint per (arch, kw), built once per module, to edit."""
    key = (arch, json.dumps(kw, sort_keys=True))
    if key not in _BUILT:
        _BUILT[key] = make_checkpoint(tmp_path_factory.mktemp(arch), arch, **kw)
    dst = tmp_path_factory.mktemp(arch + "-edit")
    shutil.copytree(_BUILT[key], dst, dirs_exist_ok=True)
    return dst


@pytest.fixture(scope="module", autouse=True)
def _torch_one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def amlx_logits(path, ids, dtype=None) -> np.ndarray:
    lm = load_model(path, dtype=dtype)
    try:
        with mx.array(np.asarray(ids, np.int32).reshape(1, -1)) as x, lm.model(x) as out:
            return out.astype(mx.float32).numpy()[0]
    finally:
        lm.model.close()


def assert_parity(path, ids=PROMPT, dtype=None) -> None:
    want = reference_logits(load_reference(path), ids)
    got = amlx_logits(path, ids, dtype)
    assert got.shape == want.shape
    assert rel_err(got, want) < RTOL_F32


# ---------------------------------------------------------------------------
# Gemma 3: final_logit_softcapping


@pytest.mark.parametrize("arch", ["gemma3", "gemma3_text"])
def test_final_logit_softcapping_is_applied_where_transformers_applies_it(arch, tmp_path):
    """transformers' Gemma3ForCausalLM caps the logits (tanh(x / c) * c); its multimodal
    Gemma3ForConditionalGeneration never does, whatever text_config says. amlx capped
    both, so a multimodal checkpoint's logits were 0.6 off relative (argmax unchanged,
    log-probabilities and sampling not)."""
    path = make_checkpoint(tmp_path / arch, arch, final_logit_softcapping=5.0)
    assert_parity(path)


# ---------------------------------------------------------------------------
# rope_scaling next to rope_parameters


def _edit_config(path, section=None, **changes) -> None:
    cfg_path = path / "config.json"
    raw = json.loads(cfg_path.read_text())
    target = raw[section] if section else raw
    target.update(changes)
    cfg_path.write_text(json.dumps(raw, indent=2))


@HYPOTHESIS
@given(arch=st.sampled_from(["qwen3", "llama", "qwen2", "mistral"]),
       scaling=st.sampled_from([
           {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
           {"rope_type": "linear", "factor": 4.0},
           {"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0},
           {"rope_type": "default"}]),
       top_theta=st.sampled_from([None, 1e6]))
def test_rope_scaling_added_to_a_new_style_config_replaces_rope_parameters(arch, scaling, top_theta, tmp_path_factory):
    """A transformers-5 config (rope_parameters) with a rope_scaling added by hand, as
    Qwen3's model card says to do for YaRN: transformers runs rope_scaling (and its
    rope_theta, else the top-level one, else 10000), amlx ran rope_parameters and
    ignored the scaling (logits 0.7-1.2 off relative)."""
    path = _checkpoint(tmp_path_factory, arch)
    changes = {"rope_scaling": scaling}
    if top_theta is not None:
        changes["rope_theta"] = top_theta
    _edit_config(path, **changes)
    assert_parity(path)


@pytest.mark.parametrize("arch,scaling", [
    ("gemma3_text", {"rope_type": "linear", "factor": 8.0}),
    ("gemma3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "rope_theta": 100.0}),
])
def test_gemma_rope_scaling_next_to_nested_rope_parameters_applies_to_global_layers(arch, scaling, tmp_path_factory):
    """transformers' Gemma3TextConfig merges a rope_scaling over rope_parameters.full_attention;
    amlx ignored it once rope_parameters was nested (logits 0.9 off relative)."""
    path = _checkpoint(tmp_path_factory, arch)
    _edit_config(path, "text_config" if arch == "gemma3" else None, rope_scaling=scaling)
    assert_parity(path)


def test_gemma_flat_rope_parameters_are_refused(tmp_path_factory):
    """Gemma 3 nests rope_parameters per layer type; transformers ignores flat keys there (both
    layer types then run plain rope) where amlx applied them to the global layers. Refused,
    naming the file and the key."""
    path = _checkpoint(tmp_path_factory, "gemma3_text")
    _edit_config(path, rope_parameters={"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6})
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    assert str(path / "config.json") in str(info.value) and "'rope_parameters'" in str(info.value)


# ---------------------------------------------------------------------------
# layer_types where the architecture has none


def test_llama_ignores_layer_types_and_sliding_window_like_transformers(tmp_path_factory):
    """transformers' LlamaForCausalLM has no sliding-window layers: a llama config.json naming
    layer_types (sliding) and a sliding_window runs full attention there. amlx windowed those
    layers (logits 1.1 off relative on a prompt longer than the window). Mistral, which
    transformers then runs as Ministral, follows its layer_types (checked alongside)."""
    for arch in ("llama", "mistral"):
        path = _checkpoint(tmp_path_factory, arch)
        _edit_config(path, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
        assert_parity(path)


# ---------------------------------------------------------------------------
# what amlx cannot run is refused at load, naming config.json and the field


@pytest.mark.parametrize("arch,section,changes,field", [
    ("qwen3", None, {"attention_bias": True}, "'attention_bias'"),
    ("llama", None, {"mlp_bias": True}, "'mlp_bias'"),
    ("llama", None, {"hidden_act": "gelu"}, "'hidden_act'"),
    ("gemma3_text", None, {"attn_logit_softcapping": 50.0}, "'attn_logit_softcapping'"),
    ("gemma3", "text_config", {"hidden_activation": "gelu"}, "'text_config.hidden_activation'"),
    ("qwen2", None, {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}},
     "'rope_parameters.rope_type'"),
    ("mistral", None, {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8,
                                        "long_factor": [2.0] * 8, "original_max_position_embeddings": 16}},
     "'rope_scaling.rope_type'"),
])
def test_unsupported_configs_are_refused_naming_the_field(arch, section, changes, field, tmp_path_factory):
    """Refusals from an architecture's builder named the file but not the field
    ("qwen3: biases on o_proj or the MLP are not supported" for attention_bias)."""
    path = _checkpoint(tmp_path_factory, arch)
    _edit_config(path, section, **changes)
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    assert str(path / "config.json") in str(info.value) and field in str(info.value)
