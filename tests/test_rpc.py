"""RPC (Reasoning Path Compression): schedule, lengths, selection parity, integration with model.generate.

The facts pinned here come from the RPC paper (docs/policies/rpc.md). Two kinds of tests:

* driver tests run the compressor on a bare :class:`SieveCache` fed with random K/V and queries, one decode
  step at a time (fast: no model), and compare its choices with a straightforward re-implementation;
* integration tests run tiny random Llama/Qwen2 models through ``model.generate``.
"""

from __future__ import annotations

import math
import time
from typing import ClassVar

import attrs
import pytest
import torch
from conftest import greedy, left_padded, random_prompt
from hypothesis import given, settings
from hypothesis import strategies as st

import kvsieve
from kvsieve import plugins
from kvsieve.backends.torch_ref import TorchBackend
from kvsieve.budget import Budget
from kvsieve.cache import SieveCache
from kvsieve.compressor import Compressor, LayerEvent
from kvsieve.integration import apply, generate, resolve_compressor
from kvsieve.params import UnknownParameterError
from kvsieve.policies.rpc import RPC
from kvsieve.policies.window_attention import WindowAttentionScoring
from kvsieve.policy import ScoringPolicy


# ------------------------------------------------------------------------------------------ expectations
def kept_per_interval(P: int, ratio: float) -> int:
    """T = floor(ratio * P), the product rounded to 9 decimals first (ratio = 1 / c, c the paper's factor)."""
    return math.floor(round(ratio * P, 9))


def expected_length(prompt_len: int, generated: int, P: int, R: int, ratio: float) -> int:
    """The paper's schedule: after k compressions a layer holds Lp + k*T + R entries (+ tokens since the k-th);
    compressions fire at P + R generated tokens, then every P; T = floor(ratio * P)."""
    k = max(generated - R, 0) // P
    if k == 0:
        return prompt_len + generated
    return prompt_len + k * kept_per_interval(P, ratio) + R + (generated - R - k * P)


def expected_steps(n_cached: int, P: int, R: int) -> list[int]:
    return list(range(P + R, n_cached + 1, P))


# ------------------------------------------------------------------------------------------ driver
class Driver:
    """One cache layer fed with random post-RoPE K/V and queries, stepped as the attention function would."""

    def __init__(self, compressor: RPC, prompt_len: int, pads=(0,), heads=4, kv_heads=2, dim=8, seed=0):
        self.rpc, self.B, self.H, self.Hkv, self.d = compressor, len(pads), heads, kv_heads, dim
        self.gen = torch.Generator().manual_seed(seed)
        self.cache = SieveCache(query_window=compressor.query_window, num_layers=1)
        self.layer = self.cache.layers[0]
        self.backend = TorchBackend()
        self.layer.update(self._randn(self.Hkv, prompt_len), self._randn(self.Hkv, prompt_len))
        self.layer.starts = torch.tensor(pads).long()[:, None].expand(self.B, self.Hkv).contiguous()
        self.layer.prompt_len = prompt_len
        self.layer.push_queries(self._randn(self.H, prompt_len))
        self.prompt_keys = self.layer.keys[:, :, :prompt_len].clone()

    def _randn(self, heads, n):
        return torch.randn(self.B, heads, n, self.d, generator=self.gen)

    def step(self) -> None:
        """Append one decode token and run the compressor."""
        self.rpc.after_attention(self.append())

    def append(self) -> LayerEvent:
        """Append one decode token (its K/V and query); return the event the compressor would be given."""
        layer = self.layer
        layer.update(self._randn(self.Hkv, 1), self._randn(self.Hkv, 1))
        layer.push_queries(self._randn(self.H, 1))
        return LayerEvent(
            phase="decode",
            layer=layer,
            layer_idx=0,
            num_layers=1,
            engine=None,  # no observer and no propagation: the compressor needs no engine here
            backend=self.backend,
            scale=self.d**-0.5,
            generated=layer.seen - layer.prompt_len,
            reserve=self.rpc.reserve,  # what the engine passes
        )

    def live(self, b: int, j: int, name: str = "positions") -> torch.Tensor:
        layer = self.layer
        return getattr(layer, name)[b, j, int(layer.starts[b, j]) : int(layer.ends[b, j])]


def reference_keep(keys, queries, n_prompt, R, keep, kernel, aggregation, scale):
    """Indices (into the live slots) that RPC keeps, written straight from the paper's description for one row.

    Args:
        keys: ``[Hkv, L, d]`` the row's live keys; queries: ``[H, R, d]`` its last R queries.
        n_prompt: live prompt slots at the front (never compressed); the last R slots are always kept.
        keep: how many of the candidates ``[n_prompt, L - R)`` survive.
    Returns:
        ``[Hkv, n_prompt + keep + R]`` sorted live-slot indices per KV head.
    """
    Hkv, L, _ = keys.shape
    H = queries.shape[0]
    G = H // Hkv
    cand = keys[:, n_prompt : L - R].double()
    N = cand.shape[1]
    per_head = []
    for h in range(H):
        attn = torch.softmax(queries[h].double() @ cand[h // G].T * scale, dim=-1)  # softmax over candidates
        per_head.append(attn.sum(dim=0))  # sum over the R selector queries
    per_head = torch.stack(per_head)  # [H, N]
    if aggregation == "all":
        per_kv = per_head.mean(dim=0, keepdim=True).expand(Hkv, N)
    else:
        per_kv = per_head.reshape(Hkv, G, N).mean(dim=1)
    pooled = torch.zeros_like(per_kv)
    half = kernel // 2
    for i in range(N):  # average pooling, zero padding, stride 1
        pooled[:, i] = per_kv[:, max(i - half, 0) : i + half + 1].sum(dim=1) / kernel
    top = pooled.topk(keep, dim=-1).indices.sort(dim=-1).values + n_prompt
    head = torch.arange(n_prompt).expand(Hkv, n_prompt)
    tail = torch.arange(L - R, L).expand(Hkv, R)
    return torch.cat([head, top, tail], dim=-1)


# ------------------------------------------------------------------------------------------ parameters
def test_defaults_and_registration():
    rpc = plugins.registry().compressor("rpc")
    assert isinstance(rpc, RPC)
    scoring = rpc.scoring
    assert (rpc.interval, rpc.window, rpc.keep.ratio, scoring.kernel, scoring.pooling, scoring.aggregation) == (
        4096,
        32,
        0.25,  # the paper's c = 4
        7,
        "avg",
        "all",
    )
    assert (rpc.ratio, rpc.budget) == (None, None) and rpc.keep == Budget(0.25, rounding="floor")
    assert rpc.scoring == WindowAttentionScoring("avg", 7, "all", "candidates")
    assert (rpc.query_window, rpc.reserve, rpc.keep_per_interval) == (32, 4096, 1024)
    assert rpc.config() == {
        "name": "rpc",
        "interval": 4096,
        "window": 32,
        "ratio": 0.25,
        "budget": None,
        "scoring": {
            "name": "window_attention",
            "pooling": "avg",
            "kernel": 7,
            "aggregation": "all",
            "normalization": "candidates",
        },
        "selection": {"name": "topk"},
    }


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(interval=8, window=8), r"window=8 must be smaller than interval=8"),
        (dict(interval=8, window=9), r"window=9 must be smaller than interval=8"),
        (dict(ratio=2), r"ratio must be the kept fraction, in \(0, 1\].*got 2"),  # was ratio=0.5 (c < 1)
        (dict(ratio=-0.5), r"ratio must be the kept fraction, in \(0, 1\].*-0\.5"),
        (dict(ratio=0.0), r"ratio must be the kept fraction, in \(0, 1\].*got 0\.0"),
        (dict(ratio=float("inf")), r"ratio must be the kept fraction, in \(0, 1\]"),
        (dict(ratio=True), r"ratio must be the kept fraction, in \(0, 1\].*True"),
        (dict(ratio="0.25"), r"ratio must be the kept fraction, in \(0, 1\].*'0\.25'"),
        (dict(interval=8, window=2, ratio=0.1), r"ratio=0\.1 keeps no token.*use a ratio of at least 1/8"),
        (dict(interval=-4), r"interval must be a positive integer, got -4"),
        (dict(interval=0), r"interval must be a positive integer, got 0"),
        (dict(interval=1024.0), r"interval must be a positive integer, got 1024.0"),
        (dict(window=-1), r"window must be a positive integer, got -1"),
        (dict(window=0), r"window must be a positive integer, got 0"),
    ],
)
def test_invalid_parameters_are_refused_clearly(params, match):
    with pytest.raises(ValueError, match=match):
        plugins.registry().compressor("rpc", **params)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"scoring.kernel": 4}, r"kernel must be a positive odd integer.*got 4"),
        ({"scoring.kernel": -7}, r"kernel must be a positive odd integer.*got -7"),
        ({"scoring.pooling": "mean"}, r"pooling.*'mean'"),
        ({"scoring": {"aggregation": "none"}}, r"aggregation.*'none'"),
    ],
)
def test_invalid_scoring_parameters_are_refused_clearly(params, match):
    """The pooling parameters are the scoring policy's (``scoring.key``); the policy validates them."""
    with pytest.raises(ValueError, match=match):
        resolve_compressor("rpc", params)


def test_pooling_parameters_of_the_compressor_point_to_the_scoring_policy():
    match = r"compressor 'rpc' has no parameter 'kernel'\. Did you mean 'scoring\.kernel'\?"
    with pytest.raises(UnknownParameterError, match=match):
        resolve_compressor("rpc", {"kernel": 3})


@pytest.mark.parametrize(
    "P, ratio, T",
    [(4096, 0.25, 1024), (1024, 0.25, 256), (12, 1 / 3, 4), (10, 0.25, 2), (10, 0.4, 4), (11, 1 / 1.1, 10),
     (8, 1.0, 8), (100, 0.29, 29)],  # 0.29 * 100 = 28.999999999999996: rounded to 9 decimals first
)
def test_keep_per_interval_is_floor_of_ratio_times_P(P, ratio, T):
    assert RPC(interval=P, window=1, ratio=ratio).keep_per_interval == T


def test_budget_is_the_tokens_kept_per_interval():
    rpc = RPC(interval=8, window=2, budget=3)
    assert rpc.keep_per_interval == 3 and rpc.cache_length(0, 10) == 3 + 2
    assert (rpc.config()["ratio"], rpc.config()["budget"]) == (None, 3)
    with pytest.raises(ValueError, match=r"budget=9 keeps more than an interval holds \(interval=8\)"):
        RPC(interval=8, window=2, budget=9)
    with pytest.raises(ValueError, match=r"either ratio or budget, not both \(ratio=0\.5, budget=3\)"):
        RPC(interval=8, window=2, ratio=0.5, budget=3)


def test_paper_schedule():
    """The paper's schedule: P=1024, R=32 fires at decode steps 1056, 2080, 3104 with candidate pools of 1024, 1280,
    1536 that keep 256, 512, 768."""
    rpc = RPC(interval=1024, window=32, ratio=0.25)
    fired = [g for g in range(1, 3200) if rpc.fires_at(g)]
    assert fired == [1056, 2080, 3104]
    held = [rpc.cache_length(0, g - 1) + 1 for g in fired]  # generated tokens cached when it fires
    assert [h - 32 for h in held] == [1024, 1280, 1536]  # candidate pools (the last R are not candidates)
    assert [rpc.cache_length(0, g) - 32 for g in fired] == [256, 512, 768]
    assert rpc.cache_length(100, 1055) == 100 + 1055  # outputs shorter than P + R are never compressed
    assert rpc.cache_length(100, 2079) == 100 + 256 + 32 + 1023  # the peak, just before the next compression


# ------------------------------------------------------------------------------------------ driver tests
@pytest.mark.parametrize("aggregation", ["all", "group"])
def test_selection_matches_a_straightforward_implementation(aggregation):
    P, R, c, Lp = 24, 4, 3, 5
    scoring = WindowAttentionScoring(pooling="avg", kernel=7, aggregation=aggregation, normalization="candidates")
    rpc = RPC(interval=P, window=R, ratio=1 / c, scoring=scoring)
    drv = Driver(rpc, Lp, pads=(0, 2), heads=4, kv_heads=2, dim=8, seed=1)
    checked = 0
    while checked < 3:
        layer, event = drv.layer, drv.append()
        if not rpc.fires_at(event.generated):
            rpc.after_attention(event)
            continue
        k = (event.generated - R) // P
        queries = layer.window_queries().clone()
        before = {
            (b, j): (drv.live(b, j, "keys").clone(), drv.live(b, j).clone())
            for b in range(2)
            for j in range(2)
        }
        rpc.after_attention(event)
        for b in range(2):
            keys = torch.stack([before[b, j][0] for j in range(2)])
            n_prompt = Lp - int(layer.starts[b, 0])  # the padded row has fewer prompt slots
            want = reference_keep(
                keys, queries[b], n_prompt, R, k * (P // c), rpc.scoring.kernel, aggregation, drv.d**-0.5
            )
            for j in range(2):
                assert torch.equal(drv.live(b, j), before[b, j][1][want[j]]), (event.generated, b, j)
                assert torch.equal(drv.live(b, j, "keys"), before[b, j][0][want[j]])
        if aggregation == "all":  # one ranking shared by every KV head of the layer
            assert torch.equal(drv.live(0, 0), drv.live(0, 1))
        checked += 1


@pytest.mark.parametrize(
    "P, R, ratio", [(8, 4, 0.5), (16, 4, 0.25), (12, 3, 1 / 3), (10, 3, 0.4), (9, 8, 1 / 9)]
)
def test_schedule_lengths_and_invariants(P, R, ratio):
    Lp, n = 6, 4 * P + R + 3
    rpc = RPC(interval=P, window=R, ratio=ratio)
    drv = Driver(rpc, Lp, pads=(0, 3), seed=2)
    layer, compactions, capacities = drv.layer, [], []
    for g in range(1, n + 1):
        drv.step()
        assert layer.max_live == expected_length(Lp, g, P, R, ratio), g
        if layer.compactions > len(compactions):
            compactions.append(g)
        capacities.append(layer.capacity)
        for b, pad in enumerate((0, 3)):
            for j in range(drv.Hkv):
                pos = drv.live(b, j)
                assert torch.equal(pos[: Lp - pad], torch.arange(pad, Lp)), "the prompt is never compressed"
                assert bool((pos[1:] > pos[:-1]).all()), "the cache keeps original order"
                last = min(g, R)
                assert torch.equal(pos[-last:], torch.arange(Lp + g - last, Lp + g)), "the last R are kept"
        assert torch.equal(layer.keys[:, :, :Lp], drv.prompt_keys)
        assert bool((layer.starts[1] == 3).all()), "padding stays out of the live range"
    assert compactions == expected_steps(n, P, R)
    # reserve = P: after a compression, the P appends before the next never reallocate the buffers
    for g in compactions[:-1]:
        assert len(set(capacities[g - 1 : g - 1 + P])) == 1, g


@settings(max_examples=30, deadline=None)
@given(
    P=st.integers(2, 16),
    R_frac=st.floats(0, 0.99),
    ratio=st.one_of(st.integers(1, 16).map(lambda c: 1 / c), st.floats(1 / 16, 1)),  # 1 / c for c in [1, 16]
    n=st.integers(0, 60),
    Lp=st.integers(1, 5),
    aggregation=st.sampled_from(["all", "group"]),
)
def test_length_formula_property(P, R_frac, ratio, n, Lp, aggregation):
    R = 1 + int(R_frac * (P - 1))  # 1 <= R < P
    T = kept_per_interval(P, ratio)
    if T < 1:
        with pytest.raises(ValueError, match="keeps no token"):
            RPC(interval=P, window=R, ratio=ratio)
        return
    scoring = WindowAttentionScoring(pooling="avg", kernel=7, aggregation=aggregation, normalization="candidates")
    rpc = RPC(interval=P, window=R, ratio=ratio, scoring=scoring)
    drv = Driver(rpc, Lp, pads=(0,), seed=n)
    for _ in range(n):
        drv.step()
    assert drv.layer.max_live == expected_length(Lp, n, P, R, ratio) == rpc.cache_length(Lp, n)
    assert drv.layer.compactions == (len(expected_steps(n, P, R)) if T < P else 0)
    pos = drv.live(0, 0)
    assert torch.equal(pos[:Lp], torch.arange(Lp))
    assert torch.equal(pos[-min(n, R) or len(pos) :], torch.arange(Lp + n - min(n, R), Lp + n))


# ------------------------------------------------------------------------------------------ integration
@pytest.fixture(scope="module")
def prompt():
    return random_prompt(12)


def run(model, ids, n, compressor="rpc", **params):
    """:func:`kvsieve.integration.generate`: exactly ``n`` greedy tokens, torch backend, no padding."""
    return generate(
        model, ids, torch.ones_like(ids), compressor=compressor, backend="torch", params=params, **greedy(n)
    )


@attrs.frozen
class RecordingScoring(ScoringPolicy):
    """Window attention that records each scoring context's candidate range and window size."""

    name: ClassVar[str] = "recording"
    inner: ScoringPolicy = WindowAttentionScoring("avg", 7, "all", "candidates")
    seen: list = attrs.field(factory=list)

    def score(self, ctx):
        self.seen.append(
            dict(
                cand_starts=ctx.cand_starts.clone(),
                cand_ends=ctx.cand_ends.clone(),
                ends=ctx.ends.clone(),
                window=ctx.queries.shape[2],
                pool=int(ctx.cand_counts.max()),
            )
        )
        return self.inner.score(ctx)


class CompressionRecorder:
    """A ``kvsieve_layer_compressed`` observer."""

    def __init__(self):
        self.events = []

    @kvsieve.hookimpl
    def kvsieve_layer_compressed(self, layer_idx, phase, before, after, info):
        self.events.append((layer_idx, phase, info["generated"], before, after))


@pytest.fixture
def recorder():
    rec = CompressionRecorder()
    plugins.register(rec, name="test-rpc-recorder")
    yield rec
    plugins.unregister("test-rpc-recorder")


@pytest.mark.parametrize(
    "family, P, R, ratio, n",
    [("llama", 8, 4, 0.5, 37), ("llama", 16, 4, 0.25, 41), ("llama", 12, 3, 1 / 3, 40), ("qwen2", 8, 4, 0.5, 29)],
)
def test_generate_schedule(tiny_models, family, P, R, ratio, n, recorder, prompt):
    model, _ = tiny_models[family]
    Lp, T = prompt.shape[1], kept_per_interval(P, ratio)
    scoring = RecordingScoring()
    rpc = RPC(interval=P, window=R, ratio=ratio, scoring=scoring)
    with apply(model, rpc, "torch") as engine, torch.inference_mode():
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **greedy(n))
        cache = engine.last_cache
    n_cached = n - 1  # the last generated token is never fed back
    steps = expected_steps(n_cached, P, R)
    assert steps, "the case must compress at least once"
    want = [
        (layer_idx, "decode", g, Lp + (k - 1) * T + R + P, Lp + k * T + R)
        for k, g in enumerate(steps, start=1)
        for layer_idx in range(model.config.num_hidden_layers)
    ]
    assert recorder.events == want
    # candidates: the generated tokens minus the last R, i.e. softmax over [Lp, L - R)
    assert [s["pool"] for s in scoring.seen] == [
        (k - 1) * T + P for k in range(1, len(steps) + 1) for _ in range(3)
    ]
    for s in scoring.seen:
        assert bool((s["cand_starts"] == Lp).all()) and bool((s["cand_ends"] == s["ends"] - R).all())
        assert s["window"] == R
    assert cache.kv_lengths() == [expected_length(Lp, n_cached, P, R, ratio)] * model.config.num_hidden_layers
    # the prompt's slots and keys are untouched; the last R (and everything since the last compression) kept
    with apply(model, "none", "torch") as full_engine, torch.inference_mode():
        model(prompt, use_cache=True)
        full = full_engine.last_cache
    for layer_idx, layer in enumerate(cache.layers):
        pos = layer.positions[0, :, : int(layer.ends.max())]
        assert torch.equal(pos[:, :Lp], torch.arange(Lp).expand_as(pos[:, :Lp]))
        assert torch.equal(layer.keys[:, :, :Lp], full.layers[layer_idx].keys[:, :, :Lp])
        since = n_cached - steps[-1] + R
        assert torch.equal(
            pos[:, -since:], torch.arange(Lp + n_cached - since, Lp + n_cached).expand(2, since)
        )
        assert bool((pos[:, 1:] > pos[:, :-1]).all())
        assert torch.equal(pos[0], pos[1]), "aggregation 'all': one ranking shared by every KV head"


def test_ratio_one_and_short_outputs_match_the_full_cache(llama, prompt, recorder):
    model, _ = llama
    full = run(model, prompt, 30, "none")
    keep_all = run(model, prompt, 30, interval=8, window=4, ratio=1.0)
    assert torch.equal(keep_all.sequences, full.sequences)
    assert keep_all.kv_lengths == full.kv_lengths == [12 + 29] * 3
    # 12 new tokens: 11 cached < P + R, never compressed
    short = run(model, prompt, 12, interval=8, window=4, ratio=0.25)
    assert torch.equal(short.sequences, full.sequences[:, : 12 + 12])
    assert recorder.events == []
    compressed = run(model, prompt, 30, interval=8, window=4, ratio=0.25)
    assert compressed.kv_lengths == [expected_length(12, 29, 8, 4, 0.25)] * 3 and recorder.events


def test_state_resets_between_generate_calls(llama, prompt):
    model, _ = llama
    mask = torch.ones_like(prompt)
    params = dict(interval=8, window=4, ratio=0.5)
    with apply(model, "rpc", "torch", params=params) as engine, torch.inference_mode():
        first = model.generate(input_ids=prompt, attention_mask=mask, **greedy(30))
        first_cache = engine.last_cache
        second = model.generate(input_ids=prompt, attention_mask=mask, **greedy(30))
        assert engine.last_cache is not first_cache
    assert torch.equal(first, second)


def test_left_padded_batch_matches_rows_run_alone(llama):
    model, tokenizer = llama
    ids, mask, rows = left_padded(tokenizer, [14, 9], seed=3)
    params = dict(interval=8, window=4, ratio=0.5)
    n = 30
    with apply(model, "rpc", "torch", params=params) as engine, torch.inference_mode():
        batch = model.generate(input_ids=ids, attention_mask=mask, **greedy(n))
        cache = engine.last_cache
    alone = [run(model, row[None], n, **params) for row in rows]
    assert torch.equal(batch[0, 14:], alone[0].sequences[0, 14:])
    assert torch.equal(batch[1, 14:], alone[1].sequences[0, 9:])
    for layer in cache.layers:
        assert layer.starts.tolist() == [[0, 0], [5, 5]], "padding is never in the live range"
        live = (layer.ends - layer.starts).tolist()
        assert live == [[expected_length(14, n - 1, 8, 4, 0.5)] * 2, [expected_length(9, n - 1, 8, 4, 0.5)] * 2]
        for b, (first, Lp) in enumerate(((0, 14), (5, 14))):
            pos = layer.positions[b, 0, int(layer.starts[b, 0]) : int(layer.ends[b, 0])]
            assert torch.equal(pos[: Lp - first], torch.arange(first, Lp)), "no padding slot is kept"


def test_sampling_with_several_return_sequences(llama, prompt):
    model, _ = llama
    torch.manual_seed(0)
    result = generate(
        model,
        prompt,
        torch.ones_like(prompt),
        compressor="rpc",
        params=dict(interval=8, window=4, ratio=0.5),
        backend="torch",
        max_new_tokens=25,
        min_new_tokens=25,
        do_sample=True,
        num_return_sequences=2,
    )
    assert result.sequences.shape == (2, 12 + 25)
    assert result.kv_lengths == [expected_length(12, 24, 8, 4, 0.5)] * 3
    assert result.compressor["name"] == "rpc" and result.compressor["interval"] == 8


@settings(max_examples=200, deadline=None)
@given(interval=st.integers(2, 40), window=st.integers(1, 39), keep=st.integers(1, 40), appends=st.integers(0, 400))
def test_peak_generated_matches_the_walk_over_every_step(interval, window, keep, appends):
    """RPC's peak (one candidate per interval) equals the base class's walk over every appended token."""
    if window >= interval or keep > interval:
        return
    rpc = RPC(interval=interval, window=window, budget=keep)
    walked = Compressor.peak_generated(rpc, 16, 16, appends)
    assert rpc.peak_generated(16, 16, appends) == walked


def test_static_capacity_of_a_long_run_is_quick():
    """Sizing a 128K-token run's static cache walks intervals, not tokens (3.5 s for 28 layers at 32K before)."""
    from kvsieve.static import static_capacity

    rpc = RPC(interval=4096, window=32, ratio=0.25)
    start = time.perf_counter()
    capacities = {static_capacity(rpc, 128, 131072) for _ in range(64)}
    assert time.perf_counter() - start < 0.5
    assert capacities == {128 + Compressor.peak_generated(rpc, 128, 128, 131071)}  # the walk, once
