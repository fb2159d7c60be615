"""The contract checks' device work: the torch references (:mod:`kvsieve.contract_ops`) and the triton backend's
kernels (:mod:`kvsieve.backends.triton.contract_checks`) detect the same faults and give the same stand-in.

On CPU the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``) at tiny awkward shapes (odd
capacities, lengths and K, several KV heads, left padding, K = 1, budgets and tails as ints and per head,
head-adaptive on and off) with forced small tiles, so every kernel loops over several blocks and chunks. The
``gpu`` cases run the compiled kernels at prefill shapes and inside a captured CUDA graph.

The caches handed to the kernels are poisoned outside their live range (NaN, the dtype's largest magnitude), so
a kernel that reads a free or padding slot as data shows up.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import left_padded, triton_kernels_or_skip
from test_contracts import BrokenScoring, BrokenSelection

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = triton_kernels_or_skip("contract-check kernel tests")

from kvsieve import contract_ops as ref  # noqa: E402
from kvsieve.backends.triton import contract_checks as tcc  # noqa: E402
from kvsieve.backends.triton.backend import TritonBackend  # noqa: E402
from kvsieve.contracts import ContractGuard, FlagSink, PluginContractError  # noqa: E402
from kvsieve.integration import generate  # noqa: E402
from kvsieve.policies.adaptive import HeadAdaptiveSelection  # noqa: E402
from kvsieve.policies.topk import TopKSelection  # noqa: E402
from kvsieve.policy import Selection  # noqa: E402

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
cpu = pytest.mark.skipif(not INTERPRET, reason="CPU cases run through Triton's interpreter: set TRITON_INTERPRET=1")
DEVICE = "cuda" if HAS_CUDA else "cpu"
SMALL = tcc.ContractChecksConfig(block_slots=4, block_n=8, block_k=4, block_flags=2)  # several blocks everywhere


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------- the cache
def make_cache(seed: int, B: int, Hkv: int, C: int, d: int, dtype=torch.float32, device=DEVICE):
    """``(clean, poisoned)``: ``(keys, values, positions, starts, ends)`` twice, the second with every slot outside
    ``[starts, ends)`` poisoned (NaN keys, the largest magnitude in values, huge positions). Ranges: some rows left
    padded, one empty, one full."""
    g = _gen(seed)
    keys = torch.randn(B, Hkv, C, d, generator=g).to(dtype)
    values = torch.randn(B, Hkv, C, d, generator=g).to(dtype)
    positions = torch.randint(0, 50_000, (B, Hkv, C), generator=g)
    starts = torch.randint(0, max(C // 3, 1), (B, Hkv), generator=g)
    ends = torch.maximum(starts, torch.randint(C // 2, C + 1, (B, Hkv), generator=g))
    starts[0, 0], ends[0, 0] = 0, C  # full
    if B * Hkv > 2:
        ends.view(-1)[1] = starts.view(-1)[1]  # empty
    slot = torch.arange(C)
    free = (slot < starts[..., None]) | (slot >= ends[..., None])
    poisoned = (keys.masked_fill(free[..., None], float("nan")),
                values.masked_fill(free[..., None], torch.finfo(dtype).max),
                positions.masked_fill(free, 2**62), starts, ends)
    clean = (keys, values, positions, starts, ends)
    return [t.to(device) for t in clean], [t.to(device) for t in poisoned]


CACHE_SHAPES = [  # B, Hkv, C, d, chunk: odd capacities, one slot, capacities under and over a chunk
    (1, 1, 1, 8, 4),
    (3, 2, 37, 12, 8),
    (2, 5, 64, 24, 16),
    (1, 3, 100, 16, 512),
    (2, 3, 41, 8, 5),
]


@cpu
@pytest.mark.parametrize("shape", CACHE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fingerprint_is_the_reference_s_and_never_reads_free_slots(shape, dtype):
    B, Hkv, C, d, chunk = shape
    clean, poisoned = make_cache(1, B, Hkv, C, d, dtype)
    want = ref.cache_fingerprint(*clean, chunk=chunk)
    got = tcc.cache_fingerprint(*poisoned, chunk=chunk, config=SMALL)
    S = -(-C // chunk)
    assert got.shape == want.shape == (B, Hkv, 3 * S + 2) and got.dtype == torch.float64
    torch.testing.assert_close(got[..., : 2 * S], want[..., : 2 * S], rtol=1e-5, atol=1e-4)  # another sum order
    assert torch.equal(got[..., 2 * S :], want[..., 2 * S :])  # positions and the range: exact
    assert torch.equal(ref.cache_fingerprint(*poisoned, chunk=chunk), want)  # the reference ignores the poison too
    assert torch.equal(tcc.cache_fingerprint(*clean, chunk=chunk, config=SMALL), got)  # deterministic, poison unread
    assert not tcc.cache_changed(got, *poisoned, chunk=chunk, config=SMALL)
    assert not ref.cache_changed(want, *poisoned, chunk=chunk)


def _changed(what: str, cache: list[torch.Tensor]) -> list[torch.Tensor]:
    """``cache`` with one live thing changed (row 1, KV head 1: a partial chunk past the first)."""
    keys, values, positions, starts, ends = (t.clone() for t in cache)
    b, j = 1, 1
    s, e = int(starts[b, j]), int(ends[b, j])
    assert e - s >= 2
    slot = e - 2
    if what == "keys":
        keys[b, j, slot, 3] += 4
    elif what == "values":
        values[b, j, slot, 0] -= 4
    elif what == "positions":
        positions[b, j, slot] += 1
    elif what == "starts":
        starts[b, j] += 1
    elif what == "ends":
        ends[b, j] -= 1
    return [keys, values, positions, starts, ends]


@cpu
@pytest.mark.parametrize("what", ["keys", "values", "positions", "starts", "ends"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_change_of_each_part_of_the_cache_is_caught(what, dtype):
    _, cache = make_cache(2, 2, 3, 45, 12, dtype)
    before_t = tcc.cache_fingerprint(*cache, chunk=8, config=SMALL)
    before_r = ref.cache_fingerprint(*cache, chunk=8)
    after = _changed(what, cache)
    assert int(tcc.cache_changed(before_t, *after, chunk=8, config=SMALL)) == 1
    assert bool(ref.cache_changed(before_r, *after, chunk=8))
    assert TritonBackend().cache_changed(TritonBackend().cache_fingerprint(*cache), *after).item() == 1  # 512 slots


@cpu
def test_poison_written_into_free_slots_or_nan_in_live_data_is_no_change():
    """What the old whole-buffer sums got wrong: a NaN anywhere made the sum NaN, hiding every real change."""
    _, cache = make_cache(3, 2, 3, 45, 12)
    keys, values, positions, starts, ends = cache
    keys[0, 1, starts[0, 1]] = float("nan")  # NaN inside live data: its chunk sums NaN before and after
    before_t = tcc.cache_fingerprint(*cache, chunk=8, config=SMALL)
    before_r = ref.cache_fingerprint(*cache, chunk=8)
    scribbled = [t.clone() for t in cache]
    for b in range(2):
        for j in range(3):
            e = int(ends[b, j])
            if e < keys.shape[2]:
                scribbled[0][b, j, e:] = float("nan")
                scribbled[1][b, j, e:] = float("inf")
                scribbled[2][b, j, e:] = -7
            if int(starts[b, j]) > 0:
                scribbled[0][b, j, : starts[b, j]] = 123.0
    assert int(tcc.cache_changed(before_t, *scribbled, chunk=8, config=SMALL)) == 0
    assert not bool(ref.cache_changed(before_r, *scribbled, chunk=8))
    # a real change elsewhere is still caught (the whole-buffer sum was NaN already and missed it)
    scribbled[1][1, 2, ends[1, 2] - 1, 0] += 4
    assert int(tcc.cache_changed(before_t, *scribbled, chunk=8, config=SMALL)) == 1
    assert bool(ref.cache_changed(before_r, *scribbled, chunk=8))


@cpu
def test_a_fingerprint_of_another_shape_is_a_change():
    _, cache = make_cache(4, 1, 2, 20, 8)
    _, bigger = make_cache(4, 1, 2, 30, 8)
    before = tcc.cache_fingerprint(*cache, chunk=8)
    assert int(tcc.cache_changed(before, *bigger, chunk=8)) == 1
    assert bool(ref.cache_changed(ref.cache_fingerprint(*cache, chunk=8), *bigger, chunk=8))


# --------------------------------------------------------------------------------------------- scores
@cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_score_counts_only_inside_the_valid_candidates(dtype, bad):
    g = _gen(5)
    B, Hkv, N = 3, 5, 37
    scores = torch.randn(B, Hkv, N, generator=g).to(dtype)
    counts = torch.randint(0, N + 1, (B, Hkv), generator=g)
    counts[0, 0], counts[0, 1], counts[2, 4] = N, 0, 20
    for b, j, n, flagged in [(2, 4, 20, False), (2, 4, 36, False), (0, 1, 0, False), (2, 4, 19, True),
                             (0, 0, 36, True), (0, 0, 0, True)]:
        poisoned = scores.clone()
        poisoned[b, j, n] = bad
        poisoned[0, 1, :] = bad  # a row without candidates: nothing of it counts
        got = tcc.nonfinite_scores(poisoned, counts, config=SMALL)
        assert got.dtype == torch.int32 and got.dim() == 0
        assert bool(got) is flagged is bool(ref.nonfinite_scores(poisoned, counts)), (b, j, n)
    # a strided view ([B, N, Hkv] transposed)
    transposed = scores.transpose(1, 2).contiguous().transpose(1, 2)
    transposed[1, 2, 3] = bad
    assert bool(tcc.nonfinite_scores(transposed, counts.clamp(min=4), config=SMALL))
    assert not tcc.nonfinite_scores(torch.zeros(2, 3, 0, dtype=dtype), torch.zeros(2, 3, dtype=torch.long))


# --------------------------------------------------------------------------------------------- selections
def _selection(seed: int, B: int, Hkv: int, N: int, budget, head: int, tail, adaptive: bool):
    """``(scores, counts, keep, kept)``: a valid selection of the budget (top-k, or Ada-KV's head-adaptive
    one) over random counts (a row and KV head without candidates, one with all ``N``)."""
    g = _gen(seed)
    scores = torch.rand(B, Hkv, N, generator=g)
    low = head + (int(tail.max()) if isinstance(tail, torch.Tensor) else tail)
    counts = torch.randint(min(low, N), N + 1, (B, Hkv), generator=g)
    counts[0, 0] = N
    policy = HeadAdaptiveSelection() if adaptive else TopKSelection()
    sel = policy.select(scores, counts, budget, head, tail)
    return counts, sel.keep, sel.counts


def _faulty(fault: str, keep: torch.Tensor, kept: torch.Tensor, counts: torch.Tensor):
    """``(keep, kept)`` broken in one way in row ``B-1``, KV head ``Hkv-1`` (the last program, the last block)."""
    keep, kept = keep.clone(), kept.clone()
    b, j = keep.shape[0] - 1, keep.shape[1] - 1
    k = int(kept[b, j])
    if fault == "unsorted":
        keep[b, j, k - 2 : k] = keep[b, j, k - 2 : k].flip(-1)
    elif fault == "duplicate":
        keep[b, j, k - 1] = keep[b, j, k - 2]
    elif fault == "out_of_range":
        keep[b, j, k - 1] = counts[b, j]
    elif fault == "negative":
        keep[b, j, 0] = -1
    elif fault == "missing_head":  # keep slot 1 -> 2 where 2 is free
        keep[b, j, :k] = torch.arange(k) + (torch.arange(k) >= 1)
    elif fault == "missing_tail":  # the last candidate dropped, the others shifted down
        keep[b, j, :k] = torch.arange(k)
    elif fault == "miscount":
        kept[b, j] -= 1
    elif fault == "kept_over_K":
        kept[b, j] = keep.shape[-1] + 1
    elif fault == "adaptive_total":  # one head keeps one more than its share: the row's total is off
        keep[b, j, k] = int(counts[b, j]) - 1 if k < keep.shape[-1] else keep[b, j, k - 1]
        kept[b, j] += 1
    return keep, kept


def _assert_same(got, want) -> None:
    broken, keep, kept = got
    assert broken.dim() == 0 and broken.dtype == torch.int32
    assert bool(broken) == bool(want[0])
    assert torch.equal(keep, want[1]) and torch.equal(kept, want[2])


SELECTION_CASES = [  # B, Hkv, N, budget, head, tail
    (1, 1, 1, 1, 0, 0),
    (3, 2, 17, 6, 1, 2),
    (2, 5, 40, 13, 2, 3),
    (1, 3, 23, 1, 0, 1),
]


@cpu
@pytest.mark.parametrize("case", SELECTION_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("adaptive", [False, True], ids=["uniform", "adaptive"])
@pytest.mark.parametrize("per_head", [False, True], ids=["ints", "tensors"])
def test_a_valid_selection_passes_unchanged(case, adaptive, per_head):
    B, Hkv, N, budget, head, tail = case
    if per_head:
        budget, tail = torch.full((B, Hkv), budget), torch.full((B, Hkv), tail)
    counts, keep, kept = _selection(6, B, Hkv, N, budget, head, tail, adaptive)
    want = ref.check_selection(keep, kept, counts, budget, head, tail, adaptive)
    assert not want[0]
    _assert_same(tcc.check_selection(keep, kept, counts, budget, head, tail, adaptive, config=SMALL), want)
    got = tcc.check_selection(keep.transpose(0, 1).contiguous().transpose(0, 1), kept, counts, budget, head, tail,
                              adaptive)  # strided keep, default tiles
    _assert_same(got, want)


FAULTS = ["unsorted", "duplicate", "out_of_range", "negative", "missing_head", "missing_tail", "miscount",
          "kept_over_K"]


@cpu
@pytest.mark.parametrize("fault", [*FAULTS, "adaptive_total"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["uniform", "adaptive"])
@pytest.mark.parametrize("per_head", [False, True], ids=["ints", "tensors"])
@pytest.mark.parametrize("protected", [2, 0], ids=["protected", "unprotected"])
def test_each_broken_rule_is_caught_and_replaced_by_the_stand_in(fault, adaptive, per_head, protected):
    """With nothing protected, a fault in the last entry breaks only its own rule (range, order, count)."""
    B, Hkv, N, budget, head, tail = 2, 3, 29, 9, protected, protected
    if fault in ("missing_head", "missing_tail") and not protected:
        pytest.skip("nothing protected to miss")
    if fault == "adaptive_total" and not adaptive:
        fault = "miscount"  # the uniform rule's version of the same fault
    if per_head:  # differing budgets per row
        budget = torch.tensor([[budget], [budget - 2]]).expand(B, Hkv)
        tail = torch.full((B, Hkv), tail)
    counts, keep, kept = _selection(7, B, Hkv, N, budget, head, tail, adaptive)
    counts[-1, -1] = N  # the faulty head evicts
    keep, kept = _selection_with_counts(counts, budget, head, tail, adaptive)
    bad_keep, bad_kept = _faulty(fault, keep, kept, counts)
    want = ref.check_selection(bad_keep, bad_kept, counts, budget, head, tail, adaptive)
    assert want[0], f"the reference misses {fault}"
    _assert_same(tcc.check_selection(bad_keep, bad_kept, counts, budget, head, tail, adaptive, config=SMALL), want)
    _assert_same(tcc.check_selection(bad_keep, bad_kept, counts, budget, head, tail, adaptive), want)


def _selection_with_counts(counts, budget, head, tail, adaptive):
    scores = torch.rand(*counts.shape, int(counts.max()), generator=_gen(8))
    policy = HeadAdaptiveSelection() if adaptive else TopKSelection()
    sel = policy.select(scores, counts, budget, head, tail)
    return sel.keep, sel.counts


@cpu
def test_a_short_keep_and_k_of_one():
    """``K = 1`` below the budget (a policy that returned too few columns: ``kept > K``), and a valid ``K = 1``."""
    counts = torch.tensor([[5, 1], [0, 3]])
    keep = torch.tensor([[[0], [0]], [[-1], [2]]])
    kept = torch.tensor([[2, 1], [0, 1]])
    want = ref.check_selection(keep, kept, counts, 2, 0, 0, False)
    assert want[0]
    _assert_same(tcc.check_selection(keep, kept, counts, 2, 0, 0, False), want)
    assert torch.equal(want[2], torch.tensor([[1, 1], [0, 1]]))  # min(counts, budget, K)
    last = torch.tensor([[[4], [0]], [[-1], [2]]])  # budget 1, protected tail 1: each head keeps its last candidate
    good = ref.check_selection(last, torch.tensor([[1, 1], [0, 1]]), counts, 1, 0, 1, False)
    assert not good[0]
    _assert_same(tcc.check_selection(last, torch.tensor([[1, 1], [0, 1]]), counts, 1, 0, 1, False), good)


@cpu
def test_a_large_k():
    """K = 13,000 kept of 20,000 candidates, over several blocks of the default tile; then one duplicate."""
    B, Hkv, N, budget = 1, 2, 20_000, 13_000
    counts = torch.tensor([[N, N - 7]])
    scores = torch.rand(B, Hkv, N, generator=_gen(9))
    sel = TopKSelection().select(scores, counts, budget, 4, 16)
    want = ref.check_selection(sel.keep, sel.counts, counts, budget, 4, 16, False)
    assert not want[0]
    _assert_same(tcc.check_selection(sel.keep, sel.counts, counts, budget, 4, 16, False), want)
    keep = sel.keep.clone()
    keep[0, 1, 12_345] = keep[0, 1, 12_344]
    want = ref.check_selection(keep, sel.counts, counts, budget, 4, 16, False)
    assert want[0]
    _assert_same(tcc.check_selection(keep, sel.counts, counts, budget, 4, 16, False), want)


# --------------------------------------------------------------------------------------------- the guard
@cpu
@pytest.mark.parametrize("backend", [None, TritonBackend()], ids=["reference", "triton"])
def test_the_guard_raises_the_same_message_with_either_flag_dtype(backend):
    counts, keep, kept = _selection(10, 2, 3, 20, 6, 1, 1, False)
    policy = BrokenSelection("duplicates")
    bad = Selection(keep=_faulty("duplicate", keep, kept, counts)[0], counts=kept)
    with pytest.raises(PluginContractError, match=r"'broken_selection'.*invalid selection.*exactly min\(budget=6"):
        ContractGuard(True, immediate=True).check_selection(bad, counts, 6, 1, 1, policy, backend)
    # deferred into a FlagSink (the prefill graphs' path): the int32 flag accumulates like a bool one
    guard, sink = ContractGuard(True), FlagSink(torch.device(DEVICE), capacity=2)
    for selection in (Selection(keep=keep, counts=kept), bad):
        with guard.accumulating(sink):
            out_keep, out_kept = guard.check_selection(selection, counts, 6, 1, 1, policy, backend)
        guard.watch(sink)
    assert torch.equal(out_kept, counts.clamp(max=6))  # the stand-in
    with pytest.raises(PluginContractError, match="invalid selection"):
        guard.flush()


# --------------------------------------------------------------------------------------------- end to end
def run_triton(model, ids, mask, **kwargs):
    return generate(model, ids, mask, backend="triton", max_new_tokens=3, min_new_tokens=3, do_sample=False,
                    **kwargs)


@cpu
@pytest.mark.parametrize("fault", ["duplicates", "out_of_range", "short", "drops_protected"])
def test_a_broken_selection_is_caught_on_the_triton_backend(llama, checks_on, fault):
    model, tok = llama
    ids, mask, _ = left_padded(tok, [30, 22], seed=1)
    with pytest.raises(PluginContractError, match="selection policy 'broken_selection'.*invalid selection"):
        run_triton(model, ids, mask, compressor="snapkv", params={"ratio": 0.5, "window": 4,
                                                                  "selection": BrokenSelection(fault)})


@cpu
@pytest.mark.parametrize("fault, match", [("nan", "non-finite score"),
                                          ("writes_cache", "changed the cache it was scoring")])
def test_broken_scores_are_caught_on_the_triton_backend(llama, checks_on, fault, match):
    model, tok = llama
    ids, mask, _ = left_padded(tok, [30, 22], seed=1)
    scoring = BrokenScoring(pooling="avg", kernel=7, aggregation="group", normalization="visible", fault=fault)
    with pytest.raises(PluginContractError, match=match):
        run_triton(model, ids, mask, compressor="snapkv", params={"ratio": 0.5, "window": 4, "scoring": scoring})


@cpu
@pytest.mark.parametrize("selection", ["topk", "adaptive"])
def test_builtins_pass_the_triton_checks(llama, checks_on, selection):
    model, tok = llama
    ids, mask, _ = left_padded(tok, [30, 22], seed=1)
    out = run_triton(model, ids, mask, compressor="snapkv", params={"ratio": 0.4, "window": 4,
                                                                    "selection": selection})
    assert out.generated_tokens == 3


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@gpu
def test_prefill_shapes_on_the_gpu():
    """Llama-3.1-8B prefill shapes: an 8K+ cache in bf16 (several 512-slot chunks, padding), 130K scores, K of
    13,000; each against the reference."""
    _, cache = make_cache(11, 2, 8, 9000, 128, torch.bfloat16, "cuda")
    before = tcc.cache_fingerprint(*cache)
    torch.testing.assert_close(before[..., 36:], ref.cache_fingerprint(*cache)[..., 36:], rtol=0, atol=0)
    assert int(tcc.cache_changed(before, *cache)) == 0
    changed = _changed("keys", cache)
    assert int(tcc.cache_changed(before, *changed)) == 1
    scores = torch.randn(1, 8, 130_000, device="cuda")
    counts = torch.full((1, 8), 129_000, device="cuda")
    scores[0, 7, 128_999] = float("nan")
    assert int(tcc.nonfinite_scores(scores, counts)) == 1
    counts[0, 7] -= 1
    assert int(tcc.nonfinite_scores(scores, counts)) == 0
    sel = TopKSelection().select(scores.nan_to_num(), counts, 13_000, 4, 32)
    want = ref.check_selection(sel.keep, sel.counts, counts, 13_000, 4, 32, False)
    _assert_same(tcc.check_selection(sel.keep, sel.counts, counts, 13_000, 4, 32, False), want)


@pytest.mark.gpu
@gpu
def test_the_checks_are_captured_in_a_cuda_graph():
    """Every launcher in one CUDA graph (no host read, no size known only after a read): the replay flags a fault
    made between replays."""
    _, cache = make_cache(12, 2, 4, 1500, 64, torch.bfloat16, "cuda")
    counts, keep, kept = (t.cuda() for t in _selection(13, 2, 4, 300, 40, 2, 2, True))
    scores = torch.randn(2, 4, 300, device="cuda")
    tcc.check_selection(keep, kept, counts, 40, 2, 2, True)  # compile outside the capture
    before = tcc.cache_fingerprint(*cache)
    tcc.cache_changed(before, *cache), tcc.nonfinite_scores(scores, counts)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        before = tcc.cache_fingerprint(*cache)
        changed = tcc.cache_changed(before, *cache)
        nonfinite = tcc.nonfinite_scores(scores, counts)
        broken, _, _ = tcc.check_selection(keep, kept, counts, 40, 2, 2, True)
    graph.replay()
    assert [int(changed), int(nonfinite), int(broken)] == [0, 0, 0]
    scores[1, 2, 0] = float("inf")
    keep[1, 3, 1] = keep[1, 3, 0]
    graph.replay()
    assert [int(nonfinite), int(broken)] == [1, 1]
