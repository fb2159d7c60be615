"""StreamingLLM (Xiao et al., 2024): attention sinks plus a sliding window of recent tokens; no scoring.

Keep the first ``sinks`` tokens and the most recent ones, ``budget`` in all (or ``ratio`` of the prompt). kvsieve
applies it after every forward (prefill included) whose cache outgrew the budget, so the cache never holds more
than the budget between steps. Prefill attention itself sees the whole prompt.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

import kvsieve
from kvsieve.budget import Budget, budget_field, ratio_field
from kvsieve.compressor import Compressor, LayerEvent, compress_layer
from kvsieve.plugins import selection_policy
from kvsieve.policy import SelectionPolicy
from kvsieve.validators import nonnegative_int

__all__ = ["StreamingLLM"]


@attrs.frozen(kw_only=True)
class StreamingLLM(Compressor):
    """Sinks + recent window.

    Args:
        budget: total cached tokens (sinks included). Default 256 when no ratio is given.
        ratio: instead of budget, a fraction of the prompt length (fixed at prefill), in (0, 1].
        sinks: initial tokens always kept. Default 4.
        selection: a selection policy (name or instance). Default ``"topk"``.
    """

    name: ClassVar[str] = "streamingllm"
    phases: ClassVar[frozenset[str]] = frozenset({"prefill", "decode"})

    ratio: float | None = ratio_field()
    budget: int | None = budget_field()
    sinks: int = attrs.field(default=4, validator=nonnegative_int)
    selection: SelectionPolicy = attrs.field(default="topk", converter=selection_policy)

    def __attrs_post_init__(self):
        if self.budget is not None and self.budget <= self.sinks:
            raise ValueError(f"budget={self.budget} must exceed sinks={self.sinks}")

    @property
    def keep(self) -> Budget:
        return Budget(self.ratio, 256 if self.ratio is None and self.budget is None else self.budget)

    @property
    def reserve(self) -> int:
        return 1  # one decode token is appended before the next compaction: no grow/shrink churn per step

    def cache_budget(self, prompt_len: int) -> int:
        """Tokens a layer holds after each compaction, for a prompt of ``prompt_len`` tokens."""
        return max(self.keep.tokens(prompt_len), self.sinks + 1)

    def peak_generated(self, prompt_len: int, prompt_slots: int, appends: int) -> int:
        # the budget, plus the token appended before the next compaction
        return min(appends, max(self.cache_budget(prompt_len) - prompt_slots, 0) + 1)

    def after_attention(self, event: LayerEvent) -> None:
        layer = event.layer
        # per row: a ratio resolves against each row's real prompt length (as if the row ran alone)
        budgets = [self.cache_budget(n) for n in layer.row_lengths]
        if layer.compactions and layer.max_live <= min(budgets):
            return
        compress_layer(
            event,
            scoring=None,
            selection=self.selection,
            cand_starts=layer.starts,
            region_starts=layer.starts.new_zeros(layer.starts.shape),
            budget=budgets,
            protect_head=self.sinks,
            protect_tail=[b - self.sinks for b in budgets],
        )


@kvsieve.hookimpl
def kvsieve_compressors():
    return {StreamingLLM.name: StreamingLLM}
