"""Run-time contract checks (kvsieve.contracts): a faulty scoring or selection policy is caught where its output
enters the cache, named with its plugin, and never leaves a corrupted cache behind."""

from __future__ import annotations

import os

import attrs
import pytest
import torch
from conftest import left_padded

from kvsieve import plugins
from kvsieve.contracts import PluginContractError
from kvsieve.integration import generate
from kvsieve.policies.topk import TopKSelection
from kvsieve.policies.window_attention import WindowAttentionScoring
from kvsieve.policy import Selection, SelectionPolicy


@attrs.frozen
class BrokenSelection(SelectionPolicy):
    """Top-k, then broken in one way (``fault``)."""

    name = "broken_selection"
    fault: str = "duplicates"

    def select(self, scores, counts, budget, protect_head=0, protect_tail=0):
        good = TopKSelection().select(scores, counts, budget, protect_head, protect_tail)
        keep, kept = good.keep.clone(), good.counts.clone()
        if self.fault == "duplicates":
            keep[..., 1] = keep[..., 0]
        elif self.fault == "out_of_range":
            keep[..., -1] = counts + 5
        elif self.fault == "unsorted":
            keep[..., :2] = keep[..., :2].flip(-1)
        elif self.fault == "short":
            keep, kept = keep[..., :-1], kept
        elif self.fault == "over_budget":
            kept = kept + 1
        elif self.fault == "drops_protected":  # a valid top-k that ignores the protected tail and evicts it
            last = torch.arange(scores.shape[-1]) == (counts[..., None] - 1)
            dropped = TopKSelection().select(scores.masked_fill(last, float("-inf")), counts, budget, protect_head, 0)
            keep, kept = dropped.keep, dropped.counts
        elif self.fault == "not_a_selection":
            return keep, kept
        elif self.fault == "float_keep":
            keep = keep.float()
        return Selection(keep=keep, counts=kept)


@attrs.frozen
class BrokenScoring(WindowAttentionScoring):
    """Window attention, then broken in one way (``fault``)."""

    name = "broken_scoring"
    fault: str = "short"

    def score(self, ctx):
        scores = super().score(ctx)
        if self.fault == "short":
            return scores[..., :-1]
        if self.fault == "long":
            return torch.nn.functional.pad(scores, (0, 3))
        if self.fault == "nan":
            return scores.index_fill(-1, torch.tensor([0]), float("nan"))
        if self.fault == "writes_cache":
            ctx.keys.mul_(0.5)
            return scores
        if self.fault == "integer":
            return scores.long()
        raise AssertionError(self.fault)


def run(model, ids, mask, **kwargs):
    return generate(model, ids, mask, backend="torch", max_new_tokens=3, min_new_tokens=3, do_sample=False, **kwargs)


SELECTION_FAULTS = ["duplicates", "out_of_range", "unsorted", "short", "over_budget", "drops_protected"]


@pytest.mark.parametrize("fault", SELECTION_FAULTS)
def test_a_broken_selection_is_refused_and_named(llama, fault):
    model, tok = llama
    ids, mask, _ = left_padded(tok, [30, 22], seed=1)
    with pytest.raises(PluginContractError, match="selection policy 'broken_selection'.*invalid selection"):
        run(model, ids, mask, compressor="snapkv", params={"ratio": 0.5, "window": 4,
                                                           "selection": BrokenSelection(fault)})
    # the library still works, and the model was restored
    assert model.config._attn_implementation != "kvsieve"
    assert run(model, ids, mask, compressor="snapkv", params={"ratio": 0.5, "window": 4}).sequences.shape[1] == 33


@pytest.mark.parametrize("fault, match", [("not_a_selection", "returned tuple, not a kvsieve.policy.Selection"),
                                          ("float_keep", r"returned keep \(torch.float32")])
def test_a_selection_of_the_wrong_type_is_refused_at_once(llama, fault, match):
    model, tok = llama
    ids, mask, _ = left_padded(tok, [30, 22], seed=1)
    with pytest.raises(PluginContractError, match=match):
        run(model, ids, mask, compressor="snapkv", params={"ratio": 0.5, "window": 4,
                                                           "selection": BrokenSelection(fault)})


@pytest.mark.parametrize("fault, match", [
    ("short", r"scores of shape \(2, 2, 25\).*expected a floating tensor of shape \(2, 2, 26\)"),
    ("long", r"scores of shape \(2, 2, 29\)"),
    ("integer", "dtype torch.int64"),
    ("nan", "non-finite score"),
    ("writes_cache", "changed the cache it was scoring"),
])
def test_broken_scores_are_refused(llama, fault, match):
    model, tok = llama
    ids, mask, _ = left_padded(tok, [30, 22], seed=1)
    scoring = BrokenScoring(pooling="avg", kernel=7, aggregation="group", normalization="visible", fault=fault)
    with pytest.raises(PluginContractError, match=match):
        run(model, ids, mask, compressor="snapkv", params={"ratio": 0.5, "window": 4, "scoring": scoring})


def test_the_error_names_the_distribution_of_a_registered_plugin(llama):
    import types

    import kvsieve

    @kvsieve.hookimpl
    def kvsieve_selection_policies():
        return {"broken_selection": BrokenSelection}

    module = types.ModuleType("bad_plugin")
    module.kvsieve_selection_policies = kvsieve_selection_policies
    plugins.register(module, name="bad-plugin", distribution="bad-plugin 9.9")
    try:
        model, tok = llama
        ids, mask, _ = left_padded(tok, [30, 22], seed=1)
        with pytest.raises(PluginContractError, match="distribution 'bad-plugin 9.9'"):
            run(model, ids, mask, compressor="snapkv", params={"ratio": 0.5, "window": 4,
                                                               "selection": "broken_selection"})
    finally:
        plugins.unregister("bad-plugin")


TRITON_ON_CPU = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                   reason="the triton kernels run on CPU through Triton's interpreter: set "
                                          "TRITON_INTERPRET=1")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=TRITON_ON_CPU)])
def test_a_fault_is_replaced_by_a_valid_selection_before_the_error(llama, checks_on, backend):
    """The stand-in keeps the cache consistent: with the checks deferring (as in a real run), the layer that got
    the faulty selection holds sorted, unique, in-range positions when the error surfaces (the torch references,
    and the triton backend's check kernels)."""
    model, tok = llama
    ids, mask, _ = left_padded(tok, [30, 22], seed=1)
    from kvsieve.integration import apply

    with apply(model, "snapkv", backend, params={"ratio": 0.5, "window": 4,
                                                 "selection": BrokenSelection("out_of_range")}) as engine:
        with pytest.raises(PluginContractError):
            model(input_ids=ids, attention_mask=mask, use_cache=True)
        layer = engine.last_cache.layers[0]
        for b in range(2):
            live = layer.positions[b, 0, layer.starts[b, 0]:layer.ends[b, 0]]
            assert (live >= 0).all() and (live[1:] > live[:-1]).all()


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_checks_can_be_turned_off(llama, monkeypatch, how):
    """Off, the device checks do not run: the same broken selection goes through (which is why they are on)."""
    model, tok = llama
    ids, mask, _ = left_padded(tok, [30, 22], seed=1)
    kwargs = {"checks": False} if how == "argument" else {}
    if how == "environment":
        monkeypatch.setenv("KVSIEVE_CHECKS", "off")
    out = run(model, ids, mask, compressor="snapkv", params={"ratio": 0.5, "window": 4,
                                                             "selection": BrokenSelection("duplicates")}, **kwargs)
    assert out.sequences.shape[1] == 33


@pytest.mark.parametrize("fast", [False, True])
def test_a_decode_time_fault_is_caught(llama, fast):
    model, tok = llama
    ids, mask, _ = left_padded(tok, [12, 9], seed=2)
    params = {"interval": 8, "window": 2, "ratio": 0.5, "selection": BrokenSelection("unsorted")}
    with pytest.raises(PluginContractError, match="broken_selection"):
        generate(model, ids, mask, compressor="rpc", params=params, backend="torch", fast=fast, max_new_tokens=16,
                 min_new_tokens=16, do_sample=False)


def test_builtins_pass_their_own_checks(llama):
    model, tok = llama
    ids, mask, _ = left_padded(tok, [40, 26], seed=3)
    for name, params in [("snapkv", {"ratio": 0.3}), ("streamingllm", {"budget": 12}),
                         ("fastkv", {"tsp_rate": 0.5, "ratio": 0.3, "window": 4}),
                         ("rpc", {"interval": 8, "window": 2, "ratio": 0.5})]:
        out = generate(model, ids, mask, compressor=name, params=params, backend="torch", checks=True,
                       max_new_tokens=14, min_new_tokens=14, do_sample=False)
        assert out.generated_tokens == 14
