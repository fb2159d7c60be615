"""Small index computations shared by the cache, the policies and the reference backend."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["compaction_moves", "ints_to_device", "range_mask"]


def ints_to_device(values: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """``int64 [len(values)]`` on ``device``, from host ints, without making the host wait for the device.

    ``torch.tensor(values, device="cuda")`` copies from pageable host memory, which PyTorch does synchronously: the
    host waits until the GPU has run everything queued before it (in a prefill, every layer issued so far). On CUDA
    the values are put in pinned host memory instead and copied asynchronously on ``device``'s current stream;
    PyTorch's caching host allocator keeps the pinned block until that copy has run. Work issued later on the same
    stream sees the values; another stream must wait for this one first. Elsewhere: ``torch.tensor``.

    Not during a CUDA graph capture: a captured copy would read the pinned block at every replay, after it was
    freed. Make the tensor before the capture (:mod:`kvsieve.prefill_graph` does).

    Raises:
        RuntimeError: ``device``'s current stream is capturing a CUDA graph.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    with torch.cuda.device(device):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"ints_to_device(device={device}) was called while that device's stream captures a CUDA graph, where "
                "the copy would read freed host memory at every replay; make the tensor before the capture"
            )
    return torch.tensor(values, dtype=torch.long).pin_memory().to(device, non_blocking=True)


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
