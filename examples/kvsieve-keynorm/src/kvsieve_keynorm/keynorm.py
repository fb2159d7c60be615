"""Key-norm scoring (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression"): keys with a small L2 norm draw high attention, so a token's score is ``-||k||``.

No queries and no attention pass are needed: the cheapest scoring there is. This module is the whole plugin;
kvsieve finds it through the entry point ``keynorm = "kvsieve_keynorm.keynorm"`` in the group ``kvsieve`` and
calls its two hooks:

* scoring policy ``keynorm`` (:class:`KeyNormScoring`);
* compressor ``keynorm`` (:class:`KeyNormCompressor`): compress the prompt once, after prefill.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

import kvsieve
from kvsieve.compressor import Compressor, LayerEvent, compress_layer, resolve_policy
from kvsieve.policy import ScoringContext, ScoringPolicy
from kvsieve.validators import budget_from, nonnegative_int, optional, positive_int, unit_ratio

__all__ = ["KeyNormCompressor", "KeyNormScoring"]


@attrs.frozen
class KeyNormScoring(ScoringPolicy):
    """Score each candidate by the negated L2 norm of its key (larger = more important). No parameters."""

    name: ClassVar[str] = "keynorm"
    needs_queries: ClassVar[bool] = False

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        slots, valid = ctx.candidate_slots()  # [B, Hkv, N] each
        B, Hkv, N = slots.shape
        keys = ctx.keys.gather(2, slots[..., None].expand(B, Hkv, N, ctx.keys.shape[-1]))
        norms = torch.linalg.vector_norm(keys.float(), dim=-1)
        return (-norms).masked_fill(~valid, 0.0)  # past a row's candidates: padding, never read as data


@attrs.frozen
class KeyNormCompressor(Compressor):
    """Keep the prompt tokens with the smallest key norms, once, after prefill; decoding appends freely.

    Args:
        ratio: fraction of the prompt kept per layer and KV head, in (0, 1]. Default 0.5 without a budget.
        budget: a constant number of prompt tokens kept (instead of ratio). Must exceed ``recent``.
        recent: the last prompt tokens, always kept. Default 8.
        selection: a selection policy (registered name or instance). Default ``"topk"``.
    """

    name: ClassVar[str] = "keynorm"
    phases: ClassVar[frozenset[str]] = frozenset({"prefill"})

    ratio: float | None = attrs.field(default=None, validator=optional(unit_ratio))
    budget: int | None = attrs.field(default=None, validator=optional(positive_int))
    recent: int = attrs.field(default=8, validator=nonnegative_int)
    selection: object = "topk"

    def __attrs_post_init__(self):
        if self.ratio is not None and self.budget is not None:
            raise ValueError(
                f"give keynorm either ratio or budget, not both (ratio={self.ratio}, budget={self.budget})"
            )
        if self.ratio is None and self.budget is None:
            object.__setattr__(self, "ratio", 0.5)
        if self.budget is not None and self.budget <= self.recent:
            raise ValueError(
                f"budget={self.budget} must exceed recent={self.recent} (recent tokens are always kept)"
            )
        object.__setattr__(self, "selection", resolve_policy(self.selection, "selection"))

    def prompt_budget(self, prompt_len: int) -> int:
        """Prompt tokens kept per layer and KV head for a (padded) prompt of ``prompt_len`` tokens."""
        return max(budget_from(self.ratio, self.budget, prompt_len), min(self.recent, prompt_len))

    def after_attention(self, event: LayerEvent) -> None:
        if event.phase != "prefill":
            return
        layer = event.layer
        budget = self.prompt_budget(layer.prompt_len)
        compress_layer(
            event,
            scoring=KeyNormScoring(),
            selection=self.selection,
            cand_starts=layer.starts,  # every real prompt token is a candidate
            region_starts=torch.zeros_like(layer.starts),  # and the left padding before them is dropped
            budget=budget,
            protect_tail=min(self.recent, budget),
        )


@kvsieve.hookimpl
def kvsieve_scoring_policies():
    return {KeyNormScoring.name: KeyNormScoring}


@kvsieve.hookimpl
def kvsieve_compressors():
    return {KeyNormCompressor.name: KeyNormCompressor}
