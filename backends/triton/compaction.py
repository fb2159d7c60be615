"""In-place KV compaction: gather the kept slots of each (row, KV head) to the front of a region.

What it computes (semantics: :meth:`kvsieve.backend.KVBackend.compact`): for every row ``b``, KV head ``j``
and ``i < counts[b, j]``, ``keys[b, j, dest_starts[b, j] + i] = keys_before[b, j, keep[b, j, i]]``, same for
``values``; nothing else is written, entries of ``keep`` past ``counts`` are never read.

Why in place is safe: ``keep`` is sorted ascending with ``keep[i] >= dest + i`` (a slot only moves towards the
front). One program owns a whole ``(b, j)`` sweep (for its slice of the head dim) and walks the kept list in
ascending blocks of ``BLOCK_K``: it loads the K and V rows of a block, then (after a CTA barrier, because
within a block slot ``keep[i]`` may be the destination ``dest + i'`` of a later ``i' > i`` handled by another
thread) stores them. A later block never reads a slot an earlier block wrote
(``keep[i'] >= dest + i' > dest + i``), so loads of block ``t+1`` may even be issued before the stores of
block ``t``. Different programs touch disjoint ``(b, j, column)`` sets. The sweep cannot be split along the
kept list: a later block's destination may be a source of an earlier block.

Layout: ``keys``/``values [B, Hkv, C, d]`` (any strides; modified in place), ``keep int64 [B, Hkv, K]`` (any
strides), ``counts``/``dest_starts int64 [B, Hkv]``.

Grid: ``(B*Hkv, cdiv(d, BLOCK_D))``: program ``(b*Hkv + j, c)`` moves columns ``[c*BLOCK_D, (c+1)*BLOCK_D)``
of both K and V for row ``(b, j)``. ``BLOCK_D`` shrinks (down to 32 columns) when ``B*Hkv`` alone is too few
programs to fill the GPU. Traffic: one read and one write of every moved K/V row; cost follows ``counts``, not
``C``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, interpret_mode, next_pow2, target_programs

__all__ = ["compact", "CompactConfig"]


class CompactConfig:
    def __init__(self, block_k: int, block_d: int, num_warps: int = 4):
        self.block_k = block_k
        self.block_d = block_d
        self.num_warps = num_warps

    def __repr__(self) -> str:
        return f"CompactConfig(block_k={self.block_k}, block_d={self.block_d}, num_warps={self.num_warps})"


def default_config(rows: int, head_dim: int, device: torch.device) -> CompactConfig:
    """Tiles for ``rows = B*Hkv`` independent sweeps of head dim ``head_dim``."""
    full_d = next_pow2(max(head_dim, 16))
    if device.type != "cuda" or interpret_mode():
        return CompactConfig(block_k=16, block_d=full_d, num_warps=4)
    block_d = full_d
    target = target_programs(device)
    while block_d > 32 and rows * cdiv(head_dim, block_d) < target:
        block_d //= 2
    return CompactConfig(block_k=max(16, 4096 // block_d), block_d=block_d, num_warps=4)


@triton.jit
def _compact_kernel(
    k_ptr,
    v_ptr,
    keep_ptr,
    cnt_ptr,
    dst_ptr,
    sk_b,
    sk_h,
    sk_c,
    sk_d,
    sv_b,
    sv_h,
    sv_c,
    sv_d,
    sp_b,
    sp_h,
    sp_k,
    Hkv,
    D,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Move the kept rows of ``(b, j)`` (columns of chunk ``c``) of K and V to ``[dest, dest + count)``."""
    bj = tl.program_id(0)
    c = tl.program_id(1)
    b = bj // Hkv
    j = bj % Hkv
    count = tl.load(cnt_ptr + bj)
    dest = tl.load(dst_ptr + bj)
    dcols = c * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < D
    k_base = k_ptr + b.to(tl.int64) * sk_b + j.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + j.to(tl.int64) * sv_h
    p_base = keep_ptr + b.to(tl.int64) * sp_b + j.to(tl.int64) * sp_h
    for i0 in range(0, count, BLOCK_K):
        idx = i0 + tl.arange(0, BLOCK_K)
        live = idx < count
        src = tl.load(p_base + idx * sp_k, mask=live, other=0)
        dst = dest + idx
        mask = live[:, None] & dmask[None, :]
        kv = tl.load(k_base + src[:, None] * sk_c + dcols[None, :] * sk_d, mask=mask)
        vv = tl.load(v_base + src[:, None] * sv_c + dcols[None, :] * sv_d, mask=mask)
        tl.debug_barrier()  # every thread's loads of this block before any thread's stores
        tl.store(k_base + dst[:, None] * sk_c + dcols[None, :] * sk_d, kv, mask=mask)
        tl.store(v_base + dst[:, None] * sv_c + dcols[None, :] * sv_d, vv, mask=mask)


def compact(
    keys: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor,
    counts: torch.Tensor,
    dest_starts: torch.Tensor,
    *,
    config: CompactConfig | None = None,
) -> None:
    """In place: ``keys[b, j, dest_starts[b, j] + i] = keys[b, j, keep[b, j, i]]`` for ``i < counts[b, j]``
    (same for ``values``).

    Args:
        keys, values: ``[B, Hkv, C, d]``, modified in place.
        keep: ``int64 [B, Hkv, K]``, sorted ascending per ``(b, j)``,
            ``keep[b, j, i] >= dest_starts[b, j] + i``.
        counts: ``int64 [B, Hkv]``, ``counts <= K``; dest_starts: ``int64 [B, Hkv]``.
        config: tile override (tests); default from the device.
    No host synchronisation.
    """
    if keys.dim() != 4 or values.shape != keys.shape:
        raise ValueError(
            f"keys/values must share one [B, Hkv, C, d] shape, got {tuple(keys.shape)}, {tuple(values.shape)}"
        )
    B, Hkv, C, d = keys.shape
    if keep.dim() != 3 or tuple(keep.shape[:2]) != (B, Hkv):
        raise ValueError(f"keep must be [B, Hkv, K] = [{B}, {Hkv}, K], got {tuple(keep.shape)}")
    if tuple(counts.shape) != (B, Hkv) or tuple(dest_starts.shape) != (B, Hkv):
        raise ValueError(f"counts/dest_starts must be [B, Hkv] = [{B}, {Hkv}]")
    if keep.shape[2] == 0 or B * Hkv == 0 or d == 0:
        return
    cfg = config or default_config(B * Hkv, d, keys.device)
    keep = keep.to(device=keys.device, dtype=torch.int64)
    cnt = counts.to(device=keys.device, dtype=torch.int64).clamp(max=keep.shape[2]).contiguous()
    dst = dest_starts.to(device=keys.device, dtype=torch.int64).contiguous()
    _compact_kernel[(B * Hkv, cdiv(d, cfg.block_d))](
        keys,
        values,
        keep,
        cnt,
        dst,
        *keys.stride(),
        *values.stride(),
        *keep.stride(),
        Hkv,
        d,
        BLOCK_K=cfg.block_k,
        BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps,
    )
