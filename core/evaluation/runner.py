"""Sweeps over compressors x budgets x context lengths x depths, and their outputs.

A sweep writes into one output directory:

* ``prompts.jsonl``: every prompt it ran (text, token ids, key, depth): the input of
  ``benchmarks/kvpress_crosscheck.py``, which runs a peer library on exactly these prompts;
* ``results.jsonl``: one record per (prompt, compressor configuration), written as soon as it is measured;
* ``summary.md``: the markdown tables; ``*.png``: the plots; ``meta.json``: the command, the machine, the versions,
  the start date and the time taken.

Compressors are named as registered (``kvsieve plugins``) and configured with plain keyword parameters, so a
new compressor plugs in by name with nothing special-cased here: ``--budgets`` sweeps the parameter named by
``budget_param`` (default ``ratio``) on every compressor that has it, and runs the others (``none``) once.
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from kvsieve import integration, models
from kvsieve.params import parse_value
from kvsieve.evaluation.scoring import key_prefix
from kvsieve.evaluation.tasks import Prompt, PromptTooLongError, make_prompts, score
from kvsieve.plugins import registry

__all__ = [
    "CompressorConfig",
    "check_fits",
    "expand_configs",
    "load_model",
    "parse_sets",
    "report",
    "run_retrieval",
    "write_json",
]


# ---------------------------------------------------------------------------------------------- configs
def parse_sets(items: Iterable[str]) -> dict[str | None, dict[str, Any]]:
    """``["window=8", "snapkv.kernel=5"]`` -> ``{None: {"window": 8}, "snapkv": {"kernel": 5}}``.

    Unscoped parameters go to every compressor that has them; ``name.key=value`` to compressor ``name`` only.
    """
    sets: dict[str | None, dict[str, Any]] = defaultdict(dict)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value or compressor.key=value, got {item!r}")
        # the first dot splits the scope off: "fastkv+rpc.rpc.interval" -> scope "fastkv+rpc", "rpc.interval"
        scope, _, name = key.strip().partition(".") if "." in key else ("", "", key.strip())
        sets[scope or None][name] = parse_value(value)
    return dict(sets)


def _accepted_params(name: str) -> set[str] | None:
    """Keyword parameters the registered compressor ``name`` accepts (None: any, it takes ``**kwargs``)."""
    if "+" in name and name not in registry().names("compressor"):
        return None  # an ad-hoc composition "a+b": its parts check their parameters when it is built
    factory = registry().get("compressor", name).obj
    parameters = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


@attrs.frozen
class CompressorConfig:
    """One compressor configuration of a sweep: a registered name and its keyword parameters.

    Attributes:
        name: the registered compressor name.
        params: its parameters, the swept budget included.
        budget: the swept budget value (None for a configuration outside the budget sweep, e.g. ``none``).
    """

    name: str
    params: dict[str, Any] = attrs.field(factory=dict)
    budget: float | None = None

    @property
    def label(self) -> str:
        """``snapkv(ratio=0.2,window=8)``; just the name when there are no parameters."""
        if not self.params:
            return self.name
        return f"{self.name}({','.join(f'{k}={v}' for k, v in sorted(self.params.items()))})"

    def build(self):
        """The compressor instance (validates the parameters)."""
        return integration.resolve_compressor(self.name, self.params)


def expand_configs(
    names: Sequence[str],
    sets: dict[str | None, dict[str, Any]] | None = None,
    budgets: Sequence[float] | None = None,
    budget_param: str = "ratio",
) -> list[CompressorConfig]:
    """Every configuration of a sweep, each built once so a bad parameter fails before any model work.

    Args:
        names: registered compressor names.
        sets: parameters from :func:`parse_sets`.
        budgets: values swept over ``budget_param`` on each compressor that has that parameter.
        budget_param: the parameter ``budgets`` sets.

    Raises:
        ValueError: an unknown compressor, a parameter no selected compressor takes, a budget given both ways,
            or a parameter value the compressor rejects.
    """
    sets = dict(sets or {})
    unknown_scopes = set(sets) - {None} - set(names)
    if unknown_scopes:
        raise ValueError(f"--set names compressors that are not selected: {', '.join(sorted(unknown_scopes))}")
    configs: list[CompressorConfig] = []
    used: set[str] = set()
    for name in dict.fromkeys(names):  # unique, in order
        accepted = _accepted_params(name)
        takes = (lambda key: True) if accepted is None else accepted.__contains__  # noqa: E731
        params = {k: v for k, v in sets.get(None, {}).items() if takes(k)}
        used.update(params)
        for key in sets.get(name, {}):
            if not takes(key):
                raise ValueError(f"compressor {name!r} has no parameter {key!r} (it takes: {sorted(accepted)})")
        params.update(sets.get(name, {}))
        if budgets and takes(budget_param):
            if budget_param in params:
                raise ValueError(f"{name}: {budget_param} is set with --set and swept with --budgets; choose one")
            variants = [CompressorConfig(name, {**params, budget_param: b}, b) for b in budgets]
        else:
            variants = [CompressorConfig(name, params)]
        for config in variants:
            try:
                config.build()
            except (TypeError, ValueError) as exc:
                raise ValueError(f"invalid configuration {config.label}: {exc}") from exc
        configs.extend(variants)
    unused = set(sets.get(None, {})) - used
    if unused:
        raise ValueError(f"no selected compressor takes the parameter(s) {', '.join(sorted(unused))}")
    return configs


# ---------------------------------------------------------------------------------------------- model
def load_model(name: str, device: str = "auto", dtype: str = "float32"):
    """``(model, tokenizer)`` through :func:`kvsieve.models.load`; ``device="auto"`` picks CUDA when present."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return models.load(name, dtype=getattr(torch, dtype), device=device)


def context_limit(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_fits(model, lengths: Iterable[int], extra_tokens: int) -> None:
    """Refuse, before any work, prompt lengths that with ``extra_tokens`` more exceed the model's context.

    Raises:
        PromptTooLongError: naming the offending lengths and the limit.
    """
    limit = context_limit(model)
    if limit is None:
        return
    too_long = sorted(length for length in set(lengths) if length + extra_tokens > limit)
    if too_long:
        raise PromptTooLongError(
            f"prompt length(s) {', '.join(map(str, too_long))} plus {extra_tokens} tokens to generate exceed the "
            f"model's context of {limit} tokens (max_position_embeddings); use lengths up to {limit - extra_tokens}"
        )


# ---------------------------------------------------------------------------------------------- outputs
def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + "\n")


def start_jsonl(out: Path | None, name: str) -> Path | None:
    """``out / name``, emptied for :func:`append_jsonl`, creating ``out``; None when ``out`` is None (write nothing)."""
    if out is None:
        return None
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.unlink(missing_ok=True)
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cpu_name() -> str:
    """The processor's model name (Linux: from /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_metadata(argv: Sequence[str] | None, model_name: str, backend: str, device) -> dict[str, Any]:
    import transformers

    return {
        "command": shlex.join(["kvsieve", *(sys.argv[1:] if argv is None else argv)]),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "model": model_name,
        "backend": backend,
        "device": str(device),
        "machine": f"{platform.node()} {platform.machine()} {_cpu_name()}".strip(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _fmt_acc(values: list[bool]) -> str:
    return f"{100 * sum(values) / len(values):.0f}% ({sum(values)}/{len(values)})" if values else "-"


def retrieval_tables(records: list[dict[str, Any]], by_depth: bool = False) -> str:
    """Markdown: accuracy per configuration x length; with ``by_depth``, also per depth x length."""
    if not records:
        return "(no results)\n"
    lengths = sorted({r["length"] for r in records})
    labels = list(dict.fromkeys(r["compressor"] for r in records))
    cells: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        cells[r["compressor"], r["length"]].append(r)
    task = records[0]["task"]
    lines = [
        f"Accuracy ({task}, exact match) and the mean share of the prompt's KV kept per layer at the end:",
        "",
        "| compressor | " + " | ".join(f"{n} tok" for n in lengths) + " | KV kept | s/prompt |",
        "|---|" + "---|" * len(lengths) + "---|---|",
    ]
    for label in labels:
        row = [_fmt_acc([r["correct"] for r in cells[label, n]]) for n in lengths]
        rs = [r for n in lengths for r in cells[label, n]]
        kept = statistics.mean(r["kv_fraction"] for r in rs)
        secs = statistics.mean(r["seconds"] for r in rs)
        lines.append(f"| {label} | " + " | ".join(row) + f" | {100 * kept:.0f}% | {secs:.2f} |")
    lines += [
        "",
        "Partial credit: mean share of the key reproduced before the first wrong digit or word:",
        "",
        "| compressor | " + " | ".join(f"{n} tok" for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for label in labels:
        row = [
            f"{100 * statistics.mean(key_prefix(r['task'], r['answer'], r['key']) for r in cells[label, n]):.0f}%"
            if cells[label, n]
            else "-"
            for n in lengths
        ]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    depths = sorted({r["depth"] for r in records})
    if by_depth and len(depths) > 1:
        lines += ["", "Accuracy per depth (rows) and length (columns):", ""]
        for label in labels:
            lines += [
                f"`{label}`",
                "",
                "| depth | " + " | ".join(f"{n}" for n in lengths) + " |",
                "|---|" + "---|" * len(lengths),
            ]
            for depth in depths:
                row = [_fmt_acc([r["correct"] for r in cells[label, n] if r["depth"] == depth]) for n in lengths]
                lines.append(f"| {depth:g} | " + " | ".join(row) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_budget(records: list[dict[str, Any]], path: Path, budget_param: str) -> Path | None:
    """One panel per context length: accuracy against the budget, a line per compressor; configurations without a
    budget (the full cache) as dashed horizontal lines."""
    if not records:
        return None
    plt = _pyplot()
    lengths = sorted({r["length"] for r in records})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.4), squeeze=False, sharey=True)
    for ax, length in zip(axes[0], lengths):
        rows = [r for r in records if r["length"] == length]
        by_line: dict[str, dict[Any, list[bool]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            line = r["compressor_name"] if r["budget"] is not None else r["compressor"]
            by_line[line][r["budget"]].append(r["correct"])
        for line, points in by_line.items():
            if None in points:
                acc = sum(points[None]) / len(points[None])
                ax.axhline(acc, linestyle="--", color="gray", label=f"{line} ({100 * acc:.0f}%)")
                continue
            xs = sorted(points)
            ax.plot(xs, [sum(points[x]) / len(points[x]) for x in xs], marker="o", label=line)
        ax.set_title(f"{rows[0]['task']}, {length} tokens")
        ax.set_xlabel(budget_param)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_depth_heatmap(records: list[dict[str, Any]], path: Path) -> Path | None:
    """A depth x length heat map of accuracy per configuration (the needle-in-a-haystack picture)."""
    depths = sorted({r["depth"] for r in records})
    lengths = sorted({r["length"] for r in records})
    if len(depths) < 2:
        return None
    plt = _pyplot()
    labels = list(dict.fromkeys(r["compressor"] for r in records))
    fig, axes = plt.subplots(
        1,
        len(labels),
        figsize=(1.2 + 1.1 * len(lengths) * len(labels) + 0.8 * len(labels), 0.45 * len(depths) + 1.6),
        squeeze=False,
    )
    image = None
    for ax, label in zip(axes[0], labels):
        grid = []
        for depth in depths:
            row = []
            for length in lengths:
                hits = [
                    r["correct"]
                    for r in records
                    if r["compressor"] == label and r["depth"] == depth and r["length"] == length
                ]
                row.append(sum(hits) / len(hits) if hits else float("nan"))
            grid.append(row)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
        ax.set_xlabel("prompt tokens")
        ax.set_title(label, fontsize=8)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy", shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- retrieval
def full_cache_tokens(prompt_tokens: int, generated_tokens: int) -> int:
    """Tokens a full cache holds after generating: the last generated token is never fed back."""
    return prompt_tokens + max(generated_tokens - 1, 0)


def _answer(tokenizer, sequence: torch.Tensor, prompt_len: int) -> str:
    return tokenizer.decode(sequence[prompt_len:], skip_special_tokens=True)


def run_retrieval(
    task: str,
    model,
    tokenizer,
    configs: Sequence[CompressorConfig],
    *,
    lengths: Sequence[int],
    depths: Sequence[float] | None,
    n: int,
    seed: int = 0,
    filler: str = "essays",
    template: str = "auto",
    backend: str = "auto",
    max_new_tokens: int = 12,
    out: Path | None = None,
    model_name: str = "",
    budget_param: str = "ratio",
    argv: Sequence[str] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every configuration on the same seeded prompts; greedy answers, exact-match scores.

    Args:
        task: ``"passkey"`` or ``"needle"``.
        configs: from :func:`expand_configs`.
        lengths: prompt lengths in tokens (template and question included).
        depths: needle depths in [0, 1], ``n`` prompts each; None spreads the ``n`` prompts of a length over depths
            ``(i + 0.5) / n``.
        out: the output directory (created); None writes nothing.

    Returns:
        the result records (also in ``out/results.jsonl``).

    Raises:
        PromptTooLongError: a length (plus ``max_new_tokens``) does not fit in the model's context.
    """
    from tqdm.auto import tqdm

    check_fits(model, lengths, max_new_tokens)
    started = time.perf_counter()
    meta = run_metadata(argv, model_name, backend, next(model.parameters()).device)
    prompts = make_prompts(
        tokenizer,
        task,
        list(lengths),
        list(depths) if depths is not None else None,
        n,
        seed=seed,
        filler=filler,
        template=template,
        progress=progress,
    )
    results_path = start_jsonl(out, "results.jsonl")
    if out is not None:
        with (out / "prompts.jsonl").open("w") as f:
            for prompt in prompts:
                f.write(json.dumps(prompt.to_json()) + "\n")
    device = next(model.parameters()).device
    records = []
    bar = tqdm(total=len(prompts) * len(configs), desc=f"{task} eval", disable=not progress, unit="prompt")
    for prompt in prompts:  # prompt-major: a partial run has every configuration on the first prompts
        ids = torch.tensor([prompt.input_ids], device=device)
        for config in configs:
            bar.set_postfix_str(f"{config.label} L={prompt.length}", refresh=False)
            record = _run_one(model, tokenizer, prompt, ids, config, backend, max_new_tokens)
            record.update(model=model_name, seed=seed)
            records.append(record)
            if results_path is not None:
                append_jsonl(results_path, record)
            bar.update()
    bar.close()
    if out is not None:
        meta["seconds"] = round(time.perf_counter() - started, 1)
        meta.update(
            task=task,
            lengths=list(lengths),
            depths=depths,
            n=n,
            seed=seed,
            filler=filler,
            template=prompts[0].template if prompts else template,
            configs=[c.label for c in configs],
            budget_param=budget_param,
        )
        write_json(out / "meta.json", meta)
        write_retrieval_report(out, records, budget_param, meta)
    return records


def _run_one(
    model, tokenizer, prompt: Prompt, ids: torch.Tensor, config: CompressorConfig, backend: str, max_new_tokens: int
) -> dict[str, Any]:
    result = integration.generate(
        model,
        ids,
        compressor=config.name,
        params=config.params,
        backend=backend,
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    answer = _answer(tokenizer, result.sequences[0], result.prompt_tokens)
    kv_tokens = statistics.mean(result.kv_lengths)
    return {
        "task": prompt.task,
        "prompt_id": prompt.id,
        "filler": prompt.filler,
        "template": prompt.template,
        "length": prompt.length,
        "prompt_tokens": result.prompt_tokens,
        "depth": prompt.depth,
        "needle_depth": round(prompt.needle_depth, 4),
        "index": prompt.index,
        "key": prompt.key,
        "answer": answer,
        "correct": score(prompt.task, answer, prompt.key),
        "compressor": config.label,
        "compressor_name": config.name,
        "params": config.params,
        "budget": config.budget,
        "resolved": result.compressor,
        "backend": result.backend,
        "kv_tokens": kv_tokens,
        "kv_fraction": kv_tokens / full_cache_tokens(result.prompt_tokens, result.generated_tokens),
        "seconds": round(result.seconds, 3),
    }


def write_retrieval_report(out: Path, records: list[dict[str, Any]], budget_param: str, meta: dict[str, Any]) -> None:
    """``summary.md`` and the plots of a retrieval sweep (from records, e.g. re-read from results.jsonl)."""
    by_depth = meta.get("depths") is not None  # explicit depths: a depth x length picture
    plots = [
        p
        for p in (
            plot_accuracy_vs_budget(records, out / "accuracy_vs_budget.png", budget_param),
            plot_depth_heatmap(records, out / "depth_heatmap.png") if by_depth else None,
        )
        if p is not None
    ]
    header = (
        f"# {meta.get('task')} on {meta.get('model')}\n\n"
        f"`{meta.get('command')}`\n\n"
        f"{meta.get('started')}, {meta.get('machine')}, {meta.get('torch_threads')} torch threads, "
        f"{meta.get('seconds')} s; filler {meta.get('filler')}, template {meta.get('template')}, "
        f"seed {meta.get('seed')}, n={meta.get('n')} per cell.\n\n"
    )
    figures = "".join(f"![{p.stem}]({p.name})\n" for p in plots)
    (out / "summary.md").write_text(header + retrieval_tables(records, by_depth) + "\n" + figures)


def report(runs: Sequence[Path], out: Path) -> Path:
    """Redraw the tables and plots of one or more retrieval runs (their ``results.jsonl``) into ``out``, e.g. to
    put the 1K and 2K sweeps of one task side by side. Returns the ``summary.md`` written."""
    records = [r for run in runs for r in read_jsonl(run / "results.jsonl")]
    metas = [json.loads((run / "meta.json").read_text()) for run in runs if (run / "meta.json").is_file()]
    if not records:
        raise ValueError(f"no results in {', '.join(map(str, runs))}")
    tasks = {r["task"] for r in records}
    if len(tasks) > 1:
        raise ValueError(f"runs of different tasks cannot share a report: {', '.join(sorted(tasks))}")
    meta = dict(metas[0]) if metas else {}
    if len(metas) > 1:
        meta["command"] = "` + `".join(m["command"] for m in metas)
        meta["seconds"] = f"{sum(m.get('seconds', 0) for m in metas):.1f} (the sum over {len(metas)} runs)"
    meta["task"] = records[0]["task"]
    out.mkdir(parents=True, exist_ok=True)
    write_retrieval_report(out, records, meta.get("budget_param", "ratio"), meta)
    return out / "summary.md"
