"""Storage after prefill compression: SnapKV with uniform top-k vs head-adaptive selection (max_share 2 and
unbounded), on SmolLM2-135M passkey prompts (seed 7) or a tiny random model, CPU, fp32.

    python benchmarks/adaptive_memory.py smollm2   # or: tiny

Prints, per setting, the K/V bytes allocated after prefill, the bytes in live slots, and the longest head's keep
over the uniform budget (the worst layer, and the mean over layers). docs/policies/adaptive.md quotes the output.
"""

import math
import sys

import torch

from kvsieve import models
from kvsieve.evaluation.tasks import make_prompt
from kvsieve.integration import apply

torch.set_num_threads(1)
out = {}
def measure(model, ids, params, name="snapkv"):
    with torch.inference_mode(), apply(model, name, "torch", params=params) as engine:
        model(input_ids=ids, use_cache=True)
    cache = engine.last_cache
    per_layer = []
    for layer in cache.layers:
        live = (layer.ends - layer.starts)
        per_layer.append((live.sum().item(), live.max().item(), live.min().item(), layer.capacity))
    return dict(nbytes=cache.nbytes(), live=cache.live_nbytes(), layers=per_layer)

settings = {
    "topk": {},
    "adaptive(max_share=2)": {"selection": "adaptive"},
    "adaptive(max_share=none)": {"selection": "adaptive", "selection.max_share": None},
    "adaptive(alpha=0,max_share=none)": {"selection": "adaptive", "selection.alpha": 0.0, "selection.max_share": None},
}
which = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
model, tok = models.load("smollm2" if which == "smollm2" else "tiny-random-llama")
if which == "smollm2":
    prompts = [torch.tensor([make_prompt(tok, "passkey", L, d, seed=7, index=i).input_ids])
               for L, d, i in ((1024, 0.125, 0), (1024, 0.625, 2), (2048, 0.375, 1))]
else:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (1, 1024), generator=g)]
full = None
for ratio in (0.1, 0.2):
    for label, extra in settings.items():
        rows = []
        for ids in prompts:
            r = measure(model, ids, {"ratio": ratio, **extra})
            n = ids.shape[1]
            u = max(math.ceil(ratio * n), 32)
            share = max(l[1] for l in r["layers"]) / u
            mean_share = sum(l[1] for l in r["layers"]) / len(r["layers"]) / u
            rows.append((n, r["nbytes"], r["live"], share, mean_share))
        print(f"ratio={ratio} {label}: " + "; ".join(
            f"L={n} alloc={nb/2**20:.2f}MiB live={lv/2**20:.2f}MiB max_h/u(worst layer)={s:.2f} "
            f"mean over layers={m:.2f}"
            for n, nb, lv, s, m in rows), flush=True)
for ids in prompts[:1]:
    r = measure(model, ids, {}, name="none")
    print(f"full cache L={ids.shape[1]}: alloc={r['nbytes']/2**20:.2f}MiB live={r['live']/2**20:.2f}MiB")
