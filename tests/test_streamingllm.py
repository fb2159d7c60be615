"""StreamingLLM: the first ``sinks`` tokens plus the most recent ones, ``budget`` in all, after every forward.

Two views are pinned: the cache (after every step the live positions are exactly the sinks and the most
recent tokens, never more than ``budget``), and the model output (every step's logits equal plain HF attention
over the full cache with a 2D attention mask that hides exactly the evicted tokens: so the right K/V data was
kept, in the right slots, with their original positions).
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, left_padded, random_prompt
from transformers import DynamicCache, LogitsProcessorList

from kvsieve.cache import DynamicSieveLayer
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
