"""The compressor configurations of a sweep: compressor specs x shared parameters x budgets.

A sweep names its compressors as specs (``NAME[:key=value,...]``, :mod:`kvsieve.params`), so a new compressor plugs
in by name with nothing special-cased here. Two settings reach across the listed compressors, each only the
compressors that take the parameter (asked of the compressor itself, :func:`takes_parameter`):

* shared parameters (``--set key=value``): every listed compressor that takes ``key`` gets it (``rpc.interval`` is
  taken by the part ``rpc`` of ``fastkv+rpc``); a key that none takes is an error, and so is a key that a spec also
  gives;
* budgets (``--budgets``): swept over the parameter ``budget_param`` (default ``ratio``) on every compressor that
  takes it, unless its spec fixes it; the others (``none``) run once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from kvsieve import integration
from kvsieve.params import CompressorSpec, UnknownParameterError, parse_compressor_specs, parse_params
from kvsieve.plugins import UnknownNameError

__all__ = ["CompressorConfig", "expand_configs", "takes_parameter"]


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
        return CompressorSpec(self.name, dict(sorted(self.params.items()))).label

    def build(self):
        """The compressor instance (validates the parameters)."""
        return integration.resolve_compressor(self.name, self.params)


def takes_parameter(name: str, key: str, value: Any) -> bool:
    """Whether compressor ``name`` has a parameter ``key``: building it with ``{key: value}`` alone raises
    :class:`~kvsieve.params.UnknownParameterError` exactly when it has not. A value it rejects still counts (the
    name is known; the value is checked with the whole configuration).

    Raises:
        UnknownNameError: no compressor ``name`` (or, for ``a+b``, no part ``a`` or ``b``).
    """
    return _unknown_parameter(name, key, value) is None


def _unknown_parameter(name: str, key: str, value: Any,
                       given: Mapping[str, Any] | None = None) -> UnknownParameterError | None:
    """The error of building ``name`` with ``key`` set, on top of the parameters its spec ``given`` (a parameter
    may exist only there: ``selection.alpha`` once the spec says ``selection=adaptive``), or None."""
    try:
        integration.resolve_compressor(name, {**(given or {}), key: value})
    except UnknownParameterError as exc:
        return exc
    except UnknownNameError:
        raise
    except (TypeError, ValueError):
        pass
    return None


def _as_specs(items: Iterable[CompressorSpec | str]) -> list[CompressorSpec]:
    """Specs in order, duplicates dropped; strings are comma lists of specs (``"snapkv:window=8,rpc"``)."""
    specs: dict[str, CompressorSpec] = {}
    for item in items:
        for spec in [item] if isinstance(item, CompressorSpec) else parse_compressor_specs([item]):
            specs.setdefault(str(spec), spec)
    return list(specs.values())


def _check_names(specs: Sequence[CompressorSpec]) -> None:
    """Unknown compressor names fail first, before their parameters are looked at."""
    for spec in specs:
        try:
            integration.resolve_compressor(spec.name, {})
        except UnknownNameError as exc:
            raise UnknownNameError(f"invalid configuration {spec.name}: {exc}") from exc
        except (TypeError, ValueError):
            pass  # a known name; its parameters are checked with the whole configuration


def _shared_params(specs: Sequence[CompressorSpec], shared: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each spec's parameters (keyed by the spec's text) plus the shared ones it takes."""
    params = {str(spec): dict(spec.params) for spec in specs}
    for key, value in shared.items():
        refusals = {str(spec): _unknown_parameter(spec.name, key, value, spec.params) for spec in specs}
        takers = [spec for spec in specs if refusals[str(spec)] is None]
        if not takers:
            hints = [f"; {exc}" for exc in refusals.values() if "Did you mean" in str(exc)]  # the first suggestion
            raise UnknownParameterError(
                f"--set {key}={value}: none of the listed compressors ({', '.join(refusals) or 'none listed'}) "
                f"takes {key!r}"
                + "".join(hints[:1])
            )
        for spec in takers:
            if key in spec.params:
                raise ValueError(
                    f"{key} is given twice for {spec.name}: in --compressor {spec} and in --set {key}={value}; "
                    "give it once"
                )
            params[str(spec)][key] = value
    return params


def expand_configs(
    specs: Iterable[CompressorSpec | str],
    sets: Mapping[str, Any] | None = None,
    budgets: Sequence[float] | None = None,
    budget_param: str = "ratio",
) -> list[CompressorConfig]:
    """Every configuration of a sweep, each built once so a bad parameter fails before any model work.

    Args:
        specs: compressor specs, or their text (``"snapkv:window=8"``; a string may hold a comma list of specs).
        sets: shared parameters (``{"window": 8}``, as :func:`kvsieve.params.parse_params` reads ``--set``), given to
            every listed compressor that takes them.
        budgets: values swept over ``budget_param`` on each compressor that takes that parameter and whose spec
            does not fix it.
        budget_param: the parameter ``budgets`` sets.

    Returns:
        the configurations in the order of ``specs`` (duplicates dropped), a compressor's budgets in a row.

    Raises:
        ValueError: an unknown compressor, a shared parameter that no listed compressor takes or that a spec also
            gives, a budget given both with ``sets`` and ``budgets``, or a parameter value a compressor rejects.
    """
    specs = _as_specs(specs)
    _check_names(specs)
    params = _shared_params(specs, parse_params(sets or {}, source="--set"))
    configs: list[CompressorConfig] = []
    for spec in specs:
        fixed = params[str(spec)]
        swept = bool(budgets) and budget_param not in spec.params  # a spec that fixes the budget runs as given
        swept = swept and takes_parameter(spec.name, budget_param, budgets[0])
        if swept and budget_param in fixed:
            raise ValueError(f"{spec.name}: {budget_param} is set with --set and swept with --budgets; choose one")
        if swept:
            variants = [CompressorConfig(spec.name, {**fixed, budget_param: b}, b) for b in budgets]
        else:
            variants = [CompressorConfig(spec.name, fixed)]
        for config in variants:
            try:
                config.build()
            except (TypeError, ValueError) as exc:
                raise ValueError(f"invalid configuration {config.label}: {exc}") from exc
        configs.extend(variants)
    return configs
