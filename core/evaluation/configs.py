"""The compressor configurations of a sweep: compressors x budgets.

Compressors are named as registered (``kvsieve plugins``) and configured with plain keyword parameters, so a
new compressor plugs in by name with nothing special-cased here: ``--budgets`` sweeps the parameter named by
``budget_param`` (default ``ratio``) on every compressor that has it, and runs the others (``none``) once.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from kvsieve import integration
from kvsieve.params import parse_value
from kvsieve.plugins import registry

__all__ = ["CompressorConfig", "expand_configs", "parse_sets"]


def parse_sets(items: Iterable[str]) -> dict[str | None, dict[str, Any]]:
    """``["window=8", "snapkv.kernel=5"]`` -> ``{None: {"window": 8}, "snapkv": {"kernel": 5}}``.

    Unscoped parameters go to every compressor that has them; ``name.key=value`` to compressor ``name`` only.
    """
    sets: dict[str | None, dict[str, Any]] = defaultdict(dict)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value or compressor.key=value, got {item!r}")
        # the first dot splits the scope off: "fastkv+rpc.rpc.interval" -> scope "fastkv+rpc", "rpc.interval"
        scope, _, name = key.strip().partition(".") if "." in key else ("", "", key.strip())
        sets[scope or None][name] = parse_value(value)
    return dict(sets)


def _accepted_params(name: str) -> set[str] | None:
    """Keyword parameters the registered compressor ``name`` accepts (None: any, it takes ``**kwargs``)."""
    if "+" in name and name not in registry().names("compressor"):
        return None  # an ad-hoc composition "a+b": its parts check their parameters when it is built
    factory = registry().get("compressor", name).obj
    parameters = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


@attrs.frozen
class CompressorConfig:
    """One compressor configuration of a sweep: a registered name and its keyword parameters.

    Attributes:
        name: the registered compressor name.
        params: its parameters, the swept budget included.
        budget: the swept budget value (None for a configuration outside the budget sweep, e.g. ``none``).
    """

    name: str
    params: dict[str, Any] = attrs.field(factory=dict)
    budget: float | None = None

    @property
    def label(self) -> str:
        """``snapkv(ratio=0.2,window=8)``; just the name when there are no parameters."""
        if not self.params:
            return self.name
        return f"{self.name}({','.join(f'{k}={v}' for k, v in sorted(self.params.items()))})"

    def build(self):
        """The compressor instance (validates the parameters)."""
        return integration.resolve_compressor(self.name, self.params)


def expand_configs(
    names: Sequence[str],
    sets: dict[str | None, dict[str, Any]] | None = None,
    budgets: Sequence[float] | None = None,
    budget_param: str = "ratio",
) -> list[CompressorConfig]:
    """Every configuration of a sweep, each built once so a bad parameter fails before any model work.

    Args:
        names: registered compressor names.
        sets: parameters from :func:`parse_sets`.
        budgets: values swept over ``budget_param`` on each compressor that has that parameter.
        budget_param: the parameter ``budgets`` sets.

    Raises:
        ValueError: an unknown compressor, a parameter no selected compressor takes, a budget given both ways,
            or a parameter value the compressor rejects.
    """
    sets = dict(sets or {})
    unknown_scopes = set(sets) - {None} - set(names)
    if unknown_scopes:
        raise ValueError(f"--set names compressors that are not selected: {', '.join(sorted(unknown_scopes))}")
    configs: list[CompressorConfig] = []
    used: set[str] = set()
    for name in dict.fromkeys(names):  # unique, in order
        accepted = _accepted_params(name)
        takes = (lambda key: True) if accepted is None else accepted.__contains__  # noqa: E731
        params = {k: v for k, v in sets.get(None, {}).items() if takes(k)}
        used.update(params)
        for key in sets.get(name, {}):
            if not takes(key):
                raise ValueError(f"compressor {name!r} has no parameter {key!r} (it takes: {sorted(accepted)})")
        params.update(sets.get(name, {}))
        if budgets and takes(budget_param):
            if budget_param in params:
                raise ValueError(f"{name}: {budget_param} is set with --set and swept with --budgets; choose one")
            variants = [CompressorConfig(name, {**params, budget_param: b}, b) for b in budgets]
        else:
            variants = [CompressorConfig(name, params)]
        for config in variants:
            try:
                config.build()
            except (TypeError, ValueError) as exc:
                raise ValueError(f"invalid configuration {config.label}: {exc}") from exc
        configs.extend(variants)
    unused = set(sets.get(None, {})) - used
    if unused:
        raise ValueError(f"no selected compressor takes the parameter(s) {', '.join(sorted(unused))}")
    return configs
