"""Hypothesis strategies for kvsieve's tensors: caches with GQA and padding, scores, budgets.

Every strategy draws the *structure* (shapes, live ranges, candidate ranges, budgets) from hypothesis, so
failures shrink to small shapes, and the tensor *contents* from a seeded ``torch.Generator``, so drawing stays
cheap. Tensors are built on the CPU and then moved to the requested device and dtype.

Sizes are bounded by a :class:`Sizes` (small by default, for fast CPU runs); pass a larger one to reach the
tile sizes of a GPU kernel::

    from kvsieve.testing import strategies as kst

    @given(kst.caches(sizes=kst.Sizes(head_dims=(64, 128), max_capacity=300), dtype=torch.bfloat16))
    def test_my_kernel(case): ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import torch
from hypothesis import strategies as st

from kvsieve.indexing import range_mask
from kvsieve.policy import ScoringContext

if TYPE_CHECKING:
    from kvsieve.backend import KVBackend

__all__ = [
    "CacheCase",
    "CompactionCase",
    "LayerOpsCase",
    "PrefillCase",
    "SelectionCase",
    "Sizes",
    "budgets",
    "caches",
    "compactions",
    "layer_op_inputs",
    "prefills",
    "scores",
    "selections",
]

_SEEDS = st.integers(0, 2**32 - 1)


@attrs.frozen
class Sizes:
    """Upper bounds (and choices) for the shapes the strategies draw.

    Attributes:
        max_batch: rows ``B``. Default 3.
        max_kv_heads: KV heads ``Hkv``. Default 3.
        max_group: GQA group ``G = H // Hkv`` (1 = plain multi-head attention). Default 4.
        head_dims: head dimensions ``d`` to choose from (awkward ones included). Default
            ``(1, 5, 8, 16, 24)``.
        max_capacity: cache slots ``C``. Default 40.
        max_window: window / new queries ``W``. Default 5.
        max_candidates: candidates ``N`` for selection inputs. Default 24.
        max_rows: rows (tokens) of the per-layer operators' inputs (:func:`layer_op_inputs`). Default 40: past
            32, a second tile of a kernel that takes up to 32 rows.
        max_model_dim: the model dimension ``D`` of those inputs (drawn from 8, or less if this is smaller).
            Default 96.
        max_ffn_dim: the gated MLP's width ``F`` of those inputs (drawn from 3). Default 70.
    """

    max_batch: int = 3
    max_kv_heads: int = 3
    max_group: int = 4
    head_dims: tuple[int, ...] = (1, 5, 8, 16, 24)
    max_capacity: int = 40
    max_window: int = 5
    max_candidates: int = 24
    max_rows: int = 40
    max_model_dim: int = 96
    max_ffn_dim: int = 70


DEFAULT_SIZES = Sizes()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _to(t: torch.Tensor, device, dtype=None) -> torch.Tensor:
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device=device)


# --------------------------------------------------------------------------------------------- caches
@attrs.frozen
class CacheCase:
    """One layer's compacted cache plus a window of queries, as a scoring policy or a backend sees it.

    Attributes:
        queries: ``[B, H, W, d]`` window queries (for decode attention: the ``W`` new tokens' queries, whose
            keys are the last ``W`` live slots).
        keys, values: ``[B, Hkv, C, d]``; slots outside ``[starts, ends)`` hold finite junk (padding,
            free capacity).
        starts, ends: ``int64 [B, Hkv]`` live range; ``ends - starts >= W``.
        cand_starts, cand_ends: ``int64 [B, Hkv]`` candidate range inside the live range (before the window
            when ``queries_are_last``). Row 0, KV head 0 always has at least one candidate.
        positions: ``int64 [B, Hkv, C]`` increasing over live slots, -1 elsewhere.
        scale: softmax scale ``d ** -0.5``.
        queries_are_last: the window queries are those of the last ``W`` live slots (prefill-time scoring).
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor
    cand_starts: torch.Tensor
    cand_ends: torch.Tensor
    positions: torch.Tensor
    scale: float
    queries_are_last: bool

    @property
    def live_mask(self) -> torch.Tensor:
        """``bool [B, Hkv, C]``: True on live slots."""
        return range_mask(self.starts, self.ends, self.keys.shape[2])

    @property
    def candidate_mask(self) -> torch.Tensor:
        """``bool [B, Hkv, C]``: True on candidate slots."""
        return range_mask(self.cand_starts, self.cand_ends, self.keys.shape[2])

    def context(self, backend: KVBackend, layer_idx: int = 0, with_queries: bool = True) -> ScoringContext:
        """The :class:`~kvsieve.policy.ScoringContext` of this case. Without queries (a policy whose
        ``needs_queries`` is False) ``queries`` is an empty tensor, as
        :func:`kvsieve.compressor.compress_layer` passes it."""
        return ScoringContext(
            queries=self.queries if with_queries else self.keys.new_zeros(0),
            keys=self.keys,
            values=self.values,
            starts=self.starts,
            ends=self.ends,
            cand_starts=self.cand_starts,
            cand_ends=self.cand_ends,
            positions=self.positions,
            layer_idx=layer_idx,
            scale=self.scale,
            backend=backend,
            queries_are_last=self.queries_are_last,
        )

    def replace(self, **changes) -> CacheCase:
        return attrs.evolve(self, **changes)


@st.composite
def caches(
    draw,
    *,
    sizes: Sizes = DEFAULT_SIZES,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    queries_are_last: bool | None = None,
    padding: bool = True,
    min_window: int = 1,
) -> CacheCase:
    """Draw a :class:`CacheCase`: GQA (``H = G * Hkv``), awkward head dims, per-(row, KV head) live and
    candidate ranges, left padding before ``starts`` (unless ``padding=False``) and free slots after ``ends``.

    Args:
        queries_are_last: force the window queries to be (True) or not be (False) those of the last live
            slots; None draws both.
        min_window: smallest ``W`` (0 allows an empty window).
    """
    B = draw(st.integers(1, sizes.max_batch))
    Hkv = draw(st.integers(1, sizes.max_kv_heads))
    G = draw(st.integers(1, sizes.max_group))
    d = draw(st.sampled_from(sizes.head_dims))
    W = draw(st.integers(min_window, max(min_window, sizes.max_window)))
    last = draw(st.booleans()) if queries_are_last is None else queries_are_last
    C = draw(st.integers(W + 1, max(W + 1, sizes.max_capacity)))
    starts, ends, cand_starts, cand_ends = (torch.zeros(B, Hkv, dtype=torch.long) for _ in range(4))
    for b in range(B):
        for j in range(Hkv):
            first = b == 0 and j == 0  # guarantees at least one candidate somewhere
            live = draw(st.integers(W + 1 if first else W, C))
            start = draw(st.integers(0, C - live)) if padding else 0
            end = start + live
            hi = end - W if last else end
            cs = draw(st.integers(start, hi - 1 if first else hi))
            ce = draw(st.integers(cs + 1 if first else cs, hi))
            starts[b, j], ends[b, j], cand_starts[b, j], cand_ends[b, j] = start, end, cs, ce
    gen = _generator(draw(_SEEDS))
    spread = draw(st.sampled_from((0.1, 1.0, 4.0)))  # how peaked attention gets
    queries = torch.randn(B, Hkv * G, W, d, generator=gen) * spread
    keys = torch.randn(B, Hkv, C, d, generator=gen) * torch.rand(B, Hkv, C, 1, generator=gen).add(0.5)
    values = torch.randn(B, Hkv, C, d, generator=gen)
    live = range_mask(starts, ends, C)
    gaps = torch.randint(1, 4, (B, Hkv, C), generator=gen).masked_fill(~live, 0)
    positions = torch.where(live, gaps.cumsum(-1) - 1, -1)
    return CacheCase(
        queries=_to(queries, device, dtype),
        keys=_to(keys, device, dtype),
        values=_to(values, device, dtype),
        starts=_to(starts, device),
        ends=_to(ends, device),
        cand_starts=_to(cand_starts, device),
        cand_ends=_to(cand_ends, device),
        positions=_to(positions, device),
        scale=d**-0.5,
        queries_are_last=last,
    )


# --------------------------------------------------------------------------------------------- compaction
@attrs.frozen
class CompactionCase:
    """Arguments of :meth:`~kvsieve.backend.KVBackend.compact` drawn over a :class:`CacheCase`.

    Attributes:
        cache: the cache whose ``keys``/``values`` are compacted (copy them first: compaction is in place).
        keep: ``int64 [B, Hkv, K]`` kept slots, a sorted subset of the candidates; entries past ``counts``
            hold junk (-1, 0, or slots past the capacity), which a backend must ignore.
        counts: ``int64 [B, Hkv]``.
        dest_starts: ``int64 [B, Hkv]``: the candidates' start, the live start, or 0.
    """

    cache: CacheCase
    keep: torch.Tensor
    counts: torch.Tensor
    dest_starts: torch.Tensor


@st.composite
def compactions(draw, **cache_options) -> CompactionCase:
    """Draw a :class:`CompactionCase` (``cache_options`` go to :func:`caches`)."""
    case = draw(caches(**cache_options))
    device = case.keys.device
    cs, ce = case.cand_starts.cpu(), case.cand_ends.cpu()
    B, Hkv = cs.shape
    gen = _generator(draw(_SEEDS))
    fraction = draw(st.sampled_from((0.0, 0.3, 0.7, 1.0)))
    extra = draw(st.integers(0, 3))  # junk columns past every count
    chosen = [
        [
            torch.nonzero(torch.rand(int(ce[b, j] - cs[b, j]), generator=gen) < fraction).flatten() + cs[b, j]
            for j in range(Hkv)
        ]
        for b in range(B)
    ]
    counts = torch.tensor([[len(c) for c in row] for row in chosen], dtype=torch.long).reshape(B, Hkv)
    K = int(counts.max()) + extra
    C = case.keys.shape[2]
    keep = torch.randint(-1, 2 * C + 1, (B, Hkv, K), generator=gen)
    for b in range(B):
        for j in range(Hkv):
            keep[b, j, : counts[b, j]] = chosen[b][j]
    dest = draw(st.sampled_from(("candidates", "live", "zero")))
    dest_starts = {"candidates": cs, "live": case.starts.cpu(), "zero": torch.zeros_like(cs)}[dest]
    return CompactionCase(case, keep.to(device), counts.to(device), dest_starts.to(device))


# --------------------------------------------------------------------------------------------- prefill
@attrs.frozen
class PrefillCase:
    """Arguments of :meth:`~kvsieve.backend.KVBackend.prefill_attention`.

    Attributes:
        queries: ``[B, H, Q, d]``; keys, values: ``[B, Hkv, K, d]``, ``K >= Q`` (``K > Q``: chunked prefill).
        attention_mask: None (plain causal) or ``bool [B, 1, Q, K]``: causal and no key before ``pad[b]``.
        pad: ``int64 [B]`` left padding per row (0 when ``attention_mask`` is None).
        scale: softmax scale.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    attention_mask: torch.Tensor | None
    pad: torch.Tensor
    scale: float


@st.composite
def prefills(
    draw,
    *,
    sizes: Sizes = DEFAULT_SIZES,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> PrefillCase:
    """Draw a :class:`PrefillCase`: GQA, left padding (query rows that see nothing included), chunks."""
    B = draw(st.integers(1, sizes.max_batch))
    Hkv = draw(st.integers(1, sizes.max_kv_heads))
    G = draw(st.integers(1, sizes.max_group))
    d = draw(st.sampled_from(sizes.head_dims))
    Q = draw(st.integers(1, max(1, sizes.max_capacity // 2)))
    K = Q + draw(st.integers(0, max(0, sizes.max_capacity - Q)))
    masked = draw(st.booleans())
    pad = torch.tensor([draw(st.integers(0, K - 1)) if masked else 0 for _ in range(B)], dtype=torch.long)
    mask = None
    if masked:
        causal = torch.ones(Q, K, dtype=torch.bool).tril(K - Q)
        mask = causal[None, None] & (torch.arange(K) >= pad[:, None, None, None])
    gen = _generator(draw(_SEEDS))
    spread = draw(st.sampled_from((0.1, 1.0, 4.0)))
    queries = torch.randn(B, Hkv * G, Q, d, generator=gen) * spread
    keys = torch.randn(B, Hkv, K, d, generator=gen)
    values = torch.randn(B, Hkv, K, d, generator=gen)
    return PrefillCase(
        queries=_to(queries, device, dtype),
        keys=_to(keys, device, dtype),
        values=_to(values, device, dtype),
        attention_mask=None if mask is None else mask.to(device),
        pad=pad.to(device),
        scale=d**-0.5,
    )


# --------------------------------------------------------------------------------------------- layer operators
@attrs.frozen
class LayerOpsCase:
    """Inputs of the per-layer operators the fast path's fused decoder layer calls on a backend
    (:meth:`~kvsieve.backend.KVBackend.rms_norm`, ``silu_mul``, ``gate_up_silu`` and ``linear``), all in one dtype
    and on one device, with the leading shape ``[M]``, ``[M, 1]`` (a decode step's ``[B, 1, ...]``) or ``[1, M]``.

    Attributes:
        x: ``[..., D]`` hidden states (the input of ``rms_norm`` and ``gate_up_silu``).
        residual: ``[..., D]`` the residual stream (of ``rms_norm``, and of ``linear``, which may overwrite it:
            pass a copy).
        norm_weight: ``[D]``; eps: the norm's epsilon (1e-6, 1e-5, or 0.5, large enough to matter).
        gate, up: ``[..., F]``, separate tensors or (``gate_up_views``) the two halves of one ``[..., 2F]``
            tensor, as the fused layer splits its merged gate/up projection.
        gate_up_weight: ``[2F, D]`` gate rows then up rows; gate_up_bias: ``[2F]``.
        hidden: ``[..., F]`` the MLP's activations (the input of ``linear``, as down_proj's).
        weight: ``[D, F]`` the projection of ``linear``; bias: ``[D]``.
        gate_up_views: whether ``gate`` and ``up`` are views of one tensor (strided: rows ``2F`` apart).
    """

    x: torch.Tensor
    residual: torch.Tensor
    norm_weight: torch.Tensor
    eps: float
    gate: torch.Tensor
    up: torch.Tensor
    gate_up_weight: torch.Tensor
    gate_up_bias: torch.Tensor
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    gate_up_views: bool


@st.composite
def layer_op_inputs(
    draw,
    *,
    sizes: Sizes = DEFAULT_SIZES,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LayerOpsCase:
    """Draw a :class:`LayerOpsCase`: 1 to ``sizes.max_rows`` rows, awkward widths (``D`` from 8 to
    ``sizes.max_model_dim``, ``F`` from 3 to ``sizes.max_ffn_dim``, mostly no multiple of 16), activations of
    three magnitudes (SiLU's curved part and its linear part), weights scaled by ``1/sqrt(fan_in)`` as a model's
    are, and unit-sized biases."""
    M = draw(st.integers(1, max(1, sizes.max_rows)))
    D = draw(st.integers(min(8, sizes.max_model_dim), sizes.max_model_dim))
    F = draw(st.integers(min(3, sizes.max_ffn_dim), sizes.max_ffn_dim))
    lead = draw(st.sampled_from(((M,), (M, 1), (1, M))))
    eps = draw(st.sampled_from((1e-6, 1e-5, 0.5)))
    views = draw(st.booleans())
    gen = _generator(draw(_SEEDS))
    spread = draw(st.sampled_from((0.1, 1.0, 4.0)))

    def randn(*shape, scale=1.0):
        return _to(torch.randn(*shape, generator=gen) * scale, device, dtype)

    if views:
        gate, up = randn(*lead, 2 * F, scale=spread).split(F, dim=-1)
    else:
        gate, up = randn(*lead, F, scale=spread), randn(*lead, F, scale=spread)
    return LayerOpsCase(
        x=randn(*lead, D, scale=spread),
        residual=randn(*lead, D, scale=spread),
        norm_weight=randn(D),
        eps=eps,
        gate=gate,
        up=up,
        gate_up_weight=randn(2 * F, D, scale=D**-0.5),
        gate_up_bias=randn(2 * F),
        hidden=randn(*lead, F, scale=spread),
        weight=randn(D, F, scale=F**-0.5),
        bias=randn(D),
        gate_up_views=views,
    )


# --------------------------------------------------------------------------------------------- selection
#: what fills score entries past a row's count: a selection policy must never keep them
PADDING_FILLS = ("inf", "-inf", "nan", "max", "random", "zero")


def _counts(draw, B: int, Hkv: int, N: int, evictable: bool) -> torch.Tensor:
    """``int64 [B, Hkv]`` valid candidates in ``[0, N]``; with ``evictable`` one drawn (row, KV head) has at
    least 2 (so that a budget can be below it)."""
    counts = torch.tensor([[draw(st.integers(0, N)) for _ in range(Hkv)] for _ in range(B)], dtype=torch.long)
    if evictable:
        b, j = draw(st.integers(0, B - 1)), draw(st.integers(0, Hkv - 1))
        counts[b, j] = draw(st.integers(2, N))
    return counts.reshape(B, Hkv)


def _scores(draw, sizes: Sizes, device, evictable: bool, min_batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`scores`; ``evictable``: some (row, KV head) has 2 candidates or more; ``min_batch``: rows."""
    evictable = evictable and sizes.max_candidates >= 2
    B = draw(st.integers(min(min_batch, sizes.max_batch), sizes.max_batch))
    Hkv = draw(st.integers(1, sizes.max_kv_heads))
    N = draw(st.integers(2 if evictable else 1, sizes.max_candidates))
    counts = _counts(draw, B, Hkv, N, evictable)
    gen = _generator(draw(_SEEDS))
    kind = draw(st.sampled_from(("distinct", "ties", "constant", "extreme")))
    if kind == "distinct":
        values = torch.randn(B, Hkv, N, generator=gen)
    elif kind == "ties":
        values = torch.randint(0, 3, (B, Hkv, N), generator=gen).float()
    elif kind == "constant":
        values = torch.zeros(B, Hkv, N)
    else:
        big = torch.finfo(torch.float32).max
        pool = torch.tensor([-big, -1.0, 0.0, 1e-30, 1.0, big])
        values = pool[torch.randint(0, len(pool), (B, Hkv, N), generator=gen)]
    fill = draw(st.sampled_from(PADDING_FILLS))
    junk = {
        "inf": torch.full((B, Hkv, N), float("inf")),
        "-inf": torch.full((B, Hkv, N), float("-inf")),
        "nan": torch.full((B, Hkv, N), float("nan")),
        "max": torch.full((B, Hkv, N), torch.finfo(torch.float32).max),
        "random": torch.randn(B, Hkv, N, generator=gen) * 1e3,
        "zero": torch.zeros(B, Hkv, N),
    }[fill]
    padding = torch.arange(N) >= counts[..., None]
    return torch.where(padding, junk, values).to(device), counts.to(device)


@st.composite
def scores(
    draw,
    *,
    sizes: Sizes = DEFAULT_SIZES,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``(scores float32 [B, Hkv, N], counts int64 [B, Hkv])`` as a selection policy receives them.

    Valid scores are finite (the scoring contract): distinct, with many ties, constant, or spanning the float32
    range. Entries at or past ``counts`` hold adversarial padding (``+inf``, ``-inf``, NaN, the largest float,
    noise or zeros). Some rows have no candidates at all, others exactly ``N``.
    """
    return _scores(draw, sizes, device, evictable=False)


def budgets(max_budget: int = DEFAULT_SIZES.max_candidates + 2) -> st.SearchStrategy[int]:
    """Budgets: positive integers up to ``max_budget`` (larger than the candidates sometimes)."""
    return st.integers(1, max_budget)


@attrs.frozen
class SelectionCase:
    """Arguments of :meth:`~kvsieve.policy.SelectionPolicy.select`, with ``protect_head + protect_tail``
    at most ``budget`` (in every row).

    Attributes:
        scores, counts: as :func:`scores` draws them.
        budget: an int, or (per-row budgets) ``int64 [B, Hkv]`` with one value per row, as kvsieve passes it to
            a policy with ``per_row_budgets`` (a padded batch whose rows have different budgets).
        protect_head: an int.
        protect_tail: an int, or ``int64 [B, Hkv]`` (one value per row) when ``budget`` is a tensor.
    """

    scores: torch.Tensor
    counts: torch.Tensor
    budget: int | torch.Tensor
    protect_head: int
    protect_tail: int | torch.Tensor

    @property
    def per_row(self) -> bool:
        """Whether ``budget`` and ``protect_tail`` are per-row tensors."""
        return isinstance(self.budget, torch.Tensor)

    @property
    def budgets(self) -> torch.Tensor:
        """``int64 [B, Hkv]`` (on the CPU): the budget of each row and KV head."""
        return torch.as_tensor(self.budget, dtype=torch.long).cpu().expand(self.counts.shape)

    @property
    def tails(self) -> torch.Tensor:
        """``int64 [B, Hkv]`` (on the CPU): the protected tail of each row and KV head."""
        return torch.as_tensor(self.protect_tail, dtype=torch.long).cpu().expand(self.counts.shape)

    @property
    def evicts(self) -> bool:
        """Whether some row and KV head has more valid candidates than its budget (something is dropped)."""
        return bool((self.counts.cpu() > self.budgets).any())


#: how :func:`selections` relates a budget to the candidate counts, and how often (out of 40): ``evict``: below
#: the largest count (something is dropped); ``keep all``: at least every count; ``any``: from 1 to ``N + 2``
_BUDGET_KINDS = ("evict",) * 35 + ("keep all",) * 3 + ("any",) * 2
#: how :func:`selections` draws the protected head and tail, and how often (out of 10): ``none``; ``some``: less
#: than the budget where it can (the policy still chooses by score); ``limit``: head + tail = budget; ``any``
_PROTECTIONS = ("none", "none") + ("some",) * 5 + ("limit", "limit", "any")
#: the protected tails of per-row budgets: drawn per row, the budget less the head (StreamingLLM's), a window
#: capped by each row's budget (a prompt compressor's)
_ROW_TAILS = ("free", "limit", "window")


def _protection(draw, how: str, budget: int, head: int | None = None) -> tuple[int, int]:
    """``(head, tail)`` for ``budget`` (``head`` given: draw only the tail)."""
    room = budget - 1 if how == "some" else budget
    if head is None:
        head = 0 if how == "none" else draw(st.integers(0, room))
    if how == "none":
        return head, 0
    if how == "limit":
        return head, budget - head
    return head, draw(st.integers(0, max(room - head, 0)))


@st.composite
def selections(
    draw,
    *,
    sizes: Sizes = DEFAULT_SIZES,
    device: str | torch.device = "cpu",
    protect: bool = True,
    per_row_budgets: bool = False,
) -> SelectionCase:
    """Draw a :class:`SelectionCase` whose budget evicts most of the time.

    The scores and counts are those of :func:`scores`. 85 to 90% of the cases drop candidates somewhere
    (``SelectionCase.evicts``: a budget below the largest count, of a row and KV head with at least 2
    candidates); the rest keep everything (a budget at least every count) or draw a budget from 1 to ``N + 2``
    regardless of the counts. The protected head and tail (none when ``protect=False``) are none, less than the
    budget (so the policy chooses some candidates by score), or reach the budget (everything kept is protected).

    With ``per_row_budgets`` (for a policy whose ``per_row_budgets`` is True), about half of the cases have 2 rows
    or more and give the budget and the protected tail as ``int64 [B, Hkv]`` tensors with one value per row
    (contiguous, or expanded views as kvsieve passes them): the rows' budgets differ, one of them evicting; the
    protected tail is drawn per row, is the budget less the head in every row (StreamingLLM's), or a window capped
    by each row's budget (a prompt compressor's).
    """
    kind = draw(st.sampled_from(_BUDGET_KINDS))
    per_row = per_row_budgets and sizes.max_batch >= 2 and draw(st.sampled_from((False, True)))
    values, counts = _scores(draw, sizes, device, evictable=kind == "evict", min_batch=2 if per_row else 1)
    N = values.shape[-1]
    counts_l = counts.tolist()
    most = max(max(row) for row in counts_l)  # >= 2 for "evict" (when sizes allow it)
    if not per_row:
        if kind == "evict" and most >= 2:
            budget = draw(st.integers(1, most - 1))
        elif kind == "keep all":
            budget = draw(st.integers(max(most, 1), N + 2))
        else:
            budget = draw(budgets(N + 2))
        head, tail = _protection(draw, draw(st.sampled_from(_PROTECTIONS)) if protect else "none", budget)
        return SelectionCase(values, counts, budget, head, tail)
    if kind == "evict" and most >= 2:
        star = draw(st.sampled_from([b for b, row in enumerate(counts_l) if max(row) >= 2]))
        rows = [
            draw(st.integers(1, max(row) - 1)) if b == star else draw(budgets(N + 2))
            for b, row in enumerate(counts_l)
        ]
    elif kind == "keep all":
        rows = [draw(st.integers(max(max(row), 1), N + 2)) for row in counts_l]
    else:
        rows = [draw(budgets(N + 2)) for _ in counts_l]
    how = draw(st.sampled_from(_PROTECTIONS)) if protect else "none"
    head, _ = _protection(draw, how, min(rows))
    row_tails = draw(st.sampled_from(_ROW_TAILS)) if how in ("some", "any") else how
    if row_tails == "window":
        window = draw(st.integers(0, max(rows) - head))
        tails = [min(window, b - head) for b in rows]
    else:
        tails = [_protection(draw, "limit" if row_tails == "limit" else how, b, head)[1] for b in rows]
    expanded = draw(st.booleans())

    def table(per: list[int]) -> torch.Tensor:
        column = torch.tensor(per, dtype=torch.long, device=counts.device)[:, None]
        return column.expand(counts.shape) if expanded else column.repeat(1, counts.shape[1])

    return SelectionCase(values, counts, table(rows), head, table(tails))
