"""The ``flash`` backend: availability, refusals, index arithmetic, plumbing, kernels against the reference.

Three layers of tests:

* CPU, pure functions: ``varlen_layout`` (cu_seq / seqused construction) against its definition, the flat key
  view, the log-sum-exp layout conversion, the prefill mask validation, input checks, availability messages
  and the registry.
* CPU, plumbing: the whole backend with the FlashAttention kernels replaced by emulators written from the
  kernels' documented semantics (varlen rows, ``seqused_k``, bottom-right causal, zero rows, ``+inf``
  log-sum-exp of empty rows, both log-sum-exp layouts; ``flash_attn_func``/``flash_attn_with_kvcache``), in
  fp32 against the torch reference. The emulators refuse reads outside the key tensor, and K/V slots outside
  the live ranges are NaN, so a wrong offset or length shows up.
* GPU (``@pytest.mark.gpu``): the real kernels in bf16/fp16 against the torch reference (computed on the same
  inputs with the unused slots zeroed instead of NaN-poisoned).
"""

from __future__ import annotations

import inspect
import itertools
import tomllib
import types
from pathlib import Path

import pytest
import torch

from kvsieve.backends import flash
from kvsieve.backends.flash import (
    AtenKernels,
    FlashAttnKernels,
    FlashBackend,
    check_inputs,
    flat_key_rows,
    left_padding_from_mask,
    lse_to_seq_major,
    varlen_layout,
)
from kvsieve.backends.torch_ref import TorchBackend

REF = TorchBackend()
ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


# ============================================================================================= helpers
def ragged_cache(B, Hkv, G, C, d, Q, *, dtype=torch.float32, device="cpu", seed=0, empty_row=False):
    """Queries ``[B, H, Q, d]``, K/V ``[B, Hkv, C, d]`` with ragged live ranges ``[starts, ends)`` per row and
    KV head (lengths >= Q), the K/V copies for the reference (unused slots zeroed) and the poisoned ones
    (NaN)."""
    gen = torch.Generator().manual_seed(seed)
    H = Hkv * G
    starts = torch.randint(0, max(1, C // 4), (B, Hkv), generator=gen)
    room = C - starts
    lengths = Q + (torch.rand(B, Hkv, generator=gen) * (room - Q + 1).float()).long().clamp(max=room - Q)
    ends = starts + lengths
    if empty_row:  # one (row, KV head) with nothing live
        ends[0, 0] = starts[0, 0]
    q = torch.randn(B, H, Q, d, generator=gen)
    k = torch.randn(B, Hkv, C, d, generator=gen)
    v = torch.randn(B, Hkv, C, d, generator=gen)
    live = (torch.arange(C) >= starts[..., None]) & (torch.arange(C) < ends[..., None])  # [B, Hkv, C]
    k_ref, v_ref = k.masked_fill(~live[..., None], 0.0), v.masked_fill(~live[..., None], 0.0)
    k_bad, v_bad = (
        k.masked_fill(~live[..., None], float("nan")),
        v.masked_fill(~live[..., None], float("nan")),
    )
    to = dict(device=device)
    return dict(
        q=q.to(dtype=dtype, **to),
        starts=starts.to(**to),
        ends=ends.to(**to),
        k_ref=k_ref.to(dtype=dtype, **to),
        v_ref=v_ref.to(dtype=dtype, **to),
        k=k_bad.to(dtype=dtype, **to),
        v=v_bad.to(dtype=dtype, **to),
    )


def causal_left_padded_mask(pads, Q, K, device="cpu"):
    """``bool [B, 1, Q, K]``: query ``i`` (key ``K - Q + i``) sees keys ``[pad_b, K - Q + i]``."""
    pads = torch.as_tensor(pads, device=device)
    cols = torch.arange(K, device=device)
    rows = K - Q + torch.arange(Q, device=device)
    return ((cols >= pads[:, None, None]) & (cols <= rows[None, :, None]))[:, None]


def prefill_inputs(B, Hkv, G, Q, K, d, pads, *, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, Q, d, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(B, Hkv, K, d, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(B, Hkv, K, d, generator=gen).to(device=device, dtype=dtype)
    mask = None if pads is None else causal_left_padded_mask(pads, Q, K, device)
    return q, k, v, mask


def propagated_subset(q, k, v, mask, keep_count, seed=0):
    """FastKV-style subset: per row a sorted set of ``keep_count`` of the ``Q == K`` tokens (the last one
    always kept), with q/k/v and the mask gathered (rows and columns)."""
    B, _, L, _ = q.shape
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack(
        [
            torch.cat(
                [torch.randperm(L - 1, generator=gen)[: keep_count - 1].sort().values, torch.tensor([L - 1])]
            )
            for _ in range(B)
        ]
    ).to(q.device)

    def gather(t):
        return t.gather(2, index[:, None, :, None].expand(B, t.shape[1], keep_count, t.shape[-1]))

    m = mask.gather(2, index[:, None, :, None].expand(B, 1, keep_count, L))
    m = m.gather(3, index[:, None, None, :].expand(B, 1, keep_count, keep_count))
    return gather(q), gather(k), gather(v), m


# ----------------------------------------------------------------------------------- kernel emulators
def _attend(q, k, v, scale, causal):
    """``q [Lq, Hq, d]`` over ``k/v [Lk, Hk, d]``: bottom-right causal; rows that see nothing give 0 and lse
    +inf (FlashAttention-2's convention). Returns ``(out [Lq, Hq, d], lse [Hq, Lq])``."""
    Lq, Hq, d = q.shape
    Lk, Hk = k.shape[0], k.shape[1]
    kk = k.float().repeat_interleave(Hq // Hk, dim=1)
    vv = v.float().repeat_interleave(Hq // Hk, dim=1)
    logits = torch.einsum("qhd,khd->hqk", q.float(), kk) * scale
    if causal:
        allowed = torch.arange(Lk)[None, :] <= (Lk - Lq + torch.arange(Lq))[:, None]
        logits = logits.masked_fill(~allowed.to(q.device), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [Hq, Lq]
    p = torch.exp(logits - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("hqk,khd->qhd", p, vv)
    empty = torch.isneginf(lse) if Lk else torch.ones_like(lse, dtype=torch.bool)
    lse = lse.masked_fill(empty, float("inf"))
    return out.to(q.dtype), lse


def emulate_flash_forward(padded_lse=False, has_seqused=True):
    """An emulator of ``aten._flash_attention_forward`` (dense and varlen), per its semantics."""

    def op(
        query,
        key,
        value,
        cum_seq_q,
        cum_seq_k,
        max_q,
        max_k,
        dropout_p,
        is_causal,
        return_debug_mask,
        *,
        scale=None,
        window_size_left=None,
        window_size_right=None,
        seqused_k=None,
        alibi_slopes=None,
    ):
        assert dropout_p == 0.0 and not return_debug_mask and window_size_left is None
        assert query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        if cum_seq_q is None:  # dense: [B, S, H, d]
            outs, lses = zip(
                *(_attend(query[b], key[b], value[b], scale, is_causal) for b in range(query.shape[0]))
            )
            return torch.stack(outs), torch.stack(lses), None, None, None
        assert cum_seq_q.dtype == cum_seq_k.dtype == torch.int32
        assert seqused_k is None or seqused_k.dtype == torch.int32
        N = cum_seq_q.numel() - 1
        out = torch.full_like(query, float("nan"))
        lse = torch.full(
            (N, query.shape[1], max_q) if padded_lse else (query.shape[1], query.shape[0]), float("nan")
        )
        for i in range(N):
            q0, q1 = int(cum_seq_q[i]), int(cum_seq_q[i + 1])
            k0 = int(cum_seq_k[i])
            lk = int(seqused_k[i]) if seqused_k is not None else int(cum_seq_k[i + 1]) - k0
            assert 0 <= k0 and k0 + lk <= key.shape[0] and q1 - q0 <= max_q and lk <= max_k
            o, s = _attend(query[q0:q1], key[k0 : k0 + lk], value[k0 : k0 + lk], scale, is_causal)
            out[q0:q1] = o
            if padded_lse:
                lse[i, :, : q1 - q0] = s
            else:
                lse[:, q0:q1] = s
        return out, lse, None, None, None

    if not has_seqused:

        def op_without_seqused(
            query,
            key,
            value,
            cum_seq_q,
            cum_seq_k,
            max_q,
            max_k,
            dropout_p,
            is_causal,
            return_debug_mask,
            *,
            scale=None,
        ):
            return op(
                query,
                key,
                value,
                cum_seq_q,
                cum_seq_k,
                max_q,
                max_k,
                dropout_p,
                is_causal,
                return_debug_mask,
                scale=scale,
            )

        return op_without_seqused
    return op


def fake_flash_attn_module():
    """A stand-in for the ``flash_attn`` package with ``flash_attn_func`` and ``flash_attn_with_kvcache``."""

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
        return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal)[0] for b in range(q.shape[0])])

    def flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        k=None,
        v=None,
        cache_seqlens=None,
        cache_leftpad=None,
        softmax_scale=None,
        causal=False,
        return_softmax_lse=False,
    ):
        assert cache_seqlens.dtype == cache_leftpad.dtype == torch.int32 and k_cache.stride(-1) == 1
        outs, lses = [], []
        for i in range(q.shape[0]):
            a, b = int(cache_leftpad[i]), int(cache_seqlens[i])
            o, s = _attend(q[i], k_cache[i, a:b], v_cache[i, a:b], softmax_scale, causal)
            outs.append(o)
            lses.append(s)
        out = torch.stack(outs)
        return (out, torch.stack(lses)) if return_softmax_lse else out

    return types.SimpleNamespace(
        __version__="2.7.4", flash_attn_func=flash_attn_func, flash_attn_with_kvcache=flash_attn_with_kvcache
    )


EMULATED = {
    "aten-seqused": lambda: AtenKernels(op=emulate_flash_forward(), strict=False),
    "aten-seqused-padded-lse": lambda: AtenKernels(op=emulate_flash_forward(padded_lse=True), strict=False),
    "aten-packed": lambda: AtenKernels(op=emulate_flash_forward(has_seqused=False), strict=False),
    "flash_attn": lambda: FlashAttnKernels(fake_flash_attn_module(), strict=False),
}


# ============================================================================================= CPU: refusals
@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only refusal")
def test_unavailable_on_cpu_with_reason():
    ok, why = FlashBackend().available()
    assert not ok
    assert "CUDA" in why and "torch" in why
    assert FlashBackend().flavour is None


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only refusal")
def test_resolve_backend_flash_on_cpu_is_a_clear_error(kvsieve_registry):
    from kvsieve.integration import resolve_backend

    if "flash" not in kvsieve_registry.names("backend"):
        kvsieve_registry.register(flash, name="flash-under-test", distribution="kvsieve")
    with pytest.raises(ValueError, match=r"backend 'flash' cannot be used here: no CUDA device"):
        resolve_backend("flash", "cpu", torch.float32)
    assert resolve_backend("auto", "cpu", torch.float32).name != "flash"


def test_supports_refuses_fp32_and_non_cuda(monkeypatch):
    backend = FlashBackend()
    monkeypatch.setattr(FlashBackend, "available", lambda self: (True, "test"))
    ok, why = backend.supports(torch.device("cuda"), torch.float32)
    assert not ok and "dtypes" in why and "float32" in why
    ok, why = backend.supports(torch.device("cpu"), torch.bfloat16)
    assert not ok and "'cpu'" in why
    assert backend.supports(torch.device("cuda"), torch.bfloat16) == (True, "")
    assert backend.supports(torch.device("cuda"), torch.float16) == (True, "")


def test_registry_lists_flash(kvsieve_registry):
    if "flash" not in kvsieve_registry.names("backend"):  # the entry point is not installed in this env yet
        kvsieve_registry.register(flash, name="flash-under-test", distribution="kvsieve")
    entry = kvsieve_registry.get("backend", "flash")
    assert entry.obj is FlashBackend
    assert FlashBackend.auto_priority == 20 and FlashBackend.name == "flash"
    assert FlashBackend.capabilities.devices == ("cuda",)
    assert FlashBackend.capabilities.dtypes == (torch.float16, torch.bfloat16)


def test_entry_point_declared():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["kvsieve"].get("flash") == "kvsieve.backends.flash"


def test_check_inputs_messages():
    bf = dict(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="fp16/bf16 only"):
        check_inputs(torch.zeros(1, 2, 1, 64), torch.zeros(1, 2, 4, 64))
    with pytest.raises(ValueError, match="multiple of 8 and at most 256"):
        check_inputs(torch.zeros(1, 2, 1, 100, **bf), torch.zeros(1, 2, 4, 100, **bf))
    with pytest.raises(ValueError, match="multiple of 8 and at most 256"):
        check_inputs(torch.zeros(1, 2, 1, 264, **bf))
    with pytest.raises(ValueError, match="one dtype"):
        check_inputs(torch.zeros(1, 2, 1, 64, **bf), torch.zeros(1, 2, 4, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="CUDA tensors"):
        check_inputs(torch.zeros(1, 2, 1, 64, **bf), torch.zeros(1, 2, 4, 64, **bf))


def test_select_kernels_rejects_unknown_impl():
    with pytest.raises(ValueError, match="unknown flash implementation"):
        flash.select_kernels("cudnn")
    with pytest.raises(ValueError, match="dense_prefill"):
        FlashBackend(dense_prefill="cudnn")


# ====================================================================================== CPU: index arithmetic
@pytest.mark.parametrize(
    "B,Hkv,C,S,rows", [(1, 1, 5, 5, 1), (2, 3, 7, 7, 4), (3, 2, 6, 10, 7), (4, 8, 64, 80, 1)]
)
def test_varlen_layout_matches_definition(B, Hkv, C, S, rows):
    gen = torch.Generator().manual_seed(B * 100 + C)
    starts = torch.randint(0, C + 1, (B, Hkv), generator=gen)
    ends = torch.minimum(starts + torch.randint(0, C + 1, (B, Hkv), generator=gen), torch.tensor(C))
    ends[0, 0] = starts[0, 0]  # an empty range
    layout = varlen_layout(starts, ends, rows, S, C)
    N = B * Hkv
    assert layout.cu_seq_q.dtype == layout.cu_seq_k.dtype == layout.seqused_k.dtype == torch.int32
    assert (layout.max_q, layout.max_k, layout.total_k) == (rows, C, (N - 1) * S + C)
    for b, j in itertools.product(range(B), range(Hkv)):
        i = b * Hkv + j  # sequence i is (row b, KV head j)
        assert layout.cu_seq_q[i] == i * rows and layout.cu_seq_q[i + 1] - layout.cu_seq_q[i] == rows
        assert layout.cu_seq_k[i] == i * S + starts[b, j]
        assert layout.seqused_k[i] == ends[b, j] - starts[b, j]
        # the rows it names are exactly the live slots of (b, j) in a buffer of S slots per (b, j)
        first, count = int(layout.cu_seq_k[i]), int(layout.seqused_k[i])
        rows_named = list(range(first, first + count))
        assert rows_named == [i * S + c for c in range(int(starts[b, j]), int(ends[b, j]))]
        assert first + count <= layout.total_k
    assert layout.cu_seq_q[N] == N * rows and layout.cu_seq_k[N] == layout.total_k


def test_varlen_layout_refuses_int32_overflow():
    starts = torch.zeros(64, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="int32"):
        varlen_layout(starts, starts + 1, 1, 2**23, 2**23)


@pytest.mark.parametrize(
    "B,Hkv,C,cap", [(2, 3, 5, 5), (2, 3, 5, 9), (1, 4, 6, 8), (3, 1, 4, 7), (1, 1, 6, 6)]
)
def test_flat_key_rows_is_a_view_of_the_cache(B, Hkv, C, cap):
    d = 8
    buf = torch.randn(B, Hkv, cap, d)
    keys = buf[:, :, :C]  # a slot slice of a larger buffer (what prefill receives), or the whole buffer
    flat, S = flat_key_rows(keys)
    assert flat.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    assert S == (cap if B * Hkv > 1 else C)
    for b, j, c in itertools.product(range(B), range(Hkv), range(C)):
        assert torch.equal(flat[(b * Hkv + j) * S + c, 0], keys[b, j, c])


def test_flat_key_rows_refuses_other_strides():
    k = torch.randn(2, 5, 3, 8).transpose(1, 2)  # [B, Hkv=3, C=5, d] with heads inside slots
    assert flat_key_rows(k) is None
    assert flat_key_rows(torch.randn(2, 3, 1, 8)) is None  # a single slot: no slot stride to rely on
    strided = torch.randn(2, 3, 5, 16)[..., :8]  # rows 16 elements apart: still one uniform row stride
    flat, S = flat_key_rows(strided)
    assert S == 5 and torch.equal(flat[(1 * 3 + 2) * 5 + 4, 0], strided[1, 2, 4])


def test_lse_layouts():
    N, H, L = 3, 2, 4
    seq_major = torch.randn(N, H, L)
    seq_major[1, 0, 2] = float("inf")  # a row that saw nothing
    unpadded = seq_major.permute(1, 0, 2).reshape(H, N * L)
    padded = torch.cat([seq_major, torch.full((N, H, 3), float("nan"))], dim=-1)
    expected = seq_major.masked_fill(seq_major == float("inf"), float("-inf"))
    assert torch.equal(lse_to_seq_major(unpadded, N, H, L), expected)
    assert torch.equal(lse_to_seq_major(padded, N, H, L), expected)


# ========================================================================================= CPU: prefill masks
@pytest.mark.parametrize("Q,K", [(6, 6), (4, 9)])
def test_left_padding_from_mask(Q, K):
    pads = [0, 2, 5, K]  # no padding, some, all keys but a few, everything padding
    mask = causal_left_padded_mask(pads, Q, K)
    assert left_padding_from_mask(mask, Q, K).tolist() == pads
    # padding query rows may hold anything (their output is zeros either way)
    loose = mask.clone()
    loose[3, 0, 0, :] = True  # row 3 is all padding
    assert left_padding_from_mask(loose, Q, K).tolist() == pads


def test_left_padding_from_hf_mask():
    sdpa_mask = pytest.importorskip("transformers.masking_utils").sdpa_mask
    attn = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    try:
        mask = sdpa_mask(
            batch_size=2, q_length=6, kv_length=6, q_offset=0, attention_mask=attn, allow_is_causal_skip=False
        )
    except TypeError:  # transformers < 5.24 takes cache_position
        mask = sdpa_mask(
            batch_size=2,
            cache_position=torch.arange(6),
            kv_length=6,
            attention_mask=attn,
            allow_is_causal_skip=False,
        )
    assert left_padding_from_mask(mask, 6, 6).tolist() == [2, 0]


def test_left_padding_rejects_other_masks():
    mask = causal_left_padded_mask([0, 2], 5, 5)
    right = mask.clone()
    right[0, 0, :, 4] = False  # padding at the end of row 0
    with pytest.raises(ValueError, match="LEFT padding"):
        left_padding_from_mask(right, 5, 5)
    full = torch.ones(2, 1, 5, 5, dtype=torch.bool)  # bidirectional
    with pytest.raises(ValueError, match="LEFT padding"):
        left_padding_from_mask(full, 5, 5)
    holes = mask.clone()
    holes[1, 0, 4, 3] = False
    with pytest.raises(ValueError, match=r"batch row 1, query 4"):
        left_padding_from_mask(holes, 5, 5)
    with pytest.raises(TypeError, match="boolean"):
        left_padding_from_mask(mask.float(), 5, 5)
    with pytest.raises(ValueError, match=r"\[B, 1, 5, 5\]"):
        left_padding_from_mask(mask.expand(2, 3, 5, 5), 5, 5)


def test_mask_validated_once_per_mask_object(monkeypatch):
    backend = FlashBackend(impl=EMULATED["aten-seqused"]())
    calls = []
    real = flash.left_padding_from_mask
    monkeypatch.setattr(flash, "left_padding_from_mask", lambda *a: calls.append(1) or real(*a))
    q, k, v, mask = prefill_inputs(2, 2, 2, 5, 5, 8, [0, 2])
    for _ in range(3):  # three layers of one forward
        backend.prefill_attention(q, k, v, mask, 0.3)
    assert len(calls) == 1
    mask.logical_not_().logical_not_()  # an in-place change bumps the version: checked again
    backend.prefill_attention(q, k, v, mask, 0.3)
    other = mask.clone()
    backend.prefill_attention(q, k, v, other, 0.3)
    assert len(calls) == 3


def test_inference_mode_masks_are_validated_every_call(monkeypatch):
    """model.generate runs under inference_mode, whose tensors have no version counter: no crash, no stale
    cache (each call validates the mask)."""
    backend = FlashBackend(impl=EMULATED["aten-seqused"]())
    with torch.inference_mode():
        q, k, v, mask = prefill_inputs(2, 2, 2, 5, 5, 8, [0, 2])
        expected = FlashBackend(impl=EMULATED["aten-seqused"]()).prefill_attention(q, k, v, mask.clone(), 0.3)
    calls = []
    real = flash.left_padding_from_mask
    monkeypatch.setattr(flash, "left_padding_from_mask", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        for _ in range(2):
            _close(backend.prefill_attention(q, k, v, mask, 0.3), expected)
    assert len(calls) == 2


# =========================================================================== CPU: plumbing (emulated kernels)
def _close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, equal_nan=False)


@pytest.mark.parametrize("dense", ["sdpa", "flash"])
@pytest.mark.parametrize("kernels", list(EMULATED))
@pytest.mark.parametrize("G", [1, 4, 7])
@pytest.mark.parametrize(
    "pads,Q,K", [(None, 6, 6), (None, 3, 7), ([0, 0], 6, 6), ([0, 3], 6, 6), ([2, 7], 4, 7)]
)
def test_prefill_plumbing(dense, kernels, G, pads, Q, K):
    backend = FlashBackend(impl=EMULATED[kernels](), dense_prefill=dense)
    q, k, v, mask = prefill_inputs(2, 2, G, Q, K, 8, pads, seed=G)
    scale = 8**-0.5
    out = backend.prefill_attention(q, k, v, mask, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    _close(out, REF.prefill_attention(q, k, v, mask, scale))


@pytest.mark.parametrize("kernels", list(EMULATED))
def test_prefill_plumbing_sliced_buffers_and_propagated_subsets(kernels):
    backend = FlashBackend(impl=EMULATED[kernels]())
    q, k, v, mask = prefill_inputs(3, 2, 4, 9, 9, 8, [0, 3, 6], seed=1)
    # what the integration passes: a slot slice of a larger cache buffer
    kb, vb = torch.randn(3, 2, 16, 8), torch.randn(3, 2, 16, 8)
    kb[:, :, :9], vb[:, :, :9] = k, v
    _close(
        backend.prefill_attention(q, kb[:, :, :9], vb[:, :, :9], mask, 0.3),
        REF.prefill_attention(q, k, v, mask, 0.3),
    )
    # FastKV: a sorted subset of the tokens with the gathered mask (padding tokens may be among them)
    qs, ks, vs, ms = propagated_subset(q, k, v, mask, keep_count=5)
    _close(backend.prefill_attention(qs, ks, vs, ms, 0.3), REF.prefill_attention(qs, ks, vs, ms, 0.3))


@pytest.mark.parametrize("kernels", list(EMULATED))
@pytest.mark.parametrize("G", [1, 4, 7])
@pytest.mark.parametrize("Q", [1, 4])
def test_decode_plumbing(kernels, G, Q):
    backend = FlashBackend(impl=EMULATED[kernels]())
    c = ragged_cache(3, 2, G, 24, 8, Q, seed=G * 10 + Q, empty_row=True)
    out = backend.decode_attention(c["q"], c["k"], c["v"], c["starts"], c["ends"], 0.35)
    assert not out.isnan().any()
    _close(out, REF.decode_attention(c["q"], c["k_ref"], c["v_ref"], c["starts"], c["ends"], 0.35))


@pytest.mark.parametrize("kernels", list(EMULATED))
@pytest.mark.parametrize("G", [1, 4, 7])
@pytest.mark.parametrize("W", [1, 5])
def test_window_lse_plumbing(kernels, G, W):
    backend = FlashBackend(impl=EMULATED[kernels]())
    c = ragged_cache(2, 3, G, 20, 8, W, seed=G + W, empty_row=True)
    lse = backend.window_lse(c["q"], c["k"], c["starts"], c["ends"], 0.4)
    assert lse.dtype == torch.float32 and lse.shape == c["q"].shape[:3]
    expected = REF.window_lse(c["q"], c["k_ref"], c["starts"], c["ends"], 0.4)
    assert torch.isneginf(lse[0, :G]).all() and torch.isneginf(expected[0, :G]).all()  # the empty range
    _close(lse, expected)


def test_decode_plumbing_non_viewable_cache_is_copied():
    backend = FlashBackend(impl=EMULATED["aten-seqused"]())
    c = ragged_cache(2, 3, 2, 12, 8, 1, seed=3)
    k = c["k"].transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hkv, C, d] with heads innermost
    v = c["v"].transpose(1, 2).contiguous().transpose(1, 2)
    out = backend.decode_attention(c["q"], k, v, c["starts"], c["ends"], 0.35)
    _close(out, REF.decode_attention(c["q"], c["k_ref"], c["v_ref"], c["starts"], c["ends"], 0.35))


def test_window_scores_and_compact_delegate_to_the_reference_on_cpu():
    backend = FlashBackend(impl=EMULATED["aten-seqused"]())
    c = ragged_cache(2, 2, 3, 16, 8, 4, seed=5)
    lse = REF.window_lse(c["q"], c["k_ref"], c["starts"], c["ends"], 0.3)
    for given in (None, lse):
        _close(
            backend.window_scores(c["q"], c["k_ref"], c["starts"], c["ends"] - 4, 0.3, given),
            REF.window_scores(c["q"], c["k_ref"], c["starts"], c["ends"] - 4, 0.3, given),
        )
    keep = torch.tensor([[[1, 3, 4, -1], [0, 2, 5, 6]], [[2, 7, -1, -1], [1, 2, 3, 4]]])
    counts = torch.tensor([[3, 4], [2, 4]])
    dest = torch.tensor([[1, 0], [1, 0]])
    k1, v1, k2, v2 = (c[n].clone() for n in ("k_ref", "v_ref", "k_ref", "v_ref"))
    backend.compact(k1, v1, keep, counts, dest)
    REF.compact(k2, v2, keep, counts, dest)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)


# ========================================================================================== GPU: real kernels
gpu = pytest.mark.gpu
GPU_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
LSE_TOL = 2e-3


def _gpu_backend(impl="auto", dense_prefill="sdpa"):
    backend = FlashBackend(impl=impl, dense_prefill=dense_prefill)
    ok, why = backend.available()
    assert ok, why
    return backend


@gpu
def test_gpu_available_and_flavour():
    from kvsieve.integration import resolve_backend

    ok, why = FlashBackend().available()
    assert ok, why
    assert why.startswith("flash_attn") or why == "PyTorch's FlashAttention-2 kernels (aten)"
    assert FlashBackend().flavour == why
    print("flash flavour:", why)
    assert resolve_backend(FlashBackend(), "cuda", torch.bfloat16).name == "flash"
    with pytest.raises(ValueError, match="dtypes"):
        resolve_backend(FlashBackend(), "cuda", torch.float32)


@gpu
@pytest.mark.parametrize("dense", ["sdpa", "flash"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 7])
@pytest.mark.parametrize(
    "pads,Q,K",
    [
        (None, 300, 300),
        (None, 37, 300),
        ([0, 0, 0], 300, 300),
        ([0, 45, 299], 300, 300),
        ([5, 150, 0], 64, 200),
    ],
)
def test_gpu_prefill(dense, dtype, d, G, pads, Q, K):
    backend = _gpu_backend(dense_prefill=dense)
    B = 3
    q, k, v, mask = prefill_inputs(B, 2, G, Q, K, d, pads, dtype=dtype, device="cuda", seed=G + d)
    scale = d**-0.5
    out = backend.prefill_attention(q, k, v, mask, scale)
    assert out.shape == q.shape and out.dtype == dtype
    tol = GPU_TOL[dtype]
    torch.testing.assert_close(out, REF.prefill_attention(q, k, v, mask, scale), rtol=tol, atol=tol)


@gpu
@pytest.mark.parametrize("G", [1, 4, 7])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_prefill_sliced_buffer_and_propagated_subsets(G, d):
    backend = _gpu_backend()
    dtype, L = torch.bfloat16, 257
    q, k, v, mask = prefill_inputs(3, 2, G, L, L, d, [0, 31, 200], dtype=dtype, device="cuda", seed=G)
    kb = torch.full((3, 2, 320, d), float("nan"), dtype=dtype, device="cuda")  # capacity past the prompt: NaN
    vb = kb.clone()
    kb[:, :, :L], vb[:, :, :L] = k, v
    expected = REF.prefill_attention(q, k, v, mask, d**-0.5)
    out = backend.prefill_attention(q, kb[:, :, :L], vb[:, :, :L], mask, d**-0.5)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    for keep in (L // 5, 64):  # FastKV keeps a subset (the padding tokens of a row may be among it)
        qs, ks, vs, ms = propagated_subset(q, k, v, mask, keep_count=keep, seed=keep)
        torch.testing.assert_close(
            backend.prefill_attention(qs, ks, vs, ms, d**-0.5),
            REF.prefill_attention(qs, ks, vs, ms, d**-0.5),
            rtol=2e-2,
            atol=2e-2,
        )


@gpu
@pytest.mark.parametrize("impl", ["auto", "aten-packed"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 7])
@pytest.mark.parametrize("Q", [1, 4])
def test_gpu_decode_ragged(impl, d, G, Q):
    backend = _gpu_backend() if impl == "auto" else FlashBackend(impl=AtenKernels(use_seqused=False))
    dtype = torch.bfloat16
    c = ragged_cache(4, 2, G, 700, d, Q, dtype=dtype, device="cuda", seed=G * 100 + Q + d, empty_row=True)
    out = backend.decode_attention(c["q"], c["k"], c["v"], c["starts"], c["ends"], d**-0.5)
    assert not out.isnan().any(), "a NaN-poisoned slot outside the live range was read"
    expected = REF.decode_attention(c["q"], c["k_ref"], c["v_ref"], c["starts"], c["ends"], d**-0.5)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


@gpu
@pytest.mark.parametrize("Q", [1, 4])
def test_gpu_decode_hf_query_layout_and_sliced_capacity(Q):
    """Queries as HF hands them over (a transposed [B, Q, H, d] view) over a cache with spare NaN capacity."""
    backend = _gpu_backend()
    B, Hkv, G, d, C = 5, 8, 4, 128, 1000
    c = ragged_cache(B, Hkv, G, C, d, Q, dtype=torch.bfloat16, device="cuda", seed=Q)
    q = c["q"].transpose(1, 2).contiguous().transpose(1, 2)
    k = torch.full((B, Hkv, C + 64, d), float("nan"), dtype=torch.bfloat16, device="cuda")
    v = k.clone()
    k[:, :, :C], v[:, :, :C] = c["k"], c["v"]
    out = backend.decode_attention(q, k, v, c["starts"], c["ends"], d**-0.5)
    expected = REF.decode_attention(c["q"], c["k_ref"], c["v_ref"], c["starts"], c["ends"], d**-0.5)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


@gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 7])
@pytest.mark.parametrize("W", [1, 8, 32])
def test_gpu_window_lse(d, G, W):
    backend = _gpu_backend()
    c = ragged_cache(3, 2, G, 900, d, W, dtype=torch.bfloat16, device="cuda", seed=G + W + d, empty_row=True)
    lse = backend.window_lse(c["q"], c["k"], c["starts"], c["ends"], d**-0.5)
    assert lse.dtype == torch.float32 and lse.shape == c["q"].shape[:3]
    expected = REF.window_lse(c["q"], c["k_ref"], c["starts"], c["ends"], d**-0.5)
    assert torch.isneginf(lse[0, :G]).all()  # the empty (row 0, KV head 0) range
    torch.testing.assert_close(lse, expected, rtol=LSE_TOL, atol=LSE_TOL)


@gpu
def test_gpu_window_scores_and_compact_match_the_reference():
    backend = _gpu_backend()
    d, W = 128, 8
    c = ragged_cache(2, 2, 4, 600, d, W, dtype=torch.bfloat16, device="cuda", seed=9)
    cand_ends = c["ends"] - W
    lse = backend.window_lse(c["q"], c["k_ref"], c["starts"], c["ends"], d**-0.5)
    for given in (None, lse):
        torch.testing.assert_close(
            backend.window_scores(c["q"], c["k_ref"], c["starts"], cand_ends, d**-0.5, given),
            REF.window_scores(c["q"], c["k_ref"], c["starts"], cand_ends, d**-0.5, given),
            rtol=2e-3,
            atol=1e-4,
        )
    gen = torch.Generator().manual_seed(0)
    keep = torch.stack([torch.randperm(600, generator=gen)[:100].sort().values for _ in range(4)]).view(
        2, 2, 100
    )
    keep = keep.cuda()
    counts = torch.tensor([[100, 60], [0, 100]], device="cuda")
    dest = torch.zeros(2, 2, dtype=torch.long, device="cuda")
    k1, v1, k2, v2 = (c[n].clone() for n in ("k_ref", "v_ref", "k_ref", "v_ref"))
    backend.compact(k1, v1, keep, counts, dest)
    REF.compact(k2, v2, keep, counts, dest)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)


@gpu
def test_gpu_model_forward_matches_torch_backend():
    """The tiny Llama in bf16 through kvsieve: a left-padded prefill and a decode step, flash vs torch."""
    from kvsieve import integration, models

    model, tok = models.load("tiny-random-llama", dtype=torch.bfloat16, device="cuda")
    prompts = ["The quick brown fox jumps over the lazy dog again and again.", "Hi!"]
    batch = tok(prompts, return_tensors="pt", padding=True).to("cuda")
    assert not batch["attention_mask"][:, -1].eq(0).any()  # left padding
    cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    results = {}
    for name in ("torch", "flash"):
        with integration.apply(model, "none", backend=name) as session, torch.no_grad():
            assert session.backend.name == name
            out = model(**batch, use_cache=True)
            cache = session.last_cache
            ids = out.logits[:, -1:].argmax(-1) if name == "torch" else results["torch"][2]
            mask = torch.cat([batch["attention_mask"], torch.ones_like(ids)], dim=1)
            step = model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg: cache})
            results[name] = (out.logits, step.logits, ids)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(results["flash"][0][real], results["torch"][0][real], rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(results["flash"][1], results["torch"][1], rtol=3e-2, atol=3e-2)
