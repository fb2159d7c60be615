"""The two policy kinds a compressor is built from: scoring (what matters) and selection (what to keep).

A :class:`ScoringPolicy` turns a :class:`ScoringContext` into importance scores; a :class:`SelectionPolicy` turns
scores, a budget and the protected set into sorted kept indices. Both work on *candidates*: a contiguous range of
live cache slots per (row, KV head), chosen by the compressor (RPC: the generated tokens; SnapKV: the whole
prompt). Slots outside the candidate range are untouched by a compression.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar

import attrs
import torch

from kvsieve.parallel import LOCAL, HeadGroup

if TYPE_CHECKING:
    from kvsieve.backend import KVBackend

__all__ = ["ScoringContext", "ScoringPolicy", "Selection", "SelectionPolicy"]


@attrs.frozen
class ScoringContext:
    """Everything a scoring policy may look at for one layer.

    Attributes:
        queries: ``[B, H, W, d]`` post-RoPE queries of the ``W`` most recent tokens (the selector window; ``W`` may
            be 0 for compressors that need no queries). Their order is unspecified except when
            ``queries_are_last`` is True, in which case query ``w`` belongs to slot ``ends - W + w``.
        keys, values: ``[B, Hkv, C, d]`` the layer's cache buffers (post-RoPE keys).
        starts, ends: ``int64 [B, Hkv]`` the live slot range (slots before ``starts`` are left padding).
        cand_starts, cand_ends: ``int64 [B, Hkv]`` the candidate slot range, inside ``[starts, ends)``.
        positions: ``int64 [B, Hkv, C]`` logical index of the token held by each slot (see ``SieveLayer``; -1 free).
        layer_idx: index of the decoder layer.
        scale: the attention softmax scale of the model.
        backend: the kernel backend to ask for heavy primitives.
        queries_are_last: whether the window queries are those of the last ``W`` live slots (prefill), so a
            policy may normalise over every key they causally see.
        candidate_count: ``N = max(cand_ends - cand_starts)`` when the caller knows it on the host (``None``:
            read from the device when needed). Must be exact.
        heads: the KV heads a score may span (:mod:`kvsieve.parallel`): under tensor parallelism this rank holds
            only some; :meth:`sum_over_heads` reduces over all of them.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor
    cand_starts: torch.Tensor
    cand_ends: torch.Tensor
    positions: torch.Tensor
    layer_idx: int
    scale: float
    backend: KVBackend
    queries_are_last: bool = False
    candidate_count: int | None = None
    heads: HeadGroup = LOCAL

    @property
    def cand_counts(self) -> torch.Tensor:
        """``int64 [B, Hkv]`` number of candidates per row and KV head."""
        return (self.cand_ends - self.cand_starts).clamp(min=0)

    @property
    def num_candidates(self) -> int:
        """``N``: the candidate axis length of score tensors (max candidate count); ``candidate_count`` when the
        caller gave it, else read from the device."""
        if self.candidate_count is not None:
            return self.candidate_count
        counts = self.cand_counts
        return int(counts.max()) if counts.numel() else 0

    def window_scores(self, lse: torch.Tensor | None = None, queries: torch.Tensor | None = None) -> torch.Tensor:
        """``float32 [B, Hkv, N]``: :meth:`KVBackend.window_scores` of ``queries`` (default: the context's) over
        the context's candidates, passing ``candidate_count`` on so that the backend reads nothing on the host."""
        from kvsieve.backend import call_window_scores

        return call_window_scores(self.backend, self.queries if queries is None else queries, self.keys,
                                  self.cand_starts, self.cand_ends, self.scale, lse, self.candidate_count)

    def sum_over_heads(self, scores: torch.Tensor) -> torch.Tensor:
        """``[B, 1, N]``: ``scores`` ``[B, Hkv, N]`` summed over every KV head of the layer, across the ranks of a
        tensor-parallel group too (:mod:`kvsieve.parallel`). Any ranking shared by heads must use this, not
        ``scores.sum(dim=1)``, so that every rank keeps the tokens one device would."""
        return self.heads.sum_over_heads(scores)

    def candidate_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slots, valid)``, both ``[B, Hkv, N]``: the cache slot of candidate ``n`` (clamped into the buffer)
        and whether candidate ``n`` exists for that row and head."""
        offsets = torch.arange(self.num_candidates, device=self.keys.device)
        slots = (self.cand_starts[..., None] + offsets).clamp(max=max(self.keys.shape[2] - 1, 0))
        return slots, offsets < self.cand_counts[..., None]


class ScoringPolicy(abc.ABC):
    """Importance of each candidate slot. Subclasses are attrs classes whose fields are their parameters.

    Contract (checked by :mod:`kvsieve.testing`): output ``float32 [B, Hkv, N]`` with
    ``N = ctx.num_candidates``; finite on valid candidates; values past a row's candidate count are ignored by
    selection; independent of the contents of padding slots and of slots outside ``[starts, ends)``.
    Larger means more important.
    """

    name: ClassVar[str] = ""
    #: Whether :meth:`score` reads ``ctx.queries`` (the cache then keeps a selector window of queries).
    needs_queries: ClassVar[bool] = True

    @abc.abstractmethod
    def score(self, ctx: ScoringContext) -> torch.Tensor:
        """Return ``float32 [B, Hkv, N]`` importance scores for the candidates of ``ctx``."""


@attrs.frozen
class Selection:
    """Kept candidates, per row and KV head.

    Attributes:
        keep: ``int64 [B, Hkv, K]`` candidate indices (0-based within the candidate range), sorted ascending and
            unique in the first ``counts[b, j]`` entries; entries past ``counts`` are -1.
        counts: ``int64 [B, Hkv]`` how many entries of ``keep`` are real.
    """

    keep: torch.Tensor
    counts: torch.Tensor


class SelectionPolicy(abc.ABC):
    """Which candidates to keep, given their scores, a budget and the protected set.

    Contract (checked by :mod:`kvsieve.testing`, and at run time where the selection enters the cache): for each
    row and KV head with ``n`` valid candidates it keeps exactly ``min(budget, n)`` of them, unique and sorted, all
    inside ``[0, n)``; the first ``protect_head`` and the last ``protect_tail`` valid candidates are always kept
    (the compressor guarantees ``protect_head + protect_tail <= budget``); deterministic.

    Head-adaptive budgets: a policy that sets ``head_adaptive = True`` shares each row's budget among its KV heads
    instead (Ada-KV, :mod:`kvsieve.policies.adaptive`). Its contract is per row: the row keeps
    ``sum_h min(budget, n_h)`` candidates in all, as uniform selection does, but a KV head may keep any number
    from its protected candidates (``min(n_h, protect_head + protect_tail)``, all of them kept) to its ``n_h``
    candidates; the rest of the contract is unchanged. The cache stores each (row, KV head)'s own count, so the
    storage of a layer after a compaction follows its longest head.

    Per-row budgets: in a padded batch, a budget given as a ratio differs per row (each row is compressed as it
    would be alone). A policy that sets ``per_row_budgets = True`` receives ``budget`` and ``protect_tail`` as
    ``int64 [B, Hkv]`` tensors then; otherwise kvsieve calls it once per row with integers.
    """

    name: ClassVar[str] = ""
    #: Whether :meth:`select` accepts ``budget`` and ``protect_tail`` as ``int64 [B, Hkv]`` tensors.
    per_row_budgets: ClassVar[bool] = False
    #: Whether the KV heads of a row share its budget (the row total is ``sum_h min(budget, n_h)``, a head's keep
    #: varies): see the class docstring.
    head_adaptive: ClassVar[bool] = False

    @abc.abstractmethod
    def select(
        self,
        scores: torch.Tensor,
        counts: torch.Tensor,
        budget: int | torch.Tensor,
        protect_head: int = 0,
        protect_tail: int | torch.Tensor = 0,
    ) -> Selection:
        """Choose kept candidates.

        Args:
            scores: ``float32 [B, Hkv, N]``; entries at or past ``counts`` are padding and never kept.
            counts: ``int64 [B, Hkv]`` valid candidates per row and KV head (``<= N``).
            budget: how many candidates to keep per row and KV head (fewer when fewer exist; for a
                ``head_adaptive`` policy, the per-head share of the row's total); an ``int64 [B, Hkv]`` tensor only
                for a policy with ``per_row_budgets``.
            protect_head: the first ``protect_head`` valid candidates are always kept (e.g. attention sinks).
            protect_tail: the last ``protect_tail`` valid candidates are always kept (e.g. the recent window); a
                tensor like ``budget``.
        """
