"""PromptCompressor: the base of every compressor that compresses the prompt once, after prefill.

It implements the whole schedule: once a layer's prompt has been prefilled, its scoring policy scores every prompt
token but the last ``window`` ones, its selection policy keeps the budget's worth of them, the last ``window``
tokens are always kept, the left padding of a batch is dropped, and decoding appends without eviction. A new
method is then its scoring policy and a few lines::

    @attrs.frozen
    class TOVA(PromptCompressor):
        name: ClassVar[str] = "tova"

        def default_scoring(self) -> ScoringPolicy:
            return LastQueryScoring()

Parameters every prompt compressor takes (:mod:`kvsieve.budget` has the vocabulary):

* ``ratio``: fraction of the prompt kept per layer and KV head, in (0, 1] (default: :attr:`default_ratio`);
* ``budget``: a constant number of kept prompt tokens instead;
* ``window``: the last prompt tokens, always kept; their queries are the scoring policy's selector window
  (default: :attr:`default_window`);
* ``scoring``: a scoring policy (registered name or instance; default :meth:`default_scoring`), whose own
  parameters are set as ``scoring.key=value``;
* ``selection``: a selection policy (registered name or instance; default :attr:`default_selection`), whose own
  parameters are set as ``selection.key=value``.

Subclasses may add fields of their own (attrs, keyword-only) and override :meth:`layer_budget` (e.g. a budget
per layer) or :meth:`after_attention` (e.g. FastKV's token propagation, before calling this one).
"""

from __future__ import annotations

import abc
from typing import ClassVar

import attrs

from kvsieve.budget import Budget, budget_field, ratio_field
from kvsieve.compressor import Compressor, LayerEvent
from kvsieve.plugins import scoring_policy, selection_policy
from kvsieve.policy import ScoringPolicy, SelectionPolicy
from kvsieve.prefill_graph import compress_prompt
from kvsieve.validators import nonnegative_int, positive_int

__all__ = ["PromptCompressor"]


def _window_rules(instance: PromptCompressor, attribute: attrs.Attribute, window: int) -> None:
    if instance.scoring.needs_queries:  # a window of queries to score with: at least one
        positive_int(instance, attribute, window)
    else:
        nonnegative_int(instance, attribute, window)
    if instance.budget is not None and instance.budget <= window:
        raise ValueError(f"budget={instance.budget} must exceed window={window} (the window is always kept)")


@attrs.frozen(kw_only=True)
class PromptCompressor(Compressor):
    """Compress each layer's prompt KV once, after prefill (see the module docstring).

    Class attributes a subclass may set: ``name`` (required), ``default_ratio`` (0.2), ``default_window`` (32),
    ``default_selection`` (``"topk"``),
    ``rounding`` of ``ratio * length`` (``"ceil"``).
    """

    phases: ClassVar[frozenset[str]] = frozenset({"prefill"})
    default_ratio: ClassVar[float] = 0.2
    default_window: ClassVar[int] = 32
    default_selection: ClassVar[str] = "topk"
    rounding: ClassVar[str] = "ceil"

    ratio: float | None = ratio_field()
    budget: int | None = budget_field()
    window: int = attrs.field(
        default=attrs.Factory(lambda self: self.default_window, takes_self=True),
        validator=_window_rules,
    )
    scoring: ScoringPolicy = attrs.field(
        default=attrs.Factory(lambda self: self.default_scoring(), takes_self=True), converter=scoring_policy
    )
    selection: SelectionPolicy = attrs.field(
        default=attrs.Factory(lambda self: self.default_selection, takes_self=True), converter=selection_policy
    )

    @abc.abstractmethod
    def default_scoring(self) -> ScoringPolicy:
        """The scoring policy used when none is given (``scoring=NAME`` replaces it)."""

    @property
    def keep(self) -> Budget:
        """What each layer keeps: ``ratio`` or ``budget`` (``default_ratio`` when neither was given)."""
        return Budget.of(self, self.default_ratio, self.rounding)

    @property
    def query_window(self) -> int:
        return self.window if self.scoring.needs_queries else 0

    def layer_budget(self, event: LayerEvent) -> list[int] | None:
        """Prompt tokens the layer of ``event`` keeps per row and KV head (``None``: leave it alone): the budget of
        each row's real prompt length (``layer.row_lengths``, so a padded row is compressed as it would be alone),
        never fewer than the window."""
        return [max(self.keep.tokens(n), min(self.window, n)) for n in event.layer.row_lengths]

    def after_attention(self, event: LayerEvent) -> None:
        if event.phase != "prefill":
            return
        budget = self.layer_budget(event)
        if budget is None:
            return
        # every real prompt token is a candidate, the left padding before them is dropped; on CUDA replayed from a
        # captured graph where it can be (kvsieve.prefill_graph), else compress_layer
        compress_prompt(
            event,
            scoring=self.scoring,
            selection=self.selection,
            budget=budget,
            protect_tail=[min(self.window, b) for b in budget],  # a prompt shorter than the window is kept whole
        )
