"""Checks behind speculative.py's numbers: is a draft's acceptance what its agreement with the
target says, and is a greedy divergence from the plain output only rounding?

`teacher_forced(draft, prompt, ids)`: the draft model's greedy token after each prefix
prompt + ids[:i] (the target's own output), through the public API (one request of one
token per prefix; the prefix cache makes each a short extend pass). `agreement` compares
them with the target's tokens; `expected_counts` turns that into the (drafted, accepted)
a greedy run drafting k tokens every round would report (greedy drafting along accepted
drafts is the draft run on the target's own tokens, so the agreement decides it).

`divergence(plain, spec)`: both runs greedy with `top_logprobs=2`; at the first position
where their tokens differ, each run's top-2 log-probabilities there (a logprob margin is
the logit margin: log_softmax shifts every logit of a position alike), and how far the
same token's logprob moved between the two runs over the positions before it (the
numeric noise between a plain step and a verify pass, measured, not assumed). With the
two runs' top two swapped, the difference of those two logits moved by the sum of the
margins: within twice that noise it is a near-tie flipped by rounding; far above, a bug.
"""

from __future__ import annotations

__all__ = ["teacher_forced", "agreement", "expected_counts", "divergence", "greedy_with_top2"]


def greedy_with_top2(model, prompt, tokens: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """A greedy run's tokens with their logprobs and top-2 (id, logprob) pairs."""
    return [(t.id, float(t.logprob), [(int(i), float(lp)) for i, lp in t.top_logprobs])
            for t in model.generate_sync(prompt, max_tokens=tokens, temperature=0.0, logprobs=True,
                                         top_logprobs=2, max_buffer=tokens + 32)]


def teacher_forced(model, prompt: list[int], ids: list[int]) -> list[int]:
    """The model's greedy next token after prompt + ids[:i], for i = 0 .. len(ids) - 1."""
    return [[t.id for t in model.generate_sync(prompt + ids[:i], max_tokens=1, temperature=0.0)][0]
            for i in range(len(ids))]


def agreement(predicted: list[int], ids: list[int]) -> list[bool]:
    return [p == t for p, t in zip(predicted, ids)]


def expected_counts(agree: list[bool], max_tokens: int, k: int) -> tuple[int, int]:
    """(drafted, accepted) of a greedy run that drafts min(k, tokens left - 1) every round
    (token 0 comes from the prefill; a round at n accepts while agree[n + j] holds)."""
    n, drafted, accepted = 1, 0, 0
    while n < max_tokens:
        kk = min(k, max_tokens - n - 1)
        if kk == 0:
            n += 1
            continue
        a = 0
        while a < kk and n + a < len(agree) and agree[n + a]:
            a += 1
        drafted, accepted = drafted + kk, accepted + a
        n += a + 1
    return drafted, accepted


def divergence(plain: list, spec: list) -> dict:
    """Where two greedy runs (greedy_with_top2) first differ, and whether it is a near-tie."""
    n = min(len(plain), len(spec))
    at = next((i for i in range(n) if plain[i][0] != spec[i][0]), None)
    moved = sorted(abs(p[1] - s[1]) for p, s in zip(plain[:n if at is None else at], spec))
    noise = {"max": moved[-1] if moved else None, "median": moved[len(moved) // 2] if moved else None,
             "positions": len(moved)}
    if at is None:
        return {"first_divergence": None, "compared": n, "logprob_noise": noise}
    (pid, _, ptop), (sid, _, stop) = plain[at], spec[at]
    p_margin = ptop[0][1] - ptop[1][1] if len(ptop) > 1 else None
    s_margin = stop[0][1] - stop[1][1] if len(stop) > 1 else None
    swapped = len(ptop) > 1 and len(stop) > 1 and ptop[1][0] == sid and stop[1][0] == pid
    # with the top two swapped, the two logits' difference moved by both margins between the
    # runs; a near-tie if that is no more than two tokens' largest move before it (each of
    # the two logits may move by as much as one token's logprob did)
    moved_by = p_margin + s_margin if swapped else None
    near_tie = bool(moved_by is not None and noise["max"] is not None and moved_by <= 2 * noise["max"])
    return {"first_divergence": at, "compared": n, "plain_token": pid, "spec_token": sid,
            "plain_top2": ptop, "spec_top2": stop, "plain_margin": p_margin, "spec_margin": s_margin,
            "top2_swapped": swapped, "margins_moved_by": moved_by, "logprob_noise": noise, "near_tie": near_tie}
