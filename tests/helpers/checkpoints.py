"""Small random Hugging Face checkpoints in the on-disk format of real releases.

The tests compare amlx against transformers (PyTorch, CPU) on checkpoints built
here. Models are transformers' own classes, their weights redrawn from a seeded
generator (norm weights included, at scales that keep the logits
context-dependent), written with ``save_pretrained(safe_serialization=True)``,
so tensor names, shapes and the config are what transformers reads and writes.
On top of that:

* ``config_style="old"`` rewrites config.json the way releases made with
  transformers 4.x have it (``rope_theta``/``rope_scaling``,
  ``sliding_window_pattern``/``rope_local_base_freq`` for Gemma 3, ``torch_dtype``,
  and for multimodal Gemma 3 a sparse ``text_config``/``vision_config`` holding
  only the values that differ from the defaults, like gemma-3-4b-it).
* the multimodal Gemma 3 vision tower is renamed to the
  ``vision_tower.vision_model.*`` names of the real release.
* ``generation_config.json`` is written like the release of each family.

Default shapes are tiny: hidden 64, 4 heads, 2 kv heads, head_dim 16,
intermediate 128, 2 layers (4 for Gemma 3, half of them sliding-window).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .tokenizers import write_tokenizer

ARCHS = ("qwen3", "gemma3_text", "gemma3", "llama", "qwen2", "mistral")

# Shapes shared by every arch (config_overrides may change any of them).
_BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)

# Per arch: extra config values modelled on the smallest real release
# (Qwen3-0.6B, gemma-3-1b-it, Llama-3.2-1B-Instruct, Qwen2.5-0.5B-Instruct).
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": dict(
        rope_theta=1_000_000.0,
        rope_scaling=None,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=False,
        use_sliding_window=False,
        sliding_window=None,
    ),
    "qwen2": dict(
        rope_theta=1_000_000.0,
        rope_scaling=None,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        # Qwen2.5 >= 3B are untied; keeps one arch exercising lm_head by default.
        tie_word_embeddings=False,
        use_sliding_window=False,
        sliding_window=32768,
    ),
    "llama": dict(
        rope_theta=500_000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
    ),
    "gemma3_text": dict(
        num_hidden_layers=4,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        rope_scaling=None,
        sliding_window=8,
        sliding_window_pattern=2,
        # deliberately != head_dim: the attention scale is query_pre_attn_scalar**-0.5
        query_pre_attn_scalar=32,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
}
_ARCH_DEFAULTS["gemma3"] = _ARCH_DEFAULTS["gemma3_text"]
# Mistral-7B-v0.1's layout: the Llama block, every layer within a sliding window
# (shorter here than the test sequences).
_ARCH_DEFAULTS["mistral"] = dict(
    rope_theta=10_000.0,
    rope_scaling=None,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    sliding_window=8,
)

# A tiny SigLIP tower: 28x28 images, 14x14 patches -> 4 patches -> 4 image tokens.
_VISION_DEFAULTS = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
    vision_use_head=False,
)

# transformers_version of the release each family's old-style config copies.
_OLD_VERSION = {
    "qwen3": "4.51.0",
    "qwen2": "4.43.1",
    "llama": "4.45.0.dev0",
    "mistral": "4.34.0.dev0",
    "gemma3_text": "4.50.0.dev0",
    "gemma3": "4.50.0.dev0",
}

# Gemma3TextConfig / SiglipVisionConfig defaults of transformers 4.50: gemma-3-4b-it's
# config.json lists only what differs from these.
_OLD_GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262208,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=131072,
    initializer_range=0.02,
    rms_norm_eps=1e-6,
    use_cache=True,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    tie_word_embeddings=True,
    rope_theta=1_000_000.0,
    rope_scaling=None,
    rope_local_base_freq=10_000.0,
    attention_bias=False,
    attention_dropout=0.0,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    sliding_window_pattern=6,
    final_logit_softcapping=None,
    attn_logit_softcapping=None,
    cache_implementation="hybrid",
)
_OLD_SIGLIP_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=16,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    attention_dropout=0.0,
)

# Special tokens by family, in the order the releases list them.
_SPECIALS = {
    "qwen": dict(bos=["<|endoftext|>"], eos=["<|im_end|>", "<|endoftext|>"], pad=["<|endoftext|>"]),
    "gemma": dict(bos=["<bos>"], eos=["<eos>", "<end_of_turn>"], pad=["<pad>"]),
    "llama": dict(
        bos=["<|begin_of_text|>"],
        eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        pad=[],
    ),
}


def _family(arch: str) -> str:
    if arch.startswith("gemma"):
        return "gemma"
    if arch in ("llama", "mistral"):
        return "llama"
    return "qwen"


# ---------------------------------------------------------------------------
# tokenizer


def _special_ids(dirpath: Path) -> dict[str, int]:
    """Map special-token text -> id from the tokenizer files just written."""
    ids: dict[str, int] = {}
    tj = dirpath / "tokenizer.json"
    if tj.exists():
        data = json.loads(tj.read_text(encoding="utf-8"))
        for t in data.get("added_tokens", []):
            ids[t["content"]] = t["id"]
        vocab = data.get("model", {}).get("vocab", {})
        if isinstance(vocab, dict):
            for name in ("<|endoftext|>", "<eos>", "<bos>", "<pad>"):
                if name in vocab:
                    ids.setdefault(name, vocab[name])
    return ids


def _tokenizer_config_token(dirpath: Path, key: str) -> str | None:
    p = dirpath / "tokenizer_config.json"
    if not p.exists():
        return None
    value = json.loads(p.read_text(encoding="utf-8")).get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value


def _resolve_specials(dirpath: Path, arch: str) -> dict[str, Any]:
    """bos / eos list / pad ids as the family's release names them, else what the tokenizer says."""
    ids = _special_ids(dirpath)
    names = _SPECIALS[_family(arch)]
    out: dict[str, Any] = {}
    for role in ("bos", "eos", "pad"):
        found = [ids[n] for n in names[role] if n in ids]
        if not found:
            tc = _tokenizer_config_token(dirpath, f"{role}_token")
            if tc is not None and tc in ids:
                found = [ids[tc]]
        out[role] = found
    return out


# ---------------------------------------------------------------------------
# config and model construction


def _text_kwargs(arch: str, vocab_size: int, specials: dict, tie: bool | None, overrides: dict) -> dict:
    kw: dict[str, Any] = dict(_BASE)
    kw.update(_ARCH_DEFAULTS[arch])
    if arch == "qwen2":
        kw.pop("head_dim")  # Qwen2 derives it; real configs have no head_dim key
    kw["vocab_size"] = vocab_size
    # ids the tokenizer lacks stay None, not transformers' class defaults
    kw["bos_token_id"] = specials["bos"][0] if specials.get("bos") else None
    eos = specials.get("eos") or []
    # gemma lists every stop id in config.json; Qwen/Llama name one.
    kw["eos_token_id"] = (eos if _family(arch) == "gemma" else eos[0]) if eos else None
    kw["pad_token_id"] = specials["pad"][0] if specials.get("pad") else None
    kw["initializer_range"] = 0.02
    kw.update(overrides)
    if arch in ("qwen3", "qwen2") and "max_window_layers" not in overrides:
        kw["max_window_layers"] = kw["num_hidden_layers"]  # like the releases: no sliding layers
    if tie is not None:
        kw["tie_word_embeddings"] = tie
    if kw.get("rope_scaling") is None:
        kw.pop("rope_scaling", None)
    pattern = kw.pop("sliding_window_pattern", None)
    if arch.startswith("gemma") and pattern is not None and kw.get("layer_types") is None:
        # Spell the layout as layer_types: transformers 5 then writes a stale
        # `_sliding_window_pattern: 6` next to it, as it does for real conversions.
        kw["layer_types"] = [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(kw["num_hidden_layers"])
        ]
    return kw


def _build_model(arch: str, text_kw: dict, vision_overrides: dict | None):
    import transformers as tf

    if arch == "gemma3":
        text_kw = dict(text_kw)
        tie = text_kw.get("tie_word_embeddings", True)
        vocab = text_kw["vocab_size"]
        vision = dict(_VISION_DEFAULTS)
        vision.update(vision_overrides or {})
        top = dict(
            text_config=text_kw,
            vision_config=vision,
            mm_tokens_per_image=(vision["image_size"] // vision["patch_size"]) ** 2,
            # image tokens live inside the real vocabulary of gemma3 (262144 < 262208)
            boi_token_index=vocab - 3,
            eoi_token_index=vocab - 2,
            image_token_index=vocab - 1,
            tie_word_embeddings=tie,
        )
        if text_kw.get("eos_token_id") is not None:
            top["eos_token_id"] = text_kw["eos_token_id"]
        cfg = tf.Gemma3Config(**top)
        return tf.Gemma3ForConditionalGeneration(cfg)
    cls_cfg, cls_model = {
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
    }[arch]
    return cls_model(cls_cfg(**text_kw))


def _randomize(model: torch.nn.Module, seed: int, std: float, embed_std: float) -> None:
    # Own init instead of transformers' _init_weights: that one sets every norm to
    # identity (Gemma's to zero), which would hide norm-weight bugs in the parity tests.
    gen = torch.Generator().manual_seed(seed)
    gemma_rms = {
        id(m.weight)
        for m in model.modules()
        if type(m).__name__.endswith("RMSNorm") and type(m).__name__.startswith("Gemma")
    }
    seen: set[int] = set()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(remove_duplicate=False), key=lambda t: t[0]):
            if id(p) in seen:
                continue
            seen.add(id(p))
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if id(p) in gemma_rms:
                # applied as (1 + w): ~2x gain, so the layers are not drowned by the
                # sqrt(hidden)-scaled embedding and the logits depend on context
                value = 1.0 + 0.1 * noise
            elif "norm" in name and p.ndim == 1 and name.endswith("weight"):
                value = 1.0 + 0.1 * noise
            elif name.endswith("bias"):
                value = 0.1 * noise
            elif "embed_tokens" in name or name.startswith("lm_head"):
                value = embed_std * noise
            else:
                value = std * noise
            p.copy_(value.to(p.dtype))


# ---------------------------------------------------------------------------
# on-disk rewriting


def _sorted_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _rename_tensors(dirpath: Path, rename) -> None:
    """Rewrite every safetensors file (and the index) with ``rename(name)`` applied."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    index_path = dirpath / "model.safetensors.index.json"
    for f in sorted(dirpath.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            meta = fh.metadata() or {"format": "pt"}
            tensors = {rename(k): fh.get_tensor(k) for k in fh.keys()}
        save_file(tensors, str(f), metadata=meta)
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _gemma3_vision_name(name: str) -> str:
    # transformers 5 writes vision_tower.<x>; gemma-3-4b-it has vision_tower.vision_model.<x>
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + name[len("vision_tower."):]
    return name


def _pattern_of(layer_types: Sequence[str]) -> int:
    """The sliding_window_pattern that reproduces ``layer_types`` (Gemma 3 rule)."""
    n = len(layer_types)
    for p in range(1, n + 2):
        derived = ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n)]
        if list(layer_types) == derived:
            return p
    raise ValueError(f"layer_types {list(layer_types)} has no sliding_window_pattern equivalent")


def _flat_rope_to_old(rope: dict | None) -> tuple[float | None, dict | None]:
    if not rope:
        return None, None
    rope = dict(rope)
    theta = rope.pop("rope_theta", None)
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        return theta, None
    return theta, rope


def _old_text_config(cfg: dict, model_type: str) -> dict:
    """Rewrite one transformers-5 text config dict into the 4.x key layout."""
    cfg = dict(cfg)
    rope = cfg.pop("rope_parameters", None)
    layer_types = cfg.pop("layer_types", None)
    cfg.pop("_sliding_window_pattern", None)
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    if model_type == "gemma3_text":
        cfg.pop("use_bidirectional_attention", None)
        full = (rope or {}).get("full_attention") or {}
        local = (rope or {}).get("sliding_attention") or {}
        theta, scaling = _flat_rope_to_old(full)
        cfg["rope_theta"] = theta
        cfg["rope_scaling"] = scaling
        cfg["rope_local_base_freq"] = local.get("rope_theta", 10_000.0)
        if local.get("rope_type", "default") != "default":
            raise ValueError("old-style gemma3 configs cannot scale the local rope")
        cfg["sliding_window_pattern"] = _pattern_of(layer_types or [])
        cfg["cache_implementation"] = "hybrid"
    else:
        theta, scaling = _flat_rope_to_old(rope)
        cfg["rope_theta"] = theta
        if scaling is not None or model_type != "qwen2":  # Qwen2.5 configs have no rope_scaling key
            cfg["rope_scaling"] = scaling
        if model_type in ("qwen2", "qwen3") and layer_types is not None:
            derived = [
                "sliding_attention"
                if cfg.get("use_sliding_window") and cfg.get("sliding_window") is not None
                and i >= cfg.get("max_window_layers", 0)
                else "full_attention"
                for i in range(len(layer_types))
            ]
            if derived != list(layer_types):
                raise ValueError(f"layer_types {layer_types} cannot be written in the old style")
    return cfg


def _diff(cfg: dict, defaults: dict, keep: Iterable[str]) -> dict:
    keep = set(keep)
    return {k: v for k, v in cfg.items() if k in keep or k not in defaults or defaults[k] != v}


def _write_old_config(dirpath: Path, arch: str) -> None:
    path = dirpath / "config.json"
    cfg = json.loads(path.read_text())
    if arch == "gemma3":
        text = _old_text_config(cfg["text_config"], "gemma3_text")
        # drop keys transformers 4.50 never wrote into the sub-config
        for k in ("dtype", "torch_dtype", "transformers_version", "architectures"):
            text.pop(k, None)
        cfg["text_config"] = _diff(text, _OLD_GEMMA3_TEXT_DEFAULTS, keep=("model_type",))
        vision = dict(cfg["vision_config"])
        for k in ("dtype", "torch_dtype", "transformers_version", "architectures"):
            vision.pop(k, None)
        cfg["vision_config"] = _diff(vision, _OLD_SIGLIP_DEFAULTS, keep=("model_type", "vision_use_head"))
        if "dtype" in cfg:
            cfg["torch_dtype"] = cfg.pop("dtype")
    else:
        cfg = _old_text_config(cfg, arch)
    cfg["transformers_version"] = _OLD_VERSION[arch]
    _sorted_json(path, cfg)


def _write_generation_config(dirpath: Path, arch: str, specials: dict, config_style: str) -> None:
    bos, eos, pad = specials.get("bos"), specials.get("eos"), specials.get("pad")
    fam = _family(arch)
    gen: dict[str, Any] = {}
    if bos:
        gen["bos_token_id"] = bos[0]
    if eos:
        gen["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    if pad:
        gen["pad_token_id"] = pad[0]
    gen["do_sample"] = True
    if fam == "qwen" and arch == "qwen3":
        gen.update(temperature=0.6, top_k=20, top_p=0.95)
    elif fam == "qwen":
        gen.update(repetition_penalty=1.1, temperature=0.7, top_k=20, top_p=0.8)
    elif fam == "gemma":
        gen.update(cache_implementation="hybrid", top_k=64, top_p=0.95)
    else:
        gen.update(temperature=0.6, top_p=0.9)
    if config_style == "old":
        gen["transformers_version"] = _OLD_VERSION[arch]
    else:
        import transformers

        gen["transformers_version"] = transformers.__version__
    _sorted_json(dirpath / "generation_config.json", gen)


# ---------------------------------------------------------------------------
# public API


def make_checkpoint(
    dirpath,
    arch: str,
    *,
    dtype: str = "float32",
    seed: int = 0,
    tie_word_embeddings: bool | None = None,
    config_style: str = "new",
    max_shard_size: int | str | None = None,
    tokenizer: str | None | bool = None,
    std: float = 0.2,
    embed_std: float | None = None,
    vision_config: dict | None = None,
    **config_overrides,
) -> Path:
    """Write a small random checkpoint of ``arch`` into ``dirpath`` and return the path.

    arch: "qwen3", "gemma3_text" (Gemma3ForCausalLM), "gemma3" (multimodal
    Gemma3ForConditionalGeneration, text weights under ``language_model.model.``),
    "llama" (Llama 3.2 style, llama3 rope scaling by default; pass
    ``rope_scaling=None`` for plain rope) or "qwen2" (q/k/v biases).
    dtype: "float32", "bfloat16" or "float16" -- the stored tensor dtype.
    tie_word_embeddings: None keeps the arch default (True except qwen2).
    config_style: "new" (what transformers 5 writes: ``rope_parameters``,
    ``layer_types``) or "old" (``rope_theta``/``rope_scaling``, Gemma's
    ``sliding_window_pattern``/``rope_local_base_freq``). Both load to the same model.
    max_shard_size: when given (bytes or "50KB"), shards with model.safetensors.index.json.
    tokenizer: "bpe" or "spm" (None: spm for gemma, bpe otherwise) written with
    tests.helpers.tokenizers; its size is the vocab size. False writes no tokenizer
    (vocab_size from the overrides, default 256).
    std / embed_std: init scale of linear weights / embeddings and lm_head (embed_std
    None: 0.3, Gemma 0.15 because of its sqrt(hidden) embedding scale). The defaults
    give context-dependent logits (std ~2.5) whose greedy tokens vary.
    vision_config: overrides for the tiny SigLIP tower of "gemma3".
    config_overrides: any config value of the text model, in old-style names for rope
    (``rope_theta``, ``rope_scaling``, ``rope_local_base_freq``, ``sliding_window_pattern``)
    or any new-style key (``rope_parameters``, ``layer_types``).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if config_style not in ("new", "old"):
        raise ValueError(f"config_style must be 'new' or 'old', not {config_style!r}")
    path = Path(dirpath)
    path.mkdir(parents=True, exist_ok=True)

    overrides = dict(config_overrides)
    if tokenizer is False:
        vocab_size = overrides.pop("vocab_size", 256)
        specials: dict[str, Any] = {"bos": [], "eos": [], "pad": []}
    else:
        kind = tokenizer or ("spm" if arch.startswith("gemma") else "bpe")
        tok_size = write_tokenizer(path, kind)
        vocab_size = overrides.pop("vocab_size", tok_size)
        specials = _resolve_specials(path, arch)
    if "rope_parameters" in overrides:
        # explicit new-style rope replaces the old-style defaults
        for k in ("rope_theta", "rope_scaling", "rope_local_base_freq"):
            if k not in overrides:
                overrides[k] = None
    if "layer_types" in overrides and "sliding_window_pattern" not in overrides:
        overrides["sliding_window_pattern"] = None

    text_kw = _text_kwargs(arch, vocab_size, specials, tie_word_embeddings, overrides)
    optional = ("rope_theta", "rope_scaling", "rope_local_base_freq", "sliding_window_pattern")
    text_kw = {k: v for k, v in text_kw.items() if v is not None or k not in optional}

    torch.manual_seed(seed)
    model = _build_model(arch, text_kw, vision_config)
    if embed_std is None:
        embed_std = 0.15 if arch.startswith("gemma") else 0.3
    _randomize(model, seed, std, embed_std)
    model = model.to(getattr(torch, dtype)).eval()
    for stale in [*path.glob("model*.safetensors"), *path.glob("model.safetensors.index.json")]:
        stale.unlink()  # a rebuild into the same folder must not leave old shards behind
    save_kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), safe_serialization=True, **save_kw)

    if arch == "gemma3":
        _rename_tensors(path, _gemma3_vision_name)
    if config_style == "old":
        _write_old_config(path, arch)
    _write_generation_config(path, arch, specials, config_style)
    return path


def load_reference(path, dtype: torch.dtype = torch.float32):
    """Load the checkpoint at ``path`` with transformers, in eval mode, eager attention.

    For multimodal gemma3 this is Gemma3ForConditionalGeneration, whose forward takes
    plain ``input_ids`` and returns text logits.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager")
    return model.eval()


def _as_batch(ids) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    return t[None] if t.ndim == 1 else t


def reference_logits(model, ids) -> np.ndarray:
    """Logits (float32 numpy) of one forward pass: [T, vocab] for a 1-D ``ids``, [B, T, vocab] for 2-D."""
    batch = _as_batch(ids)
    with torch.no_grad():
        out = model(input_ids=batch, use_cache=False).logits.float().numpy()
    return out[0] if np.asarray(ids).ndim == 1 else out


def eos_ids(model) -> list[int]:
    """The stop ids of ``model``'s generation config (a list, maybe empty)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def reference_greedy(model, ids, n: int, *, stop_at_eos: bool = False) -> list[int]:
    """Greedy-decode ``n`` new tokens after the 1-D prompt ``ids``; returns only the new ids.

    A manual loop over a KV cache, so it generates exactly ``n`` tokens even when an
    eos id comes up (``generate`` would stop there). With ``stop_at_eos=True`` it stops
    after the first id in the model's generation_config eos list, like ``generate``,
    and that eos id is the last element.
    """
    from transformers import DynamicCache

    stops = set(eos_ids(model)) if stop_at_eos else set()
    batch = _as_batch(ids)
    cache = DynamicCache(config=model.config)
    # transformers 5.2x renamed past_key_values to cache (the old name warns)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out: list[int] = []
    with torch.no_grad():
        logits = model(input_ids=batch, use_cache=True, **{cache_kw: cache}).logits
        for _ in range(n):
            tok = int(logits[0, -1].float().argmax())
            out.append(tok)
            if tok in stops or len(out) == n:
                break
            logits = model(input_ids=torch.tensor([[tok]]), use_cache=True, **{cache_kw: cache}).logits
    return out


def top2_margin(logits: np.ndarray) -> float:
    """Smallest gap between the best and second-best logit over all positions (flakiness check)."""
    part = np.sort(np.asarray(logits, dtype=np.float64).reshape(-1, logits.shape[-1]), axis=-1)
    return float(np.min(part[:, -1] - part[:, -2])) if part.shape[-1] > 1 else math.inf
