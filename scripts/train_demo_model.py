"""Trains amlx's embedded demo model from scratch: `python scripts/train_demo_model.py`.

1. a byte-level BPE tokenizer is trained on the corpus (scripts/demo_corpus.jsonl,
   chat turns written for amlx) with the `tokenizers` library;
2. a small Qwen3 checkpoint with random weights is written (numpy, seeded);
3. amlx fine-tunes every weight of it on the corpus (`Model.train`, AdamW, a
   cosine schedule): full fine-tuning from random initialisation is training;
4. the result is written to amlx/embedded/ (config, weights, tokenizer files),
   where `amlx.demo.default_model_dir()` finds it.

Everything is seeded (tokenizer, initialisation, packing, batch order); the
defaults are the settings of the committed model. Run from the repository root;
`--out DIR` writes elsewhere. Time measured on the 2-core development machine
(MLX CPU backend): see amlx/embedded/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "scripts" / "demo_corpus.jsonl"
EMBEDDED = ROOT / "amlx" / "embedded"
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "generation_config.json")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def read_corpus(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_tokenizer(records: list[dict], vocab_size: int, out: Path) -> int:
    """A byte-level BPE over the corpus' messages; returns the id of <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>" for r in records for m in r["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "chat_template": TEMPLATE, "model_max_length": 1024}, indent=2) + "\n")
    return tok.token_to_id("<|im_end|>")


def write_random_checkpoint(out: Path, dims: dict, eos: int, seed: int) -> None:
    """config.json, generation_config.json and a seeded random model.safetensors (float32)."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    h, n_layers, heads, kv, hd, inter = (dims[k] for k in ("hidden", "layers", "heads", "kv_heads", "head_dim",
                                                             "intermediate"))
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab,
              "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": n_layers,
              "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
              "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": True, "torch_dtype": "float32", "eos_token_id": eos, "bos_token_id": None}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}) + "\n")
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    ones = lambda n: np.ones(n, np.float32)  # noqa: E731
    t = {"model.embed_tokens.weight": w(vocab, h), "model.norm.weight": ones(h)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h),
                  p + "self_attn.q_proj.weight": w(heads * hd, h), p + "self_attn.k_proj.weight": w(kv * hd, h),
                  p + "self_attn.v_proj.weight": w(kv * hd, h), p + "self_attn.o_proj.weight": w(h, heads * hd),
                  p + "self_attn.q_norm.weight": ones(hd), p + "self_attn.k_norm.weight": ones(hd),
                  p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
                  p + "mlp.down_proj.weight": w(h, inter)})
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})


def pack(records: list[dict], init: Path, epochs: int, max_tokens: int, seed: int) -> list[dict]:
    """`epochs` shufflings of the corpus, each cut into multi-turn records of at most
    `max_tokens` tokens. Batches of such packs need almost no padding (single
    conversations range from 10 to 100 tokens), which halves the work per epoch
    on a CPU, and the model also learns to answer later turns of a chat."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(init / "tokenizer.json"))
    sizes = [len(tok.encode("".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                                    for m in r["messages"])).ids) for r in records]
    rng = np.random.default_rng(seed)
    packs = []
    for _ in range(epochs):
        current: list[dict] = []
        used = 0
        for i in rng.permutation(len(records)):
            if current and used + sizes[i] > max_tokens:
                packs.append({"messages": current})
                current, used = [], 0
            current = current + records[i]["messages"]
            used += sizes[i]
        packs.append({"messages": current})
    return packs


async def train(init: Path, records: list[dict], args, save: Path) -> None:
    import amlx

    async with await amlx.load(init, device="cpu") as model:
        print(f"{model.info.parameters:,} parameters; training {args.iters} steps of {args.batch_size} "
              f"records ({len(records)} records, {args.epochs} epochs)", file=sys.stderr)
        start = time.perf_counter()
        async for ev in model.train(records, iters=args.iters, batch_size=args.batch_size,
                                    learning_rate=args.learning_rate, lr_schedule="cosine", warmup=args.warmup,
                                    min_lr=args.learning_rate / 20, weight_decay=0.01, grad_clip=1.0,
                                    seed=args.seed, save_path=save, save_every=args.iters):
            if ev.kind == "step" and (ev.step % 25 == 0 or ev.step == 1):
                print(f"step {ev.step:5d}  loss {ev.loss:.3f}  lr {ev.learning_rate:.2e}  "
                      f"{time.perf_counter() - start:6.0f} s ({time.process_time():.0f} s CPU)", file=sys.stderr)
        for prompt in args.show:
            out = await model.complete([{"role": "user", "content": prompt}], max_tokens=80)
            print(f"> {prompt}\n{out.text}\n", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--out", type=Path, default=EMBEDDED, help="where the model files are written")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--epochs", type=int, default=30, help="passes over the corpus")
    p.add_argument("--pack-tokens", type=int, default=128, help="tokens per packed multi-turn record")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the written weights")
    p.add_argument("--show", nargs="*", default=["Hello!", "Tell me a story about a fox.", "What color is the sky?"],
                   help="prompts answered after training")
    args = p.parse_args(argv)
    dims = {"hidden": args.hidden, "layers": args.layers, "heads": 4, "kv_heads": 2,
            "head_dim": args.hidden // 4, "intermediate": args.intermediate}
    records = read_corpus(args.corpus)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="amlx-demo-train-") as tmp:
        init, trained, final = Path(tmp) / "init", Path(tmp) / "trained", Path(tmp) / "final"
        init.mkdir()
        eos = write_tokenizer(records, args.vocab_size, init)
        write_random_checkpoint(init, dims, eos, args.seed)
        packs = pack(records, init, args.epochs, args.pack_tokens, args.seed)
        args.iters = len(packs) // args.batch_size
        asyncio.run(train(init, packs, args, trained))
        import amlx

        amlx.convert(trained, final, dtype=args.dtype, progress=False)
        args.out.mkdir(parents=True, exist_ok=True)
        for name in MODEL_FILES:
            (args.out / name).unlink(missing_ok=True)
            if (final / name).is_file():
                shutil.copyfile(final / name, args.out / name)
    size = sum((args.out / n).stat().st_size for n in MODEL_FILES if (args.out / n).is_file())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB) in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
