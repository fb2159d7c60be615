"""Top-k selection: keep the highest-scoring candidates plus the protected ones, in original order."""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

import kvsieve
from kvsieve.policy import Selection, SelectionPolicy

__all__ = ["TopKSelection", "candidate_masks", "keep_best"]


@attrs.frozen
class TopKSelection(SelectionPolicy):
    """Keep the ``budget`` best candidates per row and KV head; protected ones rank above everything.

    Ties are broken towards the earlier candidate (a stable sort), so the choice is deterministic and nested: a
    larger budget keeps a superset. Padding candidates (past ``counts``) are never kept. Budgets may differ per row
    (``per_row_budgets``).
    """

    name: ClassVar[str] = "topk"
    per_row_budgets: ClassVar[bool] = True

    def select(self, scores, counts, budget, protect_head=0, protect_tail=0):
        valid, protected = candidate_masks(counts, scores.shape[-1], protect_head, protect_tail)
        ranked = scores.float().nan_to_num(nan=float("-inf"))
        ranked = ranked.masked_fill(protected, float("inf")).masked_fill(~valid, float("-inf"))
        best = torch.sort(ranked, dim=-1, descending=True, stable=True).indices  # best first
        return keep_best(best, counts, budget)


def candidate_masks(
    counts: torch.Tensor, N: int, protect_head: int, protect_tail: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(valid, protected)``, both ``bool [B, Hkv, N]``: candidate ``i`` exists (``i < counts``), and it is one of
    the first ``protect_head`` or the last ``protect_tail`` (an int or ``int64 [B, Hkv]``) valid candidates."""
    idx = torch.arange(N, device=counts.device)
    n = counts[..., None]
    valid = idx < n
    tail = protect_tail[..., None] if isinstance(protect_tail, torch.Tensor) else protect_tail
    return valid, valid & ((idx < protect_head) | (idx >= n - tail))


def keep_best(best: torch.Tensor, counts: torch.Tensor, budget: int | torch.Tensor) -> Selection:
    """The :class:`~kvsieve.policy.Selection` of the first ``min(budget, counts)`` candidates of a ranking.

    Args:
        best: ``int64 [B, Hkv, N]`` a permutation of the candidates per row and KV head, best first (protected
            ones first, padding last).
        counts: ``int64 [B, Hkv]`` valid candidates.
        budget: an int, or ``int64 [B, Hkv]`` per-row budgets.

    Returns ``keep`` ``int64 [B, Hkv, K]`` (``K = min(budget, N)``, or ``N`` for tensor budgets, so that their
    maximum is not read on the host) sorted ascending with -1 past ``counts.clamp(max=budget)``.
    """
    N = best.shape[-1]
    K = N if isinstance(budget, torch.Tensor) else min(budget, N)
    kept = counts.clamp(max=budget)
    ranks = torch.arange(K, device=best.device)
    # the best `kept` of each row, back in candidate order; -1 past `kept`
    keep = best[..., :K].masked_fill(ranks >= kept[..., None], N).sort(dim=-1).values
    return Selection(keep=keep.masked_fill(keep == N, -1), counts=kept)


@kvsieve.hookimpl
def kvsieve_selection_policies():
    return {TopKSelection.name: TopKSelection}
