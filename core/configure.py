"""Building an object from parameters: one place that turns ``{"ratio": 0.2, "scoring.pooling": "max"}`` into a
compressor (or any plugin class), with errors that name the parameter and suggest what was meant.

Used by :meth:`kvsieve.plugins.Registry.create` (so every registered name is built the same way) and thus by
:func:`kvsieve.plugins.build_compressor`, presets and the command line.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from kvsieve.params import UnknownParameterError
from kvsieve.policy import ScoringPolicy, SelectionPolicy

__all__ = ["RENAMED", "configure"]

#: parameters renamed in 0.2 -> what to write now (an unknown-parameter error says so)
RENAMED = {
    "retain_rate": "ratio",
    "pooling": "scoring.pooling",
    "kernel": "scoring.kernel",
    "aggregation": "scoring.aggregation",
    "recent": "window",
}


def configure(factory: Callable[..., Any], params: Mapping[str, Any], label: str) -> Any:
    """``factory(**params)`` where dotted keys ``field.key`` set parameters of the policy held in ``field``.

    An attrs class is built from its own parameters, then each nested policy is rebuilt with its parameters
    (``attrs.evolve``), so ``scoring.pooling=max`` changes the compressor's default scoring policy, or the one named
    by ``scoring=NAME``. A factory that is not an attrs class (a composition preset) gets the parameters as they are.
    """
    if not (isinstance(factory, type) and attrs.has(factory)):
        return factory(**params)
    fields = [field.name for field in attrs.fields(factory) if field.init]
    own: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    unknown: list[str] = []
    for key, value in params.items():
        head, dot, rest = key.partition(".")
        if head not in fields:
            unknown.append(key)
        elif dot:
            nested.setdefault(head, {})[rest] = value
        else:
            own[key] = value
    if unknown:
        raise _unknown_parameter(label, unknown[0], fields, factory, own)
    obj = factory(**own)
    for head, sub in nested.items():
        inner = getattr(obj, head)
        if not attrs.has(type(inner)):
            raise UnknownParameterError(f"{label}: {head} is {inner!r}, which has no parameters to set")
        inner_label = f"{label}: {head} {getattr(inner, 'name', '') or type(inner).__name__!r}"
        rebuilt = configure(type(inner), {**_init_values(inner), **sub}, inner_label)
        obj = attrs.evolve(obj, **{head: rebuilt})
    return obj


def _init_values(obj: Any) -> dict[str, Any]:
    return {field.name: getattr(obj, field.name) for field in attrs.fields(type(obj)) if field.init}


def _unknown_parameter(label: str, key: str, fields: list[str], factory: type, own: dict[str, Any]) -> Exception:
    """The error for ``key``, with a "did you mean" among the fields and the parameters of the default policies."""
    candidates = list(fields)
    try:  # the policies it holds by default, so that `pooling` suggests `scoring.pooling`
        default = factory(**{k: v for k, v in own.items()})
        for name in fields:
            inner = getattr(default, name)
            if isinstance(inner, ScoringPolicy | SelectionPolicy) and attrs.has(type(inner)):
                candidates += [f"{name}.{f.name}" for f in attrs.fields(type(inner)) if f.init]
    except Exception:  # noqa: BLE001 - only a hint: the unknown key is the error
        pass
    exact = [c for c in candidates if c.rsplit(".", 1)[-1] == key]
    renamed = [RENAMED[key]] if RENAMED.get(key) in candidates else []
    close = renamed or exact or difflib.get_close_matches(key, candidates, n=2)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    if renamed:
        hint += f" ({key!r} was renamed {RENAMED[key]!r} in kvsieve 0.2.)"
    takes = f"Its parameters: {', '.join(fields)}." if fields else "It takes no parameters."
    return UnknownParameterError(f"{label} has no parameter {key!r}.{hint} {takes}")
