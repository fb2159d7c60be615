"""Torch references of the per-layer operators around attention in a decode step (the fused decoder layer of
the fast path, :mod:`kvsieve.fused_layer`).

Each function computes exactly what the HuggingFace Llama-family layer computes, operator for operator and in
the same dtypes (so the fused layer's tokens match the model's own forward): a backend's fused kernels
(:meth:`KVBackend.rms_norm <kvsieve.backend.KVBackend.rms_norm>`, ``silu_mul``, ``rope_append``) must match
these within the dtype's rounding. They are also what :class:`~kvsieve.backend.KVBackend` runs by default.

* :func:`rms_norm`: ``residual + x`` rounded to ``x``'s dtype, then HF's ``LlamaRMSNorm`` of that sum (mean of
  squares in float32, times ``rsqrt(mean + eps)``, cast back, times the weight).
* :func:`silu_mul`: ``silu(gate) * up`` as HF's MLP computes it (each op rounded to the inputs' dtype).
* :func:`rotate`: HF's ``apply_rotary_pos_emb`` for one tensor: ``x * cos + rotate_half(x) * sin``.
* :func:`append_at_ends`: the static cache's one-token append: K/V written at slot ``ends[b, j]`` of each row's
  KV head, that slot's logical position set to ``seen``, ``ends += 1``.
"""

from __future__ import annotations

import torch

__all__ = ["append_at_ends", "rms_norm", "rope_append", "rotate", "silu_mul"]


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x`` (or of ``residual + x``).

    Args:
        x: ``[..., D]``; residual: ``None`` or ``[..., D]`` in ``x``'s dtype; weight: ``[D]``.

    Returns:
        ``(normed, total)``, both ``[..., D]``: ``normed`` in ``weight``'s dtype promoted with ``x``'s (HF's
        ``weight * hidden.to(input_dtype)``), ``total`` = ``residual + x`` in ``x``'s dtype (``x`` itself when
        ``residual`` is None): the residual stream the layer carries on.
    """
    total = x if residual is None else residual + x
    hidden = total.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(x.dtype), total


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (``[..., F]`` each, one dtype), as HF's gated MLP computes it."""
    return torch.nn.functional.silu(gate) * up


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [B, heads, 1, d]`` with ``cos``/``sin [B, 1, d]`` (the model's rotary embedding of
    each row's position; ``d`` even, the rotated halves ``[:d/2]`` and ``[d/2:]`` as in HF's ``rotate_half``)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def append_at_ends(
    key: torch.Tensor,
    value: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    ends: torch.Tensor,
    seen: torch.Tensor,
) -> None:
    """Append one token per row and KV head in place.

    Args:
        key, value: ``[B, Hkv, 1, d]`` (``value``'s last dim may differ from ``key``'s).
        keys, values: ``[B, Hkv, C, d]`` the layer's buffers; positions: ``int64 [B, Hkv, C]`` the slots'
            logical token indices; ends: ``int64 [B, Hkv]`` one past each row's last live slot (incremented);
            seen: ``int64 [1]`` the token's logical index (read, not changed).
    """
    B, Hkv, _, d = key.shape
    slot = ends[..., None]  # [B, Hkv, 1]
    keys.scatter_(2, slot[..., None].expand(B, Hkv, 1, d), key)
    values.scatter_(2, slot[..., None].expand(B, Hkv, 1, value.shape[-1]), value)
    positions.scatter_(2, slot, seen.expand(B, Hkv, 1))
    ends += 1


def rope_append(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    ends: torch.Tensor,
    seen: torch.Tensor,
    query_ring: torch.Tensor | None = None,
    ring_count: torch.Tensor | None = None,
) -> None:
    """Rotate ``query [B, H, 1, d]`` in place, rotate ``key [B, Hkv, 1, d]`` and append it with ``value`` as
    :func:`append_at_ends` does (the other arguments are :func:`rotate`'s and :func:`append_at_ends`'s). With
    ``query_ring [B, H, R, d]`` and ``ring_count int64 [1]`` (given together), also write the rotated query at
    ring slot ``ring_count[0] % R`` (``ring_count`` is not changed)."""
    if (query_ring is None) != (ring_count is None):
        raise ValueError("query_ring and ring_count go together: pass both or neither")
    query.copy_(rotate(query, cos, sin))
    append_at_ends(rotate(key, cos, sin), value, keys, values, positions, ends, seen)
    if query_ring is not None:
        query_ring.index_copy_(2, ring_count % query_ring.shape[2], query)
