"""`amlx demo`: a small random checkpoint, several concurrent streams and a live cancellation.

The checkpoint is built here from numpy and the `tokenizers` library alone (a
Qwen3-shaped model with a word-piece tokenizer trained on a few sentences), so
the demo runs right after `pip install`. Its weights are random: the streams
produce fluent-looking nonsense, which is what they should do.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
To be or not to be, that is the question. All that glitters is not gold. The early bird catches the worm.
Large language models predict the next token. Asynchronous code awaits tokens without blocking the loop.
Continuous batching decodes many requests together. Cancellation frees memory at once.
MLX runs on Metal, CUDA and the CPU. Streams of text flow from the worker thread to the event loop.
"""

_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_demo_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Writes a tiny random Qwen3 checkpoint (config, safetensors, tokenizer) to `path`."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([_CORPUS] * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                               show_progress=False))
    tok.save(str(path / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    eos = tok.token_to_id("<|im_end|>")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "chat_template": _TEMPLATE, "model_max_length": 4096}, indent=2))
    hidden, layers, heads, kv, head_dim, inter = 128, 4, 4, 2, 32, 256
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
              "tie_word_embeddings": True, "torch_dtype": "float32", "eos_token_id": eos, "bos_token_id": None}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.08):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {"model.embed_tokens.weight": w(vocab, hidden, scale=0.5), "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": np.ones(hidden, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
                  p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
                  p + "self_attn.k_proj.weight": w(kv * head_dim, hidden),
                  p + "self_attn.v_proj.weight": w(kv * head_dim, hidden),
                  p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
                  p + "self_attn.q_norm.weight": np.ones(head_dim, np.float32),
                  p + "self_attn.k_norm.weight": np.ones(head_dim, np.float32),
                  p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
                  p + "mlp.down_proj.weight": w(hidden, inter)})
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def default_model_dir() -> Path:
    """The embedded default model's directory (for `amlx serve` with no model).

    Temporary stand-in until the trained embedded model lands: the random demo
    checkpoint, written once into the user's cache directory."""
    import os

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "amlx" / "demo-model"
    if not (root / "model.safetensors").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="demo-model-", dir=root.parent))
        write_demo_checkpoint(tmp)
        try:
            tmp.rename(root)  # atomic: a concurrent first run never sees half a checkpoint
        except OSError:
            if not (root / "model.safetensors").is_file():
                raise
    return root


_PROMPTS = [
    ("greedy", "The quick brown fox", {}),
    ("t=0.8", "Streams of text", {"temperature": 0.8, "seed": 1}),
    ("top-p", "Large language models", {"temperature": 1.0, "top_p": 0.9, "seed": 2}),
    ("chat", [{"role": "user", "content": "Tell me about MLX."}], {"temperature": 0.7, "seed": 3}),
    ("cancel", "Cancellation frees memory", {"temperature": 0.9, "seed": 4}),
]


async def run_demo(out=sys.stdout, tokens: int = 48) -> dict:
    """Loads the demo checkpoint and streams several requests concurrently;
    the last one is cancelled halfway. Returns per-stream token counts."""
    import amlx

    live = out.isatty()
    with tempfile.TemporaryDirectory(prefix="amlx-demo-") as tmp:
        path = write_demo_checkpoint(tmp)
        out.write(f"amlx demo: random Qwen3-shaped checkpoint in {path}\n")
        async with await amlx.load(path) as model:
            out.write(f"loaded: {model.info.architecture}, {model.info.parameters:,} parameters, "
                      f"{model.info.dtype} on {model.info.device}\n\n")
            texts = {name: "" for name, _, _ in _PROMPTS}
            counts = {name: 0 for name, _, _ in _PROMPTS}
            status = {name: "running" for name, _, _ in _PROMPTS}

            def render(final: bool = False) -> None:
                if live:
                    out.write(f"\x1b[{len(_PROMPTS)}F" if render.drawn else "")
                    for name, _, _ in _PROMPTS:
                        text = texts[name].replace("\n", " ")[-70:]
                        out.write(f"\x1b[2K[{name:>6} {counts[name]:3d} {status[name]:>9}] {text}\n")
                    render.drawn = True
                elif final:
                    for name, _, _ in _PROMPTS:
                        out.write(f"[{name:>6} {counts[name]:3d} {status[name]:>9}] {texts[name]!r}\n")
                out.flush()

            render.drawn = False

            async def consume(name, prompt, opts):
                limit = tokens // 2 if name == "cancel" else tokens
                async for tok in model.generate(prompt, max_tokens=tokens, **opts):
                    texts[name] += tok.text
                    counts[name] += 1
                    if tok.finish_reason:
                        status[name] = tok.finish_reason
                    if counts[name] >= limit and name == "cancel":
                        status[name] = "cancelled"
                        break  # leaving the loop cancels the request
                    render()
                    await asyncio.sleep(0.005)  # a client reading at its own pace

            start = time.perf_counter()
            await asyncio.gather(*(consume(*p) for p in _PROMPTS))
            elapsed = time.perf_counter() - start
            render(final=True)
            stats = model.stats()
            out.write(f"\n{sum(counts.values())} tokens from {len(_PROMPTS)} concurrent streams in {elapsed:.2f} s; "
                      f"'cancel' stopped after {counts['cancel']} tokens, the others ran on. "
                      f"MLX active memory: {stats['memory']['active']:,} bytes\n")
    return counts
