"""``none``: the full cache. Nothing is evicted; the baseline every compressor is compared with."""

from __future__ import annotations

from typing import ClassVar

import attrs

import kvsieve
from kvsieve.compressor import Compressor, LayerEvent

__all__ = ["FullCache"]


@attrs.frozen
class FullCache(Compressor):
    """Keep every token (no parameters)."""

    name: ClassVar[str] = "none"

    def after_attention(self, event: LayerEvent) -> None:
        return None


@kvsieve.hookimpl
def kvsieve_compressors():
    return {FullCache.name: FullCache}
