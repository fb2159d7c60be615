"""The hybrid ``fastkv+rpc``: FastKV compresses the long prompt while it is prefilled, RPC the reasoning that
follows it while it is generated.

A :class:`~kvsieve.composition.Preset` of the registered ``fastkv`` (prefill slot) and ``rpc`` (decode slot);
see docs/composition.md. Parameters are the parts' own, addressed as ``fastkv.<param>`` and ``rpc.<param>``
(defaults: the parts' defaults)::

    kvsieve generate --compressor fastkv+rpc --set fastkv.tsp_rate=0.2 --set rpc.interval=1024

Each layer ends up with the prompt KV FastKV kept in it (``K_l``: ``ratio * Lp`` per layer at the
defaults, more where ``ratio >= tsp_rate``) followed by what RPC keeps of the ``g`` generated tokens, so
a layer holds ``K_l + RPC.cache_length(0, g)`` entries: ``K_l + g`` before the first compression at
``g = P + R``, then ``K_l + k * floor(ratio * P) + R`` after the k-th.
"""

from __future__ import annotations

import kvsieve
from kvsieve.composition import Part, Preset

__all__ = ["FASTKV_RPC"]

FASTKV_RPC = Preset("fastkv+rpc", [Part("fastkv", "prefill"), Part("rpc", "decode")])


@kvsieve.hookimpl
def kvsieve_compressors():
    return {FASTKV_RPC.name: FASTKV_RPC}
