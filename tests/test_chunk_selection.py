"""Chunk selection (policies/chunk.py, docs/policies/chunk.md): the selection contract, hand-computed cases, a
plain-Python reference on drawn inputs, per-row budgets, and end-to-end runs in SnapKV and FastKV (eager and fast
path) with the run-time contract checks on."""

from __future__ import annotations

import math
from fractions import Fraction

import attrs
import pytest
import torch
from conftest import greedy, left_padded, random_prompt
from conftest import kept_candidates as kept
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsieve.contracts import PluginContractError
from kvsieve.integration import apply, generate
from kvsieve.plugins import build_compressor
from kvsieve.policies.chunk import ChunkSelection
from kvsieve.policies.topk import TopKSelection
from kvsieve.policy import Selection
from kvsieve.testing import assert_selection_conforms, check_selection
from kvsieve.testing.strategies import SelectionCase, selections

NAN = float("nan")


# ------------------------------------------------------------------------------------------------ contract
@pytest.mark.parametrize("size, aggregation", [(1, "sum"), (3, "sum"), (4, "max"), (8, "sum"), (30, "max")])
def test_conforms_and_is_nested(size, aggregation):
    """The kit's contract (counts, order, range, protection, padding, determinism, per-row budgets) and nesting: a
    larger budget keeps a superset, because the ranking does not depend on the budget."""
    assert_selection_conforms(ChunkSelection(size=size, aggregation=aggregation), nested=True, max_examples=80)


@settings(max_examples=80, deadline=None)
@given(case=selections(per_row_budgets=True))
def test_size_one_is_topk(case):
    """A chunk of one candidate is a token: chunk selection with ``size=1`` keeps exactly what top-k keeps."""
    for aggregation in ("sum", "max"):
        got = check_selection(ChunkSelection(size=1, aggregation=aggregation), case)
        want = check_selection(TopKSelection(), case)
        assert torch.equal(got.keep, want.keep) and torch.equal(got.counts, want.counts)


# ------------------------------------------------------------------------------------------------ by hand
def test_chunks_are_aligned_to_the_end_and_the_best_sum_wins():
    # n = 10, size 4: chunks [0, 2) [2, 6) [6, 10), sums 1, 8, 4
    scores = [0, 1, 5, 0, 0, 3, 3, 0, 0, 1]
    assert kept(ChunkSelection(size=4), scores, 4) == [2, 3, 4, 5]
    assert kept(ChunkSelection(size=4), scores, 8) == [2, 3, 4, 5, 6, 7, 8, 9]
    # top-k keeps the scattered best tokens instead
    assert kept(TopKSelection(), scores, 4) == [1, 2, 5, 6]


def test_the_first_chunk_may_be_partial_and_is_kept_whole():
    # n = 10, size 4: the partial chunk [0, 2) sums 9, more than [2, 6) (4) and [6, 10) (4)
    scores = [4, 5, 1, 1, 1, 1, 1, 1, 1, 1]
    assert kept(ChunkSelection(size=4), scores, 2) == [0, 1]
    assert kept(ChunkSelection(size=4), scores, 6) == [0, 1, 2, 3, 4, 5]  # then the earlier of two tied chunks


def test_a_budget_off_a_chunk_boundary_trims_the_last_chunk_to_its_best_tokens():
    # size 3, n = 9: chunks [0, 3) [3, 6) [6, 9), sums 6, 9, 3
    scores = [1, 2, 3, 2, 3, 4, 0, 3, 0]
    assert kept(ChunkSelection(size=3), scores, 3) == [3, 4, 5]
    assert kept(ChunkSelection(size=3), scores, 4) == [2, 3, 4, 5]  # the best of the next chunk [0, 3)
    assert kept(ChunkSelection(size=3), scores, 5) == [1, 2, 3, 4, 5]
    assert kept(ChunkSelection(size=3), scores, 7) == [0, 1, 2, 3, 4, 5, 7]  # [6, 9) trimmed to its best, 7


def test_sum_and_max_rank_chunks_differently():
    # size 2: chunks [0, 2) sum 6 max 3, [2, 4) sum 5 max 5
    scores = [3, 3, 5, 0]
    assert kept(ChunkSelection(size=2, aggregation="sum"), scores, 2) == [0, 1]
    assert kept(ChunkSelection(size=2, aggregation="max"), scores, 2) == [2, 3]


def test_protected_candidates_count_against_the_budget_not_towards_a_chunk():
    # size 4, n = 12: chunks [0, 4) [4, 8) [8, 12); head 1 and tail 2 protected: 3 of the budget of 7
    scores = [100, 0, 0, 0, 1, 1, 1, 1, 0.5, 0.5, 100, 100]
    # unprotected sums: [1, 4) 0, [4, 8) 4, [8, 10) 1: the protected 100s do not pull their chunks up
    assert kept(ChunkSelection(size=4), scores, 7, protect_head=1, protect_tail=2) == [0, 4, 5, 6, 7, 10, 11]
    # a chunk partly protected costs only its unprotected candidates: [8, 10) fills the rest of a budget of 9
    assert kept(ChunkSelection(size=4), scores, 9, protect_head=1, protect_tail=2) == [0, 4, 5, 6, 7, 8, 9, 10, 11]


def test_padding_is_never_kept_and_does_not_shape_the_chunks():
    # 6 valid candidates of 10; the padding scores +inf. Chunks (size 4) of the 6: [0, 2) [2, 6)
    scores = [0, 0, 1, 1, 1, 1, math.inf, math.inf, NAN, math.inf]
    assert kept(ChunkSelection(size=4), scores, 4, counts=6) == [2, 3, 4, 5]
    assert kept(ChunkSelection(size=4), scores, 8, counts=6) == [0, 1, 2, 3, 4, 5]
    assert kept(ChunkSelection(size=4), scores[:6], 4) == [2, 3, 4, 5]  # as without padding


def test_nan_ranks_last_in_its_chunk_and_does_not_count():
    # size 2: [0, 2) = (NaN, 1) scores 1 (the NaN ignored); [2, 4) = (0.5, 0.25) scores 0.75
    scores = [NAN, 1, 0.5, 0.25]
    assert kept(ChunkSelection(size=2), scores, 1) == [1]
    assert kept(ChunkSelection(size=2), scores, 2) == [0, 1]
    assert kept(ChunkSelection(size=2, aggregation="max"), scores, 3) == [0, 1, 2]  # max 1 against 0.5
    # a chunk of NaN only ranks below every scored chunk, even a negative one
    assert kept(ChunkSelection(size=2), [NAN, NAN, -5, -5], 2) == [2, 3]


def test_ties_go_to_the_earlier_chunk_and_extreme_sums_do_not_overflow():
    assert kept(ChunkSelection(size=2), [1, 1, 1, 1, 1, 1], 2) == [0, 1]
    big = torch.finfo(torch.float32).max
    # float32 would overflow both sums to inf (a tie, to the earlier chunk); in float64 the second is larger
    assert kept(ChunkSelection(size=2), [big, big / 2, big, big], 2) == [2, 3]


def test_budgets_per_row_match_one_call_per_row():
    scores = torch.tensor([[[0, 1, 5, 0, 0, 3, 3, 0, 0, 1]], [[9, 9, 0, 0, 0, 0, 0, 0, 7, 7]]], dtype=torch.float32)
    counts = torch.tensor([[10], [10]])
    budget, tail = torch.tensor([[4], [6]]), torch.tensor([[0], [2]])
    sel = ChunkSelection(size=4).select(scores, counts, budget, 0, tail)
    assert sel.counts.tolist() == [[4], [6]]
    assert sel.keep[0, 0, :4].tolist() == [2, 3, 4, 5]
    # row 1: tail [8, 10) protected; chunks [0, 2) sum 18, [2, 6) 0, [6, 8) 0 (unprotected part of [6, 10))
    assert sel.keep[1, 0, :6].tolist() == [0, 1, 2, 3, 8, 9]


# ------------------------------------------------------------------------------------------------ reference
def reference(scores: list[float], n: int, budget: int, head: int, tail: int, size: int, aggregation: str):
    """docs/policies/chunk.md, one row and KV head at a time, in exact arithmetic."""
    if n <= budget:
        return list(range(n))
    protected = set(range(min(head, n))) | set(range(max(n - tail, 0), n))
    bounds = sorted({max(end - size, 0) for end in range(n, 0, -size)} | {n})
    chunks = [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]  # earliest first, aligned to the end

    def value(chunk):
        vals = [Fraction(scores[i]) for i in chunk if i not in protected and not math.isnan(scores[i])]
        if not vals:
            return (1, 0)  # ranks after every scored chunk
        return (0, -(sum(vals) if aggregation == "sum" else max(vals)))

    def score(i):
        return math.inf if math.isnan(scores[i]) else -scores[i]

    ranking = sorted(protected)
    for c in sorted(range(len(chunks)), key=lambda c: (value(chunks[c]), c)):
        ranking += sorted((i for i in chunks[c] if i not in protected), key=lambda i: (score(i), i))
    return sorted(ranking[:budget])


@st.composite
def quantized(draw):
    """A selection case whose valid scores are multiples of 1/4 in [-8, 8] (float sums are exact in any order),
    some NaN: the reference's exact sums and the policy's float64 sums agree."""
    case = draw(selections(per_row_budgets=True))
    B, Hkv, N = case.scores.shape
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    values = torch.randint(-32, 33, (B, Hkv, N), generator=gen).float() / 4
    if draw(st.booleans()):
        values = values.masked_fill(torch.rand(B, Hkv, N, generator=gen) < 0.15, NAN)
    valid = torch.arange(N) < case.counts[..., None]
    return attrs.evolve(case, scores=torch.where(valid, values, case.scores))


@settings(max_examples=150, deadline=None)
@given(case=quantized(), size=st.integers(1, 9), aggregation=st.sampled_from(["sum", "max"]))
def test_matches_a_plain_python_reference(case: SelectionCase, size, aggregation):
    sel = ChunkSelection(size=size, aggregation=aggregation).select(
        case.scores, case.counts, case.budget, case.protect_head, case.protect_tail
    )
    budgets, tails = case.budgets.tolist(), case.tails.tolist()
    for b in range(case.scores.shape[0]):
        for j in range(case.scores.shape[1]):
            n = int(case.counts[b, j])
            want = reference(
                case.scores[b, j].tolist(), n, budgets[b][j], case.protect_head, tails[b][j], size, aggregation
            )
            assert sel.keep[b, j, : int(sel.counts[b, j])].tolist() == want, (b, j)


# ------------------------------------------------------------------------------------------------ parameters
def test_parameters_are_validated_with_their_name_and_what_is_allowed():
    with pytest.raises(ValueError, match="size must be a positive integer, got 0"):
        ChunkSelection(size=0)
    with pytest.raises(ValueError, match="aggregation must be one of 'sum', 'max', got 'mean'"):
        ChunkSelection(aggregation="mean")


def test_selection_parameters_reach_it_through_a_compressor():
    compressor = build_compressor("snapkv", {"selection": "chunk", "selection.size": 4, "ratio": 0.3})
    assert compressor.selection == ChunkSelection(size=4)
    assert compressor.config()["selection"] == {"name": "chunk", "size": 4, "aggregation": "sum"}
    with pytest.raises(ValueError, match="size must be a positive integer"):
        build_compressor("snapkv", {"selection": "chunk", "selection.size": -1})


# ------------------------------------------------------------------------------------------------ end to end
def assert_whole_chunks(positions: list[int], first: int, n: int, window: int, size: int) -> None:
    """The kept prompt positions of one row and KV head (a prompt of ``n`` tokens from position ``first``) are the
    window plus whole chunks of ``size`` aligned to the prompt's end (the budget less the window is a multiple of
    ``size``)."""
    rel = sorted(p - first for p in positions)
    assert rel[-window:] == list(range(n - window, n)), "the window is kept"
    for p in rel[:-window]:
        chunk = set(range(max(n - (n - p + size - 1) // size * size, 0), n - (n - 1 - p) // size * size))
        assert chunk <= set(rel), f"kept {p} without its whole chunk {sorted(chunk)}: kept {rel}"


def test_snapkv_keeps_whole_chunks(llama, checks_on):
    model, _ = llama
    length, window, budget, size = 45, 8, 24, 4
    ids = random_prompt(length, seed=5)
    params = {"budget": budget, "window": window, "selection": "chunk", "selection.size": size}
    with apply(model, "snapkv", backend="torch", params=params) as engine, torch.no_grad():
        model(ids)
    for layer in engine.last_cache.layers:
        assert layer.compactions == 1 and layer.max_live == budget
        for head in range(layer.keys.shape[1]):
            live = layer.positions[0, head, layer.starts[0, head] : layer.ends[0, head]].tolist()
            assert_whole_chunks(live, 0, length, window, size)


def test_snapkv_padded_batch_per_row_budgets_whole_chunks_no_padding(llama, checks_on):
    """A ratio gives each row of a padded batch its own budget (a tensor for this policy); every row keeps whole
    chunks of its own prompt and no padding."""
    model, tok = llama
    lengths, window, size = [40, 25, 9], 4, 2
    ids, mask, rows = left_padded(tok, lengths, seed=7)
    params = {"ratio": 0.5, "window": window, "selection": "chunk", "selection.size": size}
    with apply(model, "snapkv", backend="torch", params=params) as engine, torch.no_grad():
        model(ids, attention_mask=mask)
    width = max(lengths)
    for layer in engine.last_cache.layers:
        for b, n in enumerate(lengths):
            budget = max(math.ceil(0.5 * n), window)
            for head in range(layer.keys.shape[1]):
                live = layer.positions[b, head, layer.starts[b, head] : layer.ends[b, head]].tolist()
                assert len(live) == min(budget, n) and min(live) >= width - n, "no padding"
                if n > budget and (budget - window) % size == 0:
                    assert_whole_chunks(live, width - n, n, window, size)


@pytest.mark.parametrize(
    "compressor, params",
    [
        ("snapkv", {"selection": "chunk", "selection.size": 4, "ratio": 0.3}),
        (
            "snapkv",
            {
                "selection": "chunk",
                "selection.size": 3,
                "selection.aggregation": "max",
                "ratio": 0.3,
                "scoring.aggregation": "all",
                "window": 4,
            },
        ),
        ("fastkv", {"selection": "chunk", "selection.size": 4, "ratio": 0.3, "tsp_rate": 0.5}),
    ],
)
def test_runs_end_to_end_eager_and_fast_with_the_checks_on(llama, checks_on, compressor, params):
    model, tok = llama
    ids, mask, _ = left_padded(tok, [48, 31], seed=11)
    eager = generate(model, ids, mask, compressor=compressor, params=params, backend="torch", **greedy(6))
    fast = generate(model, ids, mask, compressor=compressor, params=params, backend="torch", fast=True, **greedy(6))
    assert eager.compressor["selection"]["name"] == "chunk"
    assert torch.equal(eager.sequences, fast.sequences)
    assert eager.kv_lengths == fast.kv_lengths
    assert max(eager.kv_lengths) < 48  # it compressed


@attrs.frozen
class _DropsTheWindow(ChunkSelection):
    """A broken chunk selection: the last candidate (protected) is replaced by the one before the kept ones."""

    def select(self, scores, counts, budget, protect_head=0, protect_tail=0):
        sel = super().select(scores, counts, budget, protect_head, protect_tail)
        keep = sel.keep.clone()
        last = (sel.counts - 1).clamp(min=0)[..., None]
        keep.scatter_(-1, last, keep.gather(-1, last) - 1)
        return Selection(keep=keep, counts=sel.counts)


def test_the_run_time_checks_watch_this_path(llama, checks_on):
    """The same run with a selection that drops a protected token raises PluginContractError: the checks that
    the chunk runs above pass are on."""
    model, tok = llama
    ids, mask, _ = left_padded(tok, [48, 31], seed=11)
    with pytest.raises(PluginContractError, match="invalid selection"):
        generate(
            model,
            ids,
            mask,
            compressor="snapkv",
            backend="torch",
            **greedy(2),
            params={"selection": _DropsTheWindow(size=4), "ratio": 0.3},
        )
