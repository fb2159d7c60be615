"""kvsieve's testing kit: hypothesis strategies and conformance checks for policies and backends.

A third party tests its own plugin with it (``pip install 'kvsieve[test]'`` brings hypothesis and pytest)::

    from kvsieve.testing import assert_scoring_conforms

    def test_my_scoring_conforms():
        assert_scoring_conforms(MyScoring())

* :mod:`kvsieve.testing.strategies`: hypothesis strategies (caches with GQA and padding, scores, budgets,
  ...);
* :mod:`kvsieve.testing.conformance`: ``check_*`` (one input) and ``assert_*_conforms`` (hypothesis-driven)
  for selection policies, scoring policies and backends;
* :mod:`kvsieve.testing.pytest_plugin`: loaded by pytest automatically (entry point ``pytest11``): the ``gpu``
  marker and the ``kvsieve_registry``, ``tiny_model`` and ``tiny_batch`` fixtures.

Names are imported lazily, so loading the pytest plugin does not import hypothesis. See ``docs/testing.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

#: the public names of :mod:`kvsieve.testing.conformance` (its ``__all__``), listed here so that they are
#: re-exported without importing it
_CONFORMANCE_NAMES = (
    "POISONS",
    "PRIMITIVES",
    "SCORE_TOLERANCES",
    "TOLERANCES",
    "assert_backend_conforms",
    "assert_scoring_conforms",
    "assert_selection_conforms",
    "check_backend",
    "check_scoring",
    "check_selection",
    "conformance_settings",
    "poison",
)

_EXPORTS = {
    "strategies": "kvsieve.testing.strategies",
    "conformance": "kvsieve.testing.conformance",
    **dict.fromkeys(_CONFORMANCE_NAMES, "kvsieve.testing.conformance"),
    **dict.fromkeys(
        ("CacheCase", "CompactionCase", "LayerOpsCase", "PrefillCase", "SelectionCase", "Sizes"),
        "kvsieve.testing.strategies",
    ),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvsieve.testing' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if module.__name__.endswith(f".{name}") else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
