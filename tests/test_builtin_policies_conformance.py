"""The built-in policies and the torch reference backend, through kvsieve's own testing kit.

The torch backend defines the semantics every other backend is checked against, so it is checked here against
:class:`NaiveBackend`: each primitive's docstring formula written out literally, one (row, head, query) at a
time, reading only the slots the formula names (so poisoned slots cannot reach it), in float64.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import kvsieve
from kvsieve.backend import KVBackend
from kvsieve.backends.torch_ref import TorchBackend
from kvsieve.plugins import registry
from kvsieve.policies.topk import TopKSelection
from kvsieve.policies.window_attention import WindowAttentionScoring
from kvsieve.testing import assert_backend_conforms, assert_scoring_conforms, assert_selection_conforms


def _softmax_weights(q: torch.Tensor, keys: list[torch.Tensor], scale: float) -> list[float]:
    logits = [scale * float(q @ k) for k in keys]
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    return [e / sum(exps) for e in exps]


class NaiveBackend(KVBackend):
    """``KVBackend``'s docstring formulas, literally (slow; tiny inputs only)."""

    name = "naive"

    def _attend(self, q, keys, values, visible, scale, dtype):
        if not visible:
            return torch.zeros_like(q, dtype=dtype)
        weights = _softmax_weights(q, [keys[s] for s in visible], scale)
        return sum(w * values[s] for w, s in zip(weights, visible)).to(dtype)

    def prefill_attention(self, queries, keys, values, attention_mask, scale):
        B, H, Q, d = queries.shape
        Hkv, K = keys.shape[1], keys.shape[2]
        q64, k64, v64 = queries.double(), keys.double(), values.double()
        out = torch.empty_like(queries)
        for b, h, i in itertools.product(range(B), range(H), range(Q)):
            j = h // (H // Hkv)
            if attention_mask is None:
                visible = list(range(K - Q + i + 1))
            else:
                visible = [k for k in range(K) if attention_mask[b, 0, i, k]]
            out[b, h, i] = self._attend(q64[b, h, i], k64[b, j], v64[b, j], visible, scale, queries.dtype)
        return out

    def decode_attention(self, queries, keys, values, starts, ends, scale):
        B, H, Q, d = queries.shape
        Hkv = keys.shape[1]
        q64, k64, v64 = queries.double(), keys.double(), values.double()
        out = torch.empty_like(queries)
        for b, h, i in itertools.product(range(B), range(H), range(Q)):
            j = h // (H // Hkv)
            visible = list(range(int(starts[b, j]), int(ends[b, j]) - Q + i + 1))
            out[b, h, i] = self._attend(q64[b, h, i], k64[b, j], v64[b, j], visible, scale, queries.dtype)
        return out

    def window_lse(self, queries, keys, starts, ends, scale):
        B, H, W, d = queries.shape
        Hkv = keys.shape[1]
        q64, k64 = queries.double(), keys.double()
        out = torch.empty(B, H, W, dtype=torch.float32)
        for b, h, w in itertools.product(range(B), range(H), range(W)):
            j = h // (H // Hkv)
            visible = range(int(starts[b, j]), int(ends[b, j]) - W + w + 1)
            logits = [scale * float(q64[b, h, w] @ k64[b, j, s]) for s in visible]
            top = max(logits, default=-math.inf)
            out[b, h, w] = top + math.log(sum(math.exp(x - top) for x in logits)) if logits else -math.inf
        return out.to(queries.device)

    def window_scores(self, queries, keys, cand_starts, cand_ends, scale, lse=None):
        B, H, W, d = queries.shape
        Hkv = keys.shape[1]
        G = H // Hkv
        counts = (cand_ends - cand_starts).clamp(min=0)
        N = int(counts.max()) if counts.numel() else 0
        q64, k64 = queries.double(), keys.double()
        out = torch.zeros(B, Hkv, N, dtype=torch.float64)
        for b, j in itertools.product(range(B), range(Hkv)):
            slots = range(int(cand_starts[b, j]), int(cand_ends[b, j]))
            for g, w in itertools.product(range(G), range(W)):
                h = j * G + g
                logits = [scale * float(q64[b, h, w] @ k64[b, j, s]) for s in slots]
                if not logits:
                    continue
                if lse is None:
                    top = max(logits)
                    norm = top + math.log(sum(math.exp(x - top) for x in logits))
                else:
                    norm = float(lse[b, h, w])
                for n, x in enumerate(logits):
                    out[b, j, n] += math.exp(x - norm)
        return out.float().to(queries.device)

    def compact(self, keys, values, keep, counts, dest_starts):
        B, Hkv = counts.shape
        for b, j in itertools.product(range(B), range(Hkv)):
            for i in range(int(counts[b, j])):  # ascending: a slot only moves towards the front
                dest, src = int(dest_starts[b, j]) + i, int(keep[b, j, i])
                keys[b, j, dest] = keys[b, j, src]
                values[b, j, dest] = values[b, j, src]


def _builtin_names(kind: str) -> list[str]:
    builtin = f"kvsieve {kvsieve.__version__}"
    return [entry.name for entry in registry().entries(kind) if entry.source.distribution == builtin]


# ------------------------------------------------------------------------------------------------ selection
def test_topk_conforms_nested_and_keeps_the_top_scores():
    assert_selection_conforms(TopKSelection(), nested=True, keeps_top_scores=True, max_examples=150)


@pytest.mark.parametrize("name", _builtin_names("selection"))
def test_every_builtin_selection_policy_conforms_with_its_defaults(name):
    assert_selection_conforms(registry().create("selection", name), max_examples=20)


# ------------------------------------------------------------------------------------------------ scoring
WINDOW_OPTIONS = [
    dict(pooling=pooling, kernel=kernel, aggregation=aggregation, normalization=normalization)
    for pooling, kernel in (("avg", 7), ("max", 3), ("none", 1))
    for aggregation in ("group", "all")
    for normalization in ("candidates", "visible")
]


@pytest.mark.parametrize("options", WINDOW_OPTIONS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_window_attention_conforms(options):
    policy = WindowAttentionScoring(**options)
    # "visible" normalises over every key a window query sees: defined for prefill windows only
    last = True if options["normalization"] == "visible" else None
    assert_scoring_conforms(policy, queries_are_last=last, max_examples=15)


@pytest.mark.parametrize("name", _builtin_names("scoring"))
def test_every_builtin_scoring_policy_conforms_with_its_defaults(name):
    """Prefill windows (the last live tokens' queries) suit every policy, whatever its normalisation."""
    assert_scoring_conforms(registry().create("scoring", name), queries_are_last=True, max_examples=15)


def test_window_attention_conforms_in_bfloat16():
    assert_scoring_conforms(WindowAttentionScoring(), dtypes=(torch.bfloat16,), max_examples=15)


# ------------------------------------------------------------------------------------------------ backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_backend_matches_the_naive_formulas(dtype):
    assert_backend_conforms(TorchBackend(), reference=NaiveBackend(), dtypes=(dtype,), max_examples=20)
