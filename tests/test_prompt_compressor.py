"""PromptCompressor: a third-party compressor in a few lines (tests/thirdparty/tova.py, TOVA), the shared budget and
window rules, nested policy parameters, and the fast path sizing it needs no code for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import left_padded
from thirdparty import tova

from kvsieve import plugins
from kvsieve.integration import generate, resolve_compressor
from kvsieve.params import UnknownParameterError
from kvsieve.testing import assert_scoring_conforms

TOVA_SOURCE = Path(tova.__file__)


@pytest.fixture
def tova_registered():
    plugins.register(tova, name="tova-test", distribution="tova-test 0.0")
    try:
        yield
    finally:
        plugins.unregister("tova-test")


def test_the_example_takes_no_builtin_name(tova_registered, recwarn):
    """The example registers ``tova_example`` and ``last_query_example``: ``tova`` is the built-in, untouched."""
    assert type(resolve_compressor("tova_example")) is tova.TOVA
    assert type(resolve_compressor("tova")).__module__ == "kvsieve.policies.tova"
    assert plugins.registry().get("scoring", "last_query_example").obj is tova.LastQueryScoring
    assert not [w for w in recwarn if "tova" in str(w.message)]


def test_a_tova_plugin_on_the_base_fits_in_40_lines():
    lines = TOVA_SOURCE.read_text().splitlines()
    assert len(lines) <= 40, len(lines)


def test_tova_scoring_conforms():
    assert_scoring_conforms(tova.LastQueryScoring())


@pytest.mark.parametrize("fast", [False, True])
def test_tova_runs_and_keeps_its_budget_on_a_padded_batch(tova_registered, llama, fast):
    model, tok = llama
    ids, mask, _ = left_padded(tok, [40, 27], seed=5)
    new = 6
    out = generate(model, ids, mask, compressor="tova_example", params={"ratio": 0.25}, backend="torch", fast=fast,
                   max_new_tokens=new, min_new_tokens=new, do_sample=False)
    kept = -(-ids.shape[1] // 4)  # ceil(0.25 * padded prompt); padding dropped, then new - 1 appended
    assert out.kv_lengths == [kept + new - 1] * model.config.num_hidden_layers
    assert out.compressor["scoring"] == {"name": "last_query_example"} and out.compressor["window"] == 1


def test_tova_scores_are_the_last_querys_attention_averaged_over_heads():
    """Against a direct computation: softmax of the last query over every key, per query head, summed over each
    GQA group, averaged over the KV heads, on the candidates (all keys but the protected last one)."""
    from kvsieve.backends.torch_ref import TorchBackend
    from kvsieve.policy import ScoringContext

    gen = torch.Generator().manual_seed(11)
    B, H, Hkv, W, N, d = 2, 6, 3, 4, 13, 8
    queries, keys = torch.randn(B, H, W, d, generator=gen), torch.randn(B, Hkv, N, d, generator=gen)
    zeros, ends = torch.zeros(B, Hkv, dtype=torch.long), torch.full((B, Hkv), N)
    ctx = ScoringContext(queries=queries, keys=keys, values=keys.clone(), starts=zeros, ends=ends, cand_starts=zeros,
                         cand_ends=ends - 1, positions=torch.arange(N).expand(B, Hkv, N), layer_idx=0, scale=0.3,
                         backend=TorchBackend(), queries_are_last=True)
    got = tova.LastQueryScoring().score(ctx)
    logits = torch.einsum("bhd,bhnd->bhn", queries[:, :, -1], keys.repeat_interleave(H // Hkv, dim=1)) * 0.3
    per_group = logits.softmax(-1).reshape(B, Hkv, H // Hkv, N).sum(2)[..., : N - 1]
    want = per_group.mean(1, keepdim=True).expand(B, Hkv, N - 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_prompt_compressor_rules(tova_registered):
    with pytest.raises(ValueError, match="either ratio or budget"):
        resolve_compressor("tova_example", {"ratio": 0.2, "budget": 10})
    with pytest.raises(ValueError, match="budget=4 must exceed window=8"):
        resolve_compressor("tova_example", {"budget": 4, "window": 8})
    with pytest.raises(ValueError, match=r"kept fraction, in \(0, 1\].*got 4"):
        resolve_compressor("tova_example", {"ratio": 4})
    with pytest.raises(UnknownParameterError, match="has no parameter 'pooling'"):
        resolve_compressor("tova_example", {"pooling": "max"})
    assert resolve_compressor("tova_example").config()["ratio"] == 0.2  # the base's default, reported resolved


def test_nested_policy_parameters_reach_the_policy():
    snap = resolve_compressor("snapkv", {"scoring.pooling": "max", "scoring.aggregation": "all"})
    assert (snap.scoring.pooling, snap.scoring.aggregation, snap.scoring.normalization) == ("max", "all", "visible")
    same = resolve_compressor("snapkv", {"scoring": {"pooling": "max", "aggregation": "all"}})
    assert same == snap
    named = resolve_compressor("snapkv", {"scoring": "window_attention", "scoring.kernel": 3})
    assert (named.scoring.kernel, named.scoring.normalization) == (3, "candidates")  # the policy's own defaults
    hybrid = resolve_compressor("fastkv+rpc", {"rpc.scoring.aggregation": "group", "fastkv.scoring.pooling": "avg"})
    assert hybrid.part("rpc").scoring.aggregation == "group" and hybrid.part("fastkv").scoring.pooling == "avg"
    with pytest.raises(UnknownParameterError, match="has no parameter 'pooling'. Did you mean 'scoring.pooling'"):
        resolve_compressor("snapkv", {"pooling": "max"})
    with pytest.raises(UnknownParameterError, match="'window_attention' has no parameter 'poolin'"):
        resolve_compressor("snapkv", {"scoring.poolin": "max"})
    with pytest.raises(ValueError, match="kernel must be a positive odd integer"):
        resolve_compressor("rpc", {"scoring.kernel": 4})
    with pytest.raises(TypeError, match="scoring must be the name of a registered scoring policy"):
        resolve_compressor("snapkv", {"scoring": 3})
    with pytest.raises(UnknownParameterError, match="'none' has no parameter 'ratio'. It takes no parameters."):
        resolve_compressor("none", {"ratio": 0.2})
