"""Attended spans: compress the prompt's KV once, after prefill, keeping the spans the last window attends to.

SnapKV's scoring (the last ``window`` prompt tokens' attention over the prompt, softmax over every visible key in
fp32, summed over the window and the GQA group, average-pooled with kernel 7, per KV head) with span selection
(:class:`~kvsieve.policies.span.SpanSelection`, radius 3): each candidate ranks by the best pooled score within 3
tokens of it, so a high-scoring token keeps its neighbours and a key written as several tokens survives whole. On
SmolLM2-135M's passkey and needle prompts this retrieves what per-token top-k loses at 10-20% of the KV
(docs/policies/attended_spans.md). It is not a paper's method: ``snapkv`` stays SnapKV's algorithm.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

import kvsieve
from kvsieve.policies.window_attention import WindowAttentionScoring
from kvsieve.policy import ScoringPolicy
from kvsieve.prompt import PromptCompressor

__all__ = ["AttendedSpans"]


@attrs.frozen
class AttendedSpans(PromptCompressor):
    """Prompt compression by window attention and span selection (the parameters are
    :class:`~kvsieve.prompt.PromptCompressor`'s).

    Defaults: ``ratio`` 0.2; ``window`` 32; scoring ``window_attention`` (avg pooling, kernel 7, per KV head,
    ``normalization=visible``); selection ``span`` (``selection.radius=3``).
    """

    name: ClassVar[str] = "attended_spans"
    default_selection: ClassVar[str] = "span"

    def default_scoring(self) -> ScoringPolicy:
        return WindowAttentionScoring(pooling="avg", kernel=7, aggregation="group", normalization="visible")


@kvsieve.hookimpl
def kvsieve_compressors():
    return {AttendedSpans.name: AttendedSpans}
