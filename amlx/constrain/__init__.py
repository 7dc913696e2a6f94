"""Structured outputs: constrain a request's tokens to a JSON schema, a regex, a list of choices
or a Lark grammar, with llguidance (https://github.com/guidance-ai/llguidance) as the engine.

- `parse_constraint` turns the request options (`response_format`, `regex`, `choice`,
  `grammar`) into a `Constraint` (an llguidance grammar), validating them up front.
- `GrammarVocab` is llguidance's view of one checkpoint's tokenizer; it makes a `Matcher` per
  request and fills the token bitmasks of a step's constrained rows in parallel (`MaskJob`,
  `step_masks`).
- `Matcher` follows one request's tokens and says what may come next.
- `MatcherFactory` makes an engine's matchers on a background thread (never on the event loop
  or the worker).
- `masked_logits` applies a step's masks to its logits on the device, before sampling (the
  engine's sampling step does the same inside its compiled graph: `amlx.sample.sample`'s
  `masks`).
"""

from amlx.constrain.apply import masked_logits
from amlx.constrain.factory import MatcherFactory
from amlx.constrain.matcher import GrammarVocab, MaskJob, Matcher, step_masks, unpack_mask
from amlx.constrain.spec import Constraint, parse_constraint

__all__ = ["Constraint", "GrammarVocab", "MaskJob", "Matcher", "MatcherFactory", "masked_logits", "parse_constraint", "step_masks",
           "unpack_mask"]
