"""Conformance checks: the contracts of :mod:`kvsieve.policy` and :mod:`kvsieve.backend`, as assertions.

Two layers, both public:

* ``check_*`` functions test one input and raise ``AssertionError`` with a message that names the broken rule
  (call them from your own tests or your own hypothesis strategies);
* ``assert_*_conforms`` functions run a ``check_*`` on many inputs drawn by hypothesis from
  :mod:`kvsieve.testing.strategies`, shrink a failure to a small example, and raise it::

      from kvsieve.testing import assert_scoring_conforms, assert_selection_conforms

      def test_my_scoring():
          assert_scoring_conforms(MyScoring(alpha=0.5))

      def test_my_selection():
          assert_selection_conforms(MySelection(), nested=True)

Do not call ``assert_*_conforms`` from inside a ``@given`` test (hypothesis does not nest); use ``check_*``
there. What each check verifies is listed in its docstring and in ``docs/testing.md``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Mapping

import hypothesis
import torch
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from kvsieve.backend import KVBackend
from kvsieve.policy import ScoringPolicy, Selection, SelectionPolicy
from kvsieve.testing import _CONFORMANCE_NAMES
from kvsieve.testing.strategies import (
    DEFAULT_SIZES,
    CacheCase,
    CompactionCase,
    LayerOpsCase,
    PrefillCase,
    SelectionCase,
    Sizes,
    caches,
    compactions,
    layer_op_inputs,
    prefills,
    selections,
)

__all__ = list(_CONFORMANCE_NAMES)

#: ``(rtol, atol)`` per input dtype for outputs in the input dtype (attention outputs; the layer operators', with
#: ``atol`` relative to the largest output for their GEMMs: ``_gemm_tolerance``)
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
#: ``(rtol, atol)`` per input dtype for fp32 outputs (log-sum-exp, scores): products of low-precision
#: inputs are exact in fp32, so only the summation order differs
SCORE_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-5, 1e-6),
    torch.float16: (2e-4, 1e-5),
    torch.bfloat16: (2e-4, 1e-5),
}
#: what unused slots are filled with to prove nobody reads them
POISONS = ("nan", "huge", "noise")
#: the backend primitives :func:`check_backend` knows
PRIMITIVES = (
    "prefill_attention",
    "decode_attention",
    "window_lse",
    "window_scores",
    "compact",
    "contract_checks",
    "layer_ops",
)


def conformance_settings(max_examples: int) -> hypothesis.settings:
    """The hypothesis settings ``assert_*_conforms`` use unless given others: no deadline (the first call of a
    kernel may compile), one bug reported (the smallest), no health check for slow draws."""
    return hypothesis.settings(
        max_examples=max_examples,
        deadline=None,
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --------------------------------------------------------------------------------------------- helpers
def poison(buf: torch.Tensor, keep: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """A copy of ``buf [B, Hkv, C, d]`` whose slots where ``keep [B, Hkv, C]`` is False hold poison.

    Args:
        kind: ``"nan"``; ``"huge"`` (the dtype's largest magnitude, alternating sign along ``d``, so a dot
            product over it overflows to inf or NaN); ``"noise"`` (different finite data, ~100x the usual
            magnitude).
    """
    if kind == "nan":
        fill = torch.full_like(buf, float("nan"))
    elif kind == "huge":
        sign = 1 - 2 * (torch.arange(buf.shape[-1], device=buf.device) % 2)
        fill = (sign * torch.finfo(buf.dtype).max).to(buf.dtype).expand_as(buf)
    elif kind == "noise":
        gen = torch.Generator().manual_seed(seed)
        fill = (torch.randn(buf.shape, generator=gen) * 100).to(device=buf.device, dtype=buf.dtype)
    else:
        raise ValueError(f"kind must be one of {POISONS}, got {kind!r}")
    return torch.where(keep[..., None], buf, fill)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and values, NaN equal to NaN (CPU kernels may rewrite a NaN's payload bits)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all()) if a.is_floating_point() else torch.equal(a, b)


def _close(actual, expected, tol, what: str) -> None:
    rtol, atol = tol
    torch.testing.assert_close(
        actual.float().cpu(),
        expected.float().cpu(),
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{what}: {m}",
    )


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise AssertionError(message)


def _reference() -> KVBackend:
    from kvsieve.plugins import registry

    return registry().backend("torch")


# --------------------------------------------------------------------------------------------- selection
def _rows(value: int | torch.Tensor, counts: torch.Tensor) -> list[list[int]]:
    """A budget or protected tail as ``[B][Hkv]`` integers."""
    return torch.as_tensor(value, dtype=torch.long).cpu().expand(counts.shape).tolist()


def _show(value: int | torch.Tensor) -> str:
    """A budget or protected tail for a message: the int, or one value per row."""
    if not isinstance(value, torch.Tensor):
        return str(value)
    table = value.cpu()
    same = bool((table == table[:, :1]).all()) if table.dim() == 2 and table.numel() else False
    return f"{table[:, 0].tolist()} per row" if same else f"{table.tolist()} per (row, KV head)"


def _select(policy: SelectionPolicy, case: SelectionCase, budget: int | torch.Tensor) -> Selection:
    """``policy.select`` as kvsieve calls it: per-row tensors go to a policy with ``per_row_budgets`` as they are;
    any other policy is called once per row with integers (:func:`kvsieve.compressor.select_rows`)."""
    tail = case.protect_tail
    if not isinstance(budget, torch.Tensor) and not isinstance(tail, torch.Tensor):
        return policy.select(case.scores, case.counts, budget, case.protect_head, tail)
    if policy.per_row_budgets:
        shape = case.counts.shape
        budget_t = budget if isinstance(budget, torch.Tensor) else torch.full(shape, budget, device=case.counts.device)
        tail_t = tail if isinstance(tail, torch.Tensor) else torch.full(shape, tail, device=case.counts.device)
        return policy.select(case.scores, case.counts, budget_t, case.protect_head, tail_t)
    from kvsieve.compressor import select_rows

    budgets, tails = _rows(budget, case.counts), _rows(tail, case.counts)
    if any(len(set(row)) > 1 for row in budgets + tails):
        raise ValueError(
            f"{type(policy).__name__} has no per_row_budgets: kvsieve calls it once per row, so a budget or "
            f"protected tail must be the same for every KV head of a row (budget {_show(budget)}, protect_tail "
            f"{_show(tail)})"
        )
    return select_rows(
        policy, case.scores, case.counts, [r[0] for r in budgets], case.protect_head, [r[0] for r in tails]
    )


def check_selection(
    policy: SelectionPolicy,
    case: SelectionCase,
    *,
    nested_budget: int | torch.Tensor | None = None,
    keeps_top_scores: bool = False,
) -> Selection:
    """Check a selection policy on one input; return its :class:`~kvsieve.policy.Selection`.

    Always checked, per row ``b`` and KV head ``j`` with ``n = counts[b, j]`` valid candidates and the budget
    ``budget[b, j]`` (an int, or a per-row tensor, see below):

    * ``counts[b, j] == min(budget, n)`` (for a ``head_adaptive`` policy: ``sum_j counts[b, j] == sum_j
      min(budget, n_j)`` per row, and ``counts[b, j] <= n``); ``keep`` is ``int64 [B, Hkv, K]`` with
      ``K >= counts.max()``;
    * the first ``counts`` entries of ``keep`` are strictly increasing (sorted, unique) and inside ``[0, n)``
      (so padding is never kept over a real token, whatever its score: +inf, NaN, ...); the rest are -1;
    * the first ``protect_head`` and the last ``protect_tail`` (of the row) valid candidates are kept;
    * the same call gives the same answer (deterministic), and the inputs are not modified.

    Per-row budgets (``case.budget`` and ``case.protect_tail`` as ``int64 [B, Hkv]`` tensors) are passed as
    they are to a policy with ``per_row_budgets``; any other policy is called once per row with integers, as
    kvsieve calls it (:func:`kvsieve.compressor.select_rows`).

    Opt-in:

    * ``nested_budget`` (``>= case.budget``, in every row): the selection under that larger budget keeps a
      superset;
    * ``keeps_top_scores``: every kept unprotected candidate scores at least as high as every dropped one
      (top-k).
    """
    arguments = [a for a in (case.budget, case.protect_tail) if isinstance(a, torch.Tensor)]
    before = [t.clone() for t in (case.scores, case.counts, *arguments)]
    sel = _select(policy, case, case.budget)
    _expect(isinstance(sel, Selection), f"select() must return a Selection, got {type(sel).__name__}")
    _expect(
        _same(case.scores, before[0]) and torch.equal(case.counts, before[1]),
        "select() modified its scores or counts argument",
    )
    _expect(
        all(torch.equal(a, b) for a, b in zip(arguments, before[2:])),
        "select() modified its budget or protect_tail argument",
    )
    B, Hkv, _ = case.scores.shape
    keep, kept = sel.keep, sel.counts
    _expect(
        keep.dtype == torch.int64 and kept.dtype == torch.int64,
        f"Selection.keep and .counts must be int64, got {keep.dtype} and {kept.dtype}",
    )
    _expect(
        tuple(kept.shape) == (B, Hkv), f"Selection.counts must have shape {(B, Hkv)}, got {tuple(kept.shape)}"
    )
    _expect(
        keep.dim() == 3 and tuple(keep.shape[:2]) == (B, Hkv),
        f"Selection.keep must have shape [B={B}, Hkv={Hkv}, K], got {tuple(keep.shape)}",
    )
    budget_l, tail_l = _rows(case.budget, case.counts), _rows(case.protect_tail, case.counts)
    want = case.counts.cpu().clamp(max=torch.tensor(budget_l, dtype=torch.long).reshape(B, Hkv))
    if policy.head_adaptive:
        _expect(
            torch.equal(kept.cpu().sum(dim=1), want.sum(dim=1)),
            f"a head-adaptive policy keeps sum over KV heads of min(budget={_show(case.budget)}, valid "
            f"candidates) per row: counts={case.counts.tolist()}, expected row totals {want.sum(dim=1).tolist()}, "
            f"got {kept.tolist()}",
        )
        _expect(
            bool((kept.cpu() <= case.counts.cpu()).all()),
            f"a head keeps at most its valid candidates: counts={case.counts.tolist()}, kept {kept.tolist()}",
        )
    else:
        _expect(
            torch.equal(kept.cpu(), want),
            f"kept counts must be min(budget={_show(case.budget)}, valid candidates): counts={case.counts.tolist()}, "
            f"expected {want.tolist()}, got {kept.tolist()}",
        )
    _expect(
        keep.shape[2] >= int(kept.max()),
        f"Selection.keep has {keep.shape[2]} columns < counts {kept.tolist()}",
    )
    keep_l, n_l, c_l = keep.tolist(), case.counts.tolist(), kept.tolist()
    head = case.protect_head
    where = f"(budget={_show(case.budget)}, protect_head={head}, protect_tail={_show(case.protect_tail)})"
    kept_sets = []
    for b in range(B):
        for j in range(Hkv):
            n, c, tail = n_l[b][j], c_l[b][j], tail_l[b][j]
            real, rest = keep_l[b][j][:c], keep_l[b][j][c:]
            at = f"row {b}, KV head {j} with {n} valid candidates {where}"
            _expect(
                all(x < y for x, y in zip(real, real[1:])),
                f"{at}: kept indices {real} are not sorted and unique",
            )
            _expect(
                all(0 <= x < n for x in real),
                f"{at}: kept indices {real} leave [0, {n}) (a padding candidate was kept)",
            )
            _expect(all(x == -1 for x in rest), f"{at}: entries of keep past counts must be -1, got {rest}")
            protected = set(range(min(head, n))) | set(range(max(n - tail, 0), n))
            missing = sorted(protected - set(real))
            _expect(not missing, f"{at}: protected candidates {missing} were not kept (kept {real})")
            kept_sets.append((b, j, set(real), protected))
    again = _select(policy, case, case.budget)
    _expect(
        torch.equal(again.keep, keep) and torch.equal(again.counts, kept),
        f"select() is not deterministic {where}: two calls kept {keep.tolist()} and {again.keep.tolist()}",
    )
    if keeps_top_scores:
        scores_l = case.scores.tolist()
        for b, j, real, protected in kept_sets:
            n = n_l[b][j]
            chosen = [scores_l[b][j][i] for i in real - protected]
            dropped = [scores_l[b][j][i] for i in set(range(n)) - real]
            if chosen and dropped and min(chosen) < max(dropped):
                raise AssertionError(
                    f"row {b}, KV head {j} {where}: dropped a candidate scoring {max(dropped)} but "
                    f"kept an unprotected one scoring {min(chosen)} (not the top scores)"
                )
    if nested_budget is not None:
        larger_l = _rows(nested_budget, case.counts)
        _expect(
            all(x >= y for xs, ys in zip(larger_l, budget_l) for x, y in zip(xs, ys)),
            "nested_budget must be >= case.budget",
        )
        larger = _select(policy, case, nested_budget).keep.tolist()
        for b, j, real, _ in kept_sets:
            bigger = set(larger[b][j][: min(n_l[b][j], larger_l[b][j])])
            lost = sorted(real - bigger)
            _expect(
                not lost,
                f"row {b}, KV head {j}: not nested: budget {_show(case.budget)} keeps {lost}, which budget "
                f"{_show(nested_budget)} drops {where}",
            )
    return sel


def assert_selection_conforms(
    policy: SelectionPolicy,
    *,
    nested: bool = False,
    keeps_top_scores: bool = False,
    device: str | torch.device = "cpu",
    sizes: Sizes = DEFAULT_SIZES,
    max_examples: int = 60,
    settings: hypothesis.settings | None = None,
) -> None:
    """Run :func:`check_selection` on hypothesis-drawn :func:`~kvsieve.testing.strategies.selections`: most of
    them evict; for a policy with ``per_row_budgets``, about half have per-row budgets (tensors).

    Args:
        nested: also check that a larger budget keeps a superset (top-k policies are nested; not every policy
            is).
        keeps_top_scores: also check that the unprotected kept candidates are the best-scoring ones.
        settings: hypothesis settings replacing :func:`conformance_settings`.
    """

    @given(case=selections(sizes=sizes, device=device, per_row_budgets=policy.per_row_budgets), extra=st.integers(0, 4))
    def run(case, extra):
        check_selection(
            policy,
            case,
            nested_budget=case.budget + extra if nested else None,
            keeps_top_scores=keeps_top_scores,
        )

    (settings or conformance_settings(max_examples))(run)()


# --------------------------------------------------------------------------------------------- scoring
def check_scoring(
    policy: ScoringPolicy,
    case: CacheCase,
    *,
    backend: KVBackend | None = None,
    tolerances: Mapping[torch.dtype, tuple[float, float]] | None = None,
) -> torch.Tensor:
    """Check a scoring policy on one cache; return its scores.

    Checked: the output is ``float32 [B, Hkv, N]`` (``N = ctx.num_candidates``) on the cache's device; finite
    on valid candidates; the same on a second call; the context's tensors are not modified; and the scores of
    valid candidates do not change when every slot outside ``[starts, ends)`` (left padding, free capacity) of
    the keys and values is poisoned with NaN, huge values or other data. A policy whose ``needs_queries`` is
    False gets an empty ``queries`` tensor, as in :func:`kvsieve.compressor.compress_layer`.

    Args:
        backend: the backend in the context (default: the ``torch`` reference).
        tolerances: ``(rtol, atol)`` per dtype for the poisoned-vs-clean comparison (default
            :data:`SCORE_TOLERANCES`).
    """
    backend = backend or _reference()
    tol = (tolerances or SCORE_TOLERANCES)[case.keys.dtype]
    ctx = case.context(backend, with_queries=policy.needs_queries)
    before = [t.clone() for t in (ctx.queries, ctx.keys, ctx.values, ctx.positions)]
    out = policy.score(ctx)
    _expect(isinstance(out, torch.Tensor), f"score() must return a tensor, got {type(out).__name__}")
    B, Hkv = case.starts.shape
    N = ctx.num_candidates
    _expect(
        tuple(out.shape) == (B, Hkv, N),
        f"scores must have shape [B, Hkv, N] = {(B, Hkv, N)}, got "
        f"{tuple(out.shape)} (cand_counts={ctx.cand_counts.tolist()})",
    )
    _expect(out.dtype == torch.float32, f"scores must be float32, got {out.dtype}")
    _expect(out.device == case.keys.device, f"scores are on {out.device}, the cache on {case.keys.device}")
    after = (ctx.queries, ctx.keys, ctx.values, ctx.positions)
    _expect(all(_same(a, b) for a, b in zip(after, before)), "score() modified the context's tensors")
    valid = torch.arange(N, device=out.device) < ctx.cand_counts[..., None]
    bad = valid & ~torch.isfinite(out)
    if bool(bad.any()):
        raise AssertionError(
            f"scores are not finite on valid candidates at (row, KV head, candidate) "
            f"{bad.nonzero().tolist()[:8]}"
        )
    again = policy.score(ctx)
    _expect(torch.equal(again[valid], out[valid]), "score() is not deterministic: two calls differ")
    live = case.live_mask
    for i, kind in enumerate(POISONS):
        poisoned = case.replace(
            keys=poison(case.keys, live, kind, seed=i), values=poison(case.values, live, kind, seed=i + 100)
        )
        got = policy.score(poisoned.context(backend, with_queries=policy.needs_queries))
        _expect(tuple(got.shape) == tuple(out.shape), f"with {kind} padding, scores changed shape")
        _close(
            got[valid],
            out[valid],
            tol,
            f"scores of valid candidates changed when slots outside [starts, ends) held {kind!r}",
        )
    return out


def assert_scoring_conforms(
    policy: ScoringPolicy,
    *,
    backend: KVBackend | None = None,
    queries_are_last: bool | None = None,
    device: str | torch.device = "cpu",
    dtypes: Collection[torch.dtype] = (torch.float32,),
    sizes: Sizes = DEFAULT_SIZES,
    max_examples: int = 40,
    settings: hypothesis.settings | None = None,
) -> None:
    """Run :func:`check_scoring` on hypothesis-drawn :func:`~kvsieve.testing.strategies.caches`.

    Args:
        queries_are_last: restrict to contexts whose window queries are (True: prefill, needed by policies
            that normalise over every visible key) or are not (False) the last live tokens; None: both.
        dtypes: the cache dtypes to try (each gets ``max_examples`` examples).
    """
    for dtype in dtypes:

        @given(case=caches(sizes=sizes, dtype=dtype, device=device, queries_are_last=queries_are_last))
        def run(case):
            check_scoring(policy, case, backend=backend)

        (settings or conformance_settings(max_examples))(run)()


# --------------------------------------------------------------------------------------------- backends
def _tolerances(case_dtype, tolerances, score_tolerances):
    return (tolerances or TOLERANCES)[case_dtype], (score_tolerances or SCORE_TOLERANCES)[case_dtype]


def _check_output(name, got, want, dtype, tol) -> None:
    _expect(isinstance(got, torch.Tensor), f"{name} must return a tensor, got {type(got).__name__}")
    _expect(
        tuple(got.shape) == tuple(want.shape),
        f"{name}: shape {tuple(got.shape)}, reference {tuple(want.shape)}",
    )
    _expect(got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}")
    _close(got, want, tol, f"{name} differs from the reference")


def _check_contract_checks(backend, reference, case: CacheCase) -> None:
    """The contract checks' device work (``cache_fingerprint``/``cache_changed``, ``nonfinite_scores``,
    ``check_selection``; semantics in :mod:`kvsieve.contract_ops`): the fingerprint notices a change to each part
    of the live cache and nothing outside it; the score and selection checks flag what the reference flags, and
    the selection comes back with the reference's stand-in."""
    k, v, p, s, e = case.keys, case.values, case.positions, case.starts, case.ends
    live = case.live_mask
    before = backend.cache_fingerprint(k, v, p, s, e)
    _expect(not bool(backend.cache_changed(before, k, v, p, s, e)),
            "cache_changed: an unchanged cache counted as changed")
    for i, kind in enumerate(POISONS):
        _expect(not bool(backend.cache_changed(before, poison(k, live, kind, 10 + i), poison(v, live, kind, 20 + i),
                                               p, s, e)),
                f"cache_changed: unused slots poisoned with {kind!r} counted as a change of the cache")
    slot = int(s[0, 0])  # row 0, KV head 0 has live slots (ends - starts >= W >= 1)
    cache = {"keys": k, "values": v, "positions": p, "starts": s, "ends": e}
    changed = {name: t.clone() for name, t in cache.items()}
    changed["keys"][0, 0, slot] += 1
    changed["values"][0, 0, slot] += 1
    changed["positions"][0, 0, slot] += 1
    changed["starts"][0, 0] += 1
    changed["ends"][0, 0] -= 1
    for name, tensor in changed.items():
        parts = [tensor if part == name else original for part, original in cache.items()]
        _expect(bool(backend.cache_changed(before, *parts)),
                f"cache_changed: a change of the live {name} (row 0, KV head 0) went unnoticed")

    counts = (case.cand_ends - case.cand_starts).clamp(min=0)
    N = int(counts.max())
    gen = torch.Generator().manual_seed(N)
    scores = torch.randn(*counts.shape, N, generator=gen).to(k.device)
    past = torch.arange(N, device=k.device) >= counts[..., None]
    first = torch.tensor([0], device=k.device)
    variants = {"finite": scores, "a NaN at a candidate": scores.index_fill(-1, first, math.nan),
                "inf past the candidates": scores.masked_fill(past, math.inf)}
    for name, tensor in variants.items():
        want, got = bool(reference.nonfinite_scores(tensor, counts)), bool(backend.nonfinite_scores(tensor, counts))
        _expect(got == want, f"nonfinite_scores: {got} for scores with {name}, the reference says {want}")

    budget = max(1, N // 2)
    K = min(budget, N)
    kept = counts.clamp(max=budget)
    idx = torch.arange(K, device=k.device)
    keep = torch.where(idx < kept[..., None], idx, -1)
    selections = {"a valid selection": (keep, kept)}
    if int(kept[0, 0]) >= 2:
        duplicated = keep.clone()
        duplicated[0, 0, 1] = duplicated[0, 0, 0]
        selections["a duplicated index"] = (duplicated, kept)
    outside = keep.clone()
    outside[0, 0, int(kept[0, 0]) - 1] = counts[0, 0]
    selections["an index past the candidates"] = (outside, kept)
    fewer = kept.clone()
    fewer[0, 0] -= 1  # row 0, KV head 0 keeps min(budget, n) >= 1
    selections["one kept too few"] = (keep, fewer)
    for name, (chosen, chosen_counts) in selections.items():
        want = reference.check_selection(chosen, chosen_counts, counts, budget, 0, 0, False)
        got = backend.check_selection(chosen.clone(), chosen_counts.clone(), counts, budget, 0, 0, False)
        _expect(bool(got[0]) == bool(want[0]), f"check_selection: broken={bool(got[0])} for {name}, the reference "
                                               f"says {bool(want[0])}")
        _expect(torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]),
                f"check_selection: for {name}, keep/kept differ from the reference's (the selection, or its stand-in "
                f"when broken)")


def _check_prefill(backend, reference, case: PrefillCase, tol) -> None:
    args = (case.attention_mask, case.scale)
    want = reference.prefill_attention(case.queries, case.keys, case.values, *args)
    got = backend.prefill_attention(case.queries, case.keys, case.values, *args)
    _check_output("prefill_attention", got, want, case.queries.dtype, tol)
    if case.attention_mask is None:
        return
    # In prefill the left padding holds real (finite) tokens' K/V, not free memory: it must not matter, but it
    # is only replaced by other finite data, never by NaN.
    real = (torch.arange(case.keys.shape[2], device=case.pad.device) >= case.pad[:, None])[:, None]
    real = real.expand(case.keys.shape[:3])
    keys, values = poison(case.keys, real, "noise", 1), poison(case.values, real, "noise", 2)
    got = backend.prefill_attention(case.queries, keys, values, *args)
    _check_output("prefill_attention with other data in the padding", got, want, case.queries.dtype, tol)


def _check_cache_primitives(backend, reference, case: CacheCase, primitives, tol, score_tol) -> None:
    q, k, v, scale = case.queries, case.keys, case.values, case.scale
    s, e, cs, ce = case.starts, case.ends, case.cand_starts, case.cand_ends
    live, cand = case.live_mask, case.candidate_mask
    variants = [("clean", k, v, k)] + [
        (kind, poison(k, live, kind, 1), poison(v, live, kind, 2), poison(k, cand, kind, 3))
        for kind in POISONS
    ]
    want_lse = reference.window_lse(q, k, s, e, scale)
    want_decode = reference.decode_attention(q, k, v, s, e, scale)
    lses = [None] + (
        [want_lse] if case.queries_are_last else []
    )  # a given lse assumes candidates before the window
    want_scores = [reference.window_scores(q, k, cs, ce, scale, lse) for lse in lses]
    counts = (ce - cs).clamp(min=0)
    for kind, k_live, v_live, k_cand in variants:
        suffix = "" if kind == "clean" else f" (unused slots poisoned with {kind!r})"
        if "decode_attention" in primitives:
            got = backend.decode_attention(q, k_live, v_live, s, e, scale)
            _check_output("decode_attention" + suffix, got, want_decode, q.dtype, tol)
        if "window_lse" in primitives:
            got = backend.window_lse(q, k_live, s, e, scale)
            _check_output("window_lse" + suffix, got, want_lse, torch.float32, score_tol)
        if "window_scores" in primitives:
            for lse, want in zip(lses, want_scores):
                name = "window_scores" + (" with lse" if lse is not None else "") + suffix
                got = backend.window_scores(q, k_cand, cs, ce, scale, lse)
                _check_output(name, got, want, torch.float32, score_tol)
                past = torch.arange(got.shape[-1], device=got.device) >= counts[..., None]
                _expect(
                    bool((got[past] == 0).all()), f"{name}: entries past a row's candidate count must be 0"
                )


def _check_compact(backend, reference, case: CompactionCase) -> None:
    c = case.cache
    live = c.live_mask
    for i, kind in enumerate(("clean", *POISONS)):
        keys = c.keys if kind == "clean" else poison(c.keys, live, kind, i)
        values = c.values if kind == "clean" else poison(c.values, live, kind, i + 100)
        want_k, want_v = keys.clone(), values.clone()
        reference.compact(want_k, want_v, case.keep, case.counts, case.dest_starts)
        got_k, got_v = keys.clone(), values.clone()
        keep_before = case.keep.clone()
        result = backend.compact(got_k, got_v, case.keep.clone(), case.counts, case.dest_starts)
        _expect(result is None, "compact must work in place and return None")
        _expect(torch.equal(case.keep, keep_before), "compact modified keep")
        for name, got, want in (("keys", got_k, want_k), ("values", got_v, want_v)):
            if not _same(got, want):
                wrong = ((got != want) & ~(got.isnan() & want.isnan())).any(-1).nonzero().tolist()[:8]
                raise AssertionError(
                    f"compact: {name} differ from the reference (unused slots: {kind}) at (row, KV "
                    f"head, slot) {wrong}"
                )


def _gemm_tolerance(want: torch.Tensor, tol: tuple[float, float]) -> tuple[float, float]:
    """``(rtol, atol)`` for a GEMM's output ``want``: ``tol``'s atol taken relative to ``max |want|``.

    Each output is a ``K``-long sum. Implementations that add its terms in another order (tiles, split ``K``, a
    BLAS's blocking, a wider accumulator) differ by a few fp32 roundings of the *terms'* size, ``sum_k |x_k w_k|``,
    which does not shrink with ``|y|`` where the terms cancel; the fp32 sum is then rounded to the dtype, where two
    sums a hair apart may round to neighbouring values (one ulp: up to 2**-7 of ``|y|`` in bf16, 2**-10 in fp16),
    and in ``gate_up_silu`` a gate one ulp apart moves ``silu(gate) * up`` by ``ulp(gate) * |silu'(gate)| * |up|``
    even where the product is small. So the rounding is bounded by ``rtol * |y|`` and the rest by ``atol * max
    |y|``: the output's scale tracks the terms' (for :func:`~kvsieve.testing.strategies.layer_op_inputs`' random
    inputs, ``max sum_k |x_k w_k|`` is 1 to 4 times ``max |y|`` in 99% of the draws), and the bound is
    scale-invariant, as rounding errors are. With :data:`TOLERANCES` that allows some 20 fp32 ulps of the terms in
    fp32 (reordering a sum of at most ~100 terms costs one or two) and 2.5 to 5 bf16 ulps of the largest output in
    bf16; a dropped bias or residual, swapped gate and up, or a missing row moves outputs by a sizeable fraction
    of ``max |y|``. (Measured: a backend computing in float64 and rounding once, and the triton backend under the
    interpreter, stay below 0.4 of this bound in every dtype.)
    """
    rtol, atol = tol
    scale = float(want.detach().abs().amax()) if want.numel() else 0.0
    return rtol, atol * scale


def _call(backend, name: str, method: str, args: tuple, keep: Mapping[str, torch.Tensor]):
    """``backend.<method>(*args)``, checking that it leaves the ``keep`` arguments (by name) unchanged."""
    before = {arg: t.clone() for arg, t in keep.items()}
    out = getattr(backend, method)(*args)
    changed = [arg for arg, t in keep.items() if not _same(t, before[arg])]
    _expect(not changed, f"{name} modified its {' and '.join(changed)} argument (a layer operator must leave its "
                         f"inputs alone; only linear may write into the residual's storage)")
    return out


def _check_layer_ops(backend, reference, case: LayerOpsCase, tol) -> None:
    """The fused decoder layer's operators (``rms_norm`` with and without a residual, ``silu_mul``,
    ``gate_up_silu`` with and without a bias, ``linear`` with and without a bias and a residual) on the case's
    inputs: the reference's shapes and dtypes, its values within ``tol`` (for the two GEMMs, ``atol`` relative to
    the largest output: :func:`_gemm_tolerance`), and the inputs left unchanged, except ``linear``'s residual,
    which the caller owns and a backend may overwrite (each call gets its own copy)."""
    c = case
    for residual in (None, c.residual):
        name = "rms_norm" + (" with residual" if residual is not None else "")
        args = (c.x, c.norm_weight, c.eps, residual)
        keep = {"x": c.x, "weight": c.norm_weight, **({"residual": residual} if residual is not None else {})}
        want = reference.rms_norm(*args)
        got = _call(backend, name, "rms_norm", args, keep)
        _expect(isinstance(got, tuple | list) and len(got) == 2,
                f"{name} must return (normed, residual sum), got {type(got).__name__}")
        _check_output(f"{name}: normed", got[0], want[0], want[0].dtype, tol)
        _check_output(f"{name}: the residual sum (residual + x, or x)", got[1], want[1], want[1].dtype, tol)

    name = "silu_mul" + (" of the two halves of one tensor" if c.gate_up_views else "")
    want = reference.silu_mul(c.gate, c.up)
    got = _call(backend, name, "silu_mul", (c.gate, c.up), {"gate": c.gate, "up": c.up})
    _check_output(name, got, want, want.dtype, tol)

    for bias in (None, c.gate_up_bias):
        name = "gate_up_silu" + (" with bias" if bias is not None else "")
        args = (c.x, c.gate_up_weight, bias)
        keep = {"x": c.x, "weight": c.gate_up_weight, **({"bias": bias} if bias is not None else {})}
        want = reference.gate_up_silu(*args)
        got = _call(backend, name, "gate_up_silu", args, keep)
        _check_output(name, got, want, want.dtype, _gemm_tolerance(want, tol))

    for bias, residual in itertools.product((None, c.bias), (None, c.residual)):
        with_ = [part for part, t in (("bias", bias), ("residual", residual)) if t is not None]
        name = "linear" + (f" with {' and '.join(with_)}" if with_ else "")
        keep = {"x": c.hidden, "weight": c.weight, **({"bias": bias} if bias is not None else {})}
        copy = (lambda: None) if residual is None else residual.clone  # linear may write into the residual
        want = reference.linear(c.hidden, c.weight, bias, copy())
        got = _call(backend, name, "linear", (c.hidden, c.weight, bias, copy()), keep)
        _check_output(name, got, want, want.dtype, _gemm_tolerance(want, tol))


def check_backend(
    backend: KVBackend,
    case: CacheCase | CompactionCase | PrefillCase | LayerOpsCase,
    *,
    reference: KVBackend | None = None,
    primitives: Collection[str] = PRIMITIVES,
    tolerances: Mapping[torch.dtype, tuple[float, float]] | None = None,
    score_tolerances: Mapping[torch.dtype, tuple[float, float]] | None = None,
) -> None:
    """Check a backend's primitives against a reference on one input.

    * a :class:`~kvsieve.testing.strategies.CacheCase` checks ``decode_attention``, ``window_lse`` and
      ``window_scores`` (with and, for prefill windows, without a given ``lse``), first on clean inputs, then
      with every slot outside ``[starts, ends)`` (for ``window_scores``: outside the candidates) poisoned with
      each of :data:`POISONS` -- the outputs must not change; and ``contract_checks``: the cache fingerprint
      notices a change of live keys, values, positions or range and ignores poison outside it, and
      ``nonfinite_scores`` and ``check_selection`` flag what the reference flags, with its stand-in;
    * a :class:`~kvsieve.testing.strategies.CompactionCase` checks ``compact``: the buffers after it must
      equal the reference's exactly (NaN equal to NaN), poisoned slots included (a compaction copies; it must
      not touch anything else);
    * a :class:`~kvsieve.testing.strategies.PrefillCase` checks ``prefill_attention``, and that other data in
      the left padding changes nothing;
    * a :class:`~kvsieve.testing.strategies.LayerOpsCase` checks ``layer_ops``, the fused decoder layer's
      operators: ``rms_norm`` (with and without a residual: the normed output and the residual sum),
      ``silu_mul``, ``gate_up_silu`` (with and without a bias) and ``linear`` (with and without a bias and a
      residual), and that none of them modifies its inputs, except ``linear``'s residual (given a copy).

    Outputs must have the reference's shapes and dtypes; values must match within :data:`TOLERANCES` (outputs
    in the input dtype) or :data:`SCORE_TOLERANCES` (fp32 outputs), keyed by the input dtype. For the GEMMs of
    ``layer_ops`` (``gate_up_silu``, ``linear``) the ``atol`` of :data:`TOLERANCES` is relative to the largest
    output (``atol * max |reference|``): their ``K``-long sums round differently in another summation order.

    Args:
        reference: the backend defining the semantics (default: the ``torch`` reference from the registry).
        primitives: the subset of :data:`PRIMITIVES` to check.
    """
    reference = reference or _reference()
    unknown = set(primitives) - set(PRIMITIVES)
    if unknown:
        raise ValueError(f"unknown primitives {sorted(unknown)}; known: {PRIMITIVES}")
    if isinstance(case, PrefillCase):
        if "prefill_attention" in primitives:
            _check_prefill(
                backend, reference, case, _tolerances(case.keys.dtype, tolerances, score_tolerances)[0]
            )
    elif isinstance(case, CompactionCase):
        if "compact" in primitives:
            _check_compact(backend, reference, case)
    elif isinstance(case, CacheCase):
        tol, score_tol = _tolerances(case.keys.dtype, tolerances, score_tolerances)
        _check_cache_primitives(backend, reference, case, set(primitives), tol, score_tol)
        if "contract_checks" in primitives:
            _check_contract_checks(backend, reference, case)
    elif isinstance(case, LayerOpsCase):
        if "layer_ops" in primitives:
            _check_layer_ops(backend, reference, case, _tolerances(case.x.dtype, tolerances, score_tolerances)[0])
    else:
        raise TypeError(
            f"case must be a CacheCase, CompactionCase, PrefillCase or LayerOpsCase, got {type(case).__name__}"
        )


def assert_backend_conforms(
    backend: KVBackend,
    *,
    reference: KVBackend | None = None,
    device: str | torch.device = "cpu",
    dtypes: Collection[torch.dtype] = (torch.float32,),
    primitives: Collection[str] = PRIMITIVES,
    sizes: Sizes = DEFAULT_SIZES,
    max_examples: int = 30,
    settings: hypothesis.settings | None = None,
    tolerances: Mapping[torch.dtype, tuple[float, float]] | None = None,
    score_tolerances: Mapping[torch.dtype, tuple[float, float]] | None = None,
) -> None:
    """Run :func:`check_backend` on hypothesis-drawn caches, compactions, prefills and layer-operator inputs,
    for each dtype.

    Awkward sizes (head dims like 1 or 5, capacities that are no power of two), GQA groups of 1 to 4,
    per-(row, KV head) ranges and left padding come from :mod:`kvsieve.testing.strategies` (for ``layer_ops``: 1
    to ``sizes.max_rows`` rows, widths that are mostly no multiple of 16); pass ``sizes`` to reach a kernel's tile
    sizes. Each dtype and each input kind gets ``max_examples`` examples.
    """
    primitives = set(primitives)
    check = dict(
        reference=reference, primitives=primitives, tolerances=tolerances, score_tolerances=score_tolerances
    )
    cache_primitives = primitives & {"decode_attention", "window_lse", "window_scores", "contract_checks"}
    for dtype in dtypes:
        kinds = []
        if cache_primitives:
            kinds.append(caches(sizes=sizes, dtype=dtype, device=device))
        if "compact" in primitives:
            kinds.append(compactions(sizes=sizes, dtype=dtype, device=device))
        if "prefill_attention" in primitives:
            kinds.append(prefills(sizes=sizes, dtype=dtype, device=device))
        if "layer_ops" in primitives:
            kinds.append(layer_op_inputs(sizes=sizes, dtype=dtype, device=device))
        for strategy in kinds:

            @given(case=strategy)
            def run(case):
                check_backend(backend, case, **check)

            (settings or conformance_settings(max_examples))(run)()
