"""Where a fast-path decode step's time goes, fused decoder layers against unfused: torch.profiler over eager runs of
the static-cache step, and CUDA-graph replay times against the bandwidth floor (GPU).

    python benchmarks/profile_decode.py OUTDIR [--quick] [--cases r1,r1-rpc,llama] [--variants unfused,...]

Settings of docs/benchmarks.md's goals: R1-Distill-Qwen-7B shapes at batch 32 with the full cache (live entries per
layer 8K, 11K -- RPC's largest cache in a 32K run at P=4096 --, 16K and 32K) and with RPC (P=4096, R=32, c=4: an
almost empty cache, 5.6K and 11.2K -- the largest that fits with 16 steps to spare --, the lengths RPC's steps run
at), and Llama-3.1-8B shapes at batch 1 (8K, 13K -- FastKV at 128K --, 32K and 128K). For each case the same probe
(random prompt, triton backend) is built once per variant, one after the other in one process:

* ``unfused``: HF's decoder layers;
* ``apart``: the fused decoder layer with q/k/v as three GEMMs and gate/up as two, the residual add after down_proj
  as a kernel of its own, the selector query pushed by a copy of its own;
* ``previous``: q/k/v and gate/up merged (the fused layer before the residual add and the query moved into other
  kernels);
* ``cublas``: also the residual add inside down_proj's GEMM and the query written by the cache append, every
  projection on cuBLAS and ``silu_mul`` a kernel of its own (the fused layer before 2026-11-30, night);
* ``silu-gate-up``: ``cublas`` with ``FusedDecoderLayers.silu_in_gate_up`` (the triton backend's gate/up GEMM with
  SiLU * up in its epilogue); ``skinny-o``, ``skinny-down``: that, with o_proj or down_proj (+ residual) on the
  triton backend's skinny linear (``FusedDecoderLayers.backend_projections``);
* ``fused``: the fused layer as shipped (SiLU in gate/up, o_proj and down_proj on the skinny linear);
* ``cublaslt``: ``fused`` captured with ``torch.backends.cuda.preferred_blas_library("cublaslt")`` (q/k/v and the
  LM head stay on a BLAS);
* ``split``: ``fused`` with the decode attention's split rule before the one-wave rule
  (``kvsieve.backends.triton.decode_attention.UNSPLIT_ONE_WAVE = False``: R1-7B at batch 32 splits each row in two).

For each live length: the step time of the CUDA-graph replay (CUDA events, 50 replays) and the bandwidth floor
(weights + live K/V at the measured copy bandwidth). At the profiled length, for ``cublas`` and ``fused``, the
profile of 5 eager runs of the same step (the graph itself cannot be profiled kernel by kernel): GPU time per
kernel family, kernels per step, and the sum of kernel times against the replay time. Writes
OUTDIR/profile_decode.md and OUTDIR/decode_floor.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kvsieve.backends.triton import decode_attention
from kvsieve.bench import DecodeProbe, copy_bandwidth, kv_bytes_per_token, weight_bytes
from kvsieve.fused_layer import FusedDecoderLayers
from kvsieve.integration import apply
from kvsieve.models import random_paper_model

RPC = {"interval": 4096, "window": 32, "ratio": 0.25}
# name: (shape, batch, compressor, its params, live lengths, the profiled one, the run it sizes the cache for). The
# step's cost depends on the live length; the full cache's capacity covers every length, RPC's is its peak in a 32K run
CASES = {
    "r1": ("r1-qwen-7b", 32, "none", {}, (8192, 11391, 16384, 32768), 11391, None),
    "r1-rpc": ("r1-qwen-7b", 32, "rpc", RPC, (1, 5632, 11200), 5632, 32768),
    "llama": ("llama-3.1-8b", 1, "none", {}, (8192, 13107, 32768, 131072), 13107, None),
}
PROMPT = 128
# name: (label, fuse_layers, FusedDecoderLayers settings, BLAS library, the decode attention's one-wave split rule)
_ALL_ON = {"merge_qkv": True, "merge_gate_up": True, "residual_in_down_proj": True, "query_in_append": True,
           "silu_in_gate_up": True, "backend_projections": ("o_proj", "down_proj")}
_CUBLAS = {**_ALL_ON, "silu_in_gate_up": False, "backend_projections": ()}
VARIANTS = {
    "unfused": ("unfused", False, _ALL_ON, None, True),
    "apart": ("fused, projections apart", True, {**dict.fromkeys(_ALL_ON, False), "backend_projections": ()},
              None, True),
    "previous": ("fused, add and query apart", True,
                 {**_CUBLAS, "residual_in_down_proj": False, "query_in_append": False}, None, True),
    "cublas": ("fused, projections on cuBLAS", True, _CUBLAS, None, True),
    "silu-gate-up": ("fused, only SiLU in gate/up", True, {**_CUBLAS, "silu_in_gate_up": True}, None, True),
    "skinny-o": ("fused, SiLU in gate/up, skinny o_proj", True, {**_ALL_ON, "backend_projections": ("o_proj",)},
                 None, True),
    "skinny-down": ("fused, SiLU in gate/up, skinny down_proj", True,
                    {**_ALL_ON, "backend_projections": ("down_proj",)}, None, True),
    "fused": ("fused", True, _ALL_ON, None, True),
    "cublaslt": ("fused, cuBLASLt", True, _ALL_ON, "cublaslt", True),
    "split": ("fused, split as before", True, _ALL_ON, None, False),
}
PROFILED = ("cublas", "fused")


@contextlib.contextmanager
def variant_settings(settings: dict, blas: str | None, one_wave: bool):
    saved = {name: getattr(FusedDecoderLayers, name) for name in settings}
    library = torch.backends.cuda.preferred_blas_library()
    saved_one_wave = decode_attention.UNSPLIT_ONE_WAVE
    for name, value in settings.items():
        setattr(FusedDecoderLayers, name, value)
    if blas is not None:
        torch.backends.cuda.preferred_blas_library(blas)
    decode_attention.UNSPLIT_ONE_WAVE = one_wave
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(FusedDecoderLayers, name, value)
        torch.backends.cuda.preferred_blas_library(library)
        decode_attention.UNSPLIT_ONE_WAVE = saved_one_wave


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
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--quick", action="store_true", help="the first two lengths of each case")
    parser.add_argument("--cases", default="r1,r1-rpc,llama", help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    cases, variants = args.cases.split(","), args.variants.split(",")
    for what, chosen, known in (("case", cases, CASES), ("variant", variants, VARIANTS)):
        bad = [x for x in chosen if x not in known]
        if bad:
            parser.error(f"unknown {what} {bad}: choose from {', '.join(known)}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    bandwidth = copy_bandwidth(torch.device("cuda"))
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, copy_bandwidth_gbs=round(bandwidth / 1e9),
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    lines = [f"## Decode step profiles ({env['gpu']}, copy bandwidth {bandwidth / 1e9:.0f} GB/s, {env['date']})"]
    rows = []
    for case in cases:
        shape, batch, compressor, params, lengths, profiled, run_tokens = CASES[case]
        lengths = lengths[:2] if args.quick else lengths
        model = random_paper_model(shape)
        for key in variants:
            label, fused, settings, blas, one_wave = VARIANTS[key]
            with variant_settings(settings, blas, one_wave), torch.inference_mode(), \
                    apply(model, compressor, "triton", params=params) as engine:
                probe = DecodeProbe(model, engine, batch, PROMPT, run_tokens or max(lengths) + 64, fuse_layers=fused)
                for live in lengths:
                    ms = replay_ms(probe, live)
                    floor = (weight_bytes(model) + batch * kv_bytes_per_token(model) * (PROMPT + live)) / bandwidth
                    rows.append(dict(case=case, model=shape, compressor=compressor, batch=batch, live=live,
                                     layers=label, step_ms=round(ms, 3), floor_ms=round(floor * 1e3, 3),
                                     floor_ratio=round(ms / floor / 1e3, 3)))
                    print(rows[-1], flush=True)
                if key in PROFILED and profiled in lengths:
                    count, total, top = profile_step(probe, profiled)
                    ms = next(r["step_ms"] for r in rows
                              if (r["case"], r["live"], r["layers"]) == (case, profiled, label))
                    lines += [f"### {shape} ({compressor}), batch {batch}, {profiled} live entries per layer, {label} "
                              "layers", "", f"- graph replay: {ms:.3f} ms per step",
                              f"- eager step under the profiler: {count} kernels, {total:.3f} ms of kernel time per "
                              "step", "", "| kernel | ms per step | share | launches per step |", "|---|---|---|---|"]
                    lines += [f"| {e.key[:90]} | {e.self_device_time_total / 5 / 1e3:.3f} | "
                              f"{e.self_device_time_total / 5 / 1e3 / total:.1%} | {e.count // 5} |" for e in top]
                    lines.append("")
                probe.decoder.close()
                del probe
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
    labels = [VARIANTS[key][0] for key in variants]
    table = "## Replay time against the bandwidth floor"
    lines += [table, "", "| case | batch | live entries per layer | floor ms | "
              + " | ".join(f"{label} ms (/ floor)" for label in labels) + " |",
              "|---|---|---|---|" + "---|" * len(labels)]
    for case in cases:
        for live in sorted({r["live"] for r in rows if r["case"] == case}):
            same = {r["layers"]: r for r in rows if (r["case"], r["live"]) == (case, live)}
            first = next(iter(same.values()))
            cells = [f"{same[label]['step_ms']:.3f} ({same[label]['floor_ratio']:.2f})" if label in same else "-"
                     for label in labels]
            lines.append(f"| {case} | {first['batch']} | {live:,} | {first['floor_ms']:.3f} | " + " | ".join(cells)
                         + " |")
    (out / "profile_decode.md").write_text("\n".join(lines) + "\n")
    (out / "decode_floor.json").write_text(json.dumps(dict(env=env, rows=rows), indent=2))
    print("\n".join(lines[lines.index(table):]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
