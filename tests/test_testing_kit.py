"""kvsieve.testing itself: the strategies draw what they promise, and every conformance check catches the
bug it is there for (each broken policy or backend below breaks one rule and must be reported for that rule).
"""

from __future__ import annotations

import collections
import itertools
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import kvsieve.testing
from kvsieve.backends.torch_ref import TorchBackend
from kvsieve.indexing import range_mask
from kvsieve.policies.topk import TopKSelection
from kvsieve.policies.window_attention import WindowAttentionScoring
from kvsieve.policy import Selection, SelectionPolicy
from kvsieve.testing import (
    assert_backend_conforms,
    assert_scoring_conforms,
    assert_selection_conforms,
    check_selection,
    poison,
)
from kvsieve.testing import strategies as kst

pytest_plugins = ["pytester"]

# A broken implementation must be caught quickly and every time: no shrinking, no database, fixed examples.
FIND_BUG = settings(
    max_examples=100,
    deadline=None,
    database=None,
    phases=[Phase.generate],
    derandomize=True,
    report_multiple_bugs=False,
)
PROPERTY = settings(max_examples=40, deadline=None)


def _name(value):
    """Test ids: the broken implementation's class name."""
    return type(value).__name__.lstrip("_") if not isinstance(value, str | torch.dtype) else None


# ------------------------------------------------------------------------------------------------ strategies
@PROPERTY
@given(case=kst.caches())
def test_caches_are_well_formed(case):
    B, Hkv, C, d = case.keys.shape
    H, W = case.queries.shape[1], case.queries.shape[2]
    assert H % Hkv == 0 and case.values.shape == case.keys.shape and case.queries.shape[-1] == d
    assert (0 <= case.starts).all() and (case.starts <= case.cand_starts).all()
    assert (case.cand_starts <= case.cand_ends).all() and (case.cand_ends <= case.ends).all()
    assert (case.ends <= C).all() and (case.ends - case.starts >= W).all()
    assert case.cand_ends[0, 0] > case.cand_starts[0, 0]
    if case.queries_are_last:
        assert (case.cand_ends <= case.ends - W).all()
    live = case.live_mask
    assert ((case.positions >= 0) == live).all()
    positions = case.positions.masked_fill(~live, 1 << 40)
    steps = positions.diff(dim=-1)[live[..., 1:] & live[..., :-1]]
    assert (steps > 0).all()  # positions increase over the live slots
    assert case.scale == pytest.approx(d**-0.5)


def test_caches_reach_gqa_padding_and_awkward_sizes():
    seen = set()

    @settings(max_examples=150, deadline=None, database=None)
    @given(case=kst.caches())
    def collect(case):
        B, Hkv, C, d = case.keys.shape
        seen.update(
            {
                "gqa" if case.queries.shape[1] > Hkv else "mha",
                "padding" if bool((case.starts > 0).any()) else "no padding",
                "free slots" if bool((case.ends < C).any()) else "full",
                "ragged heads" if bool((case.ends != case.ends[:, :1]).any()) else "even heads",
                "odd head dim" if d % 2 else "even head dim",
                "prefill window" if case.queries_are_last else "any window",
            }
        )

    collect()
    assert seen >= {
        "gqa",
        "mha",
        "padding",
        "no padding",
        "free slots",
        "ragged heads",
        "odd head dim",
        "prefill window",
        "any window",
    }


@PROPERTY
@given(case=kst.compactions())
def test_compactions_move_slots_towards_the_front(case):
    c = case.cache
    for b, j in itertools.product(*map(range, case.counts.shape)):
        n = int(case.counts[b, j])
        kept = case.keep[b, j, :n]
        assert (kept.diff() > 0).all()
        assert (kept >= c.cand_starts[b, j]).all() and (kept < c.cand_ends[b, j]).all()
        assert (kept >= case.dest_starts[b, j] + torch.arange(n)).all()


@PROPERTY
@given(case=kst.prefills())
def test_prefills_are_causal_with_left_padding(case):
    B, H, Q, d = case.queries.shape
    K = case.keys.shape[2]
    assert K >= Q and H % case.keys.shape[1] == 0
    if case.attention_mask is not None:
        assert case.attention_mask.shape == (B, 1, Q, K) and case.attention_mask.dtype == torch.bool
        assert not case.attention_mask[..., K - Q :].triu(1).any()  # no query sees a later key


@PROPERTY
@given(case=kst.layer_op_inputs(dtype=torch.bfloat16))
def test_layer_op_inputs_are_well_formed(case):
    lead, D = case.x.shape[:-1], case.x.shape[-1]
    F = case.gate.shape[-1]
    assert case.residual.shape == case.x.shape and case.norm_weight.shape == (D,)
    assert case.gate.shape == case.up.shape == case.hidden.shape == (*lead, F)
    assert case.gate_up_weight.shape == (2 * F, D) and case.gate_up_bias.shape == (2 * F,)
    assert case.weight.shape == (D, F) and case.bias.shape == (D,)
    assert 1 <= math.prod(lead) <= 40 and 8 <= D <= 96 and 3 <= F <= 70 and case.eps > 0
    tensors = [getattr(case, name) for name in ("x", "residual", "norm_weight", "gate", "up", "gate_up_weight",
                                                "gate_up_bias", "hidden", "weight", "bias")]
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.isfinite().all() for t in tensors)
    shared = case.gate.untyped_storage().data_ptr() == case.up.untyped_storage().data_ptr()
    assert shared == case.gate_up_views


def test_layer_op_inputs_reach_awkward_sizes():
    seen = set()

    @settings(max_examples=150, deadline=None, database=None, phases=[Phase.generate], derandomize=True)
    @given(case=kst.layer_op_inputs())
    def collect(case):
        M, D, F = math.prod(case.x.shape[:-1]), case.x.shape[-1], case.gate.shape[-1]
        seen.update(
            {
                "one row" if M == 1 else "rows",
                "rows past 32" if M > 32 else "rows up to 32",
                "D no multiple of 16" if D % 16 else "D a multiple of 16",
                "odd F" if F % 2 else "even F",
                "gate/up views" if case.gate_up_views else "gate/up tensors",
                "[B, 1, D]" if case.x.dim() == 3 and case.x.shape[1] == 1 else "other layout",
                "eps that matters" if case.eps > 0.1 else "small eps",
            }
        )

    collect()
    assert seen >= {
        "one row", "rows", "rows past 32", "rows up to 32", "D no multiple of 16", "odd F", "even F",
        "gate/up views", "gate/up tensors", "[B, 1, D]", "other layout", "eps that matters", "small eps",
    }


@PROPERTY
@given(case=kst.selections(per_row_budgets=True))
def test_selections_protect_at_most_the_budget(case):
    B, Hkv, N = case.scores.shape
    assert case.counts.shape == (B, Hkv) and (case.counts <= N).all()
    budgets, tails = case.budgets, case.tails
    assert budgets.shape == tails.shape == (B, Hkv)
    assert (1 <= budgets).all() and (budgets <= N + 2).all() and (case.protect_head + tails <= budgets).all()
    assert isinstance(case.protect_head, int) and case.protect_head >= 0 and (tails >= 0).all()
    if case.per_row:  # as kvsieve passes them: int64 [B, Hkv] tensors, one value per row
        for table in (case.budget, case.protect_tail):
            assert table.dtype == torch.int64 and table.shape == (B, Hkv)
            assert (table == table[:, :1]).all()
    else:
        assert isinstance(case.budget, int) and isinstance(case.protect_tail, int)
    assert case.evicts == bool((case.counts > budgets).any())
    valid = torch.arange(N) < case.counts[..., None]
    assert torch.isfinite(case.scores[valid]).all()


@PROPERTY
@given(case=kst.selections())
def test_selections_without_per_row_budgets_draw_ints(case):
    assert isinstance(case.budget, int) and isinstance(case.protect_tail, int) and not case.per_row


@pytest.mark.parametrize("per_row_budgets", [False, True], ids=["int budgets", "per-row budgets"])
def test_most_selections_evict_and_edge_cases_stay(per_row_budgets):
    """Most drawn selections must drop candidates (a budget at least every count tests little), and the edge
    cases must still be drawn: budgets that keep everything, empty rows, everything kept protected, ties,
    non-finite padding, and (for a policy with per_row_budgets) rows with different budgets."""
    seen = collections.Counter()

    @settings(max_examples=500, deadline=None, database=None, phases=[Phase.generate], derandomize=True)
    @given(case=kst.selections(per_row_budgets=per_row_budgets))
    def collect(case):
        budgets, tails = case.budgets, case.tails
        evicting = case.counts > budgets
        N = case.scores.shape[-1]
        valid = torch.arange(N) < case.counts[..., None]
        scores = case.scores[valid]
        seen.update(
            {
                "total": True,
                "evicts": case.evicts,
                "keeps all": not case.evicts,
                "evicts by score": bool((evicting & (budgets > case.protect_head + tails)).any()),
                "evicts with every kept protected": bool((evicting & (budgets == case.protect_head + tails)).any()),
                "a row keeps all while another evicts": case.evicts and bool((case.counts <= budgets).any()),
                "budget over N": bool((budgets > N).any()),
                "empty row": bool((case.counts == 0).any()),
                "head and tail": case.protect_head > 0 and bool((tails > 0).any()),
                "ties": scores.numel() > scores.unique().numel(),
                "nan padding": bool(case.scores[~valid].isnan().any()),
                "inf padding": bool(case.scores[~valid].isinf().any()),
                "per-row tensors": case.per_row,
                "rows differ": case.per_row and bool((budgets != budgets[:1]).any()),
                "expanded view": case.per_row and case.scores.shape[1] > 1 and 0 in case.budget.stride(),
            }
        )

    collect()
    fraction = seen["evicts"] / seen["total"]
    assert fraction >= 0.8, f"only {fraction:.0%} of the drawn selections evict: {dict(seen)}"
    assert seen["evicts by score"] >= 0.5 * seen["total"], dict(seen)  # most must choose by score, not protection
    assert seen["keeps all"] >= 0.05 * seen["total"], dict(seen)
    expected = {
        "evicts with every kept protected",
        "a row keeps all while another evicts",
        "budget over N",
        "empty row",
        "head and tail",
        "ties",
        "nan padding",
        "inf padding",
    }
    if per_row_budgets:
        expected |= {"per-row tensors", "rows differ", "expanded view"}
        assert seen["per-row tensors"] >= 0.3 * seen["total"], dict(seen)
    else:
        assert not seen["per-row tensors"]
    missing = {name for name in expected if not seen[name]}
    assert not missing, f"never drawn: {missing} ({dict(seen)})"


@pytest.mark.parametrize("kind", kvsieve.testing.POISONS)
def test_poison_fills_only_the_unkept_slots(kind):
    buf = torch.randn(2, 3, 7, 4, dtype=torch.float16)
    keep = range_mask(torch.tensor([[0, 2, 1], [3, 0, 0]]), torch.tensor([[7, 5, 1], [6, 3, 0]]), 7)
    out = poison(buf, keep, kind)
    assert torch.equal(out[keep], buf[keep])
    assert not torch.equal(out[~keep], buf[~keep])
    if kind == "huge":
        assert (out[~keep].abs() == torch.finfo(torch.float16).max).all()


def test_public_names_resolve_lazily():
    for name in kvsieve.testing.__all__:
        assert getattr(kvsieve.testing, name) is not None
    with pytest.raises(AttributeError):
        kvsieve.testing.no_such_name  # noqa: B018


def test_pytest_plugin_imports_nothing_heavy():
    """pytest loads the plugin in every project where kvsieve is installed, test extra or not."""
    code = "import sys, kvsieve.testing.pytest_plugin; assert not {'hypothesis', 'torch'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------ selection
class _Unsorted(TopKSelection):
    def select(self, scores, counts, budget, protect_head=0, protect_tail=0):
        sel = super().select(scores, counts, budget, protect_head, protect_tail)
        head = sel.keep[..., :1].clone()  # rotate the first kept index to the back of the real ones
        keep = sel.keep.clone()
        for b, j in zip(*torch.nonzero(sel.counts > 1).T.tolist()):
            c = int(sel.counts[b, j])
            keep[b, j, : c - 1], keep[b, j, c - 1] = sel.keep[b, j, 1:c], head[b, j, 0]
        return Selection(keep, sel.counts)


class _Unprotected(TopKSelection):
    def select(self, scores, counts, budget, protect_head=0, protect_tail=0):
        return super().select(scores, counts, budget)


class _KeepsPadding(TopKSelection):
    def select(self, scores, counts, budget, protect_head=0, protect_tail=0):
        N = scores.shape[-1]
        return super().select(scores, torch.full_like(counts, N), budget, protect_head, protect_tail)


class _WrongCount(TopKSelection):
    def select(self, scores, counts, budget, protect_head=0, protect_tail=0):
        sel = super().select(scores, counts, budget + 1, protect_head, protect_tail)
        return sel


class _Random(TopKSelection):
    """Not deterministic, reproducibly: every other call ranks the scores upside down. (With random noise,
    hypothesis's replay of the failing example could keep the same candidates twice and raise a FlakyFailure
    instead: for 5 of 40 torch seeds, and 18 of 40 once the first examples drawn evict.)"""

    _calls = itertools.count()

    def select(self, scores, counts, budget, protect_head=0, protect_tail=0):
        flipped = -scores if next(self._calls) % 2 else scores
        return super().select(flipped, counts, budget, protect_head, protect_tail)


class _BottomWhenOdd(TopKSelection):
    """Valid and deterministic, but a larger budget may keep a different set (not nested), and an odd budget
    keeps the lowest scores (not top-k)."""

    def select(self, scores, counts, budget, protect_head=0, protect_tail=0):
        odd = (torch.as_tensor(budget) % 2 == 1).to(scores.device)  # per row when the budgets are
        flipped = torch.where(odd[..., None] if odd.dim() else odd, -scores, scores)
        return super().select(flipped, counts, budget, protect_head, protect_tail)


class _ModifiesScores(TopKSelection):
    def select(self, scores, counts, budget, protect_head=0, protect_tail=0):
        sel = super().select(scores, counts, budget, protect_head, protect_tail)
        scores.nan_to_num_(0.0, 0.0, 0.0)
        return sel


class _FirstRowsBudget(TopKSelection):
    """Per-row budgets read as one: every row gets row 0's budget and protected tail."""

    def select(self, scores, counts, budget, protect_head=0, protect_tail=0):
        if isinstance(budget, torch.Tensor):
            budget, protect_tail = int(budget[0, 0]), int(protect_tail[0, 0])
        return super().select(scores, counts, budget, protect_head, protect_tail)


class _FirstRowsTail(TopKSelection):
    """Right per-row budgets, but every row protects row 0's tail."""

    def select(self, scores, counts, budget, protect_head=0, protect_tail=0):
        if isinstance(protect_tail, torch.Tensor):
            protect_tail = int(protect_tail[0, 0])
        return super().select(scores, counts, budget, protect_head, protect_tail)


class _ModifiesTail(TopKSelection):
    def select(self, scores, counts, budget, protect_head=0, protect_tail=0):
        sel = super().select(scores, counts, budget, protect_head, protect_tail)
        if isinstance(protect_tail, torch.Tensor) and 0 not in protect_tail.stride():  # writable in place
            protect_tail.zero_()
        return sel


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (_FirstRowsBudget(), "kept counts must be min"),
        (_FirstRowsTail(), "protected candidates"),
        (_ModifiesTail(), "modified its budget or protect_tail"),
        (_Unsorted(), "not sorted and unique"),
        (_Unprotected(), "protected candidates"),
        (_KeepsPadding(), "a padding candidate was kept|kept counts must be"),
        (_WrongCount(), "kept counts must be min"),
        (_Random(), "not deterministic"),
        (_ModifiesScores(), "modified its scores"),
    ],
    ids=_name,
)
def test_selection_checks_catch(policy, message):
    with pytest.raises(AssertionError, match=message):
        assert_selection_conforms(policy, settings=FIND_BUG)


def test_nested_and_top_scores_are_opt_in():
    assert_selection_conforms(_BottomWhenOdd(), max_examples=30)
    with pytest.raises(AssertionError, match="not nested"):
        assert_selection_conforms(_BottomWhenOdd(), nested=True, settings=FIND_BUG)
    with pytest.raises(AssertionError, match="not the top scores"):
        assert_selection_conforms(_BottomWhenOdd(), keeps_top_scores=True, settings=FIND_BUG)


class _IntsOnly(SelectionPolicy):
    """A policy without per_row_budgets: it must only ever be given integers."""

    def select(self, scores, counts, budget, protect_head=0, protect_tail=0):
        assert isinstance(budget, int) and isinstance(protect_tail, int), (budget, protect_tail)
        return TopKSelection().select(scores, counts, budget, protect_head, protect_tail)


def test_policies_without_per_row_budgets_get_integers():
    assert_selection_conforms(_IntsOnly(), nested=True, keeps_top_scores=True, max_examples=40)


@PROPERTY
@given(case=kst.selections(per_row_budgets=True), extra=st.integers(0, 3))
def test_check_selection_calls_a_policy_without_per_row_budgets_once_per_row(case, extra):
    """A per-row case reaches such a policy as kvsieve would call it: once per row, with that row's integers."""
    sel = check_selection(_IntsOnly(), case, nested_budget=case.budget + extra, keeps_top_scores=True)
    want = check_selection(TopKSelection(), case, nested_budget=case.budget + extra, keeps_top_scores=True)
    assert torch.equal(sel.counts, want.counts)
    K = int(want.counts.max())
    assert torch.equal(sel.keep[..., :K], want.keep[..., :K])


def test_check_selection_refuses_budgets_per_kv_head_for_a_policy_called_per_row():
    case = kst.SelectionCase(
        scores=torch.randn(1, 2, 5),
        counts=torch.tensor([[5, 5]]),
        budget=torch.tensor([[2, 3]]),
        protect_head=0,
        protect_tail=torch.tensor([[0, 0]]),
    )
    with pytest.raises(ValueError, match="same for every KV head"):
        check_selection(_IntsOnly(), case)
    check_selection(TopKSelection(), case, nested_budget=case.budget + 1)  # per_row_budgets: [B, Hkv] is fine


# ------------------------------------------------------------------------------------------------ scoring
class _ReadsPadding(WindowAttentionScoring):
    def score(self, ctx):
        return super().score(ctx) + ctx.keys.float().mean()  # the mean runs over padding and free slots too


class _WrongShape(WindowAttentionScoring):
    def score(self, ctx):
        return super().score(ctx)[..., :-1]


class _NotFinite(WindowAttentionScoring):
    def score(self, ctx):
        return super().score(ctx) / 0.0


class _Float64(WindowAttentionScoring):
    def score(self, ctx):
        return super().score(ctx).double()


class _ModifiesKeys(WindowAttentionScoring):
    def score(self, ctx):
        ctx.keys[..., :1, :].zero_()
        return super().score(ctx)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (_ReadsPadding(), "changed when slots outside"),
        (_WrongShape(), "must have shape"),
        (_NotFinite(), "not finite"),
        (_Float64(), "must be float32"),
        (_ModifiesKeys(), "modified the context"),
    ],
    ids=_name,
)
def test_scoring_checks_catch(policy, message):
    with pytest.raises(AssertionError, match=message):
        assert_scoring_conforms(policy, settings=FIND_BUG)


def test_scoring_that_needs_no_queries_gets_none():
    class SaysItNeedsNoQueries(WindowAttentionScoring):
        needs_queries = False

    with pytest.raises((ValueError, RuntimeError)):  # it reads the empty queries tensor compress_layer passes
        assert_scoring_conforms(SaysItNeedsNoQueries(), settings=FIND_BUG)


# ------------------------------------------------------------------------------------------------ backends
class _DecodeIgnoresStarts(TorchBackend):
    def decode_attention(self, queries, keys, values, starts, ends, scale):
        return super().decode_attention(queries, keys, values, torch.zeros_like(starts), ends, scale)


class _LseReadsPastEnds(TorchBackend):
    def window_lse(self, queries, keys, starts, ends, scale):
        return super().window_lse(queries, keys, starts, (ends + 1).clamp(max=keys.shape[2]), scale)


class _ScoresMaskWithBias(TorchBackend):
    """Masks the padding of short candidate rows by adding -inf to their logits: NaN + -inf is NaN."""

    def window_scores(self, queries, keys, cand_starts, cand_ends, scale, lse=None):
        B, H, W, d = queries.shape
        Hkv = keys.shape[1]
        counts = (cand_ends - cand_starts).clamp(min=0)
        offsets = torch.arange(int(counts.max()))
        slots = (cand_starts[..., None] + offsets).clamp(max=keys.shape[2] - 1)
        valid = offsets < counts[..., None]
        cand = keys.gather(2, slots[..., None].expand(*slots.shape, d)).float()
        q = queries.reshape(B, Hkv, H // Hkv, W, d).float()
        logits = torch.einsum("bjgwd,bjnd->bjgwn", q, cand) * scale
        logits = logits + torch.where(valid, 0.0, float("-inf"))[:, :, None, None]
        norm = torch.logsumexp(logits, -1, keepdim=True) if lse is None else lse.reshape(B, Hkv, -1, W, 1)
        return torch.exp(logits - norm).sum(dim=(2, 3)).nan_to_num(0.0)  # rows without candidates: zeros


class _CompactClearsTheRest(TorchBackend):
    def compact(self, keys, values, keep, counts, dest_starts):
        super().compact(keys, values, keep, counts, dest_starts)
        keys[..., -1, :] = 0.0  # touches a slot outside the written range


class _FingerprintIgnoresValues(TorchBackend):
    def cache_fingerprint(self, keys, values, positions, starts, ends):
        return super().cache_fingerprint(keys, torch.zeros_like(values), positions, starts, ends)

    def cache_changed(self, before, keys, values, positions, starts, ends):
        return super().cache_changed(before, keys, torch.zeros_like(values), positions, starts, ends)


class _NonfiniteIgnoresCounts(TorchBackend):
    def nonfinite_scores(self, scores, counts):
        return (~scores.isfinite()).any()


class _SelectionNeverBroken(TorchBackend):
    def check_selection(self, keep, kept, counts, budget, protect_head, protect_tail, head_adaptive):
        return torch.zeros((), dtype=torch.bool), keep, kept


class _PrefillIgnoresMask(TorchBackend):
    def prefill_attention(self, queries, keys, values, attention_mask, scale):
        return super().prefill_attention(queries, keys, values, None, scale)


class _DecodeReturnsFloat32(TorchBackend):
    def decode_attention(self, queries, keys, values, starts, ends, scale):
        return super().decode_attention(queries.float(), keys.float(), values.float(), starts, ends, scale)


class _LinearDropsBias(TorchBackend):
    def linear(self, x, weight, bias=None, residual=None):
        return super().linear(x, weight, None, residual)


class _LinearDropsResidual(TorchBackend):
    def linear(self, x, weight, bias=None, residual=None):
        return super().linear(x, weight, bias, None)


class _LinearDropsRowsPast32(TorchBackend):
    """A kernel whose grid covers only its first tile of 32 rows."""

    def linear(self, x, weight, bias=None, residual=None):
        out = super().linear(x, weight, bias, residual)
        out.view(-1, out.shape[-1])[32:] = 0
        return out


class _LinearReturnsFloat32(TorchBackend):
    def linear(self, x, weight, bias=None, residual=None):
        return super().linear(x, weight, bias, residual).float()


class _GateUpSwapped(TorchBackend):
    """``silu(up) * gate``: close to right for small activations (``silu(z) ~ z / 2`` near 0), so only the larger
    ones the strategy draws (and the biases) catch it."""

    def gate_up_silu(self, x, weight, bias=None):
        gate, up = torch.nn.functional.linear(x, weight, bias).chunk(2, dim=-1)
        return self.silu_mul(up, gate)


class _NormReturnsTheResidual(TorchBackend):
    """Returns the residual it was given as the new residual stream, not ``residual + x``."""

    def rms_norm(self, x, weight, eps, residual=None):
        normed, total = super().rms_norm(x, weight, eps, residual)
        return normed, total if residual is None else residual


class _NormIgnoresEps(TorchBackend):
    def rms_norm(self, x, weight, eps, residual=None):
        return super().rms_norm(x, weight, 1e-6, residual)


class _NormAddsInPlace(TorchBackend):
    """Right values, but the sum is accumulated into the caller's residual."""

    def rms_norm(self, x, weight, eps, residual=None):
        if residual is None:
            return super().rms_norm(x, weight, eps)
        return super().rms_norm(residual.add_(x), weight, eps)


class _SiluMulInPlace(TorchBackend):
    """Right values, computed in the gate's storage."""

    def silu_mul(self, gate, up):
        return torch.nn.functional.silu(gate, inplace=True).mul_(up)


class _LayerOpsAnotherWay(TorchBackend):
    """Every layer operator computed otherwise than the reference, in float64 and rounded once (a GEMM as a BLAS
    with another summation order would, or a fused kernel); ``linear`` writes into the residual it is given (the
    caller owns it). Within tolerance: must pass."""

    def rms_norm(self, x, weight, eps, residual=None):
        total = x if residual is None else residual + x
        hidden = total.double() * torch.rsqrt(total.double().pow(2).mean(-1, keepdim=True) + eps)
        return (weight.double() * hidden).to(x.dtype), total

    def silu_mul(self, gate, up):
        return (torch.nn.functional.silu(gate.double()) * up.double()).to(gate.dtype)

    def gate_up_silu(self, x, weight, bias=None):
        out = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
        gate, up = out.to(x.dtype).chunk(2, dim=-1)
        return self.silu_mul(gate, up)

    def linear(self, x, weight, bias=None, residual=None):
        out = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
        if residual is None:
            return out.to(x.dtype)
        return residual.copy_(out + residual.double())


class _SlightlyOff(TorchBackend):
    """Within fp32 tolerance everywhere: must pass."""

    def prefill_attention(self, queries, keys, values, attention_mask, scale):
        return super().prefill_attention(queries, keys, values, attention_mask, scale) * (1 + 1e-7)

    def window_scores(self, queries, keys, cand_starts, cand_ends, scale, lse=None):
        return super().window_scores(queries, keys, cand_starts, cand_ends, scale, lse) * (1 + 1e-6)


@pytest.mark.parametrize(
    ("backend", "primitive", "message", "dtype"),
    [
        (_DecodeIgnoresStarts(), "decode_attention", "decode_attention", torch.float32),
        (_LseReadsPastEnds(), "window_lse", "window_lse", torch.float32),
        (_ScoresMaskWithBias(), "window_scores", "window_scores.*poisoned", torch.float32),
        (_CompactClearsTheRest(), "compact", "compact: keys differ", torch.float32),
        (_PrefillIgnoresMask(), "prefill_attention", "prefill_attention", torch.float32),
        (_FingerprintIgnoresValues(), "contract_checks", "change of the live values .* went unnoticed", torch.float32),
        (_NonfiniteIgnoresCounts(), "contract_checks", "nonfinite_scores: True for scores with inf past",
         torch.float32),
        (_SelectionNeverBroken(), "contract_checks", "check_selection: broken=False", torch.float32),
        (
            _DecodeReturnsFloat32(),
            "decode_attention",
            "dtype torch.float32, expected torch.bfloat16",
            torch.bfloat16,
        ),
        (_LinearDropsBias(), "layer_ops", "linear with bias differs from the reference", torch.float32),
        (_LinearDropsResidual(), "layer_ops", "linear with residual differs from the reference", torch.bfloat16),
        (_LinearDropsRowsPast32(), "layer_ops", "linear differs from the reference", torch.float32),
        (_LinearReturnsFloat32(), "layer_ops", "linear: dtype torch.float32, expected torch.bfloat16", torch.bfloat16),
        (_GateUpSwapped(), "layer_ops", "gate_up_silu( with bias)? differs from the reference", torch.bfloat16),
        (_NormReturnsTheResidual(), "layer_ops", "rms_norm with residual: the residual sum .* differs", torch.float32),
        (_NormIgnoresEps(), "layer_ops", "rms_norm: normed differs from the reference", torch.float32),
        (_NormAddsInPlace(), "layer_ops", "rms_norm with residual modified its residual argument", torch.float32),
        (_SiluMulInPlace(), "layer_ops", "silu_mul( of the two halves of one tensor)? modified its gate argument",
         torch.float32),
    ],
    ids=_name,
)
def test_backend_checks_catch(backend, primitive, message, dtype):
    with pytest.raises(AssertionError, match=message):
        assert_backend_conforms(backend, primitives=[primitive], dtypes=(dtype,), settings=FIND_BUG)


def test_backend_within_tolerance_passes():
    assert_backend_conforms(
        _SlightlyOff(), primitives=["prefill_attention", "window_scores"], max_examples=20
    )


@pytest.mark.parametrize("backend", [TorchBackend(), _LayerOpsAnotherWay()], ids=_name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_layer_ops_of_the_reference_and_within_tolerance_pass(backend, dtype):
    assert_backend_conforms(backend, primitives=["layer_ops"], dtypes=(dtype,), max_examples=30)


@settings(max_examples=10, deadline=None)
@given(case=kst.layer_op_inputs())
def test_check_backend_gives_linear_a_copy_of_the_residual(case):
    """A backend's linear may write into the residual (the reference's does): the kit passes copies, so the case's
    residual and every later check stay intact."""
    before = {name: getattr(case, name).clone() for name in ("x", "residual", "hidden")}
    kvsieve.testing.check_backend(_LayerOpsAnotherWay(), case, primitives=["layer_ops"])
    assert all(torch.equal(getattr(case, name), t) for name, t in before.items())


def test_backend_rejects_unknown_primitives():
    with pytest.raises(ValueError, match="unknown primitives"):
        kvsieve.testing.check_backend(TorchBackend(), None, primitives=["flash_decode"])


# -------------------------------------------------------------------------------------------- pytest plugin
def test_pytest_plugin_fixtures_and_gpu_marker(pytester, tiny_model, kvsieve_registry):
    # An in-process run drops the modules first imported during it, leaving transformers' model modules
    # half-forgotten: the fixtures requested here import everything the inner run touches beforehand.
    kvsieve_registry.names("scoring")
    pytester.makepyfile(
        """
        import pytest
        import kvsieve


        class Extra:
            @kvsieve.hookimpl
            def kvsieve_compressors(self):
                from kvsieve.policies.full import FullCache
                return {"extra": FullCache}


        def test_register(kvsieve_registry):
            kvsieve_registry.register(Extra(), name="extra-plugin", distribution="extra-dist 1.0")
            entry = kvsieve_registry.get("compressor", "extra")
            assert entry.source.distribution == "extra-dist 1.0"


        def test_forgotten_afterwards(kvsieve_registry):
            assert "extra" not in kvsieve_registry.names("compressor")
            assert "topk" in kvsieve_registry.names("selection")


        def test_tiny_model(tiny_model, tiny_batch):
            model, tokenizer = tiny_model
            assert model.config.num_key_value_heads < model.config.num_attention_heads
            assert tiny_batch["attention_mask"][:, 0].tolist() == [1, 0]  # the short prompt is left-padded


        @pytest.mark.gpu
        def test_on_gpu():
            import torch
            assert torch.cuda.is_available()
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    outcomes = dict(passed=3, skipped=0 if torch.cuda.is_available() else 1)
    if torch.cuda.is_available():
        outcomes["passed"] += 1
    result.assert_outcomes(**outcomes)
