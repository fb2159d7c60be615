"""The ``triton`` backend's per-layer operators (RMSNorm + residual, SiLU * up, RoPE + cache append) against the
torch references of :mod:`kvsieve.layer_ops`, bit for bit where the kernels repeat the reference's rounding.

On CPU the kernels run through Triton's interpreter (``TRITON_INTERPRET=1`` before ``triton`` is imported; CI
exports it for the whole run) at tiny awkward shapes: odd widths, GQA and MHA, batch 1 and 3, head dims 8/16/64,
fp32/bf16/fp16, strided views (the ``[B, 1, H, d] -> [B, H, 1, d]`` transpose of the projections, the two halves
of one gate/up projection), forced small tiles (the chunked RMSNorm sweep, several SiLU column blocks). The
``gpu`` cases run the compiled kernels at Llama-3.1-8B decode shapes.

What is exact and what is not (the kernels' module docstring says why):

* ``rope_append``: every output buffer bitwise equal (query, caches, positions, ends; key and value untouched).
* ``rms_norm``: ``total`` bitwise equal. ``normed`` is checked bitwise against the reference's own formula with
  the row's ``rsqrt(var + eps)`` moved by at most 2 fp32 ulps: the sum of squares is reduced in another order
  than torch's, which may move ``var`` (and so ``rsqrt``) in its last bits; every other step is reproduced.
* ``silu_mul``: outputs bitwise equal to the reference's formula applied to the kernel's own fp32 ``silu`` (read
  back through the fp32 kernel with ``up = 1``); that ``silu`` is within 2 fp32 ulps of torch's (the
  interpreter's ``exp`` is numpy's, torch's CPU ``exp`` is Sleef's; on the GPU both are CUDA's ``expf`` and the
  GPU cases demand equality with the reference).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import triton_kernels_or_skip

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = triton_kernels_or_skip("triton layer-op tests")

from kvsieve import layer_ops as ref  # noqa: E402
from kvsieve.backends.triton import layer_ops as tlo  # noqa: E402
from kvsieve.backends.triton.backend import TritonBackend  # noqa: E402

TRI = TritonBackend()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
cpu = pytest.mark.skipif(not INTERPRET, reason="CPU cases run through Triton's interpreter: set TRITON_INTERPRET=1")
CPU = [pytest.param("cpu", marks=cpu)]
GPU = [pytest.param("cuda", marks=[pytest.mark.gpu, gpu])]


# --------------------------------------------------------------------------------------------- helpers
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)


def _dt(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _step_ulps(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` moved ``k`` representable values up (``k > 0``) or down."""
    target = torch.full_like(x, float("inf") if k > 0 else float("-inf"))
    for _ in range(abs(k)):
        x = torch.nextafter(x, target)
    return x


def _assert_norm(x, weight, eps, residual, normed, total, max_ulps=2):
    """``total`` bitwise the reference's; each row of ``normed`` bitwise the reference's formula with that row's
    ``rsqrt(var + eps)`` within ``max_ulps`` fp32 ulps of torch's (the reduction order of ``var`` differs)."""
    want_normed, want_total = ref.rms_norm(x, weight, eps, residual)
    assert normed.shape == x.shape and normed.dtype == want_normed.dtype
    assert total.shape == x.shape and total.dtype == x.dtype
    assert torch.equal(total, want_total)
    hidden = want_total.to(torch.float32)
    rs = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    # the reference rebuilt from its parts (guards the check itself)
    assert torch.equal(weight * (hidden * rs).to(x.dtype), want_normed)
    matched = torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
    for k in range(-max_ulps, max_ulps + 1):
        cand = weight * (hidden * _step_ulps(rs, k)).to(x.dtype)
        matched |= (cand == normed).all(-1)
    bad = (~matched).nonzero()
    assert not len(bad), (
        f"{len(bad)} of {matched.numel()} rows of normed are not the reference's rounding of any rsqrt within "
        f"{max_ulps} ulps of torch's; first {bad[0].tolist()}: max abs diff "
        f"{(normed.float() - want_normed.float()).abs().max().item():.3g}"
    )


def _assert_within_ulps(got: torch.Tensor, want: torch.Tensor, ulps: int = 1):
    """Every element of ``got`` within ``ulps`` representable values of ``want`` (same dtype)."""
    lo, hi = _step_ulps(want, -ulps), _step_ulps(want, ulps)
    ok = (got >= lo) & (got <= hi)
    assert bool(ok.all()), f"{int((~ok).sum())} elements beyond {ulps} ulp(s); max diff {(got - want).abs().max()}"


# ------------------------------------------------------------------------------------------- rms_norm
# (leading shape, D, layout): "rows" = contiguous [..., D]; "heads" = Qwen3's q_norm input: a [B, 1, H, d]
# projection viewed as [B, H, 1, d] (rows of d with a row stride); "strided" = every other column of a wider row
NORM_CASES = [
    ((3, 1), 37, "rows"),
    ((1, 1), 96, "rows"),
    ((3, 4), 16, "heads"),
    ((2, 1), 40, "strided"),
]


def _norm_input(gen, lead, D, layout, dtype, device):
    if layout == "rows":
        return _randn(gen, *lead, D, dtype=dtype, device=device, scale=3.0)
    if layout == "heads":
        B, H = lead
        return _randn(gen, B, 1, H, D, dtype=dtype, device=device, scale=3.0).transpose(1, 2)  # [B, H, 1, D]
    wide = _randn(gen, *lead, 2 * D, dtype=dtype, device=device, scale=3.0)
    return wide[..., ::2]


@pytest.mark.parametrize("device", CPU)
@pytest.mark.parametrize("with_residual", [False, True], ids=["no-residual", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("lead,D,layout", NORM_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_rms_norm(device, lead, D, layout, dtype, with_residual):
    gen = _gen(D + 7 * len(lead))
    x = _norm_input(gen, lead, D, layout, dtype, device)
    residual = _randn(gen, *x.shape, dtype=dtype, device=device, scale=3.0) if with_residual else None
    weight = (1 + 0.5 * torch.randn(D, generator=gen)).to(dtype=dtype, device=device)
    x_before = x.clone()
    normed, total = TRI.rms_norm(x, weight, 1e-6, residual)
    assert torch.equal(x, x_before)
    assert normed.is_contiguous()
    if residual is None:
        assert total is x  # as the reference: the residual stream is x itself
    _assert_norm(x, weight, 1e-6, residual, normed, total)


@pytest.mark.parametrize("device", CPU)
@pytest.mark.parametrize(
    "x_dtype,w_dtype",
    [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16)],
    ids=lambda d: _dt(d),
)
def test_rms_norm_mixed_weight_dtype(device, x_dtype, w_dtype):
    """``normed`` is in ``promote_types(weight, x)`` (fp32 here), as HF's ``weight * hidden.to(input_dtype)``."""
    gen = _gen(11)
    x = _randn(gen, 3, 1, 37, dtype=x_dtype, device=device)
    residual = _randn(gen, 3, 1, 37, dtype=x_dtype, device=device)
    weight = (1 + 0.5 * torch.randn(37, generator=gen)).to(dtype=w_dtype, device=device)
    normed, total = TRI.rms_norm(x, weight, 1e-5, residual)
    assert normed.dtype == torch.promote_types(w_dtype, x_dtype) == torch.float32
    _assert_norm(x, weight, 1e-5, residual, normed, total)


@pytest.mark.parametrize("device", CPU)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("block_d", [8, 16])
def test_rms_norm_chunked_sweep(device, dtype, block_d):
    """Rows longer than the tile: two sweeps of ``block_d``-column chunks (ragged last chunk at D=37)."""
    gen = _gen(block_d)
    x = _randn(gen, 3, 1, 37, dtype=dtype, device=device, scale=2.0)
    residual = _randn(gen, 3, 1, 37, dtype=dtype, device=device)
    weight = (1 + 0.5 * torch.randn(37, generator=gen)).to(dtype=dtype, device=device)
    cfg = tlo.LayerOpsConfig(norm_block_d=block_d)
    normed, total = tlo.rms_norm(x, weight, 1e-6, residual, config=cfg)
    _assert_norm(x, weight, 1e-6, residual, normed, total)
    normed, total = tlo.rms_norm(x, weight, 1e-6, None, config=cfg)
    _assert_norm(x, weight, 1e-6, None, normed, total)


@pytest.mark.parametrize("device", CPU)
def test_rms_norm_empty(device):
    x = torch.empty(0, 1, 8, device=device)
    normed, total = TRI.rms_norm(x, torch.ones(8, device=device), 1e-6, torch.empty_like(x))
    assert normed.shape == total.shape == x.shape


# ------------------------------------------------------------------------------------------- silu_mul
# (leading shape, F, layout): "halves" = gate and up are the two halves of one [..., 2F] projection
SILU_CASES = [((3, 1), 37, "halves"), ((1, 1), 96, "contiguous"), ((3, 1), 100, "halves")]


def _silu_inputs(gen, lead, F, layout, dtype, device):
    if layout == "halves":
        both = _randn(gen, *lead, 2 * F, dtype=dtype, device=device, scale=4.0)
        return both[..., :F], both[..., F:]
    return (
        _randn(gen, *lead, F, dtype=dtype, device=device, scale=4.0),
        _randn(gen, *lead, F, dtype=dtype, device=device, scale=4.0),
    )


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp(100) = inf
@pytest.mark.parametrize("device", CPU)
@pytest.mark.parametrize("block_f", [None, 32], ids=["default-tile", "block32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("lead,F,layout", SILU_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_silu_mul(device, lead, F, layout, dtype, block_f):
    gen = _gen(F)
    gate, up = _silu_inputs(gen, lead, F, layout, dtype, device)
    gate[..., 0] = 0.0  # silu(0) = 0
    gate[..., 1] = -100.0  # exp(-g) overflows to inf: silu = -0
    gate[..., 2] = 100.0  # exp(-g) underflows: silu = g
    cfg = tlo.LayerOpsConfig(silu_block_f=block_f)
    got = tlo.silu_mul(gate, up, config=cfg)
    want = ref.silu_mul(gate, up)
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
    # the kernel's own fp32 silu (fp32 kernel, up = 1): within 2 ulps of torch's (numpy's exp vs Sleef's, each
    # within 1 ulp of exp; g / (1 + e) keeps e's relative error)
    silu32 = tlo.silu_mul(gate.float(), torch.ones_like(gate, dtype=torch.float32), config=cfg)
    _assert_within_ulps(silu32, torch.nn.functional.silu(gate.float()), 2)
    # exactly the reference's rounding sequence applied to that silu
    assert torch.equal(got, silu32.to(dtype) * up)
    if dtype == torch.float32:  # a 2-ulp silu times up: within 3 ulps of the product
        _assert_within_ulps(got, want, 3)
    else:
        assert (got != want).float().mean() <= 0.01


# ----------------------------------------------------------------------------------------- rope_append
# (B, H, Hkv, d, C)
ROPE_CASES = [(1, 4, 4, 8, 5), (3, 6, 2, 16, 9), (3, 4, 2, 64, 6)]
POISON = 1234.5  # cache slots other than ends[b, j] must keep it
POS_POISON = -77


def _rope_inputs(gen, B, H, Hkv, d, C, dtype, device, fused_qkv=True, strided_cos=False):
    """HF-style decode inputs: query/key/value views ``[B, heads, 1, d]`` of one ``[B, 1, (H + 2 Hkv) d]``
    projection (or of separate ``[B, 1, heads, d]`` tensors), cos/sin ``[B, 1, d]`` of random positions."""
    if fused_qkv:
        qkv = _randn(gen, B, 1, (H + 2 * Hkv) * d, dtype=dtype, device=device)
        q, k, v = qkv.split([H * d, Hkv * d, Hkv * d], dim=-1)
    else:
        q = _randn(gen, B, 1, H * d, dtype=dtype, device=device)
        k = _randn(gen, B, 1, Hkv * d, dtype=dtype, device=device)
        v = _randn(gen, B, 1, Hkv * d, dtype=dtype, device=device)
    query = q.view(B, 1, H, d).transpose(1, 2)
    key = k.view(B, 1, Hkv, d).transpose(1, 2)
    value = v.view(B, 1, Hkv, d).transpose(1, 2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pos = torch.randint(0, 5000, (B, 2), generator=gen).float()
    freqs = pos[..., None] * inv_freq  # [B, 2, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype=dtype, device=device), emb.sin().to(dtype=dtype, device=device)
    if strided_cos:
        cos, sin = cos[:, 1:], sin[:, 1:]  # [B, 1, d] views with a batch stride of 2d
    else:
        cos, sin = cos[:, :1].contiguous(), sin[:, :1].contiguous()
    keys = torch.full((B, Hkv, C, d), POISON, dtype=dtype, device=device)
    values = torch.full((B, Hkv, C, d), -POISON, dtype=dtype, device=device)
    keys[:, :, 0] = _randn(gen, B, Hkv, d, dtype=dtype, device=device)  # live rows ahead of the slot
    positions = torch.full((B, Hkv, C), POS_POISON, dtype=torch.int64, device=device)
    ends = torch.randint(0, C, (B, Hkv), generator=gen).to(device)
    ends.view(-1)[0] = 0
    ends.view(-1)[-1] = C - 1
    seen = torch.tensor([4321], dtype=torch.int64, device=device)
    return [query, key, value, cos, sin, keys, values, positions, ends, seen]


def _clone(args):
    """Deep copies that keep the views' layouts (query/key/value stay views of one fresh buffer)."""
    query, key, value = args[:3]
    base = query._base
    if base is not None and key._base is base and value._base is base:
        fresh = base.clone()
        views = [fresh.as_strided(t.shape, t.stride(), t.storage_offset()) for t in (query, key, value)]
    else:
        views = [_same_layout(t) for t in (query, key, value)]
    return views + [_same_layout(t) for t in args[3:]]


def _same_layout(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


NAMES = ["query", "key", "value", "cos", "sin", "keys", "values", "positions", "ends", "seen"]


def _run_both(args):
    got, want = _clone(args), _clone(args)
    TRI.rope_append(*got)
    ref.rope_append(*want)
    return got, want


def _assert_rope_equal(got, want, args):
    for name, g, w in zip(NAMES, got, want):
        assert g.stride() == w.stride()
        assert torch.equal(g, w), f"{name} differs from the reference"
    # the reference's own effects, checked directly: key and value untouched, ends moved by one, slots kept
    assert torch.equal(got[1], args[1]) and torch.equal(got[2], args[2])
    assert torch.equal(got[8], args[8] + 1)
    written = torch.zeros(got[7].shape, dtype=torch.bool, device=got[7].device)
    written.scatter_(2, args[8][..., None], True)
    assert bool((got[7][written] == args[9]).all())
    assert bool((got[7][~written] == args[7][~written]).all())
    assert torch.equal(got[5][~written], args[5][~written]) and torch.equal(got[6][~written], args[6][~written])


@pytest.mark.parametrize("device", CPU)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("case", ROPE_CASES, ids=lambda c: "x".join(map(str, c)))
def test_rope_append(device, case, dtype):
    B, H, Hkv, d, C = case
    args = _rope_inputs(_gen(sum(case)), B, H, Hkv, d, C, dtype, device)
    got, want = _run_both(args)
    _assert_rope_equal(got, want, args)


@pytest.mark.parametrize("device", CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dt)
def test_rope_append_separate_tensors_strided_cos(device, dtype):
    """Query/key/value from separate projections, cos/sin views with a batch stride, a non-contiguous cache."""
    B, H, Hkv, d, C = 3, 6, 2, 16, 7
    args = _rope_inputs(_gen(5), B, H, Hkv, d, C, dtype, device, fused_qkv=False, strided_cos=True)
    assert not args[3].is_contiguous()
    # keys as a [B, C, Hkv, d] buffer viewed [B, Hkv, C, d]; positions transposed likewise
    args[5] = args[5].transpose(1, 2).contiguous().transpose(1, 2)
    args[7] = args[7].transpose(1, 2).contiguous().transpose(1, 2)
    got, want = _run_both(args)
    _assert_rope_equal(got, want, args)


@pytest.mark.parametrize("device", CPU)
def test_rope_append_full_row_not_written(device):
    """``ends == C`` breaks the caller's guarantee: no slot is written (no stray write), ``ends`` still moves."""
    B, H, Hkv, d, C = 1, 2, 2, 8, 4
    args = _rope_inputs(_gen(6), B, H, Hkv, d, C, torch.float32, device)
    args[8] = torch.tensor([[C, 1]], device=device)
    got = _clone(args)
    TRI.rope_append(*got)
    assert torch.equal(got[5][0, 0], args[5][0, 0]) and torch.equal(got[7][0, 0], args[7][0, 0])
    assert got[8].tolist() == [[C + 1, 2]]
    assert int(got[7][0, 1, 1]) == int(args[9])


def _with_ring(gen, args, R, count, strided=False):
    """``args`` plus a poisoned selector-query ring ``[B, H, R, d]`` (a non-contiguous view when ``strided``) and
    its ring count."""
    B, H, _, d = args[0].shape
    ring = torch.full((B, R, H, d) if strided else (B, H, R, d), POISON, dtype=args[0].dtype, device=args[0].device)
    if strided:
        ring = ring.transpose(1, 2)
    ring[:, :, 0] = _randn(gen, B, H, d, dtype=args[0].dtype, device=args[0].device)  # an older query
    return [*args, ring, torch.tensor([count], dtype=torch.int64, device=args[0].device)]


def _assert_ring_written(got, want, args):
    """The ring as the reference leaves it; only slot ``count % R`` changed, to the rotated query; count kept."""
    _assert_rope_equal(got[:10], want[:10], args[:10])
    ring, count = got[10], got[11]
    assert ring.stride() == want[10].stride() and torch.equal(ring, want[10])
    assert torch.equal(count, args[11])
    slot = int(args[11]) % ring.shape[2]
    assert torch.equal(ring[:, :, slot], got[0][:, :, 0])
    others = [r for r in range(ring.shape[2]) if r != slot]
    assert torch.equal(ring[:, :, others], args[10][:, :, others])


@pytest.mark.parametrize("device", CPU)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize(("R", "count", "strided"), [(1, 0, False), (5, 7, False), (3, 2, True), (4, 4, False)])
def test_rope_append_records_the_query_in_the_ring(device, dtype, R, count, strided):
    B, H, Hkv, d, C = 3, 6, 2, 16, 9
    gen = _gen(R * 10 + count)
    args = _with_ring(gen, _rope_inputs(gen, B, H, Hkv, d, C, dtype, device), R, count, strided)
    got, want = _run_both(args)
    _assert_ring_written(got, want, args)


# ------------------------------------------------------------------------------------------- bad input
def _rope_ok(device="cpu"):
    return _rope_inputs(_gen(0), 2, 4, 2, 8, 5, torch.float32, device)


def _replace(args, **kw):
    args = list(args)
    for name, value in kw.items():
        args[NAMES.index(name)] = value
    return args


BAD_ROPE = {
    "odd-d": (lambda a: _replace(a, query=torch.zeros(2, 4, 1, 7)), "d=7"),
    "query-Q2": (lambda a: _replace(a, query=torch.zeros(2, 4, 2, 8)), "query"),
    "value-dim": (lambda a: _replace(a, value=torch.zeros(2, 2, 1, 16)), "value"),
    "key-heads": (lambda a: _replace(a, key=torch.zeros(3, 2, 1, 8)), "key"),
    "cos-shape": (lambda a: _replace(a, cos=torch.zeros(2, 8)), "cos"),
    "sin-dtype": (lambda a: _replace(a, sin=a[4].to(torch.float16)), "sin"),
    "keys-dtype": (lambda a: _replace(a, keys=a[5].to(torch.bfloat16)), "keys"),
    "values-shape": (lambda a: _replace(a, values=torch.zeros(2, 2, 4, 8)), "values"),
    "positions-shape": (lambda a: _replace(a, positions=torch.zeros(2, 2, 6, dtype=torch.int64)), "positions"),
    "ends-int32": (lambda a: _replace(a, ends=a[8].to(torch.int32)), "ends"),
    "seen-shape": (lambda a: _replace(a, seen=torch.zeros(2, dtype=torch.int64)), "seen"),
    "seen-not-tensor": (lambda a: _replace(a, seen=5), "seen"),
    "query-int": (lambda a: _replace(a, query=a[0].to(torch.int32)), "query"),
    "ring-without-count": (lambda a: [*a, torch.zeros(2, 4, 3, 8)], "ring_count"),
    "count-without-ring": (lambda a: [*a, None, torch.zeros(1, dtype=torch.int64)], "query_ring"),
    "ring-heads": (lambda a: [*a, torch.zeros(2, 3, 3, 8), torch.zeros(1, dtype=torch.int64)], "query_ring"),
    "ring-empty": (lambda a: [*a, torch.zeros(2, 4, 0, 8), torch.zeros(1, dtype=torch.int64)], "query_ring"),
    "ring-dtype": (lambda a: [*a, torch.zeros(2, 4, 3, 8, dtype=torch.float64), torch.zeros(1, dtype=torch.int64)],
                   "query_ring"),
    "count-int32": (lambda a: [*a, torch.zeros(2, 4, 3, 8), torch.zeros(1, dtype=torch.int32)], "ring_count"),
    "count-shape": (lambda a: [*a, torch.zeros(2, 4, 3, 8), torch.zeros(2, dtype=torch.int64)], "ring_count"),
}


@pytest.mark.parametrize("case", list(BAD_ROPE), ids=list(BAD_ROPE))
def test_rope_append_bad_arguments(case):
    make, name = BAD_ROPE[case]
    args = make(_rope_ok())
    with pytest.raises(ValueError, match=name):
        tlo.rope_append(*args)


BAD_NORM = {
    "x-int": (lambda x, w, r: (x.long(), w, 1e-6, None), "x"),
    "weight-shape": (lambda x, w, r: (x, w[:5], 1e-6, None), "weight"),
    "weight-2d": (lambda x, w, r: (x, w[None], 1e-6, None), "weight"),
    "eps-negative": (lambda x, w, r: (x, w, -1.0, None), "eps"),
    "eps-nan": (lambda x, w, r: (x, w, float("nan"), None), "eps"),
    "eps-tensor": (lambda x, w, r: (x, w, torch.tensor(1e-6), None), "eps"),
    "residual-dtype": (lambda x, w, r: (x, w, 1e-6, r.double()), "residual"),
    "residual-shape": (lambda x, w, r: (x, w, 1e-6, r[:1]), "residual"),
    "x-0d": (lambda x, w, r: (x[0, 0, 0], w, 1e-6, None), "x"),
}


@pytest.mark.parametrize("case", list(BAD_NORM), ids=list(BAD_NORM))
def test_rms_norm_bad_arguments(case):
    make, name = BAD_NORM[case]
    x, w = torch.randn(2, 1, 8), torch.ones(8)
    with pytest.raises(ValueError, match=name):
        tlo.rms_norm(*make(x, w, torch.randn(2, 1, 8)))


@pytest.mark.parametrize(
    "gate,up,name",
    [
        (torch.zeros(2, 8), torch.zeros(2, 9), "up"),
        (torch.zeros(2, 8), torch.zeros(2, 8, dtype=torch.bfloat16), "up"),
        (torch.zeros(2, 8, dtype=torch.int64), torch.zeros(2, 8, dtype=torch.int64), "gate"),
        (torch.zeros(()), torch.zeros(()), "gate"),
    ],
    ids=["shape", "dtype", "int", "0d"],
)
def test_silu_mul_bad_arguments(gate, up, name):
    with pytest.raises(ValueError, match=name):
        tlo.silu_mul(gate, up)


def test_config_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="norm_block_d"):
        tlo.LayerOpsConfig(norm_block_d=24)


# ------------------------------------------------------------------------ GPU: Llama-3.1-8B decode shapes
@pytest.mark.parametrize("device", GPU)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("B,D", [(1, 4096), (32, 4096), (32, 3584), (8, 5120), (4, 8192), (2, 12288)])
def test_rms_norm_gpu(device, B, D, dtype):
    gen = _gen(D + B)
    x = _randn(gen, B, 1, D, dtype=dtype, device=device, scale=3.0)
    residual = _randn(gen, B, 1, D, dtype=dtype, device=device, scale=3.0)
    weight = (1 + 0.5 * torch.randn(D, generator=gen)).to(dtype=dtype, device=device)
    for r in (None, residual):
        normed, total = TRI.rms_norm(x, weight, 1e-5, r)
        _assert_norm(x, weight, 1e-5, r, normed, total)
    q = _randn(gen, B, 1, 32, 128, dtype=dtype, device=device).transpose(1, 2)  # Qwen3's q_norm on heads
    w = (1 + 0.5 * torch.randn(128, generator=gen)).to(dtype=dtype, device=device)
    normed, total = TRI.rms_norm(q, w, 1e-6)
    _assert_norm(q, w, 1e-6, None, normed, total)


@pytest.mark.parametrize("device", GPU)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("B", [1, 32])
def test_silu_mul_gpu(device, B, dtype):
    """Compiled, the kernel's ``exp`` is CUDA's ``expf`` (libdevice) and its division IEEE, as torch's CUDA silu:
    the outputs are bitwise the reference's in every dtype."""
    F = 14336
    both = _randn(_gen(B), B, 1, 2 * F, dtype=dtype, device=device, scale=4.0)
    gate, up = both[..., :F], both[..., F:]
    assert torch.equal(TRI.silu_mul(gate, up), ref.silu_mul(gate, up))


@pytest.mark.parametrize("device", GPU)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("B", [1, 32])
def test_rope_append_gpu(device, B, dtype):
    args = _rope_inputs(_gen(B), B, 32, 8, 128, 257, dtype, device)
    got, want = _run_both(args)
    _assert_rope_equal(got, want, args)


@pytest.mark.parametrize("device", GPU)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("B", [1, 32])
def test_rope_append_ring_gpu(device, B, dtype):
    gen = _gen(B + 1)
    args = _with_ring(gen, _rope_inputs(gen, B, 28, 4, 128, 257, dtype, device), 32, 77)
    got, want = _run_both(args)
    _assert_ring_written(got, want, args)
