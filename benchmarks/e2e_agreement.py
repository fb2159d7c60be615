"""End-to-end backend agreement on the GPU: the same greedy generation through every available backend.

    python benchmarks/e2e_agreement.py OUTDIR

A random-weight Qwen2 model (4 layers, 28 heads, 4 KV heads, d=128, bf16 on CUDA), a batch of 4 random prompts
(one left-padded) of ~600 tokens, 96 greedy tokens, for compressors none, snapkv (ratio 0.2, window 8),
rpc (P=32, R=8, c=4) and fastkv (TSP 20%, retain 10%). For each backend other than ``torch`` it reports the
fraction of generated tokens equal to the ``torch`` backend's and the first divergence; for every backend, the
fast path (``fast=True``: static cache, CUDA-graph replay) against the same backend's eager run. bf16 near-ties can
flip a token, after which sequences legitimately differ: agreement is reported, not asserted.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from kvsieve.integration import generate
from kvsieve.plugins import registry

RUNS = [
    ("none", {}),
    ("snapkv", dict(ratio=0.2, window=8)),
    ("rpc", dict(interval=32, window=8, ratio=4)),
    ("fastkv", dict(tsp_rate=0.2, retain_rate=0.1)),
]


def main() -> int:
    if not torch.cuda.is_available():
        print("e2e_agreement.py needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    config = Qwen2Config(hidden_size=3584, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=8192,
                         use_sliding_window=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.randint(100, 32000, (4, 600), device="cuda")
    mask = torch.ones_like(ids)
    ids[1, :57], mask[1, :57] = 0, 0
    backends = [e.name for e in registry().entries("backend")
                if e.obj().supports(torch.device("cuda"), torch.bfloat16)[0]]
    rows = []
    for comp, params in RUNS:
        sequences = {}
        for backend in backends:
            for fast in (False, True):
                try:
                    result = generate(model, ids, mask, compressor=comp, params=params, backend=backend, fast=fast,
                                      max_new_tokens=96, min_new_tokens=96, do_sample=False, pad_token_id=0)
                except Exception as exc:  # reported as a row, the other runs go on
                    rows.append(dict(compressor=comp, run=f"{backend}{' fast path' if fast else ''}",
                                     error=f"{type(exc).__name__}: {str(exc)[:300]}"))
                    print(rows[-1], flush=True)
                    continue
                sequences[backend, fast] = (result.sequences[:, ids.shape[1]:], result.kv_lengths)
        # each backend's eager run against the torch backend's; each fast-path run against its own backend's eager
        pairs = [((b, False), ("torch", False)) for b in backends if b != "torch"]
        pairs += [((b, True), (b, False)) for b in backends]
        for (backend, fast), reference in pairs:
            if (backend, fast) not in sequences or reference not in sequences:
                continue
            (seq, lengths), (ref, ref_lengths) = sequences[backend, fast], sequences[reference]
            same = seq == ref
            diverged = (~same).any(dim=1)
            first = [int((~row).nonzero()[0]) if d else None for row, d in zip(same, diverged)]
            rows.append(dict(compressor=comp, run=f"{backend}{' fast path' if fast else ''}",
                             reference=f"{reference[0]}{' fast path' if reference[1] else ''}",
                             agreement=round(float(same.float().mean()), 4),
                             first_divergence_per_row=first, kv_lengths_equal=lengths == ref_lengths))
            print(rows[-1], flush=True)
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), backends=backends)
    (out / "e2e_agreement.json").write_text(json.dumps(dict(env=env, rows=rows), indent=2))
    lines = ["### End-to-end token agreement (greedy, bf16, 96 tokens, batch 4)", "", str(env), "",
             "| compressor | run | reference | token agreement | first divergence per row | kv lengths equal |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['compressor']} | {r['run']} | {r['reference']} | {r['agreement']:.2%} | "
              f"{r['first_divergence_per_row']} | {r['kv_lengths_equal']} |" if "error" not in r else
              f"| {r['compressor']} | {r['run']} | - | failed: {r['error']} | - | - |" for r in rows]
    (out / "e2e_agreement.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
