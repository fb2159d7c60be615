"""A straightforward dense H2O and TOVA, and a driver that runs a kvsieve compressor on one layer of random tensors.

The reference keeps, per row and KV head, a plain list of the token indices it holds and a dict of their
accumulated attention; every softmax is written out over exactly the tokens held, in float64. The driver feeds the
same random post-RoPE queries and keys to a :class:`~kvsieve.cache.DynamicSieveLayer` and hands the compressor the
events the engine would (prefill with the forward's queries, then one decode event per appended token), so the
kept tokens (``positions``) and side buffers can be compared with the reference after every step.
"""

from __future__ import annotations

import math

import torch

from kvsieve.backends.torch_ref import TorchBackend
from kvsieve.cache import DynamicSieveLayer
from kvsieve.compressor import LayerEvent

SCALE = 0.5


class DrivenLayer:
    """One layer of ``B`` rows (row ``b`` has ``pads[b]`` left-padding tokens) fed random tokens.

    ``Q[b, h, t]`` and ``K[b, j, t]`` are the query and key of token ``t`` (padding included), drawn up front for
    ``Lp + steps`` tokens.
    """

    def __init__(self, compressor, *, B: int, H: int, Hkv: int, d: int, Lp: int, pads: list[int], steps: int,
                 seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        T = Lp + steps
        self.Q, self.K = torch.randn(B, H, T, d, generator=gen), torch.randn(B, Hkv, T, d, generator=gen)
        self.V = torch.randn(B, Hkv, T, d, generator=gen)
        self.compressor, self.Lp, self.pads, self.t = compressor, Lp, pads, 0
        self.layer = DynamicSieveLayer(compressor.query_window)

    def _event(self, phase: str, queries: torch.Tensor | None) -> LayerEvent:
        layer = self.layer
        return LayerEvent(phase=phase, layer=layer, layer_idx=0, num_layers=1, engine=None, backend=TorchBackend(),
                          scale=SCALE, generated=layer.seen - layer.prompt_len,
                          query_window=self.compressor.query_window, reserve=self.compressor.reserve,
                          queries=queries)

    def prefill(self) -> None:
        Lp, layer = self.Lp, self.layer
        q = self.Q[:, :, :Lp]
        layer.update(self.K[:, :, :Lp], self.V[:, :, :Lp])
        layer.push_queries(q)
        B, Hkv = layer.ends.shape
        layer.begin_prompt(torch.tensor(self.pads)[:, None].expand(B, Hkv), tuple(Lp - p for p in self.pads))
        self.compressor.after_attention(self._event("prefill", q))
        self.t = Lp

    def step(self, with_queries: bool = True) -> None:
        """Append the next token; its decode event carries the forward's queries unless ``with_queries`` is False
        (the fast path's between-step events)."""
        t = self.t
        q = self.Q[:, :, t : t + 1]
        self.layer.update(self.K[:, :, t : t + 1], self.V[:, :, t : t + 1])
        self.layer.push_queries(q)
        self.compressor.after_attention(self._event("decode", q if with_queries else None))
        self.t += 1

    def kept(self, b: int, j: int) -> list[int]:
        layer = self.layer
        return layer.positions[b, j, layer.starts[b, j] : layer.ends[b, j]].tolist()

    def slot_values(self, name: str, b: int, j: int) -> list[float]:
        layer = self.layer
        return layer.slot_buffer(name)[b, j, layer.starts[b, j] : layer.ends[b, j]].tolist()


class DenseEviction:
    """H2O (``accumulate=True``) or TOVA (``accumulate=False``), written out over lists of held tokens.

    Args:
        Q, K: the driver's tokens. budgets, windows: per row. block: evict at ``budget + block``, down to budget.
        aggregation: ``"group"`` (per KV head, summed over its GQA group) or ``"all"`` (summed over KV heads).
    """

    def __init__(self, Q, K, pads, Lp, budgets, windows, block, aggregation, accumulate):
        self.Q, self.K, self.pads, self.Lp = Q.double(), K.double(), pads, Lp
        self.budgets, self.windows, self.block = budgets, windows, block
        self.aggregation, self.accumulate = aggregation, accumulate
        B, H, _, _ = Q.shape
        self.Hkv = K.shape[1]
        self.G = H // self.Hkv
        self.held = [[list(range(pads[b], Lp)) for _ in range(self.Hkv)] for b in range(B)]
        self.score = [[dict.fromkeys(self.held[b][j], 0.0) for j in range(self.Hkv)] for b in range(B)]
        self.t = Lp

    def _paid(self, b: int, j: int, query: int, keys: list[int]) -> dict[int, float]:
        """Attention query token ``query`` pays each of ``keys`` (softmax over them), summed over KV head ``j``'s
        group."""
        out = dict.fromkeys(keys, 0.0)
        for g in range(self.G):
            logits = [SCALE * float(self.Q[b, j * self.G + g, query] @ self.K[b, j, k]) for k in keys]
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            for k, w in zip(keys, weights):
                out[k] += w / sum(weights)
        return out

    def _attend(self, b: int, queries: list[int]) -> list[dict[int, float]]:
        """Per KV head: the mass ``queries`` paid the held tokens (each query over the held tokens up to itself),
        aggregated as configured."""
        per_head = []
        for j in range(self.Hkv):
            mass = dict.fromkeys(self.held[b][j], 0.0)
            for query in queries:
                for k, m in self._paid(b, j, query, [k for k in self.held[b][j] if k <= query]).items():
                    mass[k] += m
            per_head.append(mass)
        if self.aggregation == "all":  # every head holds the same tokens
            total = {k: sum(m[k] for m in per_head) for k in per_head[0]}
            per_head = [dict(total) for _ in per_head]
        return per_head

    def _evict(self, b: int, scores: list[dict[int, float]]) -> None:
        budget, window = self.budgets[b], self.windows[b]
        for j in range(self.Hkv):
            held = self.held[b][j]
            recent = held[len(held) - window :] if window else []
            others = held[: len(held) - window] if window else held
            best = sorted(others, key=lambda k: (-scores[j][k], k))[: budget - len(recent)]  # ties: the earlier
            self.held[b][j] = sorted(best + recent)
            self.score[b][j] = {k: v for k, v in self.score[b][j].items() if k in self.held[b][j]}

    def _observe_and_evict(self, queries: list[int], over: int) -> None:
        for b in range(len(self.pads)):
            per_head = self._attend(b, [q for q in queries if q >= self.pads[b]])
            if self.accumulate:
                for j in range(self.Hkv):
                    for k, m in per_head[j].items():
                        self.score[b][j][k] += m
                per_head = self.score[b]
            if len(self.held[b][0]) >= self.budgets[b] + over:
                self._evict(b, per_head)

    def prefill(self) -> None:
        # H2O: every prompt query; TOVA: the last prompt token's
        queries = list(range(self.Lp)) if self.accumulate else [self.Lp - 1]
        self._observe_and_evict(queries, over=1)

    def step(self) -> None:
        t = self.t
        for b in range(len(self.pads)):
            for j in range(self.Hkv):
                self.held[b][j].append(t)
                self.score[b][j][t] = 0.0
        self._observe_and_evict([t], over=self.block)
        self.t += 1
