"""`amlx lora MODEL --data train.jsonl ...`: fine-tune a LoRA adapter from the command line.

`amlx lora MODEL --full --save-path DIR ...` fine-tunes every weight instead
(mlx-lm's `--fine-tune-type full`) and writes a complete checkpoint to DIR. One
subcommand for both, as in mlx-lm: they share the data, schedule and progress
options; the LoRA-only flags (--rank, --alpha, ...) are refused with --full."""

from __future__ import annotations

import argparse
import asyncio
import sys

from amlx.train.lora import DEFAULT_TARGETS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="amlx lora", description="Fine-tune a LoRA adapter on a checkpoint.")
    p.add_argument("model", help="checkpoint directory (Hugging Face or MLX format, quantized for QLoRA)")
    p.add_argument("--data", required=True,
                   help="training JSONL (text, prompt/completion or chat messages records), or a directory with "
                        "train.jsonl (and valid.jsonl)")
    p.add_argument("--val-data", default=None, help="validation JSONL")
    p.add_argument("--adapter-path", default="adapters", help="where adapters are saved (default: adapters)")
    p.add_argument("--full", action="store_true",
                   help="full fine-tuning: train every weight (not an adapter) and write a checkpoint to --save-path")
    p.add_argument("--save-path", default=None, metavar="DIR",
                   help="with --full: the checkpoint directory written (config, weights, tokenizer)")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", "--lr", type=float, default=1e-5)
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine", "linear"])
    p.add_argument("--warmup", type=int, default=0, help="steps of linear warm-up")
    p.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of a cosine/linear decay")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=None, help="max global gradient norm")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (the update is scaled by alpha/rank)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated layer names to adapt (default: %(default)s)")
    p.add_argument("--num-layers", "--layers", type=int, default=None, dest="num_layers",
                   help="adapt only the last N layers (default: all)")
    p.add_argument("--steps-per-eval", type=int, default=200)
    p.add_argument("--val-batches", type=int, default=25, help="validation batches per evaluation (-1: all)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--truncate", action="store_true", help="cut records longer than --max-seq-len")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the adapter in --adapter-path")
    p.add_argument("--fuse", default=None, metavar="DST",
                   help="after training, write a checkpoint with the adapter merged into the weights to DST")
    p.add_argument("--device", default="auto", choices=["auto", "gpu", "cpu"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    return p


def _options(args) -> dict:
    return dict(
        iters=args.iters, batch_size=args.batch_size, learning_rate=args.learning_rate,
        lr_schedule=args.lr_schedule, warmup=args.warmup, min_lr=args.min_lr, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()), num_layers=args.num_layers,
        val_data=args.val_data, steps_per_eval=args.steps_per_eval,
        val_batches=None if args.val_batches is not None and args.val_batches < 0 else args.val_batches,
        save_every=args.save_every, adapter_path=args.adapter_path, max_seq_len=args.max_seq_len,
        truncate=args.truncate, seed=args.seed, resume=args.resume)


# flags that only mean something for an adapter, refused with --full
_LORA_FLAGS = ("adapter_path", "rank", "alpha", "dropout", "targets", "num_layers", "resume", "fuse")


def _full_options(p: argparse.ArgumentParser, args) -> dict:
    """The options of a --full run (ValueError for LoRA-only flags or no --save-path)."""
    given = [f"--{n.replace('_', '-')}" for n in _LORA_FLAGS if getattr(args, n) != p.get_default(n)]
    if given:
        raise ValueError(f"{', '.join(given)}: LoRA option(s), not used with --full")
    if args.save_path is None:
        raise ValueError("--full needs --save-path DIR (where the fine-tuned checkpoint is written)")
    opts = {k: v for k, v in _options(args).items() if k not in _LORA_FLAGS}
    return {**opts, "save_path": args.save_path}


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f}MiB"


async def _run(args, full_options: dict | None) -> int:
    import amlx
    from tqdm import tqdm

    async with await amlx.load(args.model, device=args.device, dtype=args.dtype) as model:
        run = model.train_lora(args.data, **_options(args)) if full_options is None else \
            model.train(args.data, **full_options)
        bar = tqdm(total=args.iters, desc="lora" if full_options is None else "full", unit="step",
                   disable=args.no_progress, dynamic_ncols=True)
        say = bar.write if not args.no_progress else print
        try:
            async for ev in run:
                if ev.kind == "step":
                    bar.n = ev.step
                    bar.set_postfix(loss=f"{ev.loss:.3f}", lr=f"{ev.learning_rate:.2e}",
                                    tok_s=f"{ev.tokens_per_second:.0f}", mem=_mib(ev.memory.get("active", 0)),
                                    refresh=False)
                    bar.update(0)
                    if args.no_progress:
                        print(f"step {ev.step}/{ev.iters}: loss {ev.loss:.4f}, lr {ev.learning_rate:.3e}, "
                              f"{ev.tokens_per_second:.0f} tok/s, active {_mib(ev.memory.get('active', 0))}, "
                              f"peak {_mib(ev.memory.get('peak', 0))}")
                elif ev.kind == "eval":
                    say(f"step {ev.step}: validation loss {ev.val_loss:.4f}")
                elif ev.kind == "save":
                    say(f"step {ev.step}: saved {ev.path}")
                elif ev.kind == "done":
                    say(f"done: {ev.step} steps, last loss {ev.loss if ev.loss is None else round(ev.loss, 4)}"
                        f"{'' if ev.val_loss is None else f', validation loss {ev.val_loss:.4f}'}")
        finally:
            bar.close()
    if args.fuse:
        from amlx.train.lora import fuse

        fuse(args.model, args.adapter_path, args.fuse, progress=not args.no_progress)
        print(f"wrote {args.fuse}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `amlx lora` (argv without the leading "lora"); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    import amlx

    try:
        if args.save_path is not None and not args.full:
            raise ValueError("--save-path is for --full (a LoRA run writes its adapter to --adapter-path)")
        full = _full_options(parser, args) if args.full else None
        return asyncio.run(_run(args, full))
    except (amlx.AmlxError, ValueError, TypeError, RuntimeError) as exc:
        print(f"amlx lora: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
