"""What the run-time contract checks (kvsieve.contracts) cost on the GPU: the same runs with checks on and off,
side by side in one process.

    python benchmarks/check_cost.py OUTDIR [--decode-tokens 4200 --batch 32 --contexts 8192,32768]

* decode: R1-Distill-Qwen-7B shapes (random weights), batch ``--batch``, a 128-token prompt, RPC (P=1024, R=32,
  ratio 0.25) through the fast path (CUDA-graph replay). The checks run only when a compression fires (every P
  steps): reported are the median plain step, the median firing step (its compression included) with checks on
  and off, the checks' cost per step amortised over P, and the end-to-end tokens/s of whole runs on and off.
* prefill: Llama-3.1-8B shapes, batch 1, time to first token (``kvsieve.generate(max_new_tokens=1)``, median of 3
  after a warm-up) of snapkv (ratio 0.1, window 8, max pooling) and fastkv (TSP 0.2, ratio 0.1), on and off.

Writes OUTDIR/check_cost.json and OUTDIR/check_cost.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kvsieve.fastpath import StaticDecoder
from kvsieve.integration import apply, generate
from kvsieve.models import random_paper_model
from kvsieve.params import parse_size

RPC = dict(interval=1024, window=32, ratio=0.25)


def _timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def decode_rows(batch: int, tokens: int) -> list[dict]:
    model = random_paper_model("r1-qwen-7b")
    ids = torch.randint(100, 150000, (batch, 128), device="cuda")
    rows = []
    for checks in (False, True):  # warm-up: kernels compiled and cached for both (a short run that compresses)
        generate(model, ids[:, :16], compressor="rpc", params=dict(interval=64, window=32, ratio=0.25),
                 backend="triton", fast=True, checks=checks, max_new_tokens=200, do_sample=False)
    for checks in (False, True):
        # per-step times (synchronised around each step): plain steps and the steps where RPC compresses
        with torch.inference_mode(), apply(model, "rpc", "triton", params=RPC, checks=checks) as engine:
            decoder = StaticDecoder(model, engine)
            logits = decoder.prefill(ids, None, tokens)
            plain, firing = [], []
            rpc = engine.compressor
            for _ in range(1, tokens):
                seconds, logits = _timed(lambda lg=logits, d=decoder: d.step(lg.argmax(-1)))
                generated = decoder.cache.layers[0].seen - decoder.cache.layers[0].prompt_len
                (firing if rpc.fires_at(generated) else plain).append(seconds)
            del decoder
        torch.cuda.empty_cache()
        # whole runs, no per-step synchronisation
        generate(model, ids[:, :16], compressor="rpc", params=RPC, backend="triton", fast=True, checks=checks,
                 max_new_tokens=8, do_sample=False)
        result = generate(model, ids, compressor="rpc", params=RPC, backend="triton", fast=True, checks=checks,
                          max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        rows.append(dict(checks=checks, batch=batch, generated=tokens, compressions=len(firing),
                         plain_step_ms=round(1e3 * statistics.median(plain), 3),
                         firing_step_ms=[round(1e3 * s, 2) for s in firing],
                         tokens_per_s=round(result.tokens_per_s, 1)))
        print(rows[-1], flush=True)
    off, on = rows
    fire_extra = statistics.median(on["firing_step_ms"]) - statistics.median(off["firing_step_ms"])
    per_step = fire_extra / RPC["interval"]
    summary = dict(firing_extra_ms=round(fire_extra, 3), amortised_ms_per_step=round(per_step, 4),
                   amortised_fraction_of_step=round(per_step / off["plain_step_ms"], 5),
                   tokens_per_s_on_over_off=round(on["tokens_per_s"] / off["tokens_per_s"], 4))
    print(summary, flush=True)
    del model
    torch.cuda.empty_cache()
    return [*rows, dict(decode_summary=summary)]


def prefill_rows(contexts: list[int]) -> list[dict]:
    model = random_paper_model("llama-3.1-8b")
    rows = []
    runs = [("snapkv", {"ratio": 0.1, "window": 8, "scoring.pooling": "max"}),
            ("fastkv", {"tsp_rate": 0.2, "ratio": 0.1})]
    for context in contexts:
        ids = torch.randint(100, 120000, (1, context), device="cuda")
        for name, params in runs:
            times = {}
            for checks in (True, False, True, False):  # interleaved: drift hits both alike
                def ttft(c=checks, ids=ids, name=name, params=params):
                    return generate(model, ids, compressor=name, params=params, backend="triton", checks=c,
                                    max_new_tokens=1, do_sample=False)
                if checks not in times:
                    ttft()  # warm-up
                    times[checks] = []
                times[checks] += [_timed(ttft)[0] for _ in range(2)]
            on, off = statistics.median(times[True]), statistics.median(times[False])
            rows.append(dict(context=context, compressor=name, ttft_on_s=round(on, 4), ttft_off_s=round(off, 4),
                             on_over_off=round(on / off, 4)))
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--decode-tokens", type=parse_size, default=4200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--contexts", default="8K,32K")
    parser.add_argument("--skip", default="", help="decode and/or prefill")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    if "decode" not in args.skip:
        rows["decode"] = decode_rows(args.batch, args.decode_tokens)
    if "prefill" not in args.skip:
        rows["prefill"] = prefill_rows([parse_size(c) for c in args.contexts.split(",")])
    (args.out / "check_cost.json").write_text(json.dumps(rows, indent=1))
    lines = [f"# Contract checks on vs off ({rows['gpu']})", ""]
    for row in rows.get("prefill", []):
        lines.append(f"- prefill {row['compressor']} {row['context']}: TTFT {row['ttft_on_s']} s on vs "
                     f"{row['ttft_off_s']} s off ({row['on_over_off']}x)")
    for row in rows.get("decode", []):
        lines.append(f"- decode: {row}")
    (args.out / "check_cost.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
