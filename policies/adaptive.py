"""Head-adaptive selection (Ada-KV, Feng et al., 2024): one layer's budget shared by its KV heads, by score.

Uniform selection keeps ``budget`` candidates in every KV head. A head whose attention is concentrated on a few
tokens needs fewer; one whose attention is spread needs more. Ada-KV keeps the same total per row but lets the heads
compete for it: after a per-head safeguard, the rest goes to the best candidates of the row, whichever head they
belong to (one top-k over the scores of every KV head of the row). The kept counts then differ per head, and the
cache really drops the rest: each (row, KV head) keeps its own live length. docs/policies/adaptive.md has the rules,
the memory this costs and the measurements.
"""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import torch

import kvsieve
from kvsieve.policies.topk import candidate_masks
from kvsieve.policy import Selection, SelectionPolicy
from kvsieve.validators import at_least, fraction, optional

__all__ = ["HeadAdaptiveSelection"]


def _floor_product(factor: float, tokens: torch.Tensor) -> torch.Tensor:
    """``int64``: ``floor(factor * tokens)``, the product rounded to 9 decimals first (0.29 * 100 gives 29, as
    :class:`kvsieve.budget.Budget` rounds)."""
    return torch.floor(torch.round(tokens.double() * factor, decimals=9)).long()


@attrs.frozen
class HeadAdaptiveSelection(SelectionPolicy):
    """Ada-KV's head-adaptive budgets: per row, the KV heads share ``sum_h min(budget, n_h)`` kept candidates.

    Per row ``b`` and KV head ``h`` with ``n_h`` valid candidates, ``P_h = min(n_h, protect_head + protect_tail)``
    protected ones and the uniform keep ``u_h = min(budget, n_h)``:

    1. **safeguard**: head ``h`` keeps its ``f_h = min(u_h, P_h + floor(alpha * (budget - protect_head -
       protect_tail)))`` best candidates (protected ones first, then by score; ties to the earlier candidate);
    2. **shared**: the row's other ``sum_h u_h - sum_h f_h`` kept candidates are the best of the rest of the row,
       over every KV head at once, by score, then the earlier candidate, then the lower head; a head never keeps
       more than ``c_h = min(n_h, floor(max_share * budget))`` (``max_share=None``: ``n_h``);
    3. padding (candidates at or past ``counts``) is never kept; a NaN score ranks as ``-inf``.

    So every row keeps the same total as uniform selection, every head keeps its protected candidates and at least
    ``f_h``, and at most ``c_h``. ``alpha=1`` is :class:`~kvsieve.policies.topk.TopKSelection` exactly. The choice
    is deterministic; it is not nested in the budget (the safeguard grows with it).

    The cache stores ``[B, Hkv, C]`` slots per layer, ``C`` at least the longest head's keep: with different keeps
    per head, the storage after prefill is ``B * Hkv * max_h(kept_h)`` slots, not the ``B * Hkv * budget`` of
    uniform selection (the live tokens are the same). ``max_share`` bounds it: at most ``max_share`` times the
    uniform storage.

    Budgets may differ per row (``per_row_budgets``): ``budget`` and ``protect_tail`` may be ``int64 [B, Hkv]``.

    Args:
        alpha: the safeguard, the fraction of the unprotected budget every head keeps by its own ranking, in
            [0, 1]. Default 0.2 (Ada-KV's ``floor_alpha``).
        max_share: the most one head keeps, as a multiple of the budget: a finite number >= 1, or None (no bound
            but the head's candidates). Default 2.0 (docs/policies/adaptive.md: the cache stays within twice the
            uniform storage).
    """

    name: ClassVar[str] = "adaptive"
    per_row_budgets: ClassVar[bool] = True
    head_adaptive: ClassVar[bool] = True

    alpha: float = attrs.field(default=0.2, validator=fraction)
    max_share: float | None = attrs.field(default=2.0, validator=optional(at_least(1, "a multiple of the budget")))

    def select(self, scores, counts, budget, protect_head=0, protect_tail=0):
        B, Hkv, N = scores.shape
        device = counts.device
        valid, protected = candidate_masks(counts, N, protect_head, protect_tail)
        ranked = scores.float().nan_to_num(nan=float("-inf"))
        ranked = ranked.masked_fill(protected, float("inf")).masked_fill(~valid, float("-inf"))
        # each head's own ranking (protected first, ties to the earlier candidate; padding last: it is -inf and
        # after every valid candidate) and each candidate's place in it
        best = torch.sort(ranked, dim=-1, descending=True, stable=True).indices  # [B, Hkv, N]
        place = torch.empty_like(best).scatter_(-1, best, torch.arange(N, device=device).expand_as(best))

        # ints become device tensors by a fill, not a host-to-device copy: the prefill graphs capture this
        budgets = budget.expand(B, Hkv) if isinstance(budget, torch.Tensor) else counts.new_full((B, Hkv), budget)
        tails = protect_tail.expand(B, Hkv) if isinstance(protect_tail, torch.Tensor) else \
            counts.new_full((B, Hkv), protect_tail)
        uniform = counts.clamp(max=budgets)  # [B, Hkv] what uniform selection keeps
        safe = torch.minimum(counts, protect_head + tails) + _floor_product(
            self.alpha, (budgets - protect_head - tails).clamp(min=0))
        floor = torch.minimum(safe, uniform)
        cap = counts if self.max_share is None else torch.minimum(counts, _floor_product(self.max_share, budgets))
        # tier 0: a head's safeguard (kept); 1: may share the rest of the row's budget; 2: never kept
        tier = torch.where(place < floor[..., None], 0, torch.where(place < cap[..., None], 1, 2))

        # one ranking per row over every head: (tier, score desc, candidate, head), laid out candidate-major so
        # that the stable sorts break ties to the earlier candidate, then the lower head
        flat_scores = ranked.transpose(1, 2).reshape(B, N * Hkv)
        flat_tier = tier.transpose(1, 2).reshape(B, N * Hkv)
        order = torch.sort(flat_scores, dim=-1, descending=True, stable=True).indices
        order = order.gather(-1, torch.sort(flat_tier.gather(-1, order), dim=-1, stable=True).indices)
        total = uniform.sum(dim=1, keepdim=True)  # [B, 1]
        first = torch.arange(N * Hkv, device=device) < total
        chosen = torch.zeros_like(first).scatter_(-1, order, first).reshape(B, N, Hkv).transpose(1, 2)

        kept = chosen.sum(dim=-1)  # [B, Hkv]
        K = N if isinstance(budget, torch.Tensor) or self.max_share is None else \
            min(N, math.floor(round(self.max_share * budget, 9)))
        index = torch.arange(N, device=device)
        keep = torch.where(chosen, index, N).sort(dim=-1).values[..., :K]  # kept candidates first, ascending
        return Selection(keep=keep.masked_fill(keep == N, -1), counts=kept)


@kvsieve.hookimpl
def kvsieve_selection_policies():
    return {HeadAdaptiveSelection.name: HeadAdaptiveSelection}
