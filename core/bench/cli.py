"""``kvsieve bench {decode,prefill,report}``: the argument parser and :func:`run`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from kvsieve.bench.decode import bench_decode
from kvsieve.bench.prefill import bench_prefill
from kvsieve.bench.report import environment, rerender, write_report

__all__ = ["register", "run"]


def _ints(text: str) -> list[int]:
    out = []
    for item in text.split(","):
        item = item.strip().upper()
        try:
            out.append(int(float(item[:-1]) * 1024) if item.endswith("K") else int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of positive integers (8K = 8192), got {text!r}"
            ) from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return out


def _validations(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in filter(None, text.split(",")):
        batch, sep, n = item.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"--validate expects BATCH:TOKENS items, got {item!r}")
        pairs.append((_ints(batch)[0], _ints(n)[0]))
    return pairs


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``kvsieve bench {decode,prefill,report}`` to the CLI."""
    from kvsieve.params import parse_params

    parser = subparsers.add_parser("bench", help="speed and memory benchmarks on random-weight paper-shaped models")
    sub = parser.add_subparsers(dest="bench", required=True)

    def common(p, model: str, compressors: str):
        p.add_argument("--model", default=model,
                       help=f"a paper shape (random weights on the GPU) or a kvsieve model name (default {model})")
        p.add_argument("--compressor", action="append", metavar="NAME[:k=v,...]",
                       help=f"compressor and parameters, repeatable (default {compressors})")
        p.add_argument("--backend", default="auto", help="kernel backend (default auto)")
        p.add_argument("--device", default="auto", help="auto, cpu or cuda")
        p.add_argument("--no-hf", action="store_true", help="skip HF's eager baseline rows")
        p.add_argument("--no-graph", action="store_true", help="decode without CUDA graphs")
        p.add_argument("--out", type=Path, required=True, help="output directory")
        p.set_defaults(func=run, parse_params=parse_params, default_compressors=compressors)

    p = sub.add_parser("decode", help="decode tokens/s and peak memory: RPC vs full cache")
    common(p, "r1-qwen-7b", "none;rpc:interval=4096,window=32,ratio=4")
    p.add_argument("--batches", type=_ints, default=[8, 16, 32])
    p.add_argument("--new-tokens", type=_ints, default=[8192, 16384, 32768])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--samples", type=int, default=6, help="cache lengths at which step time is measured")
    p.add_argument("--steps", type=int, default=16, help="steps timed per cache length")
    p.add_argument("--validate", type=_validations, default=[], help="BATCH:TOKENS configurations run for real")
    p.add_argument("--no-fast", action="store_true", help="only HF's eager baseline rows")
    p = sub.add_parser("prefill", help="TTFT and decode after prefill: FastKV vs SnapKV vs full")
    common(p, "llama-3.1-8b", "none;snapkv:ratio=0.1,window=8,pooling=max;fastkv:tsp_rate=0.2,retain_rate=0.1")
    p.add_argument("--contexts", type=_ints, default=[8192, 32768, 131072])
    p.add_argument("--new-tokens", type=int, default=256)
    p = sub.add_parser("report", help="re-render OUT/<which>.md and plots from OUT/<which>.jsonl")
    p.add_argument("out", type=Path)
    p.set_defaults(func=run)
    return parser


def _compressor_specs(args) -> list[tuple[str, dict[str, Any]]]:
    specs = args.compressor or args.default_compressors.split(";")
    out = []
    for spec in specs:
        name, _, params = spec.partition(":")
        out.append((name.strip(), args.parse_params([p for p in params.split(",") if p])))
    return out


def _load_model(name: str, device: str):
    from kvsieve import models

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if name in models.PAPER_SHAPES:
        if device != "cuda":
            raise ValueError(f"--model {name}: paper-shaped models are built on a CUDA GPU; none is available "
                             "(use a small model such as tiny-random-qwen2 on the CPU)")
        return models.random_paper_model(name)
    model, _ = models.load(name)
    return model.to(device).eval()


def run(args: argparse.Namespace) -> int:
    if args.bench == "report":
        for path in rerender(args.out):
            print(path)
        return 0
    minimum = dict(samples=2, steps=4) if args.bench == "decode" else dict(new_tokens=8)
    for name, least in minimum.items():
        if getattr(args, name) < least:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be at least {least}")
    model = _load_model(args.model, args.device)
    compressors = _compressor_specs(args)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = environment() | dict(model=args.model, command=f"kvsieve bench {args.bench}")
    graph = False if args.no_graph else None
    partial = args.out / f"{args.bench}.partial.jsonl"  # rows as they come (a run cut short keeps them)
    partial.write_text(json.dumps(meta) + "\n")

    def log(line: str) -> None:
        print(line, flush=True)
        with partial.open("a") as f:
            f.write(line + "\n")

    if args.bench == "decode":
        rows = bench_decode(model, args.model, args.batches, args.new_tokens, compressors, backend=args.backend,
                            prompt_len=args.prompt_len, samples=args.samples, steps=args.steps,
                            hf_eager=not args.no_hf, fast=not args.no_fast, validate=args.validate,
                            use_cuda_graph=graph, log=log)
    else:
        rows = bench_prefill(model, args.model, args.contexts, compressors, backend=args.backend,
                             new_tokens=args.new_tokens, hf_eager=not args.no_hf, use_cuda_graph=graph, log=log)
    partial.unlink()
    path = args.out / f"{args.bench}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [meta, *rows]))
    print(write_report(args.out, args.bench, rows, meta).read_text())
    return 0
