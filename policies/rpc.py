"""RPC, Reasoning Path Compression (Song et al., 2025): periodic decode-time compression of generated tokens.

ALGORITHMS.md, "RPC": every ``interval`` (P) generated tokens, the generated tokens except the last ``window``
(R) are re-scored by the attention the R most recent queries pay them (softmax over those candidates only, in
fp32, summed over the queries, avg-pooled, one ranking shared by all heads) and only the best ``k * (P // c)``
survive the k-th compression; the last R tokens are always kept and the prompt is never touched. The first
compression fires once P + R generated tokens are cached, then every P tokens, so after k compressions a
layer holds ``Lp + k * (P // c) + R`` entries.
"""

from __future__ import annotations

import math
from typing import ClassVar

import attrs

import kvsieve
from kvsieve.compressor import Compressor, LayerEvent, compress_layer, resolve_policy
from kvsieve.policies.window_attention import AGGREGATIONS, POOLINGS, WindowAttentionScoring
from kvsieve.validators import compression_ratio, odd_positive_int, positive_int

__all__ = ["RPC"]


@attrs.frozen
class RPC(Compressor):
    """Reasoning Path Compression: every P generated tokens, keep 1/c of them, chosen by recent attention.

    Args:
        interval: P, generated tokens between compressions. Default 4096 (the paper also runs 1024).
        window: R, selector window: the R most recent queries score the candidates and the last R tokens are
            always kept. Default 32. Must be smaller than ``interval``.
        ratio: c, compression ratio (an int or a float >= 1). Each interval keeps ``T = floor(P / c)`` tokens,
            at least 1. Default 4.
        kernel: odd avg-pooling kernel along the tokens. Default 7.
        pooling: ``"avg"`` (RPC), ``"max"`` or ``"none"``. Default ``"avg"``.
        aggregation: ``"all"`` (one ranking per layer shared by every KV head: RPC) or ``"group"`` (per KV
            head). Default ``"all"``.
        scoring: a scoring policy (name or instance) to use instead of window attention.
        selection: a selection policy (name or instance). Default ``"topk"``.
    """

    name: ClassVar[str] = "rpc"
    phases: ClassVar[frozenset[str]] = frozenset({"decode"})

    interval: int = attrs.field(default=4096, validator=positive_int)
    window: int = attrs.field(default=32, validator=positive_int)
    ratio: int | float = attrs.field(default=4, validator=compression_ratio)
    kernel: int = attrs.field(default=7, validator=odd_positive_int)
    pooling: str = attrs.field(default="avg", validator=attrs.validators.in_(POOLINGS))
    aggregation: str = attrs.field(default="all", validator=attrs.validators.in_(AGGREGATIONS))
    scoring: object = None
    selection: object = "topk"

    def __attrs_post_init__(self):
        if self.window >= self.interval:
            raise ValueError(
                f"window={self.window} must be smaller than interval={self.interval} "
                "(R < P: the recent window is kept whole inside each interval)"
            )
        if self.keep_per_interval < 1:
            raise ValueError(
                f"ratio={self.ratio} keeps no token of an interval of {self.interval} (floor(P / c) = 0); "
                f"use a ratio in [1, {self.interval}]"
            )
        # softmax over the candidates only: the prompt and the recent window are left out of the normalisation
        default_scoring = WindowAttentionScoring(self.pooling, self.kernel, self.aggregation, "candidates")
        object.__setattr__(self, "scoring", resolve_policy(self.scoring or default_scoring, "scoring"))
        object.__setattr__(self, "selection", resolve_policy(self.selection, "selection"))

    @property
    def keep_per_interval(self) -> int:
        """``T = floor(P / c)``: generated tokens each compression adds to the kept set."""
        return math.floor(self.interval / self.ratio)

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
