"""Prefill attention: delegated to PyTorch SDPA (no Triton kernel).

What it computes (semantics: :meth:`kvsieve.backend.KVBackend.prefill_attention`): ``Q`` new queries over
``K >= Q`` keys that end with the queries' own keys. ``attention_mask=None`` means plain causal aligned to the
bottom right (query ``i`` sees keys ``[0, K - Q + i]``); otherwise a boolean ``[B, 1, Q, K]`` mask (True = may
attend). A query row with no True entry outputs zeros.

How: ``torch.nn.functional.scaled_dot_product_attention(..., enable_gqa=True)`` -- GQA without repeating K/V,
and PyTorch picks its fastest kernel (FlashAttention-2 for the causal no-mask case on CUDA; the
efficient/cuDNN/math kernels with a mask). Mask handling is identical to the reference: ``is_causal=True``
only when ``Q == K`` (SDPA's ``is_causal`` aligns to the top left); for ``Q < K`` an explicit bottom-right
causal mask; fully masked query rows (where SDPA may return NaN) are set to zeros afterwards.

Layout: ``queries [B, H, Q, d]``, ``keys``/``values [B, Hkv, K, d]``; output ``[B, H, Q, d]`` in the queries'
dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["prefill_attention"]


def prefill_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """``[B, H, Q, d]`` attention of the new queries over ``keys``/``values`` (see the module docstring)."""
    B, H, Q, d = queries.shape
    Hkv, K = keys.shape[1], keys.shape[2]
    if H % Hkv != 0:
        raise ValueError(f"H={H} query heads is not a multiple of Hkv={Hkv} key/value heads")
    if Q == 0 or B == 0:
        return queries.new_empty(B, H, Q, values.shape[-1])
    dtype = torch.promote_types(torch.promote_types(queries.dtype, keys.dtype), values.dtype)
    q, k, v = queries.to(dtype), keys.to(dtype), values.to(dtype)
    if attention_mask is None:
        if Q == K:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            return out.to(queries.dtype)
        mask = torch.ones(Q, K, dtype=torch.bool, device=queries.device).tril(K - Q)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        if K < Q:  # rows that see nothing (only possible with K < Q, outside the contract): zeros
            out = out.masked_fill(~mask.any(-1)[None, None, :, None], 0)
        return out.to(queries.dtype)
    mask = attention_mask.to(device=queries.device, dtype=torch.bool)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    dead = ~mask.any(-1, keepdim=True)  # [B or 1, 1, Q, 1]: fully masked rows
    return out.masked_fill(dead, 0).to(queries.dtype)
