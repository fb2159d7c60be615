"""Every row of a left-padded batch is compressed as it would be alone: a ratio resolves against the row's real
length, so its tokens equal running the row by itself (every built-in compressor, eager and fast path)."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded

from kvsieve.integration import generate

COMPRESSORS = [
    ("none", {}),
    ("snapkv", {"ratio": 0.3, "window": 4}),
    ("streamingllm", {"ratio": 0.4, "sinks": 2}),
    ("rpc", {"interval": 8, "window": 2, "ratio": 0.5}),
    ("h2o", {"ratio": 0.4, "window": 3}),
    ("h2o", {"ratio": 0.5, "block": 3, "aggregation": "all"}),
    ("tova", {"ratio": 0.4}),
    ("tova", {"ratio": 0.5, "window": 2, "block": 3}),
    ("fastkv", {"tsp_rate": 0.5, "ratio": 0.3, "window": 4}),
    ("fastkv+rpc", {"fastkv.tsp_rate": 0.5, "fastkv.ratio": 0.3, "fastkv.window": 4, "rpc.interval": 8,
                    "rpc.window": 2, "rpc.ratio": 0.5}),
]
NEW = 14


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fast"])
@pytest.mark.parametrize("name, params", COMPRESSORS, ids=[c[0] for c in COMPRESSORS])
def test_each_row_equals_running_it_alone(llama, name, params, fast):
    model, tok = llama
    ids, mask, rows = left_padded(tok, [41, 26, 13], seed=21)
    kwargs = dict(compressor=name, params=params, backend="torch", fast=fast, max_new_tokens=NEW,
                  min_new_tokens=NEW, do_sample=False)
    batch = generate(model, ids, mask, **kwargs)
    pads = [ids.shape[1] - len(row) for row in rows]
    for b, row in enumerate(rows):
        alone = generate(model, row[None], **kwargs)
        assert torch.equal(batch.sequences[b, pads[b]:], alone.sequences[0]), (name, b)
    # the batch's cache holds what the longest row alone would: the others hold less (their own budgets)
    longest = generate(model, rows[0][None], **kwargs)
    assert batch.kv_lengths == longest.kv_lengths
