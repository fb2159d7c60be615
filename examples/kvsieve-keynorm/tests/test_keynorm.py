"""kvsieve-keynorm's own tests: kvsieve's conformance kit on the policy, then the plugin through kvsieve.

Run with the package installed (``pip install -e 'examples/kvsieve-keynorm[test]'``): ``pytest`` loads
kvsieve's pytest plugin, which provides the ``kvsieve_registry``, ``tiny_model`` and ``tiny_batch`` fixtures.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from kvsieve_keynorm import KeyNormCompressor, KeyNormScoring

from kvsieve.integration import generate
from kvsieve.testing import assert_scoring_conforms, check_scoring
from kvsieve.testing import strategies as kst


def test_scoring_conforms():
    assert_scoring_conforms(KeyNormScoring(), dtypes=(torch.float32, torch.bfloat16), max_examples=25)


@settings(max_examples=25, deadline=None)
@given(case=kst.caches())
def test_scores_are_negated_key_norms(case):
    scores = check_scoring(KeyNormScoring(), case)
    for b, j in itertools.product(*map(range, case.starts.shape)):
        cs, ce = int(case.cand_starts[b, j]), int(case.cand_ends[b, j])
        expected = -case.keys[b, j, cs:ce].norm(dim=-1)
        torch.testing.assert_close(scores[b, j, : ce - cs], expected)


def test_discovered_from_its_distribution(kvsieve_registry):
    for kind in ("scoring", "compressor"):
        entry = kvsieve_registry.get(kind, "keynorm")
        assert entry.source.distribution.startswith("kvsieve-keynorm ")
        assert entry.source.entry_point == "keynorm = kvsieve_keynorm.keynorm"
    assert isinstance(kvsieve_registry.create("compressor", "keynorm", ratio=0.25), KeyNormCompressor)


@pytest.mark.parametrize(
    ("compressor", "params"),
    [("keynorm", {"ratio": 0.5, "window": 4}), ("snapkv", {"scoring": "keynorm", "window": 4, "ratio": 0.5})],
)
def test_generates_with_a_smaller_cache(tiny_model, tiny_batch, compressor, params):
    model, _ = tiny_model
    new = 4
    ids, mask = tiny_batch.input_ids, tiny_batch.attention_mask
    options = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    full = generate(model, ids, mask, **options)
    out = generate(model, ids, mask, compressor=compressor, params=params, **options)
    assert out.sequences.shape == full.sequences.shape
    budget = -(-out.prompt_tokens // 2)  # ceil(0.5 * prompt)
    assert out.kv_lengths == [budget + new - 1] * model.config.num_hidden_layers
    assert max(out.kv_lengths) < max(full.kv_lengths)


def test_bad_parameters_name_the_argument():
    with pytest.raises(ValueError, match="ratio"):
        KeyNormCompressor(ratio=1.5)
    with pytest.raises(ValueError, match="budget=4 must exceed window=8"):
        KeyNormCompressor(budget=4)
