"""RPC, Reasoning Path Compression (Song et al., 2025): periodic decode-time compression of generated tokens.

Every ``interval`` (P) generated tokens, the generated tokens except the last ``window`` (R) are re-scored by the
attention the R most recent queries pay them (softmax over those candidates only, in fp32, summed over the
queries, avg-pooled, one ranking shared by all heads) and only the best ``k * T`` survive the k-th compression,
``T = floor(ratio * P)`` (the paper's compression factor is ``c = 1 / ratio``: ``ratio=0.25`` is ``c = 4``); the
last R tokens are always kept and the prompt is never touched. The first compression fires once P + R generated
tokens are cached, then every P tokens, so after k compressions a layer holds ``Lp + k * T + R`` entries.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

import kvsieve
from kvsieve.budget import Budget, budget_field, ratio_field
from kvsieve.compressor import Compressor, LayerEvent, compress_layer
from kvsieve.plugins import scoring_policy, selection_policy
from kvsieve.policies.window_attention import WindowAttentionScoring
from kvsieve.policy import ScoringPolicy, SelectionPolicy
from kvsieve.validators import positive_int

__all__ = ["RPC"]


def _default_scoring() -> ScoringPolicy:
    # softmax over the candidates only: the prompt and the recent window are left out of the normalisation
    return WindowAttentionScoring(pooling="avg", kernel=7, aggregation="all", normalization="candidates")


@attrs.frozen(kw_only=True)
class RPC(Compressor):
    """Reasoning Path Compression: every P generated tokens, keep a ``ratio`` of them, chosen by recent attention.

    Args:
        interval: P, generated tokens between compressions. Default 4096 (the paper also runs 1024).
        window: R, selector window: the R most recent queries score the candidates and the last R tokens are
            always kept. Default 32. Must be smaller than ``interval``.
        ratio: the kept fraction of each interval, in (0, 1]: ``T = floor(ratio * P)`` tokens, at least 1.
            Default 0.25 (the paper's ``c = 4``).
        budget: ``T`` itself: tokens kept per interval (instead of ratio), at most ``interval``.
        scoring: a scoring policy (name or instance). Default ``window_attention`` with avg pooling, kernel 7,
            ``aggregation="all"`` (one ranking per layer shared by every KV head: RPC's) and softmax over the
            candidates; ``scoring.aggregation=group`` ranks per KV head.
        selection: a selection policy (name or instance). Default ``"topk"``.
    """

    name: ClassVar[str] = "rpc"
    phases: ClassVar[frozenset[str]] = frozenset({"decode"})

    interval: int = attrs.field(default=4096, validator=positive_int)
    window: int = attrs.field(default=32, validator=positive_int)
    ratio: float | None = ratio_field()
    budget: int | None = budget_field()
    scoring: ScoringPolicy = attrs.field(factory=_default_scoring, converter=scoring_policy)
    selection: SelectionPolicy = attrs.field(default="topk", converter=selection_policy)

    def __attrs_post_init__(self):
        if self.window >= self.interval:
            raise ValueError(
                f"window={self.window} must be smaller than interval={self.interval} "
                "(R < P: the recent window is kept whole inside each interval)"
            )
        if self.budget is not None and self.budget > self.interval:
            raise ValueError(f"budget={self.budget} keeps more than an interval holds (interval={self.interval})")
        if self.keep_per_interval < 1:
            raise ValueError(
                f"ratio={self.ratio} keeps no token of an interval of {self.interval} (floor(ratio * P) = 0); "
                f"use a ratio of at least 1/{self.interval}"
            )

    @property
    def keep(self) -> Budget:
        """Kept tokens per interval: ``ratio`` (default 0.25, rounded down) or ``budget``."""
        return Budget.of(self, default_ratio=0.25, rounding="floor")

    @property
    def keep_per_interval(self) -> int:
        """``T = floor(ratio * P)`` (or ``budget``): generated tokens each compression adds to the kept set."""
        return self.keep.tokens(self.interval)

    @property
    def query_window(self) -> int:
        return self.window

    @property
    def reserve(self) -> int:
        # exactly P tokens are appended between two compactions: the capacity is reused, not re-grown
        return self.interval

    def compressions_due(self, generated: int) -> int:
        """``k``: compressions the schedule has fired once ``generated`` tokens are cached."""
        return max(generated - self.window, 0) // self.interval

    def fires_at(self, generated: int) -> bool:
        """Whether a compression fires when the ``generated``-th generated token has been cached (P + R, then
        every P tokens)."""
        return generated >= self.interval + self.window and (generated - self.window) % self.interval == 0

    def cache_length(self, prompt_len: int, generated: int) -> int:
        """Entries a layer holds once ``generated`` tokens were cached after a prompt of ``prompt_len``:
        ``Lp + k * T + R + (tokens since the k-th compression)``, or ``Lp + generated`` before the first."""
        k = self.compressions_due(generated)
        if k == 0:
            return prompt_len + generated
        return prompt_len + k * self.keep_per_interval + generated - k * self.interval

    def held_generated(self, generated: int) -> int:
        return self.cache_length(0, generated)

    def peak_generated(self, prompt_len: int, prompt_slots: int, appends: int) -> int:
        # held_generated grows by one per token and drops only where a compression fires, so its largest value
        # over g < appends is at the step before a firing or at the last step: one per interval, not per token
        # (the default's walk over every g took 3.5 s for 28 layers at 32K tokens)
        if appends < 1:
            return 0
        last = appends - 1
        before_firing = range(self.interval + self.window - 1, last, self.interval)
        return max(self.held_generated(g) for g in (*before_firing, last)) + 1

    def after_attention(self, event: LayerEvent) -> None:
        # model.generate appends one token per decode forward, so every firing step is seen
        if event.phase != "decode" or not self.fires_at(event.generated):
            return
        k = self.compressions_due(event.generated)
        compress_layer(
            event,
            scoring=self.scoring,
            selection=self.selection,
            cand_starts=event.layer.prompt_ends(),
            budget=k * self.keep_per_interval + self.window,
            protect_tail=self.window,
        )


@kvsieve.hookimpl
def kvsieve_compressors():
    return {RPC.name: RPC}
