"""GPU smoke measurements for the RPC and FastKV issues (random weights, paper shapes, side by side in one process).

    python benchmarks/smoke_decode_prefill.py rpc OUTDIR [--gen 4096 --batch 16 --backend auto]
    python benchmarks/smoke_decode_prefill.py fastkv OUTDIR [--context 32768 --backend auto]

``rpc``: a random-weight Qwen2 model with DeepSeek-R1-Distill-Qwen-7B shapes (28 layers, 28 heads, 4 KV heads,
d=128), a 128-token random prompt, ``--gen`` generated tokens (min_new_tokens forces the length), greedy, batch
``--batch``, through kvsieve's fast path (``kvsieve.generate(fast=True)``: static cache, CUDA-graph replay), and
``--eager-gen`` tokens through HF's eager decode loop (``kvsieve.generate`` without ``fast``; it is host-bound,
so a short run gives its rate): full cache (``none``) vs ``rpc`` (P=1024, R=32, c=4). Reports tokens/s, peak GPU
memory (torch.cuda.max_memory_allocated) and the cache's allocated K/V bytes.

``fastkv``: a random-weight Llama-3.1-8B-shaped model (32 layers, 32 heads, 8 KV heads, d=128), batch 1,
``--context`` random prompt tokens, time to first token (prefill + one decode step, max_new_tokens=1):
plain HF sdpa (no kvsieve) vs kvsieve ``none`` vs ``snapkv`` (ratio 0.1, window 8) vs ``fastkv`` (TSP 20%,
retain 10%), each timed after a warm-up run, CUDA-synchronised.

Writes OUTDIR/<which>.md (a markdown table) and OUTDIR/<which>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _env() -> dict:
    import transformers
    import triton

    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                triton=triton.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def _sync_time(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def bench_rpc(args) -> list[dict]:
    from kvsieve.integration import generate
    from kvsieve.models import random_paper_model

    model = random_paper_model("r1-qwen-7b")
    ids = torch.randint(100, 150000, (args.batch, 128), device="cuda")
    mask = torch.ones_like(ids)
    rows = []
    runs = [("none", {}), ("rpc", dict(interval=1024, window=32, ratio=0.25))]
    # the fast path (static cache, CUDA-graph replay) for the full --gen tokens; HF's eager loop
    # (kvsieve.generate without fast=True) for --eager-gen tokens: it is host-bound, a short run shows its rate
    loops = [("fast path", True, args.gen), ("HF eager loop", False, args.eager_gen)]
    for loop, fast, gen in loops:
        if gen <= 0:
            continue
        for name, params in runs:
            try:
                generate(model, ids[:, :16], mask[:, :16], compressor=name, params=params, backend=args.backend,
                         max_new_tokens=8, do_sample=False, fast=fast)  # warm-up
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                result = generate(model, ids, mask, compressor=name, params=params, backend=args.backend,
                                  max_new_tokens=gen, min_new_tokens=gen, do_sample=False, fast=fast)
            except Exception as exc:  # reported as a row, the other runs go on
                rows.append(dict(loop=loop, compressor=name, error=f"{type(exc).__name__}: {str(exc)[:300]}"))
                print(rows[-1], flush=True)
                continue
            rows.append(dict(loop=loop, compressor=name, params=params, backend=result.backend, batch=args.batch,
                             generated=result.generated_tokens, seconds=round(result.seconds, 2),
                             tokens_per_s=round(result.tokens_per_s, 1),
                             peak_gpu_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                             kv_gib_end=round(result.kv_bytes / 2**30, 3),
                             kv_gib_peak=round(result.kv_bytes_peak / 2**30, 3),
                             kv_len_end=max(result.kv_lengths)))
            print(rows[-1], flush=True)
    return rows


def bench_fastkv(args) -> list[dict]:
    from kvsieve.integration import generate
    from kvsieve.models import random_paper_model

    model = random_paper_model("llama-3.1-8b")
    ids = torch.randint(100, 128000, (1, args.context), device="cuda")
    mask = torch.ones_like(ids)
    runs = [
        ("hf-sdpa", None, {}),
        ("none", "none", {}),
        ("snapkv", "snapkv", dict(ratio=0.1, window=8, **{"scoring.pooling": "max"})),
        ("fastkv", "fastkv", dict(tsp_rate=0.2, ratio=0.1)),
    ]
    rows = []
    for label, comp, params in runs:
        def once(n=args.context, comp=comp, params=params):
            if comp is None:
                with torch.inference_mode():
                    return model.generate(input_ids=ids[:, :n], attention_mask=mask[:, :n], max_new_tokens=1,
                                          do_sample=False)
            return generate(model, ids[:, :n], mask[:, :n], compressor=comp, params=params,
                            backend=args.backend, max_new_tokens=1, do_sample=False)

        try:
            once(min(args.context, 4096))  # warm-up
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            seconds, out = _sync_time(once)
            row = dict(run=label, context=args.context, ttft_ms=round(seconds * 1000, 1),
                       peak_gpu_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
            if comp is not None:
                row.update(backend=out.backend, kv_len_max=max(out.kv_lengths), kv_len_min=min(out.kv_lengths),
                           kv_gib=round(out.kv_bytes / 2**30, 3))
        except torch.OutOfMemoryError as exc:
            row = dict(run=label, context=args.context, error=f"OOM: {str(exc)[:120]}")
        rows.append(row)
        print(row, flush=True)
    base = next((r["ttft_ms"] for r in rows if r["run"] == "none" and "ttft_ms" in r), None)
    for row in rows:
        if base and "ttft_ms" in row:
            row["speedup_vs_kvsieve_none"] = round(base / row["ttft_ms"], 2)
    return rows


def _markdown(rows: list[dict], env: dict, title: str) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = [f"### {title}", "", f"{env}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["rpc", "fastkv"])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--gen", type=int, default=4096)
    parser.add_argument("--eager-gen", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("smoke_decode_prefill.py needs a CUDA GPU", file=sys.stderr)
        return 2
    args.outdir.mkdir(parents=True, exist_ok=True)
    env = _env()
    rows = bench_rpc(args) if args.which == "rpc" else bench_fastkv(args)
    (args.outdir / f"{args.which}.json").write_text(json.dumps(dict(env=env, rows=rows), indent=2))
    (args.outdir / f"{args.which}.md").write_text(_markdown(rows, env, args.which))
    print(_markdown(rows, env, args.which))
    return 0


if __name__ == "__main__":
    sys.exit(main())
