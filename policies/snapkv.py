"""SnapKV (Li et al., 2024): compress the prompt's KV once, after prefill, by window attention.

The last ``window`` prompt tokens are the observation window; their attention over the prompt (softmax over every
key each window query causally sees, in fp32) is summed over the window and the GQA group, pooled along the tokens
(avg, kernel 7), and the top ``budget - window`` earlier tokens are kept per KV head, followed by the window
itself. Decoding appends without further eviction. This is the paper's algorithm; docs/policies/snapkv.md.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

import kvsieve
from kvsieve.policies.window_attention import WindowAttentionScoring
from kvsieve.policy import ScoringPolicy
from kvsieve.prompt import PromptCompressor

__all__ = ["SnapKV"]


@attrs.frozen
class SnapKV(PromptCompressor):
    """SnapKV prompt compression (the parameters are :class:`~kvsieve.prompt.PromptCompressor`'s).

    Defaults: ``ratio`` 0.2; ``window`` 32 (SnapKV's; FastKV ran 8); scoring ``window_attention`` with avg pooling,
    kernel 7, per KV head (``scoring.aggregation=all`` shares one ranking across the layer's heads), softmax over
    every visible key (``scoring.normalization=visible``).
    """

    name: ClassVar[str] = "snapkv"

    def default_scoring(self) -> ScoringPolicy:
        return WindowAttentionScoring(pooling="avg", kernel=7, aggregation="group", normalization="visible")


@kvsieve.hookimpl
def kvsieve_compressors():
    return {SnapKV.name: SnapKV}
