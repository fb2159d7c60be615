"""One budget vocabulary for every compressor: ``ratio`` (the kept fraction, in (0, 1]) or ``budget`` (kept tokens).

Every compressor, built-in or third party, says how much it keeps with the same two parameters:

* ``ratio``: the fraction kept of what is being compressed (the prompt for SnapKV-style compressors, each
  interval of generated tokens for RPC), in (0, 1]. ``ratio=0.25`` keeps a quarter: RPC's compression factor
  ``c = 4``. (kvpress's ``compression_ratio`` is the fraction *removed*: ``1 - ratio``.)
* ``budget``: a fixed number of kept tokens instead.

:func:`ratio_field` and :func:`budget_field` declare the two attrs fields (the ``budget`` validator refuses both
at once), and :class:`Budget` resolves them against a length::

    @attrs.frozen
    class MyCompressor(Compressor):
        ratio: float | None = ratio_field()
        budget: int | None = budget_field()

        def keep(self, length):
            return Budget.of(self, default_ratio=0.2).tokens(length)

:class:`kvsieve.prompt.PromptCompressor` already has both fields; most compressors need nothing from here.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from kvsieve.validators import one_of, optional, positive_int

__all__ = ["Budget", "budget_field", "ratio_field"]

_ROUNDINGS = ("ceil", "floor")


def _kept_fraction(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(
            f"{attribute.name} must be the kept fraction, in (0, 1] (0.25 keeps a quarter: a compression factor c "
            f"is ratio=1/c), got {value!r}"
        )


def _not_both(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    ratio = getattr(instance, "ratio", None)
    if value is not None and ratio is not None:
        name = getattr(instance, "name", "") or type(instance).__name__
        raise ValueError(f"give {name} either ratio or budget, not both (ratio={ratio}, budget={value})")


def ratio_field(default: float | None = None) -> Any:
    """The ``ratio`` attrs field: kept fraction in (0, 1], or None (then ``budget`` or a default applies)."""
    return attrs.field(default=default, validator=_kept_fraction, kw_only=True)


def budget_field() -> Any:
    """The ``budget`` attrs field: kept tokens (a positive integer) or None. Declare it after ``ratio``: its
    validator refuses a compressor given both."""
    return attrs.field(default=None, validator=[optional(positive_int), _not_both], kw_only=True)


@attrs.frozen
class Budget:
    """How much a compression keeps: ``ratio`` of a length, or ``budget`` tokens (exactly one of the two).

    Args:
        ratio: kept fraction in (0, 1].
        budget: kept tokens, a positive integer.
        rounding: how ``ratio * length`` becomes a token count: ``"ceil"`` (default) or ``"floor"`` (the
            rounding of a paper's reference code where it matters). The product is rounded to 9 decimals
            first, so 0.7 * 10 keeps 7, not 8.
    """

    ratio: float | None = attrs.field(default=None, validator=_kept_fraction)
    budget: int | None = attrs.field(default=None, validator=[optional(positive_int), _not_both])
    rounding: str = attrs.field(default="ceil", validator=one_of(*_ROUNDINGS))

    def __attrs_post_init__(self):
        if self.ratio is None and self.budget is None:
            raise ValueError("a budget needs ratio (kept fraction in (0, 1]) or budget (kept tokens)")

    @classmethod
    def of(cls, compressor: Any, default_ratio: float, rounding: str = "ceil") -> Budget:
        """The budget of an object with ``ratio`` and ``budget`` attributes; ``default_ratio`` when it has
        neither."""
        ratio, budget = compressor.ratio, compressor.budget
        if ratio is None and budget is None:
            ratio = default_ratio
        return cls(ratio, budget, rounding)

    def tokens(self, length: int) -> int:
        """Tokens kept out of ``length``: ``budget``, or ``ratio * length`` rounded (never more than ``length``
        for a ratio; a fixed ``budget`` is returned as given)."""
        if self.budget is not None:
            return self.budget
        exact = round(self.ratio * length, 9)
        return math.ceil(exact) if self.rounding == "ceil" else math.floor(exact)
