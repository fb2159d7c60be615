"""Scores that span heads under tensor parallelism (kvsieve.parallel), on the CPU with gloo and 2 processes: each
rank holds half the KV heads (and their query heads) of a layer; with the reduction, every rank scores and keeps
exactly what one process holding all heads does; without it (a per-rank sum) they would not. Head-adaptive
selection (the heads of a row share its budget) keeps on each rank what one process keeps. And the tensor-parallel
group is found on each kind of mesh transformers keeps on a model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvsieve.backends.torch_ref import TorchBackend
from kvsieve.compressor import _row_tensor, select_checked
from kvsieve.contracts import ContractGuard
from kvsieve.parallel import HeadGroup, tensor_parallel_group, tensor_parallel_size
from kvsieve.policies.adaptive import HeadAdaptiveSelection
from kvsieve.policies.causal_attention import CausalAttentionScoring
from kvsieve.policies.topk import TopKSelection
from kvsieve.policies.window_attention import WindowAttentionScoring
from kvsieve.policy import ScoringContext

B, H, HKV, W, L, D = 2, 8, 4, 4, 30, 16
WORLD = 2


def full_tensors():
    gen = torch.Generator().manual_seed(7)
    queries = torch.randn(B, H, W, D, generator=gen)
    keys = torch.randn(B, HKV, L, D, generator=gen)
    starts = torch.tensor([[0] * HKV, [5] * HKV])
    return queries, keys, starts


def context(queries, keys, starts, heads: HeadGroup) -> ScoringContext:
    hkv = keys.shape[1]
    ends = torch.full((B, hkv), L)
    return ScoringContext(queries=queries, keys=keys, values=keys, starts=starts[:, :hkv], ends=ends,
                          cand_starts=starts[:, :hkv], cand_ends=ends - W, positions=torch.arange(L).expand(B, hkv, L),
                          layer_idx=0, scale=D**-0.5, backend=TorchBackend(), queries_are_last=True, heads=heads)


NORMALIZATIONS = ("candidates", "visible", "causal")  # window_attention's two, and causal_attention (TOVA's)


def score_and_keep(ctx: ScoringContext, normalization: str):
    if normalization == "causal":
        policy = CausalAttentionScoring(aggregation="all")
    else:
        policy = WindowAttentionScoring(pooling="avg", kernel=3, aggregation="all", normalization=normalization)
    scores = policy.score(ctx)
    counts = ctx.cand_counts
    return scores, TopKSelection().select(scores, counts, 9).keep


def rank_main(rank: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD)
    try:
        queries, keys, starts = full_tensors()
        kv = slice(rank * HKV // WORLD, (rank + 1) * HKV // WORLD)
        q = slice(rank * H // WORLD, (rank + 1) * H // WORLD)
        results = {}
        for normalization in NORMALIZATIONS:
            for name, heads in (("reduced", HeadGroup(dist.group.WORLD)), ("local", HeadGroup())):
                ctx = context(queries[:, q].contiguous(), keys[:, kv].contiguous(), starts, heads)
                results[(normalization, name)] = score_and_keep(ctx, normalization)
        results["adaptive"] = adaptive_keep(HeadGroup(dist.group.WORLD), kv)
        results["same"] = HeadGroup(dist.group.WORLD).same_on_every_rank(torch.tensor([1, 2, 3]))
        results["differ"] = HeadGroup(dist.group.WORLD).same_on_every_rank(torch.tensor([rank]))
        results["mesh"] = mesh_groups()
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def adaptive_keep(heads: HeadGroup, kv: slice) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(keep, kept)`` of this rank's heads under head-adaptive selection (the heads of a row share its budget,
    across ranks), for a uniform budget and for per-row budgets."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(B, HKV, L, generator=gen)
    counts = torch.tensor([[L, L - 3, L, L - 7], [L - 5] * HKV])[:, kv]
    guard = ContractGuard(True, immediate=True)
    out = []
    for budgets, tails in (([9, 9], [2, 2]), ([9, 5], [2, 1])):
        budget_arg = budgets[0] if len(set(budgets)) == 1 else _row_tensor(budgets, counts)
        tail_arg = tails[0] if len(set(tails)) == 1 else _row_tensor(tails, counts)
        out.append(select_checked(HeadAdaptiveSelection(alpha=0.1), guard, scores[:, kv].contiguous(), counts,
                                  budgets, 1, tails, budget_arg, tail_arg, heads=heads))
    return out


def mesh_groups() -> dict[str, int]:
    """The group size :func:`tensor_parallel_group` finds on a model holding each kind of mesh transformers makes:
    a one-dimensional one, and 5.24's ``(pp, fsdp, tp)`` (whose ``get_group()`` without a dimension raises)."""
    from torch.distributed.device_mesh import init_device_mesh

    meshes = {"1d": init_device_mesh("cpu", (WORLD,)),
              "pp-fsdp-tp": init_device_mesh("cpu", (1, 1, WORLD), mesh_dim_names=("pp", "fsdp", "tp")),
              "no-tp": init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("pp", "dp"))}
    sizes = {}
    for name, mesh in meshes.items():
        model = torch.nn.Linear(1, 1)
        model._device_mesh = mesh
        group = tensor_parallel_group(model)
        sizes[name] = 0 if group is None else dist.get_world_size(group)
        assert tensor_parallel_size(model) == max(sizes[name], 1)
    return sizes


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo")
def test_ranks_score_and_keep_what_one_process_does(tmp_path):
    mp.spawn(rank_main, args=(str(tmp_path),), nprocs=WORLD, join=True)
    queries, keys, starts = full_tensors()
    for normalization in NORMALIZATIONS:
        full_scores, full_keep = score_and_keep(context(queries, keys, starts, HeadGroup()), normalization)
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"rank{rank}.pt")
            kv = slice(rank * HKV // WORLD, (rank + 1) * HKV // WORLD)
            scores, keep = got[(normalization, "reduced")]
            torch.testing.assert_close(scores, full_scores[:, kv], rtol=1e-5, atol=1e-6)
            assert torch.equal(keep, full_keep[:, kv]), (normalization, rank)
            _, local_keep = got[(normalization, "local")]
            assert not torch.equal(local_keep, full_keep[:, kv]), "without the reduction the ranks keep other tokens"
    # head-adaptive selection over every rank's heads: each rank keeps exactly one device's choice for its heads
    full = adaptive_keep(HeadGroup(), slice(None))
    for rank in range(WORLD):
        kv = slice(rank * HKV // WORLD, (rank + 1) * HKV // WORLD)
        for (keep, kept), (want_keep, want_kept) in zip(torch.load(tmp_path / f"rank{rank}.pt")["adaptive"], full):
            assert torch.equal(kept, want_kept[:, kv]) and torch.equal(keep, want_keep[:, kv]), rank
    assert len({tuple(kept.sum(dim=1).tolist()) for _, kept in full}) == 2 and bool((full[0][1] != 9).any())
    got = torch.load(tmp_path / "rank0.pt")
    assert got["same"] is True and got["differ"] is False
    # the tensor-parallel group is found on a 1-D mesh and on the tp dimension of a (pp, fsdp, tp) one
    assert got["mesh"] == {"1d": WORLD, "pp-fsdp-tp": WORLD, "no-tp": 0}
