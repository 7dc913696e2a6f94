"""Request fields -> amlx generation options (the names of DESIGN.md).

    max_completion_tokens / max_tokens -> max_tokens   (default: the rest of the context)
    temperature, top_p, seed, top_k, min_p, repetition_penalty -> the same names
                                       (top_p 0, in OpenAI's range, as the least top_p: the top token)
    stop (str or list)                 -> stop
    presence_penalty, frequency_penalty -> the same names (passed only when not 0)
    logit_bias {"id": bias}            -> logit_bias {id: bias} (passed only when not empty)
    logprobs (chat: bool; completions: int k) -> logprobs=True, top_logprobs=k (passed when k > 0)
    response_format json_object / json_schema -> response_format (type "text" is the default)
    regex, choice, grammar (amlx extensions) -> the same names
    n                                  -> n concurrent generations, seeds seed, seed+1, ...
    echo (completions)                 -> the prompt before each choice's text, and with logprobs
                                          its tokens' log-probabilities first (Model.prompt_logprobs)

Options whose value is the neutral one are not passed, so a client that always sends
`presence_penalty: 0` works on any engine; a non-neutral value the engine lacks gets a
400 saying so (errors.from_engine), never silence.
"""

from __future__ import annotations

import re
from typing import Any

from amlx.serve.errors import APIError
from amlx.serve.schemas import ChatRequest, CompletionRequest


# top_p 0 is in OpenAI's range [0, 1], the engine's is (0, 1]: nucleus sampling keeps the
# smallest set of tokens whose probability reaches top_p, at least one, so any top_p below
# 1 / vocabulary size keeps the top token alone, as 0 means.
_LEAST_TOP_P = 1e-30


def _logit_bias(raw: dict[str, float] | None, vocab: int) -> dict[int, float] | None:
    if not raw:
        return None
    out = {}
    for key, bias in raw.items():
        # Decimal digits only: int() also reads "5_0" (50), " 5", "+5" and other scripts' digits.
        if not re.fullmatch(r"-?[0-9]+", key):
            raise APIError(400, f"logit_bias keys must be token ids (decimal integers), got {key[:100]!r}",
                           param="logit_bias", code="invalid_value")
        token = int(key) if len(key) <= 20 else -1  # (longer: outside any vocabulary; int() refuses 4300+ digits)
        if not 0 <= token < vocab:
            shown = key if len(key) <= 30 else key[:30] + "..."
            raise APIError(400, f"logit_bias token id {shown} is outside the vocabulary (0..{vocab - 1})",
                           param="logit_bias", code="invalid_value")
        if token in out:  # "05" and "5": one token twice, one bias would silently replace the other
            raise APIError(400, f"logit_bias names token id {token} twice", param="logit_bias",
                           code="invalid_value")
        out[token] = float(bias)
    return out


def _top_logprobs(req: ChatRequest | CompletionRequest) -> tuple[bool, int]:
    if isinstance(req, ChatRequest):
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return req.logprobs, req.top_logprobs or 0
    return req.logprobs is not None, req.logprobs or 0


def generation_options(req: ChatRequest | CompletionRequest, *, prompt_len: int, context: int,
                       vocab: int) -> dict[str, Any]:
    """The options of the request's first choice (see `choice_options` for the others)."""
    limit = getattr(req, "max_completion_tokens", None) or req.max_tokens
    opts: dict[str, Any] = {
        "max_tokens": limit if limit is not None else max(1, context - prompt_len),
        "temperature": req.temperature, "top_p": req.top_p or _LEAST_TOP_P, "top_k": req.top_k, "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty, "seed": req.seed,
    }
    if req.stop:
        opts["stop"] = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    if req.presence_penalty:
        opts["presence_penalty"] = req.presence_penalty
    if req.frequency_penalty:
        opts["frequency_penalty"] = req.frequency_penalty
    bias = _logit_bias(req.logit_bias, vocab)
    if bias:
        opts["logit_bias"] = bias
    logprobs, top = _top_logprobs(req)
    if logprobs:
        opts["logprobs"] = True
    if top:
        opts["top_logprobs"] = top
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type != "text":
        opts["response_format"] = fmt.model_dump(exclude_none=True)
    for name in ("regex", "choice", "grammar"):
        if getattr(req, name) is not None:
            opts[name] = getattr(req, name)
    return opts


def choice_options(opts: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Options of each of n choices: choice i samples with seed + i (when a seed is given),
    so n > 1 with a seed is reproducible and its choices differ."""
    seed = opts.get("seed")
    return [{**opts, "seed": None if seed is None else seed + i} for i in range(n)]


def check_completion_fields(req: CompletionRequest) -> None:
    if req.suffix:
        raise APIError(400, "suffix (insertion) is not supported", param="suffix", code="unsupported_parameter")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of other than n is not supported", param="best_of", code="unsupported_parameter")
