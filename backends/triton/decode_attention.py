"""Decode attention over a compacted cache: GQA-native split-K flash decoding.

What it computes (semantics: :meth:`kvsieve.backend.KVBackend.decode_attention`): ``Q`` new queries per head
(``Q`` = 1 in plain decoding, small -- e.g. up to 16 -- when several tokens are fed at once) attend over the
live slots of their KV head; query ``i`` of row ``b``, head ``h`` (KV head ``j = h // G``) sees slots
``[starts[b, j], ends[b, j] - Q + i]`` (causal among the new tokens, whose keys are the last ``Q`` live
slots). A query that sees no slot outputs zeros. Slots outside ``[starts, ends)`` are never read.

Layout: ``queries [B, H, Q, d]``, ``keys``/``values [B, Hkv, C, d]`` (any strides), ``starts``/``ends int64
[B, Hkv]``, output ``[B, H, Q, d]`` in the queries' dtype. The ``M = G*Q`` queries of KV head ``j`` are the
rows ``r = g*Q + i`` of one ``[M, d]`` tile (query heads ``j*G + g``): K/V blocks are loaded once for the
whole group, never repeated to ``H`` heads. fp32 accumulation; fp32 inputs use exact ``ieee`` dot products (no
TF32).

Grids (``S`` splits chosen on the host by :func:`choose_num_splits` from ``B*Hkv``, the device's SM count and
the capacity: about 2 programs per SM, at least 256 capacity slots per split, and no split that leaves the
busiest SM a whole row's work anyway (``B*Hkv*MC`` rows close to the SM count, or above it, run unsplit, with
128-slot blocks when the launch fits in one wave). No host sync, so the call is CUDA-graph capturable):

* ``_decode_split_kernel``: ``(S, B*Hkv, MC)``. Program ``(s, b*Hkv + j, mc)`` takes chunk ``s`` of row
  ``(b, j)``'s live range -- the range is cut into ``S`` chunks of ``ceil(len / S)`` slots rounded up to
  ``BLOCK_N``, so the work follows ``ends - starts`` and not the capacity, and one long row is spread over
  ``S`` programs -- and query rows ``[mc*BLOCK_M, (mc+1)*BLOCK_M)`` (``MC > 1`` only when ``G*Q > BLOCK_M``).
  It runs an online softmax over its chunk and writes the partial (max, sum, unnormalised accumulator) to fp32
  buffers ``[B*Hkv, S, M]`` / ``[B*Hkv, S, M, d]``. With ``S == 1`` it writes the normalised output directly
  instead.
* ``_decode_reduce_kernel``: ``(B*Hkv, MR, DC)``, tiles from :func:`reduce_tiles`. Program ``(b*Hkv + j, mr,
  dc)`` combines the non-empty chunks of row ``(b, j)`` (it recomputes how many there are from
  ``starts``/``ends``) for a tile of query rows and of head-dim columns into the output: ``sum_s exp(m_s - m)
  acc_s / sum_s exp(m_s - m) l_s``. The partials of up to ``BLOCK_S`` chunks (the next power of two ``>= S``,
  at most ``DecodeConfig.reduce_tile / 64``: 128) are loaded at once as one block and combined in one
  vectorised pass, not one chunk after another; more splits loop over blocks of chunks. The
  ``[BLOCK_S, BLOCK_M, BLOCK_D]`` tile stays within ``reduce_tile`` (8192) fp32 elements by taking fewer head-dim
  columns, which also spreads the reduce over more programs (batch 1 at Hkv=8: ``S = 33``, ``G*Q = 4``,
  ``d = 128``: tiles of ``64 x 4 x 32``, 4 programs per row, 32 in all; 8 warps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, compute_dtype, dot_precision, interpret_mode, next_pow2, num_sms, prev_pow2

__all__ = ["decode_attention", "DecodeConfig", "choose_num_splits"]

LOG2E = 1.4426950408889634


class DecodeConfig:
    """Tile sizes and split count of the decode kernels (defaults from :func:`default_config`).

    ``block_n``, ``num_warps``, ``num_stages``: the split kernel's slots per block and launch options;
    ``max_block_m``: its query-row tile (``G*Q`` rows above it take several tiles, ``MC``). ``num_splits``:
    ``S`` forced (``None``: :func:`choose_num_splits` from the shapes and the device, with ``programs`` -- a
    target number of programs per launch, ``None``: 2 per SM -- and ``min_split_slots``). ``reduce_tile``:
    fp32 elements of the reduce kernel's partial tile (:func:`reduce_tiles`).
    """

    def __init__(
        self,
        block_n: int,
        max_block_m: int,
        num_warps: int = 4,
        num_stages: int = 2,
        num_splits: int | None = None,
        programs: int | None = None,
        reduce_tile: int = 8192,
        min_split_slots: int = 256,
    ):
        self.block_n = block_n
        self.max_block_m = max_block_m
        self.num_warps = num_warps
        self.num_stages = num_stages
        self.num_splits = num_splits
        self.programs = programs
        self.reduce_tile = reduce_tile
        self.min_split_slots = min_split_slots

    def __repr__(self) -> str:
        return (
            f"DecodeConfig(block_n={self.block_n}, max_block_m={self.max_block_m}, "
            f"num_warps={self.num_warps}, num_stages={self.num_stages}, num_splits={self.num_splits}, "
            f"programs={self.programs}, reduce_tile={self.reduce_tile}, min_split_slots={self.min_split_slots})"
        )


def default_config(head_dim: int, device: torch.device, one_wave: bool = False, element_size: int = 2) -> DecodeConfig:
    """Tiles tuned on an H200 (bf16, d=128, B=32, Hkv=8: ``benchmarks/kernels.py --sweep``). In the interpreter
    a split may be a single block, so small test shapes still run split-K with the default config.

    ``one_wave``: the launch is unsplit with at most one program per SM (e.g. R1-Distill-Qwen-7B at batch 32:
    128 rows on 132 SMs). Each SM then streams its row alone, and 128-slot blocks keep more bytes in flight:
    measured 4-7% faster than 64-slot blocks split in two, 6-9% faster than 64-slot blocks unsplit, at 4K-11K live
    slots (H200, bf16, d=128, ``benchmarks/kernels.py --sections decode_b32``). ``head_dim`` above 128 and K/V of
    more than 2 bytes an element (``element_size``; fp32) keep 64-slot blocks: three stages of 128-slot K and V
    tiles would not fit the shared memory (fp32 at d=128 asked for 272 KiB of the H200's 227)."""
    if device.type != "cuda" or interpret_mode():
        return DecodeConfig(block_n=16, max_block_m=64, num_warps=4, num_stages=1, min_split_slots=16)
    if one_wave and head_dim <= 128 and element_size <= 2:
        return DecodeConfig(block_n=128, max_block_m=64, num_warps=4, num_stages=3)
    return DecodeConfig(block_n=64 if head_dim > 64 else 128, max_block_m=64, num_warps=4, num_stages=3)


# split count (choose_num_splits)
PROGRAMS_PER_SM = 2  # target programs per SM when B*Hkv*MC >= SMs
# ... and when B*Hkv*MC < SMs (few rows). Measured on an H200 (benchmarks/kernels.py --sections decode_small, bf16,
# d=128, B in {1, 4}, L in {8K, 32K, 128K}): 2 per SM (the rule before) came within 4.5% of the best candidate of
# each cell on geometric mean, 3 per SM within 6.2% (slower at B=4, 8K: 60.4 vs 56.8 us), so 2 stays; the gain at
# small batch came from the vectorised reduce (0.341 -> 0.135 ms per Llama-3.1-8B step at batch 1)
SMALL_PROGRAMS_PER_SM = 2
MAX_PARTIAL_BYTES = 256 << 20  # fp32 split partials of one call
# a split that leaves the busiest SM a whole row's work runs unsplit in one wave (choose_num_splits); False restores
# the plain target of programs per SM (benchmarks/profile_decode.py compares both in one process)
UNSPLIT_ONE_WAVE = True
# ... when the rows alone keep at least this fraction of the SMs streaming: measured on an H200 (B*Hkv = 96, 112, 128
# rows, 5.6K-32K live slots), 112 and 128 rows ran faster unsplit, 96 rows 6-10% slower at 16K-32K than split in two
ONE_WAVE_FILL = (5, 6)
REDUCE_WARPS = 8  # the reduce kernel's warps: 32 fp32 of its 8192-element tile per thread, no register spills


def choose_num_splits(
    rows: int, mc: int, capacity: int, sms: int, block_n: int, config: DecodeConfig, row_partial_bytes: int
) -> int:
    """The split count ``S`` of one call: a pure function of the shapes and the device, never of the live
    lengths (no host sync: the call stays CUDA-graph capturable).

    Args:
        rows: ``B*Hkv``. mc: query-row tiles per row (``MC``). capacity: cache slots ``C``. sms: the device's SM
            count. block_n: the split kernel's ``BLOCK_N``. config: its ``num_splits``, ``programs`` and
            ``min_split_slots`` are used. row_partial_bytes: fp32 partial bytes one split adds per row
            (``4*M*(d + 2)``).

    * ``config.num_splits`` given: that (at least 1).
    * Else a target of ``P`` programs -- ``config.programs`` if given, else ``PROGRAMS_PER_SM`` (2) per SM when
      ``rows*mc >= sms`` and ``SMALL_PROGRAMS_PER_SM`` (2, measured) per SM when there are fewer rows than SMs
      -- gives ``S = P // (rows*mc)``, at least 1:
      by default ``rows*mc > sms`` runs unsplit (no partials, no reduce: measured fastest on an H200 at B=32,
      Hkv=8, 256 rows on 132 SMs).
    * A split must lighten the busiest SM: with ``S`` splits the ``rows*mc*S`` programs put
      ``ceil(rows*mc*S / sms)`` chunks of ``1/S`` row on some SM; when that is a whole row or more and the rows
      alone keep at least 5/6 of the SMs streaming (``ONE_WAVE_FILL``; 128 rows on 132 SMs split in two put two
      halves on most SMs), the split only adds partials and a reduce, and the call runs unsplit (measured on an
      H200 at B=32, Hkv=4, G=7: 4-7% faster at 4K-11K live slots, with the one-wave tiles of
      :func:`default_config`; at 96 rows the idle SMs cost more than the reduce, and the split stays). Not applied
      to ``config.programs``.
    * Each split covers at least ``max(block_n, config.min_split_slots)`` slots of the capacity: ``S <=
      ceil(C / that)`` (the live lengths, at most ``C``, are not known on the host).
    * The partials stay under ``MAX_PARTIAL_BYTES`` (256 MiB): ``S <= that // (rows * row_partial_bytes)``.

    On an H200 (132 SMs), Hkv=8, G*Q <= 64, defaults, capacity >= 8.5K: batch 32 -> 1 (unsplit), 16 -> 1,
    8 -> 4, 4 -> 8, 2 -> 16, 1 -> 33 (at C = 8K: 32 splits of 256 slots).
    """
    if config.num_splits is not None:
        return max(1, int(config.num_splits))
    work = max(1, rows * mc)
    if config.programs is not None:
        programs = config.programs
    else:
        programs = (PROGRAMS_PER_SM if work >= sms else SMALL_PROGRAMS_PER_SM) * sms
    n = programs // work
    n = min(n, cdiv(max(capacity, 1), max(block_n, config.min_split_slots, 1)))
    n = min(n, MAX_PARTIAL_BYTES // max(rows * row_partial_bytes, 1))
    if UNSPLIT_ONE_WAVE and config.programs is None and n > 1 and cdiv(work * n, max(sms, 1)) >= n \
            and work * ONE_WAVE_FILL[1] >= sms * ONE_WAVE_FILL[0]:
        return 1  # the busiest SM would still take a whole row's worth: splitting only adds the reduce
    return max(1, n)


def reduce_tiles(n_splits: int, M: int, d: int, budget: int) -> tuple[int, int, int]:
    """``(BLOCK_S, BLOCK_M, BLOCK_D)`` of :func:`_decode_reduce_kernel`, powers of two.

    One program combines ``BLOCK_S`` splits at a time (all of them in one pass when ``n_splits <= BLOCK_S``) for
    ``BLOCK_M`` query rows and ``BLOCK_D`` columns of the head dim; its ``[BLOCK_S, BLOCK_M, BLOCK_D]`` fp32 tile
    of partial accumulators stays within ``budget`` elements (as long as ``budget >= 16``), so a few rows or
    many splits leave fewer columns per program and more programs along ``d``. ``BLOCK_S`` leaves room for at
    least 4 rows of 16 columns, ``BLOCK_D`` is at least 16 (unless ``d`` is smaller).
    """
    block_s = min(next_pow2(n_splits), prev_pow2(budget // 64))
    block_m = min(next_pow2(M), prev_pow2(budget // (16 * block_s)))
    block_d = min(next_pow2(max(d, 16)), max(16, prev_pow2(budget // (block_s * block_m))))
    return block_s, block_m, block_d


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _row_chunks(lo_ptr, hi_ptr, bj, n_splits, block_n):
    """Row ``bj``'s live range ``[lo, hi)`` and its chunk length ``ceil(len / n_splits)`` rounded up to
    ``block_n`` (the split kernel's ``BLOCK_N``), with ``n_valid = ceil(len / chunk)`` non-empty chunks (0 for an
    empty row). Chunk ``s`` is ``[lo + s*chunk, min(lo + (s+1)*chunk, hi))``: non-empty exactly when
    ``s < n_valid``."""
    lo = tl.load(lo_ptr + bj)
    hi = tl.load(hi_ptr + bj)
    length = tl.maximum(hi - lo, 0)
    chunk = tl.cdiv(tl.cdiv(length, n_splits), block_n) * block_n
    n_valid = tl.where(length > 0, tl.cdiv(length, tl.maximum(chunk, 1)), 0)
    return lo, hi, chunk, n_valid


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    lo_ptr,
    hi_ptr,
    out_ptr,
    pm_ptr,
    pl_ptr,
    pacc_ptr,
    sq_b,
    sq_h,
    sq_q,
    sq_d,
    sk_b,
    sk_h,
    sk_c,
    sk_d,
    sv_b,
    sv_h,
    sv_c,
    sv_d,
    so_b,
    so_h,
    so_q,
    so_d,
    Hkv,
    G,
    Q,
    C,
    D,
    n_splits,
    qk_scale,
    SINGLE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One chunk of one row's live range for one tile of query rows.

    ``qk_scale = scale * log2(e)``. Partials: ``pm``/``pl`` ``[B*Hkv, S, M]`` (max in log2 units, sum),
    ``pacc`` ``[B*Hkv, S, M, D]``; all fp32, contiguous. ``SINGLE``: write ``out`` directly.
    """
    s = tl.program_id(0)
    bj = tl.program_id(1)
    mc = tl.program_id(2)
    b = bj // Hkv
    j = bj % Hkv
    lo, hi, chunk, _ = _row_chunks(lo_ptr, hi_ptr, bj, n_splits, BLOCK_N)
    c_lo = lo + s * chunk
    c_hi = tl.minimum(c_lo + chunk, hi)
    M = G * Q
    # empty chunks write nothing (the reduce kernel never reads them); one split: empty rows write zeros
    if (c_lo < c_hi) | (n_splits == 1):
        rows = mc * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        g = rows // Q
        i = rows % Q
        dcols = tl.arange(0, BLOCK_D)
        dmask = dcols < D
        q = tl.load(
            q_ptr
            + b.to(tl.int64) * sq_b
            + (j * G + g).to(tl.int64)[:, None] * sq_h
            + i.to(tl.int64)[:, None] * sq_q
            + dcols[None, :] * sq_d,
            mask=rmask[:, None] & dmask[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        row_end = hi - (Q - 1 - i)  # exclusive: query i sees [lo, hi - Q + i]
        k_base = k_ptr + b.to(tl.int64) * sk_b + j.to(tl.int64) * sk_h
        v_base = v_ptr + b.to(tl.int64) * sv_b + j.to(tl.int64) * sv_h

        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start in range(c_lo, c_hi, BLOCK_N):
            slots = start + tl.arange(0, BLOCK_N)
            kmask = (slots < c_hi) & (slots >= 0) & (slots < C)
            tile_mask = kmask[:, None] & dmask[None, :]
            k = tl.load(k_base + slots[:, None] * sk_c + dcols[None, :] * sk_d, mask=tile_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            logits = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            visible = kmask[None, :] & (slots[None, :] < row_end[:, None])
            logits = tl.where(visible, logits, float("-inf"))
            m_new = tl.maximum(m, tl.max(logits, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_safe)
            p = tl.exp2(logits - m_safe[:, None])
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(v_base + slots[:, None] * sv_c + dcols[None, :] * sv_d, mask=tile_mask, other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m = m_new

        if SINGLE:
            o = acc / tl.where(l > 0.0, l, 1.0)[:, None]  # l == 0: nothing visible -> zeros (acc == 0)
            tl.store(
                out_ptr
                + b.to(tl.int64) * so_b
                + (j * G + g).to(tl.int64)[:, None] * so_h
                + i.to(tl.int64)[:, None] * so_q
                + dcols[None, :] * so_d,
                o.to(out_ptr.dtype.element_ty),
                mask=rmask[:, None] & dmask[None, :],
            )
        else:
            prow = (bj.to(tl.int64) * n_splits + s) * M + rows
            tl.store(pm_ptr + prow, m, mask=rmask)
            tl.store(pl_ptr + prow, l, mask=rmask)
            tl.store(pacc_ptr + prow[:, None] * D + dcols[None, :], acc, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _decode_reduce_kernel(
    lo_ptr,
    hi_ptr,
    out_ptr,
    pm_ptr,
    pl_ptr,
    pacc_ptr,
    so_b,
    so_h,
    so_q,
    so_d,
    Hkv,
    G,
    Q,
    D,
    n_splits,
    block_n,
    BLOCK_S: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Combine the non-empty chunks of row ``(b, j)`` into the output, for query rows
    ``[mr*BLOCK_M, (mr+1)*BLOCK_M)`` and head-dim columns ``[dc*BLOCK_D, (dc+1)*BLOCK_D)`` (program
    ``(b*Hkv + j, mr, dc)``).

    Partials as the split kernel writes them: ``pm``/``pl`` ``[B*Hkv, S, M]``, ``pacc`` ``[B*Hkv, S, M, D]``
    (fp32, contiguous); ``block_n`` is the split kernel's ``BLOCK_N`` (a plain argument here: one compiled reduce
    serves every ``BLOCK_N``). The chunks are loaded ``BLOCK_S`` at a time as one ``[BLOCK_S, BLOCK_M]`` /
    ``[BLOCK_S, BLOCK_M, BLOCK_D]`` block -- one pass when the row has at most ``BLOCK_S`` non-empty chunks --
    and combined at once: block max ``m``, weights ``exp2(m_s - m)`` (0 for a chunk in which a query saw
    nothing), weighted sums over ``s``. Chunks ``s >= n_valid`` (recomputed from ``starts``/``ends``) are masked
    and never read (the split kernel did not write them). Successive blocks (only when ``n_valid > BLOCK_S``)
    are merged by the usual online rescaling. A query row with no visible slot (``l == 0``) gets zeros.
    """
    bj = tl.program_id(0)
    mr = tl.program_id(1)
    dc = tl.program_id(2)
    b = bj // Hkv
    j = bj % Hkv
    _, _, _, n_valid = _row_chunks(lo_ptr, hi_ptr, bj, n_splits, block_n)

    M = G * Q
    rows = mr * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    g = rows // Q
    i = rows % Q
    dcols = dc * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < D
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row0 = bj.to(tl.int64) * n_splits * M  # the row's first partial; offsets from it (< S*M*D) fit in int32
    for s0 in range(0, n_valid, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        prow = s[:, None] * M + rows[None, :]  # [BLOCK_S, BLOCK_M]
        pmask = (s < n_valid)[:, None] & rmask[None, :]
        m_s = tl.load(pm_ptr + row0 + prow, mask=pmask, other=float("-inf"))
        l_s = tl.load(pl_ptr + row0 + prow, mask=pmask, other=0.0)
        acc_s = tl.load(
            pacc_ptr + row0 * D + prow[:, :, None] * D + dcols[None, None, :],
            mask=pmask[:, :, None] & dmask[None, None, :],
            other=0.0,
        )  # [BLOCK_S, BLOCK_M, BLOCK_D]
        m_new = tl.maximum(m, tl.max(m_s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(m_s - m_safe[None, :])  # [BLOCK_S, BLOCK_M]; 0 where m_s == -inf (masked or nothing seen)
        l = l * alpha + tl.sum(l_s * w, 0)
        acc = acc * alpha[:, None] + tl.sum(acc_s * w[:, :, None], 0)
        m = m_new
    o = acc / tl.where(l > 0.0, l, 1.0)[:, None]  # l == 0: nothing visible (or an empty row) -> zeros
    tl.store(
        out_ptr
        + b.to(tl.int64) * so_b
        + (j * G + g).to(tl.int64)[:, None] * so_h
        + i.to(tl.int64)[:, None] * so_q
        + dcols[None, :] * so_d,
        o.to(out_ptr.dtype.element_ty),
        mask=rmask[:, None] & dmask[None, :],
    )


# -------------------------------------------------------------------------------------------- launcher
def decode_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """``[B, H, Q, d]``: attention of ``Q`` new queries over the live slots ``[starts, ends)`` (causal among
    the
    last ``Q``).

    Args:
        queries: ``[B, H, Q, d]``; keys, values: ``[B, Hkv, C, d]``; starts, ends: ``int64 [B, Hkv]``.
        scale: softmax scale.
        out: optional preallocated ``[B, H, Q, d]`` output in the queries' dtype (every element is written).
        config: tile/split override (tests, tuning); default from the device.
    """
    if queries.dim() != 4 or keys.dim() != 4 or values.shape != keys.shape:
        raise ValueError(
            f"queries [B, H, Q, d] and keys/values [B, Hkv, C, d] of one shape expected, got "
            f"{tuple(queries.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}"
        )
    B, H, Q, d = queries.shape
    _, Hkv, C, dk = keys.shape
    if keys.shape[0] != B or dk != d or Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"queries {tuple(queries.shape)} do not match keys {tuple(keys.shape)}")
    if tuple(starts.shape) != (B, Hkv) or tuple(ends.shape) != (B, Hkv):
        raise ValueError(f"starts/ends must be [B, Hkv] = [{B}, {Hkv}]")
    if out is None:
        out = torch.empty(B, H, Q, d, device=queries.device, dtype=queries.dtype)
    elif tuple(out.shape) != (B, H, Q, d) or out.dtype != queries.dtype:
        raise ValueError(f"out must be {queries.dtype} [{B}, {H}, {Q}, {d}]")
    if out.numel() == 0:
        return out
    G = H // Hkv
    M = G * Q
    cfg = config or default_config(d, keys.device)
    block_m = min(next_pow2(max(M, 16)), next_pow2(cfg.max_block_m))
    block_d = next_pow2(max(d, 16))
    mc = cdiv(M, block_m)
    lo = starts.to(device=keys.device, dtype=torch.int64).contiguous()
    hi = ends.to(device=keys.device, dtype=torch.int64).contiguous()
    sms = num_sms(keys.device)
    n_splits = choose_num_splits(B * Hkv, mc, C, sms, cfg.block_n, cfg, 4 * M * (d + 2))
    if config is None and n_splits == 1 and B * Hkv * mc <= sms:
        cfg = default_config(d, keys.device, one_wave=True,
                             element_size=max(keys.element_size(), values.element_size()))
    single = n_splits == 1
    if single:
        pm = pl = pacc = out  # unused
    else:
        pm = torch.empty(B * Hkv, n_splits, M, device=keys.device, dtype=torch.float32)
        pl = torch.empty_like(pm)
        pacc = torch.empty(B * Hkv, n_splits, M, d, device=keys.device, dtype=torch.float32)
    cdt = compute_dtype(queries.dtype, keys.dtype) if keys.dtype == values.dtype else torch.float32
    upcast = not (queries.dtype == keys.dtype == values.dtype)
    _decode_split_kernel[(n_splits, B * Hkv, mc)](
        queries,
        keys,
        values,
        lo,
        hi,
        out,
        pm,
        pl,
        pacc,
        *queries.stride(),
        *keys.stride(),
        *values.stride(),
        *out.stride(),
        Hkv,
        G,
        Q,
        C,
        d,
        n_splits,
        float(scale) * LOG2E,
        SINGLE=single,
        UPCAST=upcast,
        DOT_PREC=dot_precision(cdt),
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=block_d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if not single:
        r_s, r_m, r_d = reduce_tiles(n_splits, M, d, cfg.reduce_tile)
        _decode_reduce_kernel[(B * Hkv, cdiv(M, r_m), cdiv(d, r_d))](
            lo,
            hi,
            out,
            pm,
            pl,
            pacc,
            *out.stride(),
            Hkv,
            G,
            Q,
            d,
            n_splits,
            cfg.block_n,
            BLOCK_S=r_s,
            BLOCK_M=r_m,
            BLOCK_D=r_d,
            num_warps=REDUCE_WARPS,
        )
    return out
