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
from kvsieve.evaluation.outputs import append_jsonl, run_metadata, write_json
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
    share = Share.from_environment()  # under torchrun: this process's share of prompts (kvsieve.evaluation.sharding)
    if share.shard.sharded and out is None:
        raise ValueError("a sweep split over processes (torchrun) needs an output directory to merge into")
    results_path = share.start(out, "results.jsonl") if out is not None else None
    if out is not None and share.shard.rank == 0:
        with (out / "prompts.jsonl").open("w") as f:
            for prompt in prompts:
                f.write(json.dumps(prompt.to_json()) + "\n")
    device = next(model.parameters()).device
    bar = tqdm(total=len(share.shard.share(prompts)) * len(configs), desc=f"{task} eval", disable=not progress,
               unit="prompt")

    def run_prompt(prompt: Prompt) -> list[dict[str, Any]]:  # prompt-major: a partial run has every configuration
        ids = torch.tensor([prompt.input_ids], device=device)
        records = []
        for config in configs:
            bar.set_postfix_str(f"{config.label} L={prompt.length}", refresh=False)
            record = _run_one(model, tokenizer, prompt, ids, config, backend, max_new_tokens)
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
