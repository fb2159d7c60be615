"""Window-attention scoring: how much attention the most recent queries pay to each candidate.

Shared by SnapKV, FastKV and RPC (docs/policies/window_attention.md):

1. ``A = softmax(Q_win K^T / sqrt(d))`` in fp32, normalised over the candidates only (``"candidates"``, RPC) or
   over every key each window query causally sees (``"visible"``, SnapKV/FastKV; needs the window queries to be
   the last live tokens, i.e. prefill);
2. summed over the window queries and the GQA group (one backend call, no ``[B, H, W, L]`` tensor needed);
3. 1-D pooling along the token axis (kernel ``k``, stride 1, zero padding ``k // 2``): ``avg``, ``max`` or none;
4. aggregation over heads: ``group`` (per KV head) or ``all`` (one ranking shared by every KV head of the layer).
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
import torch.nn.functional as F

import kvsieve
from kvsieve.policy import ScoringContext, ScoringPolicy
from kvsieve.validators import odd_positive_int, one_of

__all__ = ["WindowAttentionScoring", "pool_scores"]

POOLINGS = ("avg", "max", "none")
AGGREGATIONS = ("group", "all")
NORMALIZATIONS = ("candidates", "visible")


def pool_scores(scores: torch.Tensor, pooling: str, kernel: int) -> torch.Tensor:
    """1-D pooling of ``[B, Hkv, N]`` scores along ``N`` (stride 1, zero padding ``kernel // 2``)."""
    if pooling == "none" or kernel == 1 or scores.shape[-1] == 0:
        return scores
    B, Hkv, N = scores.shape
    flat = scores.reshape(B * Hkv, 1, N)
    if pooling == "avg":
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    else:  # scores are >= 0, so max pooling's -inf padding equals zero padding
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    return pooled.reshape(B, Hkv, N)


@attrs.frozen
class WindowAttentionScoring(ScoringPolicy):
    """Attention mass from the selector window, pooled and aggregated.

    Args:
        pooling: ``"avg"`` (RPC, SnapKV), ``"max"`` (FastKV) or ``"none"``. Default ``"avg"``.
        kernel: odd pooling kernel size. Default 7.
        aggregation: ``"group"`` (per KV head, GQA-aware sum) or ``"all"`` (sum over every head: one ranking
            per layer, RPC's default). Default ``"group"``.
        normalization: ``"candidates"`` (softmax over the candidates only) or ``"visible"`` (over every key the
            window query causally sees; prefill only). Default ``"candidates"``.
    """

    name: ClassVar[str] = "window_attention"

    pooling: str = attrs.field(default="avg", validator=one_of(*POOLINGS))
    kernel: int = attrs.field(default=7, validator=odd_positive_int)
    aggregation: str = attrs.field(default="group", validator=one_of(*AGGREGATIONS))
    normalization: str = attrs.field(default="candidates", validator=one_of(*NORMALIZATIONS))

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        lse = None
        if self.normalization == "visible":
            if not ctx.queries_are_last:
                raise ValueError(
                    "normalization='visible' needs the window queries to be the last live tokens (prefill); "
                    "use normalization='candidates' for decode-time compression"
                )
            lse = ctx.backend.window_lse(ctx.queries, ctx.keys, ctx.starts, ctx.ends, ctx.scale)
        scores = pool_scores(ctx.window_scores(lse), self.pooling, self.kernel)
        if self.aggregation == "all":  # over every head of the layer, across tensor-parallel ranks too
            scores = ctx.sum_over_heads(scores).expand_as(scores)
        return scores


@kvsieve.hookimpl
def kvsieve_scoring_policies():
    return {WindowAttentionScoring.name: WindowAttentionScoring}
