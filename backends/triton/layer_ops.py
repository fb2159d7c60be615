"""The decode step's per-layer operators around attention, fused: RMSNorm (+ residual add), SiLU * up, and the
rotary embedding fused with the static cache's append.

What they compute (semantics and torch references: :mod:`kvsieve.layer_ops`; backend methods
:meth:`KVBackend.rms_norm <kvsieve.backend.KVBackend.rms_norm>`, ``silu_mul``, ``rope_append``): exactly what
HuggingFace's Llama-family layer computes, with every intermediate rounded where torch rounds it, so that the
results are bit for bit the reference's wherever the arithmetic is the same (see "Rounding" below).

* ``_rms_norm_kernel``: one program per row of ``x`` viewed as ``[N, D]`` (rows of any stride, columns of any
  stride). ``total = round_x(residual + x)`` (sum in fp32, rounded to ``x``'s dtype; written only when a
  residual is given), ``var = sum(total_f32**2) * fl32(1/D)``, ``hidden = round_x(total_f32 * rsqrt(var +
  eps))``, ``normed = round_out(weight_f32 * hidden_f32)`` with ``out = promote_types(weight.dtype, x.dtype)``.
  Rows of up to ``MAX_SINGLE_BLOCK`` columns are held in registers (one ``BLOCK_D = next_pow2(D)`` tile, one
  read of ``x``/``residual``); longer rows are swept twice in ``BLOCK_D`` chunks (sum of squares, then the
  output; the second sweep recomputes ``total`` from ``x`` and ``residual`` instead of reading back what the
  first wrote).
* ``_silu_mul_kernel``: grid ``(N, cdiv(F, BLOCK_F))`` over ``gate``/``up`` viewed as ``[N, F]``:
  ``out = round(round(silu(gate_f32)) * up)`` with ``silu(g) = g / (1 + exp(-g))`` in fp32 (IEEE division).
* ``_rope_append_kernel``: grid ``(B, H + Hkv)``, ONE launch for the whole step. Program ``(b, h < H)``
  rotates ``query[b, h, 0, :]`` in place (and, given the layer's selector-query ring ``[B, H, R, d]``, stores it
  at ring slot ``count[0] % R`` too); program ``(b, H + j)`` rotates ``key[b, j, 0, :]`` (``key`` itself
  is not changed), reads ``e = ends[b, j]``, writes the rotated key and ``value[b, j, 0, :]`` to
  ``keys``/``values[b, j, e, :]``, ``positions[b, j, e] = seen[0]`` and ``ends[b, j] = e + 1``. Each ``(b, j)``
  is owned by one program, so the read-modify-write of ``ends`` has no race. The rotation is HF's
  ``x * cos + rotate_half(x) * sin`` with each product and the sum rounded to the model dtype:
  ``out[:h] = round(round(x1 * c1) + round(-x2 * s1))``, ``out[h:] = round(round(x2 * c2) + round(x1 * s2))``
  (``h = d/2``, ``x1 = x[:h]``, ``x2 = x[h:]``). The two halves are loaded as two ``[BLOCK_H]`` tiles of one
  layout, so the thread that stores an element of the in-place query loaded it (and its partner): no other
  thread's store can overtake a load.

Layouts: ``x``/``residual [..., D]``, ``weight [D]``; ``gate``/``up [..., F]``; ``query [B, H, 1, d]``,
``key``/``value [B, Hkv, 1, d]``, ``cos``/``sin [B, 1, d]``, ``keys``/``values [B, Hkv, C, d]``, ``positions
int64 [B, Hkv, C]``, ``ends int64 [B, Hkv]``, ``seen int64 [1]``; all of any strides (the ``[..., D]`` inputs
are flattened with ``reshape``, a view unless their leading dims cannot be merged). Offsets are int64.

Rounding (why the results are the reference's, bit for bit, except where noted):

* Products and sums of two fp16/bf16 values are computed in fp32 and rounded once to the dtype, as torch does
  (on CPU and CUDA alike); fp32 products and sums are plain fp32 operations. The kernels are compiled with
  ``enable_fp_fusion=False`` so that no ``a*b + c`` becomes an FMA (torch runs them as separate kernels).
* ``exp``, ``rsqrt`` on a GPU: libdevice's ``__nv_expf``/``__nv_rsqrtf`` (CUDA's ``expf``/``rsqrtf``, which
  torch's CUDA kernels call), not Triton's ``tl.exp`` (an ``ex2.approx`` of ``x * log2(e)``, a few ulp off);
  division is IEEE ``div_rn``. Under the interpreter they are numpy's: its fp32 ``exp`` and torch's CPU (Sleef)
  one may disagree in the last bit, which moves the fp32 ``silu`` by up to 2 ulps (bf16/fp16 outputs almost
  never change). The interpreter's own fp32 -> bf16 cast truncates, so there :func:`_round` rounds to bf16 by
  integer ops (to nearest even, as a GPU's ``cvt.rn.bf16.f32`` and torch do).
* The RMSNorm's sum of squares is reduced in another order than torch's (whose CPU and CUDA kernels also differ
  from each other), so ``var`` and then ``rsqrt(var + eps)`` may differ in the last fp32 bit or two. That moves
  ``hidden`` by one unit in the last place of ``x``'s dtype: in fp32, in most elements of such a row; in
  bf16/fp16, only in the rare elements next to a rounding boundary. ``total`` is always exact.

Graph-capturable: no launcher reads a device value; ``ends`` and ``seen`` are read by the kernel.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._common import cdiv, interpret_mode, next_pow2, target_programs

__all__ = ["LayerOpsConfig", "rms_norm", "rope_append", "silu_mul"]

MAX_SINGLE_BLOCK = 8192  # rows up to this many columns are normalised from registers (one read of x)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class LayerOpsConfig:
    """Tile overrides (tests: force the chunked RMSNorm sweep or several column blocks at tiny sizes).

    ``norm_block_d``: columns per RMSNorm chunk (a row longer than it is swept twice in chunks; default
    ``next_pow2(D)`` up to :data:`MAX_SINGLE_BLOCK`, 4096-column chunks beyond); ``silu_block_f``: columns per
    SiLU program (default ``min(next_pow2(F), 1024)``, halved down to 128 while the grid has fewer programs than
    the device needs).
    """

    def __init__(self, norm_block_d: int | None = None, silu_block_f: int | None = None):
        for name, v in (("norm_block_d", norm_block_d), ("silu_block_f", silu_block_f)):
            if v is not None and (v < 1 or v & (v - 1)):
                raise ValueError(f"{name} must be a power of two >= 1, got {v}")
        self.norm_block_d = norm_block_d
        self.silu_block_f = silu_block_f

    def __repr__(self) -> str:
        return f"LayerOpsConfig(norm_block_d={self.norm_block_d}, silu_block_f={self.silu_block_f})"


@functools.cache
def _inv_fp32(n: int) -> float:
    """``1/n`` rounded to fp32 (exactly representable as the fp32 scalar argument Triton passes): torch's CUDA
    ``mean`` multiplies the sum by this factor."""
    return float(torch.tensor(1.0, dtype=torch.float32) / n)


def _warps(block: int) -> int:
    """Warps for a 1-D tile of ``block`` elements: ~8 elements per thread, 1..16 warps."""
    return max(1, min(16, block // 256))


def _libdevice() -> bool:
    """Use libdevice's accurate ``exp``/``rsqrt`` (compiled CUDA kernels); the interpreter has no libdevice."""
    return not interpret_mode()


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _round(x, dtype: tl.constexpr, EMULATED_BF16: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (round to nearest even). ``EMULATED_BF16``: bf16 rounding by integer ops;
    the interpreter's own fp32 -> bf16 cast truncates (Triton 3.x), a GPU's ``cvt.rn.bf16.f32`` does not."""
    if EMULATED_BF16 and dtype == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
        u = tl.where(x != x, 0x7FC0, u)  # NaN stays NaN (no carry into the sign bit)
        return u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _rsqrt(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.rsqrt(x)
    else:
        return tl.math.rsqrt(x)


@triton.jit
def _total_f32(
    x_row, r_row, t_row, cols, mask, sx_d, sr_d, HAS_RESIDUAL: tl.constexpr, STORE: tl.constexpr, EMU_BF16: tl.constexpr
):
    """``round_x(residual + x)`` of one tile of a row as fp32 (``x`` itself without a residual); optionally
    stored to the ``total`` row."""
    x = tl.load(x_row + cols * sx_d, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_row + cols * sr_d, mask=mask, other=0.0)
        t = _round(r.to(tl.float32) + x.to(tl.float32), x.dtype, EMU_BF16)
        if STORE:
            tl.store(t_row + cols, t, mask=mask)
        return t.to(tl.float32)
    else:
        return x.to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    out_ptr,
    t_ptr,
    sx_n,
    sx_d,
    sr_n,
    sr_d,
    sw,
    so_n,
    st_n,
    D,
    inv_d,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    SINGLE: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    EMU_BF16: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Row ``n``: ``t_ptr[n] = round_x(r + x)`` (with a residual), ``out_ptr[n] = RMSNorm(total) * w``.

    ``x``/``r`` rows ``[N, D]`` of strides ``(sx_n, sx_d)``/``(sr_n, sr_d)``; ``out``/``t`` rows of stride
    ``so_n``/``st_n``, columns contiguous; ``inv_d = fl32(1/D)``. ``SINGLE``: ``BLOCK_D >= D``, one tile.
    """
    row = tl.program_id(0).to(tl.int64)
    x_dtype = x_ptr.dtype.element_ty
    x_row, r_row, t_row, out_row = x_ptr + row * sx_n, r_ptr + row * sr_n, t_ptr + row * st_n, out_ptr + row * so_n
    if SINGLE:
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        h = _total_f32(x_row, r_row, t_row, cols, mask, sx_d, sr_d, HAS_RESIDUAL, True, EMU_BF16)
        var = tl.sum(h * h, axis=0) * inv_d
        r = _rsqrt(var + eps, LIBDEVICE)
        y = _round(h * r, x_dtype, EMU_BF16).to(tl.float32)
        w = tl.load(w_ptr + cols * sw, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + cols, _round(w * y, out_ptr.dtype.element_ty, EMU_BF16), mask=mask)
    else:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = cols < D
            h = _total_f32(x_row, r_row, t_row, cols, mask, sx_d, sr_d, HAS_RESIDUAL, True, EMU_BF16)
            acc += h * h
        var = tl.sum(acc, axis=0) * inv_d
        r = _rsqrt(var + eps, LIBDEVICE)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = cols < D
            h = _total_f32(x_row, r_row, t_row, cols, mask, sx_d, sr_d, HAS_RESIDUAL, False, EMU_BF16)
            y = _round(h * r, x_dtype, EMU_BF16).to(tl.float32)
            w = tl.load(w_ptr + cols * sw, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_row + cols, _round(w * y, out_ptr.dtype.element_ty, EMU_BF16), mask=mask)


@triton.jit
def _silu_mul_kernel(
    g_ptr,
    u_ptr,
    out_ptr,
    sg_n,
    sg_f,
    su_n,
    su_f,
    so_n,
    F,
    LIBDEVICE: tl.constexpr,
    EMU_BF16: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """Columns ``[c*BLOCK_F, (c+1)*BLOCK_F)`` of row ``n``: ``out = round(round(silu(g)) * u)``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F
    g = tl.load(g_ptr + row * sg_n + cols * sg_f, mask=mask, other=0.0)
    u = tl.load(u_ptr + row * su_n + cols * su_f, mask=mask, other=0.0)
    tl.store(out_ptr + row * so_n + cols, silu_times(g, u, LIBDEVICE, EMU_BF16), mask=mask)


@triton.jit
def silu_times(g, u, LIBDEVICE: tl.constexpr, EMU_BF16: tl.constexpr):
    """``round(round(silu(g)) * u)`` of tiles ``g``, ``u`` in one dtype (the result in it too), ``silu`` in fp32
    with IEEE division; shared with the gate/up GEMM's epilogue (:func:`kvsieve.backends.triton.linear.gate_up_silu`).
    """
    gf = g.to(tl.float32)
    if LIBDEVICE:
        e = libdevice.exp(-gf)
    else:
        e = tl.exp(-gf)
    s = _round(tl.math.div_rn(gf, 1.0 + e), g.dtype, EMU_BF16)
    return _round(s.to(tl.float32) * u.to(tl.float32), g.dtype, EMU_BF16)


@triton.jit
def _rotate_halves(x1, x2, c1, c2, s1, s2, EMU_BF16: tl.constexpr):
    """HF's ``x * cos + rotate_half(x) * sin`` of the halves ``x1 = x[:h]``, ``x2 = x[h:]``, each product and
    the sum rounded to ``x``'s dtype (inputs in their own dtype; outputs in it too)."""
    dt = x1.dtype
    a1 = _round(x1.to(tl.float32) * c1.to(tl.float32), dt, EMU_BF16)
    b1 = _round(-(x2.to(tl.float32)) * s1.to(tl.float32), dt, EMU_BF16)
    a2 = _round(x2.to(tl.float32) * c2.to(tl.float32), dt, EMU_BF16)
    b2 = _round(x1.to(tl.float32) * s2.to(tl.float32), dt, EMU_BF16)
    o1 = _round(a1.to(tl.float32) + b1.to(tl.float32), dt, EMU_BF16)
    o2 = _round(a2.to(tl.float32) + b2.to(tl.float32), dt, EMU_BF16)
    return o1, o2


@triton.jit
def _rope_append_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    kc_ptr,
    vc_ptr,
    pos_ptr,
    ends_ptr,
    seen_ptr,
    ring_ptr,
    count_ptr,
    sq_b,
    sq_h,
    sq_d,
    sk_b,
    sk_h,
    sk_d,
    sv_b,
    sv_h,
    sv_d,
    sc_b,
    sc_d,
    ss_b,
    ss_d,
    skc_b,
    skc_h,
    skc_c,
    skc_d,
    svc_b,
    svc_h,
    svc_c,
    svc_d,
    sp_b,
    sp_h,
    sp_c,
    se_b,
    se_h,
    sr_b,
    sr_h,
    sr_r,
    sr_d,
    H,
    C,
    R,
    HALF,
    RING: tl.constexpr,
    EMU_BF16: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Program ``(b, p)``: rotate query head ``p < H`` in place (and, with ``RING``, store it at ring slot
    ``count[0] % R`` too), or rotate and append KV head ``p - H``."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    lo = tl.arange(0, BLOCK_H)
    mask = lo < HALF
    hi = lo + HALF
    c1 = tl.load(cos_ptr + b * sc_b + lo * sc_d, mask=mask, other=0.0)
    c2 = tl.load(cos_ptr + b * sc_b + hi * sc_d, mask=mask, other=0.0)
    s1 = tl.load(sin_ptr + b * ss_b + lo * ss_d, mask=mask, other=0.0)
    s2 = tl.load(sin_ptr + b * ss_b + hi * ss_d, mask=mask, other=0.0)
    if p < H:
        q_row = q_ptr + b * sq_b + p.to(tl.int64) * sq_h
        x1 = tl.load(q_row + lo * sq_d, mask=mask, other=0.0)
        x2 = tl.load(q_row + hi * sq_d, mask=mask, other=0.0)
        o1, o2 = _rotate_halves(x1, x2, c1, c2, s1, s2, EMU_BF16)
        tl.store(q_row + lo * sq_d, o1, mask=mask)
        tl.store(q_row + hi * sq_d, o2, mask=mask)
        if RING:
            slot = tl.load(count_ptr) % R
            r_row = ring_ptr + b * sr_b + p.to(tl.int64) * sr_h + slot * sr_r
            tl.store(r_row + lo * sr_d, o1, mask=mask)
            tl.store(r_row + hi * sr_d, o2, mask=mask)
    else:
        j = (p - H).to(tl.int64)
        k_row = k_ptr + b * sk_b + j * sk_h
        x1 = tl.load(k_row + lo * sk_d, mask=mask, other=0.0)
        x2 = tl.load(k_row + hi * sk_d, mask=mask, other=0.0)
        o1, o2 = _rotate_halves(x1, x2, c1, c2, s1, s2, EMU_BF16)
        v_row = v_ptr + b * sv_b + j * sv_h
        v1 = tl.load(v_row + lo * sv_d, mask=mask, other=0.0)
        v2 = tl.load(v_row + hi * sv_d, mask=mask, other=0.0)
        e_ptr = ends_ptr + b * se_b + j * se_h
        e = tl.load(e_ptr)
        seen = tl.load(seen_ptr)
        # the caller guarantees 0 <= ends < C; a slot outside it is not written (no stray write past the buffer)
        e_vec = tl.zeros([BLOCK_H], dtype=tl.int64) + e
        ok = mask & (e_vec >= 0) & (e_vec < C)
        kc_row = kc_ptr + b * skc_b + j * skc_h + e * skc_c
        vc_row = vc_ptr + b * svc_b + j * svc_h + e * svc_c
        tl.store(kc_row + lo * skc_d, o1, mask=ok)
        tl.store(kc_row + hi * skc_d, o2, mask=ok)
        tl.store(vc_row + lo * svc_d, v1, mask=ok)
        tl.store(vc_row + hi * svc_d, v2, mask=ok)
        # positions[b, j, e] = seen[0], stored by lane 0 of the tile
        tl.store(
            pos_ptr + b * sp_b + j * sp_h + e_vec * sp_c,
            tl.zeros([BLOCK_H], dtype=tl.int64) + seen,
            mask=ok & (lo == 0),
        )
        tl.store(e_ptr, e + 1)


# ------------------------------------------------------------------------------------------- launchers
def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_device(device: torch.device, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device} (the device of the first argument)")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t [..., D]`` as ``[N, D]``: a view unless the leading dims cannot be merged (then a copy)."""
    return t.reshape(-1, t.shape[-1])


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    config: LayerOpsConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed, total)``: RMSNorm of ``residual + x`` (or of ``x``), as :func:`kvsieve.layer_ops.rms_norm`.

    Args:
        x: ``[..., D]`` (float32/bfloat16/float16, any strides); weight: ``[D]`` (float32/bfloat16/float16);
            eps: the norm's epsilon (>= 0); residual: ``None`` or ``[..., D]`` in ``x``'s shape and dtype.
        config: tile override (tests).

    Returns:
        ``normed``: ``[..., D]`` (contiguous) in ``promote_types(weight.dtype, x.dtype)``; ``total``: ``x``
        itself without a residual, else a new contiguous ``[..., D]`` tensor in ``x``'s dtype.
    """
    _check_float("x", x)
    _check_float("weight", weight)
    if x.dim() < 1:
        raise ValueError(f"x must be [..., D], got a 0-d tensor of shape {tuple(x.shape)}")
    D = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != D:
        raise ValueError(f"weight must be [D] = [{D}] (x's last dim), got shape {tuple(weight.shape)}")
    if isinstance(eps, torch.Tensor) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0 (a Python number, not a tensor), got {eps!r}")
    _check_device(x.device, weight=weight)
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.shape != x.shape or residual.dtype != x.dtype:
            got = (
                f"{residual.dtype} {tuple(residual.shape)}"
                if isinstance(residual, torch.Tensor)
                else type(residual).__name__
            )
            raise ValueError(f"residual must be None or {x.dtype} {tuple(x.shape)} (x's dtype and shape), got {got}")
        _check_device(x.device, residual=residual)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    normed = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    total = x if residual is None else torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if x.numel() == 0:
        return normed, total
    x2 = _rows(x)
    r2 = x2 if residual is None else _rows(residual)
    out2 = normed.view(-1, D)
    t2 = out2 if residual is None else total.view(-1, D)  # never written without a residual
    N = x2.shape[0]
    cfg = config or LayerOpsConfig()
    if cfg.norm_block_d is not None:
        block_d = cfg.norm_block_d
    else:
        block_d = next_pow2(D) if D <= MAX_SINGLE_BLOCK else 4096
    inv_d = _inv_fp32(D)
    _rms_norm_kernel[(N,)](
        x2,
        r2,
        weight,
        out2,
        t2,
        *x2.stride(),
        *r2.stride(),
        weight.stride(0),
        out2.stride(0),
        t2.stride(0),
        D,
        inv_d,
        float(eps),
        HAS_RESIDUAL=residual is not None,
        SINGLE=block_d >= D,
        LIBDEVICE=_libdevice(),
        EMU_BF16=interpret_mode(),
        BLOCK_D=block_d,
        num_warps=_warps(min(block_d, next_pow2(D))),
        enable_fp_fusion=False,
    )
    return normed, total


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, config: LayerOpsConfig | None = None) -> torch.Tensor:
    """``silu(gate) * up`` as :func:`kvsieve.layer_ops.silu_mul`: a new contiguous ``[..., F]`` tensor.

    Args:
        gate, up: ``[..., F]`` each, one shape and one dtype (float32/bfloat16/float16), any strides (e.g. the
            two halves of one ``[..., 2F]`` projection).
        config: tile override (tests).
    """
    _check_float("gate", gate)
    _check_float("up", up)
    if gate.dim() < 1:
        raise ValueError(f"gate must be [..., F], got a 0-d tensor of shape {tuple(gate.shape)}")
    if up.shape != gate.shape or up.dtype != gate.dtype:
        raise ValueError(f"up must match gate ({gate.dtype} {tuple(gate.shape)}), got {up.dtype} {tuple(up.shape)}")
    _check_device(gate.device, up=up)
    out = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    if out.numel() == 0:
        return out
    F = gate.shape[-1]
    g2, u2, o2 = _rows(gate), _rows(up), out.view(-1, F)
    cfg = config or LayerOpsConfig()
    N = g2.shape[0]
    block_f = cfg.silu_block_f
    if block_f is None:
        # up to 1024 columns per program, fewer when that leaves the GPU idle (B=1: F/1024 = 14 programs)
        block_f = min(next_pow2(F), 1024)
        while block_f > 128 and N * cdiv(F, block_f) < target_programs(gate.device):
            block_f //= 2
    _silu_mul_kernel[(N, cdiv(F, block_f))](
        g2,
        u2,
        o2,
        *g2.stride(),
        *u2.stride(),
        o2.stride(0),
        F,
        LIBDEVICE=_libdevice(),
        EMU_BF16=interpret_mode(),
        BLOCK_F=block_f,
        num_warps=_warps(block_f),
        enable_fp_fusion=False,
    )
    return out


def _shape(name: str, t: torch.Tensor, want: tuple, what: str) -> None:
    if tuple(t.shape) != want:
        raise ValueError(f"{name} must be {what} = {list(want)}, got shape {tuple(t.shape)}")


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
    """One decode token's rotary embedding and cache append, in place, in one launch (as
    :func:`kvsieve.layer_ops.rope_append`).

    Args:
        query: ``[B, H, 1, d]``, rotated in place; key: ``[B, Hkv, 1, d]`` (read, not changed); value:
            ``[B, Hkv, 1, d]``; query/key/cos/sin share one dtype (float32/bfloat16/float16); ``d`` even.
        cos, sin: ``[B, 1, d]``, row ``b``'s rotary embedding.
        keys, values: ``[B, Hkv, C, d]`` in ``key``'s/``value``'s dtype; slot ``ends[b, j]`` is written.
        positions: ``int64 [B, Hkv, C]``, slot ``ends[b, j]`` set to ``seen[0]``.
        ends: ``int64 [B, Hkv]``, incremented (the caller guarantees ``0 <= ends < C``; a slot outside it is
            not written).
        seen: ``int64 [1]``, the token's logical index (read on the device).
        query_ring: ``None`` or ``[B, H, R, d]`` in ``query``'s dtype (the layer's selector queries): the rotated
            query is also stored at slot ``ring_count[0] % R``; ring_count: ``int64 [1]`` (read on the device,
            not changed), given with ``query_ring``.
    All tensors may have any strides and must be on one device. No host synchronisation.
    """
    tensors = dict(
        query=query,
        key=key,
        value=value,
        cos=cos,
        sin=sin,
        keys=keys,
        values=values,
        positions=positions,
        ends=ends,
        seen=seen,
    )
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"query must be [B, H, 1, d] (one decode token), got shape {tuple(query.shape)}")
    B, H, _, d = query.shape
    if d % 2 or d == 0:
        raise ValueError(f"the head dim d must be even and > 0 (rotate_half splits it in halves), got d={d}")
    if key.dim() != 4:
        raise ValueError(f"key must be [B, Hkv, 1, d] = [{B}, Hkv, 1, {d}], got shape {tuple(key.shape)}")
    Hkv = key.shape[1]
    _shape("key", key, (B, Hkv, 1, d), "[B, Hkv, 1, d]")
    if value.dim() == 4 and tuple(value.shape[:3]) == (B, Hkv, 1) and value.shape[3] != d:
        raise ValueError(
            f"value's head dim must equal key's here (d={d}), got {value.shape[3]}: this kernel copies value "
            "rows of key's width"
        )
    _shape("value", value, (B, Hkv, 1, d), "[B, Hkv, 1, d]")
    _shape("cos", cos, (B, 1, d), "[B, 1, d]")
    _shape("sin", sin, (B, 1, d), "[B, 1, d]")
    if keys.dim() != 4:
        raise ValueError(f"keys must be [B, Hkv, C, d] = [{B}, {Hkv}, C, {d}], got shape {tuple(keys.shape)}")
    C = keys.shape[2]
    _shape("keys", keys, (B, Hkv, C, d), "[B, Hkv, C, d]")
    _shape("values", values, (B, Hkv, C, d), "[B, Hkv, C, d]")
    _shape("positions", positions, (B, Hkv, C), "[B, Hkv, C]")
    _shape("ends", ends, (B, Hkv), "[B, Hkv]")
    _shape("seen", seen, (1,), "[1]")
    for name in ("query", "key", "value", "cos", "sin", "keys", "values"):
        _check_float(name, tensors[name])
    for name in ("key", "cos", "sin"):
        if tensors[name].dtype != query.dtype:
            raise ValueError(f"{name} must be in query's dtype {query.dtype}, got {tensors[name].dtype}")
    if keys.dtype != key.dtype:
        raise ValueError(f"keys must be in key's dtype {key.dtype}, got {keys.dtype}")
    if values.dtype != value.dtype:
        raise ValueError(f"values must be in value's dtype {value.dtype}, got {values.dtype}")
    for name in ("positions", "ends", "seen"):
        if tensors[name].dtype != torch.int64:
            raise ValueError(f"{name} must be int64, got {tensors[name].dtype}")
    ring = query_ring is not None
    if ring != (ring_count is not None):
        raise ValueError("query_ring and ring_count go together: pass both or neither")
    if ring:
        for name, t in (("query_ring", query_ring), ("ring_count", ring_count)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if query_ring.dim() != 4 or query_ring.shape[2] == 0:
            raise ValueError(f"query_ring must be [B, H, R, d] = [{B}, {H}, R >= 1, {d}], got shape "
                             f"{tuple(query_ring.shape)}")
        _shape("query_ring", query_ring, (B, H, query_ring.shape[2], d), "[B, H, R, d]")
        _shape("ring_count", ring_count, (1,), "[1]")
        if query_ring.dtype != query.dtype:
            raise ValueError(f"query_ring must be in query's dtype {query.dtype}, got {query_ring.dtype}")
        if ring_count.dtype != torch.int64:
            raise ValueError(f"ring_count must be int64, got {ring_count.dtype}")
        tensors.update(query_ring=query_ring, ring_count=ring_count)
    _check_device(query.device, **{k: v for k, v in tensors.items() if k != "query"})
    if B == 0 or H + Hkv == 0:
        return
    half = d // 2
    _rope_append_kernel[(B, H + Hkv)](
        query,
        key,
        value,
        cos,
        sin,
        keys,
        values,
        positions,
        ends,
        seen,
        query_ring if ring else query,  # never read without RING
        ring_count if ring else seen,
        query.stride(0),
        query.stride(1),
        query.stride(3),
        key.stride(0),
        key.stride(1),
        key.stride(3),
        value.stride(0),
        value.stride(1),
        value.stride(3),
        cos.stride(0),
        cos.stride(2),
        sin.stride(0),
        sin.stride(2),
        *keys.stride(),
        *values.stride(),
        *positions.stride(),
        *ends.stride(),
        *(query_ring.stride() if ring else (0, 0, 0, 0)),
        H,
        C,
        query_ring.shape[2] if ring else 1,
        half,
        RING=ring,
        EMU_BF16=interpret_mode(),
        BLOCK_H=next_pow2(half),
        num_warps=_warps(next_pow2(half)),
        enable_fp_fusion=False,
    )
