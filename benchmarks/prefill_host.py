"""What the prefill graphs (kvsieve.prefill_graph) save: time to first token and the host's CPU time of a prefill,
with the per-layer prompt compression replayed from a CUDA graph (on) or issued eagerly (off), against no
compression, side by side in one process.

    python benchmarks/prefill_host.py OUTDIR [--contexts 8K,32K --backend auto --repeats 3 --runs none,fastkv-on]

Llama-3.1-8B shapes (random weights, bf16), batch 1, ``model.generate(max_new_tokens=1)`` inside a fresh
``kvsieve.apply`` per run (as ``kvsieve.generate`` does: every run captures its graphs again, on the second layer
of each shape), for snapkv and fastkv at their defaults and ``none``. Each configuration is warmed up once, then timed
``--repeats`` times, the configurations interleaved (drift hits them alike); reported are the medians of the wall
time (synchronised) and of ``time.process_time()`` over the run (the host's CPU time, every thread of the process),
and the graphs captured and replayed in one run. Writes OUTDIR/prefill_host.json and OUTDIR/prefill_host.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from kvsieve import prefill_graph
from kvsieve.integration import apply
from kvsieve.models import random_paper_model
from kvsieve.params import parse_size
from kvsieve.prefill_graph import describe_graphs

RUNS = {  # key: (label, compressor, prefill graphs, contract checks[, module settings patched for the run])
    "none": ("none", "none", False, True),
    "snapkv-off": ("snapkv graphs off", "snapkv", False, True),
    "snapkv-on": ("snapkv graphs on", "snapkv", True, True),
    "fastkv-off": ("fastkv graphs off", "fastkv", False, True),
    "fastkv-on": ("fastkv graphs on", "fastkv", True, True),
    # what the contract checks cost (their device work and the read of their flags at the forward's end)
    "snapkv-on-unchecked": ("snapkv graphs on, checks off", "snapkv", True, False),
    "fastkv-on-unchecked": ("fastkv graphs on, checks off", "fastkv", True, False),
    # the cache fingerprinted around every replayed scoring call too, not only in the first, eager run of a shape
    "snapkv-on-cache-in-replays": ("snapkv graphs on, cache check in replays", "snapkv", True, True,
                                   {"CHECK_CACHE_IN_REPLAYS": True}),
}
DEFAULT_RUNS = "none,snapkv-off,snapkv-on,fastkv-off,fastkv-on"


@contextlib.contextmanager
def patched(settings: dict | None = None):
    """``kvsieve.prefill_graph``'s module settings changed for one run (None: none changed)."""
    settings = settings or {}
    saved = {name: getattr(prefill_graph, name) for name in settings}
    for name, value in settings.items():
        setattr(prefill_graph, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(prefill_graph, name, value)


def one_run(model, ids: torch.Tensor, compressor: str, graphs: bool, checks: bool, backend: str,
            settings: dict | None = None) -> dict:
    torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    with patched(settings), torch.inference_mode(), \
            apply(model, compressor, backend, prefill_graphs=graphs, checks=checks) as engine:
        model.generate(input_ids=ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        counters = describe_graphs(engine)
        kv = engine.last_cache.kv_lengths()
    return dict(wall=wall, cpu=cpu, kv_layer0=kv[0], kv_last=kv[-1], **counters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--contexts", default="8K,32K")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma-separated, of {', '.join(RUNS)} (none is the "
                        "baseline: always run)")
    args = parser.parse_args()
    unknown = [key for key in args.runs.split(",") if key not in RUNS]
    if unknown:
        parser.error(f"unknown --runs {unknown}: choose from {', '.join(RUNS)}")
    runs = [RUNS[key] for key in RUNS if key == "none" or key in args.runs.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    model = random_paper_model("llama-3.1-8b")
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, backend=args.backend, rows=[])
    for context in [parse_size(c) for c in args.contexts.split(",")]:
        ids = torch.randint(100, 120000, (1, context), device="cuda")
        samples: dict[str, list[dict]] = {label: [] for label, *_ in runs}
        for _label, compressor, graphs, checks, *settings in runs:  # warm-up: kernels compiled, allocator warm
            one_run(model, ids, compressor, graphs, checks, args.backend, *settings)
        for _ in range(args.repeats):
            for label, compressor, graphs, checks, *settings in runs:
                samples[label].append(one_run(model, ids, compressor, graphs, checks, args.backend, *settings))
        base = statistics.median(s["wall"] for s in samples["none"])
        for label, compressor, graphs, checks, *_ in runs:
            timed = samples[label]
            wall = statistics.median(s["wall"] for s in timed)
            row = dict(context=context, run=label, compressor=compressor, prefill_graphs=graphs, checks=checks,
                       ttft_s=round(wall, 4), cpu_s=round(statistics.median(s["cpu"] for s in timed), 4),
                       over_none=round(wall / base - 1, 4), speedup=round(base / wall, 4),
                       captures=timed[-1]["captures"], replays=timed[-1]["replays"], kv_layer0=timed[-1]["kv_layer0"],
                       kv_last=timed[-1]["kv_last"], ttft_all_s=[round(s["wall"], 4) for s in timed])
            result["rows"].append(row)
            print(row, flush=True)
        del ids
        torch.cuda.empty_cache()
    (args.out / "prefill_host.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Prefill graphs: TTFT and host CPU time ({result['gpu']}, torch {result['torch']}, backend "
             f"{args.backend}, median of {args.repeats})", "",
             "| context | run | TTFT (s) | vs none | none / run | CPU time (s) | graphs captured / replayed |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        lines.append(f"| {row['context']} | {row['run']} | {row['ttft_s']} | {100 * row['over_none']:+.2f}% | "
                     f"{row['speedup']:.3f}x | {row['cpu_s']} | {row['captures']} / {row['replays']} |")
    (args.out / "prefill_host.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
