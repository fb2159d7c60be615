"""Scores that span attention heads under tensor parallelism: one reduction, in one place.

Under tensor parallelism (transformers' ``tp_plan``, ``torchrun``) each rank holds some of the KV heads, and so
its cache and its scores cover only those heads. Whatever ranks tokens by a sum over heads must sum over every
rank's heads, or the ranks keep different tokens (and FastKV would propagate different tokens on each rank, so the
row-parallel all-reduce after each later layer would add up partial outputs of different tokens). Scoring policies
never call ``torch.distributed`` themselves: they call :meth:`kvsieve.policy.ScoringContext.sum_over_heads`, which
sums the local heads and then all-reduces over the tensor-parallel group the engine found for the model
(:func:`tensor_parallel_group`). On one device it is a plain sum.

Per-KV-head rankings (SnapKV's ``aggregation="group"``) need no reduction: each rank ranks its own heads, which is
what one device does for those heads. A head-adaptive selection (Ada-KV: the heads of a row share its budget) does:
:func:`kvsieve.compressor.select_checked` gathers every rank's scores (:meth:`HeadGroup.gather`), selects over all
heads on every rank, and keeps this rank's (:meth:`HeadGroup.local`).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["HeadGroup", "tensor_parallel_group", "tensor_parallel_size"]


class HeadGroup:
    """The KV heads a score may span: this rank's alone (``group=None``), or every rank of a tensor-parallel group.

    Args:
        group: a ``torch.distributed`` process group whose ranks each hold some of the model's KV heads.
    """

    def __init__(self, group: Any = None):
        self.group = group

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def sum_over_heads(self, scores: torch.Tensor) -> torch.Tensor:
        """``[B, 1, N]``: ``scores`` (``[B, Hkv_local, N]``) summed over every head of the model (an all-reduce
        over the group when there is one)."""
        total = scores.sum(dim=1, keepdim=True)
        if self.group is not None:
            import torch.distributed as dist

            total = total.contiguous()
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv, ...]``: ``tensor`` (``[B, Hkv_local, ...]``, the same shape on every rank) with every rank's
        heads, in rank order (an all-gather over the group; ``tensor`` itself when there is none)."""
        if self.group is None:
            return tensor
        import torch.distributed as dist

        parts = [torch.empty_like(tensor, memory_format=torch.contiguous_format)
                 for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's heads of ``tensor`` (``[B, Hkv, ...]``, every rank's heads in rank order, as :meth:`gather`
        makes it)."""
        if self.group is None:
            return tensor
        import torch.distributed as dist

        per_rank = tensor.shape[1] // dist.get_world_size(self.group)
        start = dist.get_rank(self.group) * per_rank
        return tensor[:, start : start + per_rank]

    def same_on_every_rank(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` (same shape on every rank) is equal on all ranks: a debug check of what must agree
        (e.g. the tokens FastKV propagates). One all-reduce and one host read."""
        if self.group is None:
            return True
        import torch.distributed as dist

        local = tensor.to(torch.float64)
        low, high = local.clone(), local.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.group)
        return bool(torch.equal(low, high))


LOCAL = HeadGroup()


def tensor_parallel_group(model: torch.nn.Module) -> Any:
    """The process group over which ``model``'s attention heads are split, or None (one device, ``device_map``).

    transformers' tensor parallelism keeps a device mesh on the model (``model.device_mesh`` or
    ``model._device_mesh``): either the tensor-parallel mesh itself (one dimension), or, as transformers 5.24 makes
    it, a mesh with the dimensions ``(pp, fsdp, tp)`` (sizes 1, 1, world under ``tp_plan="auto"``) whose
    tensor-parallel group is the ``tp`` dimension's (what transformers' own layers all-reduce over; ``get_group()``
    without a dimension raises on such a mesh, which left the heads unreduced). A mesh of one device is no split,
    and so is a multi-dimensional mesh without a ``tp`` dimension.
    """
    mesh = getattr(model, "device_mesh", None) or getattr(model, "_device_mesh", None)
    if mesh is None:
        return None
    try:
        if mesh.ndim > 1:
            if "tp" not in (mesh.mesh_dim_names or ()):
                return None
            mesh = mesh["tp"]
        if mesh.size() <= 1:
            return None
        return mesh.get_group()
    except (AttributeError, KeyError, RuntimeError, ValueError):  # not a mesh transformers makes
        return None


def tensor_parallel_size(model: torch.nn.Module) -> int:
    """How many ranks ``model``'s attention heads are split over (1 on one device): each rank's KV cache holds
    ``config.num_key_value_heads / tensor_parallel_size(model)`` heads."""
    group = tensor_parallel_group(model)
    if group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(group)
