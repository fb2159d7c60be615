"""Argument types shared by the ``kvsieve`` subcommands: compressor specs, comma lists of sizes and numbers, read
with the one syntax of :mod:`kvsieve.params` (``8K`` is 8192 everywhere).

Each function is an argparse ``type``: a bad value raises :class:`argparse.ArgumentTypeError`, which argparse reports
as ``argument --FLAG: <message>`` (exit status 2); the message quotes the value and says what is allowed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from kvsieve.params import CompressorSpec, parse_compressor_specs, parse_size, parse_value

__all__ = [
    "comma_list",
    "compressor_specs",
    "device",
    "nonnegative",
    "number",
    "numbers",
    "positive_float",
    "size",
    "sizes",
    "unit_float",
]

T = TypeVar("T")

SIZE = "a whole number >= 1 such as 300 or 8K (= 8192)"


def size(text: str) -> int:
    """``"8K"`` -> 8192, ``"300"`` -> 300: a token count or batch size, at least 1."""
    try:
        value = parse_size(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected {SIZE}, got {text!r}")
    return value


def number(text: str) -> int | float:
    """``"0.2"`` -> 0.2, ``"64"`` -> 64, ``"1K"`` -> 1024: an int or a float (not a bool or a word)."""
    try:
        value = parse_value(text)
    except ValueError:
        value = None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise argparse.ArgumentTypeError(f"expected a number such as 0.2, 64 or 1K, got {text!r}")
    return value


def compressor_specs(text: str) -> list[CompressorSpec]:
    """``"snapkv:window=8,rpc"`` -> ``[snapkv(window=8), rpc]`` (:func:`kvsieve.params.parse_compressor_specs`); use
    with ``action="extend"`` so that a repeated flag adds to the list. Names and parameters are checked when the
    compressors are built."""
    try:
        return parse_compressor_specs([text])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def comma_list(parse: Callable[[str], T], allowed: str) -> Callable[[str], list[T]]:
    """An argparse type reading ``"a,b,c"`` with ``parse`` per item; empty items are skipped, an empty list is an
    error. ``allowed`` says what an item may be, for the error message."""

    def parse_list(text: str) -> list[T]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        try:
            if items:
                return [parse(item) for item in items]
        except (argparse.ArgumentTypeError, ValueError):
            pass
        raise argparse.ArgumentTypeError(f"expected a comma list of {allowed}, got {text!r}")

    parse_list.__name__ = f"list of {allowed}"
    return parse_list


#: ``"512,8K"`` -> ``[512, 8192]``.
sizes = comma_list(size, "whole numbers >= 1 such as 512,8K (8K = 8192)")
#: ``"0.1,0.2"`` -> ``[0.1, 0.2]``; ``"256,1K"`` -> ``[256, 1024]``.
numbers = comma_list(number, "numbers such as 0.1,0.2 or 256,1K")


def nonnegative(text: str) -> int:
    """A whole number >= 0 (``8K`` allowed)."""
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None


def device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``, refused at once when this machine has no such device."""
    import torch

    name = text.strip().lower()
    kind, _, index = name.partition(":")
    if kind == "cpu" and not index:
        return "cpu"
    if kind != "cuda" or (index and not index.isdigit()):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available on this machine (use cpu)")
    if index and int(index) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
        )
    return name


def positive_float(text: str) -> float:
    """A number > 0 (a temperature)."""
    value = number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return float(value)


def unit_float(text: str) -> float:
    """A number in (0, 1] (a top-p)."""
    value = number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return float(value)
