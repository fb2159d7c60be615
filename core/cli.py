"""The ``kvsieve`` command line: ``plugins``, ``generate``, ``demo``, ``eval``.

Every subcommand validates its arguments before loading a model, and reports bad input as one line on stderr
with exit status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from kvsieve.cli_types import device, nonnegative, positive_float, size, unit_float
from kvsieve.params import CompressorSpec, parse_compressor_specs, parse_params

__all__ = ["main"]


# ---------------------------------------------------------------------------------------------- helpers
def _dtype(name: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"--dtype must be one of {', '.join(table)}, got {name!r}")
    return table[name]


def _add_model_args(parser: argparse.ArgumentParser, default_model: str) -> None:
    parser.add_argument("--model", default=default_model, help=f"built-in name or local HF directory ({default_model})")
    parser.add_argument("--backend", default="auto", help="kernel backend name or 'auto' (see `kvsieve plugins`)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (float32)")
    parser.add_argument("--device", default="cpu", type=device, help="cpu | cuda | cuda:N (cpu)")


def _add_compressor_args(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--compressor", default=default, metavar="NAME[:KEY=VALUE,...]",
                        help=f"compressor name, or a spec with parameters: snapkv:ratio=0.2,window=8 ({default})")
    parser.add_argument(
        "--set", dest="params", action="append", metavar="KEY=VALUE",
        help="compressor parameter (repeatable); joins the spec's parameters, a key given in both is an error",
    )


def _compressor_spec(args: argparse.Namespace) -> CompressorSpec:
    """The one ``--compressor`` spec with the ``--set`` parameters merged into its own."""
    try:
        specs = parse_compressor_specs([args.compressor])
    except ValueError as exc:
        raise ValueError(f"--compressor: {exc}") from exc
    if len(specs) != 1:
        raise ValueError(f"--compressor takes one compressor here, got {len(specs)} in {args.compressor!r}")
    spec, sets = specs[0], parse_params(args.params)
    both = [key for key in spec.params if key in sets]
    if both:
        raise ValueError(f"{', '.join(both)} given both in --compressor {args.compressor} and with --set; give it once")
    return CompressorSpec(spec.name, {**spec.params, **sets})


def _check_choices(args: argparse.Namespace) -> CompressorSpec:
    """Resolve names early: unknown compressor/backend or bad parameters fail before a model is loaded. Returns the
    compressor spec (``--compressor`` and ``--set`` merged)."""
    from kvsieve.integration import resolve_compressor
    from kvsieve.plugins import registry

    spec = _compressor_spec(args)
    resolve_compressor(spec.name, spec.params)
    if args.backend != "auto":
        registry().get("backend", args.backend)
    _dtype(args.dtype)
    return spec


# ---------------------------------------------------------------------------------------------- plugins
def _plugins_table() -> dict[str, list[dict[str, Any]]]:
    """Every kind's rows, then ``problems``: what went wrong with which plugin (imports every plugin)."""
    from kvsieve.plugins import KINDS, registry

    reg = registry()
    reg.load_all()
    table: dict[str, list[dict[str, Any]]] = {}
    for kind in KINDS:
        rows = []
        for entry in reg.entries(kind):
            row: dict[str, Any] = {
                "name": entry.name,
                "distribution": entry.source.distribution,
                "entry_point": entry.source.entry_point,
            }
            if kind == "backend":
                row["available"], row["reason"] = reg.backend_status(entry.name)
            if kind == "compressor":
                row["phases"] = sorted(getattr(entry.obj, "phases", ()))
                parts = getattr(entry.obj, "parts", None)  # a composition preset (kvsieve.composition.Preset)
                if parts is not None:
                    row["parts"] = [str(part) for part in parts]
            rows.append(row)
        table[kind] = rows
    table["problems"] = [problem.as_dict() for problem in reg.problems()]
    return table


def cmd_plugins(args: argparse.Namespace) -> int:
    table = _plugins_table()
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    titles = {"scoring": "Scoring policies", "selection": "Selection policies", "backend": "Backends",
              "compressor": "Compressors"}
    for kind, title in titles.items():
        print(f"{title}:")
        for row in table[kind]:
            extra = ""
            if kind == "backend":
                state = "available" if row["available"] else "unavailable"
                extra = f"  [{state}: {row['reason']}]" if row["reason"] else f"  [{state}]"
            if kind == "compressor" and row["phases"]:
                extra = f"  [{', '.join(row['phases'])}]"
            if "parts" in row:  # a preset: what it is made of
                extra += f"  = {' + '.join(row['parts'])}"
            print(f"  {row['name']:<18} {row['distribution']:<22} {row['entry_point']}{extra}")
    if table["problems"]:
        print("Problems:")
        for problem in table["problems"]:
            print(f"  {problem['kind']:<10} {problem['name']:<18} {problem['distribution']:<22} "
                  f"{problem['entry_point']}: {problem['message']}")
    return 0


# ---------------------------------------------------------------------------------------------- generate
def _prompt_ids(tokenizer, text: str, chat: bool):
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    return tokenizer(text, return_tensors="pt")["input_ids"]


def _run_generate(model, tokenizer, ids, args, compressor: str, params: dict[str, Any]):
    import torch

    from kvsieve.integration import generate

    kwargs: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if getattr(args, "min_new_tokens", None):
        kwargs["min_new_tokens"] = args.min_new_tokens
    if getattr(args, "sample", False):
        torch.manual_seed(args.seed)
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if getattr(args, "fast", False):
        kwargs["fast"] = True  # the static-capacity decode loop (CUDA-graph replay on a GPU), docs/fast-path.md
    ids = ids.to(args.device)
    return generate(model, ids, torch.ones_like(ids), compressor=compressor, backend=args.backend, params=params,
                    **kwargs)


def _preflight(args: argparse.Namespace, spec: CompressorSpec, text: str, chat: bool):
    """Check the compressor against the model's config and the prompt against its context, from the config and
    the tokenizer alone (before the weights load). Returns the prompt's token ids ``[1, L]``."""
    from kvsieve.integration import check_config, resolve_compressor
    from kvsieve.models import preview

    config, tokenizer = preview(args.model)
    check_config(config)
    compressor = resolve_compressor(spec.name, spec.params)
    compressor.check_model(config)
    ids = _prompt_ids(tokenizer, text, chat)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and ids.shape[1] + args.max_new_tokens > limit:
        raise ValueError(
            f"the prompt ({ids.shape[1]} tokens) plus --max-new-tokens {args.max_new_tokens} exceeds the model's "
            f"context (max_position_embeddings={limit})"
        )
    compressor.check_prompt(ids.shape[1])
    return ids


def cmd_generate(args: argparse.Namespace) -> int:
    spec = _check_choices(args)
    if (args.prompt is None) == (args.prompt_file is None):
        raise ValueError("give exactly one of --prompt or --prompt-file")
    if args.min_new_tokens > args.max_new_tokens:
        raise ValueError(f"--min-new-tokens {args.min_new_tokens} exceeds --max-new-tokens {args.max_new_tokens}")
    text = args.prompt if args.prompt is not None else open(args.prompt_file, encoding="utf-8").read()
    from kvsieve.models import load

    ids = _preflight(args, spec, text, args.chat)
    model, tokenizer = load(args.model, dtype=_dtype(args.dtype), device=args.device)
    result = _run_generate(model, tokenizer, ids, args, spec.name, spec.params)
    new_ids = result.sequences[0, result.prompt_tokens :]
    out_text = tokenizer.decode(new_ids, skip_special_tokens=True)
    record = {
        "text": out_text,
        "prompt_tokens": result.prompt_tokens,
        "generated_tokens": result.generated_tokens,
        "kv_lengths": result.kv_lengths,
        "kv_bytes": result.kv_bytes,
        "kv_bytes_peak": result.kv_bytes_peak,
        "tokens_per_s": round(result.tokens_per_s, 3),
        "seconds": round(result.seconds, 3),
        "backend": result.backend,
        "compressor": result.compressor,
        "model": args.model,
    }
    if args.json:
        print(json.dumps(record))
    else:
        print(out_text)
        print(
            f"\n[{result.compressor['name']} on {result.backend}] prompt {result.prompt_tokens} tokens, "
            f"generated {result.generated_tokens}, KV {result.kv_bytes / 2**20:.2f} MiB "
            f"(peak {result.kv_bytes_peak / 2**20:.2f} MiB), {result.tokens_per_s:.1f} tokens/s",
            file=sys.stderr,
        )
    return 0


# ---------------------------------------------------------------------------------------------- demo
DEMO_QUESTION = "What is the secret number mentioned in the text? Answer with the number only."


def demo_prompt(tokens: int, seed: int = 0) -> tuple[str, str]:
    """A long document hiding one secret number (about ``tokens`` tokens), and that number."""
    import random

    rng = random.Random(seed)
    subjects = ["The river", "A small village", "The old library", "Every winter", "The market square",
                "A quiet garden", "The mountain road", "The harbour"]
    verbs = ["was known for", "slowly changed with", "attracted visitors because of", "was often described by"]
    objects = ["its long history", "the morning fog", "a row of tall trees", "the sound of bells",
               "its narrow streets", "the colours of autumn", "a famous bakery", "stone bridges"]
    sentences = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(tokens // 9)]
    secret = rng.randint(10000, 99999)
    sentences.insert(len(sentences) * 2 // 5, f"The secret number is {secret}. Remember it.")
    return " ".join(sentences) + f"\n\n{DEMO_QUESTION}", str(secret)


def cmd_demo(args: argparse.Namespace) -> int:
    spec = _check_choices(args)
    from kvsieve.models import load

    text, secret = demo_prompt(args.prompt_tokens, args.seed)
    ids = _preflight(args, spec, text, chat=True)
    print(f"Loading {args.model} (offline) ...", file=sys.stderr)
    model, tokenizer = load(args.model, dtype=_dtype(args.dtype), device=args.device)
    name, params = spec.name, spec.params
    runs = {}
    for label, comp, comp_params in (("full cache", "none", {}), (name, name, params)):
        print(f"Generating with {label} ...", file=sys.stderr)
        runs[label] = _run_generate(model, tokenizer, ids, args, comp, comp_params)
    full, comp = runs["full cache"], runs[name]
    n = min(full.sequences.shape[1], comp.sequences.shape[1])
    p = full.prompt_tokens
    same = (full.sequences[0, p:n] == comp.sequences[0, p:n]).float()
    agreement = float(same.mean()) if n > p else 1.0
    texts = {k: tokenizer.decode(r.sequences[0, p:], skip_special_tokens=True).strip() for k, r in runs.items()}

    def mib(x: int) -> str:
        return f"{x / 2**20:.2f} MiB"

    rows = [
        ("", "full cache", name),
        ("KV cache at end", mib(full.kv_bytes), mib(comp.kv_bytes)),
        ("KV cache peak", mib(full.kv_bytes_peak), mib(comp.kv_bytes_peak)),
        ("cached tokens/layer", str(max(full.kv_lengths)), str(max(comp.kv_lengths))),
        ("generate wall time", f"{full.seconds:.1f} s", f"{comp.seconds:.1f} s"),
        ("tokens/s (w/ prefill)", f"{full.tokens_per_s:.1f}", f"{comp.tokens_per_s:.1f}"),
        (f"answer has {secret}", str(secret in texts["full cache"]), str(secret in texts[name])),
    ]
    print(f"\nkvsieve demo: {args.model}, prompt {p} tokens, {name} {params or ''} "
          f"on backend {comp.backend}\n")
    for a, b, c in rows:
        print(f"  {a:<22} {b:>14} {c:>18}")
    print(f"  {'output agreement':<22} {'':>14} {agreement:>17.0%}")
    print(f"\n--- full cache ---\n{texts['full cache']}\n\n--- {name} ---\n{texts[name]}")
    return 0


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvsieve", description="KV-cache compression for HuggingFace models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list discovered policies, backends and compressors")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("generate", help="generate text with a compressed KV cache")
    _add_model_args(p, "smollm2")
    _add_compressor_args(p, "none")
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt-file", help="file holding the prompt text")
    p.add_argument("--max-new-tokens", type=size, default=64)
    p.add_argument("--min-new-tokens", type=nonnegative, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=0.7)
    p.add_argument("--top-p", type=unit_float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--fast", action="store_true",
                   help="decode through the fast path (static cache; CUDA-graph replay on a GPU)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="offline demo on SmolLM2: full cache vs a compressor, side by side")
    _add_model_args(p, "smollm2")
    _add_compressor_args(p, "fastkv")
    p.add_argument("--prompt-tokens", type=size, default=1500, help="approximate prompt length (1500)")
    p.add_argument("--max-new-tokens", type=size, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    from kvsieve.evaluation.cli import register as register_eval

    register_eval(sub)
    from kvsieve.bench.cli import register as register_bench

    register_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as exc:  # bad input: one line, no traceback
        print(f"kvsieve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
