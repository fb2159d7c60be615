"""Compressors: the schedule that decides when, where and with what budget a layer's cache is compressed.

A compressor is built from a :class:`~kvsieve.policy.ScoringPolicy` and a
:class:`~kvsieve.policy.SelectionPolicy`. The :class:`~kvsieve.engine.Engine` calls
:meth:`Compressor.after_attention` once per layer and forward pass, after the layer's new K/V were appended and
its attention was computed (on the fast path, decode events run between graph replays); the compressor decides
whether to compress and calls :func:`compress_layer`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import torch

from kvsieve.budget import Budget
from kvsieve.contracts import ContractGuard, checks_enabled
from kvsieve.indexing import ints_to_device
from kvsieve.parallel import LOCAL, HeadGroup
from kvsieve.policy import ScoringContext, ScoringPolicy, Selection, SelectionPolicy

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from kvsieve.backend import KVBackend
    from kvsieve.cache import SieveLayer
    from kvsieve.engine import Engine

__all__ = [
    "Compressor",
    "LayerEvent",
    "compress_layer",
    "score_and_select",
    "select_checked",
    "select_rows",
]


@attrs.frozen
class LayerEvent:
    """One layer's state right after its attention ran (made by the :class:`~kvsieve.engine.Engine`).

    Attributes:
        phase: ``"prefill"`` (the forward into an empty cache) or ``"decode"``.
        layer: the layer's cache (:class:`~kvsieve.cache.SieveLayer`).
        layer_idx: index of the decoder layer; ``num_layers`` the model's count.
        engine: the :class:`~kvsieve.engine.Engine` running the model (token propagation and observers use it).
        backend: the kernel backend in use.
        scale: the attention softmax scale.
        generated: tokens appended after the prompt so far (0 during prefill).
        query_window: how many of the layer's recent queries this compressor scores with (0: all the layer
            keeps). A composition whose parts use different windows narrows it per part.
        reserve: slots of headroom a compaction keeps allocated (what is appended before the next one).
        queries: ``[B, H, Q, d]`` the forward's own post-RoPE queries (query ``i`` is the token at slot
            ``ends - Q + i``), for an event the forward itself delivers (prefill, eager decode); ``None`` for the
            fast path's decode events, which run between replayed steps (use :meth:`window_queries`).
    """

    phase: str
    layer: SieveLayer
    layer_idx: int
    num_layers: int
    engine: Engine | None
    backend: KVBackend
    scale: float
    generated: int
    query_window: int = 0
    reserve: int = 0
    queries: torch.Tensor | None = attrs.field(default=None, eq=False, repr=False)

    def window_queries(self) -> torch.Tensor:
        """``[B, H, W, d]`` the most recent ``query_window`` queries of the layer, oldest first."""
        queries = self.layer.window_queries()
        return queries[:, :, -self.query_window :] if self.query_window else queries


class Compressor(abc.ABC):
    """Base class of compressors. Subclasses are ``@attrs.frozen`` classes whose fields are their parameters.

    Class attributes:
        name: the registered name.
        phases: when it acts: a subset of ``{"prefill", "decode"}``.
        propagates: whether it changes which tokens later layers compute on (token-selective propagation).

    A compressor that only acts on the prompt should subclass :class:`kvsieve.prompt.PromptCompressor`, which
    implements the whole schedule.
    """

    name: ClassVar[str] = ""
    phases: ClassVar[frozenset[str]] = frozenset()
    propagates: ClassVar[bool] = False

    @property
    def query_window(self) -> int:
        """How many recent post-RoPE queries each layer must remember for this compressor's scoring."""
        return 0

    @property
    def reserve(self) -> int:
        """Slots of headroom a layer keeps allocated after a compaction (what will be appended before the next)."""
        return 0

    def check_model(self, config: PretrainedConfig) -> None:
        """Raise ``ValueError`` if this compressor cannot run on a model with ``config`` (before any work)."""
        return None

    def check_prompt(self, prompt_len: int) -> None:
        """Raise ``ValueError`` if this compressor cannot handle a prompt of ``prompt_len`` tokens."""
        return None

    def install(self, engine: Engine) -> list[Any]:
        """Attach model-level machinery to ``engine.model`` (e.g. decoder-layer hooks for token propagation);
        return removable handles."""
        return []

    def held_generated(self, generated: int) -> int | None:
        """Generated entries one layer holds once ``generated`` tokens were appended after the prompt (after a
        compaction that fires at that step). A compressor that does not act during decode holds them all; one
        that does overrides this when the count does not depend on the prompt (RPC), else returns ``None``."""
        return generated if "decode" not in self.phases else None

    def peak_generated(self, prompt_len: int, prompt_slots: int, appends: int) -> int | None:
        """The most slots past the prefilled ``prompt_slots`` one layer holds while ``appends`` tokens are
        appended after a prompt of ``prompt_len`` tokens, one per decode step, counted just before a compaction
        (what the fast path's static cache must hold). Default: from :meth:`held_generated` (the most entries
        held, plus the token appended before the next compaction runs); ``None``: unknown, the fast path then
        needs an explicit ``static_capacity``."""
        if "decode" not in self.phases:
            return appends
        held = [self.held_generated(g) for g in range(appends)]
        return None if None in held else max(held, default=-1) + 1

    @abc.abstractmethod
    def after_attention(self, event: LayerEvent) -> None:
        """Compress ``event.layer`` if the schedule says so (usually through :func:`compress_layer`)."""

    def config(self) -> dict[str, Any]:
        """The full resolved configuration, JSON-friendly (policies as ``{"name": ..., parameters}``)."""
        out = {"name": self.name, **_fields(self)}
        keep = getattr(self, "keep", None)
        if isinstance(keep, Budget):  # the budget as resolved (a default ratio when neither was given)
            out["ratio"], out["budget"] = keep.ratio, keep.budget
        return out


def _fields(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in attrs.fields(type(obj)):
        value = getattr(obj, field.name)
        if isinstance(value, ScoringPolicy | SelectionPolicy):
            value = {"name": value.name, **(_fields(value) if attrs.has(type(value)) else {})}
        out[field.name] = value
    return out


def compress_layer(
    event: LayerEvent,
    *,
    scoring: ScoringPolicy | None,
    selection: SelectionPolicy,
    cand_starts: torch.Tensor,
    budget: int | Sequence[int],
    protect_head: int = 0,
    protect_tail: int | Sequence[int] = 0,
    region_starts: torch.Tensor | None = None,
    queries_are_last: bool = False,
) -> None:
    """Score the candidates ``[cand_starts, ends)`` of a layer, keep ``budget`` of them, compact the cache.

    Args:
        event: the layer event.
        scoring, selection: the policies (``scoring`` may be None when the protected candidates fill the budget).
        cand_starts: ``int64 [B, Hkv]`` first candidate slot; candidates run to the live end.
        budget: candidates kept per row and KV head (protected ones included): one for every row, or one per row
            (a padded batch whose ratio resolves against each row's real length).
        protect_head, protect_tail: the first / last candidates always kept (``protect_tail`` also per row). The
            protected tail is left out of scoring: the scoring context's candidates end ``protect_tail`` slots
            before the live end.
        region_starts: ``int64 [B, Hkv]`` where the compacted region begins (default ``cand_starts``); slots in
            ``[region_starts, cand_starts)`` must hold only padding, which is dropped.
        queries_are_last: the layer's window queries are those of the last live slots (prefill).
    """
    layer = event.layer
    rows = cand_starts.shape[0]
    budgets, tails = _per_row(budget, rows, "budget"), _per_row(protect_tail, rows, "protect_tail")
    for b, t in zip(budgets, tails, strict=True):
        if protect_head + t > b:
            raise ValueError(f"budget={b} is smaller than the protected tokens (head {protect_head} + tail {t})")
    engine = event.engine
    guard = engine.guard if engine is not None else ContractGuard(checks_enabled(), immediate=True)
    observed = engine is not None and engine.observed
    before = layer.max_live if observed else 0
    ends = layer.ends
    counts = (ends - cand_starts).clamp(min=0)
    # one host read for both facts and the pending contract faults (each read waits for the GPU: prefill runs this
    # in every layer)
    padding = (region_starts != cand_starts).any() if region_starts is not None else counts.new_zeros((), dtype=bool)
    N, padding_to_drop = guard.read(counts.max(), padding)
    if N <= min(budgets) and not padding_to_drop:
        return  # nothing to evict
    uniform = len(set(budgets)) == 1 and len(set(tails)) == 1
    budget_arg = budgets[0] if uniform else _row_tensor(budgets, counts)
    tail_arg = tails[0] if uniform else _row_tensor(tails, counts)
    scored = _scores_needed(scoring, budgets, tails, protect_head)
    queries = event.window_queries() if scored and scoring.needs_queries else layer.keys.new_zeros(0)
    keep_slots, kept, dest = score_and_select(
        event, guard, layer, queries, scoring=scoring, selection=selection, cand_starts=cand_starts, counts=counts,
        N=N, budgets=budgets, tails=tails, protect_head=protect_head, budget_arg=budget_arg, tail_arg=tail_arg,
        region_starts=region_starts, queries_are_last=queries_are_last,
    )
    layer.compact(event.backend, keep_slots, kept, dest, reserve=event.reserve)
    if observed:
        event.engine.notify_compressed(event, before=before, after=layer.max_live)


def score_and_select(
    event: LayerEvent,
    guard: ContractGuard,
    layer: Any,
    queries: torch.Tensor,
    *,
    scoring: ScoringPolicy | None,
    selection: SelectionPolicy,
    cand_starts: torch.Tensor,
    counts: torch.Tensor,
    N: int,
    budgets: list[int],
    tails: list[int],
    protect_head: int,
    budget_arg: int | torch.Tensor,
    tail_arg: int | torch.Tensor,
    region_starts: torch.Tensor | None,
    queries_are_last: bool,
    context_type: type[ScoringContext] = ScoringContext,
    scored_count: int | None = None,
    check_cache: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The device part of :func:`compress_layer`, after its host checks: score, select, check; no host read.

    Shared by the eager path and the prefill graphs (:mod:`kvsieve.prefill_graph`), which call it on static
    copies of a layer's tensors, so that both issue the same kernels in the same order.

    Args:
        event: the layer event (its ``layer_idx``, ``scale``, ``backend`` and ``engine`` are read, not its layer).
        guard: where plugin output is checked.
        layer: what holds ``keys``, ``values`` (``[B, Hkv, C, d]``), ``starts``, ``ends`` (``int64 [B, Hkv]``) and
            ``positions`` (``int64 [B, Hkv, C]``): the layer itself, or static copies of its tensors.
        queries: ``[B, H, W, d]`` the window queries (a 0-element tensor when the scoring reads none).
        counts: ``int64 [B, Hkv]`` candidates per row and KV head (``ends - cand_starts``, at least 0); ``N`` their
            maximum, known on the host.
        budget_arg, tail_arg: ``budgets`` and ``tails`` as the selection takes them: ints when every row has the
            same, else ``int64 [B, Hkv]`` (made before a capture: a host-to-device copy cannot be captured).
        context_type: the class of the scoring context (a subclass when the caller watches what a policy reads).
        scored_count: the scored candidates' count ``max(cand_ends - cand_starts)`` when the tails differ per row
            and the caller knows it on the host (else the backend reads it).
        check_cache: fingerprint the cache before and after the scoring call (with the checks on); the prefill
            graphs leave it out of the work they capture (:mod:`kvsieve.prefill_graph`).
        The rest as :func:`compress_layer`.

    Returns:
        ``(keep_slots, kept, dest)``: ``int64 [B, Hkv, K]`` absolute kept slots (sorted; ``kept`` real),
        ``int64 [B, Hkv]`` their count, and ``int64 [B, Hkv]`` where the compacted region begins.
    """
    engine = event.engine
    ends = layer.ends
    if not _scores_needed(scoring, budgets, tails, protect_head):
        scores = torch.zeros(*counts.shape, N, device=counts.device)  # all kept is protected: no scores
    else:
        # the protected tail is not scored: candidates for scoring end before it (RPC: softmax over [Lp, L-R))
        ctx = context_type(
            queries=queries,
            keys=layer.keys,
            values=layer.values,
            starts=layer.starts,
            ends=ends,
            cand_starts=cand_starts,
            cand_ends=torch.maximum(ends - tail_arg, cand_starts),
            positions=layer.positions,
            layer_idx=event.layer_idx,
            scale=event.scale,
            backend=event.backend,
            queries_are_last=queries_are_last,
            # exact (cand_ends = max(ends - tail, cand_starts)); unknown on the host when the tails differ per row
            candidate_count=max(N - tails[0], 0) if len(set(tails)) == 1 else scored_count,
            heads=engine.heads if engine is not None else LOCAL,
        )
        fingerprint = guard.fingerprint(layer, event.backend) if check_cache else None
        scores = guard.check_scores(scoring.score(ctx), ctx.cand_counts, ctx.num_candidates, scoring, layer,
                                    fingerprint, event.backend)
        scores = torch.nn.functional.pad(scores, (0, N - scores.shape[-1]))  # the protected tail: kept anyway
    keep, kept = select_checked(selection, guard, scores, counts, budgets, protect_head, tails, budget_arg, tail_arg,
                                heads=engine.heads if engine is not None else LOCAL, backend=event.backend)
    keep_slots = torch.where(keep >= 0, keep + cand_starts[..., None], 0)
    dest = cand_starts if region_starts is None else region_starts
    return keep_slots, kept, dest


def select_checked(selection: SelectionPolicy, guard: ContractGuard, scores: torch.Tensor, counts: torch.Tensor,
                   budgets: list[int], protect_head: int, tails: list[int], budget_arg: int | torch.Tensor,
                   tail_arg: int | torch.Tensor, heads: HeadGroup = LOCAL,
                   backend: KVBackend | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, kept)``: :func:`select_rows`, checked by ``guard`` (arguments as :func:`score_and_select`'s;
    ``backend`` runs the device checks, None: the torch references).

    A ``head_adaptive`` selection shares a row's budget among every KV head of the layer: under tensor parallelism
    (``heads`` distributed) the scores and counts of every rank's heads are gathered, the selection and its check
    run over all of them (the same on every rank), and this rank's heads are kept -- what one device keeps.
    """
    if selection.head_adaptive and heads.distributed:
        scores, counts = heads.gather(scores), heads.gather(counts)
        if isinstance(budget_arg, torch.Tensor):
            budget_arg, tail_arg = heads.gather(budget_arg), heads.gather(tail_arg)
    row_tensors = None if isinstance(budget_arg, int) else (budget_arg, tail_arg)
    chosen = select_rows(selection, scores, counts, budgets, protect_head, tails, row_tensors=row_tensors)
    keep, kept = guard.check_selection(chosen, counts, budget_arg, protect_head, tail_arg, selection, backend)
    if selection.head_adaptive and heads.distributed:
        keep, kept = heads.local(keep), heads.local(kept)
    return keep, kept


def _scores_needed(scoring: ScoringPolicy | None, budgets: list[int], tails: list[int], protect_head: int) -> bool:
    """Whether a row keeps anything beyond its protected candidates (else no scoring call is made)."""
    return scoring is not None and not all(b <= protect_head + t for b, t in zip(budgets, tails, strict=True))


def _per_row(value: int | Sequence[int], rows: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * rows
    values = [int(v) for v in value]
    if len(values) != rows:
        raise ValueError(f"{name} has {len(values)} per-row values for a batch of {rows} rows")
    return values


def _row_tensor(values: list[int], like: torch.Tensor) -> torch.Tensor:
    """``int64 [B, Hkv]`` (``like``'s shape and device) from one value per row: an asynchronous host-to-device copy
    on the current stream (:func:`~kvsieve.indexing.ints_to_device`: no read, no wait for the device)."""
    return ints_to_device(values, like.device)[:, None].expand_as(like)


def select_rows(selection: SelectionPolicy, scores: torch.Tensor, counts: torch.Tensor, budgets: list[int],
                protect_head: int, tails: list[int],
                row_tensors: tuple[torch.Tensor, torch.Tensor] | None = None) -> Selection:
    """``selection.select`` with one budget and protected tail per row (``budgets[b]``, ``tails[b]``): one call
    with integers when every row has the same, one call with ``int64 [B, Hkv]`` tensors for a policy with
    ``per_row_budgets`` (``row_tensors``: those tensors when the caller made them already), else one call per row
    (``keep`` padded with -1 to the widest row)."""
    if len(set(budgets)) == 1 and len(set(tails)) == 1:
        return selection.select(scores, counts, budgets[0], protect_head, tails[0])
    if selection.per_row_budgets:
        if row_tensors is None:
            row_tensors = (_row_tensor(budgets, counts), _row_tensor(tails, counts))
        return selection.select(scores, counts, row_tensors[0], protect_head, row_tensors[1])
    parts = [selection.select(scores[b : b + 1], counts[b : b + 1], budgets[b], protect_head, tails[b])
             for b in range(len(budgets))]
    if not all(isinstance(part, Selection) for part in parts):
        return next(part for part in parts if not isinstance(part, Selection))  # the guard reports it
    width = max(part.keep.shape[-1] for part in parts)
    keep = torch.cat([torch.nn.functional.pad(p.keep, (0, width - p.keep.shape[-1]), value=-1) for p in parts])
    return Selection(keep=keep, counts=torch.cat([part.counts for part in parts]))
