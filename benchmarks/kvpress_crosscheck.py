"""Cross-check kvsieve's SnapKV against a peer library: kvpress's SnapKVPress on the very same passkey prompts.

Optional and run by hand: kvpress 0.5.5 needs transformers<5.3 while kvsieve needs >=5.17, so this script runs in
kvpress's own virtual environment and never imports kvsieve. It reads the ``prompts.jsonl`` (token ids included)
that ``kvsieve eval passkey`` wrote, so both libraries see identical tokens, scores the answers with kvsieve's own
``core/evaluation/scoring.py`` (loaded by path: standard library only), and prints kvsieve's accuracy (from the
``results.jsonl`` beside the prompts) next to kvpress's.

Setup (once)::

    python -m venv /tmp/kvpress-venv
    /tmp/kvpress-venv/bin/pip install torch==2.13.0            # first: the CPU wheel
    /tmp/kvpress-venv/bin/pip install kvpress==0.5.5 'transformers<5.3'

Run (the model is the safetensors copy kvsieve converted from the GGUF: ``kvsieve.models.smollm2_cache_dir()``,
by default ``~/.cache/kvsieve/models/smollm2``)::

    kvsieve eval passkey --compressor none,snapkv --budgets 0.1,0.2,0.5 --lengths 1K --n 8 --out runs/passkey-1k
    /tmp/kvpress-venv/bin/python benchmarks/kvpress_crosscheck.py runs/passkey-1k --ratios 0.1,0.2,0.5

Two protocols (``--protocol``):

* ``whole`` (default; kvsieve's protocol): kvpress compresses the prompt up to its last token, the question
  included, so SnapKV's observation window holds the question, as in kvsieve's ``snapkv``; the last token is then
  fed uncompressed and the answer decoded greedily.
* ``context`` (kvpress's own pipeline protocol): only the tokens up to the end of the haystack are compressed;
  the question and the answer prefix follow uncompressed, so the window cannot see the question.

kvsieve's ``ratio`` is the share KEPT; kvpress's ``compression_ratio`` the share REMOVED: ``1 - ratio``.
SnapKVPress's window and kernel are set to kvsieve's defaults (32 and 7) unless ``--window``/``--kernel`` say else.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from kvpress import SnapKVPress
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.utils import logging as hf_logging

SCORING = Path(__file__).resolve().parents[1] / "core" / "evaluation" / "scoring.py"


def load_score():
    spec = importlib.util.spec_from_file_location("kvsieve_scoring", SCORING)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.score


def default_model_dir() -> Path:
    # the rule of kvsieve.models.smollm2_cache_dir(), restated because kvsieve cannot be imported here
    return Path(os.environ.get("KVSIEVE_CACHE", "~/.cache/kvsieve")).expanduser() / "models" / "smollm2"


def context_token_count(tokenizer, prompt: dict) -> int:
    """How many of the prompt's tokens lie wholly inside its context (everything up to the haystack's end)."""
    encoded = tokenizer(prompt["text"], add_special_tokens=prompt["template"] == "plain", return_offsets_mapping=True)
    if encoded["input_ids"] != prompt["input_ids"]:
        raise SystemExit(f"{prompt['id']}: this tokenizer does not reproduce the prompt's token ids; wrong model?")
    limit = len(prompt["context"])
    return sum(1 for start, end in encoded["offset_mapping"] if end <= limit)


@torch.inference_mode()
def answer(model, tokenizer, ids: list[int], split: int, press, max_new_tokens: int) -> tuple[str, int]:
    """Prefill ``ids[:split]`` under ``press``, feed the rest uncompressed, then decode greedily.

    Returns the answer text and the cache length left after the compressed prefill (layer 0).
    """
    device = model.device
    cache = DynamicCache()
    context = torch.tensor([ids[:split]], device=device)
    if press is None:
        model.model(input_ids=context, past_key_values=cache)
    else:
        with press(model):
            model.model(input_ids=context, past_key_values=cache)
    kept = cache.get_seq_length()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a 'kvsieve eval passkey' output directory (prompts.jsonl)")
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: kvsieve's smollm2)")
    parser.add_argument("--ratios", default="0.1,0.2,0.5", help="kept shares, as kvsieve's snapkv ratio")
    parser.add_argument("--protocol", default="whole", help="whole, context, or both as a comma list")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--kernel", type=int, default=7)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--lengths", default=None, help="only prompts of these lengths (comma list)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: RUN/kvpress_results.jsonl")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    score = load_score()
    hf_logging.disable_progress_bar()
    model_dir = args.model or default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    prompts = [json.loads(line) for line in (args.run / "prompts.jsonl").read_text().splitlines() if line]
    if args.lengths:
        keep = {int(x) for x in args.lengths.split(",")}
        prompts = [p for p in prompts if p["length"] in keep]
    ratios = [float(x) for x in args.ratios.split(",")]
    protocols = [p.strip() for p in args.protocol.split(",")]
    out = args.out or args.run / "kvpress_results.jsonl"
    out.unlink(missing_ok=True)
    records = []
    started = time.perf_counter()
    for prompt in prompts:
        ids = prompt["input_ids"]
        splits = {"whole": len(ids) - 1, "context": context_token_count(tokenizer, prompt)}
        for protocol in protocols:
            for ratio in [None, *ratios]:
                if ratio is None and protocol != protocols[0]:
                    continue  # the uncompressed baseline does not depend on the split
                press = (
                    None
                    if ratio is None
                    else SnapKVPress(
                        compression_ratio=round(1 - ratio, 6), window_size=args.window, kernel_size=args.kernel
                    )
                )
                t0 = time.perf_counter()
                text, kept = answer(model, tokenizer, ids, splits[protocol], press, args.max_new_tokens)
                record = {
                    "prompt_id": prompt["id"],
                    "length": prompt["length"],
                    "depth": prompt["depth"],
                    "key": prompt["key"],
                    "protocol": protocol if ratio is not None else "none",
                    "ratio": ratio,
                    "answer": text,
                    "correct": score(prompt["task"], text, prompt["key"]),
                    "kept_tokens": kept,
                    "seconds": round(time.perf_counter() - t0, 2),
                }
                records.append(record)
                with out.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"{prompt['id']} {record['protocol']} ratio={ratio} {text!r} {record['correct']}", flush=True)
    print(f"\n{len(records)} runs in {time.perf_counter() - started:.0f} s; results in {out}\n")
    print(side_by_side(args.run, records, ratios, protocols, args.window, args.kernel))


def side_by_side(
    run: Path, records: list[dict], ratios: list[float], protocols: list[str], window: int, kernel: int
) -> str:
    """Markdown: kvsieve's accuracy (from RUN/results.jsonl; snapkv runs with the same window and kernel) and
    kvpress's, per kept ratio and length."""
    ours: dict[tuple, list[bool]] = defaultdict(list)
    results = run / "results.jsonl"
    ids = {r["prompt_id"] for r in records}
    if results.is_file():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            if r["prompt_id"] not in ids:
                continue
            if r["compressor_name"] == "none":
                ours["none", r["length"]].append(r["correct"])
            elif (
                r["compressor_name"] == "snapkv"
                and r["resolved"].get("window") == window
                and r["resolved"].get("kernel") == kernel
            ):
                ours[r["params"]["ratio"], r["length"]].append(r["correct"])
    theirs: dict[tuple, list[bool]] = defaultdict(list)
    for r in records:
        theirs[r["protocol"], r["ratio"] if r["ratio"] is not None else "none", r["length"]].append(r["correct"])

    def cell(values: list[bool]) -> str:
        return f"{sum(values)}/{len(values)}" if values else "-"

    head = "| kept | length | kvsieve snapkv | " + " | ".join(f"kvpress SnapKVPress ({p})" for p in protocols) + " |"
    lines = [head, "|---" * (3 + len(protocols)) + "|"]
    for length in sorted({r["length"] for r in records}):
        lines.append(
            f"| full cache | {length} | {cell(ours['none', length])} | "
            + " | ".join(cell(theirs["none", "none", length]) for _ in protocols)
            + " |"
        )
        for ratio in ratios:
            lines.append(
                f"| {ratio:g} | {length} | {cell(ours[ratio, length])} | "
                + " | ".join(cell(theirs[p, ratio, length]) for p in protocols)
                + " |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
