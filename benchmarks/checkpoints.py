"""Random-weight checkpoints with the real shapes of released models.

    python benchmarks/checkpoints.py OUTDIR [--models qwen3-0.6b gemma3-1b llama3.2-1b]
    python benchmarks/checkpoints.py OUTDIR --models qwen3-8b qwen3-8b-4bit gemma3-4b gemma3-27b-4bit

Shapes: Qwen3-0.6B, Gemma-3-1B, Llama-3.2-1B, Qwen3-8B, and the language models of
Gemma-3-4B and Gemma-3-27B; bf16 as released, or with -4bit / -8bit directly in
mlx-community's quantized format (what `amlx convert SRC DST -q 4` writes).
Sizes: qwen3-8b 16.4 GB (4.6 GB in 4 bits), gemma3-4b 7.8 GB (2.2), gemma3-27b
54.0 GB (15.2); written at the disk's speed (one random block, sliced).

writes OUTDIR/<name>/ with the release's config.json and generation_config.json,
a model.safetensors with the release's tensor names, shapes and dtype (bf16), a
byte-level BPE tokenizer.json whose vocabulary has the release's size and
special-token ids, and a tokenizer_config.json with a chat template. Decode
speed depends on shapes only, so amlx and mlx-lm can be benchmarked without a
hub download. numpy only (no torch, no transformers): the safetensors file is
written directly (8-byte little-endian header length, JSON header, raw bytes).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MODELS", "checkpoint_bytes", "split_variant", "write_benchmark_checkpoint"]

# ---------------------------------------------------------------------------
# the releases: config.json as published, generation_config.json, tokenizer layout

_QWEN3_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>",
]
# ids 151643.. are specials; Qwen marks the tool/think markers as non-special
_QWEN3_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
                      "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                      "<|file_sep|>"}


def _llama3_specials() -> list[str]:
    named = {
        0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>", 6: "<|start_header_id|>",
        7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>",
    }
    out, reserved = [], 0
    for i in range(256):
        if i in named:
            out.append(named[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


def _gemma3_low_specials() -> list[str]:
    # ids 0..106 of the Gemma 3 vocabulary
    out = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]"]
    out += [f"<unused{i}>" for i in range(99)]
    out += ["<start_of_turn>", "<end_of_turn>"]
    return out


_QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
_LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

MODELS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": {
        "release": "Qwen/Qwen3-0.6B",
        "config": {
            "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
            "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
            "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
            "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
            "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
            "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
            "use_sliding_window": False, "vocab_size": 151936,
        },
        "generation_config": {
            "bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
            "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "4.51.0",
        },
        # Qwen3-0.6B ships lm_head.weight although it is tied (a copy of embed_tokens)
        "store_tied_lm_head": True,
        "tokenizer": {
            "regular": 151643, "low_specials": [], "high_specials": _QWEN3_SPECIALS,
            "not_special": _QWEN3_NOT_SPECIAL, "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>",
            "unk": None, "add_bos": False, "template": _QWEN3_TEMPLATE, "model_max_length": 131072,
        },
    },
    "gemma3-1b": {
        "release": "google/gemma-3-1b-it",
        "config": {
            "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid",
            "eos_token_id": [1, 106], "final_logit_softcapping": None, "head_dim": 256,
            "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02,
            "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
            "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
            "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
            "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
            "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True,
            "vocab_size": 262144,
        },
        "generation_config": {
            "bos_token_id": 2, "cache_implementation": "hybrid", "do_sample": True, "eos_token_id": [1, 106],
            "pad_token_id": 0, "top_k": 64, "top_p": 0.95, "transformers_version": "4.50.0.dev0",
        },
        "store_tied_lm_head": False,
        "tokenizer": {
            "regular": 262144 - 107, "low_specials": _gemma3_low_specials(), "high_specials": [],
            "not_special": set(), "bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>",
            "add_bos": True, "template": _GEMMA3_TEMPLATE, "model_max_length": 1000000000000000019884624838656,
        },
    },
    "llama3.2-1b": {
        "release": "meta-llama/Llama-3.2-1B-Instruct",
        "config": {
            "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 64,
            "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
            "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
            "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": {
                "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3",
            },
            "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
            "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256,
        },
        "generation_config": {
            "bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
            "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.45.0.dev0",
        },
        "store_tied_lm_head": False,
        "tokenizer": {
            "regular": 128000, "low_specials": [], "high_specials": _llama3_specials(), "not_special": set(),
            "bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": None, "unk": None, "add_bos": True,
            "template": _LLAMA3_TEMPLATE, "model_max_length": 131072,
        },
    },
}




def _qwen3_large(release: str, **shape: Any) -> dict[str, Any]:
    """A larger Qwen3 release: Qwen3-0.6B's config.json with the release's shapes."""
    spec = json.loads(json.dumps(MODELS["qwen3-0.6b"], default=sorted))
    spec["tokenizer"] = MODELS["qwen3-0.6b"]["tokenizer"]
    spec["release"] = release
    spec["config"].update(shape)
    spec["store_tied_lm_head"] = False
    return spec


def _gemma3_text(release: str, **shape: Any) -> dict[str, Any]:
    """The language model of a multimodal Gemma 3 release (4B, 12B, 27B): its
    text_config as a Gemma3ForCausalLM config.json, with the values the release
    leaves to transformers' defaults written out (vocabulary 262,208 rows, rope
    1e6 global / 1e4 local with linear scaling 8, window 1,024, 5 local : 1 global)."""
    spec = json.loads(json.dumps(MODELS["gemma3-1b"], default=sorted))
    spec["tokenizer"] = MODELS["gemma3-1b"]["tokenizer"]
    spec["release"] = release
    spec["config"].update({
        "max_position_embeddings": 131072, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024, "vocab_size": 262208, "hidden_activation": "gelu_pytorch_tanh",
    })
    spec["config"].update(shape)
    return spec


# Shapes from the releases' config.json (Qwen/Qwen3-1.7B, Qwen/Qwen3-8B; google/gemma-3-4b-it and
# google/gemma-3-27b-it, text_config).
MODELS["qwen3-1.7b"] = _qwen3_large(
    "Qwen/Qwen3-1.7B", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, max_window_layers=28,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
MODELS["qwen3-8b"] = _qwen3_large(
    "Qwen/Qwen3-8B", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, max_window_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
MODELS["gemma3-4b"] = _gemma3_text(
    "google/gemma-3-4b-it", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256)
MODELS["gemma3-27b"] = _gemma3_text(
    "google/gemma-3-27b-it", hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
    num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168)

# the layouts above at a size a CPU decodes quickly (scripts' --small runs)
MODELS["qwen3-tiny"] = _qwen3_large(
    "(test shape)", hidden_size=256, intermediate_size=512, num_hidden_layers=2, max_window_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False)
# Qwen3's full 151,936-token vocabulary on a model too small to cost anything: per-step host
# work (sampling, masks over the whole vocabulary) dominates, as it does on a GPU
MODELS["qwen3-vocab"] = _qwen3_large(
    "(test shape)", hidden_size=64, intermediate_size=128, num_hidden_layers=1, max_window_layers=1,
    num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)
# Qwen3-8B's depth (36 layers) and vocabulary at a tiny width: a step's host work (per-layer graph
# building, an uncompiled prefill pass) as deep as 8B's, on a CPU (issue 16's steady state)
MODELS["qwen3-vocab-deep"] = _qwen3_large(
    "(test shape)", hidden_size=64, intermediate_size=128, num_hidden_layers=36, max_window_layers=36,
    num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)
MODELS["gemma3-tiny"] = _gemma3_text(
    "(test shape)", hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64, sliding_window=16, sliding_window_pattern=3)

# Gemma-3-1B's proportions where they set a prefill pass's memory (the 262,208-token vocabulary,
# an MLP 6x as wide as the model, one KV head of 256) at a size a CPU prefills 8,192 tokens of:
# benchmarks/prefill_memory.py
MODELS["gemma3-wide"] = _gemma3_text(
    "(test shape)", hidden_size=192, intermediate_size=1152, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6)

SMALL_MODELS = ("qwen3-0.6b", "gemma3-1b", "llama3.2-1b")


# ---------------------------------------------------------------------------
# tensors


def _tensor_shapes(cfg: dict, store_tied_lm_head: bool) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, as the release's model.safetensors has them."""
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    gemma = cfg["model_type"] == "gemma3_text"
    qk_norm = cfg["model_type"] in ("qwen3", "gemma3_text")
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not _tied(cfg) or store_tied_lm_head:
        shapes["lm_head.weight"] = (vocab, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if gemma:
            shapes[p + "pre_feedforward_layernorm.weight"] = (h,)
            shapes[p + "post_feedforward_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (heads * hd, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv * hd, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv * hd, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, heads * hd)
        if qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
    return dict(sorted(shapes.items()))


def _tied(cfg: dict) -> bool:
    # gemma-3-1b-it's config.json leaves tie_word_embeddings out: Gemma's default is tied
    return bool(cfg.get("tie_word_embeddings", cfg["model_type"] == "gemma3_text"))


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)


class _Pool:
    """Random values of one kind, fast: one block drawn once, served from random offsets.

    Drawing fresh values for every tensor would cost minutes at the 8B-27B sizes; the
    timings only need values of the right scale, not independence between tensors.
    Slices are written as views (no copy), so the writer runs at the disk's speed."""

    SIZE = 1 << 24

    def __init__(self, block: np.ndarray, rng: np.random.Generator):
        self.block, self.rng = block, rng

    def write(self, f, nbytes: int) -> None:
        data = self.block.view(np.uint8)
        half = data.size // 2
        while nbytes > 0:
            take = min(nbytes, half)
            # on a whole element (4 bytes covers bf16 and uint32): an odd byte offset
            # would pair the halves of neighbouring values into NaNs and huge numbers
            start = int(self.rng.integers(0, data.size - take + 1)) & ~3
            f.write(memoryview(data[start:start + take]))
            nbytes -= take

    @classmethod
    def normal_bf16(cls, rng: np.random.Generator, scale: float) -> "_Pool":
        block = rng.standard_normal(cls.SIZE, dtype=np.float32)
        block *= np.float32(scale)
        return cls(_to_bf16_bits(block), rng)

    @classmethod
    def uniform_bf16(cls, rng: np.random.Generator, lo: float, hi: float) -> "_Pool":
        return cls(_to_bf16_bits(rng.uniform(lo, hi, cls.SIZE // 16).astype(np.float32)), rng)

    @classmethod
    def bits(cls, rng: np.random.Generator) -> "_Pool":
        return cls(rng.integers(0, 1 << 32, cls.SIZE, dtype=np.uint32), rng)


def _norm_value(cfg: dict) -> np.ndarray:
    # Gemma's RMSNorm multiplies by (1 + w): the neutral stored value is 0, elsewhere 1
    return _to_bf16_bits(np.array([0.0 if cfg["model_type"] == "gemma3_text" else 1.0], np.float32))


# (safetensors dtype, shape, filler): fillers are "embed" (the embedding's values; a tied
# lm_head stored anyway repeats them), "normal", "norm", "bits", "scales", "biases"
Layout = dict[str, tuple[str, tuple[int, ...], str]]


def _layout(cfg: dict, store_tied_lm_head: bool, bits: int | None, group_size: int) -> Layout:
    """Every tensor of the checkpoint: bf16 as the release stores it, or (bits) in the
    format `amlx convert -q` writes (mlx-community's): each linear layer and the
    embedding as packed uint32 weight with bf16 scales and biases per group."""
    out: Layout = {}
    shapes = _tensor_shapes(cfg, store_tied_lm_head and bits is None)
    for name, shape in shapes.items():
        fill = "embed" if name == "model.embed_tokens.weight" or name == "lm_head.weight" and _tied(cfg) \
            else "norm" if len(shape) == 1 else "normal"
        if bits is None or len(shape) == 1 or shape[1] % group_size:
            out[name] = ("BF16", shape, fill)
            continue
        base = name[:-len("weight")]
        out[name] = ("U32", (shape[0], shape[1] * bits // 32), "bits")
        out[base + "scales"] = ("BF16", (shape[0], shape[1] // group_size), "scales")
        out[base + "biases"] = ("BF16", (shape[0], shape[1] // group_size), "biases")
    return dict(sorted(out.items()))


def layout_bytes(layout: Layout) -> int:
    return sum(int(np.prod(shape)) * (4 if dt == "U32" else 2) for dt, shape, _ in layout.values())


def _write_safetensors(path: Path, layout: Layout, cfg: dict, seed: int, metadata: dict[str, str]) -> int:
    """Stream a safetensors file of `layout` with random values; returns its size in bytes."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, (dt, shape, _) in layout.items():
        nbytes = int(np.prod(shape)) * (4 if dt == "U32" else 2)
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, like safetensors writes it
    rng = np.random.default_rng(seed)
    # 4-bit codes are uniform in 0..15: with scale s and bias -7.5 s a weight is about U(-0.02, 0.02)
    pools = {"normal": _Pool.normal_bf16(rng, 0.02), "bits": _Pool.bits(rng),
             "scales": _Pool.uniform_bf16(rng, 0.002, 0.003), "biases": _Pool.uniform_bf16(rng, -0.02, -0.015)}
    norm = _norm_value(cfg)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (dt, shape, fill) in layout.items():
            n = int(np.prod(shape))
            if fill == "norm":
                f.write(np.repeat(norm, n).tobytes())
            elif fill == "embed":
                _Pool(pools["normal"].block, np.random.default_rng(seed + 1)).write(f, n * 2)
            else:
                pools[fill].write(f, n * (4 if dt == "U32" else 2))
    return path.stat().st_size


# ---------------------------------------------------------------------------
# tokenizer


def _byte_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character map, used by every byte-level BPE
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _bpe_vocab_and_merges(n_regular: int) -> tuple[list[str], list[str]]:
    """``n_regular`` tokens: the 256 bytes, then merges building lowercase words up to 5 letters.

    Every token past the bytes comes from a merge, so the tokenizer is a consistent BPE
    (English text splits into tokens of a few letters) of exactly the release's size.
    """
    b2u = _byte_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    space = b2u[ord(" ")]
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges: list[str] = []

    def add(left: str, right: str) -> bool:
        if len(tokens) >= n_regular:
            return False
        tokens.append(left + right)
        merges.append(f"{left} {right}")
        return True

    for c in letters + letters.upper() + "0123456789":
        add(space, c)
    level = [""]  # words grow one letter per level
    for _ in range(5):
        words = [stem + c for stem in level for c in letters]
        # space-prefixed merges rank first, so " the" becomes one token before "he" can form
        for prefix in (space, ""):
            for word in words:
                if len(word) >= 2 and not add(prefix + word[:-1], word[-1]):
                    return tokens, merges
        level = words
    if len(tokens) < n_regular:
        raise ValueError(f"vocabulary of {n_regular} is larger than this generator makes")
    return tokens, merges


def _write_tokenizer(dirpath: Path, spec: dict, vocab_size: int) -> None:
    low, high = spec["low_specials"], spec["high_specials"]
    regular, merges = _bpe_vocab_and_merges(spec["regular"])
    ordered = list(low) + regular + list(high)
    vocab = {tok: i for i, tok in enumerate(ordered)}
    if len(vocab) != len(ordered):
        raise AssertionError("duplicate tokens in the generated vocabulary")
    if len(ordered) > vocab_size:
        raise AssertionError(f"tokenizer has {len(ordered)} tokens, model vocab is {vocab_size}")
    added = [
        {"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": t not in spec["not_special"]}
        for t in list(low) + list(high)
    ]
    post = None
    if spec["add_bos"]:
        bos = spec["bos"]
        post = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}},
        }
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": merges,
        },
    }
    (dirpath / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    config = {
        "add_bos_token": spec["add_bos"],
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for a in added
        },
        "bos_token": spec["bos"],
        "chat_template": spec["template"],
        "clean_up_tokenization_spaces": False,
        "eos_token": spec["eos"],
        "model_max_length": spec["model_max_length"],
        "pad_token": spec["pad"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if spec["unk"] is not None:
        config["unk_token"] = spec["unk"]
    (dirpath / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


# ---------------------------------------------------------------------------
# entry points


def split_variant(name: str) -> tuple[str, int | None]:
    """'qwen3-8b-4bit' -> ('qwen3-8b', 4); 'qwen3-8b' -> ('qwen3-8b', None)."""
    for bits in QUANT_BITS:
        if name.endswith(f"-{bits}bit"):
            return name[: -len(f"-{bits}bit")], bits
    return name, None


QUANT_BITS = (4, 8)
GROUP_SIZE = 64  # mlx-community's releases and `amlx convert -q`'s default


def _spec(name: str) -> tuple[dict[str, Any], int | None]:
    base, bits = split_variant(name)
    if base not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)} (optionally with -4bit / -8bit)")
    return MODELS[base], bits


def checkpoint_bytes(name: str) -> int:
    """Bytes of weights `write_benchmark_checkpoint(_, name)` writes."""
    spec, bits = _spec(name)
    return layout_bytes(_layout(spec["config"], spec["store_tied_lm_head"], bits, GROUP_SIZE))


def write_benchmark_checkpoint(dirpath, name: str, *, seed: int = 0, layers: int | None = None) -> Path:
    """Write the random-weight checkpoint ``name`` (a key of MODELS, optionally with a
    ``-4bit`` / ``-8bit`` suffix) into ``dirpath``.

    Files: config.json and generation_config.json as the release has them,
    model.safetensors with the release's tensor names and shapes, tokenizer.json /
    tokenizer_config.json (byte-level BPE of the release's size and special-token ids,
    with a chat template). Weights are Normal(0, 0.02) in bf16, norms neutral. With a
    bits suffix the weights are written directly in the format `amlx convert -q BITS`
    (and mlx-community) uses: random packed codes, bf16 scales and biases per group of
    64, config.json's ``quantization`` / ``quantization_config``, an index file, and
    no stored copy of a tied lm_head. (Decode speed depends on shapes, not values; the
    direct form needs no bf16 copy on disk: 27B in bf16 is 54 GB.) `layers`: only the
    first that many decoder layers (every other shape the release's), for checks of a
    large model's kernels that need its shapes but not its load and compile times.
    Returns the directory.
    """
    spec, bits = _spec(name)
    path = Path(dirpath)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(spec["config"])
    if layers is not None:
        if not 1 <= layers <= cfg["num_hidden_layers"]:
            raise ValueError(f"{name} has {cfg['num_hidden_layers']} layers; cannot keep {layers}")
        cfg["num_hidden_layers"] = layers
        if "max_window_layers" in cfg:
            cfg["max_window_layers"] = min(cfg["max_window_layers"], layers)
    layout = _layout(cfg, spec["store_tied_lm_head"], bits, GROUP_SIZE)
    metadata = {"format": "pt"}
    if bits is not None:
        cfg["quantization"] = {"group_size": GROUP_SIZE, "bits": bits}
        cfg["quantization_config"] = dict(cfg["quantization"])
        metadata = {"format": "mlx"}
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (path / "generation_config.json").write_text(json.dumps(spec["generation_config"], indent=2) + "\n")
    _write_tokenizer(path, spec["tokenizer"], cfg["vocab_size"])
    size = _write_safetensors(path / "model.safetensors", layout, cfg, seed, metadata)
    if bits is not None:
        params = sum(int(np.prod(shape)) * (32 // bits if dt == "U32" else 1) for n, (dt, shape, _) in layout.items()
                     if not n.endswith(("scales", "biases")))
        index = {"metadata": {"total_size": size, "total_parameters": params},
                 "weight_map": {n: "model.safetensors" for n in layout}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--models", nargs="+", default=list(SMALL_MODELS),
                        help=f"names from {', '.join(MODELS)}, each optionally with -4bit / -8bit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None,
                        help="keep only the first N decoder layers (the release's shapes otherwise)")
    args = parser.parse_args(argv)
    for name in args.models:
        t0 = time.perf_counter()
        out = write_benchmark_checkpoint(args.outdir / name, name, seed=args.seed, layers=args.layers)
        size = (out / "model.safetensors").stat().st_size
        print(f"{name}: {out} ({size / 2**30:.2f} GiB, {time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
