"""kvsieve: KV-cache compression for HuggingFace decoder-only models, built from plugins.

The public entry points::

    kvsieve.generate(model, input_ids, attention_mask, compressor="snapkv", params={...}, backend="auto", ...)
    with kvsieve.apply(model, "rpc", params={...}):
        model.generate(...)

Policies, backends and compressors are discovered through the ``kvsieve`` entry point group
(see :mod:`kvsieve.hookspecs` and ``kvsieve plugins``).
"""

from kvsieve.hookspecs import hookimpl

__version__ = "0.2.0"

__all__ = ["GenerationResult", "SieveCache", "__version__", "apply", "generate", "hookimpl", "plugins"]


def __getattr__(name: str):
    # transformers is imported only when the HF integration is used, so `import kvsieve` and plugin
    # discovery stay light.
    if name in ("apply", "generate", "GenerationResult"):
        from kvsieve import integration

        return getattr(integration, name)
    if name == "plugins":  # light (imports no plugin): `import kvsieve; kvsieve.plugins.registry()` works
        import importlib

        return importlib.import_module("kvsieve.plugins")
    if name == "SieveCache":
        from kvsieve.cache import SieveCache

        return SieveCache
    raise AttributeError(f"module 'kvsieve' has no attribute {name!r}")
