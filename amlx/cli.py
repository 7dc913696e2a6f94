"""The `amlx` command line: generate, chat, demo, convert, lora.

Each subcommand is registered by an `add_<name>(sub)` function: it builds its
parser with `add_command` (one help style everywhere: defaults shown, an
example at the end) and sets `run=` to the function that carries it out.
`main()` parses and calls `args.run(args)`; a new subcommand is one more
registration line in `_register`.

Text goes to stdout, everything else (banners, notices, statistics, errors)
to stderr, so `amlx generate ... > out.txt` captures only the model's words.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import sys
from typing import Any, Callable

from amlx.cli_streams import (check_text_arguments, discard_stdout, read_prompt, reopen_closed_standard_files,
                              replace_unencodable_output)



class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default after its help (unless it has none worth showing);
    descriptions and examples keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == [] or \
                (action.nargs == 0 and isinstance(action.default, bool)):  # a --no-... flag: its default is True
            return action.help
        return super()._get_help_string(action)


def add_command(sub: Any, name: str, *, help: str, example: str, description: str | None = None
                ) -> argparse.ArgumentParser:
    """A subcommand parser in the house style: `example` (one or more command
    lines) is shown under "Example:" at the end of `--help`."""
    lines = "\n".join(f"  {line}" for line in example.strip().splitlines())
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description or help,
                                                epilog=f"Example:\n{lines}", formatter_class=HelpFormatter)
    return p


def add_model_options(p: argparse.ArgumentParser, *, adapter: bool = True) -> None:
    """MODEL (optional: the embedded demo model, `with_model` fills it in) and the
    options of loading it."""
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="checkpoint directory (Hugging Face or MLX format) or a Hugging Face model id (org/name), "
                        "looked up in the local Hugging Face cache and downloaded when missing (default: the "
                        "embedded demo model, a 0.9M-parameter toy for trying the command out)")
    if adapter:
        p.add_argument("--adapter", default=None, metavar="DIR",
                       help="a LoRA adapter directory (from `amlx lora`, or PEFT) to apply")
    add_engine_options(p)


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """Where and how the model runs: the load options every command that loads one shares."""
    p.add_argument("--device", default="auto", choices=["auto", "gpu", "cpu"], help="where to run")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="float type of the weights (default: the checkpoint's)")
    p.add_argument("--tensor-parallel", type=_tensor_parallel, default=1, metavar="N",
                   help="split the model over N processes (tensor parallelism: one per GPU over NCCL, or CPU "
                        "processes over MLX's ring backend; see docs/scaling.md)")
    p.add_argument("--draft", default=None, metavar="PATH|prompt_lookup",
                   help="speculative decoding: a draft model's checkpoint (same tokenizer), or "
                        "'prompt_lookup' to draft from earlier text of each request (default: off)")
    p.add_argument("--num-draft-tokens", type=int, default=4, metavar="N",
                   help="most tokens drafted per step with --draft (default: %(default)s)")


def _tensor_parallel(text: str) -> int:
    """--tensor-parallel N: an argparse type. Without AMLX_TP_HOSTFILE every rank is a process of this
    machine, so N is at most its CPU cores: a typo such as 1000 started 999 processes each loading
    the model (and 10**20 was an OverflowError traceback)."""
    size = _positive_int(text)
    cores = os.cpu_count() or 1
    if not os.environ.get("AMLX_TP_HOSTFILE") and size > max(cores, 2):
        raise argparse.ArgumentTypeError(f"{size} ranks would be {size} processes on this machine's {cores} CPU "
                                         f"cores (AMLX_TP_HOSTFILE spreads ranks over hosts; docs/scaling.md)")
    return size


def draft_problem(draft: str | None) -> str | None:
    """What is wrong with --draft (None: nothing). A draft model is a local checkpoint directory; the
    load's own error named only the path, which read as if MODEL were missing."""
    if draft is None or draft == "prompt_lookup" or os.path.isdir(draft):
        return None
    what = "is not a directory" if os.path.exists(draft) else "does not exist"
    return f"--draft {draft}: {what} (a draft model's checkpoint directory, or 'prompt_lookup')"


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate per reply")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p times the likeliest one's p")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalty on repeated tokens (1: none)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="a stop string (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print prompt tokens, time to first token, tokens/s and peak memory to stderr")


def _reply_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop))


# -- generate -------------------------------------------------------------------

# a Hugging Face model id: org/name, no spaces
_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def with_model(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with MODEL left out replaced by the embedded demo model's directory. A lone
    argument that names a directory or looks like a model id was meant as MODEL with the
    prompt forgotten: that is an error saying so, not a prompt for the toy model."""
    if args.model is None:
        from amlx.demo import default_model_dir

        prompt = getattr(args, "prompt", None)
        if prompt is not None and (_MODEL_ID.fullmatch(prompt) or os.path.isdir(prompt)):
            # (a prompt such as "TCP/IP" looks like a model id too: stdin is its way in)
            raise SystemExit(f"amlx: error: the prompt is missing: '{prompt}' names a model; use "
                             f"amlx generate MODEL PROMPT (or one prompt alone for the embedded demo model; a "
                             f"prompt that looks like a model goes on stdin: echo {shlex.quote(prompt)} | "
                             f"amlx generate -)")
        args.model = str(default_model_dir())
    return args


def _generate(args: argparse.Namespace) -> int:
    from amlx.reply import load_model, report, stream_reply

    text = read_prompt(args.prompt)
    with_model(args)
    with load_model(args) as model:
        templated = args.chat or (not args.raw and model.tokenizer.chat_template is not None)
        prompt: Any = [{"role": "user", "content": text}] if templated else text
        reply = stream_reply(model, prompt, _reply_options(args))
        if args.verbose:
            report(reply)
    return 130 if reply.interrupted else 0


def add_generate(sub: Any) -> None:
    p = add_command(sub, "generate", help="stream a completion of one prompt to stdout",
                    example='amlx generate Qwen/Qwen3-0.6B "Why is the sky blue?" --max-tokens 128 -v\n'
                            'echo "Write a haiku about tea" | amlx generate path/to/model -\n'
                            'amlx generate "Hello!"        (the embedded demo model)')
    add_model_options(p)
    p.add_argument("prompt", metavar="PROMPT",
                   help='the prompt; "-" reads it from stdin (the way in for a prompt alone that looks like a model '
                        'id or names a directory, such as "TCP/IP", which is otherwise taken for MODEL)')
    how = p.add_mutually_exclusive_group()
    how.add_argument("--raw", action="store_true",
                     help="send the prompt as it is (the default for a chat model wraps it in the chat template "
                          "as the user's message)")
    how.add_argument("--chat", action="store_true", help=argparse.SUPPRESS)  # the old opt-in, now the default
    _add_sampling(p)
    p.set_defaults(run=_generate)


# -- chat, demo, convert, lora ------------------------------------------------------

def _chat(args: argparse.Namespace) -> int:
    from amlx.chat import run_chat
    from amlx.reply import load_model

    with load_model(with_model(args)) as model:
        return run_chat(model, _reply_options(args), system=args.system, verbose=args.verbose)


def add_chat(sub: Any) -> None:
    p = add_command(sub, "chat", help="interactive chat with history (/help lists the commands)",
                    example="amlx chat Qwen/Qwen3-0.6B --system 'Answer briefly.' --max-tokens 512\n"
                            "amlx chat        (the embedded demo model)")
    add_model_options(p)
    p.add_argument("--system", default=None, help="a system prompt")
    _add_sampling(p)
    p.set_defaults(run=_chat)


def _demo(args: argparse.Namespace) -> int:
    import asyncio

    from amlx.demo import run_demo

    asyncio.run(run_demo(tokens=args.tokens))
    return 0


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (so that the error names the option, before anything loads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_demo(sub: Any) -> None:
    p = add_command(sub, "demo", help="concurrent streams and a live cancellation on the embedded demo model",
                    example="amlx demo --tokens 64")
    p.add_argument("--tokens", type=_positive_int, default=96, help="max tokens per stream")
    p.set_defaults(run=_demo)


def _convert(args: argparse.Namespace) -> int:
    from amlx.convert import convert
    from amlx.hub import resolve_model

    convert(resolve_model(args.src), args.dst, quantize=args.quantize, group_size=args.group_size, dtype=args.dtype)
    print(f"wrote {args.dst}", file=sys.stderr)
    return 0


def add_convert(sub: Any) -> None:
    p = add_command(sub, "convert", help="write an MLX-format (optionally quantized) checkpoint",
                    example="amlx convert Qwen/Qwen3-0.6B qwen3-0.6b-4bit -q 4")
    p.add_argument("src", metavar="SRC", help="checkpoint directory or Hugging Face model id (org/name)")
    p.add_argument("dst", metavar="DST", help="new directory to write")
    p.add_argument("-q", "--quantize", type=int, choices=[4, 8], default=None,
                   help="quantize the linear layers to 4 or 8 bits (default: keep floats)")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="float type of the written weights (default: the checkpoint's)")
    p.set_defaults(run=_convert)


def add_lora(sub: Any) -> None:
    from amlx.train.cli import add_arguments, run

    p = add_command(sub, "lora", help="fine-tune on a JSONL dataset: a LoRA adapter, or every weight with --full",
                    example="amlx lora Qwen/Qwen3-0.6B --data train.jsonl --iters 200 --learning-rate 1e-4\n"
                            "amlx generate Qwen/Qwen3-0.6B 'Hello' --adapter adapters\n"
                            "amlx lora Qwen/Qwen3-0.6B --data train.jsonl --full --save-path qwen3-tuned")
    add_arguments(p)
    p.set_defaults(run=run)


def _register(sub: Any) -> None:
    from amlx.serve.cli import add_serve_command

    for add in (add_generate, add_chat, add_demo, add_convert, add_lora, add_serve_command):
        add(sub)


def _version() -> str:
    import amlx
    from amlx._mlx import version

    return f"amlx {amlx.__version__} (MLX {version()})"


class _VersionAction(argparse.Action):
    """--version, importing MLX only when asked (it is not free)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(_version())
        parser.exit()


def parser() -> argparse.ArgumentParser:
    """The whole `amlx` argument parser."""
    p = argparse.ArgumentParser(prog="amlx", description="Run LLMs on MLX from async Python.",
                                formatter_class=HelpFormatter,
                                epilog="Example:\n  amlx generate Qwen/Qwen3-0.6B 'Hello!' -v\n"
                                       "  amlx <command> --help   (the options of one command)")
    p.add_argument("--version", action=_VersionAction, help="print amlx's and MLX's versions and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `amlx`; returns the exit status."""
    import amlx

    reopen_closed_standard_files()
    args = None
    try:
        # inside the try: building the parser imports the serve and train modules, a Ctrl-C then included
        args = parser().parse_args(sys.argv[1:] if argv is None else argv)
        run: Callable[[argparse.Namespace], int] = args.run
        _check_no_empty_paths(args)
        if args.command in ("generate", "chat"):
            check_text_arguments(args)
            # the sampling options' values, before a load that may take minutes (chat found a bad
            # one only when the first message was sent, and ended there)
            _check_sampling(args)
            problem = draft_problem(args.draft)
            if problem:
                raise ValueError(problem)
        if args.command in ("generate", "chat", "demo"):
            replace_unencodable_output()
            from amlx.kernel_cache import first_run_notice

            first_run_notice(getattr(args, "device", "auto"))  # the cold-cache compile would look like a hang
        return run(args)
    except (amlx.AmlxError, ValueError) as exc:
        print(f"amlx: error: {as_typed(str(exc), args)}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # stdout's reader left (`amlx generate ... | head`): not an error to report
        discard_stdout()
        return 128 + 13  # as a process that SIGPIPE ended (what `yes | head` reports)
    except OSError as exc:  # a file or directory that cannot be read or written
        print(f"amlx: error: {os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def as_typed(message: str, args: argparse.Namespace | None) -> str:
    """`message` with a leading option name in the library's spelling as the user typed it:
    "max_tokens must be ..." -> "--max-tokens must be ...", "resume=True: ..." -> "--resume: ...".
    Only names of this command's --options; "dst . must ..." (a positional) and "iters:3: ..." (a
    file named like an option) stay as they are."""
    match = re.match(r"(\w+)(=\S+?)?(?= |: )", message)
    if args is None or match is None or match.group(1) in _POSITIONALS or not hasattr(args, match.group(1)):
        return message
    flag = "--" + match.group(1).replace("_", "-")
    if match.group(2):  # "device='gpu' was asked for" -> "--device gpu was asked for" (the value was dropped)
        try:
            value = ast.literal_eval(match.group(2)[1:])
        except (ValueError, SyntaxError):
            value = match.group(2)[1:]
        if not isinstance(value, bool):  # (a flag's True: "--resume: ...")
            flag += f" {value}"
    return flag + message[match.end():]


_POSITIONALS = ("model", "prompt", "src", "dst", "command", "run")


# the path arguments of every command, by dest: (how the user wrote it, dest)
_PATHS = (("MODEL", "model"), ("SRC", "src"), ("DST", "dst"), ("--adapter", "adapter"), ("--draft", "draft"),
          ("--data", "data"), ("--val-data", "val_data"), ("--adapter-path", "adapter_path"),
          ("--save-path", "save_path"), ("--fuse", "fuse"), ("--api-key-file", "api_key_file"),
          ("--log-requests", "log_requests"))


def _check_sampling(args: argparse.Namespace) -> None:
    """The sampling options' values, by the library's rules (ValueError)."""
    import amlx

    amlx.GenerationOptions.from_kwargs(**_reply_options(args))


def _check_no_empty_paths(args: argparse.Namespace) -> None:
    """An empty path (`amlx generate "$MODEL" ...` with MODEL unset) meant the current directory, and
    the error spoke of a missing config.json there (convert: "dst . must lie outside ...")."""
    for name, dest in _PATHS:
        if getattr(args, dest, None) == "":
            raise ValueError(f"{name} is empty (an unset shell variable?)")


def os_error(exc: OSError) -> str:
    """An OSError in one line: its cause and the path(s) it names."""
    paths = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    cause = exc.strerror or str(exc) or type(exc).__name__
    return f"{paths}: {cause}" if paths else cause


if __name__ == "__main__":
    sys.exit(main())
