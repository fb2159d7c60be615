"""apply is refused where it cannot be right (nested on one model, a forward from another thread), the model is
always restored, and bad inputs to the Python API are one clear error before any work."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import left_padded

from kvsieve import models
from kvsieve.integration import apply, generate


def plain_tokens(model, ids, mask):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)


def test_nested_apply_is_refused_and_the_outer_one_still_works(llama):
    model, tok = llama
    ids, mask, _ = left_padded(tok, [20, 11], seed=4)
    before = plain_tokens(model, ids, mask)
    with apply(model, "snapkv", "torch", params={"ratio": 0.5, "window": 4}) as outer:
        with pytest.raises(RuntimeError, match="already active on this model.*compressor 'snapkv'.*nested"):
            with apply(model, "rpc", "torch"):
                pass
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3)
        assert outer.last_cache is not None and outer.compressor.name == "snapkv"
        assert model.config._attn_implementation == "kvsieve"
    assert model.config._attn_implementation != "kvsieve"
    assert torch.equal(plain_tokens(model, ids, mask), before), "a plain generate after apply is unchanged"


def test_a_forward_from_another_thread_is_refused_and_the_model_restored(llama):
    model, tok = llama
    ids, mask, _ = left_padded(tok, [20, 11], seed=4)
    before = plain_tokens(model, ids, mask)
    errors = []

    def other_thread():
        try:
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3)
        except RuntimeError as exc:
            errors.append(str(exc))

    def second_apply():
        try:
            with apply(model, "rpc", "torch"):
                errors.append("second apply entered")
        except RuntimeError as exc:
            errors.append(str(exc))

    with apply(model, "snapkv", "torch"):
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        thread = threading.Thread(target=second_apply)
        thread.start()
        thread.join()
    assert errors and "another thread" in errors[0]
    assert len(errors) == 2 and "already active" in errors[1], "a second apply from another thread is refused"
    assert model.config._attn_implementation != "kvsieve"
    assert torch.equal(plain_tokens(model, ids, mask), before)


def test_two_threads_on_two_models_match_sequential_runs():
    loaded = [models.load("tiny-random-llama")[0] for _ in range(2)]  # loading seeds torch's global generator
    prompts = [torch.randint(3, 250, (1, 30), generator=torch.Generator().manual_seed(9 + k)) for k in range(2)]

    def run(k):
        return generate(loaded[k], prompts[k], compressor="snapkv", backend="torch", params={"ratio": 0.5},
                        max_new_tokens=5, do_sample=False).sequences

    sequential = [run(k) for k in range(2)]
    threaded = {}
    threads = [threading.Thread(target=lambda k=k: threaded.__setitem__(k, run(k))) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(threaded[k], sequential[k]) for k in range(2))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(input_ids=torch.ones(5, dtype=torch.long)), TypeError, r"shape \[batch, length\].*input_ids\[None\]"),
    (dict(input_ids=torch.ones(1, 0, dtype=torch.long)), ValueError, "input_ids is empty"),
    (dict(input_ids=torch.ones(1, 5)), TypeError, "integer tensor"),
    (dict(input_ids=[[1, 2, 3]]), TypeError, "integer tensor"),
    (dict(attention_mask=torch.ones(2, 9, dtype=torch.long)), ValueError, r"attention_mask has shape \(2, 9\)"),
    (dict(attention_mask=torch.ones(2, 11, dtype=torch.long)), ValueError, r"attention_mask has shape \(2, 11\)"),
    (dict(attention_mask=torch.ones(1, 10, dtype=torch.long)), ValueError, r"attention_mask has shape \(1, 10\)"),
    (dict(attention_mask=torch.full((2, 10), 2)), ValueError, "only 0"),
    (dict(attention_mask=torch.zeros(2, 10, dtype=torch.long)), ValueError, "no token"),
    (dict(backend=None), TypeError, "backend must be"),
    (dict(compressor=None), TypeError, "compressor must be"),
    (dict(compressor="snapkv", params="ratio=0.2"), TypeError, "params must be a dict"),
    (dict(compressor="snapkv", params={"scoring": 3}), TypeError, "scoring must be the name"),
    (dict(compressor="snapkv", params={"selection": 3}), TypeError, "selection must be the name"),
])
def test_bad_api_inputs_fail_before_any_work(llama, kwargs, error, match):
    model, _ = llama
    args = {"input_ids": torch.randint(3, 250, (2, 10)), **kwargs}
    with pytest.raises(error, match=match):
        generate(model, max_new_tokens=2, **args)


def test_an_empty_prompt_inside_apply_is_refused(llama):
    model, _ = llama
    with apply(model, "snapkv", "torch"), pytest.raises(ValueError, match="prompt is empty"):
        model(input_ids=torch.ones(1, 0, dtype=torch.long), use_cache=True)


@pytest.mark.parametrize("text, match", [
    ('{"model_type": "llama", "num_hidden_layers": ', "cannot read the model config.*valid JSON"),
    ('{"model_type": "llama", "num_hidden_layers": "three"}', "cannot read the model config.*num_hidden_layers"),
    ('{"hidden_size": 64}', "cannot read the model config.*model_type"),
])
def test_a_corrupt_or_wrongly_typed_config_is_a_clear_error(tmp_path, text, match):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(models.ModelNotFoundError, match=match):
        models.load(str(tmp_path))
    with pytest.raises(models.ModelNotFoundError, match="no config.json"):
        models.load(str(tmp_path.parent))
