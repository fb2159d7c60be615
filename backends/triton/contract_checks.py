"""The run-time contract checks (:mod:`kvsieve.contracts`) in a few fused launches per compression.

What they compute (semantics and torch references: :mod:`kvsieve.contract_ops`; backend methods
:meth:`KVBackend.cache_fingerprint <kvsieve.backend.KVBackend.cache_fingerprint>`, ``cache_changed``,
``nonfinite_scores``, ``check_selection``): the same faults, the same stand-in. The torch references take some
70 small kernels per compression; these take seven: five launches and two memsets of fault flags:

* ``_fingerprint_kernel``, grid ``(B*Hkv, S)``, ``S = ceil(C / chunk)``: program ``(b*Hkv + j, s)`` sums the keys,
  values (fp32) and positions (int64) of the live slots ``[starts, ends)`` inside chunk ``s`` (slots ``[s*chunk,
  (s+1)*chunk)``), in ``BLOCK_C``-slot blocks whose boundaries are fixed relative to the chunk (a slot always lands
  in the same accumulator lane, so the order of the sum depends only on which slots are live: deterministic).
  It writes the fingerprint (``float64 [B, Hkv, 3S + 2]``, :func:`kvsieve.contract_ops.cache_fingerprint`'s
  layout), or, with ``COMPARE``, compares its sums with a fingerprint taken before (a NaN sum equals a NaN sum) and
  raises a flag by ``atomic_max`` (``cache_changed``: the flag's zeroing plus one launch).
* ``_nonfinite_kernel``, grid ``(B*Hkv, cdiv(N, BLOCK_N))``: a non-finite score among a block of a row's valid
  candidates raises the flag (``atomic_max``; zeroing plus one launch).
* ``_selection_rules_kernel``, grid ``(B*Hkv,)``: program ``(b, j)`` checks head ``j``'s counts and, sweeping its
  real kept entries in ``BLOCK_K`` blocks, their order, range and protection; a head-adaptive program also loads
  row ``b``'s ``kept``/``counts``/``budget`` of every KV head (``BLOCK_H`` lanes) to check the row's total. One
  fault flag per ``(b, j)`` (written, not accumulated: no zeroing). One program per (row, KV head) rather than per
  row: at batch 1 a row's KV heads sweep their lists in parallel.
* ``_stand_in_kernel``, grid ``(B*Hkv,)``: every program reduces all ``B*Hkv`` fault flags (a few hundred int32
  at most), then writes its row of ``keep_out``/``kept_out``: the selection, or, when any flag is set, the stand-in
  (the first ``min(counts, budget, K)`` candidates, -1 beyond); program 0 writes the 0-dim ``broken`` flag.

Flags are ``int32`` 0-dim tensors (nonzero = the fault), which :class:`~kvsieve.contracts.FlagSink` and the
guard's reads accept like bools. Graph-capturable: no launcher reads a device value, every size comes from a
shape. Offsets are int64. Dtypes the kernels do not load (e.g. float8 scores or caches) fall back to the
references.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvsieve import contract_ops
from kvsieve.contract_ops import FINGERPRINT_CHUNK, fingerprint_width

from ._common import cdiv, next_pow2

__all__ = ["ContractChecksConfig", "cache_changed", "cache_fingerprint", "check_selection", "nonfinite_scores"]

_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SCORE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


class ContractChecksConfig:
    """Tile overrides (tests force several blocks at tiny sizes); powers of two, ``None`` for the default.

    ``block_slots``: cache slots per fingerprint step (default ``4096 / next_pow2(d)``, 16 to ``chunk``);
    ``block_n``: scores per program (default 1024); ``block_k``: kept entries per step (default up to 1024);
    ``block_flags``: fault flags the stand-in reduces per step (default up to 1024).
    """

    def __init__(self, block_slots: int | None = None, block_n: int | None = None, block_k: int | None = None,
                 block_flags: int | None = None):
        for name, v in (("block_slots", block_slots), ("block_n", block_n), ("block_k", block_k),
                        ("block_flags", block_flags)):
            if v is not None and (v < 1 or v & (v - 1)):
                raise ValueError(f"{name} must be a power of two >= 1, got {v}")
        self.block_slots, self.block_n, self.block_k, self.block_flags = block_slots, block_n, block_k, block_flags


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _differs(a, b):
    """``a != b`` with NaN equal to NaN."""
    return (a != b) & ~((a != a) & (b != b))


@triton.jit
def _fingerprint_kernel(
    k_ptr, v_ptr, p_ptr, s_ptr, e_ptr, fp_ptr, before_ptr, flag_ptr,
    sk_b, sk_h, sk_c, sk_d,
    sv_b, sv_h, sv_c, sv_d,
    sp_b, sp_h, sp_c,
    ss_b, ss_h,
    se_b, se_h,
    Hkv, C, D, S, CHUNK,
    COMPARE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Chunk ``s`` of row ``(b, j)``: its live sums into the fingerprint, or (``COMPARE``) against ``before``."""
    bj = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    b = bj // Hkv
    j = bj % Hkv
    start = tl.load(s_ptr + b * ss_b + j * ss_h)
    end = tl.load(e_ptr + b * se_b + j * se_h)
    chunk_lo = s * CHUNK
    lo = tl.maximum(tl.maximum(start, chunk_lo), 0)
    hi = tl.minimum(tl.minimum(end, chunk_lo + CHUNK), C)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    k_row = k_ptr + b * sk_b + j * sk_h
    v_row = v_ptr + b * sv_b + j * sv_h
    p_row = p_ptr + b * sp_b + j * sp_h
    key_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    value_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    position_acc = tl.zeros([BLOCK_C], dtype=tl.int64)
    first = chunk_lo + (tl.maximum(lo - chunk_lo, 0) // BLOCK_C) * BLOCK_C  # block boundaries fixed in the chunk
    for c0 in range(first, hi, BLOCK_C):
        slots = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        live = (slots >= lo) & (slots < hi)
        tile = live[:, None] & col_ok[None, :]
        keys = tl.load(k_row + slots[:, None] * sk_c + cols[None, :] * sk_d, mask=tile, other=0.0)
        values = tl.load(v_row + slots[:, None] * sv_c + cols[None, :] * sv_d, mask=tile, other=0.0)
        key_acc += tl.sum(keys.to(tl.float32), axis=1)
        value_acc += tl.sum(values.to(tl.float32), axis=1)
        position_acc += tl.load(p_row + slots * sp_c, mask=live, other=0)
    key_sum = tl.sum(key_acc, axis=0).to(tl.float64)
    value_sum = tl.sum(value_acc, axis=0).to(tl.float64)
    position_sum = tl.sum(position_acc, axis=0).to(tl.float64)
    width = 3 * S + 2
    first_chunk = s == 0  # the range is stored (compared) once per row
    if COMPARE:
        old = before_ptr + bj * width
        changed = _differs(key_sum, tl.load(old + s)) | _differs(value_sum, tl.load(old + S + s)) \
            | _differs(position_sum, tl.load(old + 2 * S + s))
        range_changed = (tl.load(old + 3 * S) != start.to(tl.float64)) \
            | (tl.load(old + 3 * S + 1) != end.to(tl.float64))
        changed = changed | (range_changed & first_chunk)
        tl.atomic_max(flag_ptr, changed.to(tl.int32), mask=changed)
    else:
        out = fp_ptr + bj * width
        tl.store(out + s, key_sum)
        tl.store(out + S + s, value_sum)
        tl.store(out + 2 * S + s, position_sum)
        tl.store(out + 3 * S, start.to(tl.float64), mask=first_chunk)
        tl.store(out + 3 * S + 1, end.to(tl.float64), mask=first_chunk)


# the sizes and budgets that change from one compression to the next (RPC: every interval) are not specialised on
# (divisibility by 16, equality to 1): one compiled kernel serves them all instead of a recompile mid-decode
@triton.jit(do_not_specialize=["N"])
def _nonfinite_kernel(sc_ptr, cnt_ptr, flag_ptr, ss_b, ss_h, ss_n, sc_b, sc_h, Hkv, N, BLOCK_N: tl.constexpr):
    """Block ``c`` of row ``(b, j)``'s scores: a non-finite one below ``counts[b, j]`` raises the flag."""
    bj = tl.program_id(0).to(tl.int64)
    b = bj // Hkv
    j = bj % Hkv
    count = tl.load(cnt_ptr + b * sc_b + j * sc_h)
    n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = (n < N) & (n < count)
    scores = tl.load(sc_ptr + b * ss_b + j * ss_h + n * ss_n, mask=valid, other=0.0)
    bad = tl.max((valid & ~(tl.abs(scores) < float("inf"))).to(tl.int32), axis=0)  # NaN and +-inf fail "< inf"
    tl.atomic_max(flag_ptr, bad, mask=bad > 0)


@triton.jit
def _per_head(ptr, s_b, s_h, b, heads, mask, value, PER_HEAD: tl.constexpr):
    """``ptr[b, heads]`` (``int64 [B, Hkv]`` of strides ``s_b``, ``s_h``; 0 where not ``mask``) when
    ``PER_HEAD``, else the int ``value``, as int64."""
    if PER_HEAD:
        return tl.load(ptr + b * s_b + heads * s_h, mask=mask, other=0)
    else:
        return tl.zeros([], dtype=tl.int64) + value


@triton.jit(do_not_specialize=["budget_value", "tail_value", "K"])
def _selection_rules_kernel(
    keep_ptr, kept_ptr, cnt_ptr, budget_ptr, tail_ptr, flags_ptr,
    sk_b, sk_h, sk_k,
    skt_b, skt_h,
    sc_b, sc_h,
    sb_b, sb_h,
    st_b, st_h,
    budget_value, tail_value, protect_head, Hkv, K,
    ADAPTIVE: tl.constexpr,
    BUDGET_PER_HEAD: tl.constexpr,
    TAIL_PER_HEAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``flags[b*Hkv + j]``: head ``j`` of row ``b`` breaks a rule (a head-adaptive program checks its row's total
    too)."""
    bj = tl.program_id(0).to(tl.int64)
    b = bj // Hkv
    j = bj % Hkv
    n = tl.load(cnt_ptr + b * sc_b + j * sc_h)
    kept = tl.load(kept_ptr + b * skt_b + j * skt_h)
    budget = _per_head(budget_ptr, sb_b, sb_h, b, j, True, budget_value, BUDGET_PER_HEAD)
    tail = _per_head(tail_ptr, st_b, st_h, b, j, True, tail_value, TAIL_PER_HEAD)
    head = tl.zeros([], dtype=tl.int64) + protect_head
    if ADAPTIVE:
        heads = tl.arange(0, BLOCK_H).to(tl.int64)
        in_row = heads < Hkv
        row_kept = tl.load(kept_ptr + b * skt_b + heads * skt_h, mask=in_row, other=0)
        row_counts = tl.load(cnt_ptr + b * sc_b + heads * sc_h, mask=in_row, other=0)
        row_budgets = _per_head(budget_ptr, sb_b, sb_h, b, heads, in_row, budget_value, BUDGET_PER_HEAD)
        row_total_wrong = tl.sum(row_kept, axis=0) != tl.sum(tl.minimum(row_counts, row_budgets), axis=0)
        miscounted = row_total_wrong | (kept > n) | (kept < tl.minimum(n, head + tail))
        evicting = kept < n
    else:
        miscounted = kept != tl.minimum(n, budget)
        evicting = n > budget
    bad = (miscounted | (kept > K)).to(tl.int32)
    real_end = tl.minimum(tl.maximum(kept, 0), K)  # entries past kept are not looked at
    row = keep_ptr + b * sk_b + j * sk_h
    for k0 in range(0, real_end, BLOCK_K):
        idx = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        real = idx < real_end
        value = tl.load(row + idx * sk_k, mask=real, other=0)
        previous = tl.load(row + (idx - 1) * sk_k, mask=real & (idx > 0), other=-1)
        protected_value = tl.where(idx < head, idx, n - kept + idx)
        is_protected = (idx < head) | (idx >= kept - tail)
        wrong = (value <= previous) | (value >= n) | (is_protected & (value != protected_value) & evicting)
        bad = tl.maximum(bad, tl.max((real & wrong).to(tl.int32), axis=0))
    tl.store(flags_ptr + bj, bad)


@triton.jit(do_not_specialize=["budget_value", "K", "F"])
def _stand_in_kernel(
    keep_ptr, kept_ptr, cnt_ptr, budget_ptr, flags_ptr, keep_out_ptr, kept_out_ptr, broken_ptr,
    sk_b, sk_h, sk_k,
    skt_b, skt_h,
    sc_b, sc_h,
    sb_b, sb_h,
    budget_value, Hkv, K, F,
    BUDGET_PER_HEAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """Row ``(b, j)`` of the output: the selection, or the stand-in when any of the ``F`` flags is set."""
    bj = tl.program_id(0).to(tl.int64)
    b = bj // Hkv
    j = bj % Hkv
    broken = tl.zeros([], dtype=tl.int32)
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        broken = tl.maximum(broken, tl.max(tl.load(flags_ptr + f, mask=f < F, other=0), axis=0))
    is_broken = broken > 0
    n = tl.load(cnt_ptr + b * sc_b + j * sc_h)
    budget = _per_head(budget_ptr, sb_b, sb_h, b, j, True, budget_value, BUDGET_PER_HEAD)
    stand_in_count = tl.minimum(tl.minimum(n, budget), K)
    kept = tl.load(kept_ptr + b * skt_b + j * skt_h)
    tl.store(kept_out_ptr + bj, tl.where(is_broken, stand_in_count, kept))
    row = keep_ptr + b * sk_b + j * sk_h
    for k0 in range(0, K, BLOCK_K):
        idx = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        inside = idx < K
        value = tl.load(row + idx * sk_k, mask=inside, other=0)
        stand_in = tl.where(idx < stand_in_count, idx, -1)
        tl.store(keep_out_ptr + bj * K + idx, tl.where(is_broken, stand_in, value), mask=inside)
    tl.store(broken_ptr, broken, mask=bj == 0)


# ------------------------------------------------------------------------------------------- launchers
def _flag(device: torch.device) -> torch.Tensor:
    """A cleared ``int32 []`` fault flag (one memset)."""
    return torch.zeros((), dtype=torch.int32, device=device)


def _launch_fingerprint(keys, values, positions, starts, ends, chunk, before, config) -> torch.Tensor:
    """``before is None``: the fingerprint; else the changed flag."""
    B, Hkv, C, d = keys.shape
    S = cdiv(C, chunk)
    cfg = config or ContractChecksConfig()
    block_d = next_pow2(max(d, 1))
    block_c = cfg.block_slots or min(max(16, 4096 // block_d), next_pow2(chunk))
    if B * Hkv * S == 0:  # no chunk to sum: nothing for a kernel to do beyond the ranges
        if before is None:
            return contract_ops.cache_fingerprint(keys, values, positions, starts, ends, chunk=chunk)
        return contract_ops.cache_changed(before, keys, values, positions, starts, ends, chunk=chunk)
    unused = keys.new_empty(0, dtype=torch.float64)  # the pointer the other variant does not touch
    if before is None:
        fingerprint, flag = torch.empty(B, Hkv, fingerprint_width(C, chunk), dtype=torch.float64,
                                        device=keys.device), unused
    else:
        fingerprint, flag = unused, _flag(keys.device)
    _fingerprint_kernel[(B * Hkv, S)](
        keys, values, positions, starts, ends, fingerprint, before if before is not None else unused, flag,
        *keys.stride(), *values.stride(), *positions.stride(), *starts.stride(), *ends.stride(),
        Hkv, C, d, S, chunk,
        COMPARE=before is not None, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=4,
    )
    return fingerprint if before is None else flag


def cache_fingerprint(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor,
                      ends: torch.Tensor, *, chunk: int = FINGERPRINT_CHUNK,
                      config: ContractChecksConfig | None = None) -> torch.Tensor:
    """:func:`kvsieve.contract_ops.cache_fingerprint` in one launch: ``float64 [B, Hkv, 3 * ceil(C / chunk) + 2]``.

    Args:
        keys, values: ``[B, Hkv, C, d]`` (float32/bfloat16/float16, any strides); positions: ``int64 [B, Hkv, C]``;
            starts, ends: ``int64 [B, Hkv]``; chunk: slots per chunk; config: tile override (tests).
    The float sums are the reference's within fp32 rounding (another order of addition); the rest exact.
    """
    if keys.dtype not in _CACHE_DTYPES or values.dtype not in _CACHE_DTYPES:
        return contract_ops.cache_fingerprint(keys, values, positions, starts, ends, chunk=chunk)
    return _launch_fingerprint(keys, values, positions, starts, ends, chunk, None, config)


def cache_changed(before: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                  starts: torch.Tensor, ends: torch.Tensor, *, chunk: int = FINGERPRINT_CHUNK,
                  config: ContractChecksConfig | None = None) -> torch.Tensor:
    """``int32 []``, nonzero when the cache's fingerprint differs from ``before`` (a :func:`cache_fingerprint` of
    the same ``chunk``): the recomputation and the comparison in one launch, after the flag's zeroing. A ``before``
    of another shape (the cache's shape changed) is a change."""
    if keys.dtype not in _CACHE_DTYPES or values.dtype not in _CACHE_DTYPES:
        return contract_ops.cache_changed(before, keys, values, positions, starts, ends, chunk=chunk)
    B, Hkv, C, _ = keys.shape
    if tuple(before.shape) != (B, Hkv, fingerprint_width(C, chunk)) or before.dtype != torch.float64:
        return torch.ones((), dtype=torch.int32, device=keys.device)
    return _launch_fingerprint(keys, values, positions, starts, ends, chunk, before.contiguous(), config)


def nonfinite_scores(scores: torch.Tensor, counts: torch.Tensor, *,
                     config: ContractChecksConfig | None = None) -> torch.Tensor:
    """:func:`kvsieve.contract_ops.nonfinite_scores` (``scores`` floating ``[B, Hkv, N]`` of any strides, ``counts
    int64 [B, Hkv]``) as ``int32 []``: the flag's zeroing and one launch over ``(B*Hkv, cdiv(N, block_n))``."""
    if scores.dtype not in _SCORE_DTYPES:
        return contract_ops.nonfinite_scores(scores, counts)
    B, Hkv, N = scores.shape
    flag = _flag(scores.device)
    if B * Hkv * N == 0:
        return flag
    block_n = (config.block_n if config is not None else None) or min(1024, next_pow2(N))
    _nonfinite_kernel[(B * Hkv, cdiv(N, block_n))](
        scores, counts, flag, *scores.stride(), *counts.stride(), Hkv, N, BLOCK_N=block_n, num_warps=4,
    )
    return flag


def _int_or_per_head(value: int | torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, int, int, int, bool]:
    """``(pointer, stride_b, stride_h, scalar, per_head)`` kernel arguments for an int or an ``int64 [B, Hkv]``."""
    if isinstance(value, torch.Tensor):
        return value, *value.stride(), 0, True
    return like, 0, 0, int(value), False


def check_selection(keep: torch.Tensor, kept: torch.Tensor, counts: torch.Tensor, budget: int | torch.Tensor,
                    protect_head: int, protect_tail: int | torch.Tensor, head_adaptive: bool, *,
                    config: ContractChecksConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`kvsieve.contract_ops.check_selection` in two launches: ``(broken, keep_out, kept_out)``, ``broken``
    an ``int32 []`` flag, ``keep_out`` a new contiguous ``int64 [B, Hkv, K]``, ``kept_out`` ``int64 [B, Hkv]``.

    Args:
        keep: ``int64 [B, Hkv, K]``; kept, counts: ``int64 [B, Hkv]``; budget, protect_tail: an int or ``int64
            [B, Hkv]``; protect_head: an int; all tensors of any strides. config: tile override (tests).
    """
    B, Hkv, K = keep.shape
    device = keep.device
    rows = B * Hkv
    keep_out = torch.empty(B, Hkv, K, dtype=torch.int64, device=device)
    kept_out = torch.empty(B, Hkv, dtype=torch.int64, device=device)
    broken = torch.empty((), dtype=torch.int32, device=device)
    if rows == 0:
        return broken.zero_(), keep_out, kept_out
    cfg = config or ContractChecksConfig()
    block_k = cfg.block_k or min(1024, next_pow2(K))
    block_flags = cfg.block_flags or min(1024, next_pow2(rows))
    budget_args = _int_or_per_head(budget, counts)
    tail_ptr, tail_b, tail_h, tail_value, tail_per_head = _int_or_per_head(protect_tail, counts)
    flags = torch.empty(rows, dtype=torch.int32, device=device)
    _selection_rules_kernel[(rows,)](
        keep, kept, counts, budget_args[0], tail_ptr, flags,
        *keep.stride(), *kept.stride(), *counts.stride(), *budget_args[1:3], tail_b, tail_h,
        budget_args[3], tail_value, int(protect_head), Hkv, K,
        ADAPTIVE=bool(head_adaptive), BUDGET_PER_HEAD=budget_args[4], TAIL_PER_HEAD=tail_per_head,
        BLOCK_K=block_k, BLOCK_H=next_pow2(Hkv), num_warps=4,
    )
    _stand_in_kernel[(rows,)](
        keep, kept, counts, budget_args[0], flags, keep_out, kept_out, broken,
        *keep.stride(), *kept.stride(), *counts.stride(), *budget_args[1:3],
        budget_args[3], Hkv, K, rows,
        BUDGET_PER_HEAD=budget_args[4], BLOCK_K=block_k, BLOCK_F=block_flags, num_warps=4,
    )
    return broken, keep_out, kept_out
