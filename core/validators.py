"""attrs validators and budget arithmetic shared by compressors, with messages that name argument, value and range."""

from __future__ import annotations

import math

__all__ = [
    "at_least",
    "budget_from",
    "compression_ratio",
    "fraction",
    "nonnegative_int",
    "odd_positive_int",
    "one_of",
    "optional",
    "positive_int",
    "ratio_or_budget",
    "unit_ratio",
]


def positive_int(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


def nonnegative_int(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name} must be an integer >= 0, got {value!r}")


def odd_positive_int(instance, attribute, value) -> None:
    """A pooling kernel: odd, so stride-1 pooling with ``k // 2`` padding keeps the length."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(f"{attribute.name} must be a positive odd integer (pooling keeps the length), got {value!r}")


def compression_ratio(instance, attribute, value) -> None:
    """A compression ratio ``c >= 1`` (keep ``1/c``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 1:
        raise ValueError(f"{attribute.name} must be a finite number >= 1 (1 keeps everything), got {value!r}")


def unit_ratio(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{attribute.name} must be a ratio in (0, 1], got {value!r}")


def fraction(instance, attribute, value) -> None:
    """A fraction in [0, 1] (0 and 1 included)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{attribute.name} must be a number in [0, 1], got {value!r}")


def at_least(bound: float, meaning: str = ""):
    """A finite number >= ``bound``; ``meaning`` (e.g. "a multiple of the budget") goes in the error."""

    def check(instance, attribute, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                or value < bound:
            note = f" ({meaning})" if meaning else ""
            raise ValueError(f"{attribute.name} must be a finite number >= {bound:g}{note}, got {value!r}")

    return check


def one_of(*options: str):
    """A choice among ``options``: the error lists them (attrs' own ``in_`` prints a raw tuple)."""

    def check(instance, attribute, value) -> None:
        if value not in options:
            raise ValueError(
                f"{attribute.name} must be one of {', '.join(map(repr, options))}, got {value!r}"
            )

    return check


def optional(validator):
    """Run ``validator`` unless the value is None."""

    def check(instance, attribute, value) -> None:
        if value is not None:
            validator(instance, attribute, value)

    return check


def ratio_or_budget(compressor) -> None:
    """Refuse a compressor given both ``ratio`` and ``budget`` (they are alternatives); call from its post-init."""
    if compressor.ratio is not None and compressor.budget is not None:
        raise ValueError(
            f"give {compressor.name} either ratio or budget, not both "
            f"(ratio={compressor.ratio}, budget={compressor.budget})"
        )


def budget_from(ratio: float | None, budget: int | None, length: int) -> int:
    """Tokens to keep out of ``length``: the explicit ``budget``, else ``ceil(ratio * length)``."""
    if budget is not None:
        return budget
    return math.ceil(ratio * length)
