"""Every extension point of kvsieve, in one place.

kvsieve is a pluggy project named ``"kvsieve"``. A plugin is a plain module (or object) with functions decorated by
:data:`kvsieve.hookimpl` whose names match the specs below. kvsieve finds plugins through the entry point group
``kvsieve`` in installed distributions' metadata; its own built-in policies and backends are registered the same way,
from kvsieve's own ``pyproject.toml``::

    [project.entry-points.kvsieve]
    my_policies = "my_package.kvsieve_plugin"

Contribution hooks (``kvsieve_scoring_policies`` ... ``kvsieve_compressors``) are called once when the registry
is built; each returns a mapping from a public name to a class or factory. A name may be contributed only once:
two plugins contributing the same name make :func:`kvsieve.plugins.registry` raise
:class:`~kvsieve.plugins.PluginConflictError` naming both distributions.

Lifecycle hooks (``kvsieve_layer_compressed``) are called while models run; implement them to observe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from kvsieve.backend import KVBackend
    from kvsieve.compressor import Compressor
    from kvsieve.policy import ScoringPolicy, SelectionPolicy

PROJECT_NAME = "kvsieve"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def kvsieve_scoring_policies() -> Mapping[str, type[ScoringPolicy]]:
    """Contribute scoring policies: ``{name: ScoringPolicy subclass}``.

    A scoring policy turns a :class:`~kvsieve.policy.ScoringContext` into importance scores
    ``float32 [B, Hkv, N]``. Its class must be constructible from keyword arguments (its parameters).
    """


@hookspec
def kvsieve_selection_policies() -> Mapping[str, type[SelectionPolicy]]:
    """Contribute selection policies: ``{name: SelectionPolicy subclass}``.

    A selection policy turns scores, a budget and the protected set into sorted kept indices.
    """


@hookspec
def kvsieve_backends() -> Mapping[str, type[KVBackend]]:
    """Contribute kernel backends: ``{name: KVBackend subclass}`` (instantiated with no arguments).

    ``KVBackend.available()`` tells whether the backend can run on this machine; an unavailable backend is
    still listed by ``kvsieve plugins``, with its reason.
    """


@hookspec
def kvsieve_compressors() -> Mapping[str, Callable[..., Compressor]]:
    """Contribute named compressors (presets): ``{name: factory(**params) -> Compressor}``.

    A factory is usually the Compressor subclass itself (an attrs class whose validators reject bad
    parameters with a message naming the argument, the value and what is allowed).
    """


@hookspec
def kvsieve_layer_compressed(layer_idx: int, phase: str, before: int, after: int, info: Mapping[str, Any]) -> None:
    """Observe a compaction: layer ``layer_idx`` went from ``before`` to ``after`` live slots (max over rows and
    KV heads) during ``phase`` (``"prefill"`` or ``"decode"``). ``info`` carries the compressor's name and
    the decode step (generated tokens so far), when known.
    """
