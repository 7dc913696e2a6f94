"""A user's regular expression, read as Python's `re` reads it and written out again for llguidance.

Why: amlx's promise is that a `regex` constraint's text satisfies `re.fullmatch(regex, text)`
and a JSON schema's strings `re.search(pattern, s)` (what `jsonschema` checks). llguidance reads
patterns with Rust's regex-syntax instead, and handed over as they were, some patterns meant
other things there, so outputs broke their own pattern. Found by differential testing (all
accepted by llguidance, rejected by `re`):
- `\\w` took combining marks (U+0301), U+203F and U+200D; `\\d` digits newer than Python
  3.11's Unicode tables (U+11F50); `\\W` and `[^\\w]` took "½" and "²" (words to Python); `\\S` took
  U+001C-U+001F (blanks to Python);
- under `(?i)`, `[^a-z]` took "ı" and "İ" (Python's case folding pairs them with i);
- `x{1,3}+` (possessive in Python) was `(?:x{1,3})+`, `x?+` was `(?:x?)+`; `a{ 1 }` and
  `a{1, 2}` (literal text in Python) were counted repetitions;
- `(?x)[^ a]` took " " (whitespace counts inside a class in Python's verbose mode, not in Rust's);
- in a schema, llguidance rewrites `\\d` and `\\w` to ASCII, which made `\\D` and `\\W` take
  "٣" and "é".
So a pattern is parsed by Python's own parser and written out again in the part of Rust's
syntax whose meaning is not in doubt: literal characters as `\\x{..}` escapes, character classes
as explicit code point ranges (computed from Python's own matcher wherever a flag or a class
escape is involved), non-capturing groups, alternation, counted repetition and the anchors `^`
and `$`. Whatever llguidance cannot follow (lookaround, backreferences, possessive quantifiers,
atomic groups, conditionals, word boundaries, MULTILINE anchors, anchors inside the pattern) and
Rust's class syntax that Python reads as literal characters (`[[:alpha:]]`, `&&`, `--`, `~~`)
are refused with a ValueError naming the construct.

Two places still differ, both on the safe side (the output satisfies `re` either way): `$`
matches only at the very end (Python's also before a final newline), and in a JSON schema
(`ecma=True`), `\\d \\w \\s \\D \\W \\S` and `.` take only what both Python's `re` and ECMA-262,
JSON Schema's own dialect, take: `\\d` is `[0-9]` and `\\w` `[0-9A-Za-z_]` (as llguidance's
schema compiler had them), `.` (without `(?s)`) leaves out `\\r`, U+2028 and U+2029 as well.
"""

from __future__ import annotations

import functools
import re

import numpy as np

try:  # Python 3.11+
    from re import _constants as _c  # type: ignore[attr-defined]
    from re import _parser as _p  # type: ignore[attr-defined]
except ImportError:  # Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

__all__ = ["Refused", "to_llguidance"]

_MAX = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)  # not characters: no UTF-8 text holds them, Rust's classes leave them out

Ranges = tuple[tuple[int, int], ...]  # sorted, disjoint, inclusive code point ranges

_CATEGORY_ESCAPES = {_c.CATEGORY_DIGIT: r"\d", _c.CATEGORY_NOT_DIGIT: r"\D", _c.CATEGORY_SPACE: r"\s",
                     _c.CATEGORY_NOT_SPACE: r"\S", _c.CATEGORY_WORD: r"\w", _c.CATEGORY_NOT_WORD: r"\W"}

# ECMA-262's classes (JSON Schema's regex dialect): \d and \w ASCII, \s its WhiteSpace and
# LineTerminator code points; `.` everything but the line terminators.
_ECMA_DIGIT: Ranges = ((0x30, 0x39),)
_ECMA_WORD: Ranges = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
_ECMA_SPACE: Ranges = ((0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                       (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF))
_LINE_TERMINATORS: Ranges = ((0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029))


def _norm(ranges) -> Ranges:
    """Sorted, merged, without surrogates."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        for a, b in ((lo, min(hi, _SURROGATES[0] - 1)), (max(lo, _SURROGATES[1] + 1), hi)):
            if a > b:
                continue
            if out and a <= out[-1][1] + 1:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
    return tuple((a, b) for a, b in out)


def _complement(ranges: Ranges) -> Ranges:
    out, start = [], 0
    for lo, hi in ranges:
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= _MAX:
        out.append((start, _MAX))
    return _norm(out)


def _union(*sets: Ranges) -> Ranges:
    return _norm([r for s in sets for r in s])


def _intersect(a: Ranges, b: Ranges) -> Ranges:
    return _complement(_union(_complement(a), _complement(b)))


@functools.cache
def _all_characters() -> tuple[str, str]:
    """Every character, in code point order, below and above the surrogates (4 MB, made once
    (20 ms), when a pattern first needs a class computed by `_python_set`)."""
    below = np.arange(_SURROGATES[0], dtype="<u4").tobytes().decode("utf-32-le")
    above = np.arange(_SURROGATES[1] + 1, _MAX + 1, dtype="<u4").tobytes().decode("utf-32-le")
    return below, above


@functools.lru_cache(maxsize=4096)
def _python_set(cls: str, flags: int) -> Ranges:
    """The characters Python's `re` matches with the one-character pattern `cls` under `flags`,
    found by running it over every character (5-20 ms): exact for whatever Python's tables and
    case folding say (`\\w` in this Python's Unicode version, `(?i)k` taking the Kelvin sign)."""
    rx = re.compile(f"(?:{cls})+", flags)
    below, above = _all_characters()
    found = [(m.start(), m.end() - 1) for m in rx.finditer(below)]
    offset = _SURROGATES[1] + 1
    found += [(m.start() + offset, m.end() - 1 + offset) for m in rx.finditer(above)]
    return _norm(found)


@functools.cache
def _cased() -> str:
    """The characters case folding may pair with another: those whose lowercase or uppercase is
    not themselves, and the characters those map to (about 2,900 of 1.1 million; 0.15 s, once).
    Under IGNORECASE, Python's `re` matches any other character as it would without the flag
    (it compares a character's lowercase with the pattern's characters and their lowercases),
    so `_folded` needs Python's matcher for these alone."""
    below, above = _all_characters()
    found: dict[str, None] = {}
    for ch in below + above:
        lower, upper = ch.lower(), ch.upper()
        if lower != ch or upper != ch:
            found.update(dict.fromkeys(ch + lower + upper))
    return "".join(sorted(found))


@functools.lru_cache(maxsize=4096)
def _folded(lo: int, hi: int, flags: int) -> Ranges:
    """The characters `[lo-hi]` matches under `flags` (IGNORECASE, maybe ASCII): the range itself
    and whichever cased characters Python's matcher pairs with it. Only the cased characters are
    tried: scanning every character (`_python_set`) cost 6-8 ms a letter, which a hostile
    pattern of many case-insensitive classes turned into seconds on the event loop."""
    rx = re.compile(f"[{_py_char(lo)}-{_py_char(hi)}]", flags)
    return _norm([(lo, hi)] + [(ord(m[0]), ord(m[0])) for m in rx.finditer(_cased())])


def _py_char(c: int) -> str:
    return f"\\U{c:08x}"


class Refused(ValueError):
    """A construct llguidance cannot follow as Python means it (the message names it)."""


class _Writer:
    """Writes one parsed pattern out in Rust's syntax (see the module's docstring)."""

    def __init__(self, ecma: bool):
        self.ecma = ecma

    def sequence(self, items, flags: int, at_start: bool, at_end: bool) -> str:
        items = list(items)
        return "".join(self.node(op, av, flags, at_start and i == 0, at_end and i == len(items) - 1)
                       for i, (op, av) in enumerate(items))

    def node(self, op, av, flags: int, at_start: bool, at_end: bool) -> str:
        if op is _c.LITERAL:
            return self.chars(self.literal_set(av, flags) if flags & re.IGNORECASE else _norm(((av, av),)))
        if op is _c.NOT_LITERAL:
            return self.chars(_complement(self.literal_set(av, flags) if flags & re.IGNORECASE else ((av, av),)))
        if op is _c.ANY:
            if flags & re.DOTALL:
                return self.chars(_complement(()))
            return self.chars(_complement(_LINE_TERMINATORS if self.ecma else ((0x0A, 0x0A),)))
        if op is _c.IN:
            return self.chars(self.class_set(av, flags))
        if op is _c.BRANCH:
            return "(?:" + "|".join(self.sequence(alt, flags, at_start, at_end) for alt in av[1]) + ")"
        if op is _c.SUBPATTERN:
            _group, add, remove, sub = av
            return "(?:" + self.sequence(sub, (flags | add) & ~remove, at_start, at_end) + ")"
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):  # greedy or lazy: the same strings match whole
            lo, hi, sub = av
            body = "(?:" + self.sequence(sub, flags, False, False) + ")"
            if hi == _c.MAXREPEAT:
                return body + {0: "*", 1: "+"}.get(lo, f"{{{lo},}}")
            return body + ("?" if (lo, hi) == (0, 1) else f"{{{lo}}}" if lo == hi else f"{{{lo},{hi}}}")
        if op is _c.AT:
            return self.anchor(av, flags, at_start, at_end)
        raise Refused(_REFUSED.get(op, f"the construct {op} is not supported"))

    def anchor(self, at, flags: int, at_start: bool, at_end: bool) -> str:
        if at in (_c.AT_BOUNDARY, _c.AT_NON_BOUNDARY):
            raise Refused("word boundaries (\\b, \\B) are not supported")
        if at in (_c.AT_BEGINNING, _c.AT_END) and flags & re.MULTILINE:
            raise Refused("'^' and '$' under the MULTILINE flag (?m) are not supported")
        start = at in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING)
        if start and not at_start:  # (llguidance takes anchors only where they end the pattern)
            raise Refused("'^' and '\\A' are supported only at the start of the pattern (or of an alternative there)")
        if not start and not at_end:
            raise Refused("'$' and '\\Z' are supported only at the end of the pattern (or of an alternative there)")
        # Rust's `$` (like Python's `\Z`) is the end of the text; Python's `$` also matches before
        # a final newline: llguidance then leaves that newline out, which `re` accepts too.
        return "^" if start else "$"

    def literal_set(self, c: int, flags: int) -> Ranges:
        """A literal character under IGNORECASE: the characters Python's case folding matches."""
        return _folded(c, c, flags & (re.IGNORECASE | re.ASCII))

    def class_set(self, items, flags: int) -> Ranges:
        """The characters of a class (`[...]`, `\\d`...): the union of its items' sets, each as
        Python means it, complemented if the class is negated. In a schema, a class escape's set
        is the one both Python and ECMA-262 mean: in a plain class the intersection of the two,
        in a negated one their union (whose complement is then inside both complements)."""
        negated = bool(items) and items[0][0] is _c.NEGATE
        sets = []
        for op, av in items[1:] if negated else items:
            if op is _c.CATEGORY:
                chars = self.category(av, flags)
                if self.ecma:
                    ecma = _ecma_category(av)
                    chars = _union(chars, ecma) if negated else _intersect(chars, ecma)
                sets.append(chars)
            elif op is _c.LITERAL or op is _c.RANGE:
                lo, hi = (av, av) if op is _c.LITERAL else av
                if flags & re.IGNORECASE:
                    sets.append(_folded(lo, hi, flags & (re.IGNORECASE | re.ASCII)))
                else:
                    sets.append(_norm([(lo, hi)]))
            else:
                raise Refused(f"the class item {op} is not supported")
        chars = _union(*sets)
        return _complement(chars) if negated else chars

    def category(self, category, flags: int) -> Ranges:
        return _python_set(_CATEGORY_ESCAPES[category], flags & (re.IGNORECASE | re.ASCII))

    @staticmethod
    def chars(ranges: Ranges) -> str:
        """A Rust class of exactly these characters (written negated where that is shorter)."""
        if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
            return _rust_char(ranges[0][0])
        negated = _complement(ranges)
        body, neg = (negated, "^") if len(negated) < len(ranges) else (ranges, "")
        if not body:  # every character, or none
            return "[\\x{0}-\\x{10ffff}]" if neg else "[^\\x{0}-\\x{10ffff}]"
        return f"[{neg}" + "".join(_rust_char(a) if a == b else f"{_rust_char(a)}-{_rust_char(b)}"
                                   for a, b in body) + "]"


def _rust_char(c: int) -> str:
    """One character in Rust's syntax, in or out of a class: ASCII letters and digits as they are,
    everything else as `\\x{..}` (no punctuation escapes: Rust's `\\<` is a word boundary)."""
    ch = chr(c)
    return ch if ch.isascii() and ch.isalnum() else f"\\x{{{c:x}}}"


def _ecma_category(category) -> Ranges:
    positive = {_c.CATEGORY_DIGIT: _ECMA_DIGIT, _c.CATEGORY_NOT_DIGIT: _ECMA_DIGIT, _c.CATEGORY_WORD: _ECMA_WORD,
                _c.CATEGORY_NOT_WORD: _ECMA_WORD, _c.CATEGORY_SPACE: _ECMA_SPACE,
                _c.CATEGORY_NOT_SPACE: _ECMA_SPACE}[category]
    negated = category in (_c.CATEGORY_NOT_DIGIT, _c.CATEGORY_NOT_WORD, _c.CATEGORY_NOT_SPACE)
    return _complement(positive) if negated else positive


_REFUSED = {
    _c.ASSERT: "lookahead and lookbehind ((?=...), (?<=...)) are not supported",
    _c.ASSERT_NOT: "negative lookahead and lookbehind ((?!...), (?<!...)) are not supported",
    _c.GROUPREF: "backreferences (\\1, (?P=name)) are not supported",
    _c.GROUPREF_EXISTS: "conditional groups ((?(1)...|...)) are not supported",
}
for _name, _why in (("POSSESSIVE_REPEAT", "possessive quantifiers (*+, ++, ?+, {m,n}+) are not supported"),
                    ("ATOMIC_GROUP", "atomic groups ((?>...)) are not supported")):
    if hasattr(_c, _name):  # Python 3.11+
        _REFUSED[getattr(_c, _name)] = _why


def _set_syntax(pattern: str, verbose: bool) -> str | None:
    """Class syntax that Python reads as plain characters, with a FutureWarning (its meaning may
    change), and Rust as a nested class or POSIX class (`[[`) or a set operation (`&&`, `--`,
    `~~`; and `||`, which only Python warns of). The conditions are those
    of Python's parser (re._parser, where it warns), checked here rather than by catching the
    warning: `warnings.catch_warnings` is not thread-safe."""
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            i += 2
        elif pattern.startswith("(?#", i):  # a comment, to the first unescaped ')'
            i += 3
            while i < n and pattern[i] != ")":
                i += 2 if pattern[i] == "\\" else 1
            i += 1
        elif verbose and ch == "#":
            end = pattern.find("\n", i)
            i = n if end < 0 else end + 1
        elif ch == "[":
            i += 1
            if pattern.startswith("[", i):
                return "'[[' (a nested or POSIX class to Rust)"
            if pattern.startswith("^", i):
                i += 1
            items = 0
            while i < n:
                ch = pattern[i]
                if ch == "]" and items:
                    break
                if ch == "\\":
                    i += 2
                else:
                    if items and ch in "-&~|" and pattern.startswith(ch, i + 1):
                        return f"{ch * 2!r} (a set operation to Rust)" if ch != "|" else "'||'"
                    i += 1
                if pattern.startswith("-", i):  # a range
                    if pattern.startswith("]", i + 1):
                        break
                    if pattern.startswith("--", i):
                        return "'--' (a set operation to Rust)"
                    i += 3 if pattern.startswith("\\", i + 1) else 2
                items += 1
            i += 1
        else:
            i += 1
    return None


@functools.lru_cache(maxsize=1024)
def to_llguidance(pattern: str, ecma: bool = False) -> str:
    """`pattern` (Python's `re` syntax) as a pattern that llguidance matches exactly where
    `re.fullmatch` does (`re.search` where llguidance searches: a JSON schema's `pattern`),
    narrowed as the module's docstring says (`$`; with `ecma`, class escapes and `.`).

    Raises `Refused` (a ValueError) naming what llguidance cannot follow, and `re.error` where
    Python cannot parse the pattern."""
    # before parsing: Python's parser warns of these (a FutureWarning, in the server's log)
    leading = _LEADING_FLAGS.match(pattern)
    found = _set_syntax(pattern, leading is not None and "x" in leading[0])
    if found is not None:
        raise Refused(f"{found} in a class: Python's re reads it as plain characters (and warns that this may "
                      f"change); escape the characters to mean them")
    parsed = _p.parse(pattern)
    return _Writer(ecma).sequence(parsed, parsed.state.flags, True, True)


# Python takes global flags only at the start ((?x) for verbose); a scoped (?x:...) is not seen
# here (`_set_syntax` may then refuse a class-like comment in it)
_LEADING_FLAGS = re.compile(r"(?:\(\?[aiLmsux]+\))*")
