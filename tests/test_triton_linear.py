"""The Triton linear layer for decode-step rows (``kvsieve.backends.triton.linear``) against a torch reference.

The reference accumulates ``x @ W.T`` in float64, adds the bias and the residual, and rounds once to the dtype: the
kernel (fp32 accumulation, one rounding) must be within the dtype's rounding of it, on awkward sizes (rows 1-33 and
past one row tile, columns and K not multiples of the tiles, strided inputs, several tile configurations). On CPU
the kernel runs through Triton's interpreter; the ``gpu`` cases use decode shapes.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import triton_kernels_or_skip

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = triton_kernels_or_skip("triton linear tests")

from kvsieve import layer_ops  # noqa: E402
from kvsieve.backend import KVBackend  # noqa: E402
from kvsieve.backends.torch_ref import TorchBackend  # noqa: E402
from kvsieve.backends.triton.backend import TritonBackend  # noqa: E402
from kvsieve.backends.triton.linear import (  # noqa: E402
    MAX_ROWS,
    SHARED_BUDGET,
    LinearConfig,
    block_rows,
    decode_config,
    gate_up_silu,
    skinny_linear,
)

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
cpu = pytest.mark.skipif(not INTERPRET, reason="CPU cases run through Triton's interpreter: set TRITON_INTERPRET=1")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # relative to the output's scale


def _inputs(seed, lead, N, K, dtype, device, bias, residual, strided):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, 2 * K if strided else K, generator=gen)
    x = (x[..., ::2] if strided else x).to(dtype=dtype, device=device)
    w = torch.randn(N, 2 * K if strided else K, generator=gen) / K**0.5
    w = (w[:, 1::2] if strided else w).to(dtype=dtype, device=device)
    b = torch.randn(N, generator=gen).to(dtype=dtype, device=device) if bias else None
    r = torch.randn(*lead, N, generator=gen).to(dtype=dtype, device=device) if residual else None
    return x, w, b, r


def _reference(x, w, b, r):
    y = x.double() @ w.double().T
    if b is not None:
        y = y + b.double()
    if r is not None:
        y = y + r.double()
    return y


def _check(x, w, b, r, config=None):
    got = skinny_linear(x, w, b, r, config)
    want = _reference(x, w, b, r)
    assert got.dtype == x.dtype and got.shape == want.shape
    scale = want.abs().max().clamp(min=1.0)
    err = float((got.double() - want).abs().max() / scale)
    assert err <= TOL[x.dtype], err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("lead", "N", "K"), [((1,), 17, 19), ((3, 1), 40, 100), ((33,), 50, 70), ((2, 5), 16, 16)])
@pytest.mark.parametrize(("bias", "residual"), [(False, False), (True, False), (False, True), (True, True)])
@cpu
def test_matches_the_reference(dtype, lead, N, K, bias, residual):
    _check(*_inputs(sum(lead) + N + K, lead, N, K, dtype, "cpu", bias, residual, strided=False))


@pytest.mark.parametrize("config", [LinearConfig(16, 16, 1, 1), LinearConfig(32, 64, 4, 2), LinearConfig(64, 32)],
                         ids=repr)
@cpu
def test_tile_configurations_and_strided_inputs(config):
    _check(*_inputs(5, (7,), 45, 83, torch.bfloat16, "cpu", True, True, strided=True), config)


@pytest.mark.parametrize("split_k", [2, 3, 7, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@cpu
def test_split_k_matches_the_reference(split_k, dtype):
    """K in shares (a share a whole number of BLOCK_K steps; more shares asked than K has steps: fewer made), the
    shares added in a second launch with the bias and residual."""
    config = LinearConfig(16, 16, 1, 1, split_k)
    _check(*_inputs(split_k, (5,), 40, 150, dtype, "cpu", True, True, strided=True), config)


@cpu
def test_more_rows_than_one_tile():
    """Rows beyond ``MAX_ROWS`` go to a second row tile."""
    _check(*_inputs(9, (70,), 20, 24, torch.float32, "cpu", False, True, strided=False))


@cpu
def test_empty_sizes():
    x, w = torch.randn(0, 8), torch.randn(5, 8)
    assert skinny_linear(x, w).shape == (0, 5)
    y = skinny_linear(torch.randn(3, 0), torch.randn(4, 0), torch.ones(4), torch.ones(3, 4))
    assert torch.equal(y, torch.full((3, 4), 2.0))


BAD = {
    "x-int": (lambda x, w: (x.long(), w), "x must be float32"),
    "weight-1d": (lambda x, w: (x, w[0]), "weight"),
    "k-mismatch": (lambda x, w: (x[..., :-1], w), "weight's K=8"),
    "weight-dtype": (lambda x, w: (x, w.double()), "weight"),
    "bias-shape": (lambda x, w: (x, w, torch.zeros(4)), "bias must have shape"),
    "residual-shape": (lambda x, w: (x, w, None, torch.zeros(3, 4)), "residual must have shape"),
    "residual-dtype": (lambda x, w: (x, w, None, torch.zeros(2, 5, dtype=torch.float64)), "residual"),
    "bias-not-tensor": (lambda x, w: (x, w, 1.0), "bias must be a tensor"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_arguments_are_named(case):
    make, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        skinny_linear(*make(torch.randn(2, 8), torch.randn(5, 8)))


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16, got 24"):
        LinearConfig(block_n=24)
    with pytest.raises(ValueError, match="num_stages"):
        LinearConfig(num_stages=0)
    with pytest.raises(ValueError, match="split_k must be >= 1, got 0"):
        LinearConfig(split_k=0)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(("M", "N", "K"), [(1, 4096, 4096), (32, 3584, 3584), (32, 3584, 18944), (32, 4608, 3584),
                                           (7, 1000, 999)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("split_k", [1, 4])
def test_decode_shapes_on_the_gpu(M, N, K, dtype, split_k):
    _check(*_inputs(M + N, (M, 1), N, K, dtype, "cuda", True, True, strided=False), LinearConfig(split_k=split_k))


# ------------------------------------------------------------------------------------------ KVBackend.linear
def _check_backend_linear(rows, dtype, device):
    """``TritonBackend.linear`` (the kernel up to ``MAX_ROWS`` rows, the default beyond) against the default
    ``KVBackend.linear`` (``F.linear``; ``residual.addmm_`` with a residual), with and without bias and residual:
    within the dtype's rounding of each other; the residual's storage may take the result."""
    x, w, b, r = _inputs(rows, (rows, 1), 72, 300, dtype, device, True, True, strided=False)
    for bias, residual in ((None, None), (b, None), (None, r), (b, r)):
        got = TritonBackend().linear(x, w, bias, None if residual is None else residual.clone())
        want = TorchBackend().linear(x, w, bias, None if residual is None else residual.clone())
        assert got.shape == want.shape == (rows, 1, 72) and got.dtype == dtype
        scale = want.abs().max().clamp(min=1.0)
        assert float((got.double() - want.double()).abs().max() / scale) <= 2 * TOL[dtype]
        assert float((want.double() - _reference(x, w, bias, residual)).abs().max() / scale) <= TOL[dtype]


@cpu
@pytest.mark.parametrize("rows", [3, MAX_ROWS + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backend_linear_gives_the_default_result(rows, dtype):
    _check_backend_linear(rows, dtype, "cpu")


def test_default_linear_accumulates_onto_a_contiguous_residual():
    x, w, b, r = _inputs(1, (4, 1), 6, 5, torch.float32, "cpu", True, True, strided=False)
    want = _reference(x, w, b, r)
    out = KVBackend.linear(TorchBackend(), x, w, b, r)
    assert out.data_ptr() == r.data_ptr()  # written into the residual's storage, no add kernel
    torch.testing.assert_close(out.double(), want)
    strided = torch.randn(4, 1, 12)[..., ::2]
    want = _reference(x, w, None, strided)
    torch.testing.assert_close(KVBackend.linear(TorchBackend(), x, w, None, strided).double(), want)


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("rows", [1, 7, 32, 33, 64])
@pytest.mark.parametrize("K", [10, 3584, 18944])
def test_decode_tiles_fit_the_shared_memory(size, rows, K):
    """Pipelined tiles (``num_stages - 1`` of x and W) within the budget; the widest K step that fits, at most K."""
    dtype = torch.bfloat16 if size == 2 else torch.float32
    config = decode_config(torch.empty(rows, 1, K, dtype=dtype), torch.empty(64, K, dtype=dtype))
    tiles = (config.num_stages - 1) * (block_rows(rows) + config.block_n) * config.block_k * size
    assert tiles <= SHARED_BUDGET and config.block_k <= max(16, 2 * K)
    assert config.block_k == 16 or 2 * tiles > SHARED_BUDGET or config.block_k >= min(512, K)
    if size == 2 and rows <= 32 and K >= 512:
        assert config.block_k == 512  # the H200 sweep's best for o_proj and down_proj


# ------------------------------------------------------------------------------------------ gate_up_silu
def _check_gated(x, w, b, config=None):
    """Against silu(gate) * up of the float64 GEMM rounded to the dtype (what two GEMMs and silu_mul compute, up
    to the GEMM's own rounding), and against the fused layer's unfused path (one GEMM, then silu_mul)."""
    F = w.shape[0] // 2
    got = gate_up_silu(x, w, b, config)
    gate, up = _reference(x, w, b, None).to(x.dtype).split(F, dim=-1)
    want = torch.nn.functional.silu(gate.double()) * up.double()
    assert got.dtype == x.dtype and got.shape == want.shape
    scale = want.abs().max().clamp(min=1.0)
    err = float((got.double() - want).abs().max() / scale)
    assert err <= 2 * TOL[x.dtype], err
    gate, up = torch.nn.functional.linear(x, w, b).split(F, dim=-1)
    unfused = layer_ops.silu_mul(gate, up)
    assert float((got.double() - unfused.double()).abs().max() / scale) <= 2 * TOL[x.dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("lead", "F", "K"), [((1,), 17, 19), ((3, 1), 40, 100), ((33,), 5, 70), ((2, 5), 16, 16)])
@pytest.mark.parametrize("bias", [False, True])
@cpu
def test_gate_up_silu_matches_the_reference(dtype, lead, F, K, bias):
    _check_gated(*_inputs(sum(lead) + F + K, lead, 2 * F, K, dtype, "cpu", bias, False, strided=False)[:3],
                 LinearConfig(16, 16, 1, 1))


@pytest.mark.parametrize("config", [LinearConfig(16, 16, 1, 1), LinearConfig(32, 64, 4, 2), None], ids=repr)
@cpu
def test_gate_up_silu_tiles_strided_inputs_and_many_rows(config):
    _check_gated(*_inputs(6, (7,), 90, 83, torch.bfloat16, "cpu", True, False, strided=True)[:3], config)
    _check_gated(*_inputs(7, (70,), 24, 24, torch.float32, "cpu", False, False, strided=False)[:3], config)


@cpu
def test_gate_up_silu_bitwise_where_the_gemm_is_exact():
    """With integer-valued inputs every GEMM sum is exact, so the epilogue alone decides: it must equal silu_mul of
    the rounded halves bit for bit (bf16; the interpreter's exp is numpy's, which may differ from torch's in the
    last fp32 bit, far below bf16's rounding)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (5, 32), generator=gen).to(torch.bfloat16)
    w = torch.randint(-2, 3, (2 * 24, 32), generator=gen).to(torch.bfloat16)
    b = torch.randint(-4, 5, (48,), generator=gen).to(torch.bfloat16)
    gate, up = (x.double() @ w.double().T + b.double()).to(torch.bfloat16).split(24, dim=-1)
    assert torch.equal(gate_up_silu(x, w, b, LinearConfig(16, 16, 1, 1)), layer_ops.silu_mul(gate, up))


@cpu
def test_gate_up_silu_empty_sizes_and_bad_arguments():
    assert gate_up_silu(torch.randn(0, 8), torch.randn(10, 8)).shape == (0, 5)
    y = gate_up_silu(torch.randn(3, 0), torch.randn(4, 0), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.allclose(y, torch.nn.functional.silu(torch.tensor([1.0, 2.0])) * torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match="odd row count 5"):
        gate_up_silu(torch.randn(2, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="bias must have shape \\[10\\]"):
        gate_up_silu(torch.randn(2, 8), torch.randn(10, 8), torch.zeros(5))
    with pytest.raises(ValueError, match="does not split K, got config.split_k=2"):
        gate_up_silu(torch.randn(2, 8), torch.randn(10, 8), config=LinearConfig(split_k=2))
    with pytest.raises(ValueError, match="weight \\[2F, K\\]"):
        gate_up_silu(torch.randn(2, 8), torch.randn(10))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(("M", "F", "K"), [(1, 14336, 4096), (32, 18944, 3584), (64, 18944, 3584), (7, 1000, 999)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gate_up_silu_decode_shapes_on_the_gpu(M, F, K, dtype):
    _check_gated(*_inputs(M + F, (M, 1), 2 * F, K, dtype, "cuda", True, False, strided=False)[:3])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("rows", [1, 32, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_backend_linear_on_the_gpu(rows, dtype):
    """The tiles :func:`decode_config` picks launch (shared memory) and agree with cuBLAS, up to ``MAX_ROWS``."""
    _check_backend_linear(rows, dtype, "cuda")
    x, w, _, r = _inputs(rows, (rows, 1), 3584, 18944, dtype, "cuda", False, True, strided=False)
    got = TritonBackend().linear(x, w, None, r.clone())
    want = _reference(x, w, None, r)
    assert float((got.double() - want).abs().max() / want.abs().max().clamp(min=1.0)) <= TOL[dtype]
