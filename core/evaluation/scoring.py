"""Exact-match scoring of retrieval answers.

Standard library only, on purpose: ``benchmarks/kvpress_crosscheck.py`` loads this file by path inside
kvpress's own virtual environment (where kvsieve cannot be installed), so both sides score answers with the very
same function.
"""

from __future__ import annotations

import re

__all__ = ["key_prefix", "score"]


def _words(text: str) -> list[str]:
    return re.sub(r"[^0-9a-z]+", " ", text.lower()).split()


def score(task: str, answer: str, key: str) -> bool:
    """Whether ``answer`` (the generated text after the prompt's answer prefix) gives ``key`` exactly.

    ``passkey``: the first run of digits in the answer equals the key. ``needle``: the answer's first words
    (lower-cased, punctuation and quotes dropped) are exactly the key's words.
    """
    if task == "passkey":
        found = re.search(r"\d+", answer)
        return found is not None and found.group() == key
    if task == "needle":
        key_words = _words(key)
        return _words(answer)[: len(key_words)] == key_words
    raise ValueError(f"unknown task {task!r}; known: passkey, needle")


def key_prefix(task: str, answer: str, key: str) -> float:
    """Partial credit: the share of the key reproduced before the first error (1.0 exactly when ``score`` holds).

    ``passkey``: leading digits of the answer's first number that match the key's (an over-long number loses the
    credit of its last digit, so only an exact answer reaches 1.0). ``needle``: leading words, likewise.
    """
    if task == "passkey":
        found = re.search(r"\d+", answer)
        got, want = (found.group() if found else ""), key
    elif task == "needle":
        got, want = _words(answer)[: len(_words(key)) + 1], _words(key)
    else:
        raise ValueError(f"unknown task {task!r}; known: passkey, needle")
    matched = 0
    for a, b in zip(got, want):
        if a != b:
            break
        matched += 1
    if matched == len(want) and len(got) > len(want) and task == "passkey":
        matched -= 1  # "351690" for "35169" is wrong
    return matched / len(want)
