"""StreamingLLM (Xiao et al., 2024): attention sinks plus a sliding window of recent tokens; no scoring.

ALGORITHMS.md, "StreamingLLM": keep the first ``sinks`` tokens and the most recent ones, ``budget`` in all.
kvsieve applies it after every forward (prefill included) whose cache outgrew the budget, so the cache never
holds more than ``budget`` tokens between steps. Prefill attention itself sees the whole prompt.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

import kvsieve
from kvsieve.compressor import Compressor, LayerEvent, compress_layer, resolve_policy
from kvsieve.validators import budget_from, nonnegative_int, optional, positive_int, ratio_or_budget, unit_ratio

__all__ = ["StreamingLLM"]


@attrs.frozen
class StreamingLLM(Compressor):
    """Sinks + recent window.

    Args:
        budget: total cached tokens (sinks included). Default 256 when no ratio is given.
        ratio: instead of budget, a fraction of the prompt length (fixed at prefill), in (0, 1].
        sinks: initial tokens always kept. Default 4.
    """

    name: ClassVar[str] = "streamingllm"
    phases: ClassVar[frozenset[str]] = frozenset({"prefill", "decode"})

    budget: int | None = attrs.field(default=None, validator=optional(positive_int))
    ratio: float | None = attrs.field(default=None, validator=optional(unit_ratio))
    sinks: int = attrs.field(default=4, validator=nonnegative_int)
    selection: object = "topk"

    def __attrs_post_init__(self):
        ratio_or_budget(self)
        if self.ratio is None and self.budget is None:
            object.__setattr__(self, "budget", 256)
        if self.budget is not None and self.budget <= self.sinks:
            raise ValueError(f"budget={self.budget} must exceed sinks={self.sinks}")
        object.__setattr__(self, "selection", resolve_policy(self.selection, "selection"))

    @property
    def reserve(self) -> int:
        return 1  # one decode token is appended before the next compaction: no grow/shrink churn per step

    def cache_budget(self, prompt_len: int) -> int:
        return max(budget_from(self.ratio, self.budget, prompt_len), self.sinks + 1)

    def after_attention(self, event: LayerEvent) -> None:
        layer = event.layer
        budget = self.cache_budget(layer.prompt_len)
        if layer.max_live <= budget and layer.compactions:
            return
        compress_layer(
            event,
            scoring=None,
            selection=self.selection,
            cand_starts=layer.starts,
            region_starts=layer.starts.new_zeros(layer.starts.shape),
            budget=budget,
            protect_head=self.sinks,
            protect_tail=budget - self.sinks,
        )


@kvsieve.hookimpl
def kvsieve_compressors():
    return {StreamingLLM.name: StreamingLLM}
