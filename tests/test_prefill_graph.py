"""Prefill compression replayed from CUDA graphs (``kvsieve.prefill_graph``).

CPU (always): the option (``prefill_graphs=``, ``KVSIEVE_PREFILL_GRAPHS``); on CPU every layer runs the eager path
(no graph); the probe that notices a policy reading ``ScoringContext.layer_idx``; the contract flags that
accumulate over replays. Then the static path itself, run eagerly on CPU (the capture replaced by a plain call of
the same work on the static copies, every layer): the same cache (kept positions per layer, row and head, keys,
live ranges, capacities) and greedy tokens as the eager path for snapkv, snapkv with chunk selection and fastkv on
a GQA model, an odd prompt length and a left-padded batch of 2; a contract fault is raised at the end of the
forward; the per-layer host reads are gone; FastKV's token propagation adds none, and a malformed one is raised at
the end of the forward with every later layer cached on the stand-in.

GPU (``@pytest.mark.gpu``): the real capture and replays give exactly the eager path's kept positions and greedy
tokens (snapkv, snapkv + chunk, fastkv, on the torch and triton backends), a policy that reads the device on the
host falls back with one warning and still gives the eager results, and FastKV's prefill synchronises no more than
SnapKV's.
"""

from __future__ import annotations

import warnings

import attrs
import pytest
import torch
from conftest import MisorderedFastKV, gpu_backends, host_reads, left_padded, random_prompt, tiny_llama

from kvsieve import prefill_graph
from kvsieve.contracts import ContractGuard, FlagSink, PluginContractError
from kvsieve.integration import apply, generate
from kvsieve.policies.topk import TopKSelection
from kvsieve.policies.window_attention import WindowAttentionScoring
from kvsieve.policy import ScoringContext, SelectionPolicy

LAYERS = 6
CASES = [
    ("snapkv", {"ratio": 0.3, "window": 4}),
    ("snapkv", {"ratio": 0.3, "window": 4, "selection": "chunk", "selection.size": 4}),
    ("fastkv", {"tsp_rate": 0.5, "ratio": 0.3, "window": 4}),
    ("snapkv", {"ratio": 0.3, "window": 4, "selection": "adaptive"}),  # each KV head keeps its own count
]
IDS = ["snapkv", "snapkv-chunk", "fastkv", "snapkv-adaptive"]


@pytest.fixture(scope="module")
def model6():
    return tiny_llama(LAYERS)  # GQA: 4 query heads, 2 KV heads


def prompts(device="cpu"):
    """An odd-length prompt, and a left-padded batch of 2 (odd lengths)."""
    single = random_prompt(37, seed=71)
    batch, mask, _ = left_padded(_Tok(), [45, 29], seed=72)
    return [(single.to(device), None), (batch.to(device), mask.to(device))]


class _Tok:
    pad_token_id = 0


def prefill(model, ids, mask, name, params, backend="torch", **options):
    """The prefilled cache of every layer: ``(starts, ends, positions, keys, values, capacity)``, and the engine's
    graph counters."""
    with torch.inference_mode(), apply(model, name, backend, params=params, **options) as engine:
        model(input_ids=ids, attention_mask=mask, use_cache=True)
        layers = [(layer.starts.clone(), layer.ends.clone(), layer.positions.clone(),
                   layer.keys[:, :, : layer.max_end].clone(), layer.values[:, :, : layer.max_end].clone(),
                   layer.capacity, layer.compactions) for layer in engine.last_cache.layers]
        return layers, prefill_graph.describe_graphs(engine)


def assert_same_cache(got, expected):
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        for x, y in zip(a, b, strict=True):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), f"layer {i}"
            else:
                assert x == y, f"layer {i}"


def greedy(model, ids, mask, name, params, backend="torch", **options):
    return generate(model, ids, mask, compressor=name, params=params, backend=backend, max_new_tokens=6,
                    min_new_tokens=6, do_sample=False, **options).sequences


# ---------------------------------------------------------------------------------------------- the option
def test_the_option_and_the_environment(monkeypatch, llama):
    model, _ = llama
    monkeypatch.delenv(prefill_graph.ENV, raising=False)
    assert prefill_graph.prefill_graphs_enabled()
    for off in ("0", "off", "False", "no"):
        monkeypatch.setenv(prefill_graph.ENV, off)
        assert not prefill_graph.prefill_graphs_enabled()
    assert prefill_graph.prefill_graphs_enabled(True)
    monkeypatch.setenv(prefill_graph.ENV, "1")
    with apply(model, "snapkv", "torch") as engine:
        assert engine.prefill_graphs
    with apply(model, "snapkv", "torch", prefill_graphs=False) as engine:
        assert not engine.prefill_graphs


@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_cpu_runs_the_eager_path(model6, name, params):
    for ids, mask in prompts():
        on, counters = prefill(model6, ids, mask, name, params, prefill_graphs=True)
        off, _ = prefill(model6, ids, mask, name, params, prefill_graphs=False)
        assert counters == {"captures": 0, "replays": 0}
        assert_same_cache(on, off)


def test_the_probe_notices_a_layer_index_read():
    reads = [False]
    probe = prefill_graph._probing_context(reads)
    fields = {f.name: None for f in attrs.fields(ScoringContext)}
    ctx = probe(**{**fields, "layer_idx": 5, "scale": 1.0})
    assert isinstance(ctx, ScoringContext) and not reads[0]
    assert ctx.scale == 1.0 and not reads[0]
    assert ctx.layer_idx == 5 and reads[0]


def test_flags_accumulate_over_runs_and_are_raised_at_the_next_read():
    guard = ContractGuard(True)
    sink = FlagSink(torch.device("cpu"), capacity=2)
    for broken in (False, True, False):  # three "replays": the second one is faulty
        with guard.accumulating(sink):
            guard.defer(torch.tensor(broken), "first check")
            guard.defer(torch.tensor(False), "second check")
        guard.watch(sink)
    assert len(guard._pending) == 2  # queued once
    with pytest.raises(PluginContractError, match="first check"):
        guard.flush()
    sink.reset()
    guard.watch(sink)
    guard.flush()  # clear again
    with guard.accumulating(sink), pytest.raises(RuntimeError, match="other contract checks than its first"):
        guard.defer(torch.tensor(False), "another check")
    with guard.accumulating(FlagSink(torch.device("cpu"), capacity=2)), \
            pytest.raises(RuntimeError, match="more than 2 contract checks"):
        for _ in range(3):
            guard.defer(torch.tensor(False), "check")


# ----------------------------------------------------------------------------- the static path, eagerly on CPU
@pytest.fixture
def static_path_on_cpu(monkeypatch):
    """Take the graph path on CPU, with the capture replaced by a stand-in whose replay runs the same work on the
    static copies."""

    class EagerReplay:
        def __init__(self, runner, event):
            self.runner, self.event = runner, event

        def replay(self):
            with self.event.engine.guard.accumulating(self.runner.sink):
                self.runner.outputs = self.runner._body(self.event,
                                                        check_cache=prefill_graph.CHECK_CACHE_IN_REPLAYS)

    def no_capture(self, event, graphs):
        self.graph = EagerReplay(self, event)
        return True

    monkeypatch.setattr(prefill_graph, "_graph_device", lambda device: True)
    monkeypatch.setattr(prefill_graph._Runner, "_capture", no_capture)


@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_the_static_path_gives_the_eager_cache_and_tokens(model6, static_path_on_cpu, name, params):
    for ids, mask in prompts():
        on, counters = prefill(model6, ids, mask, name, params, prefill_graphs=True)
        off, _ = prefill(model6, ids, mask, name, params, prefill_graphs=False)
        assert counters["captures"] > 0, counters
        assert_same_cache(on, off)
        assert torch.equal(greedy(model6, ids, mask, name, params, prefill_graphs=True),
                           greedy(model6, ids, mask, name, params, prefill_graphs=False))


@pytest.mark.parametrize("selection", ["topk", "adaptive"])
def test_the_static_path_keeps_a_cache_that_is_not_shrunk(model6, static_path_on_cpu, selection):
    params = {"ratio": 0.9, "window": 4, "selection": selection}  # keeps almost everything: no shrink
    for ids, mask in prompts():
        on, _ = prefill(model6, ids, mask, "snapkv", params, prefill_graphs=True)
        off, _ = prefill(model6, ids, mask, "snapkv", params, prefill_graphs=False)
        assert_same_cache(on, off)


def test_pyramidkv_layers_take_the_static_path_where_their_budgets_repeat(model6, static_path_on_cpu):
    """PyramidKV's layers keep different budgets, so a shape key repeats only where two layers' budgets agree
    (none here: every layer runs eagerly); the cache and tokens are the eager path's either way."""
    params = {"ratio": 0.3, "window": 4}
    for ids, mask in prompts():
        on, _ = prefill(model6, ids, mask, "pyramidkv", params, prefill_graphs=True)
        off, _ = prefill(model6, ids, mask, "pyramidkv", params, prefill_graphs=False)
        assert_same_cache(on, off)
        assert torch.equal(greedy(model6, ids, mask, "pyramidkv", params, prefill_graphs=True),
                           greedy(model6, ids, mask, "pyramidkv", params, prefill_graphs=False))


@attrs.frozen
class DuplicatingSelection(SelectionPolicy):
    name = "duplicating_selection"

    def select(self, scores, counts, budget, protect_head=0, protect_tail=0):
        good = TopKSelection().select(scores, counts, budget, protect_head, protect_tail)
        keep = good.keep.clone()
        keep[..., 1] = keep[..., 0]
        return type(good)(keep=keep, counts=good.counts)


def test_a_contract_fault_in_the_static_path_is_raised_at_the_end_of_the_forward(model6, static_path_on_cpu):
    ids = random_prompt(37, seed=73)
    params = {"ratio": 0.3, "window": 4, "selection": DuplicatingSelection()}
    with torch.inference_mode(), apply(model6, "snapkv", "torch", params=params, prefill_graphs=True) as engine:
        with pytest.raises(PluginContractError, match="duplicating_selection"):
            model6(input_ids=ids, use_cache=True)
        assert prefill_graph.describe_graphs(engine)["captures"] > 0


@attrs.frozen
class CacheWritingScoring(WindowAttentionScoring):
    """Window attention that also halves the keys it scores (a contract fault)."""

    name = "cache_writing_scoring"

    def score(self, ctx):
        ctx.keys.mul_(0.5)
        return super().score(ctx)


def test_a_scoring_call_that_writes_the_cache_is_caught_in_the_static_path(model6, static_path_on_cpu):
    """The first, eager run of a shape fingerprints the cache around the scoring call; the error names the policy
    at the end of the forward, and the library works afterwards."""
    ids = random_prompt(37, seed=74)
    params = {"ratio": 0.3, "window": 4, "scoring": CacheWritingScoring()}
    with torch.inference_mode(), apply(model6, "snapkv", "torch", params=params, prefill_graphs=True) as engine:
        with pytest.raises(PluginContractError, match="cache_writing_scoring.*changed the cache it was scoring"):
            model6(input_ids=ids, use_cache=True)
        assert prefill_graph.describe_graphs(engine)["captures"] > 0
    on, _ = prefill(model6, ids, None, "snapkv", SNAPKV, prefill_graphs=True)
    off, _ = prefill(model6, ids, None, "snapkv", SNAPKV, prefill_graphs=False)
    assert_same_cache(on, off)


@pytest.mark.parametrize("in_replays", [False, True], ids=["default", "in-replays"])
def test_the_cache_is_fingerprinted_in_the_first_run_only(model6, static_path_on_cpu, monkeypatch, in_replays):
    """The captured work leaves the two passes over the cache out (CHECK_CACHE_IN_REPLAYS off): one fingerprint
    pair per shape key per engine, not per layer; with the option on, every layer's."""
    from kvsieve.backends.torch_ref import TorchBackend

    calls = []
    original = TorchBackend.cache_fingerprint
    monkeypatch.setattr(TorchBackend, "cache_fingerprint",
                        lambda self, *args, **kwargs: calls.append(1) or original(self, *args, **kwargs))
    monkeypatch.setattr(prefill_graph, "CHECK_CACHE_IN_REPLAYS", in_replays)
    on, counters = prefill(model6, random_prompt(37, seed=75), None, "snapkv", SNAPKV, prefill_graphs=True)
    assert counters == {"captures": 1, "replays": LAYERS - 1}, counters  # layer 0 eager, 1 captured, 1.. replayed
    assert len(calls) == (LAYERS if in_replays else 1), calls


SNAPKV = {"ratio": 0.3, "window": 4}
FASTKV = {"tsp_rate": 0.5, "ratio": 0.3, "window": 4}  # SnapKV's settings, with TSP after layer 2 of 6


def test_the_static_path_reads_nothing_per_layer(model6, static_path_on_cpu):
    ids, mask = prompts()[1]
    counts = {graphs: len(host_reads(model6, ids, mask, "snapkv", SNAPKV, prefill_graphs=graphs))
              for graphs in (True, False)}
    # eager: two reads per layer (the eviction check, the size after compaction); the static path reads nothing
    # in any layer, the first of a shape included (the padding is read once per forward, the contract flags at
    # its end)
    assert counts[True] + 2 * LAYERS <= counts[False], counts


@pytest.mark.parametrize("padded", [False, True], ids=["single", "padded"])
def test_token_propagation_adds_no_host_read(model6, static_path_on_cpu, padded):
    """FastKV's TSP layer reads nothing on the host: its token ranking (the candidate count is known), the fill of
    the shorter rows, and propagate()'s checks of the kept tokens (device flags, read with the others at the
    forward's end), and, in a padded batch, the padding of the mask propagation gathers (FastKV declares it:
    propagate(..., padding=)). FastKV's prefill reads no more than SnapKV's with the same settings."""
    ids, mask = prompts()[padded]
    fastkv = host_reads(model6, ids, mask, "fastkv", FASTKV, prefill_graphs=True)
    snapkv = host_reads(model6, ids, mask, "snapkv", SNAPKV, prefill_graphs=True)
    assert len(fastkv) <= len(snapkv), (fastkv, snapkv)


def test_a_malformed_propagation_on_the_static_path_is_raised_at_the_end_of_the_forward(model6, static_path_on_cpu):
    """No layer reads the guard's flags: the layers after the TSP layer run (and compress) on the stand-in, the last
    ``K`` tokens, and the fault comes at the forward's end; every layer's cache holds sorted, unique positions of
    the tokens it computed on."""
    ids, mask = prompts()[1]
    B, L = ids.shape
    fastkv = MisorderedFastKV(**FASTKV)
    tsp = fastkv.resolve_tsp_layer(LAYERS)
    with torch.inference_mode(), apply(model6, fastkv, "torch", prefill_graphs=True) as engine:
        with pytest.raises(PluginContractError, match="compressor 'misordered_fastkv'.*sorted, unique"):
            model6(input_ids=ids, attention_mask=mask, use_cache=True)
        cache, index = engine.last_cache, engine.propagation.index
        assert prefill_graph.describe_graphs(engine)["replays"] > 0
    K = index.shape[1]
    assert torch.equal(index, torch.arange(L - K, L).expand(B, K))
    for i, layer in enumerate(cache.layers):
        assert layer.seen == L and layer.compactions == 1, f"layer {i}"
        for b in range(B):
            for j in range(layer.starts.shape[1]):
                live = layer.positions[b, j, layer.starts[b, j]: layer.ends[b, j]]
                assert len(live) > 0 and (live[1:] > live[:-1]).all(), (i, b, j)
                assert (live >= (0 if i <= tsp else L - K)).all() and (live < L).all(), (i, b, j)


# ---------------------------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def cuda_model6():
    return tiny_llama(LAYERS).to("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_graph_replays_equal_the_eager_path(cuda_model6, backend, name, params):
    for ids, mask in prompts("cuda"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", prefill_graph.PrefillGraphWarning)  # the built-ins must be captured
            on, counters = prefill(cuda_model6, ids, mask, name, params, backend, prefill_graphs=True)
        off, _ = prefill(cuda_model6, ids, mask, name, params, backend, prefill_graphs=False)
        assert counters["captures"] >= 1 and counters["replays"] >= 1, counters
        assert_same_cache(on, off)
        assert torch.equal(greedy(cuda_model6, ids, mask, name, params, backend, prefill_graphs=True),
                           greedy(cuda_model6, ids, mask, name, params, backend, prefill_graphs=False))


@pytest.mark.gpu
def test_graph_replays_in_bf16_equal_the_eager_path():
    model = tiny_llama(LAYERS).to("cuda", torch.bfloat16)
    backend = gpu_backends()[-1]
    for name, params in CASES:
        for ids, mask in prompts("cuda"):
            on, counters = prefill(model, ids, mask, name, params, backend, prefill_graphs=True)
            off, _ = prefill(model, ids, mask, name, params, backend, prefill_graphs=False)
            assert counters["replays"] >= 1, (name, counters)
            assert_same_cache(on, off)


@attrs.frozen
class SyncingScoring(WindowAttentionScoring):
    """Window attention that reads a device value on the host (as a careless third-party policy might)."""

    name = "syncing_window_attention"

    def score(self, ctx):
        scores = super().score(ctx)
        if float(scores.sum()) < 0:  # a host read: cannot be captured
            raise AssertionError
        return scores


@pytest.mark.gpu
def test_a_policy_that_reads_the_host_falls_back_with_a_warning(cuda_model6):
    params = {"ratio": 0.3, "window": 4,
              "scoring": SyncingScoring(pooling="avg", kernel=7, aggregation="group", normalization="visible")}
    for ids, mask in prompts("cuda"):
        with pytest.warns(prefill_graph.PrefillGraphWarning, match="syncing_window_attention"):
            on, counters = prefill(cuda_model6, ids, mask, "snapkv", params, prefill_graphs=True)
        off, _ = prefill(cuda_model6, ids, mask, "snapkv", params, prefill_graphs=False)
        assert counters == {"captures": 0, "replays": 0}
        assert_same_cache(on, off)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", prefill_graph.PrefillGraphWarning)
            assert torch.equal(greedy(cuda_model6, ids, mask, "snapkv", params, prefill_graphs=True),
                               greedy(cuda_model6, ids, mask, "snapkv", params, prefill_graphs=False))


@attrs.frozen
class LayerDependentScoring(WindowAttentionScoring):
    """Window attention scaled by the layer index (a replay would repeat the captured layer's)."""

    name = "layer_dependent_window_attention"

    def score(self, ctx):
        return super().score(ctx) * (1 + ctx.layer_idx)


@pytest.mark.gpu
def test_a_policy_that_reads_the_layer_index_falls_back(cuda_model6):
    params = {"ratio": 0.3, "window": 4,
              "scoring": LayerDependentScoring(pooling="avg", kernel=7, aggregation="group", normalization="visible")}
    ids, mask = prompts("cuda")[1]
    with pytest.warns(prefill_graph.PrefillGraphWarning, match="layer_idx"):
        on, counters = prefill(cuda_model6, ids, mask, "snapkv", params, prefill_graphs=True)
    off, _ = prefill(cuda_model6, ids, mask, "snapkv", params, prefill_graphs=False)
    assert counters["replays"] == 0
    assert_same_cache(on, off)


@pytest.mark.gpu
def test_a_contract_fault_in_a_replay_on_the_side_stream_is_raised_at_the_end_of_the_forward(cuda_model6):
    """The compressions run on a side stream; the forward's end waits for it before reading their fault flags."""
    ids = random_prompt(37, seed=73).to("cuda")
    params = {"ratio": 0.3, "window": 4, "selection": DuplicatingSelection()}
    with torch.inference_mode(), apply(cuda_model6, "snapkv", "torch", params=params, prefill_graphs=True) as engine:
        with pytest.raises(PluginContractError, match="duplicating_selection"):
            cuda_model6(input_ids=ids, use_cache=True)
        assert prefill_graph.describe_graphs(engine)["replays"] > 0


def _synchronisations(model, ids, mask, name="snapkv", params=SNAPKV, **options) -> int:
    """Synchronising CUDA calls in the second of two identical prefills (the first captured the graph)."""
    with torch.inference_mode(), apply(model, name, "torch", params=params, **options) as engine:
        model(input_ids=ids, attention_mask=mask, use_cache=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model(input_ids=ids, attention_mask=mask, use_cache=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if options.get("prefill_graphs"):
            assert prefill_graph.describe_graphs(engine)["replays"] >= LAYERS
    return sum("synchroniz" in str(w.message).lower() for w in caught)


@pytest.mark.gpu
def test_graph_replays_do_not_synchronise(cuda_model6):
    """Replayed compressions read nothing from the device: the eager path reads twice per layer (the eviction
    check, the size after compaction); with the graphs only the forward's own reads remain (the padding, once;
    the contract flags at its end; HF's mask handling)."""
    ids, mask = prompts("cuda")[1]
    on = _synchronisations(cuda_model6, ids, mask, prefill_graphs=True)
    off = _synchronisations(cuda_model6, ids, mask, prefill_graphs=False)
    if off == 0:
        pytest.skip("torch.cuda.set_sync_debug_mode('warn') reported no synchronisation on this build")
    assert on + LAYERS <= off, (on, off)


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [False, True], ids=["single", "padded"])
def test_token_propagation_does_not_synchronise(cuda_model6, padded):
    """FastKV's TSP layer makes no synchronising call (its checks are device flags, its host-to-device copies
    asynchronous from pinned memory, the padding of the gathered mask declared): its prefill synchronises no more
    often than SnapKV's with the same settings."""
    ids, mask = prompts("cuda")[padded]
    fastkv = _synchronisations(cuda_model6, ids, mask, "fastkv", FASTKV, prefill_graphs=True)
    snapkv = _synchronisations(cuda_model6, ids, mask, "snapkv", SNAPKV, prefill_graphs=True)
    if snapkv == 0 and fastkv == 0:
        pytest.skip("torch.cuda.set_sync_debug_mode('warn') reported no synchronisation on this build")
    assert fastkv <= snapkv, (fastkv, snapkv)
