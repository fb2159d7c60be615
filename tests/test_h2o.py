"""H2O: the kept tokens and their accumulated attention against a dense implementation (one layer of random tensors,
GQA, left padding, blocks, both aggregations; after compactions moved the slots), the budget and window invariants,
the host schedule that sizes the fast path, eager vs fast path, compositions, and the parameter rules."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import left_padded, random_prompt
from eviction_reference import DenseEviction, DrivenLayer

from kvsieve.integration import apply, generate, resolve_compressor
from kvsieve.params import UnknownParameterError
from kvsieve.policies.h2o import H2O

CASES = [
    # (params, pads, steps): budget (and window) per row from these
    (dict(budget=8, window=3), [0, 2], 9),
    (dict(budget=8, window=3, block=3), [0, 2], 10),
    (dict(budget=7, aggregation="all"), [1, 0], 8),  # window: half the budget
    (dict(ratio=0.5, window=2, block=2), [0, 5], 9),  # a ratio: each row's own budget
    (dict(budget=20), [0, 3], 12),  # the prompt fits: the first eviction comes while decoding
]


def _budgets(h2o: H2O, Lp: int, pads: list[int]) -> tuple[list[int], list[int]]:
    """Per row: the budget (written out, not taken from the compressor) and the window."""
    budgets = []
    for pad in pads:
        length = Lp - pad
        tokens = h2o.budget if h2o.budget is not None else math.ceil(h2o.keep.ratio * length)
        budgets.append(max(tokens, 1 if h2o.window is None else h2o.window + 1))
    windows = [b // 2 if h2o.window is None else h2o.window for b in budgets]
    return budgets, windows


@pytest.mark.parametrize("params, pads, steps", CASES, ids=[str(c[0]) for c in CASES])
def test_kept_tokens_and_accumulated_attention_match_a_dense_h2o(params, pads, steps):
    h2o = H2O(**params)
    B, H, Hkv, d, Lp = len(pads), 4, 2, 8, 12
    run = DrivenLayer(h2o, B=B, H=H, Hkv=Hkv, d=d, Lp=Lp, pads=pads, steps=steps, seed=len(str(params)))
    budgets, windows = _budgets(h2o, Lp, pads)
    dense = DenseEviction(run.Q, run.K, pads, Lp, budgets, windows, h2o.block, h2o.aggregation, accumulate=True)

    def check(when: str) -> None:
        for b in range(B):
            for j in range(Hkv):
                held = dense.held[b][j]
                assert run.kept(b, j) == held, (when, b, j)
                want = [dense.score[b][j][k] for k in held]
                torch.testing.assert_close(torch.tensor(run.slot_values("h2o", b, j)), torch.tensor(want),
                                           rtol=1e-4, atol=1e-5, msg=f"{when} {b} {j}")
                # invariants: the budget (up to a pending block), the window, the host schedule
                n = len(held)
                assert n == h2o.held(Lp - pads[b], run.layer.seen - Lp)
                assert n < budgets[b] + h2o.block
                w = windows[b]
                assert not w or held[-w:] == list(range(run.t - w, run.t))[-n:]  # the most recent tokens

    run.prefill()
    dense.prefill()
    check("prefill")
    for step in range(steps):
        run.step(with_queries=step % 2 == 0)  # decode reads the ring, whether or not the forward's queries came
        dense.step()
        check(f"step {step}")
    assert run.layer.compactions >= 2  # slots moved more than once


def test_prefill_needs_the_forwards_queries():
    run = DrivenLayer(H2O(budget=4), B=1, H=2, Hkv=1, d=4, Lp=8, pads=[0], steps=1)
    run.layer.update(run.K[:, :, :8], run.V[:, :, :8])
    run.layer.push_queries(run.Q[:, :, :8])
    run.layer.begin_prompt(torch.zeros(1, 1, dtype=torch.long), (8,))
    with pytest.raises(RuntimeError, match="h2o scores the prompt with every prompt query"):
        run.compressor.after_attention(run._event("prefill", None))


@pytest.mark.parametrize("block", [1, 4])
def test_held_schedule_and_static_sizing(block):
    h2o = H2O(budget=10, window=4, block=block)
    # a 30-token prompt is cut to 10, then grows to 10 + block and is evicted back to 10
    held = [h2o.held(30, g) for g in range(12)]
    assert held[0] == 10 and max(held) == 10 + block - 1 and held[block] == 10
    assert held[:block] == list(range(10, 10 + block))
    assert h2o.held(6, 0) == 6 and h2o.held(6, 4 + block) == 10  # a short prompt grows to the budget first
    assert h2o.peak_generated(30, 10, 100) == block  # the slots past prompt_slots just before an eviction
    assert h2o.peak_generated(6, 6, 100) == 4 + block and h2o.peak_generated(6, 6, 2) == 2
    assert h2o.peak_generated(30, 25, 100) == block  # another part left more than the budget (a composition)
    assert h2o.held_generated(5) is None  # depends on the prompt: the budget covers it


# ------------------------------------------------------------------------------------------------ on a model
MODEL_CASES = [
    dict(budget=16),
    dict(budget=16, window=4, block=5),
    dict(ratio=0.3, aggregation="all"),
]


@pytest.mark.parametrize("params", MODEL_CASES, ids=str)
def test_eager_and_fast_path_give_the_same_tokens(llama, params):
    model, tok = llama
    ids, mask, _ = left_padded(tok, [37, 22], seed=3)
    kwargs = dict(compressor="h2o", params=params, backend="torch", max_new_tokens=20, min_new_tokens=20,
                  do_sample=False)
    eager = generate(model, ids, mask, **kwargs)
    fast = generate(model, ids, mask, fast=True, **kwargs)
    assert torch.equal(eager.sequences, fast.sequences)
    assert eager.kv_lengths == fast.kv_lengths
    h2o = resolve_compressor("h2o", params)
    assert eager.kv_lengths == [h2o.held(37, 19)] * model.config.num_hidden_layers  # the longest row's schedule


def test_the_cache_never_holds_more_than_the_budget_between_steps(llama):
    model, _ = llama
    seen = []

    def watch(input_ids, scores):
        seen.append(engine.last_cache.kv_lengths())
        return scores

    from transformers import LogitsProcessorList

    with apply(model, "h2o", backend="torch", params=dict(budget=12, block=3)) as engine:
        assert engine.guard.enabled  # the run-time contract checks are on
        model.generate(random_prompt(30, seed=2), max_new_tokens=12, do_sample=False,
                       logits_processor=LogitsProcessorList([watch]))
    h2o = engine.compressor
    assert [lengths[0] for lengths in seen] == [h2o.held(30, g) for g in range(12)]
    assert max(max(lengths) for lengths in seen) == 12 + 3 - 1


@pytest.mark.parametrize("prefill", ["snapkv:ratio=0.8,window=4", "snapkv:ratio=0.2,window=4"])
def test_in_the_decode_slot_of_a_composition(llama, prefill):
    """After another prefill part (which may keep more than h2o's budget, or less), the decode schedule still holds
    the budget, and the fast path (sized by peak_generated) gives the eager tokens."""
    model, tok = llama
    ids, mask, _ = left_padded(tok, [40, 31], seed=8)
    snap = dict(kv.split("=") for kv in prefill.split(":")[1].split(","))
    params = {**{f"snapkv.{k}": float(v) if "." in v else int(v) for k, v in snap.items()}, "h2o.budget": 12}
    kwargs = dict(compressor="snapkv+h2o", params=params, backend="torch", max_new_tokens=10, min_new_tokens=10,
                  do_sample=False)
    eager = generate(model, ids, mask, **kwargs)
    fast = generate(model, ids, mask, fast=True, **kwargs)
    assert torch.equal(eager.sequences, fast.sequences)
    assert max(eager.kv_lengths) <= 12


def test_parameter_rules():
    assert resolve_compressor("h2o").config() == {
        "name": "h2o", "window": None, "ratio": 0.2, "budget": None, "block": 1, "selection": {"name": "topk"},
        "aggregation": "group",
    }
    with pytest.raises(ValueError, match="budget=4 must exceed window=4"):
        resolve_compressor("h2o", {"budget": 4, "window": 4})
    with pytest.raises(ValueError, match="either ratio or budget"):
        resolve_compressor("h2o", {"budget": 4, "ratio": 0.5})
    with pytest.raises(ValueError, match="block must be a positive integer"):
        resolve_compressor("h2o", {"block": 0})
    with pytest.raises(ValueError, match="aggregation must be one of 'group', 'all'"):
        resolve_compressor("h2o", {"aggregation": "mean"})
    with pytest.raises(UnknownParameterError, match="Did you mean 'aggregation'"):
        resolve_compressor("h2o", {"scoring.aggregation": "all"})
