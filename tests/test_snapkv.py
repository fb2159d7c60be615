"""SnapKV against the paper's description (docs/policies/snapkv.md), on the model's own post-RoPE queries and keys.

With budget ``B`` and window ``w``, per KV head the kept prompt tokens are the last ``w`` plus the top
``B - w`` of the rest by the SnapKV score: softmax of each window query over every prompt key it causally sees
(fp32), window columns dropped, summed over the window queries and the GQA group, average-pooled (kernel 7,
zero padding, stride 1). The expected set is computed here by a straightforward float64 loop from the full
cache of a ``none`` run (the keys) and its query ring (the queries), and compared with the positions SnapKV
kept. Hypothesis then draws padded batches, ratios or budgets and windows, and checks the budget rule, the
window, the padding and the appends after every step (eager) and after a fast-path generation.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from conftest import FAMILIES, left_padded, random_prompt
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LogitsProcessorList

import kvsieve
from kvsieve import plugins
from kvsieve.cache import SieveCache
from kvsieve.fastpath import fast_generate
from kvsieve.integration import apply, cache_kwarg, generate

WINDOW, BUDGET = 8, 20


def reference_scores(
    keys: torch.Tensor, queries: torch.Tensor, scale: float, kernel: int = 7, pooling: str = "avg"
) -> torch.Tensor:
    """SnapKV scores of the non-window prompt tokens, ``float64 [Hkv, L - w]``.

    Args:
        keys: ``[Hkv, L, d]`` post-RoPE keys of the ``L`` real prompt tokens.
        queries: ``[H, w, d]`` post-RoPE queries of the last ``w`` prompt tokens, oldest first.
    """
    Hkv, L, _ = keys.shape
    H, w, _ = queries.shape
    G = H // Hkv
    summed = torch.zeros(Hkv, L - w, dtype=torch.float64)
    for h in range(H):
        for i in range(w):
            seen = L - w + i + 1  # causal: window query i sees prompt tokens [0, L - w + i]
            logits = queries[h, i].double() @ keys[h // G, :seen].double().T * scale
            summed[h // G] += torch.softmax(logits, dim=0)[: L - w]  # window columns dropped
    pooled = torch.zeros_like(summed)
    half = kernel // 2
    for n in range(L - w):
        lo, hi = max(n - half, 0), min(n + half + 1, L - w)  # zero padding outside [0, L - w)
        if pooling == "avg":
            pooled[:, n] = summed[:, lo:hi].sum(dim=1) / kernel
        else:
            pooled[:, n] = summed[:, lo:hi].amax(dim=1)
    return pooled


def assert_snapkv_kept(
    kept: list[int], scores: torch.Tensor, length: int, budget: int, window: int, offset=0
):
    """``kept`` (absolute positions) = the window + a top-``budget - window`` set of ``scores`` (ties within
    float noise of the boundary may go either way)."""
    kept = sorted(p - offset for p in kept)
    assert len(kept) == budget
    assert kept[-window:] == list(range(length - window, length)), "the observation window must be kept"
    chosen = torch.zeros(length - window, dtype=torch.bool)
    chosen[kept[:-window]] = True
    tol = 1e-6 * float(scores.max())
    worst_kept, best_dropped = float(scores[chosen].min()), float(scores[~chosen].max())
    expected = sorted(torch.topk(scores, budget - window).indices.tolist())
    assert worst_kept >= best_dropped - tol, (
        f"kept {kept[:-window]} is not the top {budget - window}: a kept token scores {worst_kept:.6g}, "
        f"a dropped one {best_dropped:.6g}; expected {expected}"
    )


def full_prompt_cache(model, input_ids, attention_mask=None) -> SieveCache:
    """The uncompressed cache of one forward over the prompt, every query of the prompt recorded in order."""
    cache = SieveCache(query_window=input_ids.shape[1], num_layers=model.config.num_hidden_layers)
    with apply(model, "none", backend="torch"), torch.no_grad():
        model(input_ids, attention_mask=attention_mask, **{cache_kwarg(model): cache})
    return cache


def live_positions(layer, row: int, head: int) -> list[int]:
    return layer.positions[row, head, layer.starts[row, head] : layer.ends[row, head]].tolist()


# 45 is not a multiple of the window: the query ring has wrapped, and the window queries must still come out
# oldest first (window_lse derives each one's causal range from its index)
@pytest.mark.parametrize("length", [40, 45])
@pytest.mark.parametrize("family", FAMILIES)
def test_kept_tokens_follow_the_algorithm(tiny_models, family, length):
    model, _ = tiny_models[family]
    ids = random_prompt(length, seed=length)
    full = full_prompt_cache(model, ids)
    with apply(model, "snapkv", backend="torch", params=dict(budget=BUDGET, window=WINDOW)) as engine:
        with torch.no_grad():
            model(ids)
    scale = model.config.head_dim**-0.5
    for idx, (layer, ref) in enumerate(zip(engine.last_cache.layers, full.layers)):
        assert layer.compactions == 1 and layer.max_live == BUDGET
        scores = reference_scores(ref.keys[0, :, :length], ref.queries[0, :, length - WINDOW :], scale)
        for head in range(layer.keys.shape[1]):
            kept = live_positions(layer, 0, head)
            assert kept == sorted(kept), "the cache must keep the original order"
            assert_snapkv_kept(kept, scores[head], length, BUDGET, WINDOW), f"layer {idx} head {head}"


@pytest.mark.parametrize("pooling, kernel", [("max", 7), ("avg", 3)])
def test_kept_tokens_with_other_pooling(llama, pooling, kernel):
    model, _ = llama
    length = 48
    ids = random_prompt(length, seed=21)
    full = full_prompt_cache(model, ids)
    params = {"budget": BUDGET, "window": WINDOW, "scoring.pooling": pooling, "scoring.kernel": kernel}
    with apply(model, "snapkv", backend="torch", params=params) as engine, torch.no_grad():
        model(ids)
    scale = model.config.head_dim**-0.5
    for layer, ref in zip(engine.last_cache.layers, full.layers):
        scores = reference_scores(
            ref.keys[0, :, :length], ref.queries[0, :, -WINDOW:], scale, kernel, pooling
        )
        for head in range(2):
            assert_snapkv_kept(live_positions(layer, 0, head), scores[head], length, BUDGET, WINDOW)


def test_padded_batch_never_keeps_padding_and_scores_each_row_alone(llama):
    """Rows of a left-padded batch keep what SnapKV keeps for that prompt alone, never padding."""
    model, tok = llama
    window, budget, lengths = 4, 12, [37, 8, 22]  # the middle row is shorter than the budget
    input_ids, attention_mask, rows = left_padded(tok, lengths, seed=30)
    width = max(lengths)
    with apply(model, "snapkv", backend="torch", params=dict(budget=budget, window=window)) as engine:
        model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3, do_sample=False)
    scale = model.config.head_dim**-0.5
    for idx, layer in enumerate(engine.last_cache.layers):
        assert layer.starts.eq(0).all()
        for b, row in enumerate(rows):
            pad, n = width - len(row), len(row)
            full = full_prompt_cache(model, row[None]).layers[idx]
            scores = reference_scores(full.keys[0, :, :n], full.queries[0, :, n - window :], scale)
            for head in range(2):
                live = live_positions(layer, b, head)
                assert min(live) >= pad, f"row {b} keeps a padding slot: {live}"
                prompt, generated = live[: min(budget, n)], live[min(budget, n) :]
                assert generated == list(range(width, width + 2)), "decoding appends without eviction"
                if n <= budget:
                    assert prompt == list(range(pad, width))
                else:
                    assert_snapkv_kept(prompt, scores[head], n, budget, window, offset=pad)


def test_decoding_appends_without_eviction(llama):
    model, _ = llama
    length, new = 40, 5
    ids = random_prompt(length, seed=31)
    with apply(model, "snapkv", backend="torch", params=dict(budget=BUDGET, window=WINDOW)) as engine:
        with torch.no_grad():
            model(ids)
        prefill = [layer.positions[0, :, :BUDGET].clone() for layer in engine.last_cache.layers]
        model.generate(ids, max_new_tokens=new, do_sample=False)
    for layer, kept in zip(engine.last_cache.layers, prefill):
        assert layer.compactions == 1
        assert torch.equal(layer.positions[0, :, :BUDGET], kept)
        assert (
            layer.positions[0, :, BUDGET : BUDGET + new - 1].tolist()
            == [list(range(length, length + new - 1))] * 2
        )
        assert layer.seen == length + new - 1 and layer.prompt_len == length


def test_ratio_budget_is_the_ceiling_of_ratio_times_prompt(llama):
    model, _ = llama
    for length, ratio, expected in [
        (50, 0.3, 15),
        (41, 0.5, 21),
        (30, 0.1, WINDOW),
    ]:  # never below the window
        with apply(model, "snapkv", backend="torch", params=dict(ratio=ratio, window=WINDOW)) as engine:
            with torch.no_grad():
                model(random_prompt(length, seed=length))
        assert engine.last_cache.kv_lengths() == [expected] * 3, (length, ratio)


def test_prompt_shorter_than_the_window_is_kept_whole(llama):
    model, _ = llama
    with (
        apply(model, "snapkv", backend="torch", params=dict(budget=12, window=8)) as engine,
        torch.no_grad(),
    ):
        model(random_prompt(5, seed=3))
    for layer in engine.last_cache.layers:
        assert layer.compactions == 0 and live_positions(layer, 0, 0) == list(range(5))


class _Observer:
    def __init__(self):
        self.calls = []

    @kvsieve.hookimpl
    def kvsieve_layer_compressed(self, layer_idx, phase, before, after, info):
        self.calls.append((layer_idx, phase, before, after))


def test_layer_compressed_observers_are_told(llama):
    model, _ = llama
    observer = _Observer()
    plugins.register(observer, name="test-snapkv-observer")
    try:
        with apply(model, "snapkv", backend="torch", params=dict(budget=BUDGET, window=WINDOW)):
            model.generate(random_prompt(40, seed=2), max_new_tokens=3, do_sample=False)
    finally:
        plugins.unregister("test-snapkv-observer")
    assert observer.calls == [(i, "prefill", 40, BUDGET) for i in range(3)]


def test_prompt_shorter_than_the_default_window_is_kept_whole(llama):
    model, _ = llama
    ids = torch.randint(3, 250, (1, 12))
    with torch.no_grad():
        full = generate(model, ids, torch.ones_like(ids), compressor="none", backend="torch",
                        max_new_tokens=4, min_new_tokens=4, do_sample=False)
        short = generate(model, ids, torch.ones_like(ids), compressor="snapkv", backend="torch",
                         max_new_tokens=4, min_new_tokens=4, do_sample=False)  # window=32 > 12 tokens
    assert torch.equal(full.sequences, short.sequences)
    assert short.kv_lengths == [12 + 4 - 1] * model.config.num_hidden_layers


# ------------------------------------------------------------------------------------------- invariants
#: decimal ratios: the expected count is computed exactly (Fraction), independently of float rounding
RATIOS = ("0.05", "0.1", "0.2", "0.25", "0.3", "0.5", "0.7", "0.9", "1")


def expected_prompt_kept(n: int, window: int, ratio: str | None, budget: int | None) -> int:
    """Prompt tokens SnapKV keeps of a row of ``n`` real tokens: ``max(ceil(ratio * n), min(window, n))``, or
    with a fixed budget (always above the window) ``min(budget, n)``."""
    wanted = math.ceil(Fraction(ratio) * n) if ratio is not None else budget
    return min(max(wanted, min(window, n)), n)


@st.composite
def snapkv_runs(draw):
    """``(lengths, params, new, seed)``: a left-padded batch of 1 to 3 rows, a ratio or a budget, a window, and
    scoring options (which must not matter to the invariants)."""
    lengths = draw(st.lists(st.integers(1, 40), min_size=1, max_size=3))
    window = draw(st.integers(1, 8))
    if draw(st.booleans()):
        params = dict(ratio=draw(st.sampled_from(RATIOS)), budget=None, window=window)
    else:
        params = dict(ratio=None, budget=draw(st.integers(window + 1, 44)), window=window)
    params["scoring.pooling"] = draw(st.sampled_from(("avg", "max")))
    params["scoring.aggregation"] = draw(st.sampled_from(("group", "all")))
    return lengths, params, draw(st.integers(1, 4)), draw(st.integers(0, 2**16))


def compressor_params(params: dict) -> dict:
    """The drawn parameters as the compressor takes them (the ratio a float, no None)."""
    return {k: (float(v) if k == "ratio" else v) for k, v in params.items() if v is not None}


class SnapKVWatcher:
    """A logits processor that checks SnapKV's cache after every forward (the prefill, then each decode step)."""

    def __init__(self, session, lengths, params):
        self.session, self.lengths, self.params, self.steps = session, lengths, params, 0
        self.width = max(lengths)
        self.prefilled = {}  # (layer, row, head) -> the prompt positions kept at prefill

    def __call__(self, input_ids, scores):
        self.check(input_ids.shape[1])  # every token of input_ids has been fed by now
        return scores

    def check(self, seen: int) -> None:
        """Check the cache after ``seen`` tokens (padding included) were fed."""
        width, window = self.width, self.params["window"]
        for idx, layer in enumerate(self.session.last_cache.layers):
            assert layer.seen == seen and layer.compactions <= 1
            assert layer.starts.eq(0).all(), "the left padding before the kept tokens is freed"
            for b, n in enumerate(self.lengths):
                pad = width - n
                kept = expected_prompt_kept(n, window, self.params["ratio"], self.params["budget"])
                recent = min(window, n)
                for head in range(layer.keys.shape[1]):
                    at = f"step {self.steps}, layer {idx}, row {b} ({n} tokens, {pad} padding), KV head {head}"
                    live = live_positions(layer, b, head)
                    assert len(live) == kept + seen - width, f"{at}: {len(live)} kept, expected {kept} + appended"
                    assert live == sorted(set(live)), f"{at}: positions not sorted and unique: {live}"
                    prompt, generated = live[:kept], live[kept:]
                    assert min(prompt) >= pad, f"{at}: a padding position is kept: {prompt}"
                    assert max(prompt) < width, f"{at}: {prompt}"
                    assert prompt[kept - recent :] == list(range(width - recent, width)), (
                        f"{at}: the last {recent} prompt positions must be kept: {prompt}"
                    )
                    assert generated == list(range(width, seen)), f"{at}: decoding appends: {generated}"
                    before = self.prefilled.setdefault((idx, b, head), prompt)
                    assert prompt == before, f"{at}: decoding evicted prompt tokens ({before} -> {prompt})"
        self.steps += 1


@settings(max_examples=50, deadline=None)
@given(run=snapkv_runs())
def test_kept_prompt_invariants_on_padded_batches(llama, run):
    """Per row and KV head, after prefill and after every decode step: exactly the budget rule's count of prompt
    tokens (of the row's own length), the last ``min(window, n)`` prompt positions among them, no padding, sorted
    unique positions, and decoding appends without evicting."""
    model, tok = llama
    lengths, params, new, seed = run
    input_ids, attention_mask, _ = left_padded(tok, lengths, seed=seed)
    with apply(model, "snapkv", backend="torch", params=compressor_params(params)) as session:
        watcher = SnapKVWatcher(session, lengths, params)
        model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            logits_processor=LogitsProcessorList([watcher]),
        )
    assert watcher.steps == new


@settings(max_examples=20, deadline=None)
@given(run=snapkv_runs())
def test_kept_prompt_invariants_on_the_fast_path(llama, run):
    """The same invariants after a fast-path generation (static cache, no CUDA graph on the CPU)."""
    model, tok = llama
    lengths, params, new, seed = run
    input_ids, attention_mask, _ = left_padded(tok, lengths, seed=seed)
    with apply(model, "snapkv", backend="torch", params=compressor_params(params)) as session:
        with torch.inference_mode():
            fast_generate(
                model, input_ids, attention_mask, session, max_new_tokens=new, min_new_tokens=new, do_sample=False
            )
    SnapKVWatcher(session, lengths, params).check(input_ids.shape[1] + new - 1)
