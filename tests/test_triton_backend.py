"""The ``triton`` backend against the torch reference, primitive by primitive.

On CPU the kernels run through Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the environment
before ``triton`` is imported (CI exports it for the whole pytest run); shapes are tiny there (~0.5 ms per
program instance) and tile sizes are forced small so every kernel still runs several blocks, several splits
and several query-row chunks with ragged tails. The ``gpu`` cases run the default (device-chosen) tiles at
larger shapes and in fp32/bf16/fp16.

Every run poisons what it must not read or rely on: K/V slots outside the live (or candidate) ranges hold NaN
or huge values (the reference runs on the clean tensors), and every ``torch.empty``/``torch.empty_like`` the
kernels allocate (outputs, split partials) is NaN-filled, so an element a kernel forgets to write, or a slot
it reads outside its range, shows up in the output.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import triton_kernels_or_skip

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = triton_kernels_or_skip("triton backend tests")

from kvsieve.backends.torch_ref import TorchBackend  # noqa: E402
from kvsieve.backends.triton import compaction as tc  # noqa: E402
from kvsieve.backends.triton import decode_attention as td  # noqa: E402
from kvsieve.backends.triton import window_scores as tw  # noqa: E402
from kvsieve.backends.triton._common import cdiv, next_pow2  # noqa: E402
from kvsieve.backends.triton.backend import TritonBackend  # noqa: E402

REF = TorchBackend()
TRI = TritonBackend()
CPU_DEVICE = "cpu"

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
cpu = pytest.mark.skipif(
    not INTERPRET, reason="CPU cases run through Triton's interpreter: set TRITON_INTERPRET=1"
)

# tolerance per input dtype: (rtol, atol)
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}
# lse / scores are fp32 outputs computed from exactly representable products; bf16/fp16 inputs only change the
# summation order (and, on the GPU, the tensor-core accumulation)
SCORE_TOL = {torch.float32: (2e-5, 1e-6), torch.bfloat16: (2e-4, 1e-5), torch.float16: (2e-4, 1e-5)}

# small tiles for the interpreter: several blocks per split, several splits, ragged tails
CPU_SCORE_CFG = [
    tw.ScoreConfig(block_n=16, max_block_m=128, programs=8),
    tw.ScoreConfig(block_n=16, max_block_m=16, programs=1),  # row chunks (MC > 1), one split, long chunks
]
CPU_DECODE_CFG = [
    td.DecodeConfig(block_n=16, max_block_m=64, num_splits=1),  # single pass, no reduce
    td.DecodeConfig(block_n=16, max_block_m=16, num_splits=3),  # split-K + reduce, row chunks when G*Q > 16
]


# --------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def poison_empty(monkeypatch):
    """NaN-fill every floating tensor from torch.empty / torch.empty_like while the test runs."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(real_empty_like(*a, **k)))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ranges(gen, B, Hkv, C, min_len=0):
    """Random ``[starts, ends)`` per (row, KV head), int64 [B, Hkv]; includes a full and an empty range."""
    lens = torch.randint(min_len, C + 1, (B, Hkv), generator=gen)
    flat = lens.view(-1)
    flat[0] = C
    if flat.numel() > 1 and min_len == 0:
        flat[1] = 0
    if flat.numel() > 2:
        flat[2] = max(min_len, min(C, 1))
    starts = (torch.rand(B, Hkv, generator=gen) * (C - lens + 1).to(torch.float32)).long().clamp(max=C - lens)
    return starts, starts + lens


def _poisoned(x, starts, ends, kind="nan"):
    """A copy of ``x [B, Hkv, C, d]`` with poison in the slots outside ``[starts, ends)``: ``"nan"``, or
    ``"huge"`` (the dtype's largest magnitude, alternating sign along d: a dot product over it overflows)."""
    slots = torch.arange(x.shape[2], device=x.device)
    live = (slots >= starts[..., None].to(x.device)) & (slots < ends[..., None].to(x.device))
    if kind == "nan":
        fill = torch.full_like(x, float("nan"))
    else:
        sign = 1 - 2 * (torch.arange(x.shape[-1], device=x.device) % 2)
        fill = (sign * torch.finfo(x.dtype).max).to(x.dtype).expand_as(x)
    return torch.where(live[..., None], x, fill)


def _kind(case) -> str:
    return ("nan", "huge")[hash(case) % 2]


def _randn(gen, *shape, dtype, device):
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)


def _cpu(*ts):
    return [t.cpu() if isinstance(t, torch.Tensor) else t for t in ts]


def _assert_close(actual, expected, tol):
    rtol, atol = tol
    torch.testing.assert_close(
        actual.cpu().float(), expected.cpu().float(), rtol=rtol, atol=atol, equal_nan=False
    )


# ---------------------------------------------------------------------------------------------- case lists
# (B, Hkv, G, W or Q, C, d)
CPU_SCORE_CASES = [
    (2, 2, 1, 1, 37, 16),
    (2, 2, 2, 3, 45, 32),
    (1, 3, 3, 3, 33, 16),
    (2, 1, 4, 5, 29, 24),  # d not a power of two; G*W = 20 > 16 -> two row chunks with max_block_m=16
]
GPU_SCORE_CASES = [
    (3, 4, G, W, C, d)
    for (G, W, C, d) in [
        (1, 8, 1000, 64),
        (2, 32, 2049, 128),
        (3, 8, 777, 128),
        (4, 32, 3001, 128),
        (7, 32, 1500, 128),
        (8, 8, 4097, 64),
        (8, 32, 999, 128),
        (4, 8, 1200, 80),
    ]
]
CPU_DECODE_CASES = [
    (2, 2, 1, 1, 40, 16),
    (2, 2, 2, 3, 35, 32),
    (1, 3, 3, 1, 50, 16),
    (2, 1, 4, 3, 27, 16),
    (1, 2, 4, 5, 30, 24),  # G*Q = 20 rows; d = 24
]
GPU_DECODE_CASES = [
    (4, 4, G, Q, C, d)
    for (G, Q, C, d) in [
        (1, 1, 3000, 128),
        (2, 3, 1025, 64),
        (3, 1, 4099, 128),
        (4, 1, 8191, 128),
        (4, 3, 2000, 128),
        (7, 1, 5000, 128),
        (8, 1, 3333, 64),
        (8, 16, 700, 128),
        (4, 16, 1500, 80),
    ]
]
GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _cpu_params(cases, configs):
    return [
        pytest.param(CPU_DEVICE, torch.float32, c, cfg, id=f"cpu-{'x'.join(map(str, c))}-cfg{i}", marks=cpu)
        for c in cases
        for i, cfg in enumerate(configs)
    ]


def _gpu_params(cases):
    return [
        pytest.param(
            "cuda", dt, c, None, id=f"gpu-{str(dt)[6:]}-{'x'.join(map(str, c))}", marks=[pytest.mark.gpu, gpu]
        )
        for c in cases
        for dt in GPU_DTYPES
    ]


SCORE_PARAMS = _cpu_params(CPU_SCORE_CASES, CPU_SCORE_CFG) + _gpu_params(GPU_SCORE_CASES)
DECODE_PARAMS = _cpu_params(CPU_DECODE_CASES, CPU_DECODE_CFG) + _gpu_params(GPU_DECODE_CASES)


# ------------------------------------------------------------------------------------------ window_lse
@pytest.mark.parametrize("device,dtype,case,cfg", SCORE_PARAMS)
def test_window_lse(device, dtype, case, cfg, poison_empty):
    B, Hkv, G, W, C, d = case
    gen = _gen(hash(case) % 2**31)
    q = _randn(gen, B, Hkv * G, W, d, dtype=dtype, device=device)
    k = _randn(gen, B, Hkv, C, d, dtype=dtype, device=device)
    starts, ends = _ranges(gen, B, Hkv, C)
    scale = d**-0.5
    want = REF.window_lse(*_cpu(q, k, starts, ends), scale)  # the reference sees clean memory
    k = _poisoned(k, starts, ends, _kind(case))
    got = tw.window_lse(q, k, starts.to(device), ends.to(device), scale, config=cfg)
    assert got.dtype == torch.float32 and got.shape == (B, Hkv * G, W)
    # -inf exactly where the query sees nothing (ranges shorter than the window)
    assert torch.equal(got.cpu().isneginf(), want.isneginf())
    finite = want.isfinite()
    assert finite.any()
    _assert_close(got.cpu()[finite], want[finite], SCORE_TOL[dtype])


# --------------------------------------------------------------------------------------- window_scores
@pytest.mark.parametrize("with_lse", [False, True], ids=["cand-softmax", "given-lse"])
@pytest.mark.parametrize("device,dtype,case,cfg", SCORE_PARAMS)
def test_window_scores(device, dtype, case, cfg, with_lse, poison_empty):
    B, Hkv, G, W, C, d = case
    gen = _gen(hash(case) % 2**31 + with_lse)
    q = _randn(gen, B, Hkv * G, W, d, dtype=dtype, device=device)
    k = _randn(gen, B, Hkv, C, d, dtype=dtype, device=device)
    scale = d**-0.5
    if with_lse:
        # candidates lie before the window: [starts, ends - W) split at random points
        starts, ends = _ranges(gen, B, Hkv, C, min_len=W)
        room = ends - W - starts
        a = (torch.rand(B, Hkv, generator=gen) * (room + 1)).long().clamp(max=room)
        cand_starts = starts + a
        cand_ends = cand_starts + (torch.rand(B, Hkv, generator=gen) * (room - a + 1)).long().clamp(
            max=room - a
        )
        cand_ends.view(-1)[0] = ends.view(-1)[0] - W  # one candidate range up to the window
        if B * Hkv > 1:
            cand_ends.view(-1)[1] = cand_starts.view(-1)[1]  # one empty candidate range
        lse = REF.window_lse(*_cpu(q, k, starts, ends), scale)
    else:
        cand_starts, cand_ends = _ranges(gen, B, Hkv, C)
        lse = None
    want = REF.window_scores(*_cpu(q, k, cand_starts, cand_ends), scale, lse)  # on clean memory
    k = _poisoned(k, cand_starts, cand_ends, _kind(case))  # outside the candidates (the window too)
    N = want.shape[-1]
    out = torch.full((B, Hkv, N), float("nan"), device=device)
    got = tw.window_scores(
        q,
        k,
        cand_starts.to(device),
        cand_ends.to(device),
        scale,
        None if lse is None else lse.to(device),
        out=out,
        config=cfg,
    )
    assert got is out and got.shape == want.shape and got.dtype == torch.float32
    counts = (cand_ends - cand_starts).clamp(min=0)
    past = torch.arange(N) >= counts[..., None]
    assert (got.cpu()[past] == 0).all(), "entries past a row's candidate count must be exactly 0"
    _assert_close(got, want, SCORE_TOL[dtype])
    # the backend entry point (default tiles) agrees too
    got2 = TRI.window_scores(
        q, k, cand_starts.to(device), cand_ends.to(device), scale, None if lse is None else lse.to(device)
    )
    _assert_close(got2, want, SCORE_TOL[dtype])


def test_window_scores_all_empty():
    q = torch.randn(2, 4, 3, 16, device=_dev())
    k = torch.randn(2, 2, 10, 16, device=_dev())
    s = torch.tensor([[3, 5], [0, 10]], device=_dev())
    got = TRI.window_scores(q, k, s, s, 0.25)
    assert got.shape == (2, 2, 0) and got.dtype == torch.float32


def test_window_lse_then_scores_pipeline(poison_empty):
    """SnapKV-style use: lse over the whole live range, scores for the candidates before the window."""
    gen = _gen(7)
    B, Hkv, G, W, C, d = 2, 2, 2, 4, 40, 16
    dev = _dev()
    q = _randn(gen, B, Hkv * G, W, d, dtype=torch.float32, device=dev)
    k = _randn(gen, B, Hkv, C, d, dtype=torch.float32, device=dev)
    starts = torch.tensor([[0, 3], [5, 0]])
    ends = torch.tensor([[40, 30], [25, 12]])
    lse_r = REF.window_lse(*_cpu(q, k, starts, ends), d**-0.5)
    want = REF.window_scores(*_cpu(q, k, starts, ends - W), d**-0.5, lse_r)
    k = _poisoned(k, starts, ends)
    lse_t = TRI.window_lse(q, k, starts.to(dev), ends.to(dev), d**-0.5)
    got = TRI.window_scores(q, k, starts.to(dev), (ends - W).to(dev), d**-0.5, lse_t)
    _assert_close(got, want, SCORE_TOL[torch.float32])
    # the window's own columns take the rest of the mass: every query's total over candidates is <= 1
    assert (got.sum(-1).cpu() <= G * W + 1e-4).all()


# ---------------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("device,dtype,case,cfg", DECODE_PARAMS)
def test_decode_attention(device, dtype, case, cfg, poison_empty):
    B, Hkv, G, Q, C, d = case
    gen = _gen(hash(case) % 2**31)
    q = _randn(gen, B, Hkv * G, Q, d, dtype=dtype, device=device)
    k = _randn(gen, B, Hkv, C, d, dtype=dtype, device=device)
    v = _randn(gen, B, Hkv, C, d, dtype=dtype, device=device)
    starts, ends = _ranges(gen, B, Hkv, C)
    if B * Hkv > 3 and Q > 1:
        ends.view(-1)[3] = (
            starts.view(-1)[3] + Q - 1
        )  # fewer live slots than new queries: query 0 sees nothing
    scale = d**-0.5
    want = REF.decode_attention(*_cpu(q, k, v, starts, ends), scale)  # the reference sees clean memory
    k = _poisoned(k, starts, ends, _kind(case))
    v = _poisoned(v, starts, ends, ("huge", "nan")[hash(case) % 2])
    out = torch.full_like(q, float("nan"))
    got = td.decode_attention(q, k, v, starts.to(device), ends.to(device), scale, out=out, config=cfg)
    assert got is out and got.dtype == dtype and got.shape == q.shape
    _assert_close(got, want, TOL[dtype])
    got2 = TRI.decode_attention(q, k, v, starts.to(device), ends.to(device), scale)
    _assert_close(got2, want, TOL[dtype])


def test_decode_attention_strided_inputs(poison_empty):
    """Non-contiguous views (a cache slice [.., :C, :] of a bigger buffer; transposed queries) work."""
    gen = _gen(3)
    dev = _dev()
    big_k = _randn(gen, 2, 2, 50, 16, dtype=torch.float32, device=dev)
    big_v = _randn(gen, 2, 2, 50, 16, dtype=torch.float32, device=dev)
    k, v = big_k[:, :, 5:45], big_v[:, :, 5:45]
    q = _randn(gen, 2, 1, 4, 16, dtype=torch.float32, device=dev).transpose(1, 2)  # [2, 4, 1, 16]
    starts = torch.tensor([[0, 7], [2, 0]])
    ends = torch.tensor([[40, 20], [3, 33]])
    want = REF.decode_attention(*_cpu(q, k, v, starts, ends), 0.3)
    got = td.decode_attention(
        q, k, v, starts.to(dev), ends.to(dev), 0.3, config=None if HAS_CUDA else CPU_DECODE_CFG[1]
    )
    _assert_close(got, want, TOL[torch.float32])


# decode split-K reduce at awkward split counts, forced with DecodeConfig(num_splits=S), block_n=16 (GPU too):
# (B, Hkv, G, Q, C, d, S, ranges) with ranges[b][j] = (start, end)
REDUCE_CASES = [
    # S = 3; G = 1; a full row, an empty row, a row shorter than one block, a long one
    (2, 2, 1, 1, 100, 16, 3, [[(0, 100), (7, 7)], [(3, 8), (10, 91)]]),
    # S = 5; G = 4, Q = 2; one slot (only the last query sees it), a full row
    (1, 3, 4, 2, 100, 32, 5, [[(0, 100), (13, 14), (20, 99)]]),
    # S = 6 but a 70-slot row has 5 chunks of 16 (the sixth is empty); G = 7
    (2, 1, 7, 1, 70, 16, 6, [[(0, 70)], [(30, 31)]]),
    # S = 7; Q = 5 with 4 live slots (query 0 sees nothing); M = 20 > max_block_m 16: two row chunks; d = 24
    (1, 2, 4, 5, 90, 24, 7, [[(2, 90), (5, 9)]]),
    # S = 9, more than any row's chunks; an empty and a 3-slot row
    (2, 2, 2, 3, 100, 16, 9, [[(0, 0), (60, 100)], [(4, 7), (11, 100)]]),
    # S = 13, every chunk non-empty: more chunks than BLOCK_S at small reduce tiles (several blocks of chunks)
    (1, 1, 4, 1, 200, 16, 13, [[(0, 200)]]),
]
REDUCE_DEVICES = [pytest.param(CPU_DEVICE, torch.float32, id="cpu-float32", marks=cpu)] + [
    pytest.param("cuda", dt, id=f"gpu-{str(dt)[6:]}", marks=[pytest.mark.gpu, gpu])
    for dt in (torch.float32, torch.bfloat16)
]


def _reduce_case_id(case) -> str:
    B, Hkv, G, Q, C, d, S, _ = case
    return f"B{B}-Hkv{Hkv}-G{G}-Q{Q}-C{C}-d{d}-S{S}"


def _check_decode_split(device, dtype, B, Hkv, G, Q, C, d, S, starts, ends, reduce_tile, seed):
    gen = _gen(seed)
    q = _randn(gen, B, Hkv * G, Q, d, dtype=dtype, device=device)
    k = _randn(gen, B, Hkv, C, d, dtype=dtype, device=device)
    v = _randn(gen, B, Hkv, C, d, dtype=dtype, device=device)
    scale = d**-0.5
    want = REF.decode_attention(*_cpu(q, k, v, starts, ends), scale)
    k = _poisoned(k, starts, ends, "nan")
    v = _poisoned(v, starts, ends, "huge")
    cfg = td.DecodeConfig(block_n=16, max_block_m=16, num_splits=S, reduce_tile=reduce_tile)
    out = torch.full_like(q, float("nan"))
    got = td.decode_attention(q, k, v, starts.to(device), ends.to(device), scale, out=out, config=cfg)
    assert got is out
    _assert_close(got, want, TOL[dtype])
    lens = (ends - starts).clamp(min=0)
    dead = (lens == 0).repeat_interleave(G, dim=1)  # [B, H]: rows with no live slot output exact zeros
    assert (got.cpu()[dead] == 0).all()


@pytest.mark.parametrize("reduce_tile", [8192, 256, 64])  # one pass; BLOCK_S = 4; BLOCK_S = 1 (one per step)
@pytest.mark.parametrize("case", REDUCE_CASES, ids=_reduce_case_id)
@pytest.mark.parametrize("device,dtype", REDUCE_DEVICES)
def test_decode_split_reduce(device, dtype, case, reduce_tile, poison_empty):
    """The reduce combines exactly the non-empty chunks, whatever S, BLOCK_S and the ranges."""
    B, Hkv, G, Q, C, d, S, ranges = case
    se = torch.tensor(ranges, dtype=torch.int64)  # [B, Hkv, 2]
    _check_decode_split(device, dtype, B, Hkv, G, Q, C, d, S, se[..., 0], se[..., 1], reduce_tile, hash(case[:7]))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("device,dtype", REDUCE_DEVICES)
def test_decode_split_reduce_random(device, dtype, seed, poison_empty):
    """Random shapes, ranges (with a full, an empty and a one-slot range), split counts and reduce tiles."""
    gen = _gen(100 + seed)
    G = (1, 4, 7, 3)[seed]
    Q = (1, 5, 2, 3)[seed]
    B, Hkv, C, d = 2, 3, 90, 16
    S = int(torch.randint(2, 12, (1,), generator=gen))
    starts, ends = _ranges(gen, B, Hkv, C)
    _check_decode_split(device, dtype, B, Hkv, G, Q, C, d, S, starts, ends, (8192, 256, 64, 512)[seed], seed)


def test_reduce_tiles():
    """Powers of two within the budget; every split in one block at the default budget up to 128 splits."""
    assert td.reduce_tiles(33, 4, 128, 8192) == (64, 4, 32)  # batch 1, G = 4, Q = 1: one pass, 4 column tiles
    assert td.reduce_tiles(2, 128, 128, 8192) == (2, 128, 32)
    for n in (2, 3, 5, 33, 64, 100, 128, 129, 1000):
        for M in (1, 4, 7, 20, 128):
            for d in (16, 24, 64, 128, 256):
                for budget in (16, 64, 256, 8192, 32768):
                    bs, bm, bd = td.reduce_tiles(n, M, d, budget)
                    assert all(x & (x - 1) == 0 for x in (bs, bm, bd)), (n, M, d, budget)
                    assert bs <= next_pow2(n) and bm <= next_pow2(M) and 16 <= bd <= next_pow2(d)
                    assert bs * bm * bd <= budget, (n, M, d, budget, bs, bm, bd)
                    if budget == 8192 and n <= 128:
                        assert bs == next_pow2(n)


# split count: a pure function of the shapes (CPU only, no kernel runs)
H200_SMS = 132
GPU_DECODE_CFG = td.DecodeConfig(block_n=64, max_block_m=64, num_warps=4, num_stages=3)  # the d=128 default
ROW_BYTES = 4 * 4 * (128 + 2)  # fp32 partials of one split of one row at G*Q = 4, d = 128


def _splits(rows, C=131072 + 128, cfg=GPU_DECODE_CFG, mc=1, sms=H200_SMS, row_bytes=ROW_BYTES):
    return td.choose_num_splits(rows, mc, C, sms, cfg.block_n, cfg, row_bytes)


def test_choose_num_splits_small_batch():
    """Hkv = 8 on an H200: batch 16 and up stay unsplit; fewer rows than SMs aim at SMALL_PROGRAMS_PER_SM (2,
    measured best) programs per SM; a split covers at least 256 capacity slots."""
    assert td.SMALL_PROGRAMS_PER_SM == 2
    assert [_splits(8 * B) for B in (1, 2, 4, 8, 16, 17, 24, 32, 64)] == [33, 16, 8, 4, 1, 1, 1, 1, 1]
    assert _splits(8 * 32, C=32768 + 128) == 1  # the measured-fastest unsplit batch-32 case
    assert [_splits(8, C=C) for C in (100, 256, 257, 2048, 8192, 12288, 12800, 131200)] == [1, 1, 2, 8, 32, 33, 33, 33]
    assert _splits(8 * 4, mc=2) == 4  # MC > 1 counts as more rows
    for C in (1, 300, 8192, 131200):  # never more splits for more rows
        counts = [_splits(rows, C=C) for rows in range(1, 600)]
        assert all(a >= b >= 1 for a, b in zip(counts, counts[1:])), C


def test_choose_num_splits_unsplit_from_b_hkv_at_sm_count():
    """B*Hkv*MC >= SMs: unsplit (with one row per SM or more, a split never lightens the busiest SM)."""
    for sms in (2, 78, 132):
        for rows in range(sms, 3 * sms + 2):
            for mc in (1, 2):
                for C in (512, 8192, 32896):
                    assert _splits(rows, C=C, mc=mc, sms=sms) == 1, (sms, rows, mc, C)


def test_choose_num_splits_only_where_a_split_lightens_the_busiest_sm():
    """S splits put ceil(rows*S / SMs) chunks of 1/S row on the busiest SM: where that is a whole row or more and the
    rows alone keep 5/6 of the SMs busy, the call runs unsplit (132 SMs: 128 rows split in two would put two halves
    on most SMs; 96 rows keep their split, which measured faster than leaving 36 SMs idle). A given ``programs``
    target is taken as it is."""
    for rows in range(1, 600):
        for C in (300, 8192, 131200):
            n = _splits(rows, C=C)
            plain = max(1, min((2 * H200_SMS) // rows, cdiv(C, 256)))  # the target before the rule
            no_lighter = cdiv(rows * plain, H200_SMS) >= plain and 6 * rows >= 5 * H200_SMS
            assert n == (1 if no_lighter else plain), (rows, C, n, plain)
    assert [_splits(rows) for rows in (64, 66, 67, 88, 89, 96, 109, 110, 128, 132)] == [4, 4, 3, 3, 2, 2, 2, 1, 1, 1]
    targeted = td.DecodeConfig(block_n=64, max_block_m=64, programs=2 * H200_SMS)
    assert _splits(128, cfg=targeted) == 2


def test_one_wave_tiles_fit_the_shared_memory(monkeypatch):
    """The one-wave launch's 128-slot blocks only where three stages of K and V tiles fit an H200's 227 KiB of shared
    memory: 2-byte K/V at d <= 128. fp32 K/V (d = 80 padded to 128 asked for 272 KiB: OutOfResources on the GPU) and
    d > 128 keep 64-slot blocks, as do launches that are not one wave."""
    monkeypatch.setattr(td, "interpret_mode", lambda: False)
    cuda = torch.device("cuda")
    assert td.default_config(128, cuda, one_wave=True).block_n == 128
    assert td.default_config(80, cuda, one_wave=True, element_size=2).block_n == 128
    assert td.default_config(80, cuda, one_wave=True, element_size=4).block_n == 64
    assert td.default_config(256, cuda, one_wave=True).block_n == 64
    assert td.default_config(128, cuda).block_n == 64
    for d in (64, 80, 128):
        for size in (2, 4):
            cfg = td.default_config(d, cuda, one_wave=True, element_size=size)
            tiles = cfg.num_stages * 2 * cfg.block_n * next_pow2(d) * size  # K and V, every stage
            assert tiles <= 200 << 10, (d, size, cfg)


def test_choose_num_splits_overrides_and_caps():
    cfg = td.DecodeConfig(block_n=16, max_block_m=64, num_splits=5)
    assert _splits(8, cfg=cfg) == 5 and _splits(8 * 64, cfg=cfg) == 5  # forced, whatever the shapes
    assert _splits(8, cfg=td.DecodeConfig(block_n=16, max_block_m=64, num_splits=0)) == 1
    # programs: a target per launch, for every B*Hkv
    assert _splits(8, cfg=td.DecodeConfig(block_n=64, max_block_m=64, programs=1000)) == 125
    assert _splits(8 * 32, cfg=td.DecodeConfig(block_n=64, max_block_m=64, programs=1056)) == 4
    # min_split_slots (256 by default) and block_n bound the splits of a 2K cache
    assert _splits(8, C=2048, cfg=td.DecodeConfig(block_n=64, max_block_m=64)) == 8
    assert _splits(8, C=2048, cfg=td.DecodeConfig(block_n=64, max_block_m=64, min_split_slots=1)) == 32
    assert _splits(8, C=2048, cfg=td.DecodeConfig(block_n=128, max_block_m=64, min_split_slots=1)) == 16
    # partials under 256 MiB; at least one split for any input
    assert _splits(8, row_bytes=(256 << 20) // 80) == 10
    assert _splits(8, row_bytes=1 << 40) == 1 and _splits(8, C=0) == 1 and _splits(0) >= 1


# ------------------------------------------------------------------------------------------ compaction
def _keep_lists(gen, B, Hkv, C, K):
    """keep [B, Hkv, K] sorted with keep[i] >= dest + i; garbage (-1 / huge) past counts."""
    keep = torch.full((B, Hkv, K), -1, dtype=torch.int64)
    counts = torch.zeros(B, Hkv, dtype=torch.int64)
    dest = torch.zeros(B, Hkv, dtype=torch.int64)
    for b in range(B):
        for j in range(Hkv):
            n = (b * Hkv + j) % 5
            dst = int(torch.randint(0, C // 3 + 1, (1,), generator=gen))
            cnt = (
                0
                if n == 1
                else (
                    min(K, C - dst)
                    if n == 0
                    else int(torch.randint(0, min(K, C - dst) + 1, (1,), generator=gen))
                )
            )
            if n == 2:
                src = torch.arange(dst, dst + cnt)  # identity moves (keep[i] == dest + i)
            else:
                src = (torch.randperm(C - dst, generator=gen)[:cnt] + dst).sort().values
            keep[b, j, :cnt] = src
            if (b + j) % 2:
                keep[b, j, cnt:] = 2**40  # must never be read
            counts[b, j], dest[b, j] = cnt, dst
    return keep, counts, dest


@pytest.mark.parametrize(
    "device,dtype,case",
    [
        pytest.param(CPU_DEVICE, torch.float32, c, id=f"cpu-{'x'.join(map(str, c))}", marks=cpu)
        for c in [(2, 2, 40, 16, 30), (1, 3, 33, 24, 33), (3, 2, 70, 32, 20)]
    ]
    + [
        pytest.param(
            "cuda", dt, c, id=f"gpu-{str(dt)[6:]}-{'x'.join(map(str, c))}", marks=[pytest.mark.gpu, gpu]
        )
        for c in [
            (4, 8, 4096, 128, 1500),
            (1, 8, 9000, 128, 6000),
            (32, 4, 1025, 64, 300),
            (2, 3, 777, 80, 777),
        ]
        for dt in GPU_DTYPES
    ],
)
def test_compact(device, dtype, case):
    B, Hkv, C, d, K = case
    gen = _gen(hash(case) % 2**31)
    keys = _randn(gen, B, Hkv, C, d, dtype=dtype, device=device)
    values = _randn(gen, B, Hkv, C, d, dtype=dtype, device=device)
    keys[0, 0, -1] = float("nan")  # unkept poison stays where it is
    keep, counts, dest = _keep_lists(gen, B, Hkv, C, K)
    want_k, want_v = keys.cpu().clone(), values.cpu().clone()
    REF.compact(want_k, want_v, keep, counts, dest)
    got_k, got_v = keys.clone(), values.clone()
    cfg = None if device == "cuda" else tc.CompactConfig(block_k=16, block_d=16 if d > 16 else 32)
    tc.compact(got_k, got_v, keep.to(device), counts.to(device), dest.to(device), config=cfg)
    torch.testing.assert_close(got_k.cpu(), want_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got_v.cpu(), want_v, rtol=0, atol=0, equal_nan=True)
    # backend entry point, default tiles
    got_k, got_v = keys.clone(), values.clone()
    TRI.compact(got_k, got_v, keep.to(device), counts.to(device), dest.to(device))
    torch.testing.assert_close(got_k.cpu(), want_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got_v.cpu(), want_v, rtol=0, atol=0, equal_nan=True)


def test_compact_empty_keep():
    k = torch.randn(1, 2, 8, 16, device=_dev())
    before = k.clone()
    TRI.compact(
        k,
        k.clone(),
        torch.empty(1, 2, 0, dtype=torch.int64, device=_dev()),
        torch.zeros(1, 2, dtype=torch.int64, device=_dev()),
        torch.zeros(1, 2, dtype=torch.int64, device=_dev()),
    )
    assert torch.equal(k, before)


# --------------------------------------------------------------------------------------------- prefill
@pytest.mark.parametrize("G", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["causal-square", "causal-rect", "mask"])
def test_prefill_attention(G, mode):
    gen = _gen(G * 10 + len(mode))
    B, Hkv, d = 2, 2, 16
    Q, K = (9, 9) if mode == "causal-square" else (5, 13)
    dev = _dev()
    q = _randn(gen, B, Hkv * G, Q, d, dtype=torch.float32, device=dev)
    k = _randn(gen, B, Hkv, K, d, dtype=torch.float32, device=dev)
    v = _randn(gen, B, Hkv, K, d, dtype=torch.float32, device=dev)
    mask = None
    if mode == "mask":
        mask = torch.rand(B, 1, Q, K, generator=gen) < 0.6
        mask[0, 0, 1] = False  # a fully masked query row -> zeros
        mask[1, 0, :, :3] = False  # left padding
        mask = mask.to(dev)
    got = TRI.prefill_attention(q, k, v, mask, d**-0.5)
    want = REF.prefill_attention(*_cpu(q, k, v, mask), d**-0.5)
    _assert_close(got, want, TOL[torch.float32])
    if mode == "mask":
        assert (got[0, :, 1] == 0).all()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_attention_gpu(dtype):
    gen = _gen(11)
    B, Hkv, G, Q, K, d = 2, 4, 7, 300, 300, 128
    q = _randn(gen, B, Hkv * G, Q, d, dtype=dtype, device="cuda")
    k = _randn(gen, B, Hkv, K, d, dtype=dtype, device="cuda")
    v = _randn(gen, B, Hkv, K, d, dtype=dtype, device="cuda")
    for mask in (None, (torch.rand(B, 1, Q, K, generator=gen) < 0.5).cuda()):
        got = TRI.prefill_attention(q, k, v, mask, d**-0.5)
        want = REF.prefill_attention(*_cpu(q, k, v, mask), d**-0.5)
        _assert_close(got, want, TOL[dtype])


# ------------------------------------------------------------------------------------------ conformance
def test_conformance_kit():
    """kvsieve's own backend conformance checks (hypothesis-drawn awkward sizes, head dims 1 and 5,
    nan/huge/noise poison), a few examples on CPU."""
    conformance = pytest.importorskip("kvsieve.testing.conformance")
    conformance.assert_backend_conforms(TRI, reference=REF, device=_dev(), max_examples=4)


@gpu
@pytest.mark.gpu
def test_conformance_kit_gpu():
    conformance = pytest.importorskip("kvsieve.testing.conformance")
    from kvsieve.testing.strategies import Sizes

    sizes = Sizes(max_kv_heads=4, max_group=8, head_dims=(1, 5, 64, 80, 128), max_capacity=600, max_window=16)
    conformance.assert_backend_conforms(
        TRI, reference=REF, device="cuda", dtypes=GPU_DTYPES, sizes=sizes, max_examples=6
    )


# ---------------------------------------------------------------------------------------------- plugin
def _dev():
    return "cuda" if HAS_CUDA else "cpu"


def test_plugin_and_capabilities():
    from kvsieve.backends.triton import backend as mod

    assert mod.kvsieve_backends() == {"triton": TritonBackend}
    assert TRI.name == "triton"
    assert TRI.available() == (True, "")
    assert "cuda" in TritonBackend.capabilities.devices
    assert ("cpu" in TRI.capabilities.devices) == INTERPRET
    # backend="auto" prefers triton over the torch reference, except the interpreter (a test tool)
    assert (TritonBackend.auto_priority > REF.auto_priority) == (not INTERPRET)
    ok, _ = TRI.supports(torch.device(_dev()), torch.float32)
    assert ok


def test_imports_and_reports_without_triton():
    """Listing plugins never needs triton: the backend module imports and says why it is unavailable."""
    code = (
        "import sys; sys.modules['triton'] = None  # import triton -> ImportError, find_spec -> None\n"
        "from kvsieve.backends.triton.backend import TritonBackend, kvsieve_backends\n"
        "ok, why = TritonBackend().available(); assert not ok and 'triton' in why, why\n"
        "assert kvsieve_backends()['triton'] is TritonBackend\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
