"""The schedule model of ``kvsieve bench decode``: which cache lengths a run's decode steps see, when its
compressions fire, and the run's time as the sum of interpolated step times and compression costs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvsieve.compressor import Compressor

__all__ = [
    "decode_schedule",
    "full_cache_decode_seconds",
    "held_generated",
    "interpolate",
    "modelled_decode_seconds",
    "sample_points",
]


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear ``y(x)`` through the points ``(xs, ys)`` (``xs`` increasing), constant beyond the ends."""
    if not xs:
        raise ValueError("interpolate needs at least one point")
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return ys[-1]


def held_generated(compressor: Compressor, generated: int) -> int:
    """Generated entries a layer holds once ``generated`` tokens are cached (after a compression at that step)."""
    held = compressor.held_generated(generated)
    if held is None:
        raise ValueError(
            f"kvsieve bench models decode-time compressors through Compressor.held_generated(generated); "
            f"{compressor.name!r} does not say how much it holds"
        )
    return held


def decode_schedule(compressor: Compressor, new_tokens: int) -> tuple[list[int], list[tuple[int, int]]]:
    """What the fast path's decode steps see when generating ``new_tokens`` tokens.

    Step ``t`` (``t = 0 .. new_tokens - 2``) appends generated token ``t + 1`` and attends over the prompt plus
    ``held(t) + 1`` generated entries; a compression runs after it when ``held(t + 1) < held(t) + 1``.

    Returns:
        ``(live, compressions)``: ``live[t] = held(t) + 1`` generated entries per step, and per compression
        ``(firing generated count g, generated entries just before it = held(g - 1) + 1)``.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    held = [held_generated(compressor, g) for g in range(new_tokens)]
    live = [h + 1 for h in held[:-1]]
    compressions = [(g, held[g - 1] + 1) for g in range(1, new_tokens) if held[g] < held[g - 1] + 1]
    return live, compressions


def modelled_decode_seconds(
    live: Sequence[int], compressions: Sequence[tuple[int, int]], step_at: Callable[[int], float],
    compression_at: Callable[[int], float],
) -> float:
    """``sum_t step_at(live[t]) + sum_k compression_at(k)`` (``k`` = 1, 2, ... the compression's rank)."""
    return sum(step_at(n) for n in live) + sum(compression_at(k) for k in range(1, len(compressions) + 1))


def full_cache_decode_seconds(prompt_len: int, new_tokens: int, step_at: Callable[[int], float]) -> float:
    """The decode time of a run that keeps every entry (HF's loops): its ``new_tokens - 1`` steps attend over
    ``prompt_len + 1``, ..., ``prompt_len + new_tokens - 1`` cached entries; ``step_at(entries)`` is a step's time."""
    live = [prompt_len + g for g in range(1, new_tokens)]
    return modelled_decode_seconds(live, [], step_at, lambda k: 0.0)


def sample_points(lo: int, hi: int, count: int) -> list[int]:
    """``count`` whole numbers spread evenly over ``[lo, hi]`` (both ends included, duplicates merged); ``[hi]`` when
    the range is empty or ``count <= 1``."""
    if hi <= lo or count <= 1:
        return [hi]
    return sorted({round(lo + (hi - lo) * i / (count - 1)) for i in range(count)})


