"""One reply streamed to the terminal, for `amlx generate` and `amlx chat`.

The command line uses the blocking API (`load_sync`, `generate_sync`): a
terminal program waits on one reply at a time, and a Ctrl-C (KeyboardInterrupt
in the main thread) then lands where the reply is read, which closes its stream
and so cancels the request before the engine's next step.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO, cast

import amlx


# Control characters a terminal acts on: ESC and C1's CSI/OSC begin sequences that clear or
# redraw the screen, set its title, write the clipboard (OSC 52) or hide text, BEL rings, BS
# erases. A reply shown on a terminal (whose text may repeat a hostile document's) gets them as
# visible symbols; newlines, tabs and carriage returns stay as they are, and so does the text
# kept in the Reply or written to a file or pipe.
_TERMINAL_SAFE = {**{c: 0x2400 + c for c in range(0x20) if chr(c) not in "\n\t\r"}, 0x7F: 0x2421,
                  **{c: 0xFFFD for c in range(0x80, 0xA0)}}


def _is_terminal(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


@dataclass
class Reply:
    """What one reply was: its text so far and how it went."""

    text: str = ""
    prompt_tokens: int = 0
    tokens: int = 0
    finish_reason: str | None = None
    interrupted: bool = False
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    ended: float | None = None


def load_model(args: argparse.Namespace) -> amlx.Model:
    """The model named by MODEL (a directory or a Hugging Face id), with --adapter,
    --device, --dtype, --draft, --num-draft-tokens and --tensor-parallel; blocking."""
    from amlx.hub import resolve_model

    return amlx.load_sync(resolve_model(args.model), device=args.device, dtype=args.dtype,
                          adapter=getattr(args, "adapter", None), draft=getattr(args, "draft", None),
                          num_draft_tokens=getattr(args, "num_draft_tokens", 4),
                          tensor_parallel=getattr(args, "tensor_parallel", 1))


def stream_reply(model: amlx.Model, prompt: Any, options: dict[str, Any], out: TextIO | None = None) -> Reply:
    """Writes the reply to `prompt` (generation `options`) to `out` (stdout) as it
    streams, then a newline; on a terminal, control characters show as symbols (␛ for ESC).
    A Ctrl-C stops it: the request is cancelled and the reply so far returned,
    marked `interrupted`."""
    out = sys.stdout if out is None else out
    terminal = _is_terminal(out)
    reply = Reply()
    pieces: list[str] = []
    stream = None
    try:
        # generate_sync's stream is a TokenStream (typed as a plain iterator)
        stream = cast(amlx.TokenStream, model.generate_sync(prompt, **options))
        for tok in stream:
            if reply.first_token_at is None:
                reply.first_token_at = time.perf_counter()
            reply.tokens += 1
            pieces.append(tok.text)
            reply.finish_reason = tok.finish_reason
            out.write(tok.text.translate(_TERMINAL_SAFE) if terminal else tok.text)
            out.flush()
    except KeyboardInterrupt:
        reply.interrupted = True
    finally:
        if stream is not None:
            stream.close()  # cancels the request when it did not finish
            reply.prompt_tokens = stream.prompt_tokens or 0
        reply.ended = time.perf_counter()
        reply.text = "".join(pieces)
    out.write("\n")
    out.flush()
    return reply


def report(reply: Reply, err: TextIO | None = None) -> None:
    """The `-v` line: prompt tokens, time to first token, generation speed, peak memory."""
    err = sys.stderr if err is None else err
    end = reply.ended or time.perf_counter()
    first = reply.first_token_at
    ttft = f"{first - reply.started:.3f} s" if first is not None else "-"
    # the decode rate: tokens after the first over the time after the first; with one token (or
    # none) there is no such interval, and "-" says so ("0.0 tokens/s" read as a stalled decode)
    rate = f"{(reply.tokens - 1) / (end - first):.1f}" if first is not None and reply.tokens > 1 and end > first \
        else "-"
    how = "interrupted" if reply.interrupted else (reply.finish_reason or "stop")
    peak = amlx.memory()["peak"]
    size = f"{peak / 1e9:.2f} GB" if peak >= 1e9 else f"{peak / 1e6:.1f} MB"
    print(f"[{how}] prompt: {_count(reply.prompt_tokens)}, time to first token: {ttft}; "
          f"generation: {_count(reply.tokens)}, {rate} tokens/s; peak memory: {size}",
          file=err, flush=True)


def _count(n: int) -> str:
    """"1 token", "2 tokens"."""
    return f"{n} token" if n == 1 else f"{n} tokens"
