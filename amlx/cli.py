"""The `amlx` command line: generate, chat, demo, convert, lora."""

from __future__ import annotations

import argparse
import asyncio
import sys


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--device", default="auto", choices=["auto", "gpu", "cpu"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])


def _options(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop))


async def _generate(args) -> int:
    import amlx

    async with await amlx.load(args.model, device=args.device, dtype=args.dtype) as model:
        prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
        final = None
        async for tok in model.generate(prompt, **_options(args)):
            sys.stdout.write(tok.text)
            sys.stdout.flush()
            final = tok
        sys.stdout.write("\n")
        if args.verbose and final is not None:
            s = model.stats()
            print(f"[{final.finish_reason}; {s['tokens_generated']} tokens]", file=sys.stderr)
    return 0


async def _chat(args) -> int:
    import amlx

    async with await amlx.load(args.model, device=args.device, dtype=args.dtype) as model:
        history = []
        if args.system:
            history.append({"role": "system", "content": args.system})
        loop = asyncio.get_running_loop()
        print("amlx chat: an empty line or Ctrl-D ends the conversation, /reset clears the history")
        while True:
            try:
                line = await loop.run_in_executor(None, input, "> ")
            except EOFError:
                break
            if not line.strip():
                break
            if line.strip() == "/reset":
                history = history[:1] if args.system else []
                continue
            history.append({"role": "user", "content": line})
            reply = []
            try:
                async for tok in model.generate(history, **_options(args)):
                    sys.stdout.write(tok.text)
                    sys.stdout.flush()
                    reply.append(tok.text)
            except amlx.ContextLengthError as exc:
                print(f"\n[{exc}; use /reset]")
                history.pop()
                continue
            sys.stdout.write("\n")
            history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="amlx", description="Run LLMs on MLX from async Python.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a completion to the terminal")
    g.add_argument("model", help="checkpoint directory (Hugging Face or MLX format)")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("-v", "--verbose", action="store_true")
    _add_sampling(g)

    c = sub.add_parser("chat", help="interactive chat with history")
    c.add_argument("model")
    c.add_argument("--system", default=None, help="a system prompt")
    _add_sampling(c)

    d = sub.add_parser("demo", help="concurrent chats and a cancellation on the embedded demo model")
    d.add_argument("--tokens", type=int, default=96, help="max tokens per stream (default: %(default)s)")

    v = sub.add_parser("convert", help="write an MLX-format (optionally quantized) checkpoint")
    v.add_argument("src")
    v.add_argument("dst")
    v.add_argument("-q", "--quantize", type=int, choices=[4, 8], default=None)
    v.add_argument("--group-size", type=int, default=64)
    v.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])

    sub.add_parser("lora", help="fine-tune a LoRA adapter (see `amlx lora --help`)", add_help=False)

    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["lora"]:
        from amlx.train.cli import main as lora_main

        return lora_main(argv[1:])
    args = parser.parse_args(argv)
    import amlx

    try:
        if args.command in ("generate", "chat", "demo"):
            from amlx.kernel_cache import first_run_notice

            first_run_notice(getattr(args, "device", "auto"))  # the cold-cache compile would look like a hang
        if args.command == "generate":
            return asyncio.run(_generate(args))
        if args.command == "chat":
            return asyncio.run(_chat(args))
        if args.command == "demo":
            from amlx.demo import run_demo

            asyncio.run(run_demo(tokens=args.tokens))
            return 0
        if args.command == "convert":
            from amlx.convert import convert

            convert(args.src, args.dst, quantize=args.quantize, group_size=args.group_size, dtype=args.dtype)
            print(f"wrote {args.dst}")
            return 0
    except (amlx.AmlxError, ValueError) as exc:
        print(f"amlx: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
