"""FastKV: token-selective propagation + per-layer KV selection (docs/policies/fastkv.md).

* driver tests run the compressor on a bare SieveCache layer fed with random K/V and queries and compare its
  choices (the layer's kept KV per head, the propagated tokens) with a straightforward re-implementation;
* model tests run tiny random models (4-layer Llama built here, so the TSP layer sits in the middle, and the
  3-layer tiny models of every family) through forward and ``model.generate``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, MisorderedFastKV, greedy, left_padded, random_prompt, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from kvsieve.backends.torch_ref import TorchBackend
from kvsieve.cache import SieveCache
from kvsieve.compressor import LayerEvent
from kvsieve.contracts import PluginContractError
from kvsieve.engine import Engine
from kvsieve.integration import apply, generate, resolve_compressor
from kvsieve.params import UnknownParameterError
from kvsieve.plugins import registry
from kvsieve.policies.fastkv import FastKV, HeadPooledWindowScoring
from kvsieve.policies.window_attention import WindowAttentionScoring
from kvsieve.policy import ScoringContext
from kvsieve.propagation import PropagationState, decoder_layers

PAD0 = SimpleNamespace(pad_token_id=0)  # the tokenizer facts left_padded needs (model4's pad id)


@pytest.fixture(scope="module")
def model4():
    """A tiny random Llama with 4 layers: the default TSP layer is 4 / 2 - 1 = 1."""
    return tiny_llama(4)


def assert_keep_all_matches_full(model, ids, mask, n: int) -> None:
    """FastKV with ``tsp_rate = ratio = 1`` generates the same ``n`` greedy tokens as the full cache."""
    full = generate(model, ids, mask, compressor="none", backend="torch", **greedy(n))
    same = generate(
        model,
        ids,
        mask,
        compressor="fastkv",
        backend="torch",
        params=dict(tsp_rate=1.0, ratio=1.0),
        **greedy(n),
    )
    assert torch.equal(same.sequences, full.sequences)


class TokenCounter:
    """Forward pre-hooks recording how many tokens each decoder layer computes on, per forward."""

    def __init__(self, model):
        self.counts: list[list[int]] = []
        self.handles = [
            layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(decoder_layers(model))
        ]

    def _hook(self, i):
        def hook(module, args):
            if i == 0:
                self.counts.append([])
            self.counts[-1].append(args[0].shape[1])

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def live_positions(layer, b: int, j: int = 0) -> torch.Tensor:
    return layer.positions[b, j, int(layer.starts[b, j]) : int(layer.ends[b, j])]


# ------------------------------------------------------------------------------------------ parameters
def test_defaults_and_registration():
    assert registry().get("compressor", "fastkv").obj is FastKV
    assert registry().get("scoring", HeadPooledWindowScoring.name).obj is HeadPooledWindowScoring
    fkv = FastKV()
    assert (fkv.tsp_rate, fkv.keep.ratio, fkv.window, fkv.scoring.kernel, fkv.scoring.pooling) == (
        0.2,
        0.1,
        8,
        7,
        "max",
    )
    assert fkv.scoring == HeadPooledWindowScoring(pooling="max", kernel=7)
    assert fkv.tsp_layer is None and not fkv.constant and fkv.propagates and fkv.query_window == 8
    assert (
        fkv.resolve_tsp_layer(32) == 15
        and fkv.resolve_tsp_layer(36) == 17
        and fkv.resolve_tsp_layer(40) == 19
    )
    config = fkv.config()
    assert config["name"] == "fastkv"
    assert config["scoring"] == {"name": HeadPooledWindowScoring.name, "pooling": "max", "kernel": 7,
                                 "aggregation": "group"}
    assert config["selection"] == config["tsp_selection"] == {"name": "topk"}
    assert FastKV(tsp_len=2048, budget=512).constant


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(tsp_rate=0.2, budget=512), "not a mix"),
        (dict(tsp_len=2048, ratio=0.1), "not a mix"),
        (dict(tsp_len=2048), "needs both tsp_len and budget"),
        (dict(budget=512), "needs both tsp_len and budget"),
        (dict(tsp_len=8, budget=512), "tsp_len=8 must exceed window=8"),
        (dict(tsp_len=2048, budget=4), "budget=4 must exceed window=8"),
        (dict(tsp_rate=0), "tsp_rate must be a ratio in \\(0, 1\\]"),
        (dict(tsp_rate=1.5), "tsp_rate must be a ratio"),
        (dict(ratio=-0.1), "ratio must be the kept fraction, in \\(0, 1\\]"),
        (dict(tsp_len=0, budget=512), "tsp_len must be a positive integer"),
        (dict(window=0), "window must be a positive integer"),
        (dict(tsp_layer=-1), "tsp_layer must be an integer >= 0"),
        (dict(tsp_layer=True), "tsp_layer must be an integer >= 0"),
        (dict(selection="nope"), "unknown selection 'nope'"),
    ],
)
def test_bad_parameters_are_refused_clearly(params, match):
    with pytest.raises(ValueError, match=match):
        FastKV(**params)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"scoring.kernel": 4}, "kernel must be a positive odd integer"),
        ({"scoring": {"pooling": "min"}}, "pooling"),
    ],
)
def test_bad_scoring_parameters_are_refused_clearly(params, match):
    """The pooling parameters are the scoring policy's (``scoring.key``); the policy validates them."""
    with pytest.raises(ValueError, match=match):
        resolve_compressor("fastkv", params)


def test_pooling_parameters_of_the_compressor_point_to_the_scoring_policy():
    match = r"compressor 'fastkv' has no parameter 'pooling'\. Did you mean 'scoring\.pooling'\?"
    with pytest.raises(UnknownParameterError, match=match):
        resolve_compressor("fastkv", {"pooling": "avg"})


def test_tsp_layer_is_checked_against_the_model(model4):
    with pytest.raises(ValueError, match="tsp_layer=4 is out of range .* num_hidden_layers=4"):
        with apply(model4, "fastkv", "torch", params=dict(tsp_layer=4)):
            pass
    one_layer = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
        )
    )
    with pytest.raises(ValueError, match="at least 2 layers"):
        with apply(one_layer, "fastkv", "torch"):
            pass
    assert not decoder_layers(model4)[0]._forward_pre_hooks, "a refused apply leaves no hooks behind"


def test_length_rules():
    fkv = FastKV()  # proportional 0.2 / 0.1
    assert fkv.propagated_length(1000) == 200 and fkv.kv_budget(1000, after_tsp=False) == 100
    assert fkv.kv_budget(200, after_tsp=True) == 100  # ratio / tsp_rate of the propagated length
    assert FastKV(tsp_rate=0.2, ratio=0.2).kv_budget(200, after_tsp=True) == 200  # no further eviction
    assert FastKV(tsp_rate=0.2, ratio=0.4).kv_budget(200, after_tsp=True) >= 200
    assert fkv.propagated_length(1003) == 200 and fkv.kv_budget(1009, after_tsp=False) == 100  # floor
    assert (
        fkv.propagated_length(20) == 8 and fkv.kv_budget(20, after_tsp=False) == 8
    )  # never below the window
    assert fkv.propagated_length(8) == 8  # nothing to drop: TSP does not fire
    assert FastKV(tsp_rate=1.0, ratio=1.0).propagated_length(77) == 77
    const = FastKV(tsp_len=40, budget=20)
    assert const.kv_budget(19, after_tsp=False) is None  # shorter than the budget: left alone
    assert const.kv_budget(20, after_tsp=False) == const.kv_budget(500, after_tsp=True) == 20
    assert const.propagated_length(40) == 40 and const.propagated_length(41) == 40


# ------------------------------------------------------------------------------------------ selection parity
def stable_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, ties to the earlier index (the reference's topk leaves tie order
    unspecified; max pooling makes exact ties common), sorted ascending."""
    return torch.sort(scores, descending=True, stable=True).indices[:k].sort().values


def straightforward_fastkv(queries, keys, pad, window, kernel, pooling, budget, tsp_len):
    """FastKV's layer step for one row, written from the paper's description with dense tensors.

    Args:
        queries: ``[H, W, d]`` the last ``window`` tokens' queries; keys ``[Hkv, L, d]`` (the first ``pad``
            slots are left padding).
    Returns:
        ``(kv_keep [Hkv, k], tsp_real)``: kept slots per KV head; the REAL tokens chosen to propagate (None
        when ``tsp_len`` is None).
    """
    H, W, d = queries.shape
    Hkv, L, _ = keys.shape
    G = H // Hkv
    real = keys[:, pad:]  # padding plays no part
    n = L - pad
    logits = torch.einsum("hwd,hnd->hwn", queries, real.repeat_interleave(G, dim=0)) / math.sqrt(d)
    visible = torch.arange(n)[None, :] <= (n - W + torch.arange(W))[:, None]  # causal inside the window
    attn = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    summed = attn[:, :, : n - W].sum(dim=1)  # [H, n - W]: the window's own columns are not scored
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    pooled = pool(summed[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
    per_kv = pooled.view(Hkv, G, n - W).sum(dim=1)  # GQA-aware sum, per KV head
    tail = torch.arange(n - W, n)
    if n <= budget:
        kv = torch.arange(n).expand(Hkv, n)
    else:
        kv = torch.stack([torch.cat([stable_top(per_kv[j], budget - W), tail]) for j in range(Hkv)])
    tsp = None
    if tsp_len is not None:
        tsp = (
            torch.cat([stable_top(per_kv.sum(dim=0), tsp_len - W), tail]) if n > tsp_len else torch.arange(n)
        )
        tsp = tsp + pad
    return kv + pad, tsp


def run_layer(model, fkv, layer_idx, pads, heads, kv_heads, L, d, seed):
    """Feed one layer of a fresh SieveCache a prefill of random K/V and queries (as the attention function
    would) and run the compressor on it. ``model`` (not attached, never run) gives the engine its layer count;
    the engine holds the propagation state. Returns ``(keys, queries, cache, engine)``."""
    gen = torch.Generator().manual_seed(seed)
    B = len(pads)
    keys = torch.randn(B, kv_heads, L, d, generator=gen) * 2
    queries = torch.randn(B, heads, L, d, generator=gen)
    backend = TorchBackend()
    engine = Engine(model, fkv, backend)
    cache = SieveCache(query_window=fkv.query_window, num_layers=engine.num_layers)
    engine.cache = cache
    engine.propagation = PropagationState(num_tokens=L)
    layer = cache.layers[layer_idx]
    layer.update(keys, torch.randn(B, kv_heads, L, d, generator=gen))
    layer.begin_prompt(torch.tensor(pads)[:, None].expand(B, kv_heads).contiguous(), tuple(L - p for p in pads))
    layer.push_queries(queries)
    fkv.after_attention(
        LayerEvent("prefill", layer, layer_idx, engine.num_layers, engine, backend, d**-0.5, 0, reserve=fkv.reserve)
    )
    return keys, queries, cache, engine


@settings(max_examples=40, deadline=None)
@given(
    L=st.integers(2, 70),
    pad_fracs=st.lists(st.floats(0, 0.95), min_size=1, max_size=3),
    window=st.integers(1, 6),
    tsp_rate=st.floats(0.05, 1.0),
    ratio=st.floats(0.05, 1.0),
    layer_idx=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_selection_invariants(model4, L, pad_fracs, window, tsp_rate, ratio, layer_idx, seed):
    """Whatever the lengths: a common propagated size (the largest row's), sorted, the window in, each row's
    own propagated count of real tokens (as alone) and padding only to fill up; each layer's KV per head is
    min(budget, real) of its real tokens with the budget of the row's own real length, window included."""
    pads = [int(f * L) for f in pad_fracs]
    fkv = FastKV(tsp_rate=tsp_rate, ratio=ratio, window=window, scoring=HeadPooledWindowScoring(kernel=3), tsp_layer=1)
    _, _, cache, engine = run_layer(model4, fkv, layer_idx, pads, 4, 2, L, 4, seed)
    layer, propagated = cache.layers[layer_idx], engine.propagation.pending
    reals = [L - pad for pad in pads]
    alone = [fkv.propagated_length(n) for n in reals]  # what each row propagates alone
    if layer_idx != 1 or alone == reals:
        assert propagated is None
    else:
        K = max(alone)
        assert propagated.shape == (len(pads), K)
        assert bool((propagated[:, 1:] > propagated[:, :-1]).all())
        assert torch.equal(propagated[:, -window:], torch.arange(L - window, L).expand(len(pads), window))
        for b, pad in enumerate(pads):
            real_kept = max(alone[b], K - pad)  # the row's own count, unless its padding cannot fill up to K
            assert int((propagated[b] < pad).sum()) == K - real_kept
    for b, pad in enumerate(pads):
        real = L - pad
        budget = fkv.kv_budget(real, after_tsp=layer_idx > 1)
        for j in range(2):
            kept = live_positions(layer, b, j)
            assert len(kept) == min(budget, real)
            assert bool((kept >= pad).all()) and bool((kept[1:] > kept[:-1]).all())
            tail = min(window, real)
            assert torch.equal(kept[len(kept) - tail :], torch.arange(L - tail, L))


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (6, 2), (2, 2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_selection_matches_a_straightforward_implementation(model4, pooling, heads, kv_heads, seed):
    L, W, d, T = 61, 5, 8, 2
    pads = [0, 7, 40]  # real lengths 61, 54, 21: each row's budgets come from its own length (as alone)
    scoring = HeadPooledWindowScoring(pooling=pooling, kernel=5)
    fkv = FastKV(tsp_rate=0.4, ratio=0.25, window=W, scoring=scoring, tsp_layer=T)
    tsp_len, budget = fkv.propagated_length(L), fkv.kv_budget(L, after_tsp=False)
    assert (tsp_len, budget) == (24, 15)
    B = len(pads)
    keys, queries, cache, engine = run_layer(model4, fkv, T, pads, heads, kv_heads, L, d, seed)
    layer, propagated = cache.layers[T], engine.propagation.pending
    assert propagated.shape == (B, tsp_len)  # the longest row's count
    for b, pad in enumerate(pads):
        real_len = L - pad
        row_tsp, row_budget = fkv.propagated_length(real_len), fkv.kv_budget(real_len, after_tsp=False)
        want_kv, want_tsp = straightforward_fastkv(
            queries[b, :, -W:], keys[b], pad, W, fkv.scoring.kernel, pooling, row_budget, row_tsp
        )
        for j in range(kv_heads):
            assert torch.equal(live_positions(layer, b, j), want_kv[j]), (b, j)
        got = propagated[b]
        real = got[got >= pad]
        assert torch.equal(real, want_tsp), b
        assert len(got) - len(real) == tsp_len - row_tsp, "padding only fills up to the common count"
    assert layer.starts.tolist() == [[0] * kv_heads] * B, "padding is dropped from the KV"


@pytest.mark.parametrize("seed", [0, 3])
def test_kv_selection_leaves_token_selective_propagation_as_the_paper(model4, seed):
    """``selection`` picks each layer's KV only: with ``selection=span`` the propagated tokens are top-k's, as the
    paper runs TSP, while the TSP layer's KV differs; ``tsp_selection=span`` changes what propagates."""
    L, W, T, pads = 61, 5, 2, [0, 9]
    common = dict(tsp_rate=0.3, ratio=0.2, window=W, scoring=HeadPooledWindowScoring(kernel=3), tsp_layer=T)

    def propagated_and_kv(**params):
        _, _, cache, engine = run_layer(model4, FastKV(**common, **params), T, pads, 4, 2, L, 8, seed)
        kv = [live_positions(cache.layers[T], b, j).tolist() for b in range(len(pads)) for j in range(2)]
        return engine.propagation.pending.clone(), kv

    topk_tokens, topk_kv = propagated_and_kv()
    span_tokens, span_kv = propagated_and_kv(selection="span")
    assert torch.equal(span_tokens, topk_tokens)
    assert span_kv != topk_kv
    tsp_span_tokens, _ = propagated_and_kv(tsp_selection="span")
    assert not torch.equal(tsp_span_tokens, topk_tokens)
    assert FastKV().tsp_selection.name == "topk" and FastKV(tsp_selection="span").config()["tsp_selection"] == {
        "name": "span", "radius": 3}


def test_cross_head_aggregation_shares_one_ranking_and_leaves_tsp_alone(model4):
    """``scoring.aggregation=all``: every KV head of a layer keeps the same tokens (one ranking shared by the
    layer's heads), and TSP, which ranks by the sum over heads either way, propagates the same tokens."""
    L, W, T, pads = 61, 5, 2, [0, 9]
    common = dict(tsp_rate=0.3, ratio=0.2, window=W, tsp_layer=T)

    def run(aggregation):
        scoring = HeadPooledWindowScoring(kernel=3, aggregation=aggregation)
        _, _, cache, engine = run_layer(model4, FastKV(**common, scoring=scoring), T, pads, 4, 2, L, 8, 4)
        kv = [[live_positions(cache.layers[T], b, j).tolist() for j in range(2)] for b in range(len(pads))]
        return engine.propagation.pending.clone(), kv

    group_tokens, group_kv = run("group")
    shared_tokens, shared_kv = run("all")
    assert torch.equal(shared_tokens, group_tokens)
    assert all(row[0] == row[1] for row in shared_kv)
    assert any(row[0] != row[1] for row in group_kv)  # per KV head, the heads disagree on these inputs
    assert resolve_compressor("fastkv", {"scoring.aggregation": "all"}).scoring.aggregation == "all"


def test_head_pooled_scoring_equals_window_attention_with_avg_pooling():
    """Average pooling is linear: pooling per query head or after the GQA sum is the same."""
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, L, W, d = 2, 6, 2, 40, 6, 8
    keys, queries = torch.randn(B, Hkv, L, d, generator=gen), torch.randn(B, H, W, d, generator=gen)
    starts = torch.tensor([[0, 0], [9, 9]])
    ends = torch.full((B, Hkv), L)
    ctx = ScoringContext(
        queries,
        keys,
        keys,
        starts,
        ends,
        starts,
        ends - W,
        torch.zeros(B, Hkv, L).long(),
        0,
        d**-0.5,
        TorchBackend(),
        queries_are_last=True,
    )
    torch.testing.assert_close(
        HeadPooledWindowScoring("avg", 5).score(ctx),
        WindowAttentionScoring("avg", 5, "group", "visible").score(ctx),
    )
    assert not torch.allclose(
        HeadPooledWindowScoring("max", 5).score(ctx),
        WindowAttentionScoring("max", 5, "group", "visible").score(ctx),
    )


# ------------------------------------------------------------------------------------------ model: prefill
def test_prefill_compute_is_reduced(model4):
    counter = TokenCounter(model4)
    try:
        with torch.inference_mode():
            with apply(model4, "fastkv", "torch"):
                model4(random_prompt(120))
                model4(random_prompt(120), use_cache=False)  # no SieveCache: nothing compresses or propagates
            with apply(model4, "fastkv", "torch", params=dict(tsp_len=40, budget=20)):
                model4(random_prompt(120))
                model4(random_prompt(30))  # between budget and tsp_len: KV compressed, TSP does not fire
                model4(random_prompt(15))  # shorter than the budget: left alone
            with apply(model4, "fastkv", "torch", params=dict(tsp_layer=0)):
                model4(random_prompt(120))
    finally:
        counter.remove()
    assert counter.counts == [
        [120, 120, 24, 24],  # all Lp up to and including the TSP layer (1), tsp_len = 0.2 * 120 after it
        [120] * 4,
        [120, 120, 40, 40],
        [30] * 4,
        [15] * 4,
        [120, 24, 24, 24],
    ]


def test_kv_lengths_subset_and_original_positions(model4):
    Lp, T = 120, 1
    ids = random_prompt(Lp, batch=2, seed=5)
    seen = {}

    def record(i):
        def hook(module, args, kwargs):
            seen[i] = (kwargs["position_embeddings"], kwargs["position_ids"])

        return hook

    with torch.inference_mode(), apply(model4, "fastkv", "torch") as engine:
        handles = [
            layer.register_forward_pre_hook(record(i), with_kwargs=True)
            for i, layer in enumerate(decoder_layers(model4))
        ]
        try:
            logits = model4(ids).logits
        finally:
            for handle in handles:
                handle.remove()
        cache = engine.last_cache
        index = engine.propagation.index  # the state of the latest forward (the engine drops it on exit)
        full_cos, full_sin = model4.model.rotary_emb(logits, torch.arange(Lp)[None])
    assert index.shape == (2, 24) and logits.shape[1] == 24, "logits exist for the propagated tokens only"
    assert bool((index[:, 1:] > index[:, :-1]).all()), "the propagated set is sorted"
    assert torch.equal(index[:, -8:], torch.arange(Lp - 8, Lp).expand(2, 8)), "the window always propagates"
    assert cache.kv_lengths() == [12, 12, 12, 12]  # 0.1 * 120 before and at T; 0.5 * 24 after
    for i, layer in enumerate(cache.layers):
        assert layer.seen == layer.prompt_len == Lp
        (cos, sin), position_ids = seen[i]
        if i <= T:
            assert cos.shape[1] == Lp
            continue
        # RoPE of later layers: the ORIGINAL positions of the propagated tokens
        assert torch.equal(position_ids, index)
        assert torch.equal(cos, full_cos[0][index]) and torch.equal(sin, full_sin[0][index])
        for b in range(2):
            for j in range(2):
                kept = live_positions(layer, b, j)
                assert bool(torch.isin(kept, index[b]).all()), "later layers keep a subset of the propagated"
                assert torch.equal(kept[-8:], torch.arange(Lp - 8, Lp))


def test_keeping_everything_matches_the_full_cache(model4):
    ids, mask, _ = left_padded(PAD0, [40, 29, 33], seed=2)
    assert_keep_all_matches_full(model4, ids, mask, 12)
    counter = TokenCounter(model4)
    try:
        with (
            torch.inference_mode(),
            apply(model4, "fastkv", "torch", params=dict(tsp_rate=1.0, ratio=1.0)),
        ):
            model4(ids, attention_mask=mask)
    finally:
        counter.remove()
    assert counter.counts == [[40] * 4]


# ------------------------------------------------------------------------------------------ model: decoding
def test_decode_positions_continue_from_the_original_prompt_length(model4):
    Lp, n = 100, 9
    with torch.inference_mode(), apply(model4, "fastkv", "torch") as engine:
        out = model4.generate(input_ids=random_prompt(Lp, seed=3), **greedy(n))
        cache = engine.last_cache
    assert out.shape == (1, Lp + n)
    for layer in cache.layers:
        assert layer.seen == Lp + n - 1 and layer.prompt_len == Lp
        for j in range(2):
            pos = live_positions(layer, 0, j)
            assert len(pos) == 10 + n - 1  # 0.1 * 100 prompt entries (0.5 * 20 after TSP), then no eviction
            assert torch.equal(pos[-(n - 1) :], torch.arange(Lp, Lp + n - 1))
            assert bool((pos[: -(n - 1)] < Lp).all())


def test_left_padded_batch(model4):
    """Rows of different real lengths: each row propagates and keeps what it would alone (its budgets come from
    its own length), padding only fills the common propagated size, and every row's tokens equal its run alone."""
    lengths = [60, 41, 9]
    ids, mask, rows = left_padded(PAD0, lengths, seed=7)
    params = dict(tsp_rate=0.4, ratio=0.2)
    fkv = FastKV(**params)
    with torch.inference_mode(), apply(model4, "fastkv", "torch", params=params) as engine:
        model4(ids, attention_mask=mask)
        index = engine.propagation.index
        batch = model4.generate(input_ids=ids, attention_mask=mask, **greedy(10))
        cache = engine.last_cache
    pads = [60 - n for n in lengths]
    propagated = [fkv.propagated_length(n) for n in lengths]  # 24, 16, 8: each row's own
    assert propagated == [24, 16, 8] and index.shape == (3, 24)
    for b, pad in enumerate(pads):
        assert int((index[b] >= pad).sum()) == propagated[b], "the row's own count of real tokens"
    assert torch.equal(index[2, -8:], torch.arange(52, 60)), "the short row propagates its last window"
    tsp = fkv.resolve_tsp_layer(model4.config.num_hidden_layers)
    for i, layer in enumerate(cache.layers):
        assert layer.starts.tolist() == [[0, 0]] * 3, "padding never stays in the KV"
        live = (layer.ends - layer.starts)[:, 0].tolist()
        kept = [fkv.kv_budget(n if i <= tsp else p, after_tsp=i > tsp) for n, p in zip(lengths, propagated)]
        assert live == [min(k, n if i <= tsp else p) + 9 for k, n, p in zip(kept, lengths, propagated)]
    for b, pad in enumerate(pads):  # every row as if it ran alone
        alone = generate(model4, rows[b][None], compressor="fastkv", backend="torch", params=params, **greedy(10))
        assert torch.equal(batch[b, pad:], alone.sequences[0]), b


def test_a_malformed_propagation_is_reported_naming_the_compressor(model4):
    """Checked on the device, raised at the next host read (on the eager path: the TSP layer's own eviction check),
    as a PluginContractError that names the compressor and the rule it broke."""
    ids, mask, _ = left_padded(PAD0, [60, 41], seed=7)
    with torch.inference_mode(), apply(model4, MisorderedFastKV(tsp_rate=0.4, ratio=0.2), "torch"):
        with pytest.raises(PluginContractError, match="compressor 'misordered_fastkv'.*sorted, unique"):
            model4(ids, attention_mask=mask)


def test_the_checks_off_leave_a_well_formed_propagation_alone(model4):
    ids, mask, _ = left_padded(PAD0, [60, 41], seed=7)
    runs = [generate(model4, ids, mask, compressor="fastkv", backend="torch", params=dict(tsp_rate=0.4, ratio=0.2),
                     checks=checks, **greedy(6)) for checks in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert runs[0].kv_lengths == runs[1].kv_lengths


def test_sampling_with_several_return_sequences(model4):
    ids = random_prompt(50, batch=2, seed=11)
    mask = torch.ones_like(ids)
    sample = dict(max_new_tokens=8, min_new_tokens=8, do_sample=True, num_return_sequences=3)
    runs = {}
    for name, compressor, params in [
        ("full", "none", None),
        ("keep_all", "fastkv", dict(tsp_rate=1.0, ratio=1.0)),
        ("fastkv", "fastkv", None),
    ]:
        torch.manual_seed(0)
        runs[name] = generate(
            model4, ids, mask, compressor=compressor, params=params, backend="torch", **sample
        )
    assert torch.equal(runs["keep_all"].sequences, runs["full"].sequences)
    result = runs["fastkv"]
    assert result.sequences.shape == (6, 58)
    assert result.kv_lengths == [8 + 7] * 4  # 0.1 * 50 = 5 and 0.5 * 10 = 5, raised to the window (8)
    assert result.compressor["name"] == "fastkv" and result.compressor["tsp_rate"] == 0.2


# ------------------------------------------------------------------------------------------ families
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family(family, tiny_models):
    model, tok = tiny_models[family]
    assert model.config.num_hidden_layers == 3  # default TSP layer: 3 // 2 - 1 = 0
    ids, mask, _ = left_padded(tok, [80, 66], seed=1)
    counter = TokenCounter(model)
    try:
        result = generate(model, ids, mask, compressor="fastkv", backend="torch", **greedy(6))
    finally:
        counter.remove()
    assert counter.counts[0] == [80, 16, 16] and all(c == [1, 1, 1] for c in counter.counts[1:])
    assert result.kv_lengths == [8 + 5, 8 + 5, 8 + 5]  # 0.1 * 80 = 8; after TSP 0.5 * 16 = 8
    assert_keep_all_matches_full(model, ids, mask, 6)
