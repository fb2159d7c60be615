"""SnapKV (Li et al., 2024): compress the prompt's KV once, after prefill, by window attention.

ALGORITHMS.md, "SnapKV": the last ``window`` prompt tokens are the observation window; their attention over the
prompt (softmax over every key each window query causally sees, in fp32) is summed over the window and the GQA
group, pooled along the tokens, and the top ``budget - window`` earlier tokens are kept per KV head, followed by
the window itself. Decoding appends without further eviction.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

import kvsieve
from kvsieve.compressor import Compressor, LayerEvent, compress_layer, resolve_policy
from kvsieve.policies.window_attention import POOLINGS, WindowAttentionScoring
from kvsieve.validators import budget_from, odd_positive_int, optional, positive_int, ratio_or_budget, unit_ratio

__all__ = ["SnapKV"]


@attrs.frozen
class SnapKV(Compressor):
    """SnapKV prompt compression.

    Args:
        ratio: fraction of the prompt kept per layer and KV head, in (0, 1]. Default 0.2 when no budget is given.
        budget: a constant number of prompt tokens kept (instead of ratio). Must exceed ``window``.
        window: observation window (last prompt tokens, always kept). Default 32 (SnapKV's; FastKV ran 8).
        kernel: odd pooling kernel. Default 7.
        pooling: ``"avg"`` (SnapKV) or ``"max"``. Default ``"avg"``.
        scoring: a scoring policy (name or instance) to use instead of window attention.
        selection: a selection policy (name or instance). Default ``"topk"``.
    """

    name: ClassVar[str] = "snapkv"
    phases: ClassVar[frozenset[str]] = frozenset({"prefill"})

    ratio: float | None = attrs.field(default=None, validator=optional(unit_ratio))
    budget: int | None = attrs.field(default=None, validator=optional(positive_int))
    window: int = attrs.field(default=32, validator=positive_int)
    kernel: int = attrs.field(default=7, validator=odd_positive_int)
    pooling: str = attrs.field(default="avg", validator=attrs.validators.in_(POOLINGS))
    scoring: object = None
    selection: object = "topk"

    def __attrs_post_init__(self):
        ratio_or_budget(self)
        if self.ratio is None and self.budget is None:
            object.__setattr__(self, "ratio", 0.2)
        if self.budget is not None and self.budget <= self.window:
            raise ValueError(f"budget={self.budget} must exceed window={self.window} (the window is always kept)")
        scoring = self.scoring or WindowAttentionScoring(self.pooling, self.kernel, "group", "visible")
        object.__setattr__(self, "scoring", resolve_policy(scoring, "scoring"))
        object.__setattr__(self, "selection", resolve_policy(self.selection, "selection"))

    @property
    def query_window(self) -> int:
        return self.window

    def prompt_budget(self, prompt_len: int) -> int:
        """Tokens kept per layer for a prompt of ``prompt_len`` tokens (never fewer than the window)."""
        return max(budget_from(self.ratio, self.budget, prompt_len), min(self.window, prompt_len))

    def after_attention(self, event: LayerEvent) -> None:
        if event.phase != "prefill":
            return
        layer = event.layer
        budget = self.prompt_budget(layer.prompt_len)
        compress_layer(
            event,
            scoring=self.scoring,
            selection=self.selection,
            cand_starts=layer.starts,
            region_starts=layer.starts.new_zeros(layer.starts.shape),
            budget=budget,
            protect_tail=min(self.window, budget),  # a prompt shorter than the window is kept whole
            queries_are_last=True,
        )


@kvsieve.hookimpl
def kvsieve_compressors():
    return {SnapKV.name: SnapKV}
