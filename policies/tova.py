"""TOVA, Token Omission Via Attention (Oren et al., 2024): evict the token the current query attends to least.

TOVA treats the cache as the bounded state of a multi-state RNN. Whenever a layer holds more than ``budget``
tokens it drops the one that the current token's query pays the least attention, averaged over the heads (one
decision per layer, shared by its heads). kvsieve applies it after prefill (the prompt is cut to the budget by
the last prompt token's attention) and after every decode step (:mod:`kvsieve.policies.eviction` has the
schedule); the score is :class:`~kvsieve.policies.causal_attention.CausalAttentionScoring` of the current query.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

import kvsieve
from kvsieve.compressor import LayerEvent
from kvsieve.plugins import scoring_policy
from kvsieve.policies.causal_attention import CausalAttentionScoring
from kvsieve.policies.eviction import BudgetedEviction
from kvsieve.policy import ScoringPolicy

__all__ = ["TOVA"]


@attrs.frozen(kw_only=True)
class TOVA(BudgetedEviction):
    """Keep the ``budget`` tokens the current query attends to most, after prefill and every decode step.

    Args:
        budget: tokens per layer, row and KV head, prompt and generated together. Default 512 (when no ratio).
        ratio: instead, a fraction of each row's prompt, in (0, 1].
        window: recent tokens always kept. Default 0: as in the paper, the newest token competes too (its own
            attention to itself usually keeps it); ``None``: half of the budget.
        block: evict once ``budget + block`` tokens are held, down to ``budget``. Default 1 (every step).
        scoring: a scoring policy. Default ``causal_attention`` with ``aggregation="all"`` (the current query's
            attention summed over every head: the paper's average, the same ranking); ``scoring.aggregation=group``
            ranks per KV head.
        selection: a selection policy. Default ``"topk"``.
    """

    name: ClassVar[str] = "tova"
    default_budget: ClassVar[int] = 512
    default_window: ClassVar[int] = 0

    scoring: ScoringPolicy = attrs.field(factory=lambda: CausalAttentionScoring(aggregation="all"),
                                         converter=scoring_policy)

    @property
    def query_window(self) -> int:
        return 1 if self.scoring.needs_queries else 0

    def eviction_scoring(self, event: LayerEvent) -> ScoringPolicy:
        return self.scoring


@kvsieve.hookimpl
def kvsieve_compressors():
    return {TOVA.name: TOVA}
