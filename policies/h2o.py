"""H2O, Heavy-Hitter Oracle (Zhang et al., 2023): keep the tokens that received the most attention so far.

Every cached token carries its *accumulated attention*: the sum, over every query that has attended to it (the
prompt's queries at prefill, then one query per decode step), of the attention weight that query put on it, each
query's softmax running over the cache as it then was. Per layer, H2O keeps the ``budget`` tokens of highest
accumulated attention (the heavy hitters) plus the most recent ``window`` ones: after prefill the prompt is cut to
the budget by the prompt's accumulated attention, and while decoding each step's attention is added and, once the
cache is over budget, the lowest is evicted (:mod:`kvsieve.policies.eviction` has the schedule).

kvsieve never stores an attention matrix: each step's weights come from the backend's ``window_lse`` and
``window_scores`` (:func:`~kvsieve.policies.causal_attention.causal_attention`), and the accumulated attention
lives in a per-slot side buffer of the layer (:meth:`~kvsieve.cache.SieveLayer.slot_buffer`), which compaction
moves with the tokens.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

import kvsieve
from kvsieve.compressor import LayerEvent
from kvsieve.parallel import LOCAL
from kvsieve.policies.causal_attention import AGGREGATIONS, aggregate, causal_attention
from kvsieve.policies.eviction import BudgetedEviction, SlotScores
from kvsieve.policy import ScoringPolicy
from kvsieve.validators import one_of

__all__ = ["H2O"]


@attrs.frozen(kw_only=True)
class H2O(BudgetedEviction):
    """Heavy hitters by accumulated attention, plus a recent window, in a cache of ``budget`` tokens per layer.

    Args:
        ratio: the budget as a fraction of each row's prompt, in (0, 1]. Default 0.2 (the paper's 20% cache).
        budget: the budget in tokens per layer, row and KV head, prompt and generated tokens together.
        window: recent tokens always kept. Default ``None``: half of the budget (the paper's even split between
            heavy hitters and recent tokens).
        block: evict once ``budget + block`` tokens are held, down to ``budget``. Default 1 (every step).
        aggregation: ``"group"`` (each KV head keeps its own heavy hitters; the attention of its GQA group is
            summed: the paper's per-head H2O) or ``"all"`` (summed over every head: one set per layer).
        selection: a selection policy. Default ``"topk"``.
    """

    name: ClassVar[str] = "h2o"
    default_ratio: ClassVar[float] = 0.2

    aggregation: str = attrs.field(default="group", validator=one_of(*AGGREGATIONS))

    def observe(self, event: LayerEvent) -> None:
        """Add the attention this forward's queries paid every live token to the layer's accumulated attention."""
        layer = event.layer
        if event.phase == "prefill":
            if event.queries is None:
                raise RuntimeError("h2o scores the prompt with every prompt query: its prefill event must carry the "
                                   "forward's queries (LayerEvent.queries)")
            queries = event.queries  # [B, H, Lp, d]: the prompt's accumulated attention
        else:
            queries = event.window_queries()  # [B, H, 1, d]: this step's query (eager and fast path alike)
        N = layer.capacity  # a bound on the live length, known on the host: the entries past it are 0
        step = causal_attention(queries, layer.keys, layer.starts, layer.ends, layer.starts, layer.ends,
                                event.scale, event.backend, N)
        slots = (layer.starts[..., None] + torch.arange(N, device=step.device)).clamp(max=N - 1)
        heads = event.engine.heads if event.engine is not None else LOCAL  # "all" spans tensor-parallel ranks
        layer.slot_buffer(self.name).scatter_add_(2, slots, aggregate(step, self.aggregation, heads))

    def eviction_scoring(self, event: LayerEvent) -> ScoringPolicy:
        return SlotScores(event.layer.slot_buffer(self.name))


@kvsieve.hookimpl
def kvsieve_compressors():
    return {H2O.name: H2O}
