"""Where a fast-path decode step's time goes, fused decoder layers against unfused: torch.profiler over eager runs of
the static-cache step, and CUDA-graph replay times against the bandwidth floor (GPU).

    python benchmarks/profile_decode.py OUTDIR [--quick]

Two settings of docs/benchmarks.md's goals: R1-Distill-Qwen-7B shapes at batch 32 (live entries per layer 8K, 11K --
RPC's largest cache in a 32K run at P=4096 --, 16K and 32K) and Llama-3.1-8B shapes at batch 1 (8K, 13K -- FastKV at
128K --, 32K and 128K). For each model the same probe (random prompt, full cache, triton backend) is built twice, with
the fused decoder layer (kvsieve.fused_layer), with it but q/k/v as three GEMMs and gate/up as two, and without it,
one after the other in one process. For each live
length: the step time of the CUDA-graph replay (CUDA events, 50 replays) and the bandwidth floor (weights + live K/V
at the measured copy bandwidth). At the profiled length, the profile of 5 eager runs of the same step (the graph
itself cannot be profiled kernel by kernel): GPU time per kernel family, kernels per step, and the sum of kernel
times against the replay time. Writes OUTDIR/profile_decode.md and OUTDIR/decode_floor.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kvsieve.bench import DecodeProbe, copy_bandwidth, kv_bytes_per_token, weight_bytes
from kvsieve.fused_layer import FusedDecoderLayers
from kvsieve.integration import apply
from kvsieve.models import random_paper_model

# the step's cost depends on the live length, not on the compressor (RPC adds one host check per step): the full
# cache is used so that the static capacity covers the length. (shape, batch, live lengths, the profiled one)
CASES = [("r1-qwen-7b", 32, (8192, 11391, 16384, 32768), 11391),
         ("llama-3.1-8b", 1, (8192, 13107, 32768, 131072), 13107)]
PROMPT = 128
# (label, fuse_layers, FusedDecoderLayers.merge_qkv and .merge_gate_up)
VARIANTS = [("unfused", False, False), ("fused, projections apart", True, False), ("fused", True, True)]


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


def profile_step(probe: DecodeProbe, live: int) -> tuple[int, float, list]:
    """Kernels per step, kernel ms per step and the top kernel families of 5 eager runs of the step at ``live``."""
    probe.set_state(generated=1, held=live - 1)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            probe.decoder._forward()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in kernels) / 5 / 1e3
    count = sum(e.count for e in kernels) // 5
    return count, total, sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]


def main() -> int:
    if not torch.cuda.is_available():
        print("profile_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    quick = "--quick" in sys.argv[2:]
    bandwidth = copy_bandwidth(torch.device("cuda"))
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, copy_bandwidth_gbs=round(bandwidth / 1e9),
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    lines = [f"## Decode step profiles ({env['gpu']}, copy bandwidth {bandwidth / 1e9:.0f} GB/s, {env['date']})"]
    rows = []
    for shape, batch, lengths, profiled in CASES:
        lengths = lengths[:2] if quick else lengths
        model = random_paper_model(shape)
        for label, fused, merge in VARIANTS:
            FusedDecoderLayers.merge_qkv = FusedDecoderLayers.merge_gate_up = merge
            with torch.inference_mode(), apply(model, "none", "triton") as engine:
                probe = DecodeProbe(model, engine, batch, PROMPT, max(lengths) + 64, fuse_layers=fused)
                for live in lengths:
                    ms = replay_ms(probe, live)
                    floor = (weight_bytes(model) + batch * kv_bytes_per_token(model) * (PROMPT + live)) / bandwidth
                    rows.append(dict(model=shape, batch=batch, live=live, layers=label, step_ms=round(ms, 3),
                                     floor_ms=round(floor * 1e3, 3), floor_ratio=round(ms / floor / 1e3, 3)))
                    print(rows[-1], flush=True)
                if label == "fused, projections apart":  # the replay times tell what merging the projections saves
                    probe.decoder.close()
                    del probe
                    continue
                count, total, top = profile_step(probe, profiled)
                probe.decoder.close()
                key = (shape, profiled, label)
                ms = next(r["step_ms"] for r in rows if (r["model"], r["live"], r["layers"]) == key)
                lines += [f"### {shape}, batch {batch}, {profiled} live entries per layer, {label} layers", "",
                          f"- graph replay: {ms:.3f} ms per step",
                          f"- eager step under the profiler: {count} kernels, {total:.3f} ms of kernel time per step",
                          "", "| kernel | ms per step | share | launches per step |", "|---|---|---|---|"]
                lines += [f"| {e.key[:90]} | {e.self_device_time_total / 5 / 1e3:.3f} | "
                          f"{e.self_device_time_total / 5 / 1e3 / total:.1%} | {e.count // 5} |" for e in top]
                lines.append("")
                del probe
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
    FusedDecoderLayers.merge_qkv = FusedDecoderLayers.merge_gate_up = True
    lines += ["## Replay time against the bandwidth floor: unfused layers, fused with q/k/v and gate/up apart, fused",
              "", "| model | batch | live entries per layer | floor ms | unfused ms (/ floor) | fused, projections "
              "apart ms (/ floor) | fused ms (/ floor) | fused speedup |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["layers"] != "fused":
            continue
        same = {x["layers"]: x for x in rows if (x["model"], x["live"]) == (r["model"], r["live"])}
        u, a = same["unfused"], same["fused, projections apart"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['live']:,} | {r['floor_ms']:.3f} | {u['step_ms']:.3f} "
                     f"({u['floor_ratio']:.2f}) | {a['step_ms']:.3f} ({a['floor_ratio']:.2f}) | {r['step_ms']:.3f} "
                     f"({r['floor_ratio']:.2f}) | {u['step_ms'] / r['step_ms']:.2f}x |")
    (out / "profile_decode.md").write_text("\n".join(lines) + "\n")
    (out / "decode_floor.json").write_text(json.dumps(dict(env=env, rows=rows), indent=2))
    print("\n".join(lines[-(len(rows) // 3 + 3):]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
