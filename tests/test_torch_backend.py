"""The torch reference backend against naive per-(row, head) loops written from the KVBackend docstrings.

Shapes are small and awkward (GQA groups of 1 and 3, ragged starts/ends, empty ranges); memory a primitive
must not read (outside the live or candidate range) is poisoned with NaN/inf.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvsieve.backends.torch_ref import TorchBackend

BACKEND = TorchBackend()
SCALE = 0.37


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q . k * scale) @ v for one query ``[d]`` over ``[n, d]`` keys, float64; 0 when ``n == 0``."""
    if keys.shape[0] == 0:
        return torch.zeros(values.shape[-1], dtype=torch.float64)
    probs = torch.softmax(keys.double() @ q.double() * scale, dim=0)
    return probs @ values.double()


def poison_outside(buf: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, value=float("nan")):
    """A copy of ``buf [B, Hkv, C, d]`` holding ``value`` in every slot outside ``[starts, ends)``."""
    buf = buf.clone()
    for b in range(buf.shape[0]):
        for j in range(buf.shape[1]):
            buf[b, j, : starts[b, j]] = value
            buf[b, j, ends[b, j] :] = value
    return buf


CASES = [  # B, H, Hkv, d, C
    (2, 4, 2, 8, 13),
    (3, 3, 1, 5, 9),
    (1, 2, 2, 4, 7),
]


# --------------------------------------------------------------------------------------------------- prefill
@pytest.mark.parametrize("B, H, Hkv, d, K", CASES)
@pytest.mark.parametrize("Q", [1, 4])
def test_prefill_attention_plain_causal(B, H, Hkv, d, K, Q):
    q, k, v = rand(B, H, Q, d, seed=1), rand(B, Hkv, K, d, seed=2), rand(B, Hkv, K, d, seed=3)
    out = BACKEND.prefill_attention(q, k, v, None, SCALE)
    assert out.shape == (B, H, Q, d) and out.dtype == q.dtype
    G = H // Hkv
    for b in range(B):
        for h in range(H):
            for i in range(Q):
                last = K - Q + i  # query i sees keys [0, K - Q + i]
                want = attend(q[b, h, i], k[b, h // G, : last + 1], v[b, h // G, : last + 1], SCALE)
                torch.testing.assert_close(out[b, h, i].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("poison", [False, True], ids=["clean", "poisoned"])
def test_prefill_attention_with_a_padding_mask_and_an_empty_row(poison):
    B, H, Hkv, d, Q = 3, 4, 2, 6, 7
    q, k, v = rand(B, H, Q, d, seed=4), rand(B, Hkv, Q, d, seed=5), rand(B, Hkv, Q, d, seed=6)
    pads = [0, 3, 7]  # the last row is all padding: every query row of it is empty
    causal = torch.ones(Q, Q, dtype=torch.bool).tril()
    mask = torch.stack([causal & (torch.arange(Q) >= p) for p in pads])[:, None]
    if poison:  # masked keys and values are never used
        k, v = k.clone(), v.clone()
        for b, p in enumerate(pads):
            k[b, :, :p], v[b, :, :p] = float("nan"), float("inf")
    out = BACKEND.prefill_attention(q, k, v, mask, SCALE)
    G = H // Hkv
    for b, p in enumerate(pads):
        for h in range(H):
            for i in range(Q):
                want = attend(q[b, h, i], k[b, h // G, p : i + 1], v[b, h // G, p : i + 1], SCALE)
                torch.testing.assert_close(out[b, h, i].double(), want, atol=1e-5, rtol=1e-5)
    assert out[2].eq(0).all()


# ---------------------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize(
    "B, H, Hkv, d, C, Q, poison",
    [(*case, Q, False) for case in CASES for Q in (1, 3)]
    + [pytest.param(*CASES[0], 3, True)],
)
def test_decode_attention_ragged_ranges(B, H, Hkv, d, C, Q, poison):
    g = torch.Generator().manual_seed(C * Q)
    starts = torch.randint(0, 4, (B, Hkv), generator=g)
    ends = (starts + torch.randint(Q, C - 3, (B, Hkv), generator=g)).clamp(max=C)
    q, k, v = rand(B, H, Q, d, seed=7), rand(B, Hkv, C, d, seed=8), rand(B, Hkv, C, d, seed=9)
    if poison:
        k, v = poison_outside(k, starts, ends), poison_outside(v, starts, ends, float("inf"))
    out = BACKEND.decode_attention(q, k, v, starts, ends, SCALE)
    assert out.shape == (B, H, Q, d) and out.dtype == q.dtype and torch.isfinite(out).all()
    G = H // Hkv
    for b in range(B):
        for h in range(H):
            j = h // G
            s, e = int(starts[b, j]), int(ends[b, j])
            for i in range(Q):
                last = e - Q + i  # causal among the Q new tokens: query i sees [s, e - Q + i]
                want = attend(q[b, h, i], k[b, j, s : last + 1], v[b, j, s : last + 1], SCALE)
                torch.testing.assert_close(out[b, h, i].double(), want, atol=1e-5, rtol=1e-5)


def test_decode_attention_empty_range_gives_zeros():
    q, k, v = rand(1, 2, 1, 4, seed=10), rand(1, 1, 5, 4, seed=11), rand(1, 1, 5, 4, seed=12)
    starts, ends = torch.tensor([[3]]), torch.tensor([[3]])
    out = BACKEND.decode_attention(q, k, v, starts, ends, SCALE)
    assert out.eq(0).all()


def test_decode_attention_keeps_low_precision_dtype():
    q = rand(1, 4, 1, 8, seed=13).bfloat16()
    k, v = rand(1, 2, 6, 8, seed=14).bfloat16(), rand(1, 2, 6, 8, seed=15).bfloat16()
    starts, ends = torch.zeros(1, 2, dtype=torch.long), torch.full((1, 2), 6)
    out = BACKEND.decode_attention(q, k, v, starts, ends, SCALE)
    ref = BACKEND.decode_attention(q.float(), k.float(), v.float(), starts, ends, SCALE)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


# -------------------------------------------------------------------------------------------- window scoring
@pytest.mark.parametrize("B, H, Hkv, d, C", CASES)
@pytest.mark.parametrize("W", [1, 3])
def test_window_lse_is_the_causal_log_sum_exp(B, H, Hkv, d, C, W):
    g = torch.Generator().manual_seed(W + C)
    starts = torch.randint(0, 3, (B, Hkv), generator=g)
    ends = (starts + torch.randint(W, C - 2, (B, Hkv), generator=g)).clamp(max=C)
    q = rand(B, H, W, d, seed=16)
    k = poison_outside(rand(B, Hkv, C, d, seed=17), starts, ends)
    lse = BACKEND.window_lse(q, k, starts, ends, SCALE)
    assert lse.shape == (B, H, W) and lse.dtype == torch.float32
    G = H // Hkv
    for b in range(B):
        for h in range(H):
            j = h // G
            s, e = int(starts[b, j]), int(ends[b, j])
            for w in range(W):
                seen = k[b, j, s : e - W + w + 1].double()  # window query w sits at slot e - W + w
                want = torch.logsumexp(seen @ q[b, h, w].double() * SCALE, dim=0)
                assert math.isclose(float(lse[b, h, w]), float(want), rel_tol=1e-5, abs_tol=1e-5)


def _candidate_case(B, H, Hkv, d, C, W, seed):
    g = torch.Generator().manual_seed(seed)
    cand_starts = torch.randint(0, 4, (B, Hkv), generator=g)
    cand_ends = (cand_starts + torch.randint(0, C - 4, (B, Hkv), generator=g)).clamp(max=C)
    cand_ends[0, 0] = cand_starts[0, 0] + (C - 4)  # at least one full-length candidate range
    q = rand(B, H, W, d, seed=seed + 1)
    k = poison_outside(rand(B, Hkv, C, d, seed=seed + 2), cand_starts, cand_ends)
    return q, k, cand_starts, cand_ends


@pytest.mark.parametrize("B, H, Hkv, d, C", CASES)
@pytest.mark.parametrize("with_lse", [False, True], ids=["softmax-over-candidates", "given-lse"])
def test_window_scores_equal_the_explicit_softmax(B, H, Hkv, d, C, with_lse):
    W = 3
    q, k, cand_starts, cand_ends = _candidate_case(B, H, Hkv, d, C, W, seed=C)
    lse = rand(B, H, W, seed=20).abs() + 2.0 if with_lse else None  # any normaliser the caller chose
    scores = BACKEND.window_scores(q, k, cand_starts, cand_ends, SCALE, lse)
    counts = cand_ends - cand_starts
    N = int(counts.max())
    assert scores.shape == (B, Hkv, N) and scores.dtype == torch.float32
    G = H // Hkv
    for b in range(B):
        for j in range(Hkv):
            s, n = int(cand_starts[b, j]), int(counts[b, j])
            want = torch.zeros(N, dtype=torch.float64)
            for g in range(G):
                h = j * G + g
                for w in range(W):
                    logits = k[b, j, s : s + n].double() @ q[b, h, w].double() * SCALE
                    norm = torch.logsumexp(logits, 0) if lse is None else lse[b, h, w].double()
                    want[:n] += torch.exp(logits - norm)
            torch.testing.assert_close(scores[b, j].double(), want, atol=1e-5, rtol=1e-5)
            assert scores[b, j, n:].eq(0).all(), "entries past the row's own candidates are exactly 0"


def test_window_scores_with_the_window_lse_are_snapkv_probabilities():
    """Normalising with window_lse over everything visible: the scores of the candidates before the window are
    the attention probabilities of the full causal softmax (they sum to 1 minus the window's own mass)."""
    B, H, Hkv, d, L, W = 1, 4, 2, 8, 20, 4
    q, k = rand(B, H, W, d, seed=30), rand(B, Hkv, L, d, seed=31)
    starts, ends = torch.zeros(B, Hkv, dtype=torch.long), torch.full((B, Hkv), L)
    lse = BACKEND.window_lse(q, k, starts, ends, SCALE)
    scores = BACKEND.window_scores(q, k, starts, ends - W, SCALE, lse)
    G = H // Hkv
    for j in range(Hkv):
        want = torch.zeros(L - W, dtype=torch.float64)
        for h in range(j * G, (j + 1) * G):
            for w in range(W):
                probs = torch.softmax(k[0, j, : L - W + w + 1].double() @ q[0, h, w].double() * SCALE, 0)
                want += probs[: L - W]
        torch.testing.assert_close(scores[0, j].double(), want, atol=1e-5, rtol=1e-5)


def test_window_scores_with_no_candidates():
    q, k = rand(2, 2, 3, 4, seed=32), rand(2, 1, 5, 4, seed=33)
    empty = torch.full((2, 1), 2)
    assert BACKEND.window_scores(q, k, empty, empty, SCALE).shape == (2, 1, 0)


# ------------------------------------------------------------------------------------------------ compaction
def naive_compact(buf, keep, counts, dest):
    out = buf.clone()
    for b in range(buf.shape[0]):
        for j in range(buf.shape[1]):
            for i in range(int(counts[b, j])):
                out[b, j, int(dest[b, j]) + i] = buf[b, j, int(keep[b, j, i])]
    return out


def test_compact_with_overlapping_moves_and_ragged_counts():
    B, Hkv, C, d = 2, 3, 12, 5
    keys, values = rand(B, Hkv, C, d, seed=40), rand(B, Hkv, C, d, seed=41)
    keep = torch.tensor(
        [
            [[1, 2, 3, 4, 5, 6], [2, 5, 9, 11, -1, -1], [-1, -1, -1, -1, -1, -1]],
            [[4, 5, 6, 10, 11, -1], [3, 4, 5, 6, 7, 8], [7, 8, -1, -1, -1, -1]],
        ]
    )  # every kept slot moves by a shift smaller than the run: destinations overlap sources
    counts = torch.tensor([[6, 4, 0], [5, 6, 2]])
    dest = torch.tensor([[0, 1, 0], [3, 2, 6]])
    want_k, want_v = naive_compact(keys, keep, counts, dest), naive_compact(values, keep, counts, dest)
    BACKEND.compact(keys, values, keep, counts, dest)
    torch.testing.assert_close(keys, want_k, rtol=0, atol=0)  # slots outside the written range untouched
    torch.testing.assert_close(values, want_v, rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(5))
def test_compact_random_in_place(seed):
    g = torch.Generator().manual_seed(seed)
    B, Hkv, C, d = 2, 2, 16, 3
    keys, values = rand(B, Hkv, C, d, seed=seed), rand(B, Hkv, C, d, seed=seed + 100)
    K = 10
    keep = torch.full((B, Hkv, K), -1, dtype=torch.long)
    counts = torch.zeros(B, Hkv, dtype=torch.long)
    dest = torch.zeros(B, Hkv, dtype=torch.long)
    for b in range(B):
        for j in range(Hkv):
            start = int(torch.randint(0, 6, (1,), generator=g))
            n = int(torch.randint(0, K + 1, (1,), generator=g))
            chosen = torch.randperm(C - start, generator=g)[:n].sort().values + start
            keep[b, j, : len(chosen)] = chosen
            counts[b, j], dest[b, j] = len(chosen), int(torch.randint(0, start + 1, (1,), generator=g))
    want_k, want_v = naive_compact(keys, keep, counts, dest), naive_compact(values, keep, counts, dest)
    BACKEND.compact(keys, values, keep, counts, dest)
    torch.testing.assert_close(keys, want_k, rtol=0, atol=0)
    torch.testing.assert_close(values, want_v, rtol=0, atol=0)


def test_compact_with_nothing_to_keep_is_a_no_op():
    keys, values = rand(1, 1, 4, 2, seed=50), rand(1, 1, 4, 2, seed=51)
    before = keys.clone(), values.clone()
    BACKEND.compact(
        keys,
        values,
        torch.zeros(1, 1, 0, dtype=torch.long),
        torch.zeros(1, 1, dtype=torch.long),
        torch.zeros(1, 1, dtype=torch.long),
    )
    assert torch.equal(keys, before[0]) and torch.equal(values, before[1])


def test_call_window_scores_passes_the_host_known_count_only_to_backends_that_take_it():
    """The hint that saves a device read reaches backends whose window_scores take ``num_candidates``; a
    third-party backend written against the original signature is called as before."""
    from kvsieve.backend import call_window_scores

    seen = []

    class Original(TorchBackend):
        def window_scores(self, queries, keys, cand_starts, cand_ends, scale, lse=None):
            seen.append("original")
            return super().window_scores(queries, keys, cand_starts, cand_ends, scale, lse)

    class WithHint(TorchBackend):
        def window_scores(self, queries, keys, cand_starts, cand_ends, scale, lse=None, num_candidates=None):
            seen.append(num_candidates)
            return super().window_scores(queries, keys, cand_starts, cand_ends, scale, lse, num_candidates)

    q, k, cand_starts, cand_ends = _candidate_case(2, 4, 2, 8, 19, 3, seed=5)
    n = int((cand_ends - cand_starts).clamp(min=0).max())
    expected = TorchBackend().window_scores(q, k, cand_starts, cand_ends, 0.3)
    for backend in (Original(), WithHint()):
        out = call_window_scores(backend, q, k, cand_starts, cand_ends, 0.3, None, n)
        torch.testing.assert_close(out, expected, equal_nan=False)
    assert seen == ["original", n]
