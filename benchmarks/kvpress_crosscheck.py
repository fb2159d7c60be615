"""Cross-check kvsieve against a peer library: kvpress's presses on the very same passkey/needle prompts.

Optional and run by hand: kvpress 0.5.5 needs transformers<5.3 while kvsieve needs >=5.17, so this script runs in
kvpress's own virtual environment and never imports kvsieve. It reads the ``prompts.jsonl`` (token ids included)
that ``kvsieve eval passkey|needle`` wrote, so both libraries see identical tokens, scores the answers with
kvsieve's own ``core/evaluation/scoring.py`` (loaded by path: standard library only), and tabulates kvsieve's
accuracy (from the ``results.jsonl`` beside the prompts, on the same prompt ids) next to kvpress's, with Wilson 95%
intervals (``benchmarks/intervals.py``, loaded by path too).

Setup (once)::

    python -m venv /tmp/kvpress-venv
    /tmp/kvpress-venv/bin/pip install torch==2.13.0            # first: the CPU wheel
    /tmp/kvpress-venv/bin/pip install kvpress==0.5.5 'transformers<5.3'

Run (the model is the safetensors copy kvsieve converted from the GGUF: ``kvsieve.models.smollm2_cache_dir()``,
by default ``~/.cache/kvsieve/models/smollm2``)::

    kvsieve eval passkey --compressor none,snapkv --budgets 0.1,0.2,0.5 --lengths 1K --n 8 --out runs/passkey-1k
    /tmp/kvpress-venv/bin/python benchmarks/kvpress_crosscheck.py runs/passkey-1k --ratios 0.1,0.2,0.5

    # several runs (cells) and presses; results and table in one directory; --resume continues a stopped run
    /tmp/kvpress-venv/bin/python benchmarks/kvpress_crosscheck.py runs/passkey-*-1K runs/needle-*-1K \\
        --presses snapkv,tova,streamingllm,knorm,expected_attention,adakv --ratios 0.1,0.2 --threads 1 \\
        --out runs/kvpress --resume --time-budget 3000
    /tmp/kvpress-venv/bin/python benchmarks/kvpress_crosscheck.py runs/*-1K --out runs/kvpress --report-only

Presses (``--presses``, default ``snapkv``), each built with ``compression_ratio = 1 - ratio`` (kvsieve's ``ratio``
is the share KEPT; kvpress's ``compression_ratio`` the share REMOVED):

* ``snapkv``: ``SnapKVPress(window_size=--window, kernel_size=--kernel)``, kvsieve's SnapKV defaults (32, 7);
* ``tova``: ``TOVAPress()``;
* ``streamingllm``: ``StreamingLLMPress(n_sink=--n-sink)`` (4, kvpress's default);
* ``knorm``: ``KnormPress()``;
* ``expected_attention``: ``ExpectedAttentionPress()`` with kvpress's defaults (512 future positions, 4 sinks,
  covariance and value norms on);
* ``adakv``: ``AdaKVPress(SnapKVPress(window, kernel), alpha_safeguard=0.2)``: head-wise budgets over SnapKV's
  scores. AdaKV masks the evicted keys (kvpress patches the attention functions) instead of removing them, so
  its cache keeps every position; ``kept_tokens`` then counts the unmasked ones (layer 0, mean over KV heads).

Two protocols (``--protocol``):

* ``whole`` (default; kvsieve's protocol): kvpress compresses the prompt up to its last token, the question
  included, so SnapKV's observation window holds the question, as in kvsieve's ``snapkv``; the last token is then
  fed uncompressed and the answer decoded greedily.
* ``context`` (kvpress's own pipeline protocol): only the tokens up to the end of the haystack are compressed;
  the question and the answer prefix follow uncompressed, so the window cannot see the question.

Output: one JSON line per (prompt, press, ratio, protocol) and the uncompressed baseline, appended as each run
ends (so a stopped run keeps what it did), and a markdown report: per (task, filler, template, length) cell and
kept ratio, correct/n of kvsieve's configs and of every press on the same prompts, kvsieve's ``--champion``
against the best press cell by cell (ahead / tied / behind), and pooled rows with Wilson 95% intervals.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from collections import defaultdict
from pathlib import Path

from eval_grid import method_of  # benchmarks/eval_grid.py, beside this script (standard library only)

HERE = Path(__file__).resolve().parent
SCORING = HERE.parent / "core" / "evaluation" / "scoring.py"
INTERVALS = HERE / "intervals.py"
PRESSES = ("snapkv", "tova", "streamingllm", "knorm", "expected_attention", "adakv")
MAX_NEW_TOKENS = {"passkey": 12, "needle": 16}  # kvsieve eval's defaults per task


def load_by_path(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_score():
    return load_by_path(SCORING, "kvsieve_scoring").score


def default_model_dir() -> Path:
    # the rule of kvsieve.models.smollm2_cache_dir(), restated because kvsieve cannot be imported here
    return Path(os.environ.get("KVSIEVE_CACHE", "~/.cache/kvsieve")).expanduser() / "models" / "smollm2"


def import_kvpress():
    """``import kvpress``. kvpress imports ``datasets`` and ``fire`` at import time only for presses this script
    never builds (DuoAttention's and ExpectedAttention's statistics downloads); where either cannot be imported
    (a GPU image without them), a placeholder that fails when used stands in, so the presses compared here load."""
    import sys
    import types

    for name in ("datasets", "fire"):
        try:
            importlib.import_module(name)
        except ImportError:
            placeholder = types.ModuleType(name)

            def unavailable(*args, _name=name, **kwargs):
                raise RuntimeError(f"{_name} is not installed: this kvpress press cannot run here")

            placeholder.load_dataset = placeholder.Fire = unavailable
            sys.modules[name] = placeholder
    return importlib.import_module("kvpress")


def make_press(name: str, ratio: float, args):
    """The kvpress press ``name`` keeping the share ``ratio`` of the compressed tokens."""
    kvpress = import_kvpress()

    removed = round(1 - ratio, 6)
    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=removed, window_size=args.window, kernel_size=args.kernel)
    if name == "tova":
        return kvpress.TOVAPress(compression_ratio=removed)
    if name == "streamingllm":
        return kvpress.StreamingLLMPress(compression_ratio=removed, n_sink=args.n_sink)
    if name == "knorm":
        return kvpress.KnormPress(compression_ratio=removed)
    if name == "expected_attention":
        return kvpress.ExpectedAttentionPress(compression_ratio=removed)
    if name == "adakv":
        inner = kvpress.SnapKVPress(compression_ratio=removed, window_size=args.window, kernel_size=args.kernel)
        return kvpress.AdaKVPress(press=inner, alpha_safeguard=args.alpha_safeguard)
    raise SystemExit(f"unknown press {name!r}; known: {', '.join(PRESSES)}")


def context_token_count(tokenizer, prompt: dict) -> int:
    """How many of the prompt's tokens lie wholly inside its context (everything up to the haystack's end)."""
    encoded = tokenizer(prompt["text"], add_special_tokens=prompt["template"] == "plain", return_offsets_mapping=True)
    if encoded["input_ids"] != prompt["input_ids"]:
        raise SystemExit(f"{prompt['id']}: this tokenizer does not reproduce the prompt's token ids; wrong model?")
    limit = len(prompt["context"])
    return sum(1 for start, end in encoded["offset_mapping"] if end <= limit)


def answer(model, tokenizer, ids: list[int], split: int, press, max_new_tokens: int) -> tuple[str, float]:
    """Prefill ``ids[:split]`` under ``press``, feed the rest uncompressed, then decode greedily.

    Returns the answer text and the cache length left after the compressed prefill (layer 0; for a press that
    masks keys instead of evicting them, AdaKV, the unmasked length averaged over the KV heads).
    """
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        device = model.device
        cache = DynamicCache()
        context = torch.tensor([ids[:split]], device=device)
        if press is None:
            model.model(input_ids=context, past_key_values=cache)
        else:
            with press(model):
                model.model(input_ids=context, past_key_values=cache)
        kept: float = cache.get_seq_length()
        masked = getattr(model.model.layers[0].self_attn, "masked_key_indices", None)
        if masked is not None:
            kept -= len(masked[0]) / model.config.num_key_value_heads
        # positions continue from the uncompressed length, whatever the press evicted
        position = split
        step = torch.tensor([ids[split:]], device=device)
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        written: list[int] = []
        for _ in range(max_new_tokens):
            positions = torch.arange(position, position + step.shape[1], device=device)[None]
            logits = model(input_ids=step, past_key_values=cache, position_ids=positions, logits_to_keep=1).logits
            position += step.shape[1]
            token = int(logits[0, -1].argmax())
            written.append(token)
            if token in eos:
                break
            step = torch.tensor([[token]], device=device)
    return tokenizer.decode(written, skip_special_tokens=True), kept


def device_of(args) -> str:
    """``--device``; ``cuda`` under ``--shard R/W`` is GPU ``R % GPUs`` (several processes share a GPU round-robin)."""
    import torch

    if args.device == "cuda" and args.shard:
        return f"cuda:{args.shard[0] % torch.cuda.device_count()}"
    return args.device


def shard_arg(text: str) -> tuple[int, int]:
    rank, _, world = text.partition("/")
    try:
        r, w = int(rank), int(world)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes RANK/WORLD (e.g. 0/4), got {text!r}") from None
    if not 0 <= r < w:
        raise argparse.ArgumentTypeError(f"--shard {text}: RANK must be in [0, WORLD)")
    return r, w


def part_path(out: Path, shard: tuple[int, int]) -> Path:
    return out.with_name(f"{out.stem}.part{shard[0]}of{shard[1]}.jsonl")


def read_results(out: Path) -> list[dict]:
    """The records of ``out`` and of its shards' parts (``<stem>.part<R>of<W>.jsonl``), one per record key."""
    records = {}
    for path in [out, *sorted(out.parent.glob(f"{out.stem}.part*.jsonl"))]:
        for record in read_jsonl(path):
            records.setdefault(record_key(record), record)
    return list(records.values())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def record_key(r: dict) -> tuple:
    return (r.get("run", ""), r["prompt_id"], r.get("press", "snapkv"), r["protocol"], r["ratio"])


def run_presses(args, runs: list[Path], out: Path, presses: list[str], ratios: list[float], protocols: list[str]):
    import_kvpress()  # patches the attention functions for AdaKV before the model is built
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if args.threads:
        torch.set_num_threads(args.threads)
    score = load_score()
    hf_logging.disable_progress_bar()
    model_dir = args.model or default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    model.to(device_of(args))
    done = {record_key(r) for r in read_jsonl(out)} if args.resume else set()
    if not args.resume:
        out.unlink(missing_ok=True)
    # each run's prompts by (index, depth): every depth early on, so that a stopped run is not skewed by depth
    queues = [
        (run, sorted(load_prompts(run, args.lengths), key=lambda p: (p.get("index", 0), p["depth"]))) for run in runs
    ]
    # round robin over the runs, so that a stopped run leaves every cell with about as many prompts
    order = [(run, ps[i]) for i in range(max(len(ps) for _, ps in queues)) for run, ps in queues if i < len(ps)]
    started, count, item = time.perf_counter(), 0, -1
    for run, prompt in order:
        ids = prompt["input_ids"]
        splits = {"whole": len(ids) - 1}
        if "context" in protocols:
            splits["context"] = context_token_count(tokenizer, prompt)
        new_tokens = args.max_new_tokens or MAX_NEW_TOKENS.get(prompt["task"], 12)
        configs = [("none", "none", None)] if not args.no_baseline else []
        configs += [(press, protocol, ratio) for ratio in ratios for press in presses for protocol in protocols]
        for press_name, protocol, ratio in configs:
            item += 1
            if args.shard and item % args.shard[1] != args.shard[0]:
                continue  # another process's share
            if (run.name, prompt["id"], press_name, protocol, ratio) in done:
                continue
            if args.time_budget and time.perf_counter() - started > args.time_budget:
                print(f"\ntime budget of {args.time_budget} s spent: stopping", flush=True)
                return count
            press = None if ratio is None else make_press(press_name, ratio, args)
            t0 = time.perf_counter()
            split = splits["whole" if protocol == "none" else protocol]
            text, kept = answer(model, tokenizer, ids, split, press, new_tokens)
            record = {
                "run": run.name,
                "task": prompt["task"],
                "filler": prompt.get("filler"),
                "template": prompt.get("template"),
                "prompt_id": prompt["id"],
                "length": prompt["length"],
                "depth": prompt["depth"],
                "key": prompt["key"],
                "press": press_name,
                "press_repr": repr(press) if press is not None else "none",
                "protocol": protocol,
                "ratio": ratio,
                "answer": text,
                "correct": score(prompt["task"], text, prompt["key"]),
                "kept_tokens": round(kept, 1),
                "seconds": round(time.perf_counter() - t0, 2),
            }
            count += 1
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(
                f"{run.name} {prompt['id']} {press_name}/{protocol} ratio={ratio} {text!r} {record['correct']} "
                f"({record['seconds']} s)",
                flush=True,
            )
    return count


def load_prompts(run: Path, lengths: str | None) -> list[dict]:
    prompts = read_jsonl(run / "prompts.jsonl")
    if lengths:
        keep = {int(x) for x in lengths.split(",")}
        prompts = [p for p in prompts if p["length"] in keep]
    return prompts


# ---------------------------------------------------------------------------------------------------- the report


def split_configs(text: str) -> list[str]:
    """``"none,fastkv(selection=span, tsp_rate=0.3)"`` -> ``["none", "fastkv(selection=span, tsp_rate=0.3)"]``:
    commas inside parentheses belong to a configuration."""
    configs, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            configs.append(current.strip())
            current = ""
        else:
            current += char
    return [c for c in configs + [current.strip()] if c]


def kvsieve_results(run: Path, window: int, kernel: int) -> dict[tuple, bool]:
    """``{(prompt_id, config, ratio): correct}`` of kvsieve's own records in RUN/results.jsonl, ``config`` named as
    the grid's report names it (``eval_grid.method_of``: ``fastkv(selection=span)``, so variants stay apart);
    ``snapkv`` only where it ran with the same window and kernel as the presses here (the kernel is its scoring
    policy's, ``resolved["scoring"]["kernel"]``; older records have it at the top level)."""
    ours = {}
    merged = run / "results.jsonl"  # and the parts of a sharded run stopped before its ranks merged
    parts = ([merged] if merged.is_file() else []) + sorted(run.glob("results.rank*.jsonl"))
    for r in (r for path in parts for r in read_jsonl(path)):
        name = r["compressor_name"]
        resolved = r.get("resolved", {})
        used_kernel = resolved.get("kernel", (resolved.get("scoring") or {}).get("kernel"))
        if name == "snapkv" and (resolved.get("window"), used_kernel) != (window, kernel):
            continue
        ratio = None if name == "none" else r["params"].get("ratio")
        if name != "none" and ratio is None:
            continue  # a budget given another way: not comparable to a kept ratio
        ours[r["prompt_id"], method_of(r), ratio] = r["correct"]
    return ours


def fmt(k: int, n: int) -> str:
    return f"{k}/{n}" if n else "-"


def fmt_wilson(k: int, n: int, wilson) -> str:
    if not n:
        return "-"
    lo, hi = wilson(k, n)
    return f"{k}/{n} ({k / n:.0%}; {lo:.0%}-{hi:.0%})"


def report(runs: list[Path], records: list[dict], args, presses, ratios, protocols) -> str:
    wilson = load_by_path(INTERVALS, "kvsieve_bench_intervals").wilson
    champion = args.champion
    theirs: dict[tuple, bool] = {}  # (run, prompt_id, column, ratio) -> correct
    for r in records:
        press = r.get("press", "snapkv")  # records of the SnapKV-only version carry no press field
        column = (
            "none" if r["protocol"] == "none" else press + ("" if r["protocol"] == "whole" else f" ({r['protocol']})")
        )
        theirs[r.get("run", runs[0].name), r["prompt_id"], column, r["ratio"]] = r["correct"]
    columns = [p + ("" if protocol == "whole" else f" ({protocol})") for p in presses for protocol in protocols]
    cells: dict[tuple, dict] = {}  # (task, filler, template, length) -> {run, prompts, ours}
    for run in runs:
        ours = kvsieve_results(run, args.window, args.kernel)
        for prompt in load_prompts(run, args.lengths):
            cell = (prompt["task"], prompt.get("filler", "-"), prompt.get("template", "-"), prompt["length"])
            entry = cells.setdefault(cell, {"run": run.name, "prompts": [], "ours": ours})
            entry["prompts"].append(prompt["id"])
    our_names = sorted({name for c in cells.values() for (_, name, _) in c["ours"]} - {"none"})
    if args.kvsieve_configs:  # only these (a cell counts the prompts every shown config finished)
        our_names = [name for name in our_names if name in split_configs(args.kvsieve_configs)]
    if champion not in our_names:
        champion = our_names[0] if our_names else None
    lines = [
        "kvsieve's configs come from each run's `results.jsonl`; kvpress ran in its own venv on the same token ids "
        f"(protocol {', '.join(protocols)}), answers scored by kvsieve's `scoring.py`. Each row counts only the "
        "prompts that every press (and kvsieve's configs) finished at that ratio. `kept` is kvsieve's ratio; "
        "kvpress ran with `compression_ratio = 1 - kept`.",
        "",
        "Presses (as built at the first kept ratio): "
        + "; ".join(f"`{p}`: `{press_repr(p, ratios[0], records, args)}`" for p in presses)
        + ".",
    ]
    pooled: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])  # (ratio, task, column) -> [k, n]
    pairs: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])  # (ratio, task, column) -> [only ours, only theirs]
    verdicts: dict[tuple, list[str]] = defaultdict(list)  # (ratio, task) -> verdicts
    # full cache first: kvsieve on every prompt of the run, kvpress (and kvsieve again) on those kvpress ran
    lines += ["", "### Full cache", ""]
    lines += ["| task | filler | template | length | kvsieve none | kvpress none | kvsieve none, same prompts |"]
    lines.append("|---|---|---|---|---|---|---|")
    for cell, entry in sorted(cells.items()):
        run, ours = entry["run"], entry["ours"]
        ids = [p for p in entry["prompts"] if (p, "none", None) in ours]
        both = [p for p in ids if (run, p, "none", None) in theirs]
        tallies = {
            "kvsieve none": (sum(ours[p, "none", None] for p in ids), len(ids)),
            "kvpress none": (sum(theirs[run, p, "none", None] for p in both), len(both)),
            "kvsieve none, same prompts": (sum(ours[p, "none", None] for p in both), len(both)),
        }
        for task in (cell[0], "all"):
            for col, (k, n) in tallies.items():
                pooled["full", task, col][0] += k
                pooled["full", task, col][1] += n
        if ids:
            lines.append(f"| {' | '.join(map(str, cell))} | " + " | ".join(fmt(*t) for t in tallies.values()) + " |")
    for ratio in ratios:
        head = ["task", "filler", "template", "length", "n", "kvsieve none"]
        head += [f"kvsieve {name}" for name in our_names] + [f"kvpress {c}" for c in columns]
        head += ["best kvpress", f"{champion} vs best"]
        lines += ["", f"### Kept {ratio:g}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for cell, entry in sorted(cells.items()):
            run, ours = entry["run"], entry["ours"]
            ids = [
                p
                for p in entry["prompts"]
                if all((run, p, c, ratio) in theirs for c in columns)
                and all((p, name, ratio) in ours for name in our_names)
                and (p, "none", None) in ours
            ]
            if not ids:
                continue
            counts = {"kvsieve none": sum(ours[p, "none", None] for p in ids)}
            counts |= {f"kvsieve {name}": sum(ours[p, name, ratio] for p in ids) for name in our_names}
            counts |= {f"kvpress {c}": sum(theirs[run, p, c, ratio] for p in ids) for c in columns}
            best = max(counts[f"kvpress {c}"] for c in columns)
            best_names = [c for c in columns if counts[f"kvpress {c}"] == best]
            row = [*map(str, cell), str(len(ids))] + [fmt(counts[h], len(ids)) for h in head[5:-2]]
            named = "every press" if len(best_names) == len(columns) > 1 else ", ".join(best_names)
            row.append(f"{fmt(best, len(ids))} ({named})")
            if champion:
                mine = counts[f"kvsieve {champion}"]
                verdict = "ahead" if mine > best else "tied" if mine == best else "behind"
                row.append(f"**{verdict}**")
            else:
                verdict = "-"
                row.append("-")
            lines.append("| " + " | ".join(row) + " |")
            for task in (cell[0], "all"):
                verdicts[ratio, task].append(verdict)
                for col, k in counts.items():
                    pooled[ratio, task, col][0] += k
                    pooled[ratio, task, col][1] += len(ids)
                if champion:
                    for c in columns:
                        for p in ids:
                            a, b = ours[p, champion, ratio], theirs[run, p, c, ratio]
                            pairs[ratio, task, c][0] += a and not b
                            pairs[ratio, task, c][1] += b and not a
    tasks = sorted({cell[0] for cell in cells})
    tasks += ["all"] if len(tasks) > 1 else []
    lines += ["", "### Pooled, with Wilson 95% intervals", ""]
    lines += ["correct/n (accuracy; Wilson 95% interval), pooled over the cells above (same prompts per ratio).", ""]
    lines += [
        "| kept | task | config | correct/n (acc; Wilson 95%) | "
        + (f"{champion} only / press only (same prompts) |" if champion else "|"),
        "|---|---|---|---|---|",
    ]
    for task in tasks:
        for col in ("kvsieve none", "kvpress none", "kvsieve none, same prompts"):
            k, n = pooled["full", task, col]
            if n:
                lines.append(f"| full | {task} | {col} | {fmt_wilson(k, n, wilson)} | |")
    for ratio in ratios:
        for task in tasks:
            names = [f"kvsieve {name}" for name in our_names] + [f"kvpress {c}" for c in columns]
            for col in names:
                k, n = pooled[ratio, task, col]
                if not n:
                    continue
                pair = ""
                if champion and col.startswith("kvpress "):
                    only_ours, only_theirs = pairs[ratio, task, col[len("kvpress ") :]]
                    pair = f"{only_ours} / {only_theirs}"
                lines.append(f"| {ratio:g} | {task} | {col} | {fmt_wilson(k, n, wilson)} | {pair} |")
    if champion:
        lines += ["", f"### `{champion}` against the best press, cell by cell", ""]
        lines += ["| kept | task | cells | ahead | tied | behind |", "|---|---|---|---|---|---|"]
        for ratio in ratios:
            for task in tasks:
                v = verdicts[ratio, task]
                if v:
                    lines.append(
                        f"| {ratio:g} | {task} | {len(v)} | {v.count('ahead')} | {v.count('tied')} | "
                        f"{v.count('behind')} |"
                    )
    return "\n".join(lines)


def press_repr(name: str, ratio: float, records: list[dict], args) -> str:
    """How the press ``name`` was built at ``ratio``: from the records, else built anew (kvpress's venv only)."""
    for r in records:
        if r.get("press", "snapkv") == name and r["ratio"] == ratio and "press_repr" in r:
            return r["press_repr"]
    try:
        return repr(make_press(name, ratio, args))
    except ImportError:  # a report rebuilt outside kvpress's venv, from records without press_repr
        return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="'kvsieve eval passkey|needle' output directories")
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: kvsieve's smollm2)")
    parser.add_argument("--presses", default="snapkv", help=f"comma list of {', '.join(PRESSES)} (default snapkv)")
    parser.add_argument("--ratios", default="0.1,0.2,0.5", help="kept shares, as kvsieve's ratio")
    parser.add_argument("--protocol", default="whole", help="whole, context, or both as a comma list")
    parser.add_argument("--window", type=int, default=32, help="SnapKV's (and AdaKV's SnapKV's) window")
    parser.add_argument("--kernel", type=int, default=7, help="SnapKV's (and AdaKV's SnapKV's) pooling kernel")
    parser.add_argument("--n-sink", type=int, default=4, help="StreamingLLM's sink tokens")
    parser.add_argument("--alpha-safeguard", type=float, default=0.2, help="AdaKV's per-head minimum share")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 12 (passkey), 16 (needle)")
    parser.add_argument("--lengths", default=None, help="only prompts of these lengths (comma list)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-baseline", action="store_true", help="skip kvpress's uncompressed run")
    parser.add_argument("--champion", default="attended_spans", help="kvsieve config set against the best press")
    parser.add_argument("--kvsieve-configs", default=None,
                        help="comma list of the kvsieve configurations to show, as the report names them, e.g. "
                        "none,attended_spans,fastkv(selection=span) (default: every one in the runs)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="a directory (kvpress_results.jsonl and kvpress_table.md go there) or a .jsonl file "
        "(default: RUN/kvpress_results.jsonl, with one RUN)",
    )
    parser.add_argument("--resume", action="store_true", help="keep the results already in --out and skip those")
    parser.add_argument("--time-budget", type=float, default=None, help="stop starting new runs after this many s")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from --out; run nothing")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument(
        "--shard",
        type=shard_arg,
        default=None,
        help="RANK/WORLD: run every WORLD-th (prompt, press, ratio) from RANK on, into OUT's part file, no report; "
        "start WORLD processes, then --report-only merges the parts",
    )
    args = parser.parse_args()
    presses = [p.strip() for p in args.presses.split(",")]
    for p in presses:
        if p not in PRESSES:
            raise SystemExit(f"unknown press {p!r}; known: {', '.join(PRESSES)}")
    ratios = [float(x) for x in args.ratios.split(",")]
    protocols = [p.strip() for p in args.protocol.split(",")]
    if args.out is None:
        if len(args.runs) != 1:
            raise SystemExit("several runs need --out")
        out, table = args.runs[0] / "kvpress_results.jsonl", None
    elif args.out.suffix == ".jsonl":
        out, table = args.out, args.out.with_suffix(".md")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        out, table = args.out / "kvpress_results.jsonl", args.out / "kvpress_table.md"
    started = time.perf_counter()
    if not args.report_only:
        target = part_path(out, args.shard) if args.shard else out
        count = run_presses(args, args.runs, target, presses, ratios, protocols)
        print(f"\n{count} runs in {time.perf_counter() - started:.0f} s; results in {target}\n")
        if args.shard:
            return  # the report merges every part: --report-only once all shards are done
    text = report(args.runs, read_results(out), args, presses, ratios, protocols)
    print(text)
    if table is not None:
        table.write_text(text + "\n")
        print(f"\ntable in {table}")


if __name__ == "__main__":
    main()
