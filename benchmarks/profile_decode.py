"""Where a fast-path decode step's time goes: torch.profiler over eager runs of the static-cache step (GPU).

    python benchmarks/profile_decode.py OUTDIR

Two settings of docs/benchmarks.md's goals: R1-Distill-Qwen-7B shapes at batch 32 with 11K live entries per layer
(RPC's largest cache in a 32K run at P=4096), and Llama-3.1-8B shapes at batch 1 with 13K entries (FastKV at 128K). For
each: the step time of the CUDA-graph replay (CUDA events, 50 replays), the bandwidth floor (weights + live K/V at
the measured copy bandwidth), and the profile of 5 eager runs of the same step (the graph itself cannot be
profiled kernel by kernel): GPU time per kernel family, the number of kernels per step, and the sum of kernel
times against the replay time. Writes OUTDIR/profile_decode.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kvsieve.bench import DecodeProbe, copy_bandwidth, kv_bytes_per_token, weight_bytes
from kvsieve.integration import apply
from kvsieve.models import random_paper_model

# the step's cost depends on the live length, not on the compressor (RPC adds one host check per step): the full
# cache is used so that the static capacity covers the length
CASES = [("r1-qwen-7b", 32, 11391, "none", {}), ("llama-3.1-8b", 1, 13107, "none", {})]


def replay_ms(probe: DecodeProbe, live: int, count: int = 50) -> float:
    probe.set_state(generated=1, held=live - 1)
    graph = probe.decoder.graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(count):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / count


def main() -> int:
    if not torch.cuda.is_available():
        print("profile_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    bandwidth = copy_bandwidth(torch.device("cuda"))
    lines = [f"## Decode step profiles ({torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e9:.0f} GB/s)"]
    for shape, batch, live, name, params in CASES:
        model = random_paper_model(shape)
        with torch.inference_mode(), apply(model, name, "triton", params=params) as engine:
            probe = DecodeProbe(model, engine, batch, 128, live + 64)
            ms = replay_ms(probe, live)
            floor = (weight_bytes(model) + batch * kv_bytes_per_token(model) * (128 + live)) / bandwidth * 1e3
            probe.set_state(generated=1, held=live - 1)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    probe.decoder._forward()
                torch.cuda.synchronize()
            kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
            total = sum(e.self_device_time_total for e in kernels) / 5 / 1e3
            count = sum(e.count for e in kernels) // 5
            top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]
        lines += [f"### {shape}, batch {batch}, {live} live entries per layer, compressor {name}", "",
                  f"- graph replay: {ms:.3f} ms per step; bandwidth floor {floor:.3f} ms; ratio {ms / floor:.2f}",
                  f"- eager step under the profiler: {count} kernels, {total:.3f} ms of kernel time per step", "",
                  "| kernel | ms per step | share | launches per step |", "|---|---|---|---|"]
        lines += [f"| {e.key[:90]} | {e.self_device_time_total / 5 / 1e3:.3f} | "
                  f"{e.self_device_time_total / 5 / 1e3 / total:.1%} | {e.count // 5} |" for e in top]
        lines.append("")
        print("\n".join(lines[-18:]), flush=True)
        del probe, model, engine
        torch.cuda.empty_cache()
    (out / "profile_decode.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
