"""The test checkpoint builders and amlx.models.config.

Builders: every arch loads in transformers in both config styles to identical
logits, shards carry a valid index, names and dtypes are those of real releases.
normalize_config: both styles (ours and the real releases' configs re-saved by
transformers 5) normalise identically; llama3 rope frequencies equal transformers';
bad configs raise ModelLoadError naming the file and the key.
"""

from __future__ import annotations

import copy
import json
import struct

import numpy as np
import pytest
import torch

from amlx.errors import ModelLoadError
from amlx.models.config import load_config, normalize_config
from amlx.models.rope import llama3_inv_freqs

try:
    from tests.helpers.checkpoints import (
        ARCHS,
        load_reference,
        make_checkpoint,
        reference_greedy,
        reference_logits,
    )
except ImportError:  # tests/ itself on sys.path (rootdir-less run)
    from helpers.checkpoints import ARCHS, load_reference, make_checkpoint, reference_greedy, reference_logits

PROMPT = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 21, 8, 77, 150]  # longer than Gemma's window of 8


def _safetensors_header(path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _tensor_names(ckpt) -> set[str]:
    names: set[str] = set()
    for f in sorted(ckpt.glob("*.safetensors")):
        names |= {k for k in _safetensors_header(f) if k != "__metadata__"}
    return names


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """arch -> {style: path}, built once for the module."""
    out = {}
    for arch in ARCHS:
        out[arch] = {
            style: make_checkpoint(tmp_path_factory.mktemp(f"{arch}-{style}"), arch, config_style=style)
            for style in ("new", "old")
        }
    return out


# ---------------------------------------------------------------------------
# builders


@pytest.mark.parametrize("arch", ARCHS)
def test_both_styles_load_to_the_same_model(built, arch):
    new, old = built[arch]["new"], built[arch]["old"]
    assert (new / "model.safetensors").read_bytes() == (old / "model.safetensors").read_bytes()
    from transformers import AutoModelForCausalLM

    models = []
    for path in (new, old):
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        models.append(model.eval())
    a, b = (reference_logits(m, PROMPT) for m in models)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (len(PROMPT), models[0].config.get_text_config().vocab_size)
    # the init scale keeps logits context-dependent: greedy output is not one repeated token
    greedy = reference_greedy(models[0], PROMPT, 12)
    assert len(set(greedy)) >= 3, greedy
    assert reference_greedy(models[1], PROMPT, 12) == greedy


@pytest.mark.parametrize("arch", ARCHS)
def test_config_keys_per_style(built, arch):
    new = json.loads((built[arch]["new"] / "config.json").read_text())
    old = json.loads((built[arch]["old"] / "config.json").read_text())
    if arch == "gemma3":
        assert new["model_type"] == old["model_type"] == "gemma3"
        assert "torch_dtype" in old and "dtype" in new
        new, old = new["text_config"], old["text_config"]
    assert "rope_parameters" in new and "rope_theta" not in new and "rope_scaling" not in new
    assert "rope_parameters" not in old and "layer_types" not in old
    if arch.startswith("gemma"):
        assert set(new["rope_parameters"]) == {"full_attention", "sliding_attention"}
        assert new["layer_types"] == ["sliding_attention", "full_attention"] * 2
        assert new["_sliding_window_pattern"] == 6  # stale value transformers writes; layer_types wins
        assert old["sliding_window_pattern"] == 2
    if arch == "gemma3_text":
        assert old["rope_local_base_freq"] == 10000.0 and old["rope_scaling"] is None
    if arch == "gemma3":
        # sparse like gemma-3-4b-it: only values that differ from the 4.50 defaults
        assert "rope_theta" not in old and "rms_norm_eps" not in old and old["model_type"] == "gemma3_text"
    if arch == "llama":
        assert old["rope_scaling"]["rope_type"] == "llama3" and old["rope_theta"] == 500000.0
    if arch in ("qwen3", "qwen2"):
        assert new["layer_types"] == ["full_attention"] * 2


@pytest.mark.parametrize("arch", ARCHS)
def test_release_tensor_names(built, arch):
    names = _tensor_names(built[arch]["new"])
    gen = json.loads((built[arch]["new"] / "generation_config.json").read_text())
    cfg = load_config(built[arch]["new"])
    gen_eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert set(cfg["eos_token_ids"]) >= set(gen_eos)
    if arch == "gemma3":
        assert "language_model.model.embed_tokens.weight" in names
        assert "language_model.model.layers.3.self_attn.q_norm.weight" in names
        assert "multi_modal_projector.mm_input_projection_weight" in names
        assert any(n.startswith("vision_tower.vision_model.encoder.layers.0.") for n in names)
        assert not any(n.startswith(("model.", "lm_head")) for n in names)
        return
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names
    assert ("lm_head.weight" in names) == (not cfg["tie_word_embeddings"])
    assert ("model.layers.0.self_attn.q_proj.bias" in names) == (arch == "qwen2")
    assert ("model.layers.0.self_attn.o_proj.bias" in names) is False
    assert ("model.layers.0.self_attn.q_norm.weight" in names) == (arch in ("qwen3", "gemma3_text"))
    if arch == "gemma3_text":
        assert "model.layers.0.pre_feedforward_layernorm.weight" in names


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sharded_index_is_valid(built, tmp_path, arch):
    ckpt = make_checkpoint(tmp_path, arch, max_shard_size="40KB")
    assert not (ckpt / "model.safetensors").exists()
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(ckpt.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    total = 0
    for shard in shards:
        header = _safetensors_header(shard)
        header.pop("__metadata__", None)
        for name, meta in header.items():
            assert index["weight_map"][name] == shard.name
            begin, end = meta["data_offsets"]
            total += end - begin
    assert set(index["weight_map"]) == _tensor_names(ckpt) == _tensor_names(built[arch]["new"])
    assert index["metadata"]["total_size"] == total
    np.testing.assert_array_equal(
        reference_logits(load_reference(ckpt), PROMPT), reference_logits(load_reference(built[arch]["new"]), PROMPT)
    )


def test_bfloat16_checkpoint(tmp_path):
    new = make_checkpoint(tmp_path / "new", "qwen3", dtype="bfloat16")
    old = make_checkpoint(tmp_path / "old", "qwen3", dtype="bfloat16", config_style="old")
    header = _safetensors_header(new / "model.safetensors")
    assert {m["dtype"] for k, m in header.items() if k != "__metadata__"} == {"BF16"}
    assert json.loads((new / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((old / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_config(new)["torch_dtype"] == load_config(old)["torch_dtype"] == "bfloat16"
    model = load_reference(new, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert np.isfinite(reference_logits(model, PROMPT)).all()


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("gemma3", dict(rope_scaling={"rope_type": "linear", "factor": 8.0})),  # like gemma-3-4b-it
        ("gemma3_text", dict(rope_local_base_freq=20000.0, sliding_window_pattern=3, num_hidden_layers=3)),
        ("llama", dict(rope_scaling=None, tie_word_embeddings=False)),
        ("qwen3", dict(tie_word_embeddings=False, head_dim=32)),
    ],
)
def test_variants_agree_across_styles(tmp_path, arch, overrides):
    paths = [make_checkpoint(tmp_path / s, arch, config_style=s, **overrides) for s in ("new", "old")]
    cfgs = [load_config(p) for p in paths]
    assert cfgs[0] == cfgs[1]
    np.testing.assert_array_equal(*(reference_logits(load_reference(p), PROMPT) for p in paths))
    if arch == "gemma3":
        assert cfgs[0]["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
        assert cfgs[0]["rope_local_scaling"] is None
    if arch == "gemma3_text":
        assert cfgs[0]["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"]
        assert cfgs[0]["rope_local_base_freq"] == 20000.0
    if arch == "llama":
        assert cfgs[0]["rope_scaling"] is None and not cfgs[0]["tie_word_embeddings"]
    if arch == "qwen3":
        assert cfgs[0]["head_dim"] == 32


def test_reference_greedy_matches_full_recompute(built):
    model = load_reference(built["gemma3_text"]["new"])
    n = 10
    fast = reference_greedy(model, PROMPT, n)
    ids = list(PROMPT)
    for _ in range(n):
        ids.append(int(reference_logits(model, ids)[-1].argmax()))
    assert fast == ids[len(PROMPT):]
    # stop_at_eos ends on the first eos; by default eos is just another token
    model.generation_config.eos_token_id = [fast[2]]
    assert reference_greedy(model, PROMPT, n, stop_at_eos=True) == fast[: fast.index(fast[2]) + 1]
    assert reference_greedy(model, PROMPT, n) == fast


# ---------------------------------------------------------------------------
# normalize_config on the configs of real releases

QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
GEMMA3_1B_IT = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": [1, 106], "final_logit_softcapping": None, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02,
    "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
    "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144,
}
GEMMA3_4B_IT = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02,
    "mm_tokens_per_image": 256, "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024,
    },
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {
        "hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "model_type": "siglip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False,
    },
}
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256,
}
QWEN25_0_5B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
RELEASES = {
    "qwen3-0.6b": QWEN3_0_6B,
    "gemma3-1b-it": GEMMA3_1B_IT,
    "gemma3-4b-it": GEMMA3_4B_IT,
    "llama3.2-1b": LLAMA32_1B,
    "qwen2.5-0.5b": QWEN25_0_5B_INSTRUCT,
    # Qwen3's long-context setting (its model card's rope_scaling for 131k tokens)
    "qwen3-0.6b-yarn": dict(QWEN3_0_6B, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 32768},
                            max_position_embeddings=131072),
}


@pytest.mark.parametrize("name", RELEASES)
def test_release_config_and_its_transformers5_resave_normalise_alike(tmp_path, name):
    from transformers import AutoConfig

    raw = RELEASES[name]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(raw))
    AutoConfig.from_pretrained(tmp_path / "old").save_pretrained(tmp_path / "new")
    resaved = json.loads((tmp_path / "new" / "config.json").read_text())
    text = resaved.get("text_config", resaved)
    assert "rope_parameters" in text and "rope_theta" not in text
    assert normalize_config(raw, "old/config.json") == normalize_config(resaved, "new/config.json")


def test_release_values():
    q = normalize_config(QWEN3_0_6B)
    assert (q["arch"], q["head_dim"], q["num_key_value_heads"], q["rope_theta"]) == ("qwen3", 128, 8, 1e6)
    assert q["tie_word_embeddings"] and q["qk_norm"] and q["sliding_window"] is None
    g = normalize_config(GEMMA3_1B_IT)
    assert g["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 4 + ["sliding_attention"] * 2
    assert (g["rope_theta"], g["rope_local_base_freq"], g["sliding_window"]) == (1e6, 1e4, 512)
    assert g["query_pre_attn_scalar"] == 256.0 and g["tie_word_embeddings"] and g["eos_token_ids"] == [1, 106]
    m = normalize_config(GEMMA3_4B_IT)
    assert m["multimodal"] and m["weight_prefix"] == "language_model." and m["text_model_type"] == "gemma3_text"
    # everything not listed in text_config takes Gemma3TextConfig's defaults
    assert (m["vocab_size"], m["head_dim"], m["num_attention_heads"], m["num_key_value_heads"]) == (262208, 256, 8, 4)
    assert m["rope_scaling"] == {"rope_type": "linear", "factor": 8.0} and m["rope_local_scaling"] is None
    assert m["layer_types"][5] == "full_attention" and m["num_hidden_layers"] == 34 and m["eos_token_ids"] == [1, 106]
    assert m["tie_word_embeddings"]
    ll = normalize_config(LLAMA32_1B, generation_config={"eos_token_id": [128001, 128008, 128009]})
    assert ll["rope_scaling"] == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert ll["eos_token_ids"] == [128001, 128008, 128009] and ll["bos_token_id"] == 128000
    q2 = normalize_config(QWEN25_0_5B_INSTRUCT)
    assert q2["head_dim"] == 64 and q2["qkv_bias"] and not q2["o_bias"] and q2["sliding_window"] is None
    assert q2["layer_types"] == ["full_attention"] * 24


def test_mlx_quantization_passes_through():
    q = {"group_size": 64, "bits": 4}
    raw = dict(QWEN3_0_6B, quantization=q, quantization_config=q)
    assert normalize_config(raw)["quantization"] == {"group_size": 64, "bits": 4}


# ---------------------------------------------------------------------------
# rope frequencies


@pytest.mark.parametrize("head_dim,theta,factor,low,high,orig", [
    (64, 500000.0, 32.0, 1.0, 4.0, 8192),   # Llama 3.2
    (128, 500000.0, 8.0, 1.0, 4.0, 8192),   # Llama 3.1
    (16, 500000.0, 32.0, 1.0, 4.0, 8192),   # the tiny test checkpoints
    (32, 10000.0, 4.0, 2.0, 8.0, 64),       # every band populated
])
def test_llama3_freqs_match_transformers(head_dim, theta, factor, low, high, orig):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": orig}
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                      max_position_embeddings=131072, rope_parameters={**scaling, "rope_theta": theta})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = llama3_inv_freqs(head_dim, theta, scaling)
    assert ours.dtype == np.float32 and ours.shape == (head_dim // 2,)
    np.testing.assert_allclose(ours, expected.numpy(), rtol=2e-6, atol=0)
    np.testing.assert_allclose(rope_inv_freq(head_dim, theta, scaling), ours, rtol=1e-6)


def rope_inv_freq(head_dim: int, base: float, scaling: dict | None) -> np.ndarray:
    """The angle per position of each pair as the model's own RoPE holds it (the
    position scale of linear rope included; what the decode kernels rotate by)."""
    from amlx.models.base import RoPE

    rope = RoPE(head_dim, base, scaling)
    try:
        return np.array(rope.inv_freq())
    finally:
        rope.close()


@pytest.mark.parametrize("factor,extra", [(4.0, {}), (8.0, {"beta_fast": 16.0, "beta_slow": 2.0}),
                                          (2.0, {"attention_factor": 1.5}), (4.0, {"mscale": 1.0,
                                                                                    "mscale_all_dim": 0.5})])
def test_yarn_freqs_and_attention_factor_match_transformers(factor, extra):
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from amlx.models.base import RoPE

    scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": 4096, **extra}
    cfg = Qwen3Config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      max_position_embeddings=int(4096 * factor),
                      rope_parameters={**scaling, "rope_theta": 1e6})
    expected, attention = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    ncfg = normalize_config(json.loads(cfg.to_json_string()))
    assert ncfg["rope_scaling"]["rope_type"] == "yarn"
    np.testing.assert_allclose(rope_inv_freq(64, ncfg["rope_theta"], ncfg["rope_scaling"]), expected.numpy(),
                               rtol=2e-6)
    rope = RoPE(64, ncfg["rope_theta"], ncfg["rope_scaling"])
    assert rope.attention_factor == pytest.approx(attention, rel=1e-12)
    rope.close()


def test_default_and_linear_freqs_match_transformers():
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    cfg = Gemma3TextConfig(head_dim=32, rope_scaling={"rope_type": "linear", "factor": 8.0})
    rot = Gemma3RotaryEmbedding(cfg)
    ncfg = normalize_config(json.loads(cfg.to_json_string()))
    full = rope_inv_freq(32, ncfg["rope_theta"], ncfg["rope_scaling"])
    local = rope_inv_freq(32, ncfg["rope_local_base_freq"], ncfg["rope_local_scaling"])
    np.testing.assert_allclose(full, rot.full_attention_inv_freq.numpy(), rtol=2e-6)
    np.testing.assert_allclose(local, rot.sliding_attention_inv_freq.numpy(), rtol=2e-6)


# ---------------------------------------------------------------------------
# bad configs


def _without(d: dict, key: str) -> dict:
    d = copy.deepcopy(d)
    del d[key]
    return d


@pytest.mark.parametrize("raw,key", [
    (_without(QWEN3_0_6B, "hidden_size"), "'hidden_size'"),
    (_without(LLAMA32_1B, "model_type"), "'model_type'"),
    (dict(QWEN3_0_6B, num_key_value_heads=3), "'num_key_value_heads'"),
    (dict(QWEN3_0_6B, num_hidden_layers="28"), "'num_hidden_layers'"),
    (dict(QWEN3_0_6B, model_type="mamba"), "model_type='mamba'"),
    (dict(LLAMA32_1B, rope_scaling=_without(LLAMA32_1B["rope_scaling"], "low_freq_factor")),
     "'rope_scaling.low_freq_factor'"),
    (dict(LLAMA32_1B, rope_scaling={"rope_type": "longrope", "factor": 2.0}), "'rope_scaling.rope_type'"),
    (dict(LLAMA32_1B, rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), "'rope_parameters.factor'"),
    (dict(GEMMA3_1B_IT, layer_types=["full_attention"] * 3), "'layer_types'"),
    (dict(GEMMA3_1B_IT, sliding_window=None), "'sliding_window'"),
    (dict(GEMMA3_1B_IT, sliding_window_pattern=0), "'sliding_window_pattern'"),
    (dict(GEMMA3_1B_IT, rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": -1},
                                         "sliding_attention": {"rope_type": "default"}}),
     "'rope_parameters.full_attention.rope_theta'"),
    (dict(GEMMA3_4B_IT, text_config=dict(GEMMA3_4B_IT["text_config"], num_key_value_heads=3)),
     "'text_config.num_key_value_heads'"),
    (dict(QWEN3_0_6B, quantization_config={"quant_method": "gptq", "bits": 4}), "'quantization_config'"),
    (dict(QWEN3_0_6B, eos_token_id="</s>"), "'eos_token_id'"),
])
def test_bad_config_names_the_key(raw, key):
    with pytest.raises(ModelLoadError) as err:
        normalize_config(raw, "/models/x/config.json")
    assert "/models/x/config.json" in str(err.value) and key in str(err.value)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json: file not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="invalid JSON"):
        load_config(tmp_path)


# ---------------------------------------------------------------------------
# benchmarks/checkpoints.py (the real-size files are too big for a test: shapes and
# the file format are checked on the spec and on a shrunken config)


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "checkpoints.py"
    spec = importlib.util.spec_from_file_location("_amlx_bench_checkpoints", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,params,n_tensors", [
    ("qwen3-0.6b", 596_049_920 + 151936 * 1024, 311),  # ships a copy of the tied lm_head
    ("gemma3-1b", 999_885_952, 340),
    ("llama3.2-1b", 1_235_814_400, 146),
])
def test_benchmark_shapes_are_the_releases(name, params, n_tensors):
    bench = _bench_module()
    spec = bench.MODELS[name]
    shapes = bench._tensor_shapes(spec["config"], spec["store_tied_lm_head"])
    assert sum(int(np.prod(s)) for s in shapes.values()) == params
    assert len(shapes) == n_tensors
    cfg = normalize_config(spec["config"], name, generation_config=spec["generation_config"])
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (cfg["num_attention_heads"] * cfg["head_dim"],
                                                                cfg["hidden_size"])


@pytest.mark.parametrize("name,size,specials", [
    ("qwen3-0.6b", 151669, {"<|endoftext|>": 151643, "<|im_end|>": 151645, "</think>": 151668}),
    ("gemma3-1b", 262144, {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106}),
    ("llama3.2-1b", 128256, {"<|begin_of_text|>": 128000, "<|eot_id|>": 128009,
                             "<|reserved_special_token_247|>": 128255}),
])
def test_benchmark_tokenizer_has_the_release_layout(tmp_path, name, size, specials):
    from tokenizers import Tokenizer

    bench = _bench_module()
    spec = bench.MODELS[name]
    bench._write_tokenizer(tmp_path, spec["tokenizer"], spec["config"]["vocab_size"])
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == size
    for text, i in specials.items():
        assert tok.token_to_id(text) == i
    ids = tok.encode(" the quick brown fox", add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=True) == " the quick brown fox" and len(ids) <= 6
    eos = spec["generation_config"]["eos_token_id"]
    assert all(e < spec["config"]["vocab_size"] for e in eos)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "chat_template" in config and tok.token_to_id(config["eos_token"]) in eos


def test_benchmark_checkpoint_with_fewer_layers(tmp_path):
    """write_benchmark_checkpoint(layers=N): the release's shapes with only the first N
    decoder layers (a large model's kernels checked without its load), and it loads."""
    import amlx
    from safetensors import safe_open

    bench = _bench_module()
    path = bench.write_benchmark_checkpoint(tmp_path / "q", "qwen3-tiny-4bit", layers=1)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 == cfg["max_window_layers"]
    with safe_open(str(path / "model.safetensors"), "np") as f:
        layers = {k.split(".")[2] for k in f.keys() if k.startswith("model.layers.")}
    assert layers == {"0"}
    model = amlx.load_sync(path)
    try:
        assert len(model.complete_sync([5, 6, 7], max_tokens=2, temperature=0.0).token_ids) == 2
    finally:
        model.close()
    with pytest.raises(ValueError, match="cannot keep 9"):
        bench.write_benchmark_checkpoint(tmp_path / "r", "qwen3-tiny", layers=9)


def test_benchmark_safetensors_writer(tmp_path):
    from safetensors.torch import load_file

    bench = _bench_module()
    cfg = dict(bench.MODELS["qwen3-0.6b"]["config"], hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1000)
    layout = bench._layout(cfg, store_tied_lm_head=True, bits=None, group_size=64)
    shapes = {name: shape for name, (_, shape, _) in layout.items()}
    assert shapes == bench._tensor_shapes(cfg, store_tied_lm_head=True)
    path = tmp_path / "model.safetensors"
    bench._write_safetensors(path, layout, cfg, seed=1, metadata={"format": "pt"})
    tensors = load_file(str(path))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    assert torch.all(tensors["model.norm.weight"] == 1)
    w = tensors["model.layers.1.mlp.up_proj.weight"].float()
    assert 0.015 < w.std().item() < 0.025 and abs(w.mean().item()) < 0.005
    x = torch.randn(10_000) * 3
    expected = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bench._to_bf16_bits(x.numpy()), expected)


# ---------------------------------------------------------------------------
# the registry


def test_one_registry_names_every_architecture():
    """Each architecture file registers itself once; configs of every model type the
    test builders write resolve to it; an unknown one names the supported ones."""
    from amlx.models import architecture, architectures
    from amlx.models.config import ModelArgs

    assert set(architectures()) == {"qwen3", "qwen2", "llama", "mistral", "gemma3_text", "gemma3"}
    for model_type, arch in architectures().items():
        assert issubclass(arch.args, ModelArgs) and arch.args.ARCH == arch.name
    assert architecture("gemma3") is architecture("gemma3_text")
    with pytest.raises(ModelLoadError, match="supported: gemma3, gemma3_text, llama, mistral, qwen2, qwen3"):
        architecture("mamba", "/m/config.json")


def test_yarn_release_config_reads_its_scaling():
    cfg = normalize_config(RELEASES["qwen3-0.6b-yarn"])
    assert cfg["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert cfg["max_position_embeddings"] == 131072


@pytest.mark.parametrize("scaling,key", [
    ({"rope_type": "yarn"}, "'rope_scaling.factor'"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_fast": "fast"}, "'rope_scaling.beta_fast'"),
    ({"rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5}, "'rope_scaling.partial_rotary_factor'"),
    ({"rope_type": "dynamic", "factor": 4.0}, "'rope_scaling.rope_type'"),
])
def test_bad_rope_scaling_is_refused_when_the_config_is_read(scaling, key):
    with pytest.raises(ModelLoadError) as err:
        normalize_config(dict(QWEN3_0_6B, rope_scaling=scaling), "/m/config.json")
    assert "/m/config.json" in str(err.value) and key in str(err.value)
