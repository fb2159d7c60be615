"""PyramidKV (Cai et al., 2024): SnapKV's selection with a budget per layer that shrinks from the bottom up.

Lower layers attend broadly and upper layers to a few tokens, so PyramidKV gives lower layers more of the prompt and
upper layers less, the average over layers equal to the uniform budget. The scored part of each layer's budget (what
it keeps beyond the always-kept window) follows an arithmetic sequence: the top layer keeps ``1 / beta`` of the
uniform scored part, the bottom layer twice the uniform less that, the layers between on the straight line. Scoring
and selection are SnapKV's (:mod:`kvsieve.policies.snapkv`). docs/policies/pyramidkv.md.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import ClassVar

import attrs

import kvsieve
from kvsieve.compressor import LayerEvent
from kvsieve.policies.window_attention import WindowAttentionScoring
from kvsieve.policy import ScoringPolicy
from kvsieve.prompt import PromptCompressor
from kvsieve.validators import at_least

__all__ = ["PyramidKV", "pyramid_budgets"]


def pyramid_budgets(uniform: int, length: int, window: int, num_layers: int, beta: float) -> list[int]:
    """Tokens each of ``num_layers`` layers keeps out of a prompt of ``length`` tokens, PyramidKV's schedule.

    Args:
        uniform: what every layer would keep with a uniform budget (the window included, at least the window).
        length: the row's prompt tokens.
        window: the last tokens, always kept (at most ``length``).
        num_layers: decoder layers.
        beta: the top layer keeps ``1 / beta`` of the uniform scored part ``uniform - window``.

    Returns ``[num_layers]`` budgets: ``window + s_l``, where ``s_l`` runs on a straight line from ``s_0 = 2 * base -
    base / beta`` down to ``s_{L-1} = base / beta`` (``base = uniform - window``); when ``s_0`` would exceed the
    ``length - window`` candidates it is that, and ``s_{L-1} = 2 * base - s_0``. Rounded by largest remainder (ties
    to the lower layer), so the sum over layers is exactly ``num_layers * uniform``, the budgets never increase
    from one layer to the next, and none leaves ``[window, length]``. ``uniform >= length``: every layer keeps
    ``uniform`` (nothing is evicted).
    """
    if uniform >= length or num_layers == 1:
        return [uniform] * num_layers
    base = uniform - window
    top = Fraction(base) / Fraction(beta)
    bottom = 2 * base - top
    if bottom > length - window:
        bottom = Fraction(length - window)
        top = 2 * base - bottom
    step = (bottom - top) / (num_layers - 1)
    exact = [bottom - layer * step for layer in range(num_layers)]
    floors = [math.floor(x) for x in exact]
    spare = num_layers * base - sum(floors)  # < the layers with a fractional part: only those get one more
    extra = sorted(range(num_layers), key=lambda layer: (-(exact[layer] - floors[layer]), layer))[:spare]
    for layer in extra:
        floors[layer] += 1
    return [window + s for s in floors]


@attrs.frozen(kw_only=True)
class PyramidKV(PromptCompressor):
    """PyramidKV prompt compression: SnapKV per layer, with the layer budgets of :func:`pyramid_budgets`.

    The parameters are :class:`~kvsieve.prompt.PromptCompressor`'s (``ratio`` and ``budget`` give the average over
    layers), and:

    Args:
        beta: the pyramid's steepness: the top layer keeps ``1 / beta`` of the average scored part (what a layer
            keeps beyond the window), the bottom layer ``2 - 1 / beta`` of it. A finite number >= 1; 1 is uniform
            (SnapKV). Default 20 (the paper's).

    Defaults otherwise SnapKV's: ``ratio`` 0.2, ``window`` 32, scoring ``window_attention`` (avg pooling, kernel 7,
    per KV head, softmax over every visible key), selection ``topk``.
    """

    name: ClassVar[str] = "pyramidkv"

    beta: float = attrs.field(default=20, validator=at_least(1, "1 keeps the uniform budget in every layer"))

    def default_scoring(self) -> ScoringPolicy:
        return WindowAttentionScoring(pooling="avg", kernel=7, aggregation="group", normalization="visible")

    def layer_budget(self, event: LayerEvent) -> list[int] | None:
        uniform = super().layer_budget(event)
        lengths = event.layer.row_lengths
        return [
            pyramid_budgets(u, n, min(self.window, n), event.num_layers, self.beta)[event.layer_idx]
            for u, n in zip(uniform, lengths, strict=True)
        ]


@kvsieve.hookimpl
def kvsieve_compressors():
    return {PyramidKV.name: PyramidKV}
