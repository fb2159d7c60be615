"""kvsieve: KV-cache compression for HuggingFace decoder-only models, built from plugins."""

from kvsieve.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["hookimpl", "__version__"]
