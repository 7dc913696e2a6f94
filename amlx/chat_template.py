"""Chat templates rendered in a sandboxed Jinja environment with limits.

Jinja's immutable sandbox stops a checkpoint's template from reaching Python
internals or mutating its inputs, but not from looping or allocating without
end: `{% for a in range(100000) %}{% for b in range(100000) %}` or
`'a' * 10**10` would freeze the thread rendering it. `ChatEnvironment` adds a
budget per render (`TemplateLimits`), counted from hooks the template cannot
avoid:

- every loop iteration, call, filter, test and intercepted operator is a *step*;
  steps are bounded, and each step checks the render's deadline (the time
  budget is cooperative: one Python operation may overshoot it, but none can
  run unbounded since every size is checked first);
- every piece of text a template emits (also inside macros and `{% set %}`
  blocks) counts towards the output limit;
- operations that can make large objects from small ones are checked before
  they run: `*` on strings and lists, `+`, `~` (its operands as they are
  written out), `**`, `%` formatting and `str.format` (widths, and each argument
  once per conversion that names it), string padding and `replace` / `join`, and the
  filters that take a size (`center`, `indent`, `wordwrap`, `batch`, `slice`,
  `format`, `join`, `replace`, `sum`, `tojson`'s indent); every result counts
  towards an allocation budget, so many medium objects cannot add up either;
- lists, tuples, dicts, sets, dict views and namespaces (literals, and what
  calls and filters return) are measured written out, a shared part once per
  reference, so `[x, x]` or `namespace(a=x, b=x)` doubling in a loop cannot
  build something whose str() or tojson is astronomically large.

Loops and output are hooked by rewriting the template's syntax tree once, when
it is compiled (`For.iter`, `Output` and `Concat` nodes get a counting filter
wrapped around them); operators through the sandbox's
`intercepted_binops`; calls through the sandbox's `call`. Going over any limit
raises `ChatTemplateError` naming it. Templates that stay inside the limits
render exactly as before (and as transformers renders them).
"""

from __future__ import annotations

import codecs
import collections
import contextvars
import functools
import json
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.runtime
import jinja2.sandbox
import jinja2.utils
import jinja2.visitor
import markupsafe

from amlx.errors import ChatTemplateError

__all__ = ["TemplateLimits", "ChatEnvironment", "render"]


@dataclass(frozen=True)
class TemplateLimits:
    """What one render of a chat template may use.

    - max_output: characters the template may emit, and the largest string or
      list it may build, on top of `input_factor` times the size of its inputs
      (messages, tools, documents), so long conversations always fit;
    - max_steps: loop iterations, calls, filters and operators;
    - max_seconds: wall time of the render (checked at every step);
    - alloc_factor: all the strings and lists the checked operations build
      together may reach this many times the output limit.
    """

    max_output: int = 4 << 20
    input_factor: int = 4
    max_steps: int = 1_000_000
    max_seconds: float = 10.0
    alloc_factor: int = 64


# Objects whose str() writes out what they hold: measured like lists (a namespace by its
# attributes), so that nesting them cannot hide a doubling either.
_CONTAINERS = (list, tuple, dict, set, frozenset, type({}.keys()), type({}.values()), type({}.items()))


class _Budget:
    """The running counts of one render."""

    def __init__(self, limits: TemplateLimits, input_chars: int):
        self.size_cap = limits.max_output + limits.input_factor * input_chars
        self.output_left = self.size_cap
        self.alloc_left = limits.alloc_factor * self.size_cap
        self.steps_left = limits.max_steps
        self.limits = limits
        self.deadline = time.monotonic() + limits.max_seconds
        self._expanded: dict[int, tuple[Any, int]] = {}  # id -> (container, its expanded size)
        self._shapes: dict[int, tuple[Any, tuple[int, int, int]]] = {}  # id -> (container, its shape)

    def step(self) -> None:
        self.steps_left -= 1
        if self.steps_left < 0:
            raise ChatTemplateError(f"the chat template ran more than {self.limits.max_steps} steps "
                                    "(loop iterations, calls, filters): refused")
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"the chat template ran longer than {self.limits.max_seconds:g} s: refused")

    def size(self, n: int, what: str) -> None:
        """Refuses to make an object of n characters or items; charges it to the allocation budget."""
        self.fits(n, what)
        self.charge(n)

    def fits(self, n: int, what: str) -> None:
        """Refuses to make an object of n characters or items (charging nothing: for results that
        are measured again once made)."""
        if n > self.size_cap:
            raise ChatTemplateError(f"{what} would make {n} characters or items, over the chat template limit "
                                    f"of {self.size_cap}")

    def charge(self, n: int) -> None:
        self.alloc_left -= n
        if self.alloc_left < 0:
            raise ChatTemplateError("the chat template built more data than its limit "
                                    f"({self.limits.alloc_factor} x {self.size_cap} characters or items)")

    def work(self, n: int, what: str) -> None:
        """Charges the work of one operation that no step can interrupt (characters it will scan
        or copy) to the allocation budget; refuses it, before it runs, where that is spent."""
        if n > self.alloc_left:
            raise ChatTemplateError(f"{what} would take some {n} character operations in one call, over the chat "
                                    f"template limit ({self.limits.alloc_factor} x {self.size_cap})")
        self.alloc_left -= n

    def expanded(self, value: Any) -> int:
        """The size of `value` written out (what str() or tojson would make of it): the
        characters of its strings and numbers, a container counted once per reference to it
        (a list that holds another list twice counts it twice, so doubling `[x, x]` shows),
        memoised per object so the walk is linear in the distinct objects."""
        if isinstance(value, (str, bytes)):
            return len(value)
        if isinstance(value, int):
            return value.bit_length() // 3 + 1
        if not isinstance(value, (jinja2.utils.Namespace, *_CONTAINERS)):
            return 8
        hit = self._expanded.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        if isinstance(value, jinja2.utils.Namespace):  # its repr shows its attributes
            attrs = object.__getattribute__(value, "_Namespace__attrs")
            n = 2 + sum(self.expanded(k) + self.expanded(v) + 4 for k, v in list(attrs.items()))
        elif isinstance(value, dict):
            n = 2 + sum(self.expanded(k) + self.expanded(v) + 4 for k, v in value.items())
        else:
            n = 2 + sum(self.expanded(v) + 2 for v in value)
        self._expanded[id(value)] = (value, n)  # holding it keeps its id from being reused
        return n

    def forget(self) -> None:
        """Drops the measured sizes: a namespace's attributes changed (`{% set ns.a = x %}`), and with
        them the size of everything that holds it. (Namespaces are the only values a template can
        change; the walks stay linear in the distinct objects between two changes.)"""
        self._expanded.clear()
        self._shapes.clear()

    def shape(self, value: Any) -> tuple[int, int, int]:
        """(values in `value` written out, a container counted once per reference as in
        `expanded`; levels of nesting; the longest dict key written out), memoised per object:
        what indented writers (tojson's indent, pprint) multiply their indentation by."""
        if isinstance(value, jinja2.utils.Namespace):
            value = object.__getattribute__(value, "_Namespace__attrs")
        if isinstance(value, (str, bytes)) or not isinstance(value, _CONTAINERS):
            return 1, 0, 0
        hit = self._shapes.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        values, depth, key = 1, 0, 0
        if isinstance(value, dict):
            key = max((self.expanded(k) for k in value), default=0)
            children: Iterable[Any] = value.values()
        else:
            children = value
        for child in children:
            child_values, child_depth, child_key = self.shape(child)
            values, depth, key = values + child_values, max(depth, child_depth), max(key, child_key)
        result = (values, depth + 1, key)
        self._shapes[id(value)] = (value, result)
        return result

    def made(self, value: Any, what: str) -> None:
        """Checks an object just made (a container by its expanded size)."""
        if isinstance(value, (str, bytes, jinja2.utils.Namespace, *_CONTAINERS)):
            self.size(self.expanded(value), what)

    def emit(self, n: int) -> None:
        self.output_left -= n
        if self.output_left < 0:
            raise ChatTemplateError(f"the chat template's output is over its limit of {self.size_cap} characters")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("amlx_template_budget", default=None)


def _budget() -> _Budget:
    # Outside a render (Jinja folding constants while compiling) the default limits apply per call.
    return _BUDGET.get() or _Budget(TemplateLimits(), 0)


def _input_size(value: Any) -> int:
    """Characters of plain template inputs (strings, numbers, containers of them)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(_input_size(k) + _input_size(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_input_size(v) for v in value)
    return 8


def render(template: jinja2.Template, limits: TemplateLimits, /, **variables: Any) -> str:
    """Renders `template` (compiled by a `ChatEnvironment`) within `limits`. (Positional-only, so
    that template variables named `template` or `limits` reach the template: they raised TypeError.)"""
    token = _BUDGET.set(_Budget(limits, _input_size(variables)))
    try:
        return template.render(**variables)
    finally:
        _BUDGET.reset(token)


# -- size checks before an operation runs ---------------------------------------------

def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _sized(value: Any) -> bool:
    return isinstance(value, (str, bytes, list, tuple))


_PRINTF_SPEC = re.compile(r"[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.?)", re.DOTALL)
_PARENS = re.compile(r"[()]")
_DIGITS = re.compile(r"\d+")
_MAX_INT_BITS = 1 << 16


def _check_width(budget: _Budget, digits: str, what: str) -> None:
    budget.size(int(digits) if len(digits) <= 12 else budget.size_cap + 1, what)


# Formatting writes each argument once per conversion that names it: `'%(a)s%(a)s' % {'a': x}`
# or `'{0}{0}'.format(x)` with the field repeated a thousand times made a thousand copies of x
# (up to the size limit each) before anything could measure the result. Each conversion is
# bounded by the largest argument, times _ESCAPING for repr() / ascii() ("\U0001f600" is ten
# characters for one), plus _FORMATTED (quotes, signs); a float counts as _FLOAT characters
# (`'%f' % 1e308` writes 316).
_FORMATTED = 4
_ESCAPING = 10
_FLOAT = 330


def _written(budget: _Budget, value: Any) -> int:
    return _FLOAT if isinstance(value, float) else budget.expanded(value)


def _largest(budget: _Budget, values: Iterable[Any]) -> int:
    return max((_written(budget, v) for v in values), default=0)


def _printf_conversions(fmt: str) -> Iterator[tuple[str | None, str | None, str]]:
    """(width, precision, conversion) of each conversion of a % format, read as Python reads them
    (a key in parentheses may hold nested ones), in one pass: a regex that looked for the ')' of
    every '%(' read to the end of the format from each one that had none ('%(' * 200,000: 70 s
    before the format, which Python refuses, was even tried)."""
    pos = fmt.find("%")
    while pos != -1:
        pos += 1
        if fmt.startswith("(", pos):
            depth = 0
            for paren in _PARENS.finditer(fmt, pos):
                depth += 1 if paren.group() == "(" else -1
                if not depth:
                    pos = paren.end()
                    break
            else:
                return  # an incomplete key: Python refuses the format
        match = _PRINTF_SPEC.match(fmt, pos)
        yield match.group(1), match.group(2), match.group(3)
        pos = fmt.find("%", match.end())


def _printf_size(budget: _Budget, fmt: str, args: Any) -> int:
    """A bound on the length of `fmt % args`; ChatTemplateError for '*' widths or widths over the limit."""
    arg = _largest(budget, args) if isinstance(args, tuple) else _written(budget, args)  # (a mapping: whole)
    total = len(fmt)
    for width, precision, conversion in _printf_conversions(fmt):
        for group in (width, precision):
            if group == "*":
                raise ChatTemplateError("'*' widths in % formatting are not allowed in chat templates")
            if group:
                _check_width(budget, group, "a % format width")
                total += int(group)
        total += _FORMATTED + arg * (_ESCAPING if conversion in ("r", "a") else 1)
    return total


def _format_size(budget: _Budget, fmt: str, args: tuple, kwargs: dict) -> int:
    """A bound on the length of `fmt.format(*args, **kwargs)` (or `format_map`, whose mapping is
    an argument); ChatTemplateError for nested fields in specs or widths over the limit."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return len(fmt)  # str.format itself will refuse it
    arg = _largest(budget, [*args, *kwargs.values()])
    total = len(fmt)
    for _, name, spec, conversion in fields:
        if spec and "{" in spec:
            raise ChatTemplateError("nested fields in format specs are not allowed in chat templates")
        for digits in _DIGITS.findall(spec or ""):
            _check_width(budget, digits, "a format width")
            total += int(digits)
        if name is not None:
            total += _FORMATTED + arg * (_ESCAPING if conversion in ("r", "a") else 1)
    return total


def _joined_size(sep: str | bytes, items: list) -> int:
    return sum(len(x) if isinstance(x, (str, bytes)) else 8 for x in items) + len(sep) * max(len(items) - 1, 0)


def _replaced_size(s: str | bytes, old: Any, new: Any, count: Any = -1) -> int:
    # (bytes too: b.replace(b'', x) was taken for no growth, and made len(b) + 1 copies of x)
    text = type(s)
    if not (isinstance(old, text) and isinstance(new, text)):
        return len(s)
    hits = len(s) + 1 if not old else s.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(len(new) - len(old), 0)


def _check_bits(bits: int, what: str) -> None:
    # Huge integers cost time, not just memory (3 ** 10**7 takes seconds): a small fixed cap.
    if bits > _MAX_INT_BITS:
        raise ChatTemplateError(f"{what} would have {bits} bits, over the chat template limit of {_MAX_INT_BITS}")


def _check_binop(budget: _Budget, operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        if _sized(left) and isinstance(right, int):
            budget.size(budget.expanded(left) * max(right, 0), "repetition (*)")
        elif _sized(right) and isinstance(left, int):
            budget.size(budget.expanded(right) * max(left, 0), "repetition (*)")
        elif isinstance(left, int) and isinstance(right, int):
            _check_bits(left.bit_length() + right.bit_length(), "an integer product")
    elif operator == "+" and _sized(left) and _sized(right):
        budget.size(budget.expanded(left) + budget.expanded(right), "concatenation (+)")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        _check_bits(right * left.bit_length(), "a power (**)")
    elif operator == "%" and isinstance(left, (str, bytes)):
        # (bytes format as str does: b'%999999999s' % (b'',) made a gigabyte in one operation)
        fmt = left if isinstance(left, str) else left.decode("latin-1")
        budget.size(_printf_size(budget, fmt, right), "% formatting")


# Codecs whose time grows with the square of a text: encoding 8,000 distinct characters with
# punycode takes 20 s (one call, so no step could stop it), idna's labels go through punycode.
_SLOW_CODECS = frozenset({"punycode", "idna"})


def _check_codec(encoding: Any) -> None:
    try:
        name = codecs.lookup(encoding).name if isinstance(encoding, str) else None
    except LookupError:
        return  # the method itself will refuse it
    if name in _SLOW_CODECS:
        raise ChatTemplateError(f"the {name} codec is not allowed in chat templates (its time grows with the "
                                "square of the text)")


def _check_str_method(budget: _Budget, owner: str | bytes, name: str, args: tuple, kwargs: dict) -> tuple:
    """Checks a call of a str (or bytes) method; returns its (possibly materialised) arguments."""
    if name in ("ljust", "rjust", "center", "zfill") and args:
        budget.size(_int(args[0]), f"str.{name}")
    elif name in ("encode", "decode"):
        _check_codec(args[0] if args else kwargs.get("encoding", "utf-8"))
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        tabs = owner.count(b"\t" if isinstance(owner, bytes) else "\t")  # (a str "\t" broke bytes.expandtabs)
        budget.size(len(owner) + tabs * _int(tab), "str.expandtabs")
    elif name == "replace" and len(args) >= 2:
        budget.size(_replaced_size(owner, *args[:3]), "str.replace")
    elif name == "join" and args:
        items = list(args[0])
        budget.size(_joined_size(owner, items), "str.join")
        args = (items, *args[1:])
    elif name in ("strip", "lstrip", "rstrip") and args and isinstance(args[0], (str, bytes)):
        args = (_strip_chars(budget, owner, args[0], f"str.{name}"), *args[1:])
    elif name == "translate" and args and isinstance(owner, str):
        budget.size(_translated_size(owner, args[0]), "str.translate")
    return args


def _strip_chars(budget: _Budget, text: Any, chars: Any, what: str) -> Any:
    """The `chars` of a strip with each character once (the same set, so the same result), its
    work charged: each character stripped is looked for among them, the text's length times theirs
    in one call at worst (a 400,000-character text stripped of 40,000 distinct characters took a
    second, a longer text or set minutes, past the render's deadline)."""
    if isinstance(chars, str) and isinstance(text, str):
        chars = "".join(dict.fromkeys(chars))
        budget.work(len(text) * len(chars), what)
    elif isinstance(chars, bytes) and isinstance(text, bytes):
        chars = bytes(dict.fromkeys(chars))  # (at most 256)
    return chars


def _translated_size(text: str, table: Any) -> int:
    """The length of `text.translate(table)`: each distinct character's count times the length of
    what the table maps its code point to. A table is anything indexed by code points, a list as
    well as a dict: `s.translate([''] * 97 + [big])` wrote `big` once per "a" of `s` (only dicts
    were measured) before the result could be. (bytes.translate takes a 256-byte table: no growth.)"""
    total = 0
    for char, count in collections.Counter(text).items():
        try:
            value = table[ord(char)]
        except Exception:  # (unmapped: the character stays; a table translate refuses, refused there)
            value = char
        total += count * (len(value) if isinstance(value, str) else 0 if value is None else 1)
    return total


# -- filters -------------------------------------------------------------------------------
# Each check sees a filter's arguments (without Jinja's context argument) as (args, kwargs),
# with Jinja's parameter names, and returns the arguments to call the filter with.

def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _filter_center(budget: _Budget, args: tuple, kwargs: dict) -> tuple:
    budget.size(_int(_arg(args, kwargs, 1, "width", 80)), "the center filter")
    return args


def _filter_indent(budget: _Budget, args: tuple, kwargs: dict) -> tuple:
    width = _arg(args, kwargs, 1, "width", 4)
    text = str(args[0])
    pad = len(width) if isinstance(width, str) else _int(width)
    budget.size(len(text) + (text.count("\n") + 1) * pad, "the indent filter")
    return args


def _filter_wordwrap(budget: _Budget, args: tuple, kwargs: dict) -> tuple:
    text = str(args[0])
    width = max(_int(_arg(args, kwargs, 1, "width", 79)), 1)
    wrap = _arg(args, kwargs, 3, "wrapstring", None)
    lines = len(text) // width + text.count("\n") + 1
    budget.size(len(text) + lines * (len(wrap) if isinstance(wrap, str) else 1), "the wordwrap filter")
    if _arg(args, kwargs, 2, "break_long_words", True):
        # textwrap breaks a word longer than the width by slicing off a line at a time and keeping
        # the rest, a copy of it: the square of the word's length over the width, in one call (two
        # million characters at width 1 took minutes, far past the render's deadline)
        # (the words as textwrap splits them, at ASCII whitespace only, "\u3000" inside a word;
        # their lengths from one pass: a regex for the words longer than the width read each
        # shorter word once per character of it, quadratic itself)
        if width < len(text):
            copied = sum(n * n for n in map(len, _TEXTWRAP_WORD.findall(text)) if n > width) // (2 * width)
            budget.work(copied, "the wordwrap filter")
    return args


_TEXTWRAP_WORD = re.compile(r"[^\t\n\x0b\x0c\r ]+")  # (textwrap's whitespace is ASCII's)


def _filter_batch(budget: _Budget, args: tuple, kwargs: dict) -> tuple:
    linecount = _int(_arg(args, kwargs, 1, "linecount", 1))
    budget.size(linecount, "the batch filter")
    # its last row is filled up with fill_with: one row holds it up to linecount - 1 times (its rows
    # are yielded, never measured as a call's result: [1] | batch(1000, x) then written out made
    # a thousand copies of x)
    fill = _arg(args, kwargs, 2, "fill_with", None)
    if fill is not None:
        budget.size(budget.expanded(fill) * max(linecount - 1, 0), "the batch filter's fill_with")
    return args


def _filter_slice(budget: _Budget, args: tuple, kwargs: dict) -> tuple:
    budget.size(_int(_arg(args, kwargs, 1, "slices", 1)), "the slice filter")
    return args


def _filter_format(budget: _Budget, args: tuple, kwargs: dict) -> tuple:
    if isinstance(args[0], str):  # (the filter formats `value % (kwargs or args)`)
        budget.fits(_printf_size(budget, args[0], kwargs or tuple(args[1:])), "the format filter")
    return args


def _filter_trim(budget: _Budget, args: tuple, kwargs: dict) -> tuple:
    chars = _arg(args, kwargs, 1, "chars", None)
    if isinstance(chars, str):
        chars = _strip_chars(budget, str(args[0]), chars, "the trim filter")
        if len(args) > 1:
            args = (args[0], chars, *args[2:])
        else:
            kwargs["chars"] = chars
    return args


def _filter_replace(budget: _Budget, args: tuple, kwargs: dict) -> tuple:
    count = _arg(args, kwargs, 3, "count", None)
    # the filter writes old and new out (str()), whatever they are: a list for new was taken for
    # no growth, and s | replace('', [x] * 30) wrote 30 copies of x between every two characters
    old, new = (_arg(args, kwargs, 1, "old", ""), _arg(args, kwargs, 2, "new", ""))
    for value in (old, new):
        budget.fits(budget.expanded(value), "the replace filter")
    size = _replaced_size(str(args[0]), str(old), str(new), -1 if count is None else count)
    budget.size(size, "the replace filter")
    return args


def _filter_join(budget: _Budget, args: tuple, kwargs: dict) -> tuple:
    items = list(args[0])  # a generator would be consumed twice otherwise
    sep = str(_arg(args, kwargs, 1, "d", ""))
    # each item (or its attribute, no larger) written out, measured before any is written (str() of
    # each item made them all first); the separator once per item
    budget.size(sum(budget.expanded(x) for x in items) + len(sep) * max(len(items) - 1, 0), "the join filter")
    return (items, *args[1:])


def _filter_urlize(budget: _Budget, args: tuple, kwargs: dict) -> tuple:
    # Every link gets the target and rel attributes written into it: a link is some 6 characters
    # of text ("www.ab"), written twice and escaped (up to 6 characters each), plus its markup.
    text = len(str(args[0]))
    # (target and rel are written out with str(), whatever they are: measured, then their text's)
    attributes = [v for v in (_arg(args, kwargs, 3, "target", None), _arg(args, kwargs, 4, "rel", None)) if v]
    for value in attributes:
        budget.fits(budget.expanded(value), "the urlize filter")
    extra = sum(len(str(v)) for v in attributes)
    budget.fits(text * 12 + (text // 4 + 1) * (extra + 64), "the urlize filter")
    # Jinja finds a word's trailing punctuation with a search that, from each character of a run
    # of it, reads to the run's end (and balances parentheses by copying the rest of that run per
    # bracket): the square of every run, each step a regex's ("a" + ")" * 40,000: 38 s in one call).
    escaped = str(markupsafe.escape(str(args[0])))
    steps = sum(len(run) ** 2 for run in _URLIZE_TRAIL.findall(escaped))
    budget.work(_REGEX_STEP * steps, "the urlize filter")
    return args


_URLIZE_TRAIL = re.compile(r"(?:[)>.,]|&gt;)+")
_REGEX_STEP = 32  # character operations one step of Python's regex engine is charged as


def _filter_tojson(budget: _Budget, args: tuple, kwargs: dict) -> tuple:
    indent = _arg(args, kwargs, 2, "indent", None)
    width = len(indent) if isinstance(indent, str) else _int(indent)
    if width > 64:
        raise ChatTemplateError("tojson's indent is limited to 64 in chat templates")
    separators = _arg(args, kwargs, 3, "separators", None)
    sep = 0
    if isinstance(separators, (list, tuple)):
        sep = max((len(s) for s in separators if isinstance(s, str)), default=0)
    if width or sep:
        # Every value goes on a line of its own, indented once per level it sits at, after a
        # separator: 100,000 numbers 200 lists deep made 131 MB at indent 64 before the result
        # could be measured (a list that deep is only some hundreds of characters more).
        values, depth, _ = budget.shape(args[0])
        budget.fits(budget.expanded(args[0]) + values * (width * depth + 1 + sep), "the tojson filter")
    return args


def _filter_pprint(budget: _Budget, args: tuple, kwargs: dict) -> tuple:
    # pprint indents nested values by the brackets and dict keys (repr'd, up to 4 characters
    # each) of every level above them, and gives long texts a line per word when that
    # indentation leaves no room: bounded as every character on a line of that indentation.
    values, depth, key = budget.shape(args[0])
    expanded = budget.expanded(args[0])
    budget.fits(expanded + (expanded + values) * depth * (4 * key + 4), "the pprint filter")
    return args


def _filter_round(budget: _Budget, args: tuple, kwargs: dict) -> tuple:
    # round() of an int, and the ceil / floor methods, compute 10 ** precision exactly.
    precision = _arg(args, kwargs, 1, "precision", 0)
    if isinstance(precision, int):
        _check_bits(abs(precision) * 4, "the round filter's precision (10 ** precision)")
    return args


def _filter_sum(budget: _Budget, args: tuple, kwargs: dict) -> tuple:
    start = _arg(args, kwargs, 2, "start", 0)
    if isinstance(start, (int, float)):
        return args
    items = list(args[0])  # summing sequences copies the growing total once per item
    total = budget.expanded(start) + sum(budget.expanded(x) for x in items)
    budget.size(total, "the sum filter")
    budget.charge(len(items) * total // 2)
    return (items, *args[1:])


_FILTER_CHECKS: dict[str, Callable[[_Budget, tuple, dict], tuple]] = {
    "center": _filter_center, "indent": _filter_indent, "wordwrap": _filter_wordwrap, "batch": _filter_batch,
    "slice": _filter_slice, "format": _filter_format, "replace": _filter_replace, "join": _filter_join,
    "tojson": _filter_tojson, "pprint": _filter_pprint, "trim": _filter_trim, "urlize": _filter_urlize, "sum": _filter_sum, "round": _filter_round,
}


# Filters that take their value apart rather than write it out (or that measure it themselves).
_STRUCTURAL_FILTERS = frozenset({
    "attr", "batch", "count", "d", "default", "dictsort", "first", "groupby", "items", "join", "last", "length",
    "list", "map", "max", "min", "pprint", "random", "reject", "rejectattr", "reverse", "select", "selectattr",
    "slice", "sort", "sum", "unique", "amlx_loop", "amlx_emit", "amlx_concat", "amlx_literal",
})


def _bounded_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    check = _FILTER_CHECKS.get(name)
    skip = 1 if hasattr(fn, "jinja_pass_arg") else 0  # context / eval context / environment first

    @functools.wraps(fn)  # keeps jinja_pass_arg
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        if name not in _STRUCTURAL_FILTERS and len(args) > skip:
            # most filters write their value out first (str() of it), before their result could
            # be measured: a value that no call made (a loop's item, a namespace) is measured here
            budget.fits(budget.expanded(args[skip]), f"the {name} filter's value")
        if check is not None and len(args) > skip:
            args = (*args[:skip], *check(budget, args[skip:], kwargs))
        result = fn(*args, **kwargs)
        budget.made(result, f"the {name} filter")
        return result

    return bounded


def _counted_test(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A test (`is in`, `is equalto`, ...) that counts as a step. select / reject and their
    attribute forms call one per item and yield only those kept: `range(100000) | select('in',
    big)` ran every test (each scanning a list of 800,000) with no step to check the deadline."""

    @functools.wraps(fn)  # keeps jinja_pass_arg
    def counted(*args: Any, **kwargs: Any) -> Any:
        _budget().step()
        return fn(*args, **kwargs)

    return counted


# -- the environment -----------------------------------------------------------------------

def _hook(name: str, node: jinja2.nodes.Expr) -> jinja2.nodes.Expr:
    """`node | <name>`: one of the counting filters below. They take the context, so Jinja
    never folds them into constants at compile time, and a filter is a direct call (the
    sandbox's `call` would cost several times more per loop item)."""
    return jinja2.nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


def _counted(iterable: Iterable[Any]) -> Iterator[Any]:
    budget = _budget()
    for item in iterable:
        budget.step()
        yield item


@jinja2.pass_context
def _loop_hook(context: Any, iterable: Iterable[Any]) -> Iterator[Any]:
    return _counted(iterable)


@jinja2.pass_context
def _emit_hook(context: Any, value: Any) -> str:
    if not isinstance(value, str):
        # measured before it is written out: a loop's item, or a namespace's attributes, were
        # never a call's result, so nothing measured them (a row of [1] | batch(1000, x))
        _budget().fits(_budget().expanded(value), "a value written out")
    text = value if isinstance(value, str) else str(value)
    _budget().emit(len(text))
    return text


@jinja2.pass_context
def _concat_hook(context: Any, values: list) -> str:
    """`a ~ b ~ ...`, as Jinja joins it, with the total measured while the operands are written
    out: Jinja joins them all at once, so an operand written a thousand times made a thousand
    copies before the result could be measured."""
    budget = _budget()
    pieces, total = [], 0
    for value in values:
        if not isinstance(value, str):
            budget.fits(total + budget.expanded(value), "concatenation (~)")
        piece = value if isinstance(value, str) else str(value)
        total += len(piece)
        budget.fits(total, "concatenation (~)")
        pieces.append(piece)
    budget.charge(total)
    if context.eval_ctx.autoescape:  # ({% autoescape %}: Jinja's markup_join escapes what is not Markup)
        result = jinja2.runtime.markup_join(values)
        budget.size(len(result), "concatenation (~)")
        return result
    return "".join(pieces)


@jinja2.pass_context
def _literal_hook(context: Any, value: Any) -> Any:
    _budget().made(value, "a list, tuple or dict literal")
    return value


_HOOKS = {"amlx_loop": _loop_hook, "amlx_emit": _emit_hook, "amlx_concat": _concat_hook,
          "amlx_literal": _literal_hook}


class _Hooks(jinja2.visitor.NodeTransformer):
    """Routes loop items, emitted text and `~` results through the counting filters."""

    def visit_For(self, node: jinja2.nodes.For) -> jinja2.nodes.Node:
        node = self.generic_visit(node)
        node.iter = _hook("amlx_loop", node.iter)
        return node

    def visit_Output(self, node: jinja2.nodes.Output) -> jinja2.nodes.Node:
        node = self.generic_visit(node)
        node.nodes = [_hook("amlx_emit", child) for child in node.nodes]
        return node

    def visit_Concat(self, node: jinja2.nodes.Concat) -> jinja2.nodes.Node:
        node = self.generic_visit(node)  # the operands, as a list, to the hook that joins them
        return _hook("amlx_concat", jinja2.nodes.List(node.nodes, lineno=node.lineno))

    def visit_List(self, node: jinja2.nodes.List) -> jinja2.nodes.Node:
        return _hook("amlx_literal", self.generic_visit(node))

    def visit_Dict(self, node: jinja2.nodes.Dict) -> jinja2.nodes.Node:
        return _hook("amlx_literal", self.generic_visit(node))

    def visit_Tuple(self, node: jinja2.nodes.Tuple) -> jinja2.nodes.Node:
        node = self.generic_visit(node)
        return _hook("amlx_literal", node) if node.ctx == "load" else node  # not assignment targets


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (used by some templates to mark
    assistant text for training masks) and simply renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so templates can't shadow internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)
        # `{% set ns.a = x %}` is no call, so no result check sees what a namespace comes to hold;
        # what holds the namespace has grown with it (a step: each set walks what the namespace holds)
        budget = _budget()
        budget.step()
        budget.forget()
        budget.fits(budget.expanded(self), "a namespace")

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.sandbox.SecurityError(f"namespace attribute {name!r} is not allowed")


class _TemplateDict:
    """`dict` for templates: `dict(...)` and `dict.fromkeys(...)`, as transformers offers it.

    Jinja's default global is the dict type itself, and the immutable sandbox refuses mutating
    methods only on instances: `dict.update(d, a=x, b=x)`, `dict.setdefault`, `dict.clear` and
    `dict.pop` called through the type changed dicts in place (the messages included), and as
    they return None, the size checks never saw what `update` put into a dict (doubling a
    structure 64 times that way, then writing it out, froze the render)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain json.dumps output.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002 - Jinja's names
    _budget().size(_int(n) * _int(max) * 12, "lipsum")
    return jinja2.utils.generate_lorem_ipsum(n=n, html=html, min=min, max=max)


class ChatEnvironment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The immutable sandbox with chat templates' helpers (as transformers defines
    them) and the render limits described in the module docstring."""

    MAX_TOKENS = 100_000

    # Not folded at compile time either (Jinja leaves intercepted operators to run time).
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        # optimized=False: Jinja's optimizer folds constant expressions while compiling, outside any
        # render's budget, and writes what they make into the compiled module's source: a constant
        # list of 200,000 rows ('{0}' | slice(200000) | reverse) took 5 s and 43 MB to compile, the
        # 4 million the default limits allow some 100 s. Unfolded, they run in the render, measured.
        super().__init__(trim_blocks=True, lstrip_blocks=True, optimized=False,
                         extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        self.filters["tojson"] = _tojson
        self.filters = {name: _bounded_filter(name, fn) for name, fn in self.filters.items()}
        self.filters.update(_HOOKS)
        self.tests = {name: _counted_test(fn) for name, fn in self.tests.items()}
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.globals["namespace"] = _SafeNamespace
        self.globals["lipsum"] = _lipsum
        self.globals["dict"] = _TemplateDict()

    def compile_template(self, source: str) -> jinja2.Template:
        """Parses `source`, adds the counting hooks and compiles it (TemplateSyntaxError if bad).

        Compiling costs about 30 us and 4 KB per Jinja token, with no limit of its own, so a
        template of more than MAX_TOKENS tokens is refused after counting them (real ones have
        a few thousand: a 50 KB template about 15,000)."""
        for count, _ in enumerate(self.lex(source), 1):
            if count > self.MAX_TOKENS:
                raise ChatTemplateError(f"the chat template ({len(source)} characters) has more than "
                                        f"{self.MAX_TOKENS} Jinja tokens: refused, as compiling it would take "
                                        "seconds and gigabytes")
        tree = _Hooks().visit(self.parse(source))
        tree.set_environment(self)
        return self.from_string(tree)

    # -- sandbox hooks ---------------------------------------------------------------------
    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # The sandbox hands templates a wrapper for str.format / format_map (also when it is
        # called without `call`): its widths are checked before it formats.
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            budget = _budget()
            budget.step()
            budget.fits(_format_size(budget, fmt, args, kwargs), f"str.{value.__name__}")
            return wrapped(*args, **kwargs)

        return functools.update_wrapper(checked, value)

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.step()
        _check_binop(budget, operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(self, context: jinja2.runtime.Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        for arg in (*args, *kwargs.values()):
            if not isinstance(arg, (str, bytes, int, float)):
                # a container no call made (a macro's varargs, a loop's item) may be written out
                # by the call, or by its error: [1].index(x) says "<x written out> is not in list"
                budget.fits(budget.expanded(arg), "an argument of a call")
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, (str, bytes)):
            args = _check_str_method(budget, owner, getattr(obj, "__name__", ""), args, kwargs)
        elif isinstance(owner, int) and getattr(obj, "__name__", "") == "to_bytes":
            budget.size(_int(args[0] if args else kwargs.get("length", 1)), "int.to_bytes")
        elif isinstance(obj, jinja2.runtime.LoopContext) and args:
            args = (_counted(args[0]), *args[1:])  # a recursive loop's next level
        result = super().call(context, obj, *args, **kwargs)
        budget.made(result, "a call")  # e.g. dict(a=x, b=x)
        return result
