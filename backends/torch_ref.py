"""The ``torch`` backend: the reference semantics of every :class:`~kvsieve.backend.KVBackend` primitive.

Written for clarity, not speed: masks are materialised and softmax runs in fp32. Other backends are tested
against this one. Runs wherever torch runs (CPU and CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kvsieve
from kvsieve.backend import BackendCapabilities, KVBackend
from kvsieve.indexing import compaction_moves

__all__ = ["TorchBackend"]


def _sdpa(queries, keys, values, mask, scale):
    """Masked GQA attention (no K/V repeat); a query that may see no key outputs zeros.

    ``mask``: bool ``[B, 1 or Hkv, Q, K]`` (per KV head when not shared), broadcast over each GQA group.
    Computed in fp32 for the reference's accuracy. Keys and values no query may see are zeroed first, so whatever
    those slots hold (NaN, inf) cannot reach an output.
    """
    B, H = queries.shape[:2]
    Hkv = keys.shape[1]
    hidden = ~mask.any(dim=-2)[..., None]  # [B, 1 or Hkv, K, 1]
    keys = keys.float().masked_fill(hidden, 0.0)
    values = values.float().masked_fill(hidden, 0.0)
    if mask.shape[1] != 1:
        mask = mask.repeat_interleave(H // Hkv, dim=1)
    out = F.scaled_dot_product_attention(
        queries.float(), keys, values, attn_mask=mask, scale=scale, enable_gqa=True
    )
    out = out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return out.nan_to_num(0.0).to(queries.dtype)


class TorchBackend(KVBackend):
    name = "torch"
    capabilities = BackendCapabilities(devices=("cpu", "cuda"))

    def prefill_attention(self, queries, keys, values, attention_mask, scale):
        Q, K = queries.shape[2], keys.shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(Q, K, dtype=torch.bool, device=queries.device).tril(K - Q)[None, None]
        return _sdpa(queries, keys, values, attention_mask, scale)

    def decode_attention(self, queries, keys, values, starts, ends, scale):
        Q, C = queries.shape[2], keys.shape[2]
        slots = torch.arange(C, device=keys.device)
        # query i sees [starts, ends - Q + i]; KV head j serves query heads [j*G, (j+1)*G)
        last = ends[..., None] - Q + torch.arange(Q, device=keys.device)  # [B, Hkv, Q]
        visible = (slots >= starts[..., None, None]) & (slots <= last[..., None])  # [B, Hkv, Q, C]
        return _sdpa(queries, keys, values, visible, scale)

    def window_lse(self, queries, keys, starts, ends, scale):
        B, H, W, d = queries.shape
        Hkv, C = keys.shape[1], keys.shape[2]
        G = H // Hkv
        slots = torch.arange(C, device=keys.device)
        last = ends[..., None] - W + torch.arange(W, device=keys.device)  # [B, Hkv, W]
        visible = (slots >= starts[..., None, None]) & (slots <= last[..., None])  # [B, Hkv, W, C]
        q = queries.reshape(B, Hkv, G, W, d)
        logits = torch.einsum("bjgwd,bjkd->bjgwk", q.float(), keys.float()) * scale
        logits = logits.masked_fill(~visible[:, :, None], float("-inf"))
        return torch.logsumexp(logits, dim=-1).reshape(B, H, W)

    def window_scores(self, queries, keys, cand_starts, cand_ends, scale, lse=None, num_candidates=None):
        B, H, W, d = queries.shape
        Hkv = keys.shape[1]
        G = H // Hkv
        counts = (cand_ends - cand_starts).clamp(min=0)
        if num_candidates is not None:
            N = num_candidates
        else:
            N = int(counts.max()) if counts.numel() else 0
        if N == 0:
            return keys.new_zeros(B, Hkv, 0, dtype=torch.float32)
        offsets = torch.arange(N, device=keys.device)
        slots = (cand_starts[..., None] + offsets).clamp(max=keys.shape[2] - 1)  # [B, Hkv, N]
        valid = offsets < counts[..., None]
        cand = keys.gather(2, slots[..., None].expand(B, Hkv, N, d)).float()
        q = queries.reshape(B, Hkv, G, W, d).float()
        logits = torch.einsum("bjgwd,bjnd->bjgwn", q, cand) * scale
        logits = logits.masked_fill(~valid[:, :, None, None], float("-inf"))
        if lse is None:
            lse_ = torch.logsumexp(logits, dim=-1, keepdim=True)
        else:
            lse_ = lse.reshape(B, Hkv, G, W, 1).float()
        probs = torch.exp(logits - lse_).nan_to_num(0.0)
        return probs.sum(dim=(2, 3)).masked_fill(~valid, 0.0)

    def compact(self, keys, values, keep, counts, dest_starts):
        B, Hkv, K = keep.shape
        if K == 0:
            return
        d = keys.shape[-1]
        src, dst = compaction_moves(keep, counts, dest_starts)
        for buf in (keys, values):
            moved = buf.gather(2, src[..., None].expand(B, Hkv, K, d))
            buf.scatter_(2, dst[..., None].expand(B, Hkv, K, d), moved)

@kvsieve.hookimpl
def kvsieve_backends():
    return {"torch": TorchBackend}
