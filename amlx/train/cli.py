"""`amlx lora MODEL --data train.jsonl ...`: fine-tune a LoRA adapter from the command line.

The whole dataset is read and checked before the first step (a bad record is an
error naming its file and line, before any progress bar). Ctrl-C stops training
after the step in flight, saves the adapter trained so far to --adapter-path and
says where; a second Ctrl-C gives up on that save.

`amlx lora MODEL --full --save-path DIR ...` fine-tunes every weight instead
(mlx-lm's `--fine-tune-type full`) and writes a complete checkpoint to DIR. One
subcommand for both, as in mlx-lm: they share the data, schedule and progress
options; the LoRA-only flags (--rank, --alpha, ...) are refused with --full.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amlx.train.lora import DEFAULT_TARGETS

if TYPE_CHECKING:
    import amlx
    from amlx.train.trainer import TrainingEvent

EXAMPLE = "amlx lora Qwen/Qwen3-0.6B --data train.jsonl --iters 200 --learning-rate 1e-4 --adapter-path adapters"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `amlx lora`."""
    p.add_argument("model", metavar="MODEL",
                   help="checkpoint directory (Hugging Face or MLX format, quantized for QLoRA) or a Hugging Face "
                        "model id (org/name)")
    p.add_argument("--data", required=True,
                   help="training JSONL (text, prompt/completion or chat messages records), or a directory with "
                        "train.jsonl (and valid.jsonl)")
    p.add_argument("--val-data", default=None, help="validation JSONL")
    p.add_argument("--adapter-path", default="adapters", help="where adapters are saved")
    p.add_argument("--full", action="store_true",
                   help="full fine-tuning: train every weight (not an adapter) and write a checkpoint to --save-path")
    p.add_argument("--save-path", default=None, metavar="DIR",
                   help="with --full: the checkpoint directory written (config, weights, tokenizer)")
    p.add_argument("--iters", type=int, default=1000, help="training steps")
    p.add_argument("--batch-size", type=int, default=4, help="records per step")
    p.add_argument("--learning-rate", "--lr", type=float, default=1e-5, help="peak learning rate (AdamW)")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine", "linear"],
                   help="learning rate over the run")
    p.add_argument("--warmup", type=int, default=0, help="steps of linear warm-up")
    p.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of a cosine/linear decay")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=None, help="max global gradient norm (default: no clipping)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (the update is scaled by alpha/rank)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated layer names to adapt")
    p.add_argument("--num-layers", "--layers", type=int, default=None, dest="num_layers",
                   help="adapt only the last N layers (default: all)")
    p.add_argument("--steps-per-eval", type=int, default=200, help="steps between validation losses")
    p.add_argument("--val-batches", type=int, default=25, help="validation batches per evaluation (-1: all)")
    p.add_argument("--save-every", type=int, default=100, help="steps between adapter checkpoints")
    p.add_argument("--max-seq-len", type=int, default=2048, help="most tokens of a record")
    p.add_argument("--truncate", action="store_true", help="cut records longer than --max-seq-len")
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA init, data order and dropout")
    p.add_argument("--resume", action="store_true", help="continue from the adapter in --adapter-path")
    p.add_argument("--fuse", default=None, metavar="DST",
                   help="after training, write a checkpoint with the adapter merged into the weights to DST")
    p.add_argument("--device", default="auto", choices=["auto", "gpu", "cpu"], help="where to train")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="float type of the weights (default: the checkpoint's)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines on stdout instead of a progress bar")


def _parser() -> argparse.ArgumentParser:
    from amlx.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="amlx lora", description="Fine-tune a LoRA adapter on a checkpoint.",
                                epilog=f"Example:\n  {EXAMPLE}", formatter_class=HelpFormatter)
    add_arguments(p)
    return p


def _options(args: argparse.Namespace) -> dict[str, Any]:
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


class _Progress:
    """The progress bar (drawn at the first event: the data has been read and
    checked by then) or, with --no-progress, plain lines on stdout."""

    def __init__(self, iters: int, plain: bool, desc: str = "lora"):
        self._iters = iters
        self._desc = desc
        self._plain = plain
        self._bar: Any = None

    def say(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def show(self, ev: TrainingEvent) -> None:
        if self._bar is None and not self._plain:
            from tqdm import tqdm  # type: ignore[import-untyped]

            self._bar = tqdm(total=self._iters, desc=self._desc, unit="step", dynamic_ncols=True)
        if ev.kind == "step":
            active, peak = _mib(ev.memory.get("active", 0)), _mib(ev.memory.get("peak", 0))
            if self._plain:
                print(f"step {ev.step}/{ev.iters}: loss {ev.loss:.4f}, lr {ev.learning_rate:.3e}, "
                      f"{ev.tokens_per_second:.0f} tok/s, active {active}, peak {peak}", flush=True)
                return
            self._bar.n = ev.step
            self._bar.set_postfix(loss=f"{ev.loss:.3f}", lr=f"{ev.learning_rate:.2e}",
                                  tok_s=f"{ev.tokens_per_second:.0f}", mem=active, refresh=False)
            self._bar.update(0)
        elif ev.kind == "eval":
            self.say(f"step {ev.step}: validation loss {ev.val_loss:.4f}")
        elif ev.kind == "save":
            self.say(f"step {ev.step}: saved {ev.path}")
        elif ev.kind == "done":
            self.say(f"done: {ev.step} steps, last loss {ev.loss if ev.loss is None else round(ev.loss, 4)}"
                     f"{'' if ev.val_loss is None else f', validation loss {ev.val_loss:.4f}'}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._plain = True  # anything after the bar is plain text


def _interrupt_cancels(task: asyncio.Task[Any]) -> bool:
    """Ctrl-C cancels `task` (not the process) from now on; False where signal
    handlers cannot be set (Windows, not the main thread)."""
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, task.cancel)
        return True
    except (NotImplementedError, RuntimeError, ValueError):
        return False


async def _train(model: amlx.Model, args: argparse.Namespace, full: dict | None) -> bool:
    """Runs the training; False when Ctrl-C stopped it (what was trained so far then saved).
    `full`: the options of a --full run, None for LoRA."""
    progress = _Progress(args.iters, args.no_progress, "lora" if full is None else "full")
    run = model.train_lora(args.data, **_options(args)) if full is None else model.train(args.data, **full)
    what = "the adapter" if full is None else "the checkpoint"
    task = asyncio.current_task()
    assert task is not None
    handled = _interrupt_cancels(task)
    try:
        async for ev in run:
            progress.show(ev)
        return True
    except asyncio.CancelledError:
        uncancel = getattr(task, "uncancel", None)  # Python >= 3.11 counts cancellations
        if uncancel is not None and uncancel() > 0:
            raise  # cancelled from elsewhere too
        progress.close()
        path = await run.save()  # the step in flight has ended: this saves it too
        print(f"\ninterrupted at step {run.step} of {args.iters}: "
              + (f"saved {what} trained so far to {path}" if path else "nothing trained yet, nothing saved"),
              file=sys.stderr, flush=True)
        return False
    finally:
        progress.close()
        if handled:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)


def _check_fuse_destination(source: Path, dst: Path) -> None:
    """--fuse DST must be writable as a new checkpoint: checked before training, not after it."""
    from amlx.checkpoint import check_creatable, check_destination

    try:
        check_destination(source, dst)
        check_creatable(dst)
    except ValueError as exc:
        raise ValueError(f"--fuse {dst}: {exc}") from None


async def _run(args: argparse.Namespace, full: dict | None) -> int:
    import amlx
    from amlx.hub import resolve_model

    source = resolve_model(args.model)
    if args.fuse:
        _check_fuse_destination(Path(source), Path(args.fuse))
    async with await amlx.load(source, device=args.device, dtype=args.dtype) as model:
        finished = await _train(model, args, full)
    if not finished:
        return 130
    if args.fuse:
        from amlx.train.lora import fuse

        fuse(source, args.adapter_path, args.fuse, progress=not args.no_progress)
        print(f"wrote {args.fuse}")
    return 0


def _flags_named(message: str) -> str:
    """A data error's advice in the flags' words: "more than max_seq_len=8 (raise max_seq_len, ...,
    or pass truncate=True)" named the library's options, which `amlx lora` takes as --max-seq-len
    and --truncate."""
    message = re.sub(r"\bmax_seq_len=(\d+)", r"--max-seq-len \1", message)
    message = re.sub(r"\braise max_seq_len\b", "raise --max-seq-len", message)
    message = re.sub(r"\bafter truncation to max_seq_len\b", "after truncation to --max-seq-len", message)
    return re.sub(r"\bpass truncate=True\b", "pass --truncate", message)


def run(args: argparse.Namespace) -> int:
    """Carries out parsed `amlx lora` arguments; returns the exit status."""
    import amlx

    try:
        if args.save_path is not None and not args.full:
            raise ValueError("--save-path is for --full (a LoRA run writes its adapter to --adapter-path)")
        full = _full_options(_parser(), args) if args.full else None
        return asyncio.run(_run(args, full))
    except (amlx.AmlxError, ValueError, TypeError, RuntimeError) as exc:
        from amlx.cli import as_typed

        print(f"amlx lora: error: {_flags_named(as_typed(str(exc), args))}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # --no-progress's reader left (`amlx lora ... | head`): end as SIGPIPE would, quietly
        from amlx.cli_streams import discard_stdout

        discard_stdout()
        return 128 + 13
    except OSError as exc:  # e.g. a save that the disk refused mid-run
        from amlx.cli import os_error

        print(f"amlx lora: error: {os_error(exc)}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C outside training, or a second one
        print(file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    """Entry point of `amlx lora` (argv without the leading "lora"); returns the exit status."""
    return run(_parser().parse_args(sys.argv[1:] if argv is None else argv))
