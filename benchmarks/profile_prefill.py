"""Where a compressed prefill's time goes: torch.profiler over one prefill per compressor (GPU).

    python benchmarks/profile_prefill.py OUTDIR [--context 8192] [--backend triton]

A random-weight Llama-3.1-8B-shaped model, batch 1, ``--context`` random tokens; ``none``, ``snapkv`` (ratio 0.1,
window 8) and ``fastkv`` (TSP 20%, retain 10%) each prefilled once as a warm-up and once under the profiler. Writes
OUTDIR/profile_prefill_<context>.md: wall time, and the top operators by CUDA time and by CPU time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kvsieve.fastpath import StaticDecoder
from kvsieve.integration import apply
from kvsieve.models import random_paper_model

RUNS = [("none", {}), ("snapkv", dict(ratio=0.1, window=8, **{"scoring.pooling": "max"})),
        ("fastkv", dict(tsp_rate=0.2, ratio=0.1))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--backend", default="triton")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("profile_prefill.py needs a CUDA GPU", file=sys.stderr)
        return 2
    args.outdir.mkdir(parents=True, exist_ok=True)
    model = random_paper_model("llama-3.1-8b")
    ids = torch.randint(100, 128000, (1, args.context), device="cuda")
    lines = [f"## Prefill profile at {args.context} tokens, backend {args.backend} ({torch.cuda.get_device_name()})"]
    for name, params in RUNS:
        with torch.inference_mode(), apply(model, name, args.backend, params=params) as engine:
            StaticDecoder(model, engine).prefill(ids, None, 4)  # warm-up at the same length
            torch.cuda.synchronize()
            start = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                StaticDecoder(model, engine).prefill(ids, None, 4)
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
        table_cuda = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)
        table_cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60)
        lines += [f"### {name} {params}: {wall * 1e3:.1f} ms under the profiler", "", "By CUDA time:", "```",
                  table_cuda, "```", "By CPU time:", "```", table_cpu, "```"]
        print(lines[-9][:200], flush=True)
    (args.outdir / f"profile_prefill_{args.context}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
