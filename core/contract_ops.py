"""Torch references of the device work behind the run-time contract checks (:mod:`kvsieve.contracts`).

:class:`~kvsieve.contracts.ContractGuard` runs these through the kernel backend (:meth:`KVBackend.cache_fingerprint
<kvsieve.backend.KVBackend.cache_fingerprint>`, ``cache_changed``, ``nonfinite_scores``, ``check_selection``),
whose defaults are the functions here; a backend overrides them with fused kernels that detect the same faults
(the triton backend: :mod:`kvsieve.backends.triton.contract_checks`). None of them reads the device on the host,
so they run inside a captured CUDA graph. Every flag they return is a 0-dim device tensor, nonzero when the fault
is present (``bool`` here; a backend may return ``int32``).

* :func:`cache_fingerprint` / :func:`cache_changed`: whether a scoring call changed the layer's cache. The
  fingerprint sums, per row, KV head and chunk of :data:`FINGERPRINT_CHUNK` slots (chunk boundaries at fixed slot
  indices), the keys, the values and the positions of the live slots ``[starts, ends)`` only, and holds
  ``starts`` and ``ends`` themselves. Slots outside the live range are never read as data, so NaN poison in free
  capacity neither hides a change nor raises a false fault; a NaN sum equals a NaN sum (a NaN inside the live data
  is not a change either).
* :func:`nonfinite_scores`: some valid candidate has a non-finite score.
* :func:`check_selection`: a selection breaks a rule of the selection contract; the selection, or the valid
  stand-in everywhere when one rule is broken.
"""

from __future__ import annotations

import torch

__all__ = ["FINGERPRINT_CHUNK", "cache_changed", "cache_fingerprint", "check_selection", "fingerprint_width",
           "nonfinite_scores"]

#: Slots per fingerprint chunk: chunk ``s`` of a (row, KV head) covers slots ``[s * chunk, (s + 1) * chunk)``.
FINGERPRINT_CHUNK = 512


def fingerprint_width(capacity: int, chunk: int = FINGERPRINT_CHUNK) -> int:
    """Entries per (row, KV head) of a fingerprint of ``capacity`` slots: three sums per chunk, plus the range."""
    return 3 * -(-capacity // chunk) + 2


def cache_fingerprint(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor,
                      ends: torch.Tensor, *, chunk: int = FINGERPRINT_CHUNK) -> torch.Tensor:
    """A deterministic fingerprint of one layer's cache (compare two with :func:`cache_changed`).

    Args:
        keys, values: ``[B, Hkv, C, d]``; positions: ``int64 [B, Hkv, C]``; starts, ends: ``int64 [B, Hkv]``.
        chunk: slots per chunk (tests use small ones; the backends' methods use :data:`FINGERPRINT_CHUNK`).

    Returns:
        ``float64 [B, Hkv, 3 * S + 2]`` with ``S = ceil(C / chunk)``: entries ``[0, S)`` the float32 sums of the
        keys of each chunk's live slots, ``[S, 2S)`` those of the values, ``[2S, 3S)`` the int64 sums of their
        positions, then ``starts`` and ``ends``. A chunk without a live slot sums to 0.
    """
    B, Hkv, C, _ = keys.shape
    S = -(-C // chunk)
    slot = torch.arange(C, device=keys.device)
    live = (slot >= starts[..., None]) & (slot < ends[..., None])  # [B, Hkv, C]

    def chunk_sums(per_slot: torch.Tensor) -> torch.Tensor:  # [B, Hkv, C] -> [B, Hkv, S], live slots only
        padded = torch.nn.functional.pad(torch.where(live, per_slot, 0), (0, S * chunk - C))
        return padded.view(B, Hkv, S, chunk).sum(-1)

    sums = [chunk_sums(keys.sum(-1, dtype=torch.float32)), chunk_sums(values.sum(-1, dtype=torch.float32)),
            chunk_sums(positions)]
    return torch.cat([*(s.double() for s in sums), starts[..., None].double(), ends[..., None].double()], dim=-1)


def cache_changed(before: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                  starts: torch.Tensor, ends: torch.Tensor, *, chunk: int = FINGERPRINT_CHUNK) -> torch.Tensor:
    """``bool []``: the cache's fingerprint differs from ``before`` (a :func:`cache_fingerprint` of the same
    ``chunk``; NaN equals NaN). Arguments as :func:`cache_fingerprint`'s; a fingerprint of another shape (the
    cache's shape changed) is a change."""
    after = cache_fingerprint(keys, values, positions, starts, ends, chunk=chunk)
    if after.shape != before.shape:
        return torch.ones((), dtype=torch.bool, device=keys.device)
    return ((before != after) & ~(before.isnan() & after.isnan())).any()


def nonfinite_scores(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``bool []``: some candidate ``n < counts[b, j]`` has a non-finite score (``scores`` floating ``[B, Hkv, N]``,
    ``counts`` ``int64 [B, Hkv]``; entries past a row's count are not looked at)."""
    valid = torch.arange(scores.shape[-1], device=scores.device) < counts[..., None]
    return (valid & ~scores.isfinite()).any()


def check_selection(keep: torch.Tensor, kept: torch.Tensor, counts: torch.Tensor, budget: int | torch.Tensor,
                    protect_head: int, protect_tail: int | torch.Tensor,
                    head_adaptive: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The device rules of the selection contract, and the selection with a valid stand-in where one is broken.

    Args:
        keep: ``int64 [B, Hkv, K]`` kept candidate indices (the first ``kept`` of each row and KV head count);
            kept: ``int64 [B, Hkv]``; counts: ``int64 [B, Hkv]`` the candidates.
        budget, protect_tail: an int, or ``int64 [B, Hkv]`` (one per row and KV head); protect_head: an int.
        head_adaptive: the policy shares a row's budget among its KV heads.

    The rules: every real entry (``i < kept``) is above the one before it (sorted, unique, ``>= 0``) and below
    ``counts``; where the head evicts (``counts > budget``; head-adaptive: ``kept < counts``), entry ``i <
    protect_head`` holds ``i`` and each of the last ``protect_tail`` real entries holds its place among the last
    candidates; ``kept <= K``; ``kept == min(counts, budget)`` (head-adaptive: per row, ``sum kept == sum min(counts,
    budget)``, each head keeping from ``min(counts, protect_head + protect_tail)`` to ``counts``).

    Returns:
        ``(broken, keep_out, kept_out)``: ``bool []`` some rule is broken; ``int64 [B, Hkv, K]`` and ``int64 [B,
        Hkv]``: ``keep`` and ``kept``, or, everywhere when ``broken``, the stand-in: the first ``min(counts, budget,
        K)`` candidates, ``-1`` beyond.
    """
    K = keep.shape[-1]
    expected = counts.clamp(max=budget)
    idx = torch.arange(K, device=keep.device)
    real = idx < kept[..., None]
    n = counts[..., None]
    previous = torch.nn.functional.pad(keep[..., :-1], (1, 0), value=-1)
    # entry p: above the one before (sorted, unique, >= 0) and a candidate; where the head evicts, the protected
    # positions hold what protection dictates: p < protect_head holds p, the last protect_tail hold the last
    # candidates (where everything is kept, the kept indices are 0..n-1 and the other checks cover it)
    tail = protect_tail[..., None] if isinstance(protect_tail, torch.Tensor) else protect_tail
    protected_value = torch.where(idx < protect_head, idx, n - kept[..., None] + idx)
    is_protected = (idx < protect_head) | (idx >= kept[..., None] - tail)
    evicting = (kept < counts if head_adaptive else counts > budget)[..., None]
    wrong = (keep <= previous) | (keep >= n) | (is_protected & (keep != protected_value) & evicting)
    if head_adaptive:  # per row: the uniform total; per head: its protected candidates at least, its candidates at most
        tails = protect_tail if isinstance(protect_tail, torch.Tensor) else torch.full_like(counts, protect_tail)
        miscounted = (kept.sum(dim=1) != expected.sum(dim=1)).any() | (kept > counts).any() \
            | (kept < torch.minimum(counts, protect_head + tails)).any()
    else:
        miscounted = (kept != expected).any()
    broken = (real & wrong).any() | miscounted | (kept > K).any()
    stand_in_counts = expected.clamp(max=K)
    stand_in = torch.where(idx < stand_in_counts[..., None], idx, -1)
    return broken, torch.where(broken, stand_in, keep), torch.where(broken, stand_in_counts, kept)
