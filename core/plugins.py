"""Plugin discovery and the registry of named policies, backends and compressors.

Plugins come only from the entry point group ``kvsieve`` (kvsieve's own built-ins included), or from
:func:`register` for code that wants to add a plugin object at run time (tests, notebooks). A plugin that fails
to import or whose hook raises is reported with a :class:`PluginLoadWarning` naming its distribution and entry
point, and everything else keeps working. Two plugins contributing the same name raise
:class:`PluginConflictError` naming both.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

from kvsieve import hookspecs
from kvsieve.params import UnknownParameterError

if TYPE_CHECKING:
    from kvsieve.backend import KVBackend
    from kvsieve.compressor import Compressor

__all__ = [
    "ENTRY_POINT_GROUP",
    "KINDS",
    "PluginConflictError",
    "PluginLoadWarning",
    "Registry",
    "RegistryEntry",
    "UnknownNameError",
    "plugin_manager",
    "register",
    "registry",
    "reset",
]

ENTRY_POINT_GROUP = "kvsieve"

#: registry kind -> the contribution hook that fills it
KINDS: dict[str, str] = {
    "scoring": "kvsieve_scoring_policies",
    "selection": "kvsieve_selection_policies",
    "backend": "kvsieve_backends",
    "compressor": "kvsieve_compressors",
}


class PluginLoadWarning(UserWarning):
    """A plugin could not be loaded or its hook raised; the rest of kvsieve keeps working."""


class PluginConflictError(RuntimeError):
    """Two plugins contributed the same name."""


class UnknownNameError(ValueError):
    """A name that no plugin contributed."""


@attrs.frozen
class PluginSource:
    """Where a plugin came from: its distribution (``name version``) and its entry point (``name = value``)."""

    distribution: str
    entry_point: str

    def __str__(self) -> str:
        return f"distribution {self.distribution!r}, entry point {self.entry_point!r}"


@attrs.frozen
class RegistryEntry:
    kind: str
    name: str
    obj: Any
    source: PluginSource


def _source_of(ep: importlib.metadata.EntryPoint) -> PluginSource:
    dist = getattr(ep, "dist", None)
    dist_name = f"{dist.metadata['Name']} {dist.version}" if dist is not None else "<unknown>"
    return PluginSource(dist_name, f"{ep.name} = {ep.value}")


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager with every installed ``kvsieve`` entry point loaded."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm._kvsieve_sources = {}  # plugin name -> PluginSource
    seen: set[str] = set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        source = _source_of(ep)
        key = f"{source.distribution}:{ep.name}"
        if key in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add(key)
        try:
            plugin = ep.load()
            pm.register(plugin, name=key)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break kvsieve
            warnings.warn(f"kvsieve plugin failed to load ({source}): {exc!r}", PluginLoadWarning, stacklevel=2)
            continue
        pm._kvsieve_sources[key] = source
    return pm


def register(plugin: object, name: str, distribution: str = "<runtime>") -> None:
    """Register a plugin object at run time (after entry points), then rebuild the registry."""
    pm = plugin_manager()
    pm.register(plugin, name=name)
    pm._kvsieve_sources[name] = PluginSource(distribution, f"{name} (registered at run time)")
    registry.cache_clear()


def unregister(name: str) -> None:
    """Remove a plugin registered with :func:`register`."""
    pm = plugin_manager()
    pm.unregister(name=name)
    pm._kvsieve_sources.pop(name, None)
    registry.cache_clear()


def reset() -> None:
    """Forget everything discovered (entry points are scanned again on next use)."""
    registry.cache_clear()
    plugin_manager.cache_clear()


class Registry:
    """Every contributed name, per kind, with the plugin that contributed it."""

    def __init__(self, entries: dict[str, dict[str, RegistryEntry]]):
        self._entries = entries

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def entries(self, kind: str) -> Iterator[RegistryEntry]:
        for name in self.names(kind):
            yield self._entries[kind][name]

    def get(self, kind: str, name: str) -> RegistryEntry:
        """The entry for ``name``; :class:`UnknownNameError` (with "did you mean") if none."""
        table = self._entries[kind]
        if name not in table:
            close = difflib.get_close_matches(name, list(table), n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownNameError(
                f"unknown {kind} {name!r}.{hint} Available: {', '.join(sorted(table)) or '(none)'}."
            )
        return table[name]

    def create(self, kind: str, name: str, **params: Any) -> Any:
        """Instantiate the class or factory registered as ``name`` with ``params``.

        Raises:
            UnknownNameError: no such name.
            ValueError: a parameter the class does not take (with "did you mean"), or one it rejects.
        """
        factory = self.get(kind, name).obj
        if attrs.has(factory):
            allowed = [field.name for field in attrs.fields(factory) if field.init]
            for key in params:
                if key not in allowed:
                    close = difflib.get_close_matches(key, allowed, n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    raise UnknownParameterError(
                        f"{kind} {name!r} has no parameter {key!r}.{hint} Its parameters: {', '.join(allowed)}."
                    )
        return factory(**params)

    def backend(self, name: str) -> KVBackend:
        return self.create("backend", name)

    def compressor(self, name: str, **params: Any) -> Compressor:
        return self.create("compressor", name, **params)


def _collect(pm: pluggy.PluginManager, kind: str) -> dict[str, RegistryEntry]:
    hook = getattr(pm.hook, KINDS[kind])
    table: dict[str, RegistryEntry] = {}
    sources = pm._kvsieve_sources
    for impl in hook.get_hookimpls():
        source = sources.get(impl.plugin_name, PluginSource("<unknown>", impl.plugin_name))
        try:
            contributed = dict(impl.function() or {})
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"kvsieve plugin hook {KINDS[kind]} raised ({source}): {exc!r}", PluginLoadWarning,
                          stacklevel=3)
            continue
        for name, obj in contributed.items():
            if name in table and table[name].obj is not obj:
                raise PluginConflictError(
                    f"{kind} name {name!r} is contributed twice: by {table[name].source} and by {source}. "
                    "Uninstall one of the two distributions or ask one to rename its plugin."
                )
            table[name] = RegistryEntry(kind, name, obj, source)
    return table


@functools.cache
def registry() -> Registry:
    """The registry built from every loaded plugin (cached; :func:`reset` or :func:`register` rebuild it)."""
    pm = plugin_manager()
    return Registry({kind: _collect(pm, kind) for kind in KINDS})


def has_layer_compressed_observers() -> bool:
    """Whether any plugin implements ``kvsieve_layer_compressed`` (callers skip computing its host-side sizes,
    which read the device, when none does)."""
    return bool(plugin_manager().hook.kvsieve_layer_compressed.get_hookimpls())


def notify_layer_compressed(layer_idx: int, phase: str, before: int, after: int, info: dict[str, Any]) -> None:
    """Call the ``kvsieve_layer_compressed`` observers (the arguments are the hook spec's)."""
    hook: Callable[..., Any] = plugin_manager().hook.kvsieve_layer_compressed
    if hook.get_hookimpls():
        hook(layer_idx=layer_idx, phase=phase, before=before, after=after, info=info)
