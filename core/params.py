"""One parameter syntax for every way into kvsieve: the Python API, ``generate``, ``demo``, ``eval``, ``bench``
and composition presets.

A parameter is ``key=value``. Keys are dotted paths:

* ``ratio=0.2``: a parameter of the compressor itself;
* ``scoring.pooling=max`` / ``selection.x=...``: a parameter of the compressor's scoring (selection) policy;
* ``rpc.interval=64``: a parameter of the part ``rpc`` of a composition such as ``fastkv+rpc`` (and
  ``rpc.scoring.aggregation=group`` one level further down).

Values are read by :func:`parse_value`: integers, floats, ``true``/``false``, ``none``, sizes with a ``K``
(x1024) or ``M`` (x1024^2) suffix such as ``8K``, anything else a string. In Python, pass the same keys in a dict
(``params={"scoring.pooling": "max"}``); nested dicts (``{"scoring": {"pooling": "max"}}``) mean the same.

A *compressor spec* names a compressor and, optionally, its parameters: ``NAME`` or ``NAME:key=value,key=value``.
Commands that take several compressors (``eval``, ``bench``) take a comma list of specs: a comma-separated item
with an ``=`` is a parameter of the spec before it, so ``snapkv:window=8,pooling=max,rpc`` is two specs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

__all__ = [
    "CompressorSpec",
    "UnknownParameterError",
    "flatten",
    "parse_compressor_specs",
    "parse_params",
    "parse_size",
    "parse_value",
]

class UnknownParameterError(ValueError):
    """A parameter name that the compressor (or policy, or composition part) does not take."""


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kKmM])$")
_MULTIPLIERS = {"k": 1024, "m": 1024 * 1024}
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_+\-]*(\.[A-Za-z_][A-Za-z0-9_+\-]*)*$")


def parse_size(text: str) -> int:
    """``"8K"`` -> 8192, ``"1.5K"`` -> 1536, ``"2M"`` -> 2097152, ``"300"`` -> 300.

    Raises:
        ValueError: not a non-negative whole number of tokens (the message quotes ``text``).
    """
    value = parse_value(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number of tokens such as 300 or 8K (= 8192), got {text!r}")
    return value


def parse_value(text: str) -> Any:
    """``"8"`` -> 8, ``"0.2"`` -> 0.2, ``"8K"`` -> 8192, ``"true"``/``"false"`` -> bool, ``"none"`` -> None,
    anything else the (stripped) string."""
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    size = _SIZE.match(text)
    if size:
        scaled = float(size.group(1)) * _MULTIPLIERS[size.group(2).lower()]
        if scaled != int(scaled):
            raise ValueError(f"{text!r} is not a whole number of tokens")
        return int(scaled)
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"scoring": {"pooling": "max"}, "ratio": 0.2}`` -> ``{"scoring.pooling": "max", "ratio": 0.2}``."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if not isinstance(key, str):
            raise TypeError(f"parameter names must be strings, got {key!r} ({type(key).__name__})")
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            nested = flatten(value, f"{full}.")
            if not nested:
                raise ValueError(f"parameter {full!r} is an empty mapping")
            items = nested.items()
        else:
            items = [(full, value)]
        for name, item in items:
            if name in out:
                raise ValueError(f"parameter {name!r} is given twice")
            out[name] = item
    return out


def parse_params(items: Iterable[str] | Mapping[str, Any] | None, *, source: str = "--set") -> dict[str, Any]:
    """The one parameter parser: ``["ratio=0.2", "scoring.pooling=max"]`` (or a dict, nested or dotted) ->
    ``{"ratio": 0.2, "scoring.pooling": "max"}``.

    Args:
        items: ``key=value`` strings, or a mapping (values are kept as given; nested mappings are flattened).
        source: how the caller names where the items came from, for error messages (``--set``, ``params``).

    Raises:
        ValueError: an item without ``=``, an empty or malformed key, or a key given twice (the message names it).
        TypeError: ``items`` is a single string, or a mapping with non-string keys.
    """
    if items is None:
        return {}
    if isinstance(items, str):
        raise TypeError(f"{source} takes a list of key=value items or a dict, got the string {items!r}")
    if isinstance(items, Mapping):
        params = flatten(items)
    else:
        params = {}
        for item in items:
            if not isinstance(item, str):
                raise TypeError(f"{source} items must be key=value strings, got {item!r}")
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"{source} expects key=value, got {item!r}")
            if key in params:
                raise ValueError(f"{source}: {key!r} is given twice ({key}={params[key]!r} and {item.strip()!r})")
            params[key] = parse_value(value)
    for key in params:
        if not _KEY.match(key):
            raise ValueError(
                f"{source}: {key!r} is not a parameter name (letters, digits and _; dots separate a part or a "
                "policy from its parameter, as in rpc.interval or scoring.pooling)"
            )
    return params


@attrs.frozen
class CompressorSpec:
    """A compressor name and its parameters, as written ``NAME`` or ``NAME:key=value,key=value``."""

    name: str
    params: dict[str, Any] = attrs.field(factory=dict)

    @classmethod
    def parse(cls, text: str) -> CompressorSpec:
        name, _, rest = text.partition(":")
        name = name.strip()
        if not name or "=" in name:
            raise ValueError(f"a compressor spec is NAME or NAME:key=value,...; got {text!r}")
        items = [item for item in rest.split(",") if item.strip()]
        return cls(name, parse_params(items, source=f"compressor {name!r}"))

    @property
    def label(self) -> str:
        """``snapkv(ratio=0.2,window=8)``; just the name without parameters."""
        if not self.params:
            return self.name
        return f"{self.name}({','.join(f'{k}={v}' for k, v in self.params.items())})"

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}:{','.join(f'{k}={v}' for k, v in self.params.items())}"


def parse_compressor_specs(texts: Iterable[str]) -> list[CompressorSpec]:
    """Compressor specs from comma lists (each text may hold several): ``["snapkv:window=8,pooling=max,rpc"]``
    -> ``[snapkv(window=8, pooling=max), rpc]``. A comma item holding ``=`` continues the spec before it."""
    specs: list[str] = []
    for text in texts:
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            if "=" in item and ":" not in item.split("=", 1)[0]:
                if not specs:
                    raise ValueError(f"parameter {item!r} comes before any compressor name in {text!r}")
                specs[-1] += ("," if ":" in specs[-1] else ":") + item
            else:
                specs.append(item)
    return [CompressorSpec.parse(spec) for spec in specs]
