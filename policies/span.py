"""Span selection: keep the neighbourhood of every high-scoring candidate, so a number or a name survives whole.

Per-token top-k keeps scattered tokens: a key written as several tokens keeps the ones that score above the cut
and loses the rest (SnapKV keeps "351" of "35169"), and the token right after a key (its full stop), which tells
the model where the key ends, goes too. Chunk selection keeps fixed, aligned blocks instead, and a block boundary
can still cut a key in two. Span selection dilates the ranking: each candidate ranks by the best score within
``radius`` candidates of it, so the ``radius`` neighbours on each side of a peak rank with the peak, wherever it
falls. docs/policies/span.md has the rules and the measurements.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
import torch.nn.functional as F

import kvsieve
from kvsieve.policies.topk import candidate_masks, keep_best
from kvsieve.policy import SelectionPolicy
from kvsieve.validators import nonnegative_int

__all__ = ["SpanSelection", "dilate_scores"]


def dilate_scores(scores: torch.Tensor, radius: int) -> torch.Tensor:
    """``float32 [B, Hkv, N]``: each candidate's best score within ``radius`` candidates of it (1-D max filter,
    ``-inf`` outside the row). ``scores``: ``float32 [B, Hkv, N]``, ``-inf`` where a candidate must not lend its
    score to its neighbours."""
    if radius == 0 or scores.shape[-1] == 0:
        return scores
    B, Hkv, N = scores.shape
    flat = scores.reshape(B * Hkv, 1, N)
    return F.max_pool1d(flat, 2 * radius + 1, stride=1, padding=radius).reshape(B, Hkv, N)


@attrs.frozen
class SpanSelection(SelectionPolicy):
    """Keep the best candidates per row and KV head ranked by their neighbourhood's best score; protected ones
    always.

    The ranking, from first kept to last (the first ``min(budget, n)`` of it are kept, then sorted ascending):

    1. the protected candidates (the first ``protect_head`` and the last ``protect_tail`` valid ones);
    2. the other valid candidates by their *span score*, the highest score among the unprotected valid candidates
       at most ``radius`` positions away (itself included), best first; ties by their own score, best first, then
       the earlier candidate. Protected candidates lend no score: they are kept anyway, and dilating the window's
       scores would spend the budget next to it;
    3. padding (candidates at or past ``counts``): never kept.

    A peak and its ``radius`` neighbours on each side therefore share the peak's span score, and the budget goes to
    whole spans around the best candidates, nearest the peak first when it runs out inside a span. A NaN score counts
    as ``-inf``. The ranking does not depend on the budget, so the choice is nested: a larger budget keeps a
    superset. ``radius=0`` is :class:`~kvsieve.policies.topk.TopKSelection`.

    Budgets may differ per row (``per_row_budgets``): ``budget`` and ``protect_tail`` may be ``int64 [B, Hkv]``.

    Args:
        radius: neighbours on each side that rank with a candidate. Default 3 (a 7-token span: docs/policies/span.md
            measures 2, 3 and 4).
    """

    name: ClassVar[str] = "span"
    per_row_budgets: ClassVar[bool] = True

    radius: int = attrs.field(default=3, validator=nonnegative_int)

    def select(self, scores, counts, budget, protect_head=0, protect_tail=0):
        valid, protected = candidate_masks(counts, scores.shape[-1], protect_head, protect_tail)
        own = scores.float().nan_to_num(nan=float("-inf")).masked_fill(~valid, float("-inf"))
        span = dilate_scores(own.masked_fill(protected, float("-inf")), self.radius)
        span = span.masked_fill(protected, float("inf")).masked_fill(~valid, float("-inf"))
        by_own = torch.sort(own, dim=-1, descending=True, stable=True).indices  # ties: the earlier candidate
        by_span = torch.sort(span.gather(-1, by_own), dim=-1, descending=True, stable=True).indices
        return keep_best(by_own.gather(-1, by_span), counts, budget)  # by (span, own score, index)


@kvsieve.hookimpl
def kvsieve_selection_policies():
    return {SpanSelection.name: SpanSelection}
