"""StreamingLLM: the first ``sinks`` tokens plus the most recent ones, ``budget`` in all, after every forward.

Two views are pinned: the cache (after every step the live positions are exactly the sinks and the most
recent tokens, never more than ``budget``), and the model output (every step's logits equal plain HF attention
over the full cache with a 2D attention mask that hides exactly the evicted tokens: so the right K/V data was
kept, in the right slots, with their original positions). Hypothesis then draws padded batches, sinks, budgets and
ratios, and checks the invariants after every step (eager) and after a fast-path generation.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from conftest import FAMILIES, left_padded, random_prompt
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, LogitsProcessorList

from kvsieve.cache import DynamicSieveLayer
from kvsieve.fastpath import fast_generate
from kvsieve.integration import apply


def expected_positions(seen: int, budget: int, sinks: int, pad: int = 0) -> list[int]:
    """Positions a StreamingLLM cache holds after ``seen`` tokens (``pad`` of them left padding) were fed."""
    real = list(range(pad, seen))
    if len(real) <= budget:
        return real
    return real[:sinks] + real[len(real) - (budget - sinks) :]


def live_positions(layer, row: int, head: int) -> list[int]:
    return layer.positions[row, head, layer.starts[row, head] : layer.ends[row, head]].tolist()


class CacheWatcher:
    """A logits processor that checks the cache after every forward of ``model.generate``."""

    def __init__(self, session, budget, sinks, pads):
        self.session, self.budget, self.sinks, self.pads, self.steps = session, budget, sinks, pads, 0

    def __call__(self, input_ids, scores):
        seen = input_ids.shape[1]  # every token of input_ids has been fed by now
        for idx, layer in enumerate(self.session.last_cache.layers):
            assert layer.seen == seen
            assert layer.max_live <= self.budget, f"layer {idx} holds {layer.max_live} > budget {self.budget}"
            for row, pad in enumerate(self.pads):
                want = expected_positions(seen, self.budget, self.sinks, pad)
                for head in range(layer.keys.shape[1]):
                    assert live_positions(layer, row, head) == want, (
                        f"step {self.steps} layer {idx} row {row}"
                    )
        self.steps += 1
        return scores


@pytest.mark.parametrize(
    "prompt, budget, sinks, new",
    [(30, 16, 4, 6), (20, 24, 4, 10), (25, 10, 0, 4), (12, 8, 7, 5)],
    ids=["prompt-over-budget", "outgrows-budget-while-decoding", "no-sinks", "one-recent"],
)
def test_kept_positions_are_the_sinks_and_the_most_recent(llama, prompt, budget, sinks, new):
    model, _ = llama
    with apply(model, "streamingllm", backend="torch", params=dict(budget=budget, sinks=sinks)) as session:
        watcher = CacheWatcher(session, budget, sinks, pads=[0])
        model.generate(
            random_prompt(prompt, seed=prompt),
            max_new_tokens=new,
            do_sample=False,
            logits_processor=LogitsProcessorList([watcher]),
        )
    assert watcher.steps == new
    assert session.last_cache.kv_lengths() == [min(budget, prompt + new - 1)] * 3


def test_left_padded_batch_keeps_each_rows_own_sinks(llama):
    model, tok = llama
    lengths, budget, sinks, new = [26, 9, 17], 12, 3, 6
    input_ids, attention_mask, _ = left_padded(tok, lengths, seed=40)
    pads = [max(lengths) - n for n in lengths]
    with apply(model, "streamingllm", backend="torch", params=dict(budget=budget, sinks=sinks)) as session:
        watcher = CacheWatcher(session, budget, sinks, pads)
        model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new,
            do_sample=False,
            logits_processor=LogitsProcessorList([watcher]),
        )
    assert watcher.steps == new


def reference_logits(model, sequences, attention_mask, prompt, new, budget, sinks):
    """Per-step last-token logits of plain HF attention (full DynamicCache), evicted tokens masked out."""
    pads = (attention_mask == 0).sum(dim=1)
    B = sequences.shape[0]
    cache = DynamicCache()
    steps = []
    with torch.no_grad():
        position_ids = (torch.arange(prompt)[None] - pads[:, None]).clamp(min=0)
        out = model(
            sequences[:, :prompt], attention_mask=attention_mask, position_ids=position_ids, cache=cache
        )
        steps.append(out.logits[:, -1])
        for t in range(1, new):
            seen = prompt + t
            mask = torch.zeros(B, seen, dtype=torch.long)
            for b in range(B):  # what the cache held before this step, plus the new token itself
                mask[b, expected_positions(seen - 1, budget, sinks, int(pads[b])) + [seen - 1]] = 1
            out = model(
                sequences[:, seen - 1 : seen],
                attention_mask=mask,
                cache=cache,
                position_ids=(seen - 1 - pads)[:, None],
            )
            steps.append(out.logits[:, -1])
    return steps


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_full_attention_with_evicted_tokens_masked(tiny_models, family):
    model, _ = tiny_models[family]
    prompt, budget, sinks, new = 30, 16, 4, 8
    ids = random_prompt(prompt, seed=41)
    with apply(model, "streamingllm", backend="torch", params=dict(budget=budget, sinks=sinks)):
        out = model.generate(
            ids, max_new_tokens=new, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    ref = reference_logits(model, out.sequences, torch.ones_like(ids), prompt, new, budget, sinks)
    for step, (got, want) in enumerate(zip(out.scores, ref, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m, s=step: f"step {s}: {m}")


def test_logits_on_a_left_padded_batch(llama):
    model, tok = llama
    lengths, budget, sinks, new = [24, 10, 19], 12, 2, 6
    input_ids, attention_mask, _ = left_padded(tok, lengths, seed=42)
    with apply(model, "streamingllm", backend="torch", params=dict(budget=budget, sinks=sinks)):
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    ref = reference_logits(model, out.sequences, attention_mask, max(lengths), new, budget, sinks)
    for step, (got, want) in enumerate(zip(out.scores, ref, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m, s=step: f"step {s}: {m}")


def test_ratio_fixes_the_budget_at_prefill(llama):
    model, _ = llama
    prompt, new = 40, 6
    with apply(model, "streamingllm", backend="torch", params=dict(ratio=0.25, sinks=2)) as session:
        model.generate(random_prompt(prompt, seed=43), max_new_tokens=new, do_sample=False)
    for layer in session.last_cache.layers:
        assert live_positions(layer, 0, 0) == expected_positions(prompt + new - 1, 10, 2)


# StreamingLLM compacts after every decode step: its reserve keeps room for the next token, so a budget that is
# a multiple of the 64-slot granule must not grow and shrink the buffers every step.
def test_decoding_does_not_reallocate_every_step(llama, monkeypatch):
    model, _ = llama
    calls = []
    original = DynamicSieveLayer._reallocate

    def counting(self, capacity):
        calls.append(capacity)
        return original(self, capacity)

    monkeypatch.setattr(DynamicSieveLayer, "_reallocate", counting)
    new = 12
    with apply(model, "streamingllm", backend="torch", params=dict(budget=64, sinks=4)) as session:
        model.generate(random_prompt(100, seed=44), max_new_tokens=new, do_sample=False)
    assert session.last_cache.kv_lengths() == [64] * 3
    layers = model.config.num_hidden_layers
    # prefill may allocate and shrink once per layer; decoding a budget-sized cache needs no new storage
    assert len(calls) <= 3 * layers, f"{len(calls)} reallocations for {new} decode steps: {calls}"


# ------------------------------------------------------------------------------------------- invariants
#: decimal ratios: the expected budget is computed exactly (Fraction), independently of float rounding
RATIOS = ("0.05", "0.1", "0.25", "0.3", "0.5", "0.7", "1")


def expected_budget(n: int, sinks: int, ratio: str | None, budget: int | None) -> int:
    """The tokens a row of ``n`` real prompt tokens holds at most: ``budget``, or ``ceil(ratio * n)`` of its own
    length (never fewer than ``sinks + 1``)."""
    return budget if ratio is None else max(math.ceil(Fraction(ratio) * n), sinks + 1)


@st.composite
def streamingllm_runs(draw):
    """``(lengths, params, new, seed)``: a left-padded batch of 1 to 3 rows, sinks, a ratio or a budget."""
    lengths = draw(st.lists(st.integers(1, 40), min_size=1, max_size=3))
    sinks = draw(st.integers(0, 6))
    if draw(st.booleans()):
        params = dict(ratio=draw(st.sampled_from(RATIOS)), budget=None, sinks=sinks)
    else:
        params = dict(ratio=None, budget=draw(st.integers(sinks + 1, 44)), sinks=sinks)
    return lengths, params, draw(st.integers(1, 8)), draw(st.integers(0, 2**16))


def compressor_params(params: dict) -> dict:
    """The drawn parameters as the compressor takes them (the ratio a float, no None)."""
    return {k: (float(v) if k == "ratio" else v) for k, v in params.items() if v is not None}


class InvariantWatcher:
    """Checks StreamingLLM's invariants after every forward, per row and KV head: the row's first ``sinks`` real
    positions and its most recent ones are kept, ``min(budget, tokens so far)`` in all, no padding, sorted
    unique positions."""

    def __init__(self, session, lengths, params):
        self.session, self.lengths, self.params, self.steps = session, lengths, params, 0

    def __call__(self, input_ids, scores):
        self.check(input_ids.shape[1])  # every token of input_ids has been fed by now
        return scores

    def check(self, seen: int) -> None:
        """Check the cache after ``seen`` tokens (padding included) were fed."""
        width, sinks = max(self.lengths), self.params["sinks"]
        for idx, layer in enumerate(self.session.last_cache.layers):
            assert layer.seen == seen
            for b, n in enumerate(self.lengths):
                pad = width - n
                budget = expected_budget(n, sinks, self.params["ratio"], self.params["budget"])
                real = seen - pad  # the row's tokens so far
                recent = min(budget - sinks, real)
                for head in range(layer.keys.shape[1]):
                    at = f"step {self.steps}, layer {idx}, row {b} ({n} tokens, {pad} padding, budget {budget}), "
                    at += f"KV head {head}"
                    live = live_positions(layer, b, head)
                    assert len(live) == min(budget, real), f"{at}: {len(live)} kept of {real}: {live}"
                    assert live == sorted(set(live)), f"{at}: positions not sorted and unique: {live}"
                    assert min(live) >= pad, f"{at}: a padding position is kept: {live}"
                    assert live[: min(sinks, real)] == list(range(pad, pad + min(sinks, real))), (
                        f"{at}: the first {sinks} real positions are the sinks: {live}"
                    )
                    assert live[len(live) - recent :] == list(range(seen - recent, seen)), (
                        f"{at}: the {recent} most recent positions must be kept: {live}"
                    )
        self.steps += 1


@settings(max_examples=50, deadline=None)
@given(run=streamingllm_runs())
def test_sinks_recent_and_budget_invariants_on_padded_batches(llama, run):
    """After prefill and after every decode step, per row and KV head: the sinks, the most recent tokens,
    ``min(budget, tokens so far)`` in all (a ratio resolved against the row's own prompt length), no padding."""
    model, tok = llama
    lengths, params, new, seed = run
    input_ids, attention_mask, _ = left_padded(tok, lengths, seed=seed)
    with apply(model, "streamingllm", backend="torch", params=compressor_params(params)) as session:
        watcher = InvariantWatcher(session, lengths, params)
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
@given(run=streamingllm_runs())
def test_sinks_recent_and_budget_invariants_on_the_fast_path(llama, run):
    """The same invariants after a fast-path generation (static cache, no CUDA graph on the CPU)."""
    model, tok = llama
    lengths, params, new, seed = run
    input_ids, attention_mask, _ = left_padded(tok, lengths, seed=seed)
    with apply(model, "streamingllm", backend="torch", params=compressor_params(params)) as session:
        with torch.inference_mode():
            fast_generate(
                model, input_ids, attention_mask, session, max_new_tokens=new, min_new_tokens=new, do_sample=False
            )
    InvariantWatcher(session, lengths, params).check(input_ids.shape[1] + new - 1)
