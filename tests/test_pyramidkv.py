"""PyramidKV (policies/pyramidkv.py, docs/policies/pyramidkv.md): the layer schedule (its sum, its shape, the top
layer set by beta, the window floor, the prompt cap), per-row budgets in a padded batch, its policies through the
conformance kit, and end-to-end runs with the contract checks on (eager and fast path; torch and triton on a GPU)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from conftest import assert_gpu_keeps_cpu_tokens, greedy, left_padded, random_prompt, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsieve.integration import apply, generate
from kvsieve.plugins import build_compressor
from kvsieve.policies.pyramidkv import PyramidKV, pyramid_budgets
from kvsieve.policies.topk import TopKSelection
from kvsieve.policies.window_attention import WindowAttentionScoring
from kvsieve.testing import assert_scoring_conforms, assert_selection_conforms


# ------------------------------------------------------------------------------------------------ the schedule
@st.composite
def schedules(draw):
    length = draw(st.integers(1, 5000))
    window = draw(st.integers(0, length))
    uniform = draw(st.integers(window, length + 10))
    layers = draw(st.integers(1, 80))
    beta = draw(st.one_of(st.integers(1, 40), st.floats(1, 50)))
    return uniform, length, window, layers, beta


@settings(max_examples=400, deadline=None)
@given(case=schedules())
def test_the_schedule_keeps_the_uniform_total_and_narrows_upwards(case):
    uniform, length, window, layers, beta = case
    budgets = pyramid_budgets(uniform, length, window, layers, beta)
    assert len(budgets) == layers
    if uniform >= length:
        assert budgets == [uniform] * layers  # nothing to evict
        return
    assert sum(budgets) == layers * uniform  # exactly: the average over layers is the uniform budget
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))  # lower layers keep more
    assert all(window <= b <= length for b in budgets)  # never fewer than the window, never more than the prompt
    if layers > 1:
        base = uniform - window
        top, bottom = Fraction(base) / Fraction(beta), 2 * base - Fraction(base) / Fraction(beta)
        if bottom > length - window:  # the bottom layer would exceed the prompt: capped, the top takes the rest
            assert budgets[0] == length
            top = 2 * base - Fraction(length - window)
        assert math.floor(top) <= budgets[-1] - window <= math.ceil(top)  # the top layer: base / beta


def test_the_schedule_by_hand():
    # 30 layers, uniform 200 of 1000 with a 32-token window: the scored part 168 runs from 2 * 168 - 8.4 = 327.6
    # down to 168 / 20 = 8.4, 11 fewer per layer
    budgets = pyramid_budgets(200, 1000, 32, 30, 20)
    assert budgets[0] == 32 + 328 and budgets[-1] == 32 + 8 and sum(budgets) == 30 * 200
    assert budgets[:3] == [360, 349, 338]
    # beta 1 is uniform; one layer is uniform
    assert pyramid_budgets(200, 1000, 32, 30, 1) == [200] * 30
    assert pyramid_budgets(200, 1000, 32, 1, 20) == [200]
    # a bottom layer that would keep more than the prompt keeps the prompt, and the top layer the rest
    budgets = pyramid_budgets(600, 1000, 32, 30, 20)
    assert budgets[0] == 1000 and budgets[-1] == 32 + (2 * 568 - 968) and sum(budgets) == 30 * 600
    # uniform = window: every layer keeps only the window
    assert pyramid_budgets(32, 1000, 32, 4, 20) == [32] * 4


def test_parameters_are_validated_with_their_name_and_what_is_allowed():
    with pytest.raises(ValueError, match="beta must be a finite number >= 1 \\(1 keeps the uniform budget in every "
                                         "layer\\), got 0.5"):
        PyramidKV(beta=0.5)
    with pytest.raises(ValueError, match="budget=8 must exceed window=32"):
        PyramidKV(budget=8)
    compressor = build_compressor("pyramidkv", {"beta": 10, "ratio": 0.1})
    assert compressor.beta == 10 and compressor.config()["beta"] == 10 and compressor.config()["ratio"] == 0.1


def test_defaults_are_snapkvs_scoring_and_topk():
    compressor = build_compressor("pyramidkv")
    assert compressor.beta == 20 and compressor.window == 32 and compressor.keep.ratio == 0.2
    assert compressor.scoring == build_compressor("snapkv").scoring
    assert compressor.selection == TopKSelection()


def test_its_policies_conform():
    compressor = build_compressor("pyramidkv", {"selection": "adaptive"})
    assert_scoring_conforms(compressor.scoring, queries_are_last=True, max_examples=10)
    assert_selection_conforms(compressor.selection, max_examples=20)
    assert isinstance(compressor.scoring, WindowAttentionScoring)


# ------------------------------------------------------------------------------------------------ in a model
@pytest.fixture(scope="module")
def model6():
    return tiny_llama(6)


def test_each_layer_keeps_its_pyramid_budget_per_row_of_a_padded_batch(model6, checks_on):
    ids, mask, rows = left_padded(_Tok(), [90, 53], seed=21)
    window, ratio = 4, 0.25
    with apply(model6, "pyramidkv", backend="torch", params={"ratio": ratio, "window": window}) as engine, \
            torch.no_grad():
        model6(input_ids=ids, attention_mask=mask)
    layers = engine.last_cache.layers
    for b, row in enumerate(rows):
        n = len(row)
        schedule = pyramid_budgets(math.ceil(ratio * n), n, window, len(layers), 20)
        got = [int((layer.ends - layer.starts)[b].unique().item()) for layer in layers]
        assert got == schedule, b
        assert got[0] > got[-1] and sum(got) == len(layers) * math.ceil(ratio * n)
        width = ids.shape[1]
        for layer in layers:  # the window is kept in every layer and head
            for h in range(layer.keys.shape[1]):
                live = layer.positions[b, h, layer.starts[b, h] : layer.ends[b, h]].tolist()
                assert live[-window:] == list(range(width - window, width))


class _Tok:
    pad_token_id = 0


def test_the_cache_holds_the_same_total_as_snapkv(model6):
    ids = random_prompt(101, seed=4)
    params = {"ratio": 0.2, "window": 4}
    totals = {}
    for name in ("snapkv", "pyramidkv"):
        with apply(model6, name, backend="torch", params=params) as engine, torch.no_grad():
            model6(ids)
        totals[name] = [layer.max_live for layer in engine.last_cache.layers]
    assert sum(totals["pyramidkv"]) == sum(totals["snapkv"]) and totals["pyramidkv"] != totals["snapkv"]


@pytest.mark.parametrize("params", [{"ratio": 0.3, "window": 4}, {"ratio": 0.3, "window": 4, "beta": 2},
                                    {"budget": 20, "window": 4, "selection": "span"}])
def test_runs_end_to_end_eager_and_fast_with_the_checks_on(model6, checks_on, params):
    ids, mask, _ = left_padded(_Tok(), [48, 31], seed=11)
    eager = generate(model6, ids, mask, compressor="pyramidkv", params=params, backend="torch", **greedy(6))
    fast = generate(model6, ids, mask, compressor="pyramidkv", params=params, backend="torch", fast=True,
                    **greedy(6))
    assert eager.compressor["name"] == "pyramidkv"
    assert torch.equal(eager.sequences, fast.sequences)
    assert eager.kv_lengths == fast.kv_lengths
    assert eager.kv_lengths[0] > eager.kv_lengths[-1]  # lower layers keep more


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_on_the_gpu_every_backend_keeps_the_cpu_tokens(model6, checks_on, backend):
    """On CUDA (prefill graphs on: each layer's budget differs, so most layers run eagerly), pyramidkv keeps what
    the CPU run keeps, for a padded batch."""
    ids, mask, _ = left_padded(_Tok(), [48, 31], seed=11)
    assert_gpu_keeps_cpu_tokens(model6, ids, mask, "pyramidkv", {"ratio": 0.3, "window": 4}, backend)
