"""Fidelity of decode-time compression: how far a compressed cache drifts from the full one while the model writes.

Every measurement runs the DECODE path: a prefill of a prompt, then one token per forward through the
:class:`~kvsieve.cache.SieveCache` inside :func:`kvsieve.integration.apply`, so decode-time compressors (RPC) act
exactly as during generation. Each is compared with the full cache (``none``) on the same tokens.

* ``nll`` (teacher-forced): a prompt, then a long reference continuation (essay text, >= 2K tokens by default) fed
  token by token; the mean NLL / perplexity of the continuation and its increase over the full cache, also per
  segment of the continuation (where along the way the damage happens).
* ``free`` (free-running): greedy generation with and without compression from the same prompt; the share of
  positions where both wrote the same token and the first position where they differ.
* ``retrieval``: the passkey task with its haystack fed through the decode path (teacher-forced, as if the model had
  written it), then the question, then a greedy answer: retrieval from the generated region, which is what RPC
  must preserve. Only the prompt's first ``prefill_tokens`` are prefilled, so a prefill-time compressor that
  selects by the prompt's last tokens (SnapKV, FastKV) selects before the question exists.
* ``reasoning`` (retrieval after a long reasoning): the long-context reasoning scenario. The WHOLE passkey prompt
  (chat-templated, haystack, needle and question, ending with the answer prefix, exactly as ``eval passkey`` builds
  it) is prefilled, so a prefill-time compressor (FastKV, SnapKV) selects with the question in its window. Then
  ``reasoning_tokens`` tokens of filler text (the prompt's filler source, never holding the key) go through the
  decode path one token per forward, teacher-forced as if the model had written them, so a decode-time compressor
  (RPC) compresses them as it would compress a chain of thought. Then a short re-ask in plain text
  (:data:`REASK`, e.g. ``"\n\nSo, the secret number is"``), also decoded, and a greedy answer scored like
  ``eval passkey``. The needle must survive both phases: the prefill selection and the compressions of the
  reasoning.
* ``copy`` (repeat-copy NLL): a passage, filler, the same passage again, all through the decode path; a low NLL on
  the repeat means the tokens needed to copy it survived compression. The NLL of the passage's first occurrence
  (where no copy is possible) is reported beside it.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from kvsieve import integration
from kvsieve.evaluation.configs import CompressorConfig
from kvsieve.evaluation.outputs import append_jsonl, run_metadata, write_json
from kvsieve.evaluation.report import plot_accuracy_vs_budget, pyplot, retrieval_tables
from kvsieve.evaluation.retrieval import check_fits, full_cache_tokens
from kvsieve.evaluation.sharding import Share
from kvsieve.evaluation.tasks import filler_text, make_prompts, score

__all__ = ["MODES", "REASK", "StreamResult", "decode_stream", "reasoning_stream", "run_fidelity", "token_agreement"]

MODES = ("nll", "free", "retrieval", "copy", "reasoning")
RETRIEVAL_MODES = ("retrieval", "reasoning")  # passkey records: scored, tabulated and plotted alike
BASELINE = CompressorConfig("none")
COPY_HEADER = "Here is a passage, then some other text, then the same passage again.\n\n"
REASK = "\n\nSo, {answer_prefix}"  # ``reasoning``: after the reasoning, the answer prefix again ("So, the secret ...")


@attrs.frozen
class StreamResult:
    """What :func:`decode_stream` measured.

    Attributes:
        nll: ``-log p(stream[i] | prompt, stream[:i])`` for every stream token (nats).
        generated: greedy tokens written after the stream.
        kv_lengths: physical cached tokens per layer at the end.
        seconds: wall time.
    """

    nll: list[float]
    generated: list[int]
    kv_lengths: list[int]
    seconds: float


def decode_stream(
    model,
    prompt_ids: Sequence[int],
    stream_ids: Sequence[int],
    config: CompressorConfig = BASELINE,
    backend: str = "auto",
    *,
    generate_tokens: int = 0,
    eos_token_id: int | None = None,
    progress: str | None = None,
) -> StreamResult:
    """Prefill ``prompt_ids``, then feed ``stream_ids`` one token per forward (teacher-forced), then write
    ``generate_tokens`` greedy tokens (stopping at ``eos_token_id``), all through one compressed cache.

    Args:
        config: the compressor configuration.
        progress: a progress-bar label (None: no bar).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    cache_kw = integration.cache_kwarg(model)
    nll: list[float] = []
    generated: list[int] = []
    start = time.perf_counter()
    with integration.apply(model, config.name, backend, params=config.params) as engine, torch.inference_mode():
        logits = model(
            input_ids=torch.tensor([list(prompt_ids)], device=device), use_cache=True, logits_to_keep=1
        ).logits[0, -1]
        cache = engine.last_cache

        def step(token: int) -> torch.Tensor:
            ids = torch.tensor([[token]], device=device)
            return model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kw: cache}).logits[0, -1]

        bar = tqdm(
            total=len(stream_ids) + generate_tokens, desc=progress, disable=progress is None, leave=False, unit="tok"
        )
        for i, token in enumerate(stream_ids):
            nll.append(-float(torch.log_softmax(logits.float(), dim=-1)[token]))
            if i + 1 < len(stream_ids) or generate_tokens:  # the last token is fed only to answer after it
                logits = step(token)
            bar.update()
        for _ in range(generate_tokens):
            token = int(logits.argmax())
            generated.append(token)
            bar.update()
            if token == eos_token_id or len(generated) == generate_tokens:
                break
            logits = step(token)
        bar.close()
    return StreamResult(nll, generated, cache.kv_lengths(), time.perf_counter() - start)


def token_agreement(reference: Sequence[int], other: Sequence[int]) -> tuple[float, int | None]:
    """Share of positions (over the reference's length) where ``other`` has the same token, and the first
    position where they differ (None when identical)."""
    if not reference:
        return 1.0, None
    same = [i < len(other) and other[i] == token for i, token in enumerate(reference)]
    first = next((i for i, ok in enumerate(same) if not ok), None)
    if first is None and len(other) != len(reference):
        first = len(reference)
    return sum(same) / len(reference), first


def _essay_tokens(tokenizer, rng: random.Random, count: int, special: bool = False) -> list[int]:
    ids = tokenizer(filler_text("essays", rng, 8 * (count + 64)), add_special_tokens=special)["input_ids"]
    if len(ids) < count:
        raise ValueError(f"could not draw {count} tokens of essay text")
    return list(ids[:count])


def _filler_tokens(tokenizer, filler: str, rng: random.Random, count: int) -> list[int]:
    ids = tokenizer(filler_text(filler, rng, 8 * (count + 64)), add_special_tokens=False)["input_ids"]
    return list(ids[:count])


def _mean(values: Sequence[float]) -> float:
    return float(statistics.fmean(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------------- the sweep
def run_fidelity(
    model,
    tokenizer,
    configs: Sequence[CompressorConfig],
    *,
    modes: Sequence[str] = MODES,
    n: int = 2,
    seed: int = 0,
    lengths: Sequence[int] = (1024,),
    depths: Sequence[float] | None = None,
    prompt_tokens: int = 256,
    continuation_tokens: int = 2048,
    new_tokens: int = 512,
    passage_tokens: int = 128,
    prefill_tokens: int = 16,
    reasoning_tokens: int = 512,
    segment: int = 256,
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
    """Measure every mode for every configuration against the full cache, ``n`` samples each.

    Args:
        modes: a subset of :data:`MODES`.
        lengths: total token lengths of the ``retrieval`` and ``copy`` streams.
        depths: needle depths of ``retrieval`` (None: spread over the ``n`` prompts, as in ``eval passkey``).
        prompt_tokens: prompt length of ``nll`` and ``free``.
        continuation_tokens: teacher-forced tokens of ``nll``; ``new_tokens`` greedy tokens of ``free``.
        passage_tokens: the passage that ``copy`` repeats.
        prefill_tokens: ``retrieval``: the prompt's first tokens go through prefill, the rest through decode.
        reasoning_tokens: ``reasoning``: filler tokens decoded between the prefilled prompt and the re-ask (>= 0).
        segment: ``nll`` is also reported per segment of this many continuation tokens.

    Returns:
        the records (also in ``out/fidelity.jsonl``).

    Raises:
        ValueError: an unknown mode, or ``reasoning_tokens`` < 0.
        PromptTooLongError: a mode's tokens do not fit in the model's context.
    """
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown fidelity mode(s) {', '.join(sorted(unknown))}; known: {', '.join(MODES)}")
    if "nll" in modes:
        check_fits(model, [prompt_tokens + continuation_tokens], 0)
    if "free" in modes:
        check_fits(model, [prompt_tokens + new_tokens], 0)
    if "retrieval" in modes or "copy" in modes:
        check_fits(model, lengths, max_new_tokens)
    if isinstance(reasoning_tokens, bool) or not isinstance(reasoning_tokens, int) or reasoning_tokens < 0:
        raise ValueError(f"reasoning_tokens (--reasoning-tokens) must be an integer >= 0, got {reasoning_tokens!r}")
    if "reasoning" in modes:  # the re-ask is a handful of tokens: 16 leaves room for it
        check_fits(model, [length + reasoning_tokens + 16 for length in lengths], max_new_tokens)
    started = time.perf_counter()
    meta = run_metadata(argv, model_name, backend, next(model.parameters()).device)
    share = Share.from_environment()  # under torchrun: this process's share of the streams (evaluation.sharding)
    if share.shard.sharded and out is None:
        raise ValueError("a sweep split over processes (torchrun) needs an output directory to merge into")
    run = _Run(
        model,
        tokenizer,
        [BASELINE, *[c for c in configs if c != BASELINE]],
        backend,
        progress,
        share.start(out, "fidelity.jsonl") if out is not None else None,
        {"model": model_name, "seed": seed},
    )
    units: list[_Unit] = []  # in the order one process measures them; each runs every configuration
    prompts = None
    for mode in modes:
        if mode in RETRIEVAL_MODES:
            if prompts is None:
                prompts = make_prompts(
                    tokenizer, "passkey", list(lengths), depths, n, seed=seed, filler=filler, template=template
                )
            units += [_Unit(mode, prompt.index, prompt=prompt) for prompt in prompts]
        elif mode == "copy":
            units += [_Unit(mode, sample, length=i) for sample in range(n) for i in range(len(lengths))]
        else:
            units += [_Unit(mode, sample) for sample in range(n)]

    def measure(unit: _Unit) -> list[dict[str, Any]]:
        before = len(run.records)
        rng = random.Random(f"kvsieve-fidelity:{unit.mode}:{seed}:{unit.sample}")
        if unit.mode == "retrieval":
            _measure_retrieval(run, unit.prompt, prefill_tokens, max_new_tokens)
        elif unit.mode == "reasoning":
            _measure_reasoning(run, unit.prompt, reasoning_tokens, filler, max_new_tokens)
        elif unit.mode == "nll":
            _measure_nll(run, rng, unit.sample, prompt_tokens, continuation_tokens, segment)
        elif unit.mode == "free":
            _measure_free(run, rng, unit.sample, prompt_tokens, new_tokens)
        else:  # the sample's streams of every length come from one generator: draw those before this one's
            for length in lengths[: unit.length]:
                _copy_stream(run.tokenizer, rng, length, passage_tokens, filler)
            _measure_copy(run, rng, unit.sample, lengths[unit.length], passage_tokens, filler)
        return run.records[before:]

    share.run(units, measure)
    records = share.finish(out, "fidelity.jsonl")
    if records is None:
        return run.records  # another rank merges and reports
    if out is not None:
        meta["seconds"] = round(time.perf_counter() - started, 1)
        meta.update(
            task="fidelity",
            modes=list(modes),
            n=n,
            seed=seed,
            lengths=list(lengths),
            prompt_tokens=prompt_tokens,
            continuation_tokens=continuation_tokens,
            new_tokens=new_tokens,
            passage_tokens=passage_tokens,
            prefill_tokens=prefill_tokens,
            reasoning_tokens=reasoning_tokens,
            filler=filler,
            configs=[c.label for c in configs],
        )
        if share.shard.sharded:
            meta["processes"] = share.shard.world
        write_json(out / "meta.json", meta)
        write_fidelity_report(out, records, budget_param, meta)
    return records


@attrs.frozen
class _Unit:
    """A unit of a fidelity sweep: a stream (``mode``, ``sample``; ``copy``: the index into ``lengths`` of its
    length; ``retrieval``/``reasoning``: its prompt) measured with every configuration, the full cache first (the
    reference of the others' deltas and agreement)."""

    mode: str
    sample: int
    length: int | None = None
    prompt: Any = None


@attrs.define
class _Run:
    """What every measurement of one :func:`run_fidelity` call shares; ``emit`` collects (and writes) records."""

    model: Any
    tokenizer: Any
    configs: list[CompressorConfig]  # the full cache first: the reference of every comparison
    backend: str
    progress: bool
    path: Path | None
    extra: dict[str, Any]
    records: list[dict[str, Any]] = attrs.field(factory=list)

    def stream(self, label: str, config: CompressorConfig, prompt, stream, **kwargs) -> StreamResult:
        return decode_stream(
            self.model,
            prompt,
            stream,
            config,
            self.backend,
            progress=f"{label} {config.label}" if self.progress else None,
            **kwargs,
        )

    def emit(
        self, mode: str, config: CompressorConfig, sample: int, result: StreamResult | None = None, **fields: Any
    ) -> None:
        record = {
            "mode": mode,
            "sample": sample,
            "compressor": config.label,
            "compressor_name": config.name,
            "params": config.params,
            "budget": config.budget,
        }
        if result is not None:
            record.update(kv_tokens=_mean(result.kv_lengths), seconds=round(result.seconds, 2))
        record.update(fields, **self.extra)
        self.records.append(record)
        if self.path is not None:
            append_jsonl(self.path, record)


def _measure_nll(
    run: _Run, rng: random.Random, sample: int, prompt_tokens: int, continuation_tokens: int, segment: int
) -> None:
    tokens = _essay_tokens(run.tokenizer, rng, prompt_tokens + continuation_tokens, special=True)
    prompt, stream = tokens[:prompt_tokens], tokens[prompt_tokens:]
    reference = None
    for config in run.configs:
        result = run.stream(f"nll #{sample}", config, prompt, stream)
        if reference is None:
            reference = result
        mean = _mean(result.nll)
        run.emit(
            "nll",
            config,
            sample,
            result,
            nll=mean,
            ppl=math.exp(mean),
            delta_nll=mean - _mean(reference.nll),
            tokens=len(stream),
            kv_fraction=_mean(result.kv_lengths) / full_cache_tokens(len(prompt), len(stream)),
            segment_nll=[_mean(result.nll[i : i + segment]) for i in range(0, len(result.nll), segment)],
        )


def _measure_free(run: _Run, rng: random.Random, sample: int, prompt_tokens: int, new_tokens: int) -> None:
    prompt = _essay_tokens(run.tokenizer, rng, prompt_tokens, special=True)
    ids = torch.tensor([prompt], device=next(run.model.parameters()).device)
    reference = None
    for config in run.configs:
        result = integration.generate(
            run.model,
            ids,
            compressor=config.name,
            params=config.params,
            backend=run.backend,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
        written = result.sequences[0, result.prompt_tokens :].tolist()
        reference = written if reference is None else reference
        agreement, first = token_agreement(reference, written)
        kv = _mean(result.kv_lengths)
        run.emit(
            "free",
            config,
            sample,
            agreement=agreement,
            first_divergence=first,
            tokens=len(written),
            kv_tokens=kv,
            kv_fraction=kv / full_cache_tokens(len(prompt), len(written)),
            seconds=round(result.seconds, 2),
        )


def _copy_stream(tokenizer, rng: random.Random, length: int, passage_tokens: int, filler: str):
    """``copy``'s prompt (the header) and stream (passage, filler, passage) of ``length`` tokens, drawn from ``rng``."""
    header = tokenizer(COPY_HEADER, add_special_tokens=True)["input_ids"]
    gap = length - len(header) - 2 * passage_tokens
    if gap < 1:
        raise ValueError(
            f"copy: length {length} leaves no room for filler between two passages of {passage_tokens} tokens"
        )
    passage = _essay_tokens(tokenizer, rng, passage_tokens)
    return header, passage + _filler_tokens(tokenizer, filler, rng, gap) + passage


def _measure_copy(run: _Run, rng: random.Random, sample: int, length: int, passage_tokens: int, filler: str) -> None:
    header, stream = _copy_stream(run.tokenizer, rng, length, passage_tokens, filler)
    repeat = slice(-passage_tokens + 1, None)  # the repeat's first token cannot be predicted: left out
    reference = None
    for config in run.configs:
        result = run.stream(f"copy L={length}", config, header, stream)
        if reference is None:
            reference = result
        repeat_nll = _mean(result.nll[repeat])
        run.emit(
            "copy",
            config,
            sample,
            result,
            length=length,
            repeat_nll=repeat_nll,
            first_nll=_mean(result.nll[1:passage_tokens]),
            delta_repeat_nll=repeat_nll - _mean(reference.nll[repeat]),
            kv_fraction=_mean(result.kv_lengths) / full_cache_tokens(len(header), len(stream)),
        )


def _passkey_fields(run: _Run, prompt, result: StreamResult, fed_tokens: int) -> dict[str, Any]:
    """The record fields of a passkey answer (``retrieval``, ``reasoning``): ``fed_tokens`` went into the cache
    before the answer (prefill and decode)."""
    answer = run.tokenizer.decode(result.generated, skip_special_tokens=True)
    return dict(
        task="passkey",
        prompt_id=prompt.id,
        length=prompt.length,
        prompt_tokens=len(prompt.input_ids),
        depth=prompt.depth,
        needle_depth=round(prompt.needle_depth, 4),
        key=prompt.key,
        answer=answer,
        answer_tokens=len(result.generated),
        correct=score("passkey", answer, prompt.key),
        kv_fraction=_mean(result.kv_lengths) / full_cache_tokens(fed_tokens, len(result.generated)),
    )


def _measure_retrieval(run: _Run, prompt, prefill_tokens: int, max_new_tokens: int) -> None:
    ids = prompt.input_ids
    for config in run.configs:
        result = run.stream(
            prompt.id,
            config,
            ids[:prefill_tokens],
            ids[prefill_tokens:],
            generate_tokens=max_new_tokens,
            eos_token_id=run.tokenizer.eos_token_id,
        )
        run.emit("retrieval", config, prompt.index, result, **_passkey_fields(run, prompt, result, len(ids)))


def reasoning_stream(tokenizer, prompt, reasoning_tokens: int, filler: str = "essays") -> tuple[list[int], list[int]]:
    """What ``reasoning`` decodes after ``prompt``: ``reasoning_tokens`` tokens of ``filler`` text (seeded by the
    prompt's id, starting at a sentence; a draw that holds the key is replaced), and the re-ask tokens
    (:data:`REASK` with the task's answer prefix)."""
    rng = random.Random(f"kvsieve-fidelity:reasoning:{prompt.id}")
    for _ in range(16):
        # a leading space: the text continues the prompt's last line as the model's own words would
        text = " " + filler_text(filler, rng, 8 * (reasoning_tokens + 64))
        reasoning = tokenizer(text, add_special_tokens=False)["input_ids"][:reasoning_tokens]
        if prompt.key not in tokenizer.decode(reasoning):
            break
    else:
        raise ValueError(f"could not draw {reasoning_tokens} tokens of {filler} text without the key {prompt.key}")
    if len(reasoning) < reasoning_tokens:
        raise ValueError(f"could not draw {reasoning_tokens} tokens of {filler} text")
    reask = tokenizer(REASK.format(answer_prefix=_lower_first(prompt.answer_prefix)), add_special_tokens=False)
    return reasoning, list(reask["input_ids"])


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _measure_reasoning(run: _Run, prompt, reasoning_tokens: int, filler: str, max_new_tokens: int) -> None:
    eos = run.tokenizer.eos_token_id
    reasoning, reask = reasoning_stream(run.tokenizer, prompt, reasoning_tokens, filler)
    ids = prompt.input_ids
    for config in run.configs:
        result = run.stream(prompt.id, config, ids, reasoning + reask, generate_tokens=max_new_tokens, eos_token_id=eos)
        run.emit(
            "reasoning",
            config,
            prompt.index,
            result,
            **_passkey_fields(run, prompt, result, len(ids) + len(reasoning) + len(reask)),
            reasoning_tokens=len(reasoning),
            reask_tokens=len(reask),
            decoded_tokens=len(reasoning) + len(reask),
            reasoning_nll=_mean(result.nll[: len(reasoning)]) if reasoning else None,
        )


# ---------------------------------------------------------------------------------------------- report
RETRIEVAL_TITLES = {  # formatted with the mode's first record
    "retrieval": "Passkey retrieval with the haystack fed through the decode path:",
    "reasoning": "Passkey retrieval after a long reasoning: the whole prompt prefilled, then {reasoning_tokens} "
    "filler tokens and the re-ask ({reask_tokens} tokens) fed through the decode path:",
}


def fidelity_tables(records: list[dict[str, Any]]) -> str:
    """Markdown tables, one per mode present in ``records``."""
    out: list[str] = []
    labels = list(dict.fromkeys(r["compressor"] for r in records))

    def rows(mode: str, label: str, **match: Any) -> list[dict[str, Any]]:
        return [
            r
            for r in records
            if r["mode"] == mode and r["compressor"] == label and all(r.get(k) == v for k, v in match.items())
        ]

    if any(r["mode"] == "nll" for r in records):
        out += [
            "Teacher-forced continuation (decode path), mean over samples:",
            "",
            "| compressor | NLL | perplexity | ΔNLL vs full | KV kept at end | s |",
            "|---|---|---|---|---|---|",
        ]
        for label in labels:
            rs = rows("nll", label)
            if rs:
                out.append(
                    f"| {label} | {_mean([r['nll'] for r in rs]):.4f} | {_mean([r['ppl'] for r in rs]):.3f} "
                    f"| {_mean([r['delta_nll'] for r in rs]):+.4f} "
                    f"| {100 * _mean([r['kv_fraction'] for r in rs]):.0f}% "
                    f"| {_mean([r['seconds'] for r in rs]):.0f} |"
                )
        out.append("")
    if any(r["mode"] == "free" for r in records):
        out += [
            "Free-running greedy generation against the full cache's:",
            "",
            "| compressor | token agreement | first divergence | KV kept at end |",
            "|---|---|---|---|",
        ]
        for label in labels:
            rs = rows("free", label)
            if rs:
                firsts = ", ".join("never" if r["first_divergence"] is None else str(r["first_divergence"]) for r in rs)
                out.append(
                    f"| {label} | {100 * _mean([r['agreement'] for r in rs]):.1f}% | {firsts} "
                    f"| {100 * _mean([r['kv_fraction'] for r in rs]):.0f}% |"
                )
        out.append("")
    for mode, title in RETRIEVAL_TITLES.items():
        rs = [r for r in records if r["mode"] == mode]
        if rs:
            out += [title.format(**rs[0]), "", retrieval_tables(rs, by_depth=True)]
    if any(r["mode"] == "copy" for r in records):
        lengths = sorted({r["length"] for r in records if r["mode"] == "copy"})
        out += [
            "Repeat-copy NLL (passage, filler, passage; all decoded): NLL of the repeat (first occurrence):",
            "",
            "| compressor | " + " | ".join(f"{n} tok" for n in lengths) + " |",
            "|---|" + "---|" * len(lengths),
        ]
        for label in labels:
            cells = []
            for length in lengths:
                rs = rows("copy", label, length=length)
                cells.append(
                    f"{_mean([r['repeat_nll'] for r in rs]):.3f} ({_mean([r['first_nll'] for r in rs]):.3f})"
                    if rs
                    else "-"
                )
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out) + "\n"


def plot_segment_nll(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Mean NLL per continuation segment, a line per configuration."""
    rows = [r for r in records if r["mode"] == "nll"]
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    segment = max(1, rows[0]["tokens"] // max(1, len(rows[0]["segment_nll"])))
    for label in dict.fromkeys(r["compressor"] for r in rows):
        curves = [r["segment_nll"] for r in rows if r["compressor"] == label]
        ys = [_mean(values) for values in zip(*curves)]
        ax.plot([segment * (i + 0.5) for i in range(len(ys))], ys, marker=".", label=label)
    ax.set_xlabel("continuation token")
    ax.set_ylabel("mean NLL per segment (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_fidelity_report(out: Path, records: list[dict[str, Any]], budget_param: str, meta: dict[str, Any]) -> None:
    plots = [plot_segment_nll(records, out / "fidelity_nll.png")]
    for mode, name in (("retrieval", "decode_retrieval.png"), ("reasoning", "reasoning_retrieval.png")):
        rs = [r for r in records if r["mode"] == mode]
        plots.append(plot_accuracy_vs_budget(rs, out / name, budget_param) if rs else None)
    plots = [p for p in plots if p is not None]
    header = (
        f"# fidelity on {meta.get('model')}\n\n`{meta.get('command')}`\n\n"
        f"{meta.get('started')}, {meta.get('machine')}, {meta.get('torch_threads')} torch threads, "
        f"{meta.get('seconds')} s; seed {meta.get('seed')}, n={meta.get('n')}.\n\n"
    )
    figures = "".join(f"![{p.stem}]({p.name})\n" for p in plots)
    (out / "summary.md").write_text(header + fidelity_tables(records) + "\n" + figures)
