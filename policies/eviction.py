"""Budgeted eviction: the schedule of H2O and TOVA, which hold each layer's whole cache to a budget.

A :class:`BudgetedEviction` compressor keeps at most ``budget`` tokens per layer, row and KV head, prompt and
generated tokens alike (the classic setting of both papers; RPC's budget covers the generated tokens only). After
prefill, a layer whose prompt is longer keeps ``budget`` of it; while decoding, once a row holds
``budget + block`` tokens, its lowest-scoring ones are evicted down to ``budget``. The last ``window`` tokens are
always kept. A subclass supplies the scores (:meth:`BudgetedEviction.eviction_scoring`) and may watch every
event first (:meth:`BudgetedEviction.observe`: H2O accumulates attention there).

``block=1`` evicts one token per step once the cache is full (the papers' algorithm); a larger ``block`` runs
one compaction every ``block`` steps instead, evicting ``block`` tokens at once, at the price of holding up to
``budget + block`` tokens and ranking the tokens of a block together.

The schedule is known on the host: a row of ``L`` real prompt tokens holds ``min(L, budget)`` after prefill and
one more per step until an eviction, so deciding when to compact reads nothing from the device, and the fast
path's static cache is sized from it (:meth:`BudgetedEviction.peak_generated`). In a left-padded batch each row
has its own budget (a ``ratio`` resolves against its own prompt) and is evicted when it alone would be.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import attrs
import torch

from kvsieve.budget import Budget, budget_field, ratio_field
from kvsieve.compressor import Compressor, LayerEvent, compress_layer
from kvsieve.plugins import selection_policy
from kvsieve.policy import ScoringContext, ScoringPolicy, SelectionPolicy
from kvsieve.validators import nonnegative_int, optional, positive_int

__all__ = ["BudgetedEviction", "SlotScores"]


@attrs.frozen(eq=False)
class SlotScores(ScoringPolicy):
    """Scores read from a per-slot side buffer (:meth:`kvsieve.cache.SieveLayer.slot_buffer`): a statistic the
    compressor keeps for every cached token, such as H2O's accumulated attention. Not registered: a compressor
    builds one around its layer's buffer for each compaction.

    Args:
        buffer: ``[B, Hkv, C]`` the layer's side buffer.
    """

    name: ClassVar[str] = "slot_scores"
    needs_queries: ClassVar[bool] = False

    buffer: torch.Tensor

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        slots, valid = ctx.candidate_slots()
        return self.buffer.gather(2, slots).float().masked_fill(~valid, 0.0)


@attrs.frozen(kw_only=True)
class BudgetedEviction(Compressor):
    """Hold each layer's cache to a budget of tokens, evicting the lowest-scoring ones (module docstring).

    Class attributes a subclass sets: ``name``, ``default_ratio`` or ``default_budget`` (what applies when
    neither is given) and ``default_window`` (``None``: half of each row's budget).

    Args:
        ratio: the budget as a fraction of each row's real prompt length, in (0, 1], fixed at prefill.
        budget: the budget in tokens (per layer, row and KV head, the window included).
        window: the most recent tokens, always kept; ``None``: half of the budget (H2O's even split between heavy
            hitters and recent tokens). Must be smaller than ``budget``; with ``ratio``, a row's budget is never
            below ``window + 1``.
        block: tokens over the budget that trigger an eviction (down to the budget). Default 1: evict every step.
        selection: a selection policy (name or instance). Default ``"topk"``.
    """

    phases: ClassVar[frozenset[str]] = frozenset({"prefill", "decode"})
    default_ratio: ClassVar[float | None] = None
    default_budget: ClassVar[int | None] = None
    default_window: ClassVar[int | None] = None

    window: int | None = attrs.field(
        default=attrs.Factory(lambda self: self.default_window, takes_self=True), validator=optional(nonnegative_int)
    )
    ratio: float | None = ratio_field()
    budget: int | None = budget_field()
    block: int = attrs.field(default=1, validator=positive_int)
    selection: SelectionPolicy = attrs.field(default="topk", converter=selection_policy)

    def __attrs_post_init__(self):
        if self.budget is not None and self.window is not None and self.budget <= self.window:
            raise ValueError(f"budget={self.budget} must exceed window={self.window} (the window is always kept)")

    # ------------------------------------------------------------------ what a subclass supplies
    @abc.abstractmethod
    def eviction_scoring(self, event: LayerEvent) -> ScoringPolicy:
        """The scoring policy that ranks the layer's tokens when ``event`` evicts (larger is kept)."""

    def observe(self, event: LayerEvent) -> None:
        """Called with every event before the schedule runs (default: nothing)."""

    # ------------------------------------------------------------------ the budget
    @property
    def keep(self) -> Budget:
        """The budget: ``ratio`` or ``budget``, else the class defaults."""
        if self.ratio is None and self.budget is None:
            return Budget(self.default_ratio, self.default_budget)
        return Budget(self.ratio, self.budget)

    def cache_budget(self, length: int) -> int:
        """Tokens a row holds after an eviction, for a prompt of ``length`` real tokens (at least ``window + 1``)."""
        return max(self.keep.tokens(length), 1 if self.window is None else self.window + 1)

    def row_window(self, budget: int) -> int:
        """The always-kept recent tokens of a row whose budget is ``budget``."""
        return budget // 2 if self.window is None else self.window

    def held(self, length: int, generated: int) -> int:
        """Tokens a row of ``length`` real prompt tokens holds once ``generated`` tokens were appended (after the
        eviction that step may run): ``min(length, budget)`` after prefill, one more per step, and back to
        ``budget`` whenever ``budget + block`` are reached."""
        budget = self.cache_budget(length)
        start = min(length, budget)
        over = start + generated - budget
        return start + generated if over < self.block else budget + over % self.block

    @property
    def query_window(self) -> int:
        return 1  # the current token's query (the prompt's last one at prefill)

    @property
    def reserve(self) -> int:
        return self.block  # appended before the next eviction: the capacity is reused, not regrown

    def held_generated(self, generated: int) -> None:
        return None  # the budget covers the prompt too: what a layer holds depends on the prompt

    def peak_generated(self, prompt_len: int, prompt_slots: int, appends: int) -> int:
        # Before the first eviction the slots grow from prompt_slots; it fires by the time the longest row reaches
        # budget + block, and after it no row holds more than its budget + block. At least `block` past
        # prompt_slots: another part may have left more than the budget after prefill (a composition).
        peak = max(self.cache_budget(prompt_len) + self.block - prompt_slots, self.block)
        return min(appends, peak)

    # ------------------------------------------------------------------ the schedule
    def after_attention(self, event: LayerEvent) -> None:
        self.observe(event)
        layer = event.layer
        budgets = [self.cache_budget(n) for n in layer.row_lengths]
        if event.phase == "prefill":
            counts = list(layer.row_lengths)
            evicts = [n > b for n, b in zip(counts, budgets, strict=True)]
        else:  # what each row holds now, before this step's eviction (one token per decode step)
            counts = [self.held(n, event.generated - 1) + 1 for n in layer.row_lengths]
            evicts = [n >= b + self.block for n, b in zip(counts, budgets, strict=True)]
        if not any(evicts):
            return
        # a row that does not evict now keeps its tokens (as it would alone); the left padding is dropped
        kept = [b if e else n for n, b, e in zip(counts, budgets, evicts, strict=True)]
        compress_layer(
            event,
            scoring=self.eviction_scoring(event),
            selection=self.selection,
            cand_starts=layer.starts,
            region_starts=layer.starts.new_zeros(layer.starts.shape),
            budget=kept,
            protect_tail=[min(self.row_window(b), k) for b, k in zip(budgets, kept, strict=True)],
            queries_are_last=True,
        )
