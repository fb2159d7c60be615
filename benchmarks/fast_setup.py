"""Where a fast-path run's time outside its decode steps goes: the prefill, the static cache, the fused layers and
the graph capture (GPU; R1-Distill-Qwen-7B shapes, random weights).

    python benchmarks/fast_setup.py OUTDIR [--compressors none,rpc] [--batch 32] [--prompt-len 128] [--runs 3]

Per compressor, ``fast_generate`` runs ``--runs`` times in one process with a short output (``--new-tokens``), each
split by :mod:`kvsieve.bench.step_clock` (prefill, warm-up with the capture, steps, tail); the last run also under
cProfile, whose top functions by cumulative time (host seconds, device waits included) go to
OUTDIR/fast_setup_<compressor>.txt. The split of every run goes to OUTDIR/fast_setup.json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
from pathlib import Path

import torch

from kvsieve.bench.schedule import decode_schedule
from kvsieve.bench.step_clock import step_clock
from kvsieve.bench.timing import sync
from kvsieve.fastpath import fast_generate
from kvsieve.integration import apply
from kvsieve.models import random_paper_model
from kvsieve.params import parse_compressor_specs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="r1-qwen-7b")
    parser.add_argument("--compressors", default="none,rpc:interval=4096,window=32,ratio=0.25",
                        help="a comma list of compressor specs (as kvsieve bench's --compressor)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--layers", type=int, help="cut the model to this many decoder layers (a CPU smoke test)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    overrides = {"num_hidden_layers": args.layers} if args.layers else None
    model = random_paper_model(args.model, device=args.device, overrides=overrides)
    device = next(model.parameters()).device
    records = []
    for spec in parse_compressor_specs([args.compressors]):
        name, params = spec.name, spec.params
        with torch.inference_mode(), apply(model, name, args.backend, params=params) as engine:
            live, compressions = decode_schedule(engine.compressor, args.new_tokens)
            for run in range(args.runs):
                ids = torch.randint(100, model.config.vocab_size, (args.batch, args.prompt_len), device=device)
                profiler = cProfile.Profile() if run == args.runs - 1 else None
                with step_clock(device) as clock:
                    if profiler:
                        profiler.enable()
                    fast_generate(model, ids, None, engine, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False)
                    sync(device)
                    if profiler:
                        profiler.disable()
                sync(device)
                parts = clock.breakdown(live, compressions)
                parts.pop("step_ms_by_live")
                records.append(dict(compressor=name, run=run, **parts))
                print(json.dumps(records[-1]), flush=True)
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
            (args.out / f"fast_setup_{name}.txt").write_text(text.getvalue())
    (args.out / "fast_setup.json").write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
