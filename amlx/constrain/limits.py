"""llguidance's grammar compiler on a thread with a stack deep enough for any grammar amlx
lets through, and the bound on grammars that makes "any" true.

Why: llguidance checks and compiles a grammar recursively, native frames for each rule or
`$ref` it follows (2-3 KB of stack per definition, measured with llguidance 1.x), and its own
limits ("schema too large", "lark grammar too deeply nested") do not stop a long chain of
definitions first. On a thread's ordinary 8 MB stack a chain of some 1,000 `$ref`s or 4,000
Lark rules overflowed it: a segmentation fault, in `parse_constraint` on the event loop's
thread (the whole process, a server with it, gone for one request's schema). So each such call
runs on a thread of its own with a `STACK_BYTES` stack (address space, not memory: only the
pages a compile touches are ever backed), and a grammar is refused up front (ValueError) if it
has more definitions than that stack surely holds. Every definition of a JSON schema or of a
Lark grammar (a property, a `$defs` entry, a `$ref`, a rule, a terminal) has a ":", so their
count bounds the compiler's depth: `MAX_DEFINITIONS` of them fitted in 256 MB, half the stack,
in every shape tried (chains of `$ref`s through properties, items, prefixItems, anyOf and
allOf; chains of Lark rules and terminals, with alternatives or `%json` in them).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["MAX_DEFINITIONS", "STACK_BYTES", "check_definitions", "on_deep_stack"]

STACK_BYTES = 512 << 20
MAX_DEFINITIONS = 32_000

_T = TypeVar("_T")
_stack_lock = threading.Lock()  # threading.stack_size is process-wide: set, start, restore


def check_definitions(grammar: str, what: str) -> None:
    """ValueError if `grammar` (an llguidance grammar, JSON text) may hold more definitions
    than the compiler's stack can follow (see the module's doc); `what` names the option."""
    count = grammar.count(":")
    if count > MAX_DEFINITIONS:
        raise ValueError(f"invalid {what}: too large for the grammar engine ({count} ':' in its definitions, "
                         f"at most {MAX_DEFINITIONS} are taken: each may be a level of the compiler's recursion)")


def on_deep_stack(fn: Callable[..., _T], *args) -> _T:
    """`fn(*args)` on a new thread with a `STACK_BYTES` stack, waited for (its result, or its
    exception raised here). Where no such thread can be made (address space refused), on the
    calling thread."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # handed to the caller as it is
            box["error"] = e

    with _stack_lock:
        before = threading.stack_size()
        try:
            threading.stack_size(STACK_BYTES)
            thread = threading.Thread(target=run, name="amlx-grammar-compile", daemon=True)
            thread.start()
        except (RuntimeError, MemoryError, ValueError):
            thread = None
        finally:
            threading.stack_size(before)
    if thread is None:
        return fn(*args)
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
