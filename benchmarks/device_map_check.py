"""accelerate ``device_map`` over 2 GPUs: a split model keeps the tokens of the unsplit one.

    python benchmarks/device_map_check.py OUT

A random-weight Llama (8 layers, hidden 512, 8 heads / 4 KV heads), fp32, a left-padded batch of 2 rows, 48 greedy
tokens, triton backend; every built-in compressor (none, snapkv, streamingllm, rpc, fastkv, fastkv+rpc,
attended_spans, tova, h2o), eager and fast path (CUDA graphs on:
one per device's run of layers, kvsieve.fastpath.SegmentGraphs). Writes OUT/device_map_check.json: per run,
whether the split model's tokens equal the one-GPU tokens, or the error.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from kvsieve.integration import generate

RUNS = [("none", {}), ("snapkv", {"ratio": 0.3, "window": 4}), ("streamingllm", {"budget": 64, "sinks": 4}),
        ("rpc", {"interval": 16, "window": 4, "ratio": 0.25}),
        ("fastkv", {"tsp_rate": 0.4, "ratio": 0.2, "window": 4}),
        ("fastkv+rpc", {"fastkv.tsp_rate": 0.4, "rpc.interval": 16, "rpc.window": 4}),
        ("attended_spans", {"ratio": 0.3, "window": 4}), ("tova", {"budget": 64}), ("h2o", {"budget": 64})]


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    path = tempfile.mkdtemp()
    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=1000, max_position_embeddings=4096, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    one = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    split = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="auto",
                                                 max_memory={0: "60MiB", 1: "20GiB"}).eval()
    devices = sorted({str(p.device) for p in split.parameters()})
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (2, 200), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :60], mask[1, :60] = 0, 0
    rows = []
    for name, params in RUNS:
        for fast in (False, True):
            extra = dict(fast=True) if fast else {}
            try:
                want = generate(one, ids.cuda(), mask.cuda(), compressor=name, params=params, backend="triton",
                                max_new_tokens=48, min_new_tokens=48, do_sample=False, **extra).sequences
                got = generate(split, ids.to("cuda:0"), mask.to("cuda:0"), compressor=name, params=params,
                               backend="triton", max_new_tokens=48, min_new_tokens=48, do_sample=False,
                               **extra).sequences
                agree = float((got.cpu() == want.cpu()).float()[:, 200:].mean())
                rows.append(dict(compressor=name, fast=fast, equal=bool(torch.equal(got.cpu(), want.cpu())),
                                 agreement=round(agree, 4)))
            except Exception as exc:  # reported as a row
                rows.append(dict(compressor=name, fast=fast, error=f"{type(exc).__name__}: {str(exc)[:300]}"))
            print(rows[-1], flush=True)
    (out / "device_map_check.json").write_text(json.dumps(dict(devices=devices, rows=rows), indent=1))


if __name__ == "__main__":
    main()
