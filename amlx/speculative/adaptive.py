"""Per-row draft length: draft as many tokens as pay for themselves, none when none do.

The cost model (`CostModel`), in units of one plain decode step of the target:
a verify step of k drafts per row costs `verify_cost[k]` (k + 1 tokens per row
through the target; `verify_cost[0]` = 1 is the plain step) plus k draft steps
of `draft_cost` each (a draft model's step; 0 for prompt lookup, which drafts
on the host). `CostModel.measured` builds one from timings (the engine times
its own passes, `amlx/engine/speculate.py`); `CostModel.linear` from a
per-token slope.

The benefit: if each draft is accepted with probability alpha, independently
(the usual model of Leviathan et al.), a verify step of k drafts emits
E(alpha, k) = 1 + alpha + ... + alpha^k = (1 - alpha^(k+1)) / (1 - alpha)
tokens. Drafting k tokens pays when it emits more tokens per unit of cost than
plain steps do (one per unit):

    speedup(alpha, k) = E(alpha, k) / (verify_cost[k] + k * draft_cost) > 1,

that is, the expected accepted tokens per verify step, E - 1, must exceed the
step's extra cost, verify_cost[k] + k * draft_cost - 1. The chosen length is
the k in 0..max_tokens with the largest speedup (0 when no k beats 1, times a
margin `min_gain`): it shrinks as acceptance falls and grows back as it rises.

Each row estimates its alpha from what it saw: every verify step with m drafts
and a accepted is a + 1 trials (a successes, then one failure if a < m), and the
maximum likelihood estimate for this model is successes / trials. The counts
decay by `decay` per trial (a window of about 1 / (1 - decay) trials), so the
estimate follows the text (a passage being copied, then free writing), and
start from a prior (`prior` alpha worth `prior_weight` trials). A row that
stopped drafting decays its evidence by `idle_decay` per plain step, so its
estimate drifts back to the prior and it tries again now and then: a row that
was unlucky is not excluded for good, and one that keeps failing pays one
short probe every ~log(failures) / (1 - idle_decay) steps. The prior does not
decay, so the estimate never falls below prior * prior_weight / (prior_weight
+ 1 / (1 - decay)) (0.055 with the defaults): a row that accepts nothing stops
drafting only where one draft costs more than that (a verify of 2 tokens
above 1.055 plain steps, drafting included).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["CostModel", "AdaptiveLength", "expected_tokens", "batch_width"]


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a verify step of k drafts emits when each is accepted with probability alpha."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass(frozen=True)
class CostModel:
    """Step costs relative to a plain decode step of the target (see the module's text)."""

    verify_cost: tuple[float, ...]  # [k]: a verify step of k drafts per row; [0] must be 1
    draft_cost: float = 0.0  # one draft step (a draft model's); 0 for prompt lookup

    def __post_init__(self) -> None:
        costs = self.verify_cost
        if not costs or costs[0] != 1.0:
            raise ValueError(f"verify_cost[0] is the plain step and must be 1.0, got {costs[:1]}")
        if any(not b >= a for a, b in zip(costs, costs[1:])):
            raise ValueError(f"verify_cost must not decrease with k, got {costs}")
        if not self.draft_cost >= 0.0:
            raise ValueError(f"draft_cost must be >= 0, got {self.draft_cost}")

    @classmethod
    def linear(cls, max_tokens: int, per_token: float, draft_cost: float = 0.0) -> "CostModel":
        """verify_cost[k] = 1 + per_token * k for k = 0..max_tokens."""
        return cls(tuple(1.0 + per_token * k for k in range(max_tokens + 1)), draft_cost)

    @classmethod
    def measured(cls, max_tokens: int, plain_s: float, verify_s: Callable[[int], float],
                 draft_s: float = 0.0) -> "CostModel":
        """From timings in seconds: a plain decode step `plain_s`, a verify pass with k
        drafts per row `verify_s(k)` (k = 1..max_tokens), a draft step `draft_s`.
        Costs are kept non-decreasing in k (a longer pass never costs less: a faster
        one measured is noise) and at least the plain step's."""
        if not plain_s > 0.0:
            raise ValueError(f"plain_s must be > 0, got {plain_s}")
        costs = [1.0]
        for k in range(1, max_tokens + 1):
            costs.append(max(costs[-1], verify_s(k) / plain_s))
        return cls(tuple(costs), max(0.0, draft_s / plain_s))

    @property
    def max_tokens(self) -> int:
        return len(self.verify_cost) - 1

    def step_cost(self, k: int) -> float:
        """The cost of a verify step of k drafts, drafting included."""
        return self.verify_cost[k] + k * self.draft_cost

    def speedup(self, alpha: float, k: int) -> float:
        """Tokens per unit of cost with k drafts at acceptance alpha (1.0 for k = 0)."""
        return expected_tokens(alpha, k) / self.step_cost(k)

    def best_length(self, alpha: float, max_tokens: int, min_gain: float = 1.0) -> int:
        """The k in 0..max_tokens with the largest speedup; 0 unless it exceeds min_gain."""
        best, best_speedup = 0, min_gain
        for k in range(1, min(max_tokens, self.max_tokens) + 1):
            s = self.speedup(alpha, k)
            if s > best_speedup:
                best, best_speedup = k, s
        return best


class AdaptiveLength:
    """One row's draft length, from its observed acceptance and a `CostModel`.

    Each step: draft `length` tokens (0: take a plain step), then `observe` how
    many were drafted and accepted (0 and 0 after a plain step)."""

    def __init__(self, cost: CostModel, max_tokens: int, *, prior: float = 0.6, prior_weight: float = 1.0,
                 decay: float = 0.9, idle_decay: float = 0.99, min_gain: float = 1.0) -> None:
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        if not (0.0 <= prior <= 1.0 and prior_weight > 0.0 and 0.0 < decay <= 1.0 and 0.0 < idle_decay <= 1.0):
            raise ValueError(f"need prior in [0, 1], prior_weight > 0, decay and idle_decay in (0, 1], "
                             f"got {prior}, {prior_weight}, {decay}, {idle_decay}")
        self.cost = cost
        self.max_tokens = max_tokens
        self.prior, self.prior_weight = prior, prior_weight
        self.decay, self.idle_decay = decay, idle_decay
        self.min_gain = min_gain
        self.successes = 0.0
        self.failures = 0.0
        self.length = cost.best_length(self.alpha, max_tokens, min_gain)

    @property
    def alpha(self) -> float:
        """The estimated probability that a draft is accepted."""
        w = self.prior_weight
        return (self.successes + self.prior * w) / (self.successes + self.failures + w)

    def use(self, cost: CostModel) -> int:
        """Takes another cost model (a measured one) and returns the length it gives."""
        self.cost = cost
        self.length = cost.best_length(self.alpha, self.max_tokens, self.min_gain)
        return self.length

    def observe(self, drafted: int, accepted: int) -> int:
        """Records a step (`drafted` drafts, `accepted` of them accepted) and returns
        the length for the next step."""
        if not 0 <= accepted <= drafted:
            raise ValueError(f"need 0 <= accepted <= drafted, got accepted={accepted}, drafted={drafted}")
        failed = 1 if accepted < drafted else 0
        # each trial (accepted successes, then the failure) ages the older evidence by one `decay`;
        # a plain step (no trial) ages it by `idle_decay`
        age = self.decay ** (accepted + failed) if drafted else self.idle_decay
        self.successes = age * self.successes + _recent_weight(self.decay, accepted, failed)
        self.failures = age * self.failures + failed
        self.length = self.cost.best_length(self.alpha, self.max_tokens, self.min_gain)
        return self.length


def batch_width(rows: Sequence[AdaptiveLength], cost: CostModel) -> int:
    """The drafts per row of one verify pass over `rows` (0: a plain step for all).

    A pass of width K + 1 costs every row `step_cost(K)`, also rows drafting
    fewer (they pad), so the width is the K in 0..max(row lengths) with the most
    expected tokens per cost over the batch: sum of E(alpha_b, min(length_b, K))
    over B * step_cost(K); 0 unless that beats a plain step's one per unit."""
    if not rows:
        return 0
    best, best_rate = 0, 1.0 * (1.0 + 1e-9)  # ties go to the plain step
    for k in range(1, min(max(r.length for r in rows), cost.max_tokens) + 1):
        tokens = sum(expected_tokens(r.alpha, min(r.length, k)) for r in rows)
        rate = tokens / (len(rows) * cost.step_cost(k))
        if rate > best_rate:
            best, best_rate = k, rate
    return best


def _recent_weight(decay: float, accepted: int, failed: int) -> float:
    """The decayed weight of `accepted` successive successes followed by `failed` (0 or 1) trials:
    decay**failed * (1 + decay + ... + decay**(accepted - 1))."""
    return decay ** failed * sum(decay ** i for i in range(accepted))
