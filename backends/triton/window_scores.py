"""Window-attention scoring without materialising ``[B, H, W, L]``: ``window_lse`` and ``window_scores``.

What it computes (semantics: :class:`kvsieve.backend.KVBackend`, reference: ``kvsieve.backends.torch_ref``):

* ``window_lse``: ``float32 [B, H, W]``, the log-sum-exp of ``scale * q_w . k`` over the slots window query
  ``w`` causally sees, ``[starts, ends - W + w]`` (``-inf`` when it sees none).
* ``window_scores``: ``float32 [B, Hkv, N]``, ``out[b, j, n] = sum_{g, w} exp(scale * q[b, j*G+g, w] . k[b, j,
  cand_starts[b, j] + n] - lse[b, j*G+g, w])`` with ``N = max(cand_ends - cand_starts)``; entries past a row's
  own candidate count are exactly 0. Without ``lse`` the softmax runs over the candidates only: a first pass
  computes that log-sum-exp (the non-causal variant of the ``window_lse`` kernel over ``[cand_starts,
  cand_ends)``), then the second pass computes the scores.

Layout: ``queries [B, H, W, d]`` (any strides), ``keys [B, Hkv, C, d]`` (any strides), ranges ``int64 [B,
Hkv]``. The ``G * W`` queries of KV head ``j`` (query heads ``j*G .. j*G+G-1``) are the rows ``r = g*W + w``
of one ``[G*W, d]`` tile, so every block of keys is loaded once for the whole GQA group and the whole window
(one ``tl.dot`` of ``[G*W, d] x [d, BLOCK_N]``). K/V are never repeated. Accumulation is fp32 (``tl.dot`` with
fp32 accumulator; fp32 inputs use exact ``ieee`` products, not TF32). ``exp`` is computed as ``exp2`` of
log2-scaled logits.

Grids:

* ``_lse_partial_kernel``: ``(S, B*Hkv, MC)``. Program ``(s, b*Hkv + j, mc)`` takes the ``s``-th of ``S``
  equal chunks of row ``(b, j)``'s range (chunk = ``ceil(len / S)`` rounded up to ``BLOCK_N``, so the work
  follows the row's length, not the capacity) and query rows ``[mc*BLOCK_M, (mc+1)*BLOCK_M)`` of the group,
  sweeps it with an online max/sum and writes one partial log-sum-exp per query row to ``[B*Hkv, S, G*W]``;
  torch's ``logsumexp`` over ``S`` combines them (a ``[B, H, W, S]``-sized op). ``S`` is chosen on the host
  from the capacity (or ``N``) and the device size so that one long row still fills the GPU.
* ``_scores_kernel``: ``(ceil(N / CHUNK), B*Hkv, MC)``. Program ``(c, b*Hkv + j, mc)`` loads its query rows
  once and sweeps candidates ``[c*CHUNK, (c+1)*CHUNK)`` block by block, writing column sums of ``exp2`` of the
  logits minus the log-sum-exp; blocks past the row's count are written as zeros without loading keys. With
  ``MC > 1`` (``G*W > BLOCK_M``) each row chunk writes its own ``[B, Hkv, N]`` partial, summed by torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, compute_dtype, dot_precision, interpret_mode, next_pow2, target_programs

__all__ = ["ScoreConfig", "candidate_lse", "window_lse", "window_scores"]

LOG2E = 1.4426950408889634


class ScoreConfig:
    """Tile sizes of the scoring kernels (defaults chosen by :func:`default_config`; tests override them).

    ``block_n`` keys per block in the scores pass, ``lse_block_n`` in the log-sum-exp pass (default:
    ``block_n``); ``max_block_m`` caps the query rows per program (``G*W`` above it is split into row chunks,
    each re-reading K); ``programs`` is the target number of programs per launch (default: from the device).
    """

    def __init__(
        self,
        block_n: int,
        max_block_m: int,
        num_warps: int = 4,
        num_stages: int = 2,
        programs: int | None = None,
        lse_block_n: int | None = None,
    ):
        self.block_n = block_n
        self.lse_block_n = lse_block_n or block_n
        self.max_block_m = max_block_m
        self.num_warps = num_warps
        self.num_stages = num_stages
        self.programs = programs

    def __repr__(self) -> str:
        return (
            f"ScoreConfig(block_n={self.block_n}, lse_block_n={self.lse_block_n}, "
            f"max_block_m={self.max_block_m}, "
            f"num_warps={self.num_warps}, num_stages={self.num_stages}, programs={self.programs})"
        )


def default_config(rows: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> ScoreConfig:
    """Tiles for ``rows = G*W`` query rows of head dim ``head_dim`` and inputs of ``dtype``.

    Tuned on an H200 (bf16, d=128, ``benchmarks/kernels.py --sweep``): the whole group in one program (up to
    256 rows, so K is read once), 4 warps, 3 stages; 128-key blocks for the scores pass when the group is
    small, else 64. fp32 inputs keep at most 128 rows per program (shared memory).
    """
    if device.type != "cuda" or interpret_mode():
        return ScoreConfig(block_n=16, max_block_m=128, num_warps=4, num_stages=1)
    max_block_m = 256 if dtype != torch.float32 else 128
    block_m = min(next_pow2(max(rows, 16)), max_block_m)
    block_d = next_pow2(max(head_dim, 16))
    small = block_m <= 64 and block_d <= 128 and dtype != torch.float32
    return ScoreConfig(
        block_n=128 if small else 64, lse_block_n=64, max_block_m=max_block_m, num_warps=4, num_stages=3
    )


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _load_query_rows(q_ptr, b, j, rows, dcols, sq_b, sq_h, sq_w, sq_d, G, W, D):
    """``[BLOCK_M, BLOCK_D]`` tile of the group's window queries: row ``g*W + w`` is ``q[b, j*G+g, w]``."""
    g = rows // W
    w = rows % W
    rmask = rows < G * W
    ptrs = (
        q_ptr
        + b.to(tl.int64) * sq_b
        + (j * G + g).to(tl.int64)[:, None] * sq_h
        + w.to(tl.int64)[:, None] * sq_w
        + dcols[None, :] * sq_d
    )
    return tl.load(ptrs, mask=rmask[:, None] & (dcols[None, :] < D), other=0.0)


@triton.jit
def _lse_partial_kernel(
    q_ptr,
    k_ptr,
    lo_ptr,
    hi_ptr,
    out_ptr,
    sq_b,
    sq_h,
    sq_w,
    sq_d,
    sk_b,
    sk_h,
    sk_c,
    sk_d,
    Hkv,
    G,
    W,
    C,
    D,
    n_splits,
    qk_scale,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Partial log-sum-exp (natural log) of query rows ``[mc*BLOCK_M, ...)`` over chunk ``s`` of row
    ``(b, j)``.

    out: ``float32 [B*Hkv, S, G*W]``. ``qk_scale = scale * log2(e)``.
    Query ``w`` sees slots ``[lo, hi - (W - 1 - w))`` when ``CAUSAL`` else ``[lo, hi)``.
    """
    s = tl.program_id(0)
    bj = tl.program_id(1)
    mc = tl.program_id(2)
    b = bj // Hkv
    j = bj % Hkv
    lo = tl.load(lo_ptr + bj)
    hi = tl.load(hi_ptr + bj)
    length = tl.maximum(hi - lo, 0)
    chunk = tl.cdiv(tl.cdiv(length, n_splits), BLOCK_N) * BLOCK_N
    c_lo = lo + s * chunk
    c_hi = tl.minimum(c_lo + chunk, hi)

    rows = mc * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = tl.arange(0, BLOCK_D)
    q = _load_query_rows(q_ptr, b, j, rows, dcols, sq_b, sq_h, sq_w, sq_d, G, W, D)
    if UPCAST:
        q = q.to(tl.float32)
    if CAUSAL:
        row_end = hi - (W - 1 - rows % W)  # exclusive
    else:
        row_end = hi + tl.zeros([BLOCK_M], dtype=tl.int64)

    k_base = k_ptr + b.to(tl.int64) * sk_b + j.to(tl.int64) * sk_h
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(c_lo, c_hi, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        kmask = (slots < c_hi) & (slots >= 0) & (slots < C)
        k = tl.load(
            k_base + slots[:, None] * sk_c + dcols[None, :] * sk_d,
            mask=kmask[:, None] & (dcols[None, :] < D),
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        visible = kmask[None, :] & (slots[None, :] < row_end[:, None])
        logits = tl.where(visible, logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(logits - m_safe[:, None]), 1)
        m = m_new

    # natural-log lse; -inf when the row saw nothing (l == 0)
    lse = tl.where(l > 0.0, (m + tl.log2(tl.where(l > 0.0, l, 1.0))) * 0.6931471805599453, float("-inf"))
    GW = G * W
    tl.store(out_ptr + (bj.to(tl.int64) * n_splits + s) * GW + rows, lse, mask=rows < GW)


@triton.jit
def _scores_kernel(
    q_ptr,
    k_ptr,
    lo_ptr,
    hi_ptr,
    lse_ptr,
    out_ptr,
    sq_b,
    sq_h,
    sq_w,
    sq_d,
    sk_b,
    sk_h,
    sk_c,
    sk_d,
    sl_b,
    sl_h,
    sl_w,
    so_z,
    so_b,
    so_h,
    so_n,
    Hkv,
    G,
    W,
    C,
    D,
    N,
    CHUNK,
    qk_scale,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Scores of candidates ``[c*CHUNK, (c+1)*CHUNK)`` of row ``(b, j)`` from query rows of chunk ``mc``.

    lse: ``float32 [B, H, W]`` (natural log); out: ``float32 [MC, B, Hkv, N]`` (``so_z`` unused when MC == 1).
    """
    c = tl.program_id(0)
    bj = tl.program_id(1)
    mc = tl.program_id(2)
    b = bj // Hkv
    j = bj % Hkv
    lo = tl.load(lo_ptr + bj)
    hi = tl.load(hi_ptr + bj)
    count = tl.maximum(hi - lo, 0)
    n0 = c * CHUNK
    n_end = tl.minimum(n0 + CHUNK, N)  # this program writes out[..., n0:n_end]
    out_base = out_ptr + mc.to(tl.int64) * so_z + b.to(tl.int64) * so_b + j.to(tl.int64) * so_h

    # candidates with n < count: computed; the rest of [n0, n_end): zeros (no key loads)
    n_compute = tl.minimum(n_end, count)
    if n0 < n_compute:
        rows = mc * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < G * W
        dcols = tl.arange(0, BLOCK_D)
        q = _load_query_rows(q_ptr, b, j, rows, dcols, sq_b, sq_h, sq_w, sq_d, G, W, D)
        if UPCAST:
            q = q.to(tl.float32)
        g = rows // W
        w = rows % W
        lse = tl.load(
            lse_ptr + b.to(tl.int64) * sl_b + (j * G + g).to(tl.int64) * sl_h + w.to(tl.int64) * sl_w,
            mask=rmask,
            other=0.0,
        )
        lse2 = lse * 1.4426950408889634
        k_base = k_ptr + b.to(tl.int64) * sk_b + j.to(tl.int64) * sk_h
        for nb in range(n0, n_compute, BLOCK_N):
            offs = nb + tl.arange(0, BLOCK_N)
            valid = offs < n_compute
            slots = lo + offs
            kmask = valid & (slots >= 0) & (slots < C)
            k = tl.load(
                k_base + slots[:, None] * sk_c + dcols[None, :] * sk_d,
                mask=kmask[:, None] & (dcols[None, :] < D),
                other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
            logits = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            p = tl.exp2(logits - lse2[:, None])
            p = tl.where(rmask[:, None] & valid[None, :], p, 0.0)
            tl.store(out_base + offs * so_n, tl.sum(p, 0), mask=offs < n_end)
    z0 = n0 + tl.cdiv(tl.maximum(n_compute - n0, 0), BLOCK_N) * BLOCK_N
    for nb in range(z0, n_end, BLOCK_N):
        offs = nb + tl.arange(0, BLOCK_N)
        tl.store(out_base + offs * so_n, tl.zeros([BLOCK_N], dtype=tl.float32), mask=offs < n_end)


# ------------------------------------------------------------------------------------------- launchers
def _check(queries: torch.Tensor, keys: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor):
    if queries.dim() != 4 or keys.dim() != 4:
        raise ValueError(f"queries and keys must be 4-D, got {tuple(queries.shape)} and {tuple(keys.shape)}")
    B, H, W, d = queries.shape
    Bk, Hkv, C, dk = keys.shape
    if Bk != B or dk != d or Hkv == 0 or H % Hkv != 0:
        raise ValueError(
            f"queries {tuple(queries.shape)} do not match keys {tuple(keys.shape)} "
            "(need the same B and d, and H a multiple of Hkv)"
        )
    if tuple(starts.shape) != (B, Hkv) or tuple(ends.shape) != (B, Hkv):
        raise ValueError(
            f"starts/ends must be [B, Hkv] = [{B}, {Hkv}], got {tuple(starts.shape)}, {tuple(ends.shape)}"
        )
    return B, H, W, d, Hkv, C


def _flat_range(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device=device, dtype=torch.int64).contiguous()


def _lse(
    queries, keys, lo, hi, scale, causal: bool, max_len: int, config: ScoreConfig | None
) -> torch.Tensor:
    B, H, W, d, Hkv, C = _check(queries, keys, lo, hi)
    G = H // Hkv
    GW = G * W
    cfg = config or default_config(GW, d, compute_dtype(queries.dtype, keys.dtype), keys.device)
    block_m = min(next_pow2(max(GW, 16)), next_pow2(cfg.max_block_m))
    block_d = next_pow2(max(d, 16))
    mc = cdiv(GW, block_m)
    programs = cfg.programs or target_programs(keys.device)
    if B * Hkv == 0 or GW == 0:
        return torch.full((B, H, W), float("-inf"), device=keys.device, dtype=torch.float32)
    n_splits = max(1, min(cdiv(programs, B * Hkv * mc), cdiv(max(max_len, 1), cfg.lse_block_n)))
    partial = torch.empty(B * Hkv, n_splits, GW, device=keys.device, dtype=torch.float32)
    cdt = compute_dtype(queries.dtype, keys.dtype)
    _lse_partial_kernel[(n_splits, B * Hkv, mc)](
        queries,
        keys,
        _flat_range(lo, keys.device),
        _flat_range(hi, keys.device),
        partial,
        *queries.stride(),
        *keys.stride(),
        Hkv,
        G,
        W,
        C,
        d,
        n_splits,
        float(scale) * LOG2E,
        CAUSAL=causal,
        UPCAST=queries.dtype != keys.dtype,
        DOT_PREC=dot_precision(cdt),
        BLOCK_M=block_m,
        BLOCK_N=cfg.lse_block_n,
        BLOCK_D=block_d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    lse = partial[:, 0] if n_splits == 1 else torch.logsumexp(partial, dim=1)
    return lse.reshape(B, Hkv, G, W).reshape(B, H, W)


def window_lse(
    queries: torch.Tensor,
    keys: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    scale: float,
    *,
    config: ScoreConfig | None = None,
) -> torch.Tensor:
    """``float32 [B, H, W]``: log-sum-exp of window query ``w`` over slots ``[starts, ends - W + w]``.

    Args:
        queries: ``[B, H, W, d]``; keys: ``[B, Hkv, C, d]``; starts, ends: ``int64 [B, Hkv]``.
        config: tile override (tests); default from the device.
    No host synchronisation (the split count comes from the capacity ``C``).
    """
    return _lse(queries, keys, starts, ends, scale, causal=True, max_len=keys.shape[2], config=config)


def candidate_lse(
    queries: torch.Tensor,
    keys: torch.Tensor,
    cand_starts: torch.Tensor,
    cand_ends: torch.Tensor,
    scale: float,
    *,
    config: ScoreConfig | None = None,
) -> torch.Tensor:
    """``float32 [B, H, W]``: log-sum-exp of every window query over all candidates
    ``[cand_starts, cand_ends)`` (no causal mask): the normaliser :func:`window_scores` uses when given
    ``lse=None``. No host sync."""
    return _lse(
        queries, keys, cand_starts, cand_ends, scale, causal=False, max_len=keys.shape[2], config=config
    )


def window_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    cand_starts: torch.Tensor,
    cand_ends: torch.Tensor,
    scale: float,
    lse: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    num_candidates: int | None = None,
    config: ScoreConfig | None = None,
) -> torch.Tensor:
    """``float32 [B, Hkv, N]``: attention mass of the window on each candidate, summed over window and group.

    Args:
        queries: ``[B, H, W, d]``; keys: ``[B, Hkv, C, d]``; cand_starts, cand_ends: ``int64 [B, Hkv]``.
        lse: optional ``float32 [B, H, W]`` (e.g. from :func:`window_lse`); ``None``: softmax over the
            candidates.
        out: optional preallocated ``float32 [B, Hkv, N]`` (every element is written; tests poison it).
        num_candidates: ``N = max(cand_ends - cand_starts)`` when the caller knows it on the host; skips the
            device-to-host read of ``N`` (the call then never synchronises). Not checked: a larger value pads
            the output with zeros, a smaller one truncates it.
        config: tile override (tests); default from the device.
    Without ``num_candidates``, reads ``N`` on the host (the output shape depends on it).
    """
    B, H, W, d, Hkv, C = _check(queries, keys, cand_starts, cand_ends)
    G = H // Hkv
    GW = G * W
    lo = _flat_range(cand_starts, keys.device)
    hi = _flat_range(cand_ends, keys.device)
    if num_candidates is not None:
        N = int(num_candidates)
    else:
        counts = (hi - lo).clamp(min=0)
        N = int(counts.max()) if counts.numel() else 0
    if out is None:
        out = torch.empty(B, Hkv, N, device=keys.device, dtype=torch.float32)
    elif tuple(out.shape) != (B, Hkv, N) or out.dtype != torch.float32:
        raise ValueError(f"out must be float32 [{B}, {Hkv}, {N}], got {out.dtype} {tuple(out.shape)}")
    if N == 0 or B * Hkv == 0:
        return out
    if GW == 0:
        return out.zero_()
    cfg = config or default_config(GW, d, compute_dtype(queries.dtype, keys.dtype), keys.device)
    if lse is None:
        lse = _lse(queries, keys, lo, hi, scale, causal=False, max_len=N, config=cfg)
    elif tuple(lse.shape) != (B, H, W):
        raise ValueError(f"lse must be [B, H, W] = [{B}, {H}, {W}], got {tuple(lse.shape)}")
    lse = lse.to(device=keys.device, dtype=torch.float32)

    block_m = min(next_pow2(max(GW, 16)), next_pow2(cfg.max_block_m))
    block_d = next_pow2(max(d, 16))
    mc = cdiv(GW, block_m)
    n_blocks = cdiv(N, cfg.block_n)
    programs = 4 * (cfg.programs or target_programs(keys.device))  # more programs: rows differ in length
    per_n = max(1, min(n_blocks, cdiv(programs, B * Hkv * mc)))
    blocks_per_prog = cdiv(n_blocks, per_n)
    chunk = blocks_per_prog * cfg.block_n
    dst = out if mc == 1 else torch.empty(mc, B, Hkv, N, device=keys.device, dtype=torch.float32)
    so = (0, *dst.stride()) if mc == 1 else dst.stride()
    cdt = compute_dtype(queries.dtype, keys.dtype)
    _scores_kernel[(cdiv(N, chunk), B * Hkv, mc)](
        queries,
        keys,
        lo,
        hi,
        lse,
        dst,
        *queries.stride(),
        *keys.stride(),
        *lse.stride(),
        *so,
        Hkv,
        G,
        W,
        C,
        d,
        N,
        chunk,
        float(scale) * LOG2E,
        UPCAST=queries.dtype != keys.dtype,
        DOT_PREC=dot_precision(cdt),
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=block_d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if mc > 1:
        torch.sum(dst, dim=0, out=out)
    return out
