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
    larger budget keeps a superset. Padding candidates (past ``counts``) are never kept.
    """

    name: ClassVar[str] = "topk"

    def select(self, scores, counts, budget, protect_head=0, protect_tail=0):
        B, Hkv, N = scores.shape
        idx = torch.arange(N, device=scores.device)
        valid = idx < counts[..., None]
        protected = valid & ((idx < protect_head) | (idx >= counts[..., None] - protect_tail))
        ranked = scores.float().nan_to_num(nan=float("-inf"))
        ranked = ranked.masked_fill(protected, float("inf")).masked_fill(~valid, float("-inf"))
        K = min(budget, N)
        best = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :K]
        keep = best.sort(dim=-1).values  # invalid picks have the largest indices: they sort to the end
        kept = counts.clamp(max=budget)
        keep = keep.masked_fill(torch.arange(K, device=scores.device) >= kept[..., None], -1)
        return Selection(keep=keep, counts=kept)


@kvsieve.hookimpl
def kvsieve_selection_policies():
    return {TopKSelection.name: TopKSelection}
