"""Causal-attention scoring: the attention the window queries really paid each candidate.

Each window query's softmax runs over every key it causally sees (``[starts, its own slot]``), as in the model's
own attention; the weights it put on each candidate are summed over the window queries and the GQA group, then
aggregated over heads. With one query (the current token) this is TOVA's score; summed over every prompt query
it is H2O's accumulated attention of the prompt. A ranking shared by the heads sums over every KV head of the
layer, across tensor-parallel ranks too (:meth:`~kvsieve.policy.ScoringContext.sum_over_heads`). Unlike
``window_attention``'s ``"visible"`` normalisation, candidates may lie inside the window: a query only counts the
keys it could see.

Flash-style: no ``[W, L]`` attention matrix is stored. The window queries go in chunks; for each chunk the
backend gives the log-sum-exp over what each query sees (``window_lse``) and the mass on the candidates up to the
chunk's first query (``window_scores``, which every query of the chunk sees); only the keys inside the chunk,
seen by its later queries alone, are computed densely (``chunk x chunk``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import attrs
import torch
import torch.nn.functional as F

import kvsieve
from kvsieve.backend import call_window_scores
from kvsieve.parallel import LOCAL, HeadGroup
from kvsieve.policy import ScoringContext, ScoringPolicy
from kvsieve.validators import one_of

if TYPE_CHECKING:
    from kvsieve.backend import KVBackend

__all__ = ["AGGREGATIONS", "CausalAttentionScoring", "aggregate", "causal_attention"]

AGGREGATIONS = ("group", "all")

#: window queries scored at a time: bounds the reference backend's ``[B, H, chunk, N]`` intermediates
QUERY_CHUNK = 128


def aggregate(scores: torch.Tensor, aggregation: str, heads: HeadGroup = LOCAL) -> torch.Tensor:
    """``[B, Hkv, N]`` per-KV-head scores (summed over each GQA group) kept per KV head (``"group"``) or summed
    over every KV head of the layer, one ranking shared by its heads (``"all"``; ``heads``: the
    :class:`~kvsieve.parallel.HeadGroup` that spans them, a tensor-parallel group included)."""
    if aggregation == "all":
        return heads.sum_over_heads(scores).expand_as(scores)
    return scores


def causal_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    cand_starts: torch.Tensor,
    cand_ends: torch.Tensor,
    scale: float,
    backend: KVBackend,
    num_candidates: int,
    chunk: int = QUERY_CHUNK,
) -> torch.Tensor:
    """Attention mass the window queries paid each candidate, each query normalised over the keys it saw.

    Window query ``w`` is the token at slot ``ends - W + w`` and sees slots ``[starts, ends - W + w]``; a query
    before ``starts`` (left padding) pays no attention. For candidate ``n`` (slot ``s = cand_starts + n``)::

        out[b, j, n] = sum_{g < G} sum_{w: s <= slot(w)} exp(scale * q[b, j*G + g, w] . k[b, j, s] - lse[b, j*G + g, w])

    Args:
        queries: ``[B, H, W, d]`` post-RoPE queries of the last ``W`` live slots.
        keys: ``[B, Hkv, C, d]``.
        starts, ends: ``int64 [B, Hkv]`` the live range.
        cand_starts, cand_ends: ``int64 [B, Hkv]`` candidates inside the live range (anywhere in it).
        num_candidates: ``N``, the output length: at least ``max(cand_ends - cand_starts)`` (a larger value pads
            with zeros, so a caller that knows only a bound on the host reads nothing from the device).

    Returns:
        ``float32 [B, Hkv, N]``, exactly 0 past each row's candidate count.
    """
    B, H, W, d = queries.shape
    Hkv = keys.shape[1]
    G = H // Hkv
    N = num_candidates
    out = torch.zeros(B, Hkv, N, dtype=torch.float32, device=keys.device)
    if N == 0 or W == 0:
        return out
    first = ends - W  # [B, Hkv]: slot of window query 0
    for w0 in range(0, W, chunk):
        Wc = min(chunk, W - w0)
        q = queries[:, :, w0 : w0 + Wc]
        s0 = first + w0  # slot of the chunk's first query
        lse = backend.window_lse(q, keys, starts, s0 + Wc, scale)  # [B, H, Wc]
        q_slots = s0[..., None] + torch.arange(Wc, device=keys.device)  # [B, Hkv, Wc]
        padding = (q_slots < starts[..., None]).repeat_interleave(G, dim=1)
        lse = lse.masked_fill(padding, float("inf"))  # a padding query sees nothing and pays nothing
        # candidates up to the chunk's first query: every query of the chunk sees them
        seen = torch.minimum(torch.maximum(s0 + 1, cand_starts), cand_ends)
        part = call_window_scores(backend, q, keys, cand_starts, seen, scale, lse, N)
        out += F.pad(part, (0, N - part.shape[-1]))  # a backend without num_candidates returns its own N
        if Wc > 1:
            out.scatter_add_(2, *_inside_chunk(q, keys, s0, cand_starts, cand_ends, lse, scale, N))
    return out


def _inside_chunk(q, keys, s0, cand_starts, cand_ends, lse, scale, N) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, mass)``, both ``[B, Hkv, Wc - 1]``: the candidate index of the keys at slots ``s0 + 1 ..
    s0 + Wc - 1`` (the chunk's own tokens after its first) and the mass the chunk's later queries put on them
    (0 where the slot is no candidate)."""
    B, H, Wc, d = q.shape
    Hkv, C = keys.shape[1], keys.shape[2]
    G = H // Hkv
    offsets = torch.arange(1, Wc, device=keys.device)
    slots = s0[..., None] + offsets  # [B, Hkv, Wc - 1]
    k = keys.gather(2, slots.clamp(0, C - 1)[..., None].expand(B, Hkv, Wc - 1, d)).float()
    logits = torch.einsum("bjgwd,bjkd->bjgwk", q.reshape(B, Hkv, G, Wc, d).float(), k) * scale
    is_cand = (slots >= cand_starts[..., None]) & (slots < cand_ends[..., None])  # [B, Hkv, Wc - 1]
    causal = offsets <= torch.arange(Wc, device=keys.device)[:, None]  # [Wc, Wc - 1]: query w sees key 1 + k <= w
    visible = causal & is_cand[:, :, None, None, :]
    probs = torch.exp(logits.masked_fill(~visible, float("-inf")) - lse.reshape(B, Hkv, G, Wc, 1))
    mass = probs.sum(dim=(2, 3)).masked_fill(~is_cand, 0.0)
    return (slots - cand_starts[..., None]).clamp(0, max(N - 1, 0)), mass


@attrs.frozen
class CausalAttentionScoring(ScoringPolicy):
    """Attention the window queries paid each candidate, softmax over every key each query causally sees.

    Needs the window queries to be the last live tokens (``ScoringContext.queries_are_last``): true in prefill,
    and in decode for a compressor that scores right after the step with its current query (TOVA, H2O).

    Args:
        aggregation: ``"all"`` (summed over every head: one ranking per layer, TOVA's, whose average over the
            heads is the same ranking) or ``"group"`` (per KV head, summed over its GQA group). Default ``"all"``.
    """

    name: ClassVar[str] = "causal_attention"

    aggregation: str = attrs.field(default="all", validator=one_of(*AGGREGATIONS))

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        if not ctx.queries_are_last:
            raise ValueError(
                "causal_attention normalises over every key a window query sees, so it needs the window queries to "
                "be the last live tokens (ScoringContext.queries_are_last); a compressor that scores with other "
                "queries should use window_attention"
            )
        scores = causal_attention(ctx.queries, ctx.keys, ctx.starts, ctx.ends, ctx.cand_starts, ctx.cand_ends,
                                  ctx.scale, ctx.backend, ctx.num_candidates)
        return aggregate(scores, self.aggregation, ctx.heads)


@kvsieve.hookimpl
def kvsieve_scoring_policies():
    return {CausalAttentionScoring.name: CausalAttentionScoring}
