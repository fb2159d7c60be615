"""Head-adaptive selection (policies/adaptive.py, docs/policies/adaptive.md): the per-row contract through the
conformance kit and the run-time guard, ``alpha=1`` (and ``max_share=1``) equal to top-k, hand-computed cases, a
plain-Python reference on drawn inputs (NaNs, GQA, per-row budgets), and end-to-end runs with the contract checks on
(eager and fast path; torch and triton on a GPU), including what the cache stores."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_gpu_keeps_cpu_tokens, greedy, left_padded, random_prompt
from conftest import kept_candidates as kept
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsieve.contracts import ContractGuard, PluginContractError
from kvsieve.integration import apply, generate
from kvsieve.plugins import build_compressor
from kvsieve.policies.adaptive import HeadAdaptiveSelection
from kvsieve.policies.topk import TopKSelection
from kvsieve.policy import Selection
from kvsieve.testing import assert_selection_conforms, check_selection
from kvsieve.testing.strategies import SelectionCase, selections

NAN = float("nan")
BIG = torch.finfo(torch.float32).max


def select(policy, rows: list[list[float]], budget: int, counts=None, protect_head=0, protect_tail=0):
    """Kept candidates per KV head of one row (``rows``: one list of scores per head)."""
    scores = torch.tensor([rows], dtype=torch.float32)
    c = torch.tensor([[len(r) for r in rows] if counts is None else counts])
    sel = policy.select(scores, c, budget, protect_head, protect_tail)
    return [sel.keep[0, h, : int(sel.counts[0, h])].tolist() for h in range(len(rows))]


# ------------------------------------------------------------------------------------------------ contract
@pytest.mark.parametrize("alpha, max_share", [(0.2, 2.0), (0.0, None), (0.5, 1.0), (1.0, 1.5), (0.0, 1.25)])
def test_conforms(alpha, max_share):
    """The kit's per-row contract (row totals, each head within its candidates, order, range, protection,
    padding, determinism, per-row budgets)."""
    assert_selection_conforms(HeadAdaptiveSelection(alpha=alpha, max_share=max_share), max_examples=80)


@settings(max_examples=80, deadline=None)
@given(case=selections(per_row_budgets=True), max_share=st.sampled_from([None, 1.0, 2.0]))
def test_alpha_one_is_topk(case, max_share):
    got = check_selection(HeadAdaptiveSelection(alpha=1.0, max_share=max_share), case)
    want = check_selection(TopKSelection(), case)
    assert torch.equal(got.counts, want.counts)
    for b in range(want.keep.shape[0]):
        for h in range(want.keep.shape[1]):
            n = int(want.counts[b, h])
            assert got.keep[b, h, :n].tolist() == want.keep[b, h, :n].tolist()


@settings(max_examples=60, deadline=None)
@given(case=selections(per_row_budgets=True), alpha=st.sampled_from([0.0, 0.3]))
def test_max_share_one_is_topk_where_every_head_has_the_budget(case, alpha):
    """A head may keep at most the budget: with every head holding at least the budget, each keeps exactly it,
    the per-head top-k."""
    counts = case.counts.clamp(min=int(case.budgets.max()))
    counts = counts.clamp(max=case.scores.shape[-1])
    if bool((counts < case.budgets).any()):
        return
    case = SelectionCase(case.scores, counts, case.budget, case.protect_head, case.protect_tail)
    got = check_selection(HeadAdaptiveSelection(alpha=alpha, max_share=1.0), case)
    want = check_selection(TopKSelection(), case)
    assert torch.equal(got.counts, want.counts) and torch.equal(got.keep[..., : want.keep.shape[-1]], want.keep)


# ------------------------------------------------------------------------------------------------ by hand
def test_a_concentrated_head_gives_budget_to_a_spread_one():
    rows = [[9, 8, 7, 6, 0, 0], [1, 1, 1, 1, 1, 1]]
    # uniform: 3 each; shared: the row's 6 best, whatever head (1 beats 0)
    assert select(TopKSelection(), rows, 3) == [[0, 1, 2], [0, 1, 2]]
    assert select(HeadAdaptiveSelection(alpha=0.0, max_share=None), rows, 3) == [[0, 1, 2, 3], [0, 1]]
    assert select(HeadAdaptiveSelection(alpha=1.0), rows, 3) == [[0, 1, 2], [0, 1, 2]]


def test_the_safeguard_and_the_share_bound():
    rows = [[9, 8, 7, 6, 5, 4], [0, 0, 0, 0, 0, 1]]
    # alpha 0.5 of budget 4: each head keeps its 2 best first; the other 4 go to head 0
    assert select(HeadAdaptiveSelection(alpha=0.5, max_share=None), rows, 4) == [[0, 1, 2, 3, 4, 5], [0, 5]]
    # max_share 1.25: head 0 keeps at most floor(1.25 * 4) = 5; head 1 takes the rest (ties: the earlier one)
    assert select(HeadAdaptiveSelection(alpha=0.5, max_share=1.25), rows, 4) == [[0, 1, 2, 3, 4], [0, 1, 5]]
    # the safeguard rounds alpha * budget down, after rounding to 9 decimals: 0.29 * 100 is 29, not 28
    rows = [[1.0] * 200, [0.0] * 200]
    assert [len(h) for h in select(HeadAdaptiveSelection(alpha=0.29, max_share=None), rows, 100)] == [171, 29]


def test_ties_go_to_the_earlier_candidate_then_the_lower_head():
    rows = [[5, 1], [5, 1], [0, 0]]
    assert select(HeadAdaptiveSelection(alpha=0.0, max_share=None), rows, 1) == [[0, 1], [0], []]


def test_nan_ranks_lowest_and_padding_is_never_kept():
    policy = HeadAdaptiveSelection(alpha=0.0, max_share=None)
    assert select(policy, [[NAN, NAN, 1], [0, 0, 0]], 1) == [[2], [0]]
    assert select(policy, [[NAN, NAN], [NAN, NAN]], 1) == [[0], [0]]
    # -inf is still a score, above NaN; then the NaNs tie: the earlier candidate, then the lower head
    assert select(policy, [[NAN, float("-inf")], [NAN, NAN]], 1) == [[0, 1], []]
    # head 0 has 2 valid candidates (the padding scores 100); head 1 has 4: 2 + 2 kept in all
    assert select(policy, [[0, 0, 100, 100], [5, 5, 5, 5]], 2, counts=[2, 4]) == [[], [0, 1, 2, 3]]


def test_protected_candidates_are_kept_and_count_toward_their_head():
    policy = HeadAdaptiveSelection(alpha=0.0, max_share=None)
    rows = [[9, 9, 9, 0], [0, 0, 0, 0]]
    assert select(policy, rows, 2, protect_tail=1) == [[0, 1, 3], [3]]
    assert select(policy, rows, 3, protect_head=1, protect_tail=1) == [[0, 1, 2, 3], [0, 3]]


def test_row_totals_follow_each_rows_budget():
    scores = torch.tensor([[[5, 4, 3, 2, 1, 0], [9, 9, 9, 9, 9, 9]], [[0, 0, 0, 0, 0, 1], [3, 3, 3, 3, 3, 3]]],
                          dtype=torch.float32)
    counts = torch.tensor([[6, 6], [6, 4]])
    budget, tail = torch.tensor([[2, 2], [4, 4]]), torch.tensor([[1, 1], [0, 0]])
    sel = HeadAdaptiveSelection(alpha=0.0, max_share=None).select(scores, counts, budget, 0, tail)
    assert sel.counts.sum(dim=1).tolist() == [4, 8]
    assert sel.keep[0, 0, : int(sel.counts[0, 0])].tolist() == [5]  # only its protected last candidate
    assert sel.keep[1, 1, : int(sel.counts[1, 1])].tolist() == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------------ reference
def reference(case: SelectionCase, scores: torch.Tensor, alpha: float, max_share: float | None) -> list:
    """docs/policies/adaptive.md, written out one row at a time."""
    B, H, _ = scores.shape
    budgets, tails, counts = case.budgets.tolist(), case.tails.tolist(), case.counts.tolist()
    head = case.protect_head
    out = []
    for b in range(B):
        floors, pool, total, kept = [], [], 0, []
        for h in range(H):
            n, budget, tail = counts[b][h], budgets[b][h], tails[b][h]
            raw = scores[b, h, :n].tolist()
            value = [-math.inf if math.isnan(x) else min(max(x, -BIG), BIG) for x in raw]
            protected = set(range(min(head, n))) | set(range(max(n - tail, 0), n))
            ranking = sorted(range(n), key=lambda i: (i not in protected, -value[i], i))
            uniform = min(budget, n)
            total += uniform
            floor = min(uniform, min(n, head + tail) + math.floor(round(alpha * max(budget - head - tail, 0), 9)))
            cap = n if max_share is None else min(n, math.floor(round(max_share * budget, 9)))
            kept.append(set(ranking[:floor]))
            floors.append(floor)
            pool += [(-value[i], i, h) for i in ranking[floor:cap]]
        for _, i, h in sorted(pool)[: total - sum(floors)]:
            kept[h].add(i)
        out.append([sorted(k) for k in kept])
    return out


@settings(max_examples=150, deadline=None)
@given(case=selections(per_row_budgets=True), nans=st.booleans(), alpha=st.sampled_from([0.0, 0.2, 0.35, 1.0]),
       max_share=st.sampled_from([None, 1.0, 1.5, 2.0]))
def test_matches_a_plain_python_reference(case: SelectionCase, nans, alpha, max_share):
    scores = case.scores
    if nans:
        gen = torch.Generator().manual_seed(int(case.counts.sum()))
        scores = scores.masked_fill(torch.rand(scores.shape, generator=gen) < 0.15, NAN)
    policy = HeadAdaptiveSelection(alpha=alpha, max_share=max_share)
    sel = policy.select(scores, case.counts, case.budget, case.protect_head, case.protect_tail)
    want = reference(case, scores, alpha, max_share)
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            assert sel.keep[b, h, : int(sel.counts[b, h])].tolist() == want[b][h], (b, h)


def test_awkward_sizes_and_gqa_heads():
    gen = torch.Generator().manual_seed(5)
    for B, H, N in ((1, 1, 1), (3, 8, 1), (2, 5, 17), (1, 8, 257)):
        scores = torch.randn(B, H, N, generator=gen)
        counts = torch.randint(0, N + 1, (B, H), generator=gen)
        for budget in (1, max(N // 3, 1), N + 2):
            case = SelectionCase(scores, counts, budget, 0, min(1, budget))
            sel = check_selection(HeadAdaptiveSelection(), case)
            want = reference(case, scores, 0.2, 2.0)
            assert [[sel.keep[b, h, : int(sel.counts[b, h])].tolist() for h in range(H)] for b in range(B)] == want


# ------------------------------------------------------------------------------------------------ the guard
def guard_check(selection: Selection, counts, budget, head, tail, policy):
    return ContractGuard(True, immediate=True).check_selection(selection, counts, budget, head, tail, policy)


def test_the_guard_takes_a_head_adaptive_selection_by_row_totals():
    counts = torch.tensor([[6, 6]])
    keep = torch.tensor([[[0, 1, 2, 5], [0, 5, -1, -1]]])
    uneven = Selection(keep=keep, counts=torch.tensor([[4, 2]]))
    got_keep, got_kept = guard_check(uneven, counts, 3, 0, 1, HeadAdaptiveSelection())
    assert torch.equal(got_keep, keep) and got_kept.tolist() == [[4, 2]]
    with pytest.raises(PluginContractError, match="exactly min\\(budget=3, candidates\\) per row and KV head"):
        guard_check(uneven, counts, 3, 0, 1, TopKSelection())  # the same selection breaks the uniform contract


@pytest.mark.parametrize(
    "keep, kept, why",
    [
        ([[0, 1, 2, 5], [0, 5, -1, -1]], [[4, 1]], "row total 5, not 6"),
        ([[0, 1, 2, 3], [0, 5, -1, -1]], [[4, 2]], "head 0 dropped its protected last candidate"),
        ([[0, 1, 2, 3, 4, 5], [-1] * 6], [[6, 0]], "head 1 kept not even its protected candidate"),
        ([[0, 1, 2, 3, 4, 5, 5], [-1] * 7], [[7, 0]], "head 0 kept more than its candidates"),
    ],
)
def test_the_guard_refuses_an_invalid_head_adaptive_selection(keep, kept, why):
    selection = Selection(keep=torch.tensor([keep]), counts=torch.tensor(kept))
    with pytest.raises(PluginContractError, match="sum over KV heads of min\\(budget=3, candidates\\) per row"):
        guard_check(selection, torch.tensor([[6, 6]]), 3, 0, 1, HeadAdaptiveSelection())


def test_the_guard_checks_per_row_budgets_of_a_head_adaptive_selection():
    counts = torch.tensor([[6, 6], [6, 6]])
    budget, tail = torch.tensor([[2, 2], [3, 3]]), torch.tensor([[1, 1], [1, 1]])
    keep = torch.tensor([[[0, 5, -1, -1], [2, 5, -1, -1]], [[0, 1, 2, 5], [0, 5, -1, -1]]])
    guard_check(Selection(keep=keep, counts=torch.tensor([[2, 2], [4, 2]])), counts, budget, 0, tail,
                HeadAdaptiveSelection())
    with pytest.raises(PluginContractError):
        guard_check(Selection(keep=keep, counts=torch.tensor([[2, 2], [4, 1]])), counts, budget, 0, tail,
                    HeadAdaptiveSelection())


# ------------------------------------------------------------------------------------------------ parameters
def test_parameters_are_validated_with_their_name_and_what_is_allowed():
    with pytest.raises(ValueError, match="alpha must be a number in \\[0, 1\\], got 1.5"):
        HeadAdaptiveSelection(alpha=1.5)
    with pytest.raises(ValueError, match="alpha must be a number in \\[0, 1\\], got 'x'"):
        HeadAdaptiveSelection(alpha="x")
    with pytest.raises(ValueError, match="max_share must be a finite number >= 1 \\(a multiple of the budget\\), "
                                         "got 0.5"):
        HeadAdaptiveSelection(max_share=0.5)
    with pytest.raises(ValueError, match="max_share must be a finite number >= 1"):
        HeadAdaptiveSelection(max_share=float("inf"))


def test_every_prompt_compressor_takes_it():
    for name in ("snapkv", "attended_spans", "pyramidkv", "fastkv"):
        compressor = build_compressor(name, {"selection": "adaptive", "selection.alpha": 0.3})
        assert compressor.selection == HeadAdaptiveSelection(alpha=0.3)
        assert compressor.config()["selection"] == {"name": "adaptive", "alpha": 0.3, "max_share": 2.0}
    assert build_compressor("snapkv", {"selection": "adaptive", "selection.max_share": None}).selection.max_share \
        is None


# ------------------------------------------------------------------------------------------------ end to end
def live_counts(layer) -> list[list[int]]:
    return (layer.ends - layer.starts).tolist()


def test_a_model_layer_keeps_the_uniform_total_per_row_with_counts_per_head(tiny_models, checks_on):
    """In a GQA model's layers each row keeps the uniform total, each KV head its window and its own count; the
    cache's storage follows the longest head (and max_share bounds it)."""
    model, tok = tiny_models["qwen2"]
    ids, mask, rows = left_padded(tok, [120, 77], seed=13)
    window = 8
    params = {"ratio": 0.2, "window": window, "selection": "adaptive", "selection.alpha": 0.0,
              "selection.max_share": 1.5}
    with apply(model, "snapkv", backend="torch", params=params) as engine, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    uniform = [math.ceil(0.2 * len(row)) for row in rows]
    uneven = False
    for layer in engine.last_cache.layers:
        counts = live_counts(layer)
        Hkv = len(counts[0])
        for b, row in enumerate(counts):
            assert sum(row) == Hkv * uniform[b]
            assert max(row) <= math.floor(1.5 * uniform[b])
            width = ids.shape[1]
            for h in range(Hkv):
                live = layer.positions[b, h, layer.starts[b, h] : layer.ends[b, h]].tolist()
                assert live[-window:] == list(range(width - window, width))
        uneven |= any(len(set(row)) > 1 for row in counts)
        assert layer.capacity >= layer.max_live
        bytes_per_slot = 2 * layer.keys.shape[-1] * layer.keys.element_size()
        assert layer.nbytes() == layer.keys.shape[0] * Hkv * layer.capacity * bytes_per_slot
    assert uneven, "the heads of some layer keep different counts"


@pytest.mark.parametrize(
    "compressor, params",
    [
        ("snapkv", {"ratio": 0.3, "selection": "adaptive"}),
        ("snapkv", {"ratio": 0.3, "window": 4, "selection": "adaptive", "selection.alpha": 0.0,
                    "selection.max_share": None}),
        ("pyramidkv", {"ratio": 0.3, "window": 4, "selection": "adaptive"}),
    ],
)
def test_runs_end_to_end_eager_and_fast_with_the_checks_on(llama, checks_on, compressor, params):
    model, tok = llama
    ids, mask, _ = left_padded(tok, [48, 31], seed=11)
    eager = generate(model, ids, mask, compressor=compressor, params=params, backend="torch", **greedy(6))
    fast = generate(model, ids, mask, compressor=compressor, params=params, backend="torch", fast=True, **greedy(6))
    assert eager.compressor["selection"]["name"] == "adaptive"
    assert torch.equal(eager.sequences, fast.sequences)
    assert eager.kv_lengths == fast.kv_lengths
    assert max(eager.kv_lengths) < 48  # it compressed


def test_alpha_one_generates_what_topk_generates(llama, checks_on):
    model, tok = llama
    ids = random_prompt(40, seed=9)
    want = generate(model, ids, compressor="snapkv", params={"ratio": 0.3, "window": 4}, backend="torch",
                    **greedy(5))
    got = generate(model, ids, compressor="snapkv", backend="torch", **greedy(5),
                   params={"ratio": 0.3, "window": 4, "selection": "adaptive", "selection.alpha": 1.0})
    assert torch.equal(got.sequences, want.sequences) and got.kv_lengths == want.kv_lengths


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_on_the_gpu_every_backend_keeps_the_cpu_tokens(llama, checks_on, backend):
    """On CUDA (prefill graphs on), snapkv with adaptive selection keeps what the CPU run keeps, for a padded
    batch."""
    model, tok = llama
    ids, mask, _ = left_padded(tok, [48, 31], seed=11)
    params = {"ratio": 0.3, "window": 4, "selection": "adaptive"}
    assert_gpu_keeps_cpu_tokens(model, ids, mask, "snapkv", params, backend)


def test_kept_candidates_helper_agrees_for_one_head():
    # a single KV head has nobody to share with: it is top-k
    scores = [3, 1, 4, 1, 5, 9, 2, 6]
    assert kept(HeadAdaptiveSelection(alpha=0.0, max_share=None), scores, 3) == kept(TopKSelection(), scores, 3)
