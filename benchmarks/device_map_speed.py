"""accelerate ``device_map`` over 2 GPUs vs one GPU: the fast path's decode speed at R1-Distill-Qwen-7B shapes.

    python benchmarks/device_map_speed.py OUT [--batches 1,32] [--prompt 1024] [--new 512]

A random-weight model with R1-Distill-Qwen-7B's shapes (28 layers, bf16, triton backend) runs
``kvsieve.generate(fast=True)`` on one GPU, then the same model is split by ``accelerate.dispatch_model``
(layers 0-13 with the embedding on cuda:0, layers 14-27 with the norm and LM head on cuda:1) and runs it again:
one CUDA graph per device's run of layers (``kvsieve.fastpath.SegmentGraphs``), and once without graphs, to show
what they buy. Each configuration runs twice and the second run is timed (the first compiles Triton's kernels
and captures the graphs). Tokens/s count every generated token over the whole call (prefill included, as
``GenerationResult.tokens_per_s``). Writes OUT/device_map_speed.json and prints a table: tokens/s per engine,
split / one GPU, and whether the split model's tokens equal the one-GPU tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import dispatch_model

from kvsieve.integration import generate
from kvsieve.models import random_paper_model

RUNS = [("none", {}), ("rpc", {"interval": 256, "window": 32, "ratio": 0.25})]


def timed(model, ids, compressor, params, new, **kwargs):
    kwargs = dict(compressor=compressor, params=params, backend="triton", fast=True, max_new_tokens=new,
                  min_new_tokens=new, do_sample=False, **kwargs)
    generate(model, ids, **kwargs)  # compile, capture
    return generate(model, ids, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new", type=int, default=512)
    parser.add_argument("--eager-new", type=int, default=64, help="new tokens of the split run without graphs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = random_paper_model("r1-qwen-7b", device="cuda:0")
    layers = model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(10, 150000, (b, args.prompt), generator=gen) for b in map(int, args.batches.split(","))}
    rows = []
    for b, ids in prompts.items():
        for name, params in RUNS:
            one = timed(model, ids.to("cuda:0"), name, params, args.new)
            rows.append(dict(engine="one GPU", batch=b, compressor=name, tokens_per_s=one.tokens_per_s,
                             seconds=one.seconds, sequences=one.sequences.cpu()))
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
    device_map |= {f"model.layers.{i}": 0 if i < layers // 2 else 1 for i in range(layers)}
    split = dispatch_model(model, device_map=device_map)
    for b, ids in prompts.items():
        for name, params in RUNS:
            got = timed(split, ids.to("cuda:0"), name, params, args.new)
            want = next(r for r in rows if r["engine"] == "one GPU" and r["batch"] == b and r["compressor"] == name)
            rows.append(dict(engine="device_map, graphs per device", batch=b, compressor=name,
                             tokens_per_s=got.tokens_per_s, seconds=got.seconds,
                             vs_one_gpu=got.tokens_per_s / want["tokens_per_s"],
                             tokens_equal=bool(torch.equal(got.sequences.cpu(), want["sequences"]))))
            eager = timed(split, ids.to("cuda:0"), name, params, args.eager_new, use_cuda_graph=False)
            rows.append(dict(engine="device_map, no graphs", batch=b, compressor=name, new_tokens=args.eager_new,
                             tokens_per_s=eager.tokens_per_s, seconds=eager.seconds,
                             vs_one_gpu=eager.tokens_per_s / want["tokens_per_s"]))
    for row in rows:
        row.pop("sequences", None)
    meta = dict(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), torch=torch.__version__,
                shape="r1-qwen-7b", prompt=args.prompt, new_tokens=args.new, runs=RUNS)
    (args.out / "device_map_speed.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print("| engine | batch | compressor | tokens/s | vs one GPU | tokens equal |\n|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['vs_one_gpu']:.3f}" if "vs_one_gpu" in r else ""
        print(f"| {r['engine']} | {r['batch']} | {r['compressor']} | {r['tokens_per_s']:.1f} | {ratio} | "
              f"{r.get('tokens_equal', '')} |")


if __name__ == "__main__":
    main()
