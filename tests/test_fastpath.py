"""The fast decode path (``kvsieve.fastpath``, ``kvsieve.static``): a static-capacity cache, a graph-capturable step.

Pinned on CPU, where every step runs eagerly (no CUDA graph): greedy tokens identical to the eager path
(``kvsieve.generate`` without ``fast``) for none, snapkv, streamingllm, fastkv, fastkv+rpc and rpc (compressing
several times) on left-padded batches of every family; sampling identical to the eager path under one seed, and
reproducible with a generator; EOS/pad and early stopping as ``model.generate``; the capacity helper; buffers
never reallocated while RPC compacts; a decode step that reads no device value on the host (what a CUDA graph
capture needs); refusals. The ``gpu`` cases capture the step in a CUDA graph and check that replays, also after
compactions, give the eager path's tokens and logits.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import pytest
import torch
from conftest import FAMILIES, gpu_backends, host_reads, left_padded, random_prompt

from kvsieve import models
from kvsieve.fastpath import StaticDecoder
from kvsieve.integration import apply, generate, resolve_compressor
from kvsieve.propagation import decoder_layers
from kvsieve.static import StaticCapacityError, StaticSieveLayer, make_static, static_capacity

RPC = dict(interval=16, window=4, ratio=0.25)  # P=16, R=4, c=4: compressions at 20, 36, 52, 68, 84 generated
NEW = 86
LENGTHS = [30, 17, 24]


def exactly(n: int, **kwargs) -> dict:
    """``generate`` arguments for exactly ``n`` new tokens (no early EOS)."""
    return dict(max_new_tokens=n, min_new_tokens=n, **kwargs)


def both_paths(model, input_ids, attention_mask, compressor, params, backend="torch", **kwargs):
    eager = generate(model, input_ids, attention_mask, compressor=compressor, backend=backend, params=params,
                     **kwargs)
    fast = generate(model, input_ids, attention_mask, compressor=compressor, backend=backend, params=params,
                    fast=True, **kwargs)
    return eager, fast


# ---------------------------------------------------------------------------------------------- greedy exactness
@pytest.mark.parametrize("family", FAMILIES)
def test_rpc_greedy_tokens_equal_the_eager_path(tiny_models, family):
    model, tok = tiny_models[family]
    ids, mask, _ = left_padded(tok, LENGTHS, seed=40)
    eager, fast = both_paths(model, ids, mask, "rpc", RPC, **exactly(NEW, do_sample=False))
    assert torch.equal(fast.sequences, eager.sequences)
    assert fast.kv_lengths == eager.kv_lengths  # the same compactions happened
    assert fast.kv_bytes < eager.kv_bytes_peak  # the static buffers hold the peak, not the whole sequence


@pytest.mark.parametrize(
    "compressor, params",
    [
        ("none", {}),
        ("snapkv", dict(budget=12, window=4)),
        ("streamingllm", dict(budget=20, sinks=4)),  # compacts after every step, between steps
        ("fastkv", dict(tsp_layer=0, tsp_rate=0.5, ratio=0.3, window=4)),  # prefill propagation
        ("fastkv+rpc", {"fastkv.tsp_layer": 0, "fastkv.window": 4, **{f"rpc.{k}": v for k, v in RPC.items()}}),
    ],
)
def test_greedy_tokens_equal_the_eager_path(llama, compressor, params):
    model, tok = llama
    ids, mask, _ = left_padded(tok, LENGTHS, seed=41)
    eager, fast = both_paths(model, ids, mask, compressor, params, **exactly(40, do_sample=False))
    assert torch.equal(fast.sequences, eager.sequences)
    assert fast.kv_lengths == eager.kv_lengths


SEGMENT_RUNS = [
    ("none", {}),
    ("rpc", RPC),  # compactions between steps rewrite the buffers the segments read
    ("snapkv", dict(budget=12, window=4)),
    ("fastkv+rpc", {"fastkv.tsp_layer": 0, "fastkv.window": 4, **{f"rpc.{k}": v for k, v in RPC.items()}}),
]


@pytest.mark.parametrize("compressor, params", SEGMENT_RUNS)
def test_graph_segments_give_the_tokens_of_one_step(llama, compressor, params):
    """The segments path (a split model's: each run of layers on one device from its own graph, here cut at
    layers 1 and 2 of one CPU model and run eagerly through the same static buffers) keeps every token, and gives
    the layers their own forwards back."""
    model, tok = llama
    ids, mask, _ = left_padded(tok, LENGTHS, seed=44)
    kwargs = dict(compressor=compressor, backend="torch", params=params, fast=True, **exactly(NEW, do_sample=False))
    whole = generate(model, ids, mask, **kwargs)
    cut = generate(model, ids, mask, graph_breaks=[1, 2], **kwargs)
    assert torch.equal(cut.sequences, whole.sequences)
    assert cut.kv_lengths == whole.kv_lengths
    assert all("forward" not in vars(layer) for layer in decoder_layers(model))


def test_graph_breaks_are_checked(llama):
    model, tok = llama
    ids, mask, _ = left_padded(tok, LENGTHS, seed=44)
    with pytest.raises(ValueError, match=r"graph_breaks=\[0, 3\]: each must be a layer index in \[1, 2\]"):
        generate(model, ids, mask, fast=True, graph_breaks=[0, 3], **exactly(4, do_sample=False))
    assert all("forward" not in vars(layer) for layer in decoder_layers(model))


def test_unpadded_single_prompt_equals_plain_hf(llama):
    model, _ = llama
    ids = random_prompt(25, seed=42)
    ref = model.generate(ids, **exactly(30, do_sample=False))
    fast = generate(model, ids, compressor="none", backend="torch", fast=True, **exactly(30, do_sample=False))
    assert torch.equal(fast.sequences, ref)


# -------------------------------------------------------------------------------------------------- sampling
def test_sampling_equals_the_eager_path_under_one_seed(llama):
    model, tok = llama
    ids, mask, _ = left_padded(tok, [20, 11], seed=43)
    kwargs = exactly(40, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, num_return_sequences=2)
    torch.manual_seed(5)
    eager = generate(model, ids, mask, compressor="rpc", backend="torch", params=RPC, **kwargs)
    torch.manual_seed(5)
    fast = generate(model, ids, mask, compressor="rpc", backend="torch", params=RPC, fast=True, **kwargs)
    assert fast.sequences.shape == (4, 20 + 40)
    assert torch.equal(fast.sequences, eager.sequences)  # same logits, same processors, same random draws


def test_sampling_with_a_generator_is_reproducible(llama):
    model, _ = llama
    ids = random_prompt(16, batch=2, seed=44)
    runs = [
        generate(model, ids, compressor="rpc", backend="torch", params=RPC, fast=True,
                 generator=torch.Generator().manual_seed(9), **exactly(30, do_sample=True)).sequences
        for _ in range(2)
    ]
    other = generate(model, ids, compressor="rpc", backend="torch", params=RPC, fast=True,
                     generator=torch.Generator().manual_seed(10), **exactly(30, do_sample=True)).sequences
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], other)


# ----------------------------------------------------------------------------------------------- EOS and pad
def test_eos_and_padding_as_model_generate(llama):
    model, tok = llama
    ids, mask, _ = left_padded(tok, [22, 14, 19], seed=45)
    free = generate(model, ids, mask, backend="torch", fast=True, **exactly(30, do_sample=False)).sequences
    eos = int(free[0, 22 + 4])  # row 0 stops at its 5th token; other rows when (if) they produce it
    kwargs = dict(max_new_tokens=30, do_sample=False, eos_token_id=eos)
    eager, fast = both_paths(model, ids, mask, "rpc", dict(interval=8, window=2, ratio=0.5), **kwargs)
    assert torch.equal(fast.sequences, eager.sequences)
    assert (fast.sequences[0, 22 + 5 :] == tok.pad_token_id).all()  # finished rows emit the pad token
    every_row = dict(max_new_tokens=30, do_sample=False, eos_token_id=[int(t) for t in free[:, 22 + 2]])
    eager, fast = both_paths(model, ids, mask, "none", {}, **every_row)
    assert fast.sequences.shape[1] == eager.sequences.shape[1] <= 22 + 30  # stops where HF stops
    assert torch.equal(fast.sequences, eager.sequences)


# ----------------------------------------------------------------------------------------------------- sizing
def test_static_capacity_is_the_compressors_peak():
    rpc = resolve_compressor("rpc", RPC)
    # 85 appended tokens; before the 5th compression (generated 84): (5-1)*4 + 4 + 16 = 36 generated entries
    assert static_capacity(rpc, 30, NEW) == 30 + 36
    assert static_capacity(rpc, 30, 20) == 30 + 19  # no compression fires: every appended token
    assert static_capacity(rpc, 30, 22) == 30 + 20  # 21 appended; the peak is the 20th, just before compressing
    assert static_capacity(resolve_compressor("none"), 30, NEW) == 30 + NEW - 1
    snapkv = resolve_compressor("snapkv", dict(budget=12, window=4))
    assert static_capacity(snapkv, 30, NEW, prompt_slots=12) == 12 + NEW - 1
    streaming = resolve_compressor("streamingllm", dict(budget=20, sinks=4))
    assert static_capacity(streaming, 30, NEW, prompt_slots=20) == 21
    assert static_capacity(streaming, 10, 5) == 10 + 4
    hybrid = resolve_compressor("fastkv+rpc", {f"rpc.{k}": v for k, v in RPC.items()})
    assert static_capacity(hybrid, 30, NEW, prompt_slots=8) == 8 + 36


def test_buffers_are_written_in_place_while_rpc_compacts(llama):
    model, tok = llama
    ids, mask, _ = left_padded(tok, LENGTHS, seed=46)
    with torch.inference_mode(), apply(model, "rpc", "torch", params=RPC) as engine:
        decoder = StaticDecoder(model, engine)
        logits = decoder.prefill(ids, mask, NEW)
        cache = decoder.cache
        assert all(isinstance(layer, StaticSieveLayer) for layer in cache.layers)
        assert [layer.capacity for layer in cache.layers] == [30 + 36] * len(cache.layers)
        buffers = [[t.data_ptr() for t in (x.keys, x.values, x.positions, x.starts, x.ends, x.queries)]
                   for x in cache.layers]
        for _ in range(NEW - 1):
            logits = decoder.step(logits.argmax(-1))
        assert [x.compactions for x in cache.layers] == [5] * len(cache.layers)
        assert buffers == [[t.data_ptr() for t in (x.keys, x.values, x.positions, x.starts, x.ends, x.queries)]
                           for x in cache.layers]
        rpc = engine.compressor
        # one device counter pair for every layer, advanced once per step (not once per layer)
        assert len(decoder.step_counters) == 1 and all(layer.shared_counters for layer in cache.layers)
        assert all(layer.device_counters is decoder.step_counters[0][0] for layer in cache.layers)
        for layer in cache.layers:  # the host counters followed the device ones
            assert layer.seen == 30 + NEW - 1 and int(layer.device_seen) == layer.seen
            assert layer.num_queries == int(layer.device_queries) and layer.end_bound == layer.max_end
            live = (layer.ends - layer.starts)[:, 0].tolist()
            assert live == [n + rpc.cache_length(0, NEW - 1) for n in LENGTHS]


@pytest.mark.parametrize("fuse_layers", [False, True])
def test_device_counters_follow_the_host_without_selector_queries(llama, fuse_layers):
    """A cache that keeps no selector queries: the shared counters advance ``seen`` only ([1, 0] per step), the
    positions written follow it, and the fused and unfused appends agree."""
    model, tok = llama
    ids, mask, _ = left_padded(tok, LENGTHS, seed=48)
    with torch.inference_mode(), apply(model, "none", "torch") as engine:
        decoder = StaticDecoder(model, engine, fuse_layers=fuse_layers)
        try:
            logits = decoder.prefill(ids, mask, 9)
            for _ in range(8):
                logits = decoder.step(logits.argmax(-1))
            [(counters, step)] = decoder.step_counters
            assert step.tolist() == [1, 0] and counters.tolist() == [30 + 8, 0]
            for layer in decoder.cache.layers:
                assert layer.seen == 30 + 8 and int(layer.device_seen) == layer.seen
                written = layer.positions[:, :, 30:38]  # the 8 decode tokens' logical indices, in every row
                assert torch.equal(written, torch.arange(30, 38).expand_as(written))
        finally:
            decoder.close()


def test_a_too_small_static_capacity_is_refused_before_it_overflows(llama):
    model, _ = llama
    ids = random_prompt(20, seed=47)
    with pytest.raises(StaticCapacityError, match="static cache is full.*pass a larger static_capacity"):
        generate(model, ids, compressor="none", backend="torch", fast=True, static_capacity=25,
                 **exactly(10, do_sample=False))
    with pytest.raises(ValueError, match="static capacity 15 is smaller than the 20 slots"):
        generate(model, ids, compressor="none", backend="torch", fast=True, static_capacity=15,
                 **exactly(10, do_sample=False))


# ------------------------------------------------------------------------------------------- graph-safe step
@contextlib.contextmanager
def no_host_reads():
    """Make every read of a tensor's value by Python fail (what a CUDA graph capture forbids)."""
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def forbidden(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"a decode step read a tensor on the host (Tensor.{name})")
        return read

    try:
        for name in names:
            setattr(torch.Tensor, name, forbidden(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_decode_step_reads_no_device_value_on_the_host(tiny_models, family):
    model, tok = tiny_models[family]
    ids, mask, _ = left_padded(tok, [18, 9], seed=48)
    with torch.inference_mode(), apply(model, "rpc", "torch", params=dict(interval=8, window=4)) as engine:
        decoder = StaticDecoder(model, engine)
        logits = decoder.prefill(ids, mask, 30)
        for _ in range(14):  # across the first compression (at 12 generated)
            decoder.input_ids.copy_(logits.argmax(-1)[:, None])
            decoder.positions += 1
            with no_host_reads():
                logits = decoder._forward()  # exactly what a CUDA graph captures
            for layer in decoder.cache.layers:
                layer.advance()
            engine.run_decode_schedule(decoder.cache)
        assert decoder.cache.layers[0].compactions == 1
        with no_host_reads(), pytest.raises(AssertionError, match="read a tensor on the host"):
            bool(logits.sum() > 0)  # the guard does catch a host read


def test_freed_slots_are_never_read(llama):
    """NaN in every slot outside the live ranges after each step (freed by compaction, padding, free capacity)
    changes no token."""
    model, tok = llama
    ids, mask, _ = left_padded(tok, [26, 12], seed=49)

    def run(poison: bool):
        with torch.inference_mode(), apply(model, "rpc", "torch", params=RPC) as engine:
            decoder = StaticDecoder(model, engine)
            logits, tokens = decoder.prefill(ids, mask, 60), []
            for _ in range(59):
                tokens.append(logits.argmax(-1))
                logits = decoder.step(tokens[-1])
                if poison:
                    poison_outside_live(decoder.cache)
            return torch.stack(tokens)

    assert torch.equal(run(poison=True), run(poison=False))


def poison_outside_live(cache) -> None:
    for layer in cache.layers:
        slots = torch.arange(layer.capacity, device=layer.keys.device)
        dead = (slots < layer.starts[..., None]) | (slots >= layer.ends[..., None])  # [B, Hkv, C]
        layer.keys.masked_fill_(dead[..., None], float("nan"))
        layer.values.masked_fill_(dead[..., None], float("nan"))


# ---------------------------------------------------------------------------------------------------- refusals
def test_the_static_cache_is_freed_without_the_garbage_collector(llama, monkeypatch):
    """Repeated fast generate calls must not hold the previous run's static buffers until a GC pass (on a GPU
    that is gigabytes): nothing in the cache refers back to it."""
    import gc
    import weakref

    model, tok = llama
    made = []
    from kvsieve import fastpath

    def counting_make_static(*args):
        cache = make_static(*args)
        made.append(weakref.ref(cache))
        return cache

    monkeypatch.setattr(fastpath, "make_static", counting_make_static)
    ids, mask, _ = left_padded(tok, [9, 6], seed=56)
    gc.disable()
    try:
        generate(model, ids, mask, compressor="rpc", params=RPC, fast=True, **exactly(NEW, do_sample=False))
        assert made and made[0]() is None
    finally:
        gc.enable()


def test_refusals(llama):
    model, _ = llama
    ids = random_prompt(12, seed=50)
    with pytest.raises(ValueError, match="belong to the fast path: pass fast=True"):
        generate(model, ids, backend="torch", static_capacity=64, max_new_tokens=4)
    with pytest.raises(ValueError, match="does not support num_beams > 1"):
        generate(model, ids, backend="torch", fast=True, max_new_tokens=4, num_beams=2)
    with pytest.raises(TypeError, match="generation options only"):
        generate(model, ids, backend="torch", fast=True, max_new_tokens=4, output_router_logits=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use_cuda_graph=True needs a model on CUDA devices"):
            generate(model, ids, backend="torch", fast=True, use_cuda_graph=True, max_new_tokens=4)


# ------------------------------------------------------------------------------------- triton (interpreter)
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
                    reason="the triton kernels run on CPU through Triton's interpreter: set TRITON_INTERPRET=1")
def test_triton_backend_greedy_tokens_equal_the_eager_path(llama):
    model, tok = llama
    ids, mask, _ = left_padded(tok, [12, 5], seed=51)
    params = dict(interval=4, window=2, ratio=0.5)  # the first compression at 6 generated
    eager, fast = both_paths(model, ids, mask, "rpc", params, backend="triton", **exactly(8, do_sample=False))
    assert torch.equal(fast.sequences, eager.sequences)


# ------------------------------------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def cuda_llama():
    model, tok = models.load("tiny-random-llama")  # a private copy (moved to the GPU)
    return model.to("cuda"), tok


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("compressor, params", [("none", {}), ("rpc", RPC)])
def test_cuda_graph_tokens_equal_the_eager_path(cuda_llama, backend, compressor, params):
    model, tok = cuda_llama
    ids, mask, _ = left_padded(tok, LENGTHS, seed=52)
    ids, mask = ids.cuda(), mask.cuda()
    kwargs = exactly(NEW, do_sample=False)
    eager = generate(model, ids, mask, compressor=compressor, backend=backend, params=params, **kwargs)
    graphed = generate(model, ids, mask, compressor=compressor, backend=backend, params=params, fast=True,
                       use_cuda_graph=True, **kwargs)
    plain = generate(model, ids, mask, compressor=compressor, backend=backend, params=params, fast=True,
                     use_cuda_graph=False, **kwargs)
    assert torch.equal(graphed.sequences, plain.sequences)  # replay == the same step run eagerly
    assert torch.equal(graphed.sequences, eager.sequences)  # and the eager (HF generate) path's tokens
    assert graphed.kv_lengths == eager.kv_lengths


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
def test_replays_after_a_compaction_read_the_compacted_cache(cuda_llama, backend):
    """One decoder replays a graph, the other runs every step eagerly; both are fed the same tokens. The replays
    after each RPC compaction (which rewrites the buffers and ``starts``/``ends`` in place) give the eager step's
    logits, and NaN written into every slot a compaction freed changes nothing."""
    model, tok = cuda_llama
    ids, mask, _ = left_padded(tok, LENGTHS, seed=53)
    ids, mask = ids.cuda(), mask.cuda()
    with torch.inference_mode(), apply(model, "rpc", backend, params=RPC) as engine:
        graphed, eager = StaticDecoder(model, engine, use_cuda_graph=True), StaticDecoder(model, engine, False)
        graphed_logits, eager_logits = graphed.prefill(ids, mask, NEW), eager.prefill(ids, mask, NEW)
        for step in range(NEW - 1):
            tokens = eager_logits.argmax(-1)
            before = graphed.cache.layers[0].compactions
            graphed_logits, eager_logits = graphed.step(tokens), eager.step(tokens)
            if graphed.cache.layers[0].compactions != before:
                poison_outside_live(graphed.cache)
            torch.testing.assert_close(graphed_logits, eager_logits, atol=1e-4, rtol=0, msg=f"step {step}")
    assert graphed.graph is not None and graphed.cache.layers[0].compactions == 5


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("compressor, params", SEGMENT_RUNS)
def test_graph_segments_on_one_gpu_give_the_tokens_of_one_graph(cuda_llama, backend, compressor, params):
    """Layers cut into three graphs (as a model split over devices is) replay the tokens of one whole-step graph."""
    model, tok = cuda_llama
    ids, mask, _ = left_padded(tok, LENGTHS, seed=54)
    kwargs = dict(compressor=compressor, backend=backend, params=params, fast=True, **exactly(NEW, do_sample=False))
    whole = generate(model, ids.cuda(), mask.cuda(), **kwargs)
    cut = generate(model, ids.cuda(), mask.cuda(), graph_breaks=[1, 2], **kwargs)
    assert torch.equal(cut.sequences, whole.sequences)
    assert cut.kv_lengths == whole.kv_lengths


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("compressor, params", SEGMENT_RUNS)
def test_a_model_split_over_two_gpus_replays_the_tokens_of_one_gpu(tmp_path, compressor, params):
    """accelerate's device_map puts layer 0 on cuda:0 and the rest on cuda:1: the fast path (one graph per
    device's layers) keeps the one-GPU fast path's tokens."""
    from transformers import AutoModelForCausalLM

    model, tok = models.load("tiny-random-llama")
    model.save_pretrained(tmp_path)
    layout = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
              "model.layers.2": 1, "model.norm": 1, "lm_head": 1}
    split = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, device_map=layout).eval()
    assert {p.device.index for p in split.parameters()} == {0, 1}
    ids, mask, _ = left_padded(tok, LENGTHS, seed=55)
    kwargs = dict(compressor=compressor, backend="triton", params=params, fast=True, **exactly(NEW, do_sample=False))
    want = generate(model.to("cuda:0"), ids.cuda(), mask.cuda(), **kwargs)
    got = generate(split, ids.to("cuda:0"), mask.to("cuda:0"), **kwargs)
    assert torch.equal(got.sequences.cpu(), want.sequences.cpu())
    assert got.kv_lengths == want.kv_lengths


@pytest.mark.gpu
def test_graph_replays_do_not_synchronise(cuda_llama):
    """Steps of a compressor with no decode schedule enqueue work and return: no host<->device sync."""
    model, tok = cuda_llama
    ids = random_prompt(24, batch=2, seed=54).cuda()
    with torch.inference_mode(), apply(model, "none", "torch") as engine:
        decoder = StaticDecoder(model, engine, use_cuda_graph=True)
        logits = decoder.prefill(ids, None, 40)
        for _ in range(4):  # warm-up and capture
            logits = decoder.step(logits.argmax(-1))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(20):
                logits = decoder.step(logits.argmax(-1))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert decoder.graph is not None


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flash"])
def test_bf16_graph_replays_equal_eager_steps(backend):
    """The production setting (bf16, Triton or FlashAttention decode kernels): replaying the captured step gives
    the tokens of the same step run eagerly. (Against HF's eager loop, bf16 tokens may differ where the kernels
    split differently for the dynamic cache's capacity; that agreement is for the benchmark to report.)"""
    from kvsieve.integration import resolve_backend

    try:
        resolve_backend(backend, torch.device("cuda"), torch.bfloat16)
    except ValueError as exc:
        pytest.skip(str(exc))
    model, tok = models.load("tiny-random-llama")
    model = model.to("cuda", torch.bfloat16)
    ids, mask, _ = left_padded(tok, LENGTHS, seed=55)
    ids, mask = ids.cuda(), mask.cuda()
    runs = [
        generate(model, ids, mask, compressor="rpc", backend=backend, params=RPC, fast=True, use_cuda_graph=graph,
                 **exactly(NEW, do_sample=False))
        for graph in (True, False)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)


@pytest.mark.parametrize("compressor, params, per_layer",
                         [("none", {}, 1), ("snapkv", dict(ratio=0.2, window=4), 3),
                          ("fastkv", dict(tsp_rate=0.5, ratio=0.2, window=4), 3)])
def test_prefill_host_reads_per_layer_are_bounded(tiny_models, compressor, params, per_layer):
    """Each host read of a device value stalls the GPU during prefill (docs/benchmarks.md, the 8K profile): the
    selection path may read at most a few values per layer (the eviction check and the size after compaction),
    not one per helper call."""
    model, tok = tiny_models["llama"]
    ids, mask, _ = left_padded(tok, [40, 33], seed=57)
    reads = host_reads(model, ids, mask, compressor, params)
    layers = model.config.num_hidden_layers
    # per layer: the padding mask check, the eviction check (one read for two facts), the size after compaction;
    # once per forward: the padding of the mask the TSP layer's propagation gathers (token propagation checks its
    # input on the device, through the engine's guard: no read)
    assert len(reads) <= per_layer * layers + 8, reads
