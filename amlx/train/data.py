"""Training data: JSONL records -> token ids with a loss mask -> padded batches.

One JSON object per line (blank lines are skipped), in one of three shapes:

* ``{"text": "..."}``: the whole text is learned.
* ``{"prompt": "...", "completion": "..."}``: the text is prompt + completion
  (concatenated as they are); only the completion is learned. When both are
  lists of chat messages the conversation prompt + completion is rendered with
  the chat template and only the completion's messages are learned.
* ``{"messages": [{"role": ..., "content": ...}, ...]}`` (optionally ``"tools"``):
  rendered with the tokenizer's chat template; only assistant turns (their
  content and the template's end-of-turn marker) are learned.

Other keys are ignored. Text and completion records get the tokenizer's
special-token rules (a BOS where the checkpoint adds one) and end with the EOS
token, so the model learns to stop; chat records get exactly what the template
renders. Every problem is a `DataError` (a ValueError) naming the file and line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from amlx.errors import AmlxError
from amlx.tokenizer import check_encodable

__all__ = ["DataError", "Example", "Dataset", "Batch", "load_dataset", "encode_record", "iterate_batches",
           "make_batch"]


class DataError(AmlxError, ValueError):
    """Training data that cannot be used, with the file and line."""


@dataclass
class Example:
    tokens: list[int]
    mask: list[bool]  # mask[i]: token i is learned (predicted from the tokens before it)
    line: int = 0

    @property
    def trained(self) -> int:
        return sum(self.mask[1:])


@dataclass
class Dataset:
    examples: list[Example]
    source: str

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    @property
    def tokens(self) -> int:
        return sum(len(e.tokens) for e in self.examples)


@dataclass
class Batch:
    """Host arrays of one step: inputs / targets (B, L) int32 and mask (B, L) float32
    (1 where the target is learned), plus counts."""

    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    tokens: int  # real (unpadded) input tokens
    trained: int  # targets that count in the loss


# -- records -> tokens --------------------------------------------------------

def _describe(record) -> str:
    if isinstance(record, dict):
        keys = ", ".join(sorted(map(str, record))) or "none"
        return f"an object with keys [{keys}]"
    return f"a JSON {type(record).__name__}"


_SHAPES = "expected {\"text\": ...}, {\"prompt\": ..., \"completion\": ...} or {\"messages\": [...]}"


def _eos(tokenizer) -> int | None:
    eos = tokenizer.eos_token_id
    if eos is None and tokenizer.eos_token_ids:
        eos = min(tokenizer.eos_token_ids)
    return eos


def _with_eos(tokens: list[int], mask: list[bool], tokenizer) -> None:
    eos = _eos(tokenizer)
    if eos is not None and (not tokens or tokens[-1] != eos):
        tokens.append(eos)
        mask.append(True)


def _encode_spans(tokenizer, text: str, spans: list[tuple[int, int]], add_special_tokens: bool):
    """Tokens of `text` and a mask: True for tokens overlapping a learned character span."""
    check_encodable(text)
    enc = tokenizer.backend.encode(text, add_special_tokens=add_special_tokens)
    mask: list[bool] = []
    text_seen = False
    for (s, e), special in zip(enc.offsets, enc.special_tokens_mask):
        if special and s == e == 0 and add_special_tokens:
            # a token the tokenizer adds (no characters of its own): a BOS before the text is
            # context; an EOS after it (a post-processor with "$A </s>") ends the text and is
            # learned with the text's last token, or the model never learns to stop
            mask.append(text_seen and mask[-1])
            continue
        text_seen = True
        mask.append(any(s < b and e > a for a, b in spans))
    return list(enc.ids), mask


def _check_messages(messages, key: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{key!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"{key}[{i}] is not a message ({{\"role\": ..., \"content\": ...}})")
        if not isinstance(m["role"], str) or not m["role"]:
            raise ValueError(f"{key}[{i}] has role {m['role']!r}: a role is a non-empty string "
                             f"(\"system\", \"user\", \"assistant\", ...)")
        if not isinstance(m.get("content", ""), (str, list, type(None))):
            raise ValueError(f"{key}[{i}] has content of type {type(m['content']).__name__}")
        if isinstance(m.get("content"), str):
            check_encodable(m["content"], f"{key}[{i}]'s content")
    return messages


def _marker_end(tokenizer, text: str, start: int) -> int:
    """Where the first special token's text (an end-of-turn marker) in `text` from `start`
    ends; -1 if there is none."""
    hits = []
    for token_id in tokenizer.special_token_ids:
        marker = tokenizer.id_to_token(token_id)
        k = text.find(marker, start) if marker else -1
        if k >= 0:
            hits.append((k, k + len(marker)))
    return min(hits, default=(-1, -1))[1]


def _render_chat(tokenizer, messages: list[dict], learn: Sequence[int], tools=None):
    """Tokens and mask of a conversation whose messages at indices `learn` are learned."""
    if tools is not None and not isinstance(tools, list):
        raise ValueError(f"'tools' must be a list of tool (function) definitions, not a JSON {type(tools).__name__}")
    kw = {"tools": tools} if tools else {}
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False, **kw)
    spans = []
    for i in learn:
        if i == 0:
            start = 0
        else:
            before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, **kw)
            if not full.startswith(before):
                raise ValueError("the chat template does not render this conversation incrementally (the text before "
                                 f"message {i} differs from the whole conversation's), so the turns to learn cannot be "
                                 f"located")
            start = len(before)
        upto = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False, **kw)
        if full.startswith(upto) and len(upto) > start:
            end = len(upto)
        else:
            # Templates may render the last message differently (e.g. an empty thinking
            # block): locate the message's own text and stop after it; the end-of-turn
            # token that follows is added below.
            content = messages[i].get("content")
            content = content if isinstance(content, str) else ""
            k = full.find(content, start) if content else -1
            if k >= 0:
                end = k + len(content)
            else:
                # The template rewrote the message where it is not the last one (Qwen 3 drops the
                # reasoning of earlier turns): it runs through its end-of-turn marker.
                end = _marker_end(tokenizer, full, start)
                if end < 0:
                    raise ValueError(f"message {i} cannot be located in the rendered conversation")
        spans.append((start, end))
    tokens, mask = _encode_spans(tokenizer, full, spans, add_special_tokens=False)
    stops = set(tokenizer.eos_token_ids) | set(tokenizer.special_token_ids)
    ended = False  # the learned run ends with a special token (and at most whitespace after it)
    for i in range(len(tokens) - 1):
        # the end-of-turn marker (a special token) right after a learned span is learned
        # too: the model must learn to stop. A span that ends with its marker already (and the
        # newline after it) is not extended to the next turn's start marker.
        if not mask[i]:
            ended = False
        elif tokens[i] in stops:
            ended = True
        elif ended and tokenizer.decode([tokens[i]]).strip():
            ended = False
        if mask[i] and not ended and not mask[i + 1] and tokens[i + 1] in stops:
            mask[i + 1] = True
    return tokens, mask


def encode_record(record, tokenizer) -> Example:
    """Tokens and loss mask of one record (ValueError with the reason when unusable)."""
    if not isinstance(record, dict):
        raise ValueError(f"unknown record shape: {_describe(record)}; {_SHAPES}")
    shapes = [k for k in ("text", "messages") if k in record]
    if "prompt" in record or "completion" in record:
        shapes.append("prompt/completion")
    if len(shapes) != 1:
        what = f"both {' and '.join(shapes)}" if shapes else _describe(record)
        raise ValueError(f"unknown record shape: {what}; {_SHAPES}")
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text:
            raise ValueError("'text' must be a non-empty string")
        check_encodable(text, "'text'")
        tokens, mask = _encode_spans(tokenizer, text, [(0, len(text))], add_special_tokens=True)
        _with_eos(tokens, mask, tokenizer)
        return Example(tokens, mask)
    if "messages" in record:
        messages = _check_messages(record["messages"], "messages")
        learn = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if not learn:
            raise ValueError("the conversation has no assistant message to learn")
        tools = record.get("tools")
        return Example(*_render_chat(tokenizer, messages, learn, tools))
    if "prompt" not in record or "completion" not in record:
        raise ValueError(f"a prompt/completion record needs both keys, this one has only "
                         f"{'prompt' if 'prompt' in record else 'completion'}")
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):
        messages = _check_messages(prompt, "prompt") + _check_messages(completion, "completion")
        learn = [i for i in range(len(prompt), len(messages)) if messages[i].get("role") == "assistant"]
        if not learn:
            raise ValueError("the completion has no assistant message to learn")
        return Example(*_render_chat(tokenizer, messages, learn, record.get("tools")))
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError("'prompt' and 'completion' must both be strings (or both lists of chat messages)")
    if not completion:
        raise ValueError("'completion' is empty: nothing to learn")
    check_encodable(prompt, "'prompt'")
    check_encodable(completion, "'completion'")
    text = prompt + completion
    tokens, mask = _encode_spans(tokenizer, text, [(len(prompt), len(text))], add_special_tokens=True)
    _with_eos(tokens, mask, tokenizer)
    return Example(tokens, mask)


def _finish(ex: Example, where: str, max_seq_len: int | None, truncate: bool, limit: str | None = None) -> Example:
    if max_seq_len is not None and len(ex.tokens) > max_seq_len:
        if not truncate:
            limit = limit or (f"max_seq_len={max_seq_len} (raise max_seq_len, shorten the record, or pass "
                              f"truncate=True)")
            raise DataError(f"{where}: the record has {len(ex.tokens)} tokens, more than {limit}")
        ex = Example(ex.tokens[:max_seq_len], ex.mask[:max_seq_len], ex.line)
    if len(ex.tokens) < 2 or ex.trained == 0:
        extra = " after truncation to max_seq_len" if truncate and max_seq_len is not None else ""
        raise DataError(f"{where}: the record has no token to learn{extra}")
    return ex


def _read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if lineno == 1:
                line = line.lstrip("\ufeff")  # a byte-order mark
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{lineno}: JSON nested too deeply to read") from None
            except ValueError as exc:  # e.g. an integer of more digits than Python converts
                raise DataError(f"{path}:{lineno}: unreadable JSON ({exc})") from None


def load_dataset(data, tokenizer, max_seq_len: int | None = 2048, truncate: bool = False,
                 limit: str | None = None) -> Dataset:
    """Reads and tokenises a JSONL file (or a list of record dicts).

    max_seq_len: the most tokens a record may have (None: no limit); longer
    records are an error, or cut to it with `truncate=True`; `limit` describes where
    max_seq_len came from in that error (None: the max_seq_len option). Raises DataError
    naming the file and line for malformed JSON, unknown record shapes, records
    that are too long or have nothing to learn, and files without records."""
    if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                    or max_seq_len < 2):
        raise ValueError(f"max_seq_len must be an integer >= 2 or None, not {max_seq_len!r}")
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_dir():
            raise DataError(f"{path}: is a directory; give the .jsonl file")
        source = str(path)
        records: Iterable[tuple[int, object]] = _read_jsonl(path)
        where = lambda n: f"{path}:{n}"  # noqa: E731
    elif isinstance(data, Sequence) and not isinstance(data, (bytes, bytearray)):
        source = "<records>"
        records = enumerate(data, 1)
        where = lambda n: f"record {n}"  # noqa: E731
    else:
        raise TypeError(f"data must be a path to a JSONL file or a list of records, not {type(data).__name__}")
    examples = []
    for lineno, record in records:
        try:
            ex = encode_record(record, tokenizer)
        except DataError:
            raise
        except ValueError as exc:
            raise DataError(f"{where(lineno)}: {exc}") from None
        ex.line = lineno
        examples.append(_finish(ex, where(lineno), max_seq_len, truncate, limit))
    if not examples:
        raise DataError(f"{source}: no records (the file is empty)" if source != "<records>" else
                        "no records: the dataset is empty")
    return Dataset(examples, source)


# -- batches --------------------------------------------------------------------

def make_batch(examples: Sequence[Example], pad_id: int = 0, pad_multiple: int = 8) -> Batch:
    """Pads examples to one length (the longest, rounded up to `pad_multiple`, minus one):
    inputs are tokens[:-1], targets tokens[1:], mask the targets' learn flags."""
    longest = max(len(e.tokens) for e in examples) - 1
    length = -(-longest // pad_multiple) * pad_multiple if pad_multiple > 1 else longest
    b = len(examples)
    inputs = np.full((b, length), pad_id, np.int32)
    targets = np.full((b, length), pad_id, np.int32)
    mask = np.zeros((b, length), np.float32)
    for i, e in enumerate(examples):
        n = len(e.tokens) - 1
        inputs[i, :n] = e.tokens[:-1]
        targets[i, :n] = e.tokens[1:]
        mask[i, :n] = e.mask[1:]
    return Batch(inputs, targets, mask, sum(len(e.tokens) - 1 for e in examples), int(mask.sum()))


def iterate_batches(dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0, loop: bool = True,
                    pad_id: int = 0, pad_multiple: int = 8) -> Iterator[Batch]:
    """Batches of `batch_size` examples: a fresh random order every pass (`shuffle`),
    passes repeated forever (`loop`) or once (the last batch may then be smaller)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, not {batch_size!r}")
    n = len(dataset)
    if loop and n < batch_size:
        raise DataError(f"{dataset.source}: {n} record(s) cannot fill a batch of {batch_size}; lower batch_size")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n) if shuffle else np.arange(n)
        stop = n - n % batch_size if loop else n
        for i in range(0, stop, batch_size):
            yield make_batch([dataset[int(j)] for j in order[i:i + batch_size]], pad_id, pad_multiple)
        if not loop:
            return
