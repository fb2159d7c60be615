"""The registry of named policies, backends and compressors, built from plugins.

Plugins come only from the entry point group ``kvsieve`` (kvsieve's own built-ins included), or from
:func:`register` for code that adds a plugin object at run time (tests, notebooks). Discovery is lazy and
guarded (:mod:`kvsieve.discovery`): nothing is imported before a lookup needs it, and a plugin that fails to
import, whose contribution hook raises or contributes something invalid, whose backend's ``available()`` raises,
whose observer raises, or that takes a name already taken, is reported (one :class:`PluginLoadWarning` line
naming its distribution and entry point, and an entry in :meth:`Registry.problems`) and skipped.

Name clashes: a built-in (an entry point of the ``kvsieve`` distribution) always keeps its name; between other
plugins the first in distribution-name order (then entry-point order) keeps it. The other contribution is
skipped and reported.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from kvsieve.configure import configure
from kvsieve.discovery import (
    ENTRY_POINT_GROUP,
    KINDS,
    OBSERVER_HOOK,
    Discovery,
    PluginLoadWarning,
    PluginSource,
    Problem,
    describe,
)
from kvsieve.params import parse_params
from kvsieve.policy import ScoringPolicy, SelectionPolicy

if TYPE_CHECKING:
    import pluggy
    import torch

    from kvsieve.backend import KVBackend
    from kvsieve.compressor import Compressor

__all__ = [
    "build_compressor",
    "describe_object",
    "resolve_policy",
    "scoring_policy",
    "selection_policy",
    "ENTRY_POINT_GROUP",
    "KINDS",
    "PluginConflictError",
    "PluginLoadWarning",
    "PluginSource",
    "Problem",
    "Registry",
    "RegistryEntry",
    "UnknownNameError",
    "has_layer_compressed_observers",
    "notify_layer_compressed",
    "plugin_manager",
    "register",
    "registry",
    "reset",
    "unregister",
]

#: what a contributed name may look like (no spaces, no dots: ``--set name.param`` scopes at the first dot)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+\-]*")


class PluginConflictError(RuntimeError):
    """A plugin name given to :func:`register` is already registered.

    (Two plugins contributing one policy/backend/compressor name no longer raise: the clash is reported as a
    :class:`Problem` and the first in precedence order keeps the name.)
    """


class UnknownNameError(ValueError):
    """A name that no plugin contributed."""


@attrs.frozen
class RegistryEntry:
    kind: str
    name: str
    obj: Any
    source: PluginSource


# ---------------------------------------------------------------------------------------------- validation
def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _invalid(kind: str, name: Any, obj: Any) -> str | None:
    """Why ``name: obj`` cannot be registered as a ``kind``, or None if it can."""
    if not isinstance(name, str):
        return f"{KINDS[kind]} contributed the key {_short(name)} ({type(name).__name__}); names must be strings"
    if not NAME_PATTERN.fullmatch(name):
        return (
            f"{kind} name {name!r} is not allowed: a name is letters, digits, '_', '-' and '+', "
            "starting with a letter or digit"
        )
    if kind == "compressor":
        from kvsieve.compressor import Compressor

        if not callable(obj):
            return f"compressor {name!r} is {_short(obj)}, expected a Compressor subclass or a factory (a callable)"
        if isinstance(obj, type) and not issubclass(obj, Compressor):
            return f"compressor {name!r} is the class {obj.__qualname__}, which is not a kvsieve.Compressor subclass"
        return None
    if kind == "backend":
        from kvsieve.backend import KVBackend as expected
    else:
        expected = ScoringPolicy if kind == "scoring" else SelectionPolicy
    wanted = f"{expected.__module__}.{expected.__qualname__}"
    if not (isinstance(obj, type) and issubclass(obj, expected)):
        return f"{kind} {name!r} is {_short(obj)}, expected a subclass of {wanted}"
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        return f"{kind} {name!r} ({obj.__qualname__}) is abstract: it lacks {missing}"
    return None


def _probe_backend(cls: type) -> str | None:
    """Why a backend class cannot even tell whether it is available (its constructor or available() raises)."""
    step = "creating it"
    try:
        instance = cls()
        step = "its available()"
        ok, why = instance.available()
        bool(ok), str(why)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001
        return f"{step} raised {describe(exc)}"
    return None


def _collect(discovery: Discovery, kind: str) -> dict[str, RegistryEntry]:
    """Call each plugin's contribution hook for ``kind`` on its own (through pluggy) and keep what is valid."""
    hook = KINDS[kind]
    table: dict[str, RegistryEntry] = {}
    for key in discovery.implementers(hook):
        source = discovery.sources.get(key, PluginSource("<unknown>", key))
        try:
            results = discovery.call_one(hook, key)
            contributed = results[0] if results else None
            items = list(contributed.items()) if isinstance(contributed, Mapping) else None
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - a broken plugin must not break kvsieve
            discovery.report(kind, hook, source, f"hook {hook} raised {describe(exc)}; its {kind} names are skipped")
            continue
        if items is None:
            discovery.report(
                kind,
                hook,
                source,
                f"hook {hook} returned {_short(contributed)}, expected a mapping {{name: ...}}; skipped",
            )
            continue
        for name, obj in items:
            why = _invalid(kind, name, obj)
            if why is None and kind == "backend" and not source.builtin:
                why = _probe_backend(obj)
            if why is not None:
                discovery.report(kind, name if isinstance(name, str) else _short(name), source, f"{why}; skipped")
                continue
            held = table.get(name)
            if held is None:
                table[name] = RegistryEntry(kind, name, obj, source)
            elif held.obj is not obj:
                rule = "built-ins keep their names" if held.source.builtin else "the first distribution by name wins"
                discovery.report(
                    kind, name, source, f"{kind} name {name!r} is already taken by {held.source} ({rule}); skipped"
                )
    return table


# ---------------------------------------------------------------------------------------------- registry
class Registry:
    """Every contributed name, per kind, with the plugin that contributed it. Each kind's table is built on
    its first lookup (importing only the plugins that may contribute to it) and rebuilt when plugins change."""

    def __init__(self, discovery: Discovery):
        self._discovery = discovery
        self._tables: dict[str, dict[str, RegistryEntry]] = {}
        self._generation = discovery.generation

    def _table(self, kind: str) -> dict[str, RegistryEntry]:
        if kind not in KINDS:
            raise ValueError(f"unknown registry kind {kind!r}; the kinds are {', '.join(KINDS)}")
        discovery = self._discovery
        with discovery.lock:
            discovery.ensure(KINDS[kind])
            if self._generation != discovery.generation:
                self._tables.clear()
                self._generation = discovery.generation
            if kind not in self._tables:
                self._tables[kind] = _collect(discovery, kind)
            return self._tables[kind]

    def names(self, kind: str) -> list[str]:
        return sorted(self._table(kind))

    def entries(self, kind: str) -> Iterator[RegistryEntry]:
        table = self._table(kind)
        for name in sorted(table):
            yield table[name]

    def get(self, kind: str, name: str) -> RegistryEntry:
        """The entry for ``name``; :class:`UnknownNameError` (with "did you mean") if none."""
        table = self._table(kind)
        if name not in table:
            self.load_all()  # an unknown name: import every plugin, so that a broken one is reported
            table = self._table(kind)
        if name not in table:
            close = difflib.get_close_matches(name, list(table), n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            known = f" Available: {', '.join(sorted(table))}." if table else f" No {kind} is registered."
            problems = self.problems()
            trouble = f" ({len(problems)} plugin problem(s): see `kvsieve plugins`.)" if problems else ""
            raise UnknownNameError(f"unknown {kind} {name!r}.{hint}{known}{trouble}")
        return table[name]

    def create(self, kind: str, name: str, **params: Any) -> Any:
        """Instantiate the class or factory registered as ``name`` with ``params``.

        Raises:
            UnknownNameError: no such name.
            UnknownParameterError: a parameter the class does not take (with "did you mean"); dotted keys
                (``scoring.pooling``) set the parameters of a policy the object holds (:mod:`kvsieve.configure`).
            ValueError, TypeError: a value it rejects.
        """
        factory = self.get(kind, name).obj
        return configure(factory, params, f"{kind} {name!r}")

    def backend(self, name: str) -> KVBackend:
        return self.create("backend", name)

    def compressor(self, name: str, **params: Any) -> Compressor:
        return self.create("compressor", name, **params)

    # ------------------------------------------------------------------ backends, safely
    def _backend_check(self, name: str, device: Any, dtype: Any) -> tuple[KVBackend | None, bool, str]:
        entry = self.get("backend", name)
        try:
            instance = entry.obj()
            if device is None or dtype is None:
                ok, why = instance.available()
            else:
                import torch

                ok, why = instance.supports(torch.device(device), dtype)
            return instance, bool(ok), str(why or "")
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - a faulty backend is unavailable, not fatal
            reason = f"its availability check raised {describe(exc)}"
            self._discovery.report("backend", name, entry.source, f"backend {name!r}: {reason}; treated as unavailable")
            return None, False, reason

    def backend_status(
        self, name: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> tuple[bool, str]:
        """``(ok, reason)``: whether backend ``name`` can run here (on ``device``/``dtype`` when both are given).

        Never raises for a faulty backend (a raising ``available()``/``supports()`` is reported and gives
        ``(False, reason)``); :class:`UnknownNameError` for a name no plugin contributed.
        """
        _, ok, why = self._backend_check(name, device, dtype)
        return ok, why

    def available_backends(self, device: torch.device | str, dtype: torch.dtype) -> list[KVBackend]:
        """Instances of every backend that can run ``dtype`` on ``device``, best first (highest
        ``auto_priority``, then name). Faulty backends are reported and left out; what ``backend="auto"`` picks
        from."""
        found = []
        for entry in self.entries("backend"):
            instance, ok, _ = self._backend_check(entry.name, device, dtype)
            if ok and instance is not None:
                found.append((-int(getattr(instance, "auto_priority", 0)), entry.name, instance))
        return [instance for *_, instance in sorted(found, key=lambda item: item[:2])]

    # ------------------------------------------------------------------ problems
    def load_all(self) -> None:
        """Import every installed plugin and build every table (so that :meth:`problems` is complete)."""
        self._discovery.ensure_all()
        for kind in KINDS:
            self._table(kind)

    def problems(self) -> list[Problem]:
        """Every plugin problem found so far (call :meth:`load_all` first for all of them)."""
        return list(self._discovery.problems)


# ---------------------------------------------------------------------------------------------- process state
_state: tuple[Discovery, Registry] | None = None


def _current() -> tuple[Discovery, Registry]:
    global _state
    if _state is None:
        discovery = Discovery()
        _state = (discovery, Registry(discovery))
    return _state


def registry() -> Registry:
    """The process-wide registry (imports nothing until a lookup; :func:`reset` starts afresh)."""
    return _current()[1]


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide pluggy manager with every installed ``kvsieve`` entry point loaded."""
    discovery = _current()[0]
    discovery.ensure_all()
    return discovery.pm


def register(plugin: object, name: str, distribution: str = "<runtime>") -> None:
    """Register a plugin object at run time; the registry is rebuilt on its next lookup.

    Raises:
        PluginConflictError: a plugin is already registered as ``name``.
        ValueError, pluggy.PluginValidationError: pluggy refuses the plugin (registered twice, bad hook arguments).
    """
    discovery = _current()[0]
    with discovery.lock:
        if discovery.pm.get_plugin(name) is not None:
            raise PluginConflictError(f"a plugin is already registered as {name!r} ({discovery.sources.get(name)})")
        discovery.add(plugin, name, PluginSource(distribution, f"{name} (registered at run time)"), strict=True)
        discovery.generation += 1


def unregister(name: str) -> None:
    """Remove a plugin registered with :func:`register`."""
    _current()[0].remove(name)


def reset() -> None:
    """Forget everything discovered (entry points are scanned again on the next lookup)."""
    global _state
    _state = None


# ---------------------------------------------------------------------------------------------- observers
def has_layer_compressed_observers() -> bool:
    """Whether any plugin implements ``kvsieve_layer_compressed`` (callers skip computing its host-side sizes,
    which read the device, when none does)."""
    discovery = _current()[0]
    discovery.ensure(OBSERVER_HOOK)
    return bool(getattr(discovery.pm.hook, OBSERVER_HOOK).get_hookimpls())


def notify_layer_compressed(layer_idx: int, phase: str, before: int, after: int, info: dict[str, Any]) -> None:
    """Call each ``kvsieve_layer_compressed`` observer (the arguments are the hook spec's); one that raises is
    reported (once) and never aborts."""
    discovery = _current()[0]
    discovery.ensure(OBSERVER_HOOK)
    keys = discovery.implementers(OBSERVER_HOOK)
    if not keys:
        return
    kwargs = dict(layer_idx=layer_idx, phase=phase, before=before, after=after, info=info)
    for key in keys:
        try:
            discovery.call_one(OBSERVER_HOOK, key, **kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - an observer must never abort generation
            source = discovery.sources.get(key, PluginSource("<unknown>", key))
            discovery.report(
                "observer",
                OBSERVER_HOOK,
                source,
                f"observer {OBSERVER_HOOK} raised {describe(exc)} (layer {layer_idx}, {phase}); "
                "generation goes on (later errors of this observer are not reported)",
                once_per=("observer", key, id(discovery)),
            )


# ---------------------------------------------------------------------------------------------- building
def resolve_policy(value: str | ScoringPolicy | SelectionPolicy, kind: str):
    """Turn a registered policy name into an instance (an instance passes through).

    Args:
        value: a name from the registry or a policy instance.
        kind: ``"scoring"`` or ``"selection"``.

    Raises:
        TypeError: neither a name nor an instance of the policy kind.
    """
    expected = ScoringPolicy if kind == "scoring" else SelectionPolicy
    if isinstance(value, expected):
        return value
    if not isinstance(value, str):
        raise TypeError(
            f"{kind} must be the name of a registered {kind} policy (see `kvsieve plugins`) or a "
            f"{expected.__name__} instance, got {value!r}"
        )
    return registry().create(kind, value)


def scoring_policy(value: str | ScoringPolicy) -> ScoringPolicy:
    """attrs converter of a ``scoring`` field: a registered name or a :class:`ScoringPolicy` instance."""
    return resolve_policy(value, "scoring")


def selection_policy(value: str | SelectionPolicy) -> SelectionPolicy:
    """attrs converter of a ``selection`` field: a registered name or a :class:`SelectionPolicy` instance."""
    return resolve_policy(value, "selection")


def build_compressor(name: str, params: Mapping[str, Any] | None = None) -> Compressor:
    """The registered compressor ``name`` built with ``params`` (:mod:`kvsieve.params` syntax: ``key``,
    ``scoring.key``, ``selection.key``, ``part.key`` for compositions; a dict, possibly nested).

    Raises:
        UnknownNameError: no compressor is registered as ``name``.
        UnknownParameterError: a parameter it does not take (with "did you mean").
        ValueError, TypeError: a value it rejects (the message names the parameter).
    """
    return registry().create("compressor", name, **parse_params(params, source="params"))


def describe_object(obj: Any, kind: str) -> str:
    """``scoring policy 'x' (distribution 'd 1.0', entry point 'x = mod')`` for an instance of a registered class;
    one that no plugin registered is named by its class (used to name the plugin behind a contract fault)."""
    label = "backend" if kind == "backend" else f"{kind} policy" if kind in ("scoring", "selection") else kind
    name = getattr(obj, "name", "") or type(obj).__name__
    try:
        for entry in registry().entries(kind):
            if entry.obj is type(obj):
                return f"{label} {name!r} ({entry.source})"
    except Exception:  # noqa: BLE001 - naming the plugin must never hide the fault being reported
        pass
    return f"{label} {name!r} (class {type(obj).__module__}.{type(obj).__qualname__}, not registered)"
