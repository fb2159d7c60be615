"""Retrieval sweeps (passkey, needle): every compressor configuration on the same seeded prompts, greedy answers,
exact-match scores.

A sweep writes into one output directory:

* ``prompts.jsonl``: every prompt it ran (text, token ids, key, depth): the input of
  ``benchmarks/kvpress_crosscheck.py``, which runs a peer library on exactly these prompts;
* ``results.jsonl``: one record per (prompt, compressor configuration), written as soon as it is measured;
* ``summary.md``: the markdown tables; ``*.png``: the plots; ``meta.json``: the command, the machine, the versions,
  the start date and the time taken.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from kvsieve import integration, models
from kvsieve.evaluation.configs import CompressorConfig
from kvsieve.evaluation.outputs import append_jsonl, read_jsonl, run_metadata, write_json
from kvsieve.evaluation.report import write_retrieval_report
from kvsieve.evaluation.sharding import Shard, Share
from kvsieve.evaluation.tasks import Prompt, PromptTooLongError, make_prompts, score

__all__ = ["check_fits", "context_limit", "full_cache_tokens", "load_model", "run_retrieval"]


def load_model(name: str, device: str = "auto", dtype: str = "float32"):
    """``(model, tokenizer)`` through :func:`kvsieve.models.load`; ``device="auto"`` picks CUDA when present (this
    process's GPU under torchrun)."""
    device = Shard.from_environment().device(device)
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
    resume: bool = False,
    fast: bool = False,
) -> list[dict[str, Any]]:
    """Run every configuration on the same seeded prompts; greedy answers, exact-match scores.

    Args:
        task: ``"passkey"`` or ``"needle"``.
        configs: from :func:`expand_configs`.
        lengths: prompt lengths in tokens (template and question included).
        depths: needle depths in [0, 1], ``n`` prompts each; None spreads the ``n`` prompts of a length over depths
            ``(i + 0.5) / n``.
        out: the output directory (created); None writes nothing.
        resume: keep the records ``out`` already holds (its ``results.jsonl`` and, in one process, the parts of a
            sharded run that stopped before merging) and run only the (prompt, configuration) pairs they lack; the
            kept records (of any configuration) stay in the output. Under torchrun it reads ``results.jsonl`` only
            (the processes empty their parts as they start): concatenate a stopped run's parts into it first.
        fast: answer through the fast path (``kvsieve.generate(..., fast=True)``: static cache, fused decoder
            layers, CUDA graphs on a GPU); the records say so (``"fast": true``).

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
    share = Share.from_environment()  # under torchrun: this process's share of prompts (kvsieve.evaluation.sharding)
    if share.shard.sharded and out is None:
        raise ValueError("a sweep split over processes (torchrun) needs an output directory to merge into")
    if resume and out is None:
        raise ValueError("resume=True needs the output directory of the run to resume")
    earlier = _earlier_records(out, share.shard.sharded, prompts) if resume else {}
    results_path = share.start(out, "results.jsonl") if out is not None else None
    kept_first = [] if share.shard.sharded else [r for records in earlier.values() for r in records]
    for record in kept_first:  # one process: the kept records first, so a run stopped again loses none of them
        append_jsonl(results_path, record)
    if out is not None and share.shard.rank == 0:
        with (out / "prompts.jsonl").open("w") as f:
            for prompt in prompts:
                f.write(json.dumps(prompt.to_json()) + "\n")
    device = next(model.parameters()).device
    bar = tqdm(total=len(share.shard.share(prompts)) * len(configs), desc=f"{task} eval", disable=not progress,
               unit="prompt")

    def run_prompt(prompt: Prompt) -> list[dict[str, Any]]:  # prompt-major: a partial run has every configuration
        ids = torch.tensor([prompt.input_ids], device=device)
        kept = earlier.get(prompt.id, [])
        records = list(kept) if share.shard.sharded else []  # sharded: kept records travel with their prompt's unit
        for record in records:
            append_jsonl(results_path, record)
        done = {r["compressor"] for r in kept}
        for config in configs:
            if config.label in done:
                bar.update()
                continue
            bar.set_postfix_str(f"{config.label} L={prompt.length}", refresh=False)
            record = _run_one(model, tokenizer, prompt, ids, config, backend, max_new_tokens, fast)
            record.update(model=model_name, seed=seed)
            records.append(record)
            if results_path is not None:
                append_jsonl(results_path, record)
            bar.update()
        return records

    share.run(prompts, run_prompt)
    bar.close()
    records = share.finish(out, "results.jsonl")
    if records is None:
        return share.records  # another rank merges and reports
    records = kept_first + records
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
        if share.shard.sharded:
            meta["processes"] = share.shard.world
        write_json(out / "meta.json", meta)
        write_retrieval_report(out, records, budget_param, meta)
    return records


def _earlier_records(out: Path, sharded: bool, prompts: Sequence[Prompt]) -> dict[str, list[dict[str, Any]]]:
    """The records a resumed run keeps, by prompt id (the first record of each (prompt, configuration) pair).

    Raises:
        ValueError: a record is of a prompt this run does not make (another task, filler, template, length, depth
            or seed), so resuming would mix two sweeps.
    """
    merged = out / "results.jsonl"
    paths = [merged] if merged.is_file() else []
    if not sharded:  # in one process nothing else writes here: a stopped sharded run's parts count too
        paths += sorted(out.glob("results.rank*.jsonl"))
    prompts_by_id = {p.id: p for p in prompts}
    kept: dict[str, list[dict[str, Any]]] = {}
    seen = set()
    for record in (r for path in paths for r in read_jsonl(path)):
        prompt = prompts_by_id.get(record["prompt_id"])
        if prompt is None or record.get("template") != prompt.template:
            raise ValueError(
                f"--resume: {out} holds a record of prompt {record['prompt_id']!r} (template "
                f"{record.get('template')!r}), which this run does not make; resume with the task, lengths, depths, "
                "n, seed, filler and template of the run that wrote it, or use another --out"
            )
        key = (record["prompt_id"], record["compressor"])
        if key not in seen:
            seen.add(key)
            kept.setdefault(record["prompt_id"], []).append(record)
    return kept


def _run_one(
    model, tokenizer, prompt: Prompt, ids: torch.Tensor, config: CompressorConfig, backend: str, max_new_tokens: int,
    fast: bool = False,
) -> dict[str, Any]:
    result = integration.generate(
        model,
        ids,
        compressor=config.name,
        params=config.params,
        backend=backend,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        **({"fast": True} if fast else {}),
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
        **({"fast": True} if fast else {}),
    }
