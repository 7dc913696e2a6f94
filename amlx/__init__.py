"""amlx: asyncio-native LLM inference and LoRA fine-tuning on Apple's MLX (Metal, CUDA, CPU)."""


def _started_as_cli() -> bool:
    """Whether this process is the `amlx` command (its console script, or `python -m amlx`):
    then a Ctrl-C while this package imports ends it as the command's Ctrl-C does, quietly with
    status 130. (A library user's Ctrl-C during `import amlx` stays a KeyboardInterrupt.)"""
    import os
    import sys

    argv = getattr(sys, "argv", None) or [""]
    if argv[0] == "-m":  # (what runpy sets while it locates the module of `python -m`)
        orig = list(getattr(sys, "orig_argv", ()))
        return "-mamlx" in orig or any(a == "-m" and b == "amlx" for a, b in zip(orig, orig[1:]))
    return os.path.splitext(os.path.basename(str(argv[0])))[0] in ("amlx", "amlx-script")


_CLI = _started_as_cli()
try:
    # importing the library takes about a second (MLX, the engine): a Ctrl-C in it printed a
    # traceback, where the command that was starting exits quietly on one once it runs
    from amlx.errors import (AmlxError, ChatTemplateError, ClosedError, ConstraintError, ContextLengthError,
                             MLXError, ModelLoadError)
    from amlx.model import Model, ModelInfo, TokenStream, load, load_sync
    from amlx.types import (Completion, EngineStats, GenerateOptions, GenerationOptions, MemoryStats, Token,
                            ToolCall, Usage)
    from amlx.convert import convert  # cheap: it imports amlx.models only when called

    if _CLI:  # the rest of the command's start-up under the same guard (its main() guards the rest)
        __import__("amlx.cli")
except KeyboardInterrupt:
    if not _CLI:
        raise
    import sys

    try:  # (as main() does on Ctrl-C: the terminal's ^C stands on a line of its own)
        if sys.stderr is not None:  # (None when started with fd 2 closed: print would write to stdout)
            print(file=sys.stderr)
    except (OSError, ValueError):
        pass
    raise SystemExit(130) from None

__version__ = "0.1.0"


def memory() -> MemoryStats:
    """MLX memory counters in bytes: {"active", "peak", "cache"}."""
    from amlx._mlx import memory as _memory

    counters = _memory.counters()
    return MemoryStats(active=counters["active"], peak=counters["peak"], cache=counters["cache"])


__all__ = ["load", "load_sync", "Model", "ModelInfo", "TokenStream", "Token", "Completion", "ToolCall", "Usage",
           "GenerationOptions", "AmlxError", "ClosedError", "ContextLengthError", "MLXError", "ModelLoadError", "memory",
           "convert", "GenerateOptions", "EngineStats", "MemoryStats", "ChatTemplateError", "ConstraintError"]
