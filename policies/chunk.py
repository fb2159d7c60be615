"""Chunk selection: keep whole spans of consecutive candidates, ranked by an aggregate of their scores.

Per-token top-k keeps scattered tokens: a number or a name written as several tokens loses the ones that score
below the cut (SnapKV keeps "351" of the key "35169"). This policy splits each row's candidates into chunks of
``size`` consecutive tokens, ranks the chunks by the ``sum`` or ``max`` of their tokens' scores and keeps the best
chunks whole, so a span survives or goes as one (the chunk-level top-k of ChunkKV, Liu et al., 2025).
docs/policies/chunk.md has the rules and the measurements.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

import kvsieve
from kvsieve.policies.topk import candidate_masks, keep_best
from kvsieve.policy import SelectionPolicy
from kvsieve.validators import one_of, positive_int

__all__ = ["AGGREGATIONS", "ChunkSelection"]

#: how a chunk's score is made from its tokens' scores
AGGREGATIONS = ("sum", "max")


@attrs.frozen
class ChunkSelection(SelectionPolicy):
    """Keep the best chunks of ``size`` consecutive candidates per row and KV head, the protected ones always.

    The ranking, from first kept to last (the first ``min(budget, n)`` of it are kept, then sorted ascending):

    1. the protected candidates (the first ``protect_head`` and the last ``protect_tail`` valid ones);
    2. the other valid candidates, chunk by chunk, best chunk first. Chunks are aligned to the END of each row's
       candidates: chunk boundaries fall at ``n - size``, ``n - 2 * size``, ... and the first chunk of a row may
       be partial. A chunk's score is the ``sum`` (in float64) or the ``max`` of the scores of its unprotected
       candidates (protected ones are kept anyway and count against the budget, not towards a chunk's score);
       ties go to the earlier chunk. Inside a chunk, candidates rank by score, ties to the earlier one;
    3. padding (candidates at or past ``counts``): never kept.

    So whole chunks are kept while the budget allows, and a budget that does not end on a chunk boundary trims
    the last chunk it reaches, keeping that chunk's best-scoring candidates. A NaN score ranks a candidate last
    in its chunk and does not count towards the chunk's score (a chunk of NaN scores only ranks last). The
    ranking does not depend on the budget, so the choice is nested: a larger budget keeps a superset.
    ``size=1`` is :class:`~kvsieve.policies.topk.TopKSelection`.

    Budgets may differ per row (``per_row_budgets``): ``budget`` and ``protect_tail`` may be ``int64 [B, Hkv]``.

    Args:
        size: candidates per chunk. Default 16 (the best of 4, 8 and 16 on the passkey task of docs/policies/chunk.md,
            though not significantly better than 8).
        aggregation: a chunk's score from its candidates' scores, ``"sum"`` or ``"max"``. Default ``"sum"``.
    """

    name: ClassVar[str] = "chunk"
    per_row_budgets: ClassVar[bool] = True

    size: int = attrs.field(default=16, validator=positive_int)
    aggregation: str = attrs.field(default="sum", validator=one_of(*AGGREGATIONS))

    def chunk_scores(
        self, scores: torch.Tensor, chunk: torch.Tensor, scored: torch.Tensor, num_chunks: int
    ) -> torch.Tensor:
        """``float64 [B, Hkv, num_chunks + 1]``: each chunk's aggregate over the candidates where ``scored``.

        Args:
            scores: ``float32 [B, Hkv, N]`` the candidates' scores.
            chunk: ``int64 [B, Hkv, N]`` the chunk of each candidate, in ``[0, num_chunks]``.
            scored: ``bool [B, Hkv, N]`` the candidates that count (unprotected, valid, not NaN).

        A chunk without such a candidate scores ``-inf`` (so does an undefined sum, ``inf - inf``).
        """
        shape = (*scores.shape[:-1], num_chunks + 1)
        values = scores.double()
        if self.aggregation == "sum":
            total = values.new_zeros(shape).scatter_add_(-1, chunk, values.masked_fill(~scored, 0.0))
        else:
            total = values.new_full(shape, float("-inf")).scatter_reduce_(
                -1, chunk, values.masked_fill(~scored, float("-inf")), reduce="amax"
            )
        members = torch.zeros(shape, dtype=torch.long, device=scores.device).scatter_add_(-1, chunk, scored.long())
        return total.nan_to_num(nan=float("-inf")).masked_fill(members == 0, float("-inf"))

    def select(self, scores, counts, budget, protect_head=0, protect_tail=0):
        N, device = scores.shape[-1], scores.device
        valid, protected = candidate_masks(counts, N, protect_head, protect_tail)
        idx, n = torch.arange(N, device=device), counts[..., None]
        token = scores.float().nan_to_num(nan=float("-inf"))
        # chunk of each candidate, counted from the row's first (partial) chunk; padding goes to chunk M
        M = -(-N // self.size)  # the most chunks a row has
        from_end = (n - 1 - idx).clamp(min=0) // self.size
        per_row = (n + self.size - 1) // self.size  # [B, Hkv, 1] chunks of each row
        chunk = torch.where(valid, per_row - 1 - from_end, M)
        scored = valid & ~protected & ~scores.isnan()
        value = self.chunk_scores(scores, chunk, scored, M)  # [B, Hkv, M + 1]
        order = torch.sort(value, dim=-1, descending=True, stable=True).indices  # best chunk first, ties earlier
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(M + 1, device=device).expand_as(order))
        # tier of each candidate: protected first, then its chunk's rank, padding last
        tier = torch.where(protected, -1, torch.where(valid, rank.gather(-1, chunk), M + 1))
        by_score = torch.sort(token, dim=-1, descending=True, stable=True).indices
        by_tier = torch.sort(tier.gather(-1, by_score), dim=-1, stable=True).indices
        return keep_best(by_score.gather(-1, by_tier), counts, budget)  # by (tier, score descending, index)


@kvsieve.hookimpl
def kvsieve_selection_policies():
    return {ChunkSelection.name: ChunkSelection}
