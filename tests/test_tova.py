"""TOVA and its scoring: causal_attention against a direct softmax (chunks, candidates inside the window, padding
queries) and the conformance kit; the kept tokens against a dense TOVA on random tensors after every step; the
prompt phase against the 40-line example plugin; eager vs fast path; the parameter rules."""

from __future__ import annotations

import importlib.util
import math
import os

import attrs
import pytest
import torch
from conftest import left_padded
from eviction_reference import DenseEviction, DrivenLayer
from thirdparty import tova as example

from kvsieve import plugins
from kvsieve.backends.torch_ref import TorchBackend
from kvsieve.integration import apply, generate, resolve_compressor
from kvsieve.policies.causal_attention import CausalAttentionScoring, causal_attention
from kvsieve.policies.tova import TOVA
from kvsieve.policy import ScoringContext
from kvsieve.testing import assert_scoring_conforms

# Triton's kernels run on CPU only through its interpreter (set before triton is imported), else on a GPU
TRITON = importlib.util.find_spec("triton") is not None and (
    os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available())
needs_triton = pytest.mark.skipif(not TRITON, reason="needs triton and TRITON_INTERPRET=1 (or a CUDA GPU)")


# ------------------------------------------------------------------------------------------------ the scoring
def _direct(q, k, starts, ends, cand_starts, cand_ends, scale) -> torch.Tensor:
    """Window query ``w`` at slot ``ends - W + w``: softmax over ``[starts, slot]``, summed onto the candidates it
    sees; float64, one (row, head, query) at a time."""
    B, H, W, _ = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    N = int((cand_ends - cand_starts).max())
    out = torch.zeros(B, Hkv, N, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            j = h // G
            for w in range(W):
                slot = int(ends[b, j]) - W + w
                seen = range(int(starts[b, j]), slot + 1)
                if not seen:
                    continue  # left padding pays nothing
                probs = (scale * (k[b, j, list(seen)].double() @ q[b, h, w].double())).softmax(0)
                for s, p in zip(seen, probs):
                    if cand_starts[b, j] <= s < cand_ends[b, j]:
                        out[b, j, s - cand_starts[b, j]] += p
    return out


@pytest.mark.parametrize("chunk", [1, 2, 3, 128])
def test_causal_attention_equals_a_direct_softmax(chunk):
    gen = torch.Generator().manual_seed(4)
    B, H, Hkv, W, C, d = 2, 6, 3, 9, 16, 8
    q, k = torch.randn(B, H, W, d, generator=gen), torch.randn(B, Hkv, C, d, generator=gen)
    starts = torch.tensor([[0, 0, 0], [3, 3, 3]])  # row 1: its first window queries are left padding
    ends = torch.tensor([[13, 13, 13], [11, 11, 11]])
    cand_starts = torch.tensor([[1, 0, 6], [3, 5, 4]])  # candidates before, inside and across the window
    cand_ends = torch.tensor([[13, 7, 12], [11, 10, 9]])
    want = _direct(q, k, starts, ends, cand_starts, cand_ends, 0.4)
    N = want.shape[-1]
    got = causal_attention(q, k, starts, ends, cand_starts, cand_ends, 0.4, TorchBackend(), N + 3, chunk=chunk)
    torch.testing.assert_close(got[..., :N].double(), want, rtol=1e-5, atol=1e-6)
    assert got[..., N:].eq(0).all() and got.dtype == torch.float32  # a larger N pads with zeros


@needs_triton
def test_causal_attention_on_the_triton_backend_matches_torch():
    from kvsieve.backends.triton.backend import TritonBackend

    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    gen = torch.Generator().manual_seed(5)
    B, H, Hkv, W, C, d = 2, 4, 2, 7, 20, 16
    q, k = torch.randn(B, H, W, d, generator=gen), torch.randn(B, Hkv, C, d, generator=gen)
    starts, ends = torch.tensor([[0, 0], [4, 4]]), torch.tensor([[18, 18], [15, 15]])
    cand_starts, cand_ends = torch.tensor([[0, 9], [4, 6]]), torch.tensor([[18, 14], [15, 12]])
    args = [t.to(device) for t in (q, k, starts, ends, cand_starts, cand_ends)]
    for chunk in (2, 128):
        want = causal_attention(*args, 0.3, TorchBackend(), 14, chunk=chunk)
        got = causal_attention(*args, 0.3, TritonBackend(), 14, chunk=chunk)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("aggregation", ["all", "group"])
def test_causal_attention_scoring_conforms_and_aggregates(aggregation):
    policy = CausalAttentionScoring(aggregation=aggregation)
    assert_scoring_conforms(policy, queries_are_last=True, max_examples=20)
    gen = torch.Generator().manual_seed(1)
    B, H, Hkv, N, d = 1, 4, 2, 10, 8
    q, k = torch.randn(B, H, 1, d, generator=gen), torch.randn(B, Hkv, N, d, generator=gen)
    zeros, ends = torch.zeros(B, Hkv, dtype=torch.long), torch.full((B, Hkv), N)
    ctx = ScoringContext(queries=q, keys=k, values=k, starts=zeros, ends=ends, cand_starts=zeros, cand_ends=ends,
                         positions=torch.arange(N).expand(B, Hkv, N), layer_idx=0, scale=0.3,
                         backend=TorchBackend(), queries_are_last=True)
    per_head = _direct(q, k, zeros, ends, zeros, ends, 0.3).float()
    want = per_head.sum(1, keepdim=True).expand_as(per_head) if aggregation == "all" else per_head
    torch.testing.assert_close(policy.score(ctx), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs the window queries to be the last live tokens"):
        policy.score(attrs.evolve(ctx, queries_are_last=False))


# ------------------------------------------------------------------------------------------------ TOVA itself
CASES = [
    (dict(budget=7), [0, 2], 9),  # window 0: the newest token competes
    (dict(budget=8, window=2, block=3), [0, 2], 10),
    (dict(ratio=0.5, window=1, scoring={"aggregation": "group"}), [0, 5], 8),
    (dict(budget=16, window=None), [1, 0], 9),  # the prompt fits; window: half the budget
]


@pytest.mark.parametrize("params, pads, steps", CASES, ids=[str(c[0]) for c in CASES])
def test_kept_tokens_match_a_dense_tova(params, pads, steps):
    tova = resolve_compressor("tova", params)
    B, H, Hkv, d, Lp = len(pads), 4, 2, 8, 12
    run = DrivenLayer(tova, B=B, H=H, Hkv=Hkv, d=d, Lp=Lp, pads=pads, steps=steps, seed=len(str(params)))
    budgets = [max(tova.keep.tokens(Lp - p), 1 if tova.window is None else tova.window + 1) for p in pads]
    if tova.budget is None:
        assert budgets == [max(math.ceil(tova.ratio * (Lp - p)), tova.window + 1) for p in pads]
    windows = [b // 2 if tova.window is None else tova.window for b in budgets]
    dense = DenseEviction(run.Q, run.K, pads, Lp, budgets, windows, tova.block, tova.scoring.aggregation,
                          accumulate=False)
    run.prefill()
    dense.prefill()
    for step in range(steps + 1):
        for b in range(B):
            for j in range(Hkv):
                assert run.kept(b, j) == dense.held[b][j], (step, b, j)
                assert len(dense.held[b][j]) == tova.held(Lp - pads[b], run.layer.seen - Lp)
        if step < steps:
            run.step(with_queries=False)
            dense.step()
    assert run.layer.compactions >= 2


def test_the_prompt_phase_keeps_what_the_example_plugin_keeps(llama):
    """With ``window=1`` (the example's) and no decoding, the built-in keeps the same prompt tokens as the 40-line
    plugin of writing-a-plugin.md."""
    model, tok = llama
    ids, mask, _ = left_padded(tok, [30, 19], seed=6)
    plugins.register(example, name="tova-example-test", distribution="tova-example-test 0.0")
    try:
        kept = {}
        for name in ("tova", "tova_example"):
            with apply(model, name, backend="torch", params={"ratio": 0.3, "window": 1}) as engine:
                model(input_ids=ids, attention_mask=mask)
            kept[name] = [layer.positions for layer in engine.last_cache.layers]
    finally:
        plugins.unregister("tova-example-test")
    for built_in, plugin in zip(kept["tova"], kept["tova_example"], strict=True):
        assert torch.equal(built_in, plugin)


@pytest.mark.parametrize("params", [dict(budget=12), dict(ratio=0.4, window=2, block=4)], ids=str)
def test_eager_and_fast_path_give_the_same_tokens(llama, params):
    model, tok = llama
    ids, mask, _ = left_padded(tok, [33, 20], seed=9)
    kwargs = dict(compressor="tova", params=params, backend="torch", max_new_tokens=18, min_new_tokens=18,
                  do_sample=False)
    eager = generate(model, ids, mask, **kwargs)
    fast = generate(model, ids, mask, fast=True, **kwargs)
    assert torch.equal(eager.sequences, fast.sequences) and eager.kv_lengths == fast.kv_lengths
    tova = resolve_compressor("tova", params)
    assert eager.kv_lengths == [tova.held(33, 17)] * model.config.num_hidden_layers


@needs_triton
@pytest.mark.parametrize("compressor, params", [("tova", dict(budget=9)), ("h2o", dict(budget=10, block=2))])
def test_the_triton_backend_gives_the_torch_tokens(llama, compressor, params):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the tiny model runs on CPU here")
    model, tok = llama
    ids, mask, _ = left_padded(tok, [21, 13], seed=2)
    kwargs = dict(compressor=compressor, params=params, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    want = generate(model, ids, mask, backend="torch", **kwargs)
    for fast in (False, True):
        got = generate(model, ids, mask, backend="triton", fast=fast, **kwargs)
        assert torch.equal(got.sequences, want.sequences) and got.kv_lengths == want.kv_lengths


def test_parameter_rules():
    tova = resolve_compressor("tova")
    assert (tova.keep.budget, tova.window, tova.block, tova.query_window) == (512, 0, 1, 1)
    assert tova.config()["scoring"] == {"name": "causal_attention", "aggregation": "all"}
    assert isinstance(resolve_compressor("tova", {"scoring.aggregation": "group"}), TOVA)
    with pytest.raises(ValueError, match="budget=3 must exceed window=3"):
        resolve_compressor("tova", {"budget": 3, "window": 3})
    with pytest.raises(ValueError, match="window must be an integer >= 0"):
        resolve_compressor("tova", {"window": -1})
    with pytest.raises(ValueError, match="aggregation must be one of 'group', 'all'"):
        resolve_compressor("tova", {"scoring.aggregation": "mean"})
