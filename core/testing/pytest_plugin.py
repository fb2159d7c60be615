"""kvsieve's pytest plugin (entry point ``pytest11``): markers and fixtures for testing kvsieve plugins.

Loaded automatically by pytest wherever kvsieve is installed, so it imports nothing heavy itself: torch only
when a collected test carries the ``gpu`` marker, the rest of kvsieve only inside the fixtures that need it.

* ``@pytest.mark.gpu`` tests are skipped, with a reason, when no CUDA device is available.
* ``kvsieve_registry``: a sandbox over :func:`kvsieve.plugins.registry`. Plugins registered through it
  (``kvsieve_registry.register(obj, name=..., distribution=...)``) exist for the test only; discovery is reset
  before and after the test.
* ``tiny_model``: ``(model, tokenizer)`` of ``kvsieve.models.load("tiny-random-llama")`` (3 layers, 4 query
  heads, 2 KV heads, random weights), loaded once per session.
* ``tiny_batch``: two left-padded prompts of different lengths for ``tiny_model`` (``input_ids`` and
  ``attention_mask``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from kvsieve.plugins import Registry, RegistryEntry

TINY_PROMPTS = (
    "The quick brown fox jumps over the lazy dog while the cat watches from the fence.",
    "Hello, kvsieve!",
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped when none is available)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is available on this machine")
    for item in gpu_items:
        item.add_marker(skip_gpu)


class PluginSandbox:
    """The ``kvsieve_registry`` fixture: register plugins for one test, read the registry as it is now."""

    def register(self, plugin: object, name: str, distribution: str = "test-plugin") -> None:
        """Add a plugin object (a module or an object with ``@kvsieve.hookimpl`` functions) for this test."""
        from kvsieve import plugins

        plugins.register(plugin, name=name, distribution=distribution)

    @property
    def registry(self) -> Registry:
        """The current registry (rebuilt after each :meth:`register`)."""
        from kvsieve import plugins

        return plugins.registry()

    def names(self, kind: str) -> list[str]:
        return self.registry.names(kind)

    def get(self, kind: str, name: str) -> RegistryEntry:
        return self.registry.get(kind, name)

    def create(self, kind: str, name: str, **params: Any) -> Any:
        return self.registry.create(kind, name, **params)


@pytest.fixture
def kvsieve_registry() -> Iterator[PluginSandbox]:
    """A :class:`PluginSandbox`; plugin discovery starts afresh and is reset again after the test."""
    from kvsieve import plugins

    plugins.reset()
    try:
        yield PluginSandbox()
    finally:
        plugins.reset()


@pytest.fixture(scope="session")
def tiny_model():
    """``(model, tokenizer)``: the seeded tiny random Llama (CPU, float32, eval mode), for the session."""
    from kvsieve import models

    return models.load("tiny-random-llama")


@pytest.fixture(scope="session")
def tiny_batch(tiny_model):
    """Two left-padded prompts of different lengths, tokenized for ``tiny_model``."""
    _, tokenizer = tiny_model
    return tokenizer(list(TINY_PROMPTS), return_tensors="pt", padding=True)
