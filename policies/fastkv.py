"""FastKV (Jo et al., 2025): Token-Selective Propagation plus per-layer SnapKV-style KV selection.

During prefill (the paper's algorithm, docs/policies/fastkv.md):

* every layer keeps its own salient KV: the window attention of the last ``window`` prompt tokens (softmax
  over every key they causally see, fp32), summed over the window, pooled along the tokens per query head,
  summed over the GQA group; the top ``budget - window`` earlier tokens per KV head are kept, then the window;
* at the TSP layer ``T`` those scores are also summed over the KV heads (one score per token); the top
  ``tsp_len - window`` tokens plus the last ``window`` are chosen, sorted, and only they propagate: layers
  after ``T`` (and the final norm and LM head) compute on them, at their ORIGINAL positions
  (:mod:`kvsieve.propagation`); their KV is a subset of the propagated tokens.

Decoding appends without eviction; new tokens' positions continue from the original prompt length.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

import kvsieve
from kvsieve.budget import Budget
from kvsieve.compressor import LayerEvent, select_rows
from kvsieve.contracts import debug_checks
from kvsieve.indexing import ints_to_device
from kvsieve.parallel import LOCAL
from kvsieve.plugins import selection_policy
from kvsieve.policies.window_attention import AGGREGATIONS, pool_scores
from kvsieve.policy import ScoringContext, ScoringPolicy, SelectionPolicy
from kvsieve.prompt import PromptCompressor
from kvsieve.propagation import TokenPropagation, propagate
from kvsieve.validators import nonnegative_int, odd_positive_int, one_of, optional, positive_int, unit_ratio

__all__ = ["FastKV", "HeadPooledWindowScoring"]

POOLINGS = ("max", "avg")


@attrs.frozen
class HeadPooledWindowScoring(ScoringPolicy):
    """Window attention over every visible key, pooled per QUERY head, then summed over the GQA group.

    The order of FastKV's reference (and of window-attention scoring in general): softmax over all keys each window
    query causally sees (prefill only), summed over the window, pooled per query head (kernel ``k``, stride 1,
    zero padding), then summed over the ``G`` query heads of each KV head. With ``avg`` pooling (linear) this
    equals pooling the group sum; with ``max`` pooling it does not, so the backend is asked once per group
    member (``G`` calls of ``window_scores``).

    Args:
        pooling: ``"max"`` or ``"avg"``. Default ``"max"``.
        kernel: odd pooling kernel. Default 7.
        aggregation: ``"group"`` (per KV head, the paper's) or ``"all"`` (one ranking shared by every KV head of
            the layer: the group scores summed over KV heads, across tensor-parallel ranks too). TSP ranks tokens
            by the sum over KV heads either way.
    """

    name: ClassVar[str] = "head_pooled_window_attention"

    pooling: str = attrs.field(default="max", validator=one_of(*POOLINGS))
    kernel: int = attrs.field(default=7, validator=odd_positive_int)
    aggregation: str = attrs.field(default="group", validator=one_of(*AGGREGATIONS))

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        scores = self._group_scores(ctx)
        if self.aggregation == "all":
            scores = ctx.sum_over_heads(scores).expand_as(scores)
        return scores

    def _group_scores(self, ctx: ScoringContext) -> torch.Tensor:
        if not ctx.queries_are_last:
            raise ValueError(
                f"{self.name} normalises over every visible key: it needs prefill window queries"
            )
        backend, queries = ctx.backend, ctx.queries
        lse = backend.window_lse(queries, ctx.keys, ctx.starts, ctx.ends, ctx.scale)  # [B, H, W]
        B, H, W, d = queries.shape
        Hkv = ctx.keys.shape[1]
        G = H // Hkv
        if self.pooling == "avg" or G == 1:
            return pool_scores(ctx.window_scores(lse), self.pooling, self.kernel)
        grouped_q, grouped_lse = queries.reshape(B, Hkv, G, W, d), lse.reshape(B, Hkv, G, W)
        total = None
        for g in range(G):  # one query head per KV head at a time
            part = ctx.window_scores(grouped_lse[:, :, g].contiguous(), queries=grouped_q[:, :, g].contiguous())
            part = pool_scores(part, self.pooling, self.kernel)
            total = part if total is None else total + part
        return total


@attrs.frozen(kw_only=True)
class FastKV(PromptCompressor):
    """FastKV: token-selective propagation at layer ``tsp_layer``, SnapKV-style KV selection in every layer.

    Two modes, as in the reference:

    * proportional (default): ``tsp_len = floor(tsp_rate * Lp)``; layers up to ``tsp_layer`` keep
      ``floor(ratio * Lp)`` KV entries, later layers ``floor(ratio / tsp_rate * propagated)`` (about
      ``ratio * Lp``; no further compression when ``ratio >= tsp_rate``);
    * constant: fixed ``tsp_len`` and KV ``budget`` per layer; a layer holding fewer tokens than ``budget`` is
      left alone, so a prompt shorter than the budget is not compressed and TSP does not fire.

    TSP fires when the prompt is longer than ``tsp_len``. Lengths never go below ``window``.

    Args:
        tsp_layer: 0-based index of the TSP layer. Default ``num_layers // 2 - 1`` of the model.
        tsp_rate: fraction of the prompt propagated past ``tsp_layer``, in (0, 1]. Default 0.2.
        tsp_len: a constant number of propagated tokens (constant mode, with ``budget``). Must exceed
            ``window``.
        ratio: fraction of the prompt each layer keeps in its KV cache, in (0, 1] (the paper's KV retention
            rate). Default 0.1.
        budget: a constant number of KV entries per layer (constant mode, with ``tsp_len``). Must exceed
            ``window``.
        window: last prompt tokens: the observation window, always kept and always propagated. Default 8.
        scoring: a scoring policy (name or instance). Default :class:`HeadPooledWindowScoring` (max pooling,
            kernel 7; ``scoring.pooling=avg`` for FastKV before v3).
        selection: a selection policy (name or instance) for each layer's KV. Default ``"topk"`` (the paper's);
            ``selection=span`` keeps whole spans (docs/policies/span.md).
        tsp_selection: a selection policy (name or instance) for the propagated tokens. Default ``"topk"`` (the
            paper's), independent of ``selection``: changing the KV selection leaves TSP as the paper runs it.
    """

    name: ClassVar[str] = "fastkv"
    propagates: ClassVar[bool] = True
    default_ratio: ClassVar[float] = 0.1
    default_window: ClassVar[int] = 8
    rounding: ClassVar[str] = "floor"  # as the reference

    tsp_layer: int | None = attrs.field(default=None, validator=optional(nonnegative_int))
    tsp_len: int | None = attrs.field(default=None, validator=optional(positive_int))
    tsp_rate: float | None = attrs.field(  # 0.2 in proportional mode (neither budget nor tsp_len given)
        default=attrs.Factory(lambda self: None if self.budget is not None or self.tsp_len else 0.2, takes_self=True),
        validator=optional(unit_ratio),
    )

    tsp_selection: SelectionPolicy = attrs.field(default="topk", converter=selection_policy)

    def __attrs_post_init__(self):
        constant = {k: getattr(self, k) for k in ("tsp_len", "budget") if getattr(self, k) is not None}
        proportional = {k: getattr(self, k) for k in ("tsp_rate", "ratio") if getattr(self, k) is not None}
        if proportional and constant:
            raise ValueError(
                "fastkv takes either the proportional parameters (tsp_rate, ratio) or the constant ones "
                f"(tsp_len, budget), not a mix: got {proportional | constant}"
            )
        if len(constant) == 1:
            raise ValueError(f"fastkv's constant mode needs both tsp_len and budget, got only {constant}")
        if constant:
            for key, value in constant.items():
                if value <= self.window:
                    raise ValueError(
                        f"{key}={value} must exceed window={self.window} (the window is always kept)"
                    )

    def default_scoring(self) -> ScoringPolicy:
        return HeadPooledWindowScoring(pooling="max", kernel=7)

    # ------------------------------------------------------------------ configuration
    @property
    def constant(self) -> bool:
        """Constant mode (``tsp_len``, ``budget``), not proportional (``tsp_rate``, ``ratio``)."""
        return self.budget is not None

    @property
    def query_window(self) -> int:
        return self.window

    def resolve_tsp_layer(self, num_layers: int) -> int:
        """The TSP layer of a model with ``num_layers`` decoder layers (``tsp_layer`` or its default)."""
        return num_layers // 2 - 1 if self.tsp_layer is None else self.tsp_layer

    def check_model(self, config) -> None:
        num_layers = config.num_hidden_layers
        tsp_layer = self.resolve_tsp_layer(num_layers)
        if self.tsp_layer is None and tsp_layer < 0:
            raise ValueError(f"fastkv needs a model with at least 2 layers (num_hidden_layers={num_layers})")
        if tsp_layer >= num_layers:
            raise ValueError(
                f"tsp_layer={tsp_layer} is out of range for a model with num_hidden_layers={num_layers} "
                f"(allowed 0..{num_layers - 1})"
            )

    def install(self, engine) -> list:
        return TokenPropagation.install(engine)

    def propagated_length(self, length: int) -> int:
        """Tokens propagated past the TSP layer from a layer of ``length`` tokens (``length``: no TSP)."""
        # floor, as the reference (rounded to 9 decimals first: 0.29 * 100 propagates 29, where the reference's
        # int(0.29 * 100) gives 28)
        tsp_len = self.tsp_len if self.constant else Budget(self.tsp_rate, rounding="floor").tokens(length)
        tsp_len = max(tsp_len, self.window)
        return tsp_len if length > tsp_len else length

    def kv_budget(self, length: int, after_tsp: bool) -> int | None:
        """KV entries kept by a layer holding ``length`` tokens; ``None``: the layer is left alone."""
        if self.constant:
            return None if length < self.budget else self.budget
        keep = self.keep.tokens(length)
        if after_tsp:  # the propagated tokens are tsp_rate of the prompt: keep ratio / tsp_rate of them
            keep = Budget(min(self.keep.ratio / self.tsp_rate, 1.0), rounding="floor").tokens(length)
        return max(keep, self.window)

    # ------------------------------------------------------------------ the schedule
    def layer_budget(self, event: LayerEvent) -> list[int] | None:
        # per row, from the real tokens this layer computed on (fewer than the prompt after the TSP layer); a row
        # shorter than a constant budget keeps everything (alone, its layer would be left alone)
        after_tsp = event.layer_idx > self.resolve_tsp_layer(event.num_layers)
        lengths = event.layer.row_lengths
        budgets = [self.kv_budget(n, after_tsp) for n in lengths]
        if all(b is None for b in budgets):
            return None
        return [n if b is None else b for b, n in zip(budgets, lengths, strict=True)]

    def after_attention(self, event: LayerEvent) -> None:
        if event.phase != "prefill" or self.layer_budget(event) is None:
            return
        if event.layer_idx == self.resolve_tsp_layer(event.num_layers):
            lengths = event.layer.row_lengths
            propagated = [self.propagated_length(n) for n in lengths]
            if any(p < n for p, n in zip(propagated, lengths, strict=True)):
                # the fill is the only padding it keeps: declared, so no later layer reads the mask's padding
                propagate(event, self.select_propagated(event, propagated),
                          padding=self.propagated_rows(event, propagated)[1])
        super().after_attention(event)

    def token_scores(self, event: LayerEvent) -> torch.Tensor:
        """``float32 [B, L]``: each of the layer's ``L`` tokens' score summed over KV heads (TSP's ranking).

        The last ``window`` tokens (always kept) score 0; padding scores the lowest float, so it is chosen
        only when a row has fewer real tokens than the propagated length.
        """
        layer = event.layer
        length = layer.max_end
        cand_ends = torch.maximum(layer.ends - self.window, layer.starts)
        ctx = ScoringContext(
            queries=event.window_queries(),
            keys=layer.keys,
            values=layer.values,
            starts=layer.starts,
            ends=layer.ends,
            cand_starts=layer.starts,
            cand_ends=cand_ends,
            positions=layer.positions,
            layer_idx=event.layer_idx,
            scale=event.scale,
            backend=event.backend,
            queries_are_last=True,
            # prefill: row b's candidates are its real tokens but the window (known on the host: no read of N)
            candidate_count=max((max(n - self.window, 0) for n in layer.row_lengths), default=None),
            heads=event.engine.heads if event.engine is not None else LOCAL,
        )
        # [B, N]: candidate n is token starts + n; over every KV head, across tensor-parallel ranks too, so that
        # every rank propagates the same tokens
        per_token = ctx.sum_over_heads(self.scoring.score(ctx))[:, 0]
        B, N = per_token.shape
        starts, counts = layer.starts[:, 0], ctx.cand_counts[:, 0]  # prefill: the same for every KV head
        offsets = torch.arange(N, device=per_token.device)
        tokens = (starts[:, None] + offsets).clamp(max=length - 1)
        scores = torch.zeros(B, length, device=per_token.device)
        scores.scatter_(1, tokens, torch.where(offsets < counts[:, None], per_token, 0.0))
        padding = torch.arange(length, device=scores.device) < starts[:, None]
        return scores.masked_fill(padding, torch.finfo(torch.float32).min)

    def propagated_rows(self, event: LayerEvent, propagated: list[int]) -> tuple[list[int], list[int]]:
        """Per row, the real tokens it propagates and the leading padding tokens that fill it up to ``K =
        max(propagated)`` (host ints; never more fill than the row has padding)."""
        K, length = max(propagated), event.layer.max_end
        padding = [length - n for n in event.layer.row_lengths]
        budgets = [max(p, K - pad) for p, pad in zip(propagated, padding, strict=True)]
        return budgets, [K - b for b in budgets]

    def select_propagated(self, event: LayerEvent, propagated: list[int]) -> torch.Tensor:
        """``int64 [B, K]``, ``K = max(propagated)``: sorted indices of the tokens that go on past the TSP layer.

        Row ``b`` propagates its top ``propagated[b] - window`` real tokens by :meth:`token_scores` and its last
        ``window`` (what it would propagate alone); a row that propagates fewer than ``K`` fills up with its
        leading padding tokens, which stay masked in every later layer.
        """
        scores = self.token_scores(event)
        B, length = scores.shape
        K = max(propagated)
        budgets, fills = self.propagated_rows(event, propagated)
        counts = torch.full((B, 1), length, dtype=torch.long, device=scores.device)
        tails = [min(self.window, b, n) for b, n in zip(budgets, event.layer.row_lengths, strict=True)]
        real = select_rows(self.tsp_selection, scores[:, None], counts, budgets, 0, tails).keep[:, 0]
        fill = ints_to_device(fills, scores.device)[:, None]  # [B, 1], without a sync
        j = torch.arange(K, device=scores.device)
        from_real = real.gather(1, (j - fill).clamp(0, real.shape[1] - 1))
        keep = torch.where(j < fill, event.layer.starts[:, :1] - fill + j, from_real)
        heads = event.engine.heads if event.engine is not None else LOCAL
        if heads.distributed and debug_checks() and not heads.same_on_every_rank(keep):
            raise RuntimeError(
                f"fastkv: the tensor-parallel ranks chose different tokens to propagate at layer {event.layer_idx}"
            )
        return keep


@kvsieve.hookimpl
def kvsieve_compressors():
    return {FastKV.name: FastKV}


@kvsieve.hookimpl
def kvsieve_scoring_policies():
    return {HeadPooledWindowScoring.name: HeadPooledWindowScoring}
