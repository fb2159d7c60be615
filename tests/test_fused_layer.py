"""The fast path's fused decoder layer (``kvsieve.fused_layer``) and its operators.

On CPU (torch backend, the references of ``kvsieve.layer_ops``): for every family (Llama, Qwen2, Qwen3 with its q/k
norms, Mistral), a fused decode gives the logits and greedy tokens of the unfused fast path, with and without RPC
compacting, on left-padded batches; the fused forward really runs (one ``rope_append`` per layer and step) and never
on a prefill; the layers get their own forwards back; q/k/v and gate/up merged into one GEMM each give the tokens of
separate projections, share one storage only while installed, and are left apart where a module has a hook; models
it cannot restate are refused with the reason when ``fuse_layers=True`` and left unfused by default. The ``gpu`` case
compares the Triton kernels' fused graph replays with the unfused ones in bf16.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, greedy, left_padded, random_prompt, tiny_llama

from kvsieve.backend import KVBackend
from kvsieve.fastpath import StaticDecoder
from kvsieve.fused_layer import FusedDecoderLayers, unfusable_reason
from kvsieve.integration import apply, generate
from kvsieve.propagation import decoder_layers

RPC = dict(interval=8, window=4, ratio=0.25)
LENGTHS = [21, 13, 17]
#: the fused layer's switches as shipped (tests that change one put it back)
SHIPPED = {name: getattr(FusedDecoderLayers, name) for name in ("silu_in_gate_up", "backend_projections")}
# the projections each merge joins into one GEMM: (the _FusedForward attribute, the layer's module, their names)
GROUPS = [("qkv", "self_attn", ("q_proj", "k_proj", "v_proj")), ("gate_up", "mlp", ("gate_proj", "up_proj"))]


def decode_logits(model, ids, mask, compressor, params, fuse_layers, steps, backend="torch", forced=None,
                  use_cuda_graph=False):
    """Logits of the prompt's last token and of ``steps`` decode steps, ``[steps + 1, B, V]``: greedy, or fed the
    tokens ``forced [steps, B]``."""
    with torch.inference_mode(), apply(model, compressor, backend, params=params) as engine:
        decoder = StaticDecoder(model, engine, use_cuda_graph=use_cuda_graph, fuse_layers=fuse_layers)
        try:
            logits = [decoder.prefill(ids, mask, steps + 1)]
            for t in range(steps):
                logits.append(decoder.step(logits[-1].argmax(-1) if forced is None else forced[t]))
        finally:
            decoder.close()
    return torch.stack(logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("compressor, params", [("none", {}), ("rpc", RPC)])
def test_fused_steps_give_the_unfused_logits(tiny_models, family, compressor, params):
    model, tok = tiny_models[family]
    ids, mask, _ = left_padded(tok, LENGTHS, seed=7)
    fused = decode_logits(model, ids, mask, compressor, params, True, 30)
    plain = decode_logits(model, ids, mask, compressor, params, False, 30)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused.argmax(-1), plain.argmax(-1))


def decode_state(model, ids, mask, fuse_layers, steps, backend, **toggles):
    """Each layer's selector-query ring, its counters and its live K/V after ``steps`` greedy RPC decode steps."""
    saved = {name: getattr(FusedDecoderLayers, name) for name in toggles}
    for name, value in toggles.items():
        setattr(FusedDecoderLayers, name, value)
    try:
        with torch.inference_mode(), apply(model, "rpc", backend, params=RPC) as engine:
            decoder = StaticDecoder(model, engine, use_cuda_graph=False, fuse_layers=fuse_layers)
            try:
                tokens = decoder.prefill(ids, mask, steps + 1).argmax(-1)
                for _ in range(steps):
                    tokens = decoder.step(tokens).argmax(-1)
                return tokens, [(layer.queries.clone(), layer.num_queries, int(layer.device_queries),
                                 int(layer.device_seen), layer.starts.clone(), layer.ends.clone())
                                for layer in decoder.cache.layers]
            finally:
                decoder.close()
    finally:
        for name, value in saved.items():
            setattr(FusedDecoderLayers, name, value)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_append_records_the_selector_queries_the_unfused_step_pushes(tiny_models, backend):
    """The fused append writes each step's rotated query into the ring (no push of its own): after RPC steps that
    wrap the ring and compact, every layer's ring, counters and live range equal the unfused path's, and the
    separate push (``query_in_append=False``) gives the same."""
    model, tok = tiny_models["llama"]
    ids, mask, _ = left_padded(tok, LENGTHS, seed=5)
    steps = 19  # > the interval (8) twice, and the ring (window 4) wraps
    plain = decode_state(model, ids, mask, False, steps, backend)
    for toggles in ({}, {"query_in_append": False}):
        fused = decode_state(model, ids, mask, True, steps, backend, **toggles)
        assert torch.equal(fused[0], plain[0])
        for got, want in zip(fused[1], plain[1], strict=True):
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
            assert got[1:4] == want[1:4]
            assert torch.equal(got[4], want[4]) and torch.equal(got[5], want[5])


def test_the_residual_add_inside_down_proj_gives_the_separate_add(tiny_models):
    """``residual_in_down_proj`` (``residual.addmm_``) against the add as a kernel of its own: the same logits (one
    rounding fewer) and tokens."""
    model, tok = tiny_models["qwen2"]
    ids, mask, _ = left_padded(tok, LENGTHS, seed=9)
    inside = decode_logits(model, ids, mask, "rpc", RPC, True, 20)
    FusedDecoderLayers.residual_in_down_proj = False
    try:
        apart = decode_logits(model, ids, mask, "rpc", RPC, True, 20)
    finally:
        FusedDecoderLayers.residual_in_down_proj = True
    torch.testing.assert_close(inside, apart, rtol=1e-5, atol=1e-5)
    assert torch.equal(inside.argmax(-1), apart.argmax(-1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize(("switch", "value", "default"), [
    ("silu_in_gate_up", True, False),  # on triton: SiLU * up in the gate/up GEMM's epilogue
    ("backend_projections", ("o_proj", "down_proj"), ()),  # on triton: the skinny linear (down_proj + residual)
], ids=["silu_in_gate_up", "backend_projections"])
def test_fused_layer_switches_keep_the_logits(tiny_models, family, backend, switch, value, default):
    """A switch that moves a projection's work into other kernels against the fused layer without it: the same
    logits within fp32 rounding (tiny models run in fp32; Qwen2's q/k/v have biases, Llama's none) and the same
    greedy tokens."""
    if backend == "triton":
        pytest.importorskip("triton")
        from kvsieve.backends.triton._common import interpret_mode

        if not interpret_mode():
            pytest.skip("the triton backend runs on CPU tensors only under TRITON_INTERPRET=1")
    model, tok = tiny_models[family]
    ids, mask, _ = left_padded(tok, LENGTHS, seed=13)
    setattr(FusedDecoderLayers, switch, default)
    try:
        without = decode_logits(model, ids, mask, "rpc", RPC, True, 12, backend=backend)
        setattr(FusedDecoderLayers, switch, value)
        with_it = decode_logits(model, ids, mask, "rpc", RPC, True, 12, backend=backend)
    finally:
        setattr(FusedDecoderLayers, switch, SHIPPED[switch])
    torch.testing.assert_close(with_it, without, rtol=1e-4, atol=1e-4)
    assert torch.equal(with_it.argmax(-1), without.argmax(-1))


def test_backend_projections_are_named_or_refused(llama):
    model, _ = llama
    FusedDecoderLayers.backend_projections = ("o_proj", "q_proj")
    try:
        with torch.inference_mode(), apply(model, "none", "torch") as engine:
            with pytest.raises(ValueError, match=r"backend_projections names \['q_proj'\]: choose from o_proj, "
                                                 "down_proj"):
                FusedDecoderLayers(model, engine).install()
    finally:
        FusedDecoderLayers.backend_projections = SHIPPED["backend_projections"]


def test_fused_generate_gives_the_eager_tokens(tiny_models):
    model, tok = tiny_models["qwen3"]
    ids, mask, _ = left_padded(tok, LENGTHS, seed=3)
    eager = generate(model, ids, mask, compressor="rpc", params=RPC, **greedy(40))
    fused = generate(model, ids, mask, compressor="rpc", params=RPC, fast=True, fuse_layers=True, **greedy(40))
    assert torch.equal(fused.sequences, eager.sequences)
    assert fused.kv_lengths == eager.kv_lengths


class CountingBackend:
    """Counts ``rope_append`` calls of the engine's backend (wraps the bound method)."""

    def __init__(self, backend: KVBackend):
        self.calls, self.own = 0, backend.rope_append
        backend.rope_append = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.own(*args, **kwargs)


def test_the_fused_forward_runs_on_decode_steps_only(llama):
    model, tok = llama
    ids, mask, _ = left_padded(tok, LENGTHS, seed=1)
    layers = decoder_layers(model)
    with torch.inference_mode(), apply(model, "none", "torch") as engine:
        counter = CountingBackend(engine.backend)
        decoder = StaticDecoder(model, engine, use_cuda_graph=False)
        assert decoder.fused is not None
        logits = decoder.prefill(ids, mask, 8)
        assert counter.calls == 0  # the prefill ran the layers' own forwards
        for _ in range(5):
            logits = decoder.step(logits.argmax(-1))
        assert counter.calls == 5 * len(layers)
        model(input_ids=ids, attention_mask=mask)  # a prefill while installed runs the layers' own forwards
        assert counter.calls == 5 * len(layers)
        decoder.close()
    assert all("forward" not in layer.__dict__ for layer in layers)


def test_decoders_left_open_do_not_outlive_their_apply(llama):
    """Two decoders of one apply, neither closed: the second takes the layers over, the apply's exit restores them,
    and a later apply decodes through its own engine."""
    model, tok = llama
    ids, mask, _ = left_padded(tok, [9, 6], seed=2)
    layers = decoder_layers(model)
    with torch.inference_mode(), apply(model, "none", "torch") as engine:
        for _ in range(2):
            decoder = StaticDecoder(model, engine, use_cuda_graph=False)
            decoder.step(decoder.prefill(ids, mask, 4).argmax(-1))
        assert layers[0].forward.replaced is None  # no wrapper around a wrapper
    assert all("forward" not in layer.__dict__ for layer in layers)
    again = decode_logits(model, ids, mask, "none", {}, True, 3)
    torch.testing.assert_close(again, decode_logits(model, ids, mask, "none", {}, False, 3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attr, part, names", GROUPS, ids=[g[0] for g in GROUPS])
def test_merged_projections_share_storage_while_installed_and_get_their_own_back(tiny_models, attr, part, names):
    """q/k/v (with biases) and gate/up (without) of a Qwen2 layer are views of one tensor during decode steps (one
    GEMM), and afterwards own storages again: same Parameter objects, same values, no inference tensors (the model
    still trains)."""
    model, tok = tiny_models["qwen2"]
    layer = decoder_layers(model)[0]
    projections = [getattr(getattr(layer, part), name) for name in names]
    params = [p for m in projections for p in (m.weight, m.bias) if p is not None]
    before = [p.detach().clone() for p in params]
    ids, mask, _ = left_padded(tok, [7, 5], seed=4)
    with torch.inference_mode(), apply(model, "none", "torch") as engine:
        decoder = StaticDecoder(model, engine, use_cuda_graph=False)
        decoder.step(decoder.prefill(ids, mask, 4).argmax(-1))
        merged = getattr(layer.forward, attr)
        assert merged in decoder.fused.merged and all(a is b for a, b in zip(merged.modules, projections))
        assert all(m.weight.data.untyped_storage().data_ptr() == merged.weight.untyped_storage().data_ptr()
                   for m in projections)
        decoder.close()
    after = [p for m in projections for p in (m.weight, m.bias) if p is not None]
    assert len(after) == len(params) and all(a is b for a, b in zip(after, params))
    assert len({p.untyped_storage().data_ptr() for p in after}) == len(after)
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert not any(p.is_inference() for p in after)
    model(input_ids=ids[:, :3]).logits.sum().backward()  # trainable: no inference tensor among the weights
    assert all(m.weight.grad is not None for m in projections)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("merge_qkv, merge_gate_up", [(True, True), (True, False), (False, True)],
                         ids=["both", "qkv", "gate_up"])
def test_merged_projections_give_the_tokens_of_separate_ones(tiny_models, monkeypatch, family, merge_qkv,
                                                             merge_gate_up):
    model, tok = tiny_models[family]
    ids, mask, _ = left_padded(tok, LENGTHS, seed=5)
    monkeypatch.setattr(FusedDecoderLayers, "merge_qkv", False)
    monkeypatch.setattr(FusedDecoderLayers, "merge_gate_up", False)
    apart = decode_logits(model, ids, mask, "rpc", RPC, True, 20)
    monkeypatch.setattr(FusedDecoderLayers, "merge_qkv", merge_qkv)
    monkeypatch.setattr(FusedDecoderLayers, "merge_gate_up", merge_gate_up)
    merged = decode_logits(model, ids, mask, "rpc", RPC, True, 20)
    torch.testing.assert_close(merged, apart, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged.argmax(-1), apart.argmax(-1))


@pytest.mark.parametrize("merge_qkv, merge_gate_up, hooked", [
    (True, True, None), (False, True, None), (True, False, None), (True, True, "gate_proj"), (True, True, "k_proj"),
], ids=["both", "qkv-off", "gate_up-off", "gate_proj-hooked", "k_proj-hooked"])
def test_projections_merge_as_asked_and_not_where_hooked(monkeypatch, merge_qkv, merge_gate_up, hooked):
    """The class attributes turn each merge off; a forward hook on one projection of layer 0 leaves that layer's
    group apart (the hook runs on every decode step) and the other layers merged."""
    model = tiny_llama(2)
    monkeypatch.setattr(FusedDecoderLayers, "merge_qkv", merge_qkv)
    monkeypatch.setattr(FusedDecoderLayers, "merge_gate_up", merge_gate_up)
    layers = decoder_layers(model)
    calls = []
    if hooked is not None:
        part = "mlp" if hooked in ("gate_proj", "up_proj") else "self_attn"
        getattr(getattr(layers[0], part), hooked).register_forward_hook(lambda *a: calls.append(1))
    ids = random_prompt(6, batch=2, seed=1)
    with torch.inference_mode(), apply(model, "none", "torch") as engine:
        decoder = StaticDecoder(model, engine, use_cuda_graph=False)
        logits = decoder.prefill(ids, torch.ones_like(ids), 4)
        for _ in range(3):
            logits = decoder.step(logits.argmax(-1))
        for i, layer in enumerate(layers):
            for (attr, _, names), on in zip(GROUPS, (merge_qkv, merge_gate_up)):
                expected = on and not (i == 0 and hooked in names)
                assert (getattr(layer.forward, attr) is not None) == expected, (i, attr)
        assert len(decoder.fused.merged) == 2 * merge_qkv + 2 * merge_gate_up - (hooked is not None)
        decoder.close()
    assert len(calls) == (1 + 3 if hooked is not None else 0)  # the prefill and three decode steps


def test_unfusable_models_are_refused_on_request_and_left_alone_by_default():
    model = tiny_llama(2)
    model.config.hidden_act = "gelu"
    with torch.inference_mode(), apply(model, "none", "torch") as engine:
        assert "hidden_act='gelu'" in unfusable_reason(model, engine)
        with pytest.raises(ValueError, match="fuse_layers=True.*hidden_act='gelu'"):
            StaticDecoder(model, engine, use_cuda_graph=False, fuse_layers=True)
        assert StaticDecoder(model, engine, use_cuda_graph=False).fused is None
        with pytest.raises(TypeError, match="fuse_layers must be"):
            StaticDecoder(model, engine, use_cuda_graph=False, fuse_layers="yes")


def test_fuse_layers_belongs_to_the_fast_path(llama):
    model, tok = llama
    ids, mask, _ = left_padded(tok, [5], seed=0)
    with pytest.raises(ValueError, match="fuse_layers belong to the fast path"):
        generate(model, ids, mask, fuse_layers=False, **greedy(2))


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_graph_replays_are_as_accurate_as_the_unfused_ones_in_bf16(tiny_models, family):
    """Triton's fused layer in bf16 CUDA-graph replays (its own GEMMs for gate/up, o_proj and down_proj, which sum
    in another order than cuBLAS) against the unfused bf16 replays, both teacher-forced with the unfused run's
    tokens. Neither is exact, so both are measured against the same weights in fp32 (the bf16 values upcast, the
    torch backend, unfused): the fused run's largest logit error may be at most twice the unfused run's plus one
    bf16 ulp of the logits' scale (it must not be less accurate). With RPC, the fused run keeps the unfused top-1
    wherever the unfused top two are not a near tie."""
    model, tok = tiny_models[family]
    model = model.to("cuda", torch.bfloat16)
    try:
        ids, mask, _ = left_padded(tok, LENGTHS, seed=11)
        ids, mask = ids.cuda(), mask.cuda()
        runs = {}
        for compressor, params in (("none", {}), ("rpc", RPC)):
            plain = decode_logits(model, ids, mask, compressor, params, False, 40, "triton", use_cuda_graph=True)
            forced = plain[:-1].argmax(-1)
            runs[compressor] = forced, [
                decode_logits(model, ids, mask, compressor, params, fuse, 40, "triton", forced=forced,
                              use_cuda_graph=True).float() for fuse in (False, True)]
        forced, (plain, fused) = runs["rpc"]
        scale = plain.abs().amax().item()
        top2 = plain.topk(2, dim=-1).values
        decided = (top2[..., 0] - top2[..., 1]) > 0.02 * scale
        assert torch.equal(fused.argmax(-1)[decided], plain.argmax(-1)[decided])
        forced, (plain, fused) = runs["none"]
        model.to(torch.float32)
        exact = decode_logits(model, ids, mask, "none", {}, False, 40, "torch", forced=forced)
        scale = exact.abs().amax().item()
        plain_err, fused_err = ((run - exact).abs().amax().item() for run in (plain, fused))
        print(f"{family}: largest logit error against fp32, unfused {plain_err:.4f}, fused {fused_err:.4f}, "
              f"logit scale {scale:.3f}")
        assert fused_err <= 2 * plain_err + 2**-8 * scale, (fused_err, plain_err, scale)
    finally:
        model.to("cpu", torch.float32)
