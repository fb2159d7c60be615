"""SieveLayer / SieveCache unit tests: appends, compaction, storage, batch reordering, the query ring."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsieve.backends.torch_ref import TorchBackend
from kvsieve.cache import DynamicSieveLayer, SieveCache

BACKEND = TorchBackend()
D = 4


def kv(B: int, Hkv: int, Q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hkv, Q, D, generator=g), torch.randn(B, Hkv, Q, D, generator=g)


def filled_layer(B: int, Hkv: int, chunks: list[int], query_window: int = 0, seed: int = 0):
    """A layer fed ``chunks`` appends; returns it and the concatenated keys/values ``[B, Hkv, L, D]``."""
    layer = DynamicSieveLayer(query_window)
    keys, values = [], []
    for i, q in enumerate(chunks):
        k, v = kv(B, Hkv, q, seed + i)
        layer.update(k, v)
        keys.append(k)
        values.append(v)
    return layer, torch.cat(keys, 2), torch.cat(values, 2)


# ---------------------------------------------------------------------------------------------- append
def test_append_with_growth_keeps_data_and_positions():
    layer, keys, values = filled_layer(2, 3, [5, 1, 70, 1, 1, 100])
    L = keys.shape[2]
    assert layer.seen == L == 178 and layer.get_seq_length() == L
    assert layer.capacity >= L and layer.capacity % 64 == 0
    assert layer.starts.eq(0).all() and layer.ends.eq(L).all() and layer.max_live == L
    torch.testing.assert_close(layer.keys[:, :, :L], keys, rtol=0, atol=0)
    torch.testing.assert_close(layer.values[:, :, :L], values, rtol=0, atol=0)
    assert torch.equal(layer.positions[:, :, :L], torch.arange(L).expand(2, 3, L))
    assert layer.positions[:, :, L:].eq(-1).all()
    assert layer.nbytes() == 2 * 2 * 3 * layer.capacity * D * 4


def test_update_returns_whole_buffers_and_growth_is_amortised():
    layer = DynamicSieveLayer()
    capacities = []
    for step in range(400):
        k, v = kv(1, 1, 1, step)
        keys, values = layer.update(k, v)
        assert keys is layer.keys and values is layer.values
        capacities.append(layer.capacity)
    assert (
        len(set(capacities)) <= 8
    )  # grows by at least a quarter: a handful of reallocations, not one per step


# ---------------------------------------------------------------------------------------------- compaction
def test_compact_ragged_counts_and_dest_starts():
    B, Hkv, L = 2, 2, 12
    layer, keys, values = filled_layer(B, Hkv, [L])
    layer.starts = torch.tensor([[2, 2], [0, 0]])  # row 0 has two padding slots
    keep = torch.tensor(
        [
            [[4, 7, 11, -1], [2, 3, -1, -1]],  # region from 0 (padding dropped), region from 2
            [[5, 6, 9, 10], [-1, -1, -1, -1]],  # region from 5 (prefix protected), everything dropped from 8
        ]
    )
    counts = torch.tensor([[3, 2], [4, 0]])
    dest = torch.tensor([[0, 2], [5, 8]])
    layer.compact(BACKEND, keep, counts, dest)
    assert layer.ends.tolist() == [[3, 4], [9, 8]]
    assert layer.starts.tolist() == [[0, 2], [0, 0]]  # padding inside a region is gone, else untouched
    assert layer.compactions == 1
    expected_slots = {
        (0, 0): [4, 7, 11],
        (0, 1): [0, 1, 2, 3],
        (1, 0): [0, 1, 2, 3, 4, 5, 6, 9, 10],
        (1, 1): list(range(8)),
    }
    for (b, j), slots in expected_slots.items():
        n = len(slots)
        assert layer.positions[b, j, :n].tolist() == slots
        assert layer.positions[b, j, n:].eq(-1).all(), "free slots hold no position"
        torch.testing.assert_close(layer.keys[b, j, :n], keys[b, j, slots], rtol=0, atol=0)
        torch.testing.assert_close(layer.values[b, j, :n], values[b, j, slots], rtol=0, atol=0)


@st.composite
def compactions(draw):
    B, Hkv = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    L = draw(st.integers(1, 40))
    starts = torch.tensor([[draw(st.integers(0, L)) for _ in range(Hkv)] for _ in range(B)])
    dest = torch.tensor([[draw(st.integers(0, int(starts[b, j]))) for j in range(Hkv)] for b in range(B)])
    keeps = []
    for b in range(B):
        for j in range(Hkv):
            region = list(range(int(starts[b, j]), L))
            keeps.append(
                sorted(draw(st.sets(st.sampled_from(region), max_size=len(region))) if region else [])
            )
    return B, Hkv, L, starts, dest, keeps, draw(st.integers(0, 8))


@settings(max_examples=40, deadline=None)
@given(compactions())
def test_compact_matches_a_naive_gather(case):
    B, Hkv, L, starts, dest, keeps, reserve = case
    layer, keys, values = filled_layer(B, Hkv, [L], seed=L)
    layer.starts = starts.clone()
    K = max(1, max(len(k) for k in keeps))
    keep = torch.full((B, Hkv, K), -1, dtype=torch.long)
    for i, k in enumerate(keeps):
        keep[i // Hkv, i % Hkv, : len(k)] = torch.tensor(k, dtype=torch.long)
    counts = torch.tensor([len(k) for k in keeps]).reshape(B, Hkv)
    layer.slot_buffer("position", fill=-7.0).copy_(layer.positions)  # a side buffer that names each slot's token
    layer.compact(BACKEND, keep, counts, dest, reserve=reserve)
    assert torch.equal(layer.ends, dest + counts)
    assert torch.equal(layer.starts, torch.minimum(starts, dest))
    assert layer.capacity >= layer.max_end + reserve
    for i, k in enumerate(keeps):
        b, j = divmod(i, Hkv)
        d = int(dest[b, j])
        slots = list(range(d)) + k  # the prefix before the region is untouched
        n = len(slots)
        assert layer.positions[b, j, :n].tolist() == slots
        assert layer.positions[b, j, n:].eq(-1).all()
        assert layer.slot_buffer("position")[b, j, :n].tolist() == slots  # moved with the tokens
        assert layer.slot_buffer("position")[b, j, n:].eq(-7).all()  # no token: the fill
        torch.testing.assert_close(layer.keys[b, j, :n], keys[b, j, slots], rtol=0, atol=0)
        torch.testing.assert_close(layer.values[b, j, :n], values[b, j, slots], rtol=0, atol=0)


def test_shrink_frees_storage_and_keeps_data():
    layer, keys, _ = filled_layer(1, 2, [300])
    big = layer.nbytes()
    assert layer.capacity == 320
    keep = torch.tensor([[[3, 100, 299], [0, 1, 2]]])
    layer.compact(BACKEND, keep, torch.tensor([[3, 3]]), torch.zeros(1, 2, dtype=torch.long))
    assert layer.capacity == 64 and layer.nbytes() == big // 5
    torch.testing.assert_close(layer.keys[0, 0, :3], keys[0, 0, [3, 100, 299]], rtol=0, atol=0)
    assert layer.positions[0, 1, :3].tolist() == [0, 1, 2]
    k, v = kv(1, 2, 1, 99)  # appends continue after the compacted range, with the true position
    layer.update(k, v)
    assert layer.ends.tolist() == [[4, 4]] and layer.positions[0, :, 3].tolist() == [300, 300]
    torch.testing.assert_close(layer.keys[0, :, 3], k[0, :, 0], rtol=0, atol=0)


def test_compact_keeps_the_reserve_allocated():
    layer, _, _ = filled_layer(1, 1, [300])
    keep = torch.arange(10).reshape(1, 1, 10)
    layer.compact(BACKEND, keep, torch.tensor([[10]]), torch.zeros(1, 1, dtype=torch.long), reserve=100)
    assert layer.capacity >= 110


# ---------------------------------------------------------------------------------------------- slot buffers
def _named_by_position(layer, name: str) -> bool:
    """Whether side buffer ``name`` holds each live token's position and the fill (-1) everywhere else."""
    return torch.equal(layer.slot_buffer(name), layer.positions.float())


def test_slot_buffers_follow_their_tokens_through_compaction_growth_shrinking_and_reordering():
    layer, _, _ = filled_layer(2, 2, [300])
    with pytest.raises(RuntimeError, match="holds no tokens yet"):
        DynamicSieveLayer().slot_buffer("score")
    buffer = layer.slot_buffer("score", fill=-1.0)
    assert buffer.shape == (2, 2, layer.capacity) and buffer.dtype == torch.float32 and buffer.eq(-1).all()
    assert layer.slot_buffer("score") is buffer  # created once
    assert layer.nbytes() == 2 * 2 * 2 * layer.capacity * D * 4 + buffer.numel() * 4  # side buffers count
    buffer.copy_(layer.positions)  # live slots: their token's position; free slots: -1, the fill
    keep = torch.tensor([[[3, 100, 299], [0, 1, 2]], [[7, 8, 9], [5, 50, 250]]])
    layer.compact(BACKEND, keep, torch.full((2, 2), 3), torch.zeros(2, 2, dtype=torch.long))
    assert layer.capacity == 64 and layer.slot_buffer("score").shape[-1] == 64  # shrunk with the keys
    assert _named_by_position(layer, "score")
    layer.update(*kv(2, 2, 1, 5))  # a new token starts from the fill
    assert layer.slot_buffer("score")[:, :, 3].eq(-1).all()
    layer.slot_buffer("score")[:, :, 3] = 300.0
    layer.update(*kv(2, 2, 100, 6))  # growth keeps every value
    assert layer.capacity > 64 and layer.slot_buffer("score")[:, :, 4:104].eq(-1).all()
    layer.slot_buffer("score")[:, :, 4:104] = torch.arange(301, 401).float()
    assert _named_by_position(layer, "score")
    before = layer.slot_buffer("score").clone()
    layer.batch_select_indices(torch.tensor([1, 0, 0]))
    torch.testing.assert_close(layer.slot_buffer("score"), before[[1, 0, 0]], rtol=0, atol=0)


def test_slot_buffers_move_into_a_static_layer_and_follow_its_compactions():
    from kvsieve.static import StaticSieveLayer

    layer, _, _ = filled_layer(2, 1, [10])
    layer.slot_buffer("score", fill=-1.0).copy_(layer.positions)
    static = StaticSieveLayer.from_layer(layer, capacity=20)
    buffer = static.slot_buffer("score")
    assert buffer.shape == (2, 1, 20) and _named_by_position(static, "score")
    keep = torch.tensor([[[1, 4, 9]], [[0, 2, 3]]])
    static.compact(BACKEND, keep, torch.full((2, 1), 3), torch.zeros(2, 1, dtype=torch.long))
    assert static.slot_buffer("score") is buffer  # a static layer keeps its storage
    assert _named_by_position(static, "score")
    static.batch_select_indices(torch.tensor([1, 0]))
    assert buffer[:, 0, :3].tolist() == [[0.0, 2.0, 3.0], [1.0, 4.0, 9.0]]


# ------------------------------------------------------------------------------------------ batch reordering
def test_batch_select_and_repeat_interleave_move_every_per_row_tensor():
    layer, keys, _ = filled_layer(3, 2, [10], query_window=4)
    layer.push_queries(torch.arange(3 * 4 * 10 * D, dtype=torch.float32).reshape(3, 4, 10, D))
    layer.starts = torch.tensor([[0, 0], [3, 3], [5, 5]])
    queries = layer.window_queries().clone()
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert layer.keys.shape[0] == layer.values.shape[0] == layer.positions.shape[0] == 2
    torch.testing.assert_close(layer.keys[:, :, :10], keys[[2, 0]], rtol=0, atol=0)
    assert layer.starts.tolist() == [[5, 5], [0, 0]] and layer.ends.tolist() == [[10, 10], [10, 10]]
    torch.testing.assert_close(layer.window_queries(), queries[[2, 0]], rtol=0, atol=0)
    layer.batch_repeat_interleave(3)
    assert layer.starts[:, 0].tolist() == [5, 5, 5, 0, 0, 0]
    torch.testing.assert_close(layer.keys[:, :, :10], keys[[2, 2, 2, 0, 0, 0]], rtol=0, atol=0)
    torch.testing.assert_close(layer.window_queries(), queries[[2, 2, 2, 0, 0, 0]], rtol=0, atol=0)


def test_cache_level_batch_repeat_interleave_and_reorder():
    cache = SieveCache(query_window=2, num_layers=2)
    for idx in range(2):
        cache.update(*kv(2, 1, 5, idx), idx)
    cache.batch_repeat_interleave(2)
    cache.reorder_cache(torch.tensor([3, 2, 1, 0]))
    for layer in cache.layers:
        assert layer.keys.shape[0] == 4 and layer.ends.shape == (4, 1)


# ---------------------------------------------------------------------------------------------- prompt_ends
def test_prompt_ends_after_prefill_compaction_and_decode():
    layer, _, _ = filled_layer(2, 1, [10])
    layer.prompt_len = 10
    layer.starts = torch.tensor([[4], [0]])  # row 0: 4 padding slots
    assert layer.prompt_ends().tolist() == [[10], [10]]
    keep = torch.tensor([[[5, 8, 9]], [[0, 2, 9]]])
    layer.compact(BACKEND, keep, torch.tensor([[3], [3]]), torch.zeros(2, 1, dtype=torch.long))
    for step in range(3):
        layer.update(*kv(2, 1, 1, step))
    assert layer.prompt_ends().tolist() == [[3], [3]]  # 3 prompt tokens kept, 3 generated after them
    assert layer.positions[:, 0, :6].tolist() == [[5, 8, 9, 10, 11, 12], [0, 2, 9, 10, 11, 12]]


# ---------------------------------------------------------------------------------------------- query ring
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.lists(st.integers(1, 9), min_size=1, max_size=6))
def test_window_queries_are_the_last_r_in_chronological_order(R, chunks):
    layer = DynamicSieveLayer(query_window=R)
    total = sum(chunks)
    pushed = torch.arange(total, dtype=torch.float32)[None, None, :, None].expand(1, 2, total, 3)
    offset = 0
    for q in chunks:
        layer.push_queries(pushed[:, :, offset : offset + q])
        offset += q
    got = layer.window_queries()
    W = min(total, R)
    assert got.shape == (1, 2, W, 3)
    # oldest first: window_lse gives query w the causal range of the token at slot ends - W + w
    assert got[0, 0, :, 0].tolist() == list(range(total - W, total))


def test_window_queries_are_in_chronological_order():
    """A prefill of 45 tokens into an 8-query ring (what SnapKV does): the 8 window queries, oldest first."""
    layer = DynamicSieveLayer(query_window=8)
    layer.push_queries(torch.arange(45, dtype=torch.float32).reshape(1, 1, 45, 1))
    assert layer.window_queries().flatten().tolist() == list(range(37, 45))


def test_window_queries_without_a_window_is_an_error():
    layer = DynamicSieveLayer(query_window=0)
    layer.push_queries(torch.zeros(1, 1, 3, 2))
    with pytest.raises(RuntimeError, match="query_window is 0"):
        layer.window_queries()


# ---------------------------------------------------------------------------------------------- SieveCache
def test_sieve_cache_reports_lengths_bytes_and_peak():
    cache = SieveCache(num_layers=2)
    for idx, L in enumerate([100, 30]):
        cache.update(*kv(1, 2, L, idx), idx)
    assert cache.num_layers == 2 and cache.get_seq_length(0) == 100
    assert cache.kv_lengths() == [100, 30]
    slot = 2 * 2 * D * 4  # K + V, 2 KV heads, fp32
    assert cache.nbytes() == (128 + 64) * slot
    assert cache.live_nbytes() == 130 * slot
    peak = cache.peak_nbytes
    assert peak == cache.nbytes()
    keep = torch.arange(5).expand(1, 2, 5)
    cache.layers[0].compact(BACKEND, keep, torch.full((1, 2), 5), torch.zeros(1, 2, dtype=torch.long))
    assert cache.kv_lengths() == [5, 30] and cache.live_nbytes() == 35 * slot
    assert cache.nbytes() == (64 + 64) * slot < peak == cache.peak_nbytes
    assert cache.layers[0].get_seq_length() == 100  # the logical length never shrinks


def test_mask_sizes_follow_the_logical_length():
    layer, _, _ = filled_layer(1, 1, [50])
    layer.compact(
        BACKEND, torch.tensor([[[0, 49]]]), torch.tensor([[2]]), torch.zeros(1, 1, dtype=torch.long)
    )
    assert layer.get_mask_sizes(1) == (51, 0)
    layer.reset()
    assert layer.keys is None and layer.seen == 0 and layer.max_live == 0 and layer.nbytes() == 0
