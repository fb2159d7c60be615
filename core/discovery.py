"""Finding kvsieve plugins and loading them one at a time, so that a broken plugin breaks nothing else.

Every entry point of the group ``kvsieve`` (kvsieve's own built-ins included) is a *candidate*. Listing the
candidates imports nothing. When a registry lookup needs a kind (scoring, selection, backend, compressor) or the
observer hook, kvsieve reads each candidate module's source, without running it, for the ``kvsieve_*`` names it
mentions (:func:`static_hook_names`) and imports only the candidates that may implement that hook. A candidate
whose source cannot be read that way (a ``module:attr`` entry point, a compiled module, ``from x import *``, names
made at run time) is imported for every kind. So ``import kvsieve`` and ``kvsieve --help`` import no plugin, and
a slow scoring plugin does not slow down a run that only looks up a compressor and a backend.

Each import and registration is guarded: any failure, ``SystemExit`` included (only ``KeyboardInterrupt`` goes
through), becomes a :class:`Problem`, reported once as a one-line :class:`PluginLoadWarning` that names the
distribution and the entry point, and the plugin is skipped. Imports slower than :data:`SLOW_IMPORT_S` are
reported with their time.
"""

from __future__ import annotations

import ast
import difflib
import importlib.metadata
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pluggy

from kvsieve import hookspecs

__all__ = [
    "BUILTIN_DISTRIBUTION",
    "ENTRY_POINT_GROUP",
    "KINDS",
    "OBSERVER_HOOK",
    "SLOW_IMPORT_S",
    "Candidate",
    "Discovery",
    "PluginLoadWarning",
    "PluginSource",
    "Problem",
    "describe",
    "static_hook_names",
]

ENTRY_POINT_GROUP = "kvsieve"
#: the distribution whose entry points are the built-ins (they win every name clash)
BUILTIN_DISTRIBUTION = "kvsieve"
#: imports slower than this (seconds) are reported
SLOW_IMPORT_S = 1.0
OBSERVER_HOOK = "kvsieve_layer_compressed"

#: registry kind -> the contribution hook that fills it
KINDS: dict[str, str] = {
    "scoring": "kvsieve_scoring_policies",
    "selection": "kvsieve_selection_policies",
    "backend": "kvsieve_backends",
    "compressor": "kvsieve_compressors",
}


class PluginLoadWarning(UserWarning):
    """A plugin could not be loaded, or one of its contributions or hooks failed; the rest keeps working."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@attrs.frozen
class PluginSource:
    """Where a plugin came from: its distribution (``name version``) and its entry point (``name = value``).

    ``builtin`` is true for the entry points of kvsieve's own distribution only (not for a run-time plugin that
    merely names it).
    """

    distribution: str
    entry_point: str
    builtin: bool = False

    def __str__(self) -> str:
        return f"distribution {self.distribution!r}, entry point {self.entry_point!r}"

    @property
    def order(self) -> tuple[bool, str, str]:
        """Precedence in a name clash: built-ins first, then by distribution name, then by entry point."""
        return (not self.builtin, self.distribution.lower(), self.entry_point)


@attrs.frozen
class Problem:
    """One fault of one plugin: ``kind`` is ``"plugin"`` (import, registration, hook names), ``"observer"``, or
    the registry kind the faulty contribution was for; ``name`` the contributed name or hook concerned."""

    kind: str
    name: str
    source: PluginSource
    message: str

    def __str__(self) -> str:
        return f"kvsieve plugin ({self.source}): {self.message}"

    def as_dict(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "name": self.name,
            "distribution": self.source.distribution,
            "entry_point": self.source.entry_point,
            "message": self.message,
        }


def describe(exc: BaseException) -> str:
    """One line for an exception: ``"ValueError: bad"``, ``"it called sys.exit(3)"``."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def source_of(ep: importlib.metadata.EntryPoint) -> PluginSource:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return PluginSource("<unknown>", f"{ep.name} = {ep.value}")
    name = dist.metadata["Name"] or "<unnamed>"
    return PluginSource(f"{name} {dist.version}", f"{ep.name} = {ep.value}", _canonical(name) == BUILTIN_DISTRIBUTION)


# ---------------------------------------------------------------------------------------------- static read
_DYNAMIC_CALLS = frozenset({"exec", "eval", "globals", "locals", "vars", "setattr", "__import__"})
_HOOK_TOKEN = re.compile(r"kvsieve_\w+")


def _find_spec(name: str) -> Any:
    """The module spec of ``name`` without importing it or its parent packages (None if not found)."""
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__spec__", None)
    parent = name.rpartition(".")[0]
    path = None
    if parent:
        locations = getattr(_find_spec(parent), "submodule_search_locations", None)
        if locations is None:
            return None
        path = list(locations)
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            spec = find(name, path)
        except Exception:  # noqa: BLE001 - a finder that cannot answer: the module will be imported instead
            return None
        if spec is not None:
            return spec
    return None


def _texts(node: ast.AST) -> tuple[str, ...]:
    """The identifiers (and string constants) a node mentions."""
    if isinstance(node, ast.Name):
        return (node.id,)
    if isinstance(node, ast.Attribute):
        return (node.attr,)
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return (node.name,)
    if isinstance(node, ast.alias):
        return (node.name, node.asname or "")
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return (node.value,)
    return ()


def static_hook_names(module: str) -> frozenset[str] | None:
    """Every ``kvsieve_*`` name that ``module``'s source mentions, read without importing it.

    An over-approximation of the hooks it can implement (a name in a docstring counts too). None when that
    cannot be known from the source: no ``.py`` source, a syntax error, ``from x import *``, a module-level
    ``__getattr__``, ``exec``/``setattr``/``globals()``-style calls, or a string ending in ``kvsieve_``.
    """
    origin = getattr(_find_spec(module), "origin", None)
    if not origin or not origin.endswith(".py"):
        return None
    try:
        tree = ast.parse(Path(origin).read_bytes(), filename=origin)
    except (OSError, SyntaxError, ValueError):
        return None
    if any(isinstance(node, ast.FunctionDef) and node.name == "__getattr__" for node in tree.body):
        return None
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and any(alias.name == "*" for alias in node.names):
            return None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _DYNAMIC_CALLS:
            return None
        for text in _texts(node):
            if text.endswith("kvsieve_"):  # a name built at run time, e.g. "kvsieve_" + kind
                return None
            names.update(_HOOK_TOKEN.findall(text))
    return frozenset(names)


# ---------------------------------------------------------------------------------------------- discovery
_UNREAD: Any = object()


def _import_base() -> None:
    """Import what every plugin imports (kvsieve's base classes, so torch) before any plugin is timed, so that
    torch's import time is not charged to whichever plugin happens to come first."""
    import kvsieve.backend  # noqa: F401
    import kvsieve.policy  # noqa: F401


@attrs.define(eq=False)
class Candidate:
    """An entry point not imported yet (``loaded`` once its import was tried)."""

    key: str
    entry_point: importlib.metadata.EntryPoint
    source: PluginSource
    hooks: Any = _UNREAD  # frozenset of kvsieve_* names its source mentions, None if unknown
    loaded: bool = False

    def may_implement(self, hook: str) -> bool:
        if self.hooks is _UNREAD:
            self.hooks = None if self.entry_point.attr else static_hook_names(self.entry_point.module)
        return self.hooks is None or hook in self.hooks


def find_candidates() -> list[Candidate]:
    """Every entry point of the ``kvsieve`` group, in precedence order (:attr:`PluginSource.order`)."""
    found: dict[str, Candidate] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        source = source_of(ep)
        key = f"{source.distribution}:{ep.name}"
        found.setdefault(key, Candidate(key, ep, source))  # the same distribution visible twice on sys.path
    return sorted(found.values(), key=lambda c: c.source.order)


class Discovery:
    """The process's plugins: the pluggy manager, where each plugin came from, and the problems found so far.

    ``generation`` goes up whenever the set of plugins changes in a way that can change an already built table
    (a run-time :meth:`add`/:meth:`remove`, or an imported plugin implementing a hook its source did not show).
    """

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.sources: dict[str, PluginSource] = {}
        self.problems: list[Problem] = []
        self.generation = 0
        self.lock = threading.RLock()
        self._candidates: list[Candidate] | None = None
        self._ensured: set[str] = set()
        self._reported: set[tuple] = set()
        self._callers: dict[tuple[str, str], Any] = {}
        self._spec_names = sorted(
            n for n in vars(self.pm.hook) if not n.startswith("_") and getattr(self.pm.hook, n).has_spec()
        )

    # ------------------------------------------------------------------ problems
    def report(self, kind: str, name: str, source: PluginSource, message: str, once_per: tuple | None = None) -> None:
        """Record a problem and warn about it (once per ``once_per``, default once per identical problem)."""
        key = once_per if once_per is not None else (kind, name, source, message)
        if key in self._reported:
            return
        self._reported.add(key)
        problem = Problem(kind, name, source, message)
        self.problems.append(problem)
        # warn_explicit with a non-file location: the warning prints as one line, with no source line under it
        warnings.warn_explicit(str(problem), PluginLoadWarning, "kvsieve.plugins", 0, module="kvsieve.plugins")

    # ------------------------------------------------------------------ loading
    def candidates(self) -> list[Candidate]:
        if self._candidates is None:
            self._candidates = find_candidates()
        return self._candidates

    def ensure(self, hook: str) -> None:
        """Import every candidate that may implement ``hook`` and was not imported yet."""
        with self.lock:
            if hook in self._ensured:
                return
            _import_base()
            for candidate in self.candidates():
                if not candidate.loaded and candidate.may_implement(hook):
                    self._load(candidate)
            self._ensured.add(hook)

    def ensure_all(self) -> None:
        """Import every candidate (what ``kvsieve plugins`` needs to show every problem)."""
        with self.lock:
            _import_base()
            for candidate in self.candidates():
                if not candidate.loaded:
                    self._load(candidate)

    def _load(self, candidate: Candidate) -> None:
        candidate.loaded = True
        ep, source = candidate.entry_point, candidate.source
        start = time.perf_counter()
        try:
            plugin = ep.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - SystemExit from a plugin must not end kvsieve
            self.report("plugin", ep.name, source, f"failed to import ({describe(exc)}); skipped")
            return
        elapsed = time.perf_counter() - start
        if elapsed > SLOW_IMPORT_S and not source.builtin:
            self.report(
                "plugin",
                ep.name,
                source,
                f"slow import: {elapsed:.1f} s (kvsieve imports a plugin only when a lookup needs it)",
            )
        if not self.add(plugin, candidate.key, source, strict=False):
            return
        implemented = {caller.name for caller in self.pm.get_hookcallers(plugin) or ()}
        if isinstance(candidate.hooks, frozenset) and implemented - candidate.hooks:
            self.generation += 1  # a hook its source did not show: tables built before must be rebuilt

    def add(self, plugin: object, key: str, source: PluginSource, strict: bool) -> bool:
        """Register ``plugin`` as ``key``; with ``strict`` a refusal raises, else it is reported (False)."""
        with self.lock:
            try:
                hash(plugin)  # pluggy's subset hook callers keep plugins in sets: an unhashable one breaks them all
                self.pm.register(plugin, name=key)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - ValueError (registered twice), PluginValidationError
                if strict:
                    raise
                self.report("plugin", key, source, f"could not be registered ({describe(exc)}); skipped")
                return False
            self.sources[key] = source
            self._callers.clear()
            self._check_hook_names(plugin, source)
            return True

    def remove(self, key: str) -> None:
        with self.lock:
            self.pm.unregister(name=key)
            self.sources.pop(key, None)
            self._callers.clear()
            self.generation += 1

    def _check_hook_names(self, plugin: object, source: PluginSource) -> None:
        """Warn about hooks no spec knows (what ``pm.check_pending()`` would raise for) and hook-named functions
        that lack ``@kvsieve.hookimpl``: kvsieve would never call either."""
        known = ", ".join(self._spec_names)
        for caller in self.pm.get_hookcallers(plugin) or ():
            mine = [impl for impl in caller.get_hookimpls() if impl.plugin is plugin]
            if caller.has_spec() or all(impl.optionalhook for impl in mine):
                continue
            close = difflib.get_close_matches(caller.name, self._spec_names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.report(
                "plugin",
                caller.name,
                source,
                f"implements unknown hook {caller.name!r}{hint}; it is never called. Known hooks: {known}",
            )
        for attr in self._spec_names:
            value = getattr(plugin, attr, None)
            if callable(value) and self.pm.parse_hookimpl_opts(plugin, attr) is None:
                self.report("plugin", attr, source, f"defines {attr}() without @kvsieve.hookimpl; it is never called")

    # ------------------------------------------------------------------ calling
    def implementers(self, hook: str) -> list[str]:
        """The registered plugins implementing ``hook``, in precedence order."""
        keys = {impl.plugin_name for impl in getattr(self.pm.hook, hook).get_hookimpls()}
        unknown = PluginSource("<unknown>", "")
        return sorted(keys, key=lambda k: (self.sources.get(k, unknown).order, k))

    def call_one(self, hook: str, key: str, **kwargs: Any) -> list[Any]:
        """Call ``hook`` of the plugin ``key`` alone, through pluggy (``subset_hook_caller``): its non-None
        results, and its exception, if any, is the caller's to attribute."""
        caller: Callable[..., list[Any]] | None = self._callers.get((hook, key))
        if caller is None:
            plugin = self.pm.get_plugin(key)
            others = [p for name, p in self.pm.list_name_plugin() if name != key and p is not None]
            if plugin is None:
                raise LookupError(f"no plugin registered as {key!r}")
            caller = self.pm.subset_hook_caller(hook, remove_plugins=others)
            self._callers[(hook, key)] = caller
        return caller(**kwargs)
