"""Speculative decoding: drafts proposed cheaply, verified by the target in one batched step.

- `draft`: the load options (`DraftSpec`) and the check that a draft model has its target's
  tokenizer.
- `prompt_lookup`: drafting by n-gram lookup in a row's own tokens (`draft="prompt_lookup"`).
- `draft_sampling`: a draft model's per-row draws (`draft_step`) and their distribution q.
- `verify`: the acceptance rule (greedy and rejection sampling) for a batch of rows, on the
  device, composed with amlx's sampling transforms (`amlx.sample`); `CompiledVerify`.
- `constrained`: a verify step's per-position constraint masks.
- `adaptive`: per-row draft length from the observed acceptance and a cost model, and the
  width of a batch's verify pass.
- `stats`: counters of drafted and accepted tokens.

docs/speculative.md describes how the scheduler uses them.
"""
