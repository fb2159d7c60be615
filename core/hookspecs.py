"""Every extension point of kvsieve, in one place.

kvsieve is a pluggy project named ``"kvsieve"``. A plugin is a plain module (or object) with functions decorated by
:data:`kvsieve.hookimpl` whose names match the specs below. kvsieve finds plugins through the entry point group
``kvsieve`` in installed distributions' metadata; its own built-in policies and backends are registered the same way,
from kvsieve's own ``pyproject.toml``::

    [project.entry-points.kvsieve]
    my_policies = "my_package.kvsieve_plugin"

Contribution hooks (``kvsieve_scoring_policies`` ... ``kvsieve_compressors``) are called once per plugin when
the registry table of their kind is first needed; each returns a mapping from a public name (letters, digits,
``_``, ``-``, ``+``) to a class or factory. Invalid contributions, and hooks that raise, are reported with a
:class:`~kvsieve.plugins.PluginLoadWarning` naming the distribution and entry point, and skipped. A name is
kept by one plugin only: a built-in (kvsieve's own distribution) always keeps its name; otherwise the first
distribution in name order keeps it. The other contribution is skipped and reported (``kvsieve plugins`` lists
it under "Problems:").

Define the hooks (or import them by name) at module level in the entry-point module: kvsieve reads that module's
source, without running it, to know which kinds it contributes to, and imports it only when one of them is
looked up (see :mod:`kvsieve.discovery`). A function named like a hook but misspelt, or not decorated with
:data:`kvsieve.hookimpl`, is reported.

Lifecycle hooks (``kvsieve_layer_compressed``) are called while models run; implement them to observe. An
observer that raises is reported once and never stops generation.
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
