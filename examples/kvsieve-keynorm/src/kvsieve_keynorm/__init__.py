"""kvsieve-keynorm: an example kvsieve plugin (key-norm scoring and the ``keynorm`` compressor)."""

from kvsieve_keynorm.keynorm import KeyNormCompressor, KeyNormScoring

__all__ = ["KeyNormCompressor", "KeyNormScoring"]
