"""Speculative decoding: drafts proposed cheaply, verified by the target in one batched step.

- `prompt_lookup`: drafting by n-gram lookup in a row's own tokens (`draft="prompt_lookup"`).
- `verify`: the acceptance rule (greedy and rejection sampling) for a batch of rows, on the
  device, composed with amlx's sampling transforms (`amlx.sample`).
- `adaptive`: per-row draft length from the observed acceptance and a cost model.
- `draft`: load-time checks that a draft model fits its target (same tokenizer).
- `stats`: counters of drafted and accepted tokens.

docs/speculative.md describes how the scheduler uses them.
"""
