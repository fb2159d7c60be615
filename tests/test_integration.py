"""kvsieve's HF integration: ``apply`` and ``generate`` with ``model.generate`` on every supported family.

Pinned here: exactness when the budget covers the whole sequence (token-identical greedy output and per-step
logits equal to plain HF sdpa generation), greedy/sampling/left-padded batches/num_return_sequences, a fresh
cache per generate call, the model restored after ``apply``, refusals before any work (right padding,
unsupported models, unknown names, bad parameters, prompts past the context, unavailable backends), and the
memory report.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import FAMILIES, left_padded, random_prompt
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    T5Config,
    T5ForConditionalGeneration,
)

from kvsieve import models
from kvsieve.cache import SieveCache
from kvsieve.integration import (
    GenerationResult,
    UnsupportedModelError,
    apply,
    generate,
    resolve_backend,
    resolve_compressor,
)
from kvsieve.params import flatten
from kvsieve.plugins import UnknownNameError

PROMPT, NEW = 32, 6
GREEDY = dict(max_new_tokens=NEW, do_sample=False)
SCORED = dict(GREEDY, output_scores=True, return_dict_in_generate=True)
LOGIT_ATOL = 1e-4


def _assert_same_generation(out, ref):
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores) == NEW
    for step, (a, b) in enumerate(zip(out.scores, ref.scores)):
        torch.testing.assert_close(a, b, atol=LOGIT_ATOL, rtol=0, msg=lambda m, s=step: f"step {s}: {m}")


# ------------------------------------------------------------------------------------------------- exactness
# every compressor whose budget covers the whole sequence must not change a single logit
COVERING = [
    ("none", {}),
    ("snapkv", dict(budget=PROMPT, window=8)),  # budget == prompt: nothing to evict
    ("snapkv", dict(budget=PROMPT + 20, window=8)),
    ("snapkv", dict(ratio=1.0, window=8)),
    ("streamingllm", dict(budget=PROMPT + NEW, sinks=4)),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_covering_budget_is_exact(tiny_models, family):
    model, _ = tiny_models[family]
    ids = random_prompt(PROMPT, seed=1)
    ref = model.generate(ids, **SCORED)  # plain HF, sdpa, no kvsieve
    for name, params in COVERING:
        with apply(model, name, backend="torch", params=params) as engine:
            out = model.generate(ids, **SCORED)
        assert isinstance(engine.last_cache, SieveCache), name
        assert engine.last_cache.kv_lengths() == [PROMPT + NEW - 1] * model.config.num_hidden_layers, name
        _assert_same_generation(out, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_matches_each_prompt_alone(tiny_models, family):
    model, tok = tiny_models[family]
    lengths = [40, 13, 27]
    input_ids, attention_mask, rows = left_padded(tok, lengths, seed=10)
    with apply(model, "none", backend="torch") as engine:
        batch = model.generate(input_ids=input_ids, attention_mask=attention_mask, **SCORED)
        cache = engine.last_cache
        singles = [model.generate(row[None], **GREEDY) for row in rows]
    ref = model.generate(input_ids=input_ids, attention_mask=attention_mask, **SCORED)
    _assert_same_generation(batch, ref)
    for i, single in enumerate(singles):
        assert torch.equal(batch.sequences[i, -NEW:], single[0, -NEW:]), f"row {i}"
    pads = [max(lengths) - n for n in lengths]
    for layer in cache.layers:  # `none` keeps the padding slots but outside the live range
        assert layer.starts[:, 0].tolist() == pads


def test_left_padded_batch_with_covering_snapkv_and_streamingllm_is_exact(llama):
    """Dropping the padding (what a covering compressor still does) must not change any logit."""
    model, tok = llama
    input_ids, attention_mask, _ = left_padded(tok, [30, 9, 21], seed=20)
    ref = model.generate(input_ids=input_ids, attention_mask=attention_mask, **SCORED)
    for name, params in [
        ("snapkv", dict(budget=30, window=4)),
        ("streamingllm", dict(budget=30 + NEW, sinks=2)),
    ]:
        with apply(model, name, backend="torch", params=params) as engine:
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **SCORED)
        _assert_same_generation(out, ref)
        for layer in engine.last_cache.layers:
            assert layer.starts.eq(0).all(), name  # the padding is gone
            assert (layer.ends - layer.starts)[:, 0].tolist() == [n + NEW - 1 for n in (30, 9, 21)], name


# -------------------------------------------------------------------------------------------- generate modes
def test_sampling_is_reproducible_and_matches_hf(llama):
    model, _ = llama
    ids = random_prompt(24, seed=3)
    kwargs = dict(max_new_tokens=NEW, do_sample=True, top_k=0, temperature=1.0)
    runs = []
    with apply(model, "none", backend="torch"):
        for _ in range(2):
            torch.manual_seed(1234)
            runs.append(model.generate(ids, **kwargs))
    torch.manual_seed(1234)
    ref = model.generate(ids, **kwargs)
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], ref)  # same logits (within 1e-7) and same random draws


def test_num_return_sequences_with_sampling_on_a_padded_batch(llama):
    model, tok = llama
    input_ids, attention_mask, _ = left_padded(tok, [36, 20], seed=4)
    kwargs = dict(max_new_tokens=NEW, do_sample=True, num_return_sequences=3)
    outs = []
    with apply(model, "snapkv", backend="torch", params=dict(budget=16, window=4)) as engine:
        for _ in range(2):
            torch.manual_seed(7)
            outs.append(model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs))
    assert outs[0].shape == (6, 36 + NEW)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][:, :36], input_ids.repeat_interleave(3, dim=0))
    for layer in engine.last_cache.layers:
        assert layer.keys.shape[0] == 6
        assert (layer.ends - layer.starts).eq(16 + NEW - 1).all()


def test_beam_search_reorders_the_cache(llama):
    model, _ = llama
    ids = random_prompt(24, batch=2, seed=14)
    kwargs = dict(max_new_tokens=NEW, num_beams=3, do_sample=False)
    ref = model.generate(ids, **kwargs)
    for name, params in [("none", {}), ("snapkv", dict(budget=24, window=4))]:
        with apply(model, name, backend="torch", params=params):
            assert torch.equal(model.generate(ids, **kwargs), ref), name


def test_two_generate_calls_in_a_row_use_fresh_caches(llama):
    model, _ = llama
    ids = random_prompt(30, seed=5)
    with apply(model, "snapkv", backend="torch", params=dict(budget=12, window=4)) as engine:
        first = model.generate(ids, **GREEDY)
        first_cache = engine.last_cache
        second = model.generate(ids, **GREEDY)
        second_cache = engine.last_cache
    assert torch.equal(first, second)
    assert first_cache is not second_cache
    assert second_cache.layers[0].seen == 30 + NEW - 1 and second_cache.layers[0].compactions == 1


def test_use_cache_false_inside_apply_is_plain_attention(llama):
    model, _ = llama
    ids = random_prompt(20, seed=6)
    ref = model(ids, use_cache=False).logits
    with apply(model, "snapkv", backend="torch", params=dict(budget=8, window=4)):
        out = model(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------- restoring the model
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_model_is_restored_after_apply(implementation):
    model, _ = models.load("tiny-random-qwen2", attn_implementation=implementation)
    ids = random_prompt(16, seed=7)
    ref = model.generate(ids, **SCORED)
    with apply(model, "snapkv", backend="torch", params=dict(budget=8, window=4)):
        assert model.config._attn_implementation == "kvsieve"
    assert model.config._attn_implementation == implementation
    assert not model._forward_pre_hooks
    after = model.generate(ids, **SCORED)
    assert not isinstance(after.past_key_values, SieveCache)
    _assert_same_generation(after, ref)


def test_model_is_restored_when_the_body_raises(llama):
    model, _ = llama
    with pytest.raises(RuntimeError, match="boom"):
        with apply(model, "none", backend="torch"):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert not model._forward_pre_hooks


# -------------------------------------------------------------------------------------------------- refusals
def test_right_padding_is_refused(llama):
    model, tok = llama
    input_ids, attention_mask, rows = left_padded(tok, [20, 11], seed=8)
    right_ids = torch.full_like(input_ids, tok.pad_token_id)
    right_mask = torch.zeros_like(attention_mask)
    for i, row in enumerate(rows):
        right_ids[i, : len(row)], right_mask[i, : len(row)] = row, 1
    with apply(model, "none", backend="torch"):
        with pytest.raises(ValueError, match=r"(?i)left padding.*padding_side"):
            model.generate(input_ids=right_ids, attention_mask=right_mask, **GREEDY)
    assert model.config._attn_implementation == "sdpa"


def _tiny_t5():
    config = T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    return T5ForConditionalGeneration(config)


def _tiny_gpt2():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = GPT2Config(
            vocab_size=64,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        return GPT2LMHeadModel(config).eval()


def _sliding_mistral():
    config = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        sliding_window=4096,
    )
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    "make, match",
    [
        (_tiny_t5, r"'t5'.*encoder-decoder.*decoder-only"),
        (_sliding_mistral, r"'mistral'.*sliding.window.*sliding_window=4096"),
        (_tiny_gpt2, r"'gpt2' is not supported.*llama.*allow_unsupported=True"),
    ],
    ids=["encoder-decoder", "sliding-window", "unknown-type"],
)
def test_unsupported_models_are_refused_before_any_work(make, match):
    model = make()
    before = model.config._attn_implementation
    with pytest.raises(UnsupportedModelError, match=match):
        with apply(model, "none", backend="torch"):
            pytest.fail("apply must refuse before entering")
    assert model.config._attn_implementation == before
    assert not model._forward_pre_hooks


def test_allow_unsupported_lets_an_unknown_type_through():
    model = _tiny_gpt2()
    ids = random_prompt(20, seed=9) % 64
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kwargs)
    with apply(model, "none", backend="torch", allow_unsupported=True) as engine:
        out = model.generate(ids, **kwargs)
    assert torch.equal(out, ref)
    assert engine.last_cache.kv_lengths() == [20 + 4 - 1] * 2


@pytest.mark.parametrize(
    "compressor, backend, kind, suggestion",
    [
        ("snapk", "torch", "compressor", "snapkv"),
        ("none", "troch", "backend", "torch"),
        ("streaming", "torch", "compressor", "streamingllm"),
    ],
)
def test_unknown_names_suggest_the_closest(llama, compressor, backend, kind, suggestion):
    model, _ = llama
    with pytest.raises(
        UnknownNameError,
        match=rf"unknown {kind} '{compressor if kind == 'compressor' else backend}'"
        rf"\. Did you mean '{suggestion}'.*Available:",
    ):
        with apply(model, compressor, backend=backend):
            pytest.fail("apply must refuse before entering")
    assert model.config._attn_implementation == "sdpa"


INVALID_PARAMS = [
    ("snapkv", dict(ratio=0.0), r"ratio.*\(0, 1\].*0\.0"),
    ("snapkv", dict(ratio=1.5), r"ratio.*\(0, 1\].*1\.5"),
    ("snapkv", dict(ratio=-0.2), r"ratio.*-0\.2"),
    ("snapkv", dict(budget=8, window=8), r"budget=8.*window=8"),
    ("snapkv", dict(budget=4, window=8), r"budget=4.*window=8"),
    ("snapkv", dict(budget=-5), r"budget.*-5"),
    ("snapkv", dict(budget=0), r"budget.*\b0\b"),
    ("snapkv", dict(budget=10.5), r"budget.*10\.5"),
    ("snapkv", dict(window=-1), r"window.*-1"),
    ("snapkv", {"scoring.kernel": 4}, r"kernel.*odd.*4"),  # pooling is the scoring policy's
    ("snapkv", {"scoring.kernel": -3}, r"kernel.*-3"),
    ("snapkv", {"scoring": {"pooling": "mean"}}, r"pooling.*'mean'"),
    ("snapkv", dict(ratio=0.5, budget=64), r"ratio or budget.*ratio=0\.5.*budget=64"),
    ("streamingllm", dict(budget=4, sinks=4), r"budget=4.*sinks=4"),
    ("streamingllm", dict(budget=-1), r"budget.*-1"),
    ("streamingllm", dict(sinks=-2), r"sinks.*-2"),
    ("streamingllm", dict(ratio=2.0), r"ratio.*\(0, 1\].*2\.0"),
    ("streamingllm", dict(ratio=0.5, budget=64), r"ratio or budget.*ratio=0\.5.*budget=64"),
]


@pytest.mark.parametrize(
    "name, params, match",
    INVALID_PARAMS,
    ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in flatten(p).items())}" for n, p, _ in INVALID_PARAMS],
)
def test_invalid_parameters_name_the_argument_and_value(llama, name, params, match):
    with pytest.raises(ValueError, match=match):
        resolve_compressor(name, params)
    model, _ = llama
    with pytest.raises(ValueError, match=match):
        with apply(model, name, backend="torch", params=params):
            pytest.fail("apply must refuse before entering")
    assert model.config._attn_implementation == "sdpa"


def test_parameters_for_a_compressor_instance_are_refused():
    instance = resolve_compressor("snapkv", dict(budget=16, window=4))
    assert resolve_compressor(instance) is instance
    with pytest.raises(ValueError, match="either to the compressor instance or as params"):
        resolve_compressor(instance, dict(budget=8))


def test_prompt_longer_than_the_context_is_refused_before_work(llama):
    model, _ = llama
    limit = model.config.max_position_embeddings
    ids = random_prompt(limit + 1, seed=11)
    calls = []
    handle = model.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with apply(model, "snapkv", backend="torch", params=dict(budget=64, window=8)):
            with pytest.raises(ValueError, match=rf"{limit + 1} tokens.*max_position_embeddings={limit}"):
                model.generate(ids, max_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
    assert not calls  # refused in the outer forward's pre-hook: the decoder never ran


def test_backend_unavailable_on_this_device_is_refused(llama, monkeypatch):
    if importlib.util.find_spec("kvsieve.backends.triton") is None:
        pytest.skip("the triton backend module is absent")
    if torch.cuda.is_available():
        pytest.skip("triton is available on this machine (CUDA)")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CI sets it for the triton tests
    with pytest.raises(ValueError, match=r"backend 'triton' cannot be used here: .*(CUDA|not installed)"):
        resolve_backend("triton", torch.device("cpu"), torch.float32)
    model, _ = llama
    with pytest.raises(ValueError, match=r"'triton' cannot be used here"):
        with apply(model, "none", backend="triton"):
            pytest.fail("apply must refuse before entering")
    assert model.config._attn_implementation == "sdpa"


def test_auto_backend_on_cpu_is_usable():
    assert resolve_backend("auto", torch.device("cpu"), torch.float32).supports(
        torch.device("cpu"), torch.float32
    )[0]


# ---------------------------------------------------------------------------------------------------- memory
LONG = 300  # several capacity granules (64 slots), so a shrink is visible in the allocated bytes


def _slot_bytes(model) -> int:
    """K + V bytes of one cache slot of one layer, for the whole batch of one row."""
    config = model.config
    return 2 * config.num_key_value_heads * config.head_dim * 4  # fp32


def test_snapkv_really_frees_memory_and_reports_it(llama):
    model, _ = llama
    ids = random_prompt(LONG, seed=12)
    layers = model.config.num_hidden_layers
    full = generate(model, ids, compressor="none", backend="torch", **GREEDY)
    snap = generate(
        model, ids, compressor="snapkv", backend="torch", params=dict(budget=32, window=8), **GREEDY
    )
    for result in (full, snap):
        assert isinstance(result, GenerationResult)
        assert result.prompt_tokens == LONG and result.generated_tokens == NEW
        assert result.sequences.shape == (1, LONG + NEW)
        assert result.backend == "torch"
        assert result.seconds > 0 and result.tokens_per_s == pytest.approx(NEW / result.seconds)
        assert result.kv_bytes_peak >= result.kv_bytes > 0
    assert full.kv_lengths == [LONG + NEW - 1] * layers
    assert snap.kv_lengths == [32 + NEW - 1] * layers
    assert snap.compressor == {
        "name": "snapkv",
        "ratio": None,
        "budget": 32,
        "window": 8,
        "scoring": {
            "name": "window_attention",
            "pooling": "avg",
            "kernel": 7,
            "aggregation": "group",
            "normalization": "visible",
        },
        "selection": {"name": "topk"},
    }
    assert full.compressor == {"name": "none"}
    slot = _slot_bytes(model)
    assert full.kv_bytes >= layers * (LONG + NEW - 1) * slot
    # allocated, not masked: at most one 64-slot granule of headroom above what is kept
    assert snap.kv_bytes <= layers * 64 * slot < full.kv_bytes / 4
    assert snap.kv_bytes_peak < full.kv_bytes_peak


def test_snapkv_ratio_budget_and_live_bytes(llama):
    model, _ = llama
    ids = random_prompt(LONG, seed=13)
    with apply(model, "snapkv", backend="torch", params=dict(ratio=0.1, window=8)) as engine:
        model.generate(ids, **GREEDY)
    cache = engine.last_cache
    kept = -(-LONG // 10)  # ceil(0.1 * 300) = 30
    assert cache.kv_lengths() == [kept + NEW - 1] * model.config.num_hidden_layers
    assert cache.live_nbytes() == model.config.num_hidden_layers * (kept + NEW - 1) * _slot_bytes(model)
    assert cache.nbytes() >= cache.live_nbytes()
