"""Span selection (policies/span.py, docs/policies/span.md) and the attended_spans compressor: the selection
contract, hand-computed cases, a plain-Python reference on drawn inputs, per-row budgets, and end-to-end runs
(eager and fast path, torch and triton backends) with the run-time contract checks on."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_gpu_keeps_cpu_tokens, greedy, left_padded, random_prompt
from conftest import kept_candidates as kept
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsieve.integration import apply, generate
from kvsieve.plugins import build_compressor
from kvsieve.policies.span import SpanSelection
from kvsieve.policies.topk import TopKSelection
from kvsieve.testing import assert_selection_conforms, check_selection
from kvsieve.testing.strategies import SelectionCase, selections

NAN = float("nan")


# ------------------------------------------------------------------------------------------------ contract
@pytest.mark.parametrize("radius", [0, 1, 3, 9])
def test_conforms_and_is_nested(radius):
    """The kit's contract (counts, order, range, protection, padding, determinism, per-row budgets) and nesting."""
    assert_selection_conforms(SpanSelection(radius=radius), nested=True, max_examples=80)


@settings(max_examples=80, deadline=None)
@given(case=selections(per_row_budgets=True))
def test_radius_zero_is_topk(case):
    got = check_selection(SpanSelection(radius=0), case)
    want = check_selection(TopKSelection(), case)
    assert torch.equal(got.keep, want.keep) and torch.equal(got.counts, want.counts)


# ------------------------------------------------------------------------------------------------ by hand
def test_a_peak_keeps_its_neighbours_where_topk_keeps_the_next_best_tokens():
    scores = [0, 0, 1, 9, 1, 0, 0, 5, 0, 6, 0, 0]
    assert kept(TopKSelection(), scores, 3) == [3, 7, 9]
    assert kept(SpanSelection(radius=1), scores, 3) == [2, 3, 4]
    # then the next span (around 9: 8, 9, 10), nearest-the-peak first by own score: 9 before 8 and 10
    assert kept(SpanSelection(radius=1), scores, 4) == [2, 3, 4, 9]
    assert kept(SpanSelection(radius=1), scores, 6) == [2, 3, 4, 8, 9, 10]


def test_spans_are_not_aligned_to_any_grid():
    # the same peak at every offset keeps the same span around it (chunk selection's blocks would cut it)
    for peak in range(2, 10):
        scores = [0.0] * 12
        scores[peak] = 1.0
        assert kept(SpanSelection(radius=2), scores, 5) == list(range(peak - 2, peak + 3))


def test_protected_candidates_lend_no_score_and_count_against_the_budget():
    # the last 2 are protected and score high: without the rule their neighbours 7, 8 would rank with them
    scores = [0, 0, 4, 0, 0, 0, 0, 0, 0, 50, 50]
    assert kept(SpanSelection(radius=1), scores, 5, protect_tail=2) == [1, 2, 3, 9, 10]


def test_padding_and_nan():
    # candidates past counts are never kept and lend nothing; NaN counts as -inf
    scores = [0, NAN, 0, 2, 0, 0, 100, 100]
    assert kept(SpanSelection(radius=1), scores, 3, counts=6) == [2, 3, 4]
    assert kept(SpanSelection(radius=1), [NAN, NAN, NAN, 1], 2) == [2, 3]


def test_budgets_per_row_match_one_call_per_row():
    scores = torch.tensor([[[0, 1, 5, 0, 0, 3, 3, 0, 0, 1]], [[9, 0, 0, 0, 0, 0, 0, 0, 7, 7]]], dtype=torch.float32)
    counts = torch.tensor([[10], [10]])
    budget, tail = torch.tensor([[3], [5]]), torch.tensor([[0], [2]])
    sel = SpanSelection(radius=1).select(scores, counts, budget, 0, tail)
    assert sel.counts.tolist() == [[3], [5]]
    assert sel.keep[0, 0, :3].tolist() == [1, 2, 3]
    # row 1: the tail 8, 9 is protected and lends 7 nothing; the span of 0 (0, 1), then the earliest of the zeros
    assert sel.keep[1, 0, :5].tolist() == [0, 1, 2, 8, 9]
    for b in range(2):  # each row as if alone
        alone = SpanSelection(radius=1).select(scores[b : b + 1], counts[b : b + 1], int(budget[b]), 0, int(tail[b]))
        assert sel.keep[b, 0, : int(sel.counts[b, 0])].tolist() == alone.keep[0, 0].tolist()


# ------------------------------------------------------------------------------------------------ reference
def reference(scores: list[float], n: int, budget: int, head: int, tail: int, radius: int) -> list[int]:
    """docs/policies/span.md, one row and KV head at a time."""
    protected = set(range(min(head, n))) | set(range(max(n - tail, 0), n))
    own = [-math.inf if math.isnan(s) else s for s in scores[:n]]
    lend = [-math.inf if i in protected else own[i] for i in range(n)]
    span = [max(lend[max(i - radius, 0) : i + radius + 1]) for i in range(n)]
    ranking = sorted(protected) + sorted(
        (i for i in range(n) if i not in protected), key=lambda i: (-span[i], -own[i], i)
    )
    return sorted(ranking[:budget])


@settings(max_examples=150, deadline=None)
@given(case=selections(per_row_budgets=True), radius=st.integers(0, 6), nans=st.booleans())
def test_matches_a_plain_python_reference(case: SelectionCase, radius, nans):
    scores = case.scores
    if nans:
        gen = torch.Generator().manual_seed(int(case.counts.sum()))
        scores = scores.masked_fill(torch.rand(scores.shape, generator=gen) < 0.15, NAN)
    sel = SpanSelection(radius=radius).select(scores, case.counts, case.budget, case.protect_head, case.protect_tail)
    budgets, tails = case.budgets.tolist(), case.tails.tolist()
    for b in range(scores.shape[0]):
        for j in range(scores.shape[1]):
            n = int(case.counts[b, j])
            want = reference(scores[b, j].tolist(), n, budgets[b][j], case.protect_head, tails[b][j], radius)
            assert sel.keep[b, j, : int(sel.counts[b, j])].tolist() == want, (b, j)


# ------------------------------------------------------------------------------------------------ parameters
def test_parameters_are_validated_with_their_name_and_what_is_allowed():
    with pytest.raises(ValueError, match="radius must be an integer >= 0, got -1"):
        SpanSelection(radius=-1)


def test_attended_spans_defaults_and_the_option_on_other_compressors():
    compressor = build_compressor("attended_spans")
    assert compressor.selection == SpanSelection(radius=3)
    assert compressor.config()["selection"] == {"name": "span", "radius": 3}
    assert compressor.config()["scoring"]["pooling"] == "avg" and compressor.window == 32
    assert build_compressor("snapkv").selection == TopKSelection()  # SnapKV stays the paper's
    assert build_compressor("fastkv", {"selection": "span", "selection.radius": 2}).selection == SpanSelection(2)
    assert build_compressor("attended_spans", {"selection": "topk"}).selection == TopKSelection()


# ------------------------------------------------------------------------------------------------ end to end
def test_a_model_layer_keeps_the_window_and_runs_of_neighbours(llama, checks_on):
    """In a model's layers, attended_spans keeps the window and, before it, runs of consecutive tokens (spans
    around peaks), not only scattered tokens."""
    model, _ = llama
    length, window, budget, radius = 45, 8, 20, 2
    ids = random_prompt(length, seed=5)
    params = {"budget": budget, "window": window, "selection.radius": radius}
    with apply(model, "attended_spans", backend="torch", params=params) as engine, torch.no_grad():
        model(ids)
    for layer in engine.last_cache.layers:
        assert layer.compactions == 1 and layer.max_live == budget
        for head in range(layer.keys.shape[1]):
            live = sorted(layer.positions[0, head, layer.starts[0, head] : layer.ends[0, head]].tolist())
            assert live[-window:] == list(range(length - window, length))
            spans = live[:-window]
            runs, run = [], [spans[0]]
            for p in spans[1:]:
                if p == run[-1] + 1:
                    run.append(p)
                else:
                    runs.append(run)
                    run = [p]
            runs.append(run)
            assert len(runs) < len(spans), "span selection keeps neighbours, not scattered tokens"


@pytest.mark.parametrize(
    "compressor, params",
    [
        ("attended_spans", {"ratio": 0.3}),
        ("attended_spans", {"ratio": 0.3, "scoring.aggregation": "all", "window": 4, "selection.radius": 1}),
        ("fastkv", {"selection": "span", "ratio": 0.3, "tsp_rate": 0.5}),
    ],
)
def test_runs_end_to_end_eager_and_fast_with_the_checks_on(llama, checks_on, compressor, params):
    model, tok = llama
    ids, mask, _ = left_padded(tok, [48, 31], seed=11)
    eager = generate(model, ids, mask, compressor=compressor, params=params, backend="torch", **greedy(6))
    fast = generate(model, ids, mask, compressor=compressor, params=params, backend="torch", fast=True, **greedy(6))
    assert eager.compressor["selection"]["name"] == "span"
    assert torch.equal(eager.sequences, fast.sequences)
    assert eager.kv_lengths == fast.kv_lengths
    assert max(eager.kv_lengths) < 48  # it compressed


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_on_the_gpu_every_backend_keeps_the_cpu_tokens(llama, checks_on, backend):
    """On CUDA (prefill graphs on), attended_spans keeps what the CPU run keeps, for a padded batch."""
    model, tok = llama
    ids, mask, _ = left_padded(tok, [48, 31], seed=11)
    assert_gpu_keeps_cpu_tokens(model, ids, mask, "attended_spans", {"ratio": 0.3, "window": 4}, backend)
