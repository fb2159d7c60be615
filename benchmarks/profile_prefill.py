"""Where a compressed prefill's time goes: torch.profiler over one prefill per run (GPU).

    python benchmarks/profile_prefill.py OUTDIR [--context 8192] [--backend auto]
        [--runs none,snapkv-on,snapkv-on-unchecked,fastkv-on]

A random-weight Llama-3.1-8B-shaped model, batch 1, ``--context`` random tokens; each run (the keys of
``prefill_host.py``: compressor, prefill graphs on or off, contract checks on or off) prefills through
``model.generate(max_new_tokens=1)`` in a fresh ``kvsieve.apply``, once as a warm-up and once under the profiler.
Writes OUTDIR/profile_prefill_<context>.md: per run the wall time, the kernel time per CUDA stream (the forward's
stream and the prefill graphs' side stream: what the compression costs on the GPU, and whether the forward's own
kernels got slower beside it), the side stream's top kernels, and the top operators by CUDA and CPU time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from prefill_host import RUNS, patched
from torch.profiler import ProfilerActivity, profile

from kvsieve.integration import apply
from kvsieve.models import random_paper_model


def _kernels(trace: Path) -> list[dict]:
    """The trace's GPU kernels: ``name``, ``stream``, ``ts``, ``dur`` (microseconds)."""
    events = json.loads(trace.read_text())["traceEvents"]
    return [dict(name=e["name"], stream=e.get("args", {}).get("stream"), ts=e["ts"], dur=e["dur"])
            for e in events if e.get("cat") == "kernel"]


def stream_table(kernels: list[dict]) -> list[str]:
    """Per stream: kernels, their summed time, the span from its first start to its last end; then the forward
    stream's 15 most launched kernels and the side streams' 12 heaviest."""
    by_stream: dict[int, list[dict]] = defaultdict(list)
    for k in kernels:
        by_stream[k["stream"]].append(k)
    main = max(by_stream, key=lambda s: sum(k["dur"] for k in by_stream[s]))
    lines = ["| stream | kernels | kernel time (ms) | GEMM time (ms) | span (ms) |", "|---|---|---|---|---|"]
    for stream, ks in sorted(by_stream.items(), key=lambda item: -sum(k["dur"] for k in item[1])):
        gemm = sum(k["dur"] for k in ks if "nvjet" in k["name"] or "gemm" in k["name"].lower())
        span = max(k["ts"] + k["dur"] for k in ks) - min(k["ts"] for k in ks)
        label = f"{stream} (forward)" if stream == main else str(stream)
        lines.append(f"| {label} | {len(ks)} | {sum(k['dur'] for k in ks) / 1e3:.3f} | {gemm / 1e3:.3f} | "
                     f"{span / 1e3:.3f} |")
    names = Counter(k["name"][:90] for k in by_stream[main])
    lines += ["", "| forward-stream kernel (most launched) | launches |", "|---|---|"]
    lines += [f"| {name} | {count} |" for name, count in names.most_common(15)]
    side = [k for s, ks in by_stream.items() if s != main for k in ks]
    if side:
        end_main = max(k["ts"] + k["dur"] for k in by_stream[main])
        after = [k for k in side if k["ts"] + k["dur"] > end_main]
        lines += ["", f"Side-stream kernels ending after the forward stream's last kernel: {len(after)}", "",
                  "| side-stream kernel | launches | total (ms) |", "|---|---|---|"]
        time_by, count_by = Counter(), Counter()
        for k in side:
            time_by[k["name"][:90]] += k["dur"]
            count_by[k["name"][:90]] += 1
        for name, total in time_by.most_common(12):
            lines.append(f"| {name} | {count_by[name]} | {total / 1e3:.3f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--runs", default="none,snapkv-on,snapkv-on-unchecked,fastkv-on")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("profile_prefill.py needs a CUDA GPU", file=sys.stderr)
        return 2
    unknown = [key for key in args.runs.split(",") if key not in RUNS]
    if unknown:
        parser.error(f"unknown --runs {unknown}: choose from {', '.join(RUNS)}")
    args.outdir.mkdir(parents=True, exist_ok=True)
    model = random_paper_model("llama-3.1-8b")
    ids = torch.randint(100, 120000, (1, args.context), device="cuda")
    lines = [f"## Prefill profile at {args.context} tokens, backend {args.backend} ({torch.cuda.get_device_name()})"]

    def prefill(compressor: str, graphs: bool, checks: bool) -> None:
        with torch.inference_mode(), apply(model, compressor, args.backend, prefill_graphs=graphs, checks=checks):
            model.generate(input_ids=ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            torch.cuda.synchronize()

    for key in args.runs.split(","):
        label, compressor, graphs, checks, *settings = RUNS[key]
        with patched(*settings):
            prefill(compressor, graphs, checks)  # warm-up: kernels compiled, allocator warm
            start = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                prefill(compressor, graphs, checks)
        wall = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace))
            streams = stream_table(_kernels(trace))
        table_cuda = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)
        table_cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60)
        lines += [f"### {label}: {wall * 1e3:.1f} ms under the profiler", "", *streams, "", "By CUDA time:", "```",
                  table_cuda, "```", "By CPU time:", "```", table_cpu, "```"]
        print(f"{label}: {wall * 1e3:.1f} ms", *streams[:6], sep="\n", flush=True)
    (args.outdir / f"profile_prefill_{args.context}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
