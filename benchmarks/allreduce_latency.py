"""What one all-reduce of a decode step costs under tensor parallelism: NCCL's and symmetric memory's, in a graph.

    torchrun --nproc_per_node 2 benchmarks/allreduce_latency.py OUT

transformers' tensor-parallel plan all-reduces the hidden states twice per decoder layer (after the attention's
output projection and after the MLP's down projection), a ``[batch, 1, hidden]`` bf16 tensor. This measures one
such all-reduce as the fast path runs it: ``REPS`` of them captured in one CUDA graph, the graph replayed, the time
divided by ``REPS`` (and eagerly, for comparison), for batch 1, 16 and 32 at QwQ-32B's hidden size (5120) and
Llama-3.1-8B's (4096); beside it a local in-place add of the same tensor in a graph (the floor of any kernel), and
torch's symmetric-memory one-shot all-reduce (``torch.ops.symm_mem.one_shot_all_reduce``, NVLink peer loads, no
multicast) where this torch has it. Rank 0 writes OUT/allreduce_latency.json and prints a table.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPS, REPLAYS = 64, 20


def graph_time(fn, reps: int = REPS) -> float:
    """Microseconds per call of ``fn`` captured ``reps`` times in one CUDA graph (median of ``REPLAYS`` replays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(REPLAYS):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / reps)
    return sorted(times)[len(times) // 2]


def eager_time(fn, reps: int = REPS) -> float:
    for _ in range(5):
        fn()
    dist.barrier()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    group_name = dist.group.WORLD.group_name
    rows = []
    for hidden in (5120, 4096):
        for batch in (1, 16, 32):
            x = torch.randn(batch, 1, hidden, dtype=torch.bfloat16, device="cuda")
            row = dict(hidden=hidden, batch=batch, bytes=x.numel() * 2, world=world)
            row["nccl_graph_us"] = graph_time(lambda x=x: dist.all_reduce(x))
            row["nccl_eager_us"] = eager_time(lambda x=x: dist.all_reduce(x))
            row["local_add_graph_us"] = graph_time(lambda x=x: x.add_(0))
            try:
                import torch.distributed._symmetric_memory as symm_mem

                buf = symm_mem.empty(x.shape, dtype=x.dtype, device=x.device)
                symm_mem.rendezvous(buf, group_name)
                buf.copy_(x)
                row["symm_mem_one_shot_graph_us"] = graph_time(
                    lambda buf=buf: torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group_name))
            except Exception as exc:  # noqa: BLE001 - reported as the row's finding
                row["symm_mem_one_shot"] = f"unavailable: {type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_SYMM"))}
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
        meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, nccl=nccl, reps=REPS,
                    replays=REPLAYS, env=env)
        (out / "allreduce_latency.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        print("| hidden | batch | KiB | NCCL in a graph, us | NCCL eager, us | local add in a graph, us | "
              "one-shot symm mem in a graph, us |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            one_shot = r.get("symm_mem_one_shot_graph_us")
            print(f"| {r['hidden']} | {r['batch']} | {r['bytes'] / 1024:.0f} | {r['nccl_graph_us']:.1f} | "
                  f"{r['nccl_eager_us']:.1f} | {r['local_add_graph_us']:.1f} | "
                  f"{f'{one_shot:.1f}' if one_shot is not None else r.get('symm_mem_one_shot')} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
