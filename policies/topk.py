"""Top-k selection: keep the highest-scoring candidates plus the protected ones, in original order."""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

import kvsieve
from kvsieve.policy import Selection, SelectionPolicy

__all__ = ["TopKSelection"]


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
        B, Hkv, N = scores.shape
        idx = torch.arange(N, device=scores.device)
        valid = idx < counts[..., None]
        tail = protect_tail[..., None] if isinstance(protect_tail, torch.Tensor) else protect_tail
        protected = valid & ((idx < protect_head) | (idx >= counts[..., None] - tail))
        ranked = scores.float().nan_to_num(nan=float("-inf"))
        ranked = ranked.masked_fill(protected, float("inf")).masked_fill(~valid, float("-inf"))
        K = N if isinstance(budget, torch.Tensor) else min(budget, N)  # per-row budgets: no host read of their max
        best = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :K]  # best first
        kept = counts.clamp(max=budget)
        ranks = torch.arange(K, device=scores.device)
        # the best `kept` of each row (protected first, then by score), back in candidate order; -1 past `kept`
        keep = best.masked_fill(ranks >= kept[..., None], N).sort(dim=-1).values
        return Selection(keep=keep.masked_fill(keep == N, -1), counts=kept)


@kvsieve.hookimpl
def kvsieve_selection_policies():
    return {TopKSelection.name: TopKSelection}
