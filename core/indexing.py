"""Small index computations shared by the cache, the policies and the reference backend."""

from __future__ import annotations

import torch

__all__ = ["compaction_moves", "range_mask"]


def compaction_moves(
    keep: torch.Tensor, counts: torch.Tensor, dest_starts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and destination slots of a compaction, safe for one ``scatter_``.

    Args:
        keep: ``int64 [B, Hkv, K]`` kept slots, sorted; the first ``counts`` entries are real.
        counts: ``int64 [B, Hkv]``.
        dest_starts: ``int64 [B, Hkv]``.

    Returns:
        ``(src, dst)``, both ``int64 [B, Hkv, K]``: move slot ``src`` to slot ``dst``. Entries past ``counts``
        repeat the last real move (an identity move of slot 0 when there is none), so a gather from ``src``
        followed by a scatter to ``dst`` writes no conflicting duplicates.
    """
    B, Hkv, K = keep.shape
    offsets = torch.arange(K, device=keep.device)
    pick = torch.minimum(offsets.expand(B, Hkv, K), (counts - 1).clamp(min=0)[..., None])
    src = keep.gather(2, pick)
    dst = dest_starts[..., None] + pick
    none = (counts == 0)[..., None]
    return torch.where(none, 0, src), torch.where(none, 0, dst)


def range_mask(starts: torch.Tensor, ends: torch.Tensor, length: int) -> torch.Tensor:
    """``bool [..., length]``: True at indices ``[starts, ends)`` (``starts``/``ends`` of shape ``[...]``)."""
    idx = torch.arange(length, device=starts.device)
    return (idx >= starts[..., None]) & (idx < ends[..., None])
