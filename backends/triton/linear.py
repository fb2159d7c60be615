"""A Triton linear layer for the few rows of a decode step: ``y = x @ W.T (+ bias) (+ residual)``.

At batch 1-64 a decode step's projections read a weight matrix once for a handful of rows, so their time is the time
to stream ``W``; cuBLAS's kernels for these shapes stay 1.2-1.6x above that at batch 32 on an H200 for the short
GEMMs (o_proj, q/k/v) and split ``K`` with a separate reduce for the long one (down_proj) (docs/benchmarks.md).
This kernel is the candidate replacement, measured against cuBLAS by ``benchmarks/kernels.py --sections linear``;
the fused decoder layer does not use it by default. :func:`gate_up_silu` is the same kernel for the gated MLP's
gate/up projection with ``silu(gate) * up`` in its epilogue (the fused layer's opt-in
``FusedDecoderLayers.silu_in_gate_up``): it reads the weights the merged gate/up GEMM reads and saves the
``silu_mul`` launch and the round trip of ``[B, 2F]`` through memory.

* ``_skinny_linear_kernel``: grid ``(cdiv(N, BLOCK_N), cdiv(M, BLOCK_M))``. Program ``(n, m)`` owns output columns
  ``[n * BLOCK_N, (n + 1) * BLOCK_N)`` of rows ``[m * BLOCK_M, ...)``: it walks ``K`` in ``BLOCK_K`` steps, loading
  the ``[BLOCK_M, BLOCK_K]`` tile of ``x`` and the ``[BLOCK_N, BLOCK_K]`` tile of ``W`` (contiguous along ``K``,
  pipelined over ``num_stages``), and accumulates ``x_tile @ W_tile.T`` in fp32. The epilogue adds ``bias`` and
  ``residual`` (each converted to fp32) to the fp32 sum and rounds once to the output dtype, as cuBLAS's bias and
  ``beta = 1`` epilogues do. With ``LinearConfig.split_k > 1`` (grid ``(..., ..., S)``), program ``(n, m, s)`` sums
  only the ``s``-th contiguous share of ``K`` (a whole number of ``BLOCK_K`` steps) into an fp32 workspace
  ``[S, M, N]``, and ``_split_reduce_kernel`` (grid ``(M, cdiv(N, BLOCK))``) adds the shares in order, then the
  bias and residual, and rounds once: more programs for a narrow, long projection (down_proj), deterministic.
  ``GATED`` (:func:`gate_up_silu`): ``W`` stacks gate rows ``[0, F)`` and up rows ``[F, 2F)``; program ``n``'s weight
  tile is its ``BLOCK_N`` gate rows followed by the up rows ``F`` below them (one load and one dot of
  ``2 * BLOCK_N`` rows, as the plain kernel's tile of that width), and the epilogue splits the sum into its halves,
  rounds both (with their biases) to the output dtype and stores ``silu(gate) * up`` as ``silu_mul`` computes it
  (``layer_ops.silu_times``).

Layouts: ``x [..., K]`` (any strides; flattened to ``[M, K]`` with ``reshape``), ``weight [N, K]``, ``bias [N]``,
``residual [..., N]`` of ``x``'s leading shape. Offsets are int64. Graph-capturable (no host reads).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import cdiv, dot_precision, interpret_mode, next_pow2
from .layer_ops import _round, silu_times

__all__ = ["LinearConfig", "decode_config", "gate_up_silu", "skinny_linear"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_ROWS = 64  # the rows (M) this kernel is meant for; more runs, but a GEMM library serves them better


class LinearConfig:
    """Tiles of :func:`skinny_linear`: columns per program ``block_n``, ``K`` per step ``block_k``, ``num_warps``,
    ``num_stages`` (pipelined loads), and ``split_k``: programs that share one tile's ``K`` (each sums a contiguous
    share into an fp32 workspace; a second launch adds the shares in order, then the bias and residual).
    Defaults: ``block_n=32``, ``block_k=256``, 4 warps, 4 stages, no split."""

    def __init__(self, block_n: int = 32, block_k: int = 256, num_warps: int = 4, num_stages: int = 4,
                 split_k: int = 1):
        for name, v, low in (("block_n", block_n, 16), ("block_k", block_k, 16), ("num_warps", num_warps, 1)):
            if v < low or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= {low}, got {v}")
        for name, v in (("num_stages", num_stages), ("split_k", split_k)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.block_n, self.block_k, self.num_warps, self.num_stages = block_n, block_k, num_warps, num_stages
        self.split_k = split_k

    def __repr__(self) -> str:
        return (f"LinearConfig(block_n={self.block_n}, block_k={self.block_k}, num_warps={self.num_warps}, "
                f"num_stages={self.num_stages}, split_k={self.split_k})")


#: shared memory a launch's pipelined tiles may take: Triton keeps ``num_stages - 1`` tiles of ``x`` and ``W`` in
#: flight, and an H200 gives a block 227 KiB (the rest is left for the epilogue's layout conversions)
SHARED_BUDGET = 192 << 10


def block_rows(M: int) -> int:
    """The rows of ``x`` one program takes (``BLOCK_M``) for ``M`` rows: 16 to :data:`MAX_ROWS`."""
    return min(max(16, next_pow2(M)), MAX_ROWS)


def decode_config(x: torch.Tensor, weight: torch.Tensor) -> LinearConfig:
    """The tiles for a decode step's projection of ``x [..., K]`` by ``weight [N, K]``: 32 columns per program,
    4 stages, and the widest ``K`` step (512 down to 16, at most ``K`` rounded up to a power of two) whose
    pipelined tiles fit :data:`SHARED_BUDGET`. On an H200 at R1-7B shapes (batch 32) and Llama-3.1-8B shapes
    (batch 1), 32 columns and 512 of ``K`` in 4 stages were the fastest of 22 configurations for o_proj and
    down_proj (docs/benchmarks.md): more bytes in flight per program, the fewer programs the better."""
    rows, K = math.prod(x.shape[:-1]), weight.shape[1]
    block_n, stages = 32, 4
    block_k = min(512, max(16, next_pow2(K)))
    while block_k > 16 and (stages - 1) * (block_rows(rows) + block_n) * block_k * x.element_size() > SHARED_BUDGET:
        block_k //= 2
    return LinearConfig(block_n, block_k, 4, stages)


@triton.jit
def _skinny_linear_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    r_ptr,
    y_ptr,
    M,
    N,
    K,
    sx_m,
    sx_k,
    sw_n,
    sw_k,
    sr_m,
    sr_n,
    sy_m,
    K_CHUNK,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    PARTIAL: tl.constexpr,
    GATED: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Program ``(n, m, s)``: ``y[m-rows, n-cols] = x[m-rows] @ W[n-cols].T (+ b) (+ r)``, fp32 accumulation, over
    ``K`` share ``[s * K_CHUNK, (s + 1) * K_CHUNK)``. ``PARTIAL``: store the fp32 sum at ``y[s]`` (a ``[S, M, N]``
    workspace) for :func:`_split_reduce_kernel`, without bias or residual. ``GATED`` (no split, no residual):
    ``W`` is ``[2N, K]``, gate rows then up rows; the program's weight tile holds its gate rows and the up rows
    ``N`` below them (``BLOCK_W = 2 * BLOCK_N``), one dot sums both halves, and it stores ``silu(gate) * up``
    with each half (and its bias) rounded to ``y``'s dtype first, as two GEMMs and ``silu_mul`` would."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # the weight tile's rows: BLOCK_W = BLOCK_N columns, or (GATED) 2 * BLOCK_N -- the gate rows of this program's
    # columns, then their up rows N below -- loaded as one tile and multiplied in one dot
    j = tl.arange(0, BLOCK_W)
    w_cols = pid_n * BLOCK_N + j % BLOCK_N
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = x_ptr + rows[:, None] * sx_m
    w_rows = w_ptr + (w_cols + (j // BLOCK_N) * N)[:, None] * sw_n
    w_col_ok = (w_cols < N)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_W], dtype=tl.float32)
    k_start = pid_s * K_CHUNK
    k_end = tl.minimum(k_start + K_CHUNK, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + ks
        k_ok = k < k_end
        x = tl.load(x_rows + k[None, :] * sx_k, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + k[None, :] * sw_k, mask=w_col_ok & k_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's 16-bit tl.dot returns garbage (triton 3.9): multiply in fp32 there
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    out_ok = row_ok[:, None] & col_ok[None, :]
    if PARTIAL:
        tl.store(y_ptr + pid_s * M * N + rows[:, None] * N + cols[None, :], acc, mask=out_ok)
    elif GATED:
        # [BLOCK_M, 2 * BLOCK_N] -> the gate half and the up half, [BLOCK_M, BLOCK_N] each
        gate, up = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N]), (0, 2, 1)))
        if HAS_BIAS:
            gate += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            up += tl.load(b_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        gate = _round(gate, y_ptr.dtype.element_ty, UPCAST)
        up = _round(up, y_ptr.dtype.element_ty, UPCAST)
        tl.store(y_ptr + rows[:, None] * sy_m + cols[None, :], silu_times(gate, up, LIBDEVICE, UPCAST), mask=out_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_RESIDUAL:
            acc += tl.load(r_ptr + rows[:, None] * sr_m + cols[None, :] * sr_n, mask=out_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows[:, None] * sy_m + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _split_reduce_kernel(
    ws_ptr,
    b_ptr,
    r_ptr,
    y_ptr,
    M,
    N,
    S,
    sr_m,
    sr_n,
    sy_m,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program ``(m, n)``: ``y[m, cols] = round(sum_s ws[s, m, cols] (+ b) (+ r))``, the shares added in order."""
    m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(ws_ptr + (s * M + m) * N + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        acc += tl.load(r_ptr + m * sr_m + cols * sr_n, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * sy_m + cols, acc.to(y_ptr.dtype.element_ty), mask=ok)


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    config: LinearConfig | None = None,
) -> torch.Tensor:
    """``x @ weight.T (+ bias) (+ residual)`` in one launch, rounded once (see the module docstring).

    Args:
        x: ``[..., K]`` float32/bfloat16/float16, any strides.
        weight: ``[N, K]`` in ``x``'s dtype, any strides.
        bias: ``None`` or ``[N]`` in ``x``'s dtype.
        residual: ``None`` or ``[..., N]`` (``x``'s leading shape) in ``x``'s dtype.
        config: tiles (default :class:`LinearConfig`).

    Returns:
        ``[..., N]`` in ``x``'s dtype (a new tensor).
    """
    N, K, lead = _check_inputs(x, weight, bias, residual, weight_rows="N")
    config = config or LinearConfig()
    M = math.prod(lead)
    y = torch.empty(*lead, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        y.zero_()
        if bias is not None:
            y += bias
        if residual is not None:
            y += residual
        return y
    x2, y2 = x.reshape(M, K), y.view(M, N)
    r2 = residual.reshape(M, N) if residual is not None else y2
    # each share of K a whole number of BLOCK_K steps; a split beyond K's steps would leave shares empty
    split = min(config.split_k, cdiv(K, config.block_k))
    k_chunk = cdiv(cdiv(K, split), config.block_k) * config.block_k
    split = cdiv(K, k_chunk)
    partial = split > 1
    out = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if partial else y2
    _launch(x2, weight, bias, r2, out, N, config, k_chunk, split, residual is not None, gated=False)
    if partial:
        b = bias if bias is not None else weight  # never read without HAS_BIAS
        block = min(next_pow2(N), 1024)
        _split_reduce_kernel[(M, cdiv(N, block))](
            out, b, r2, y2, M, N, split, r2.stride(0), r2.stride(1), y2.stride(0),
            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=max(1, min(8, block // 256)),
        )
    return y


#: tiles of :func:`gate_up_silu` for 2-byte dtypes and for fp32 (half the K per step). ``block_n`` counts output
#: columns; each program's weight tile is twice that many rows (gate and up), so 16 columns stream the 32-row tile
#: that suits the plain kernel at decode shapes (docs/benchmarks.md)
GATED_CONFIG = LinearConfig(block_n=16, block_k=256, num_warps=4, num_stages=3)
GATED_CONFIG_FP32 = LinearConfig(block_n=16, block_k=128, num_warps=4, num_stages=3)


def gate_up_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: LinearConfig | None = None
) -> torch.Tensor:
    """``silu(x @ W_gate.T) * (x @ W_up.T)`` of a gated MLP in one launch: ``weight`` is gate_proj's and
    up_proj's weights stacked (``W_gate = weight[:F]``, ``W_up = weight[F:]``, as the fused layer's merged gate/up
    holds them). Each half is rounded to ``x``'s dtype before the SiLU product, as two GEMMs followed by
    :func:`kvsieve.backends.triton.layer_ops.silu_mul` would (the GEMM sums may round differently from a BLAS's).

    Args:
        x: ``[..., K]`` float32/bfloat16/float16, any strides.
        weight: ``[2F, K]`` in ``x``'s dtype. bias: ``None`` or ``[2F]`` (gate's then up's).
        config: tiles (default :data:`GATED_CONFIG`, :data:`GATED_CONFIG_FP32` for fp32; ``split_k`` must be 1).

    Returns:
        ``[..., F]`` in ``x``'s dtype (a new tensor).
    """
    N2, K, lead = _check_inputs(x, weight, bias, None, weight_rows="2F")
    if N2 % 2:
        raise ValueError(f"weight must stack gate and up rows ([2F, K]), got an odd row count {N2}")
    config = config or (GATED_CONFIG if x.element_size() <= 2 else GATED_CONFIG_FP32)
    if config.split_k != 1:
        raise ValueError(f"gate_up_silu does not split K, got config.split_k={config.split_k}")
    F, M = N2 // 2, math.prod(lead)
    y = torch.empty(*lead, F, dtype=x.dtype, device=x.device)
    if M == 0 or F == 0:
        return y
    if K == 0:  # both GEMMs are their biases (or zero)
        gate_up = torch.zeros(*lead, N2, dtype=x.dtype, device=x.device) if bias is None else bias.expand(*lead, N2)
        gate, up = gate_up.split(F, dim=-1)
        return torch.nn.functional.silu(gate) * up
    y2 = y.view(M, F)
    _launch(x.reshape(M, K), weight, bias, y2, y2, F, config, K, 1, False, gated=True)
    return y


def _check_inputs(x, weight, bias, residual, weight_rows: str) -> tuple[int, int, tuple]:
    """``(N, K, x's leading shape)`` of valid inputs (the checks of :func:`skinny_linear`); else ``ValueError``."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"x must be [..., K] and weight [{weight_rows}, K], got shapes {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x's last dim must equal weight's K={K}, got x of shape {tuple(x.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight must be in x's dtype {x.dtype}, got {weight.dtype}")
    lead = tuple(x.shape[:-1])
    for name, t, want in (("bias", bias, (N,)), ("residual", residual, (*lead, N))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {list(want)}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} must be in x's dtype {x.dtype}, got {t.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}: all must be on one device")
    return N, K, lead


def _launch(x2, weight, bias, r2, out, N, config: LinearConfig, k_chunk: int, split: int, has_residual: bool,
            gated: bool) -> None:
    """One launch of :func:`_skinny_linear_kernel` over ``x2 [M, K]`` and ``N`` output columns."""
    M, K = x2.shape
    block_m = block_rows(M)
    b = bias if bias is not None else weight  # never read without HAS_BIAS
    grid = (cdiv(N, config.block_n), cdiv(M, block_m), split)
    _skinny_linear_kernel[grid](
        x2, weight, b, r2, out, M, N, K,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), r2.stride(0), r2.stride(1), out.stride(-2),
        k_chunk, HAS_BIAS=bias is not None, HAS_RESIDUAL=has_residual, PARTIAL=split > 1, GATED=gated,
        PRECISION="ieee" if interpret_mode() else dot_precision(x2.dtype), UPCAST=interpret_mode(),
        LIBDEVICE=not interpret_mode(), BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_W=2 * config.block_n if gated else config.block_n, num_warps=config.num_warps,
        num_stages=config.num_stages, enable_fp_fusion=not gated,
    )
