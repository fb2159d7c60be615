"""Tensor parallelism on GPUs: every rank keeps what one GPU keeps (kvsieve.parallel).

    python benchmarks/tp_check.py prepare DIR          # a random-weight Llama (8 layers, 8 heads / 4 KV heads), saved
    python benchmarks/tp_check.py single DIR OUT       # one GPU: tokens and kept positions per layer and KV head
    torchrun --nproc_per_node 2 benchmarks/tp_check.py tp DIR OUT   # transformers' tp_plan="auto", one process a GPU
    python benchmarks/tp_check.py compare OUT          # each rank's KV heads against the one-GPU run

fp32, greedy, a 3-row left-padded batch, compressors snapkv (scoring.aggregation=all: one ranking shared by every
head, the case that needs the reduction), fastkv (its propagation ranking sums over heads) and rpc. Writes
OUT/tp_check.json with, per compressor, whether tokens and kept positions match.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

RUNS = {
    "snapkv-all": ("snapkv", {"ratio": 0.3, "window": 4, "scoring.aggregation": "all"}),
    "fastkv": ("fastkv", {"tsp_rate": 0.4, "ratio": 0.2, "window": 4}),
    "rpc": ("rpc", {"interval": 16, "window": 4, "ratio": 0.25}),
}
LENGTHS = [300, 220, 150]
NEW = 40


def prepare(path: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=1000, max_position_embeddings=4096, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)


def batch(device):
    gen = torch.Generator().manual_seed(1)
    width = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(LENGTHS):
        ids[i, width - n:] = torch.randint(3, 1000, (n,), generator=gen)
        mask[i, width - n:] = 1
    return ids.to(device), mask.to(device)


def record(model, device) -> dict:
    from kvsieve.integration import apply

    ids, mask = batch(device)
    out = {}
    for key, (name, params) in RUNS.items():
        with torch.inference_mode(), apply(model, name, "torch", params=params) as engine:
            tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                                    do_sample=False)
            kept = []
            for layer in engine.last_cache.layers:  # per row and KV head: the positions of the live slots
                kept.append([[layer.positions[b, h, int(layer.starts[b, h]):int(layer.ends[b, h])].tolist()
                              for h in range(layer.positions.shape[1])] for b in range(len(LENGTHS))])
        out[key] = {"tokens": tokens.tolist(), "kept": kept, "heads_group": engine.heads.distributed}
    return out


def main() -> None:
    what = sys.argv[1]
    if what == "prepare":
        prepare(sys.argv[2])
    elif what == "single":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32).cuda().eval()
        Path(sys.argv[3]).mkdir(parents=True, exist_ok=True)
        (Path(sys.argv[3]) / "single.json").write_text(json.dumps(record(model, "cuda")))
    elif what == "tp":
        import torch.distributed as dist
        from transformers import AutoModelForCausalLM

        from kvsieve.parallel import tensor_parallel_group

        dist.init_process_group("nccl")
        rank = dist.get_rank()
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        model = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32, tp_plan="auto").eval()
        print(f"rank {rank}: device_mesh={getattr(model, 'device_mesh', None)} group={tensor_parallel_group(model)}",
              flush=True)
        os.environ["KVSIEVE_DEBUG"] = "1"
        result = record(model, f"cuda:{os.environ['LOCAL_RANK']}")
        (Path(sys.argv[3]) / f"tp_rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()
    elif what == "compare":
        out = Path(sys.argv[2])
        single = json.loads((out / "single.json").read_text())
        ranks = sorted(out.glob("tp_rank*.json"))
        report = {}
        for key in RUNS:
            rows = {}
            for index, path in enumerate(ranks):
                got = json.loads(path.read_text())[key]
                per_rank = len(got["kept"][0][0])
                heads = range(index * per_rank, (index + 1) * per_rank)
                want = [[[row[h] for h in heads] for row in layer] for layer in single[key]["kept"]]
                rows[path.stem] = {"tokens_equal": got["tokens"] == single[key]["tokens"],
                                   "kept_equal": got["kept"] == want, "reduced": got["heads_group"]}
            report[key] = rows
        print(json.dumps(report, indent=1))
        (out / "tp_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
