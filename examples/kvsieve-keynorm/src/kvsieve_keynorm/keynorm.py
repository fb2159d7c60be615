"""Key-norm scoring (Devoto et al., 2024): a key with a small L2 norm draws high attention, so a token scores
-||k||. The whole plugin: kvsieve finds it through the entry point ``keynorm = "kvsieve_keynorm.keynorm"``
(group ``kvsieve``). The compressor takes PromptCompressor's parameters: ratio (0.5) or budget, window (8), ..."""

import attrs
import torch

import kvsieve
from kvsieve.policy import ScoringContext, ScoringPolicy
from kvsieve.prompt import PromptCompressor


@attrs.frozen
class KeyNormScoring(ScoringPolicy):
    """Score each candidate by the negated L2 norm of its key (larger = more important). No parameters."""

    name = "keynorm"  # plain class attributes (no annotation): not parameters
    needs_queries = False

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        slots, valid = ctx.candidate_slots()  # [B, Hkv, N] each
        keys = ctx.keys.gather(2, slots[..., None].expand(*slots.shape, ctx.keys.shape[-1]))
        return (-torch.linalg.vector_norm(keys.float(), dim=-1)).masked_fill(~valid, 0.0)


@attrs.frozen
class KeyNormCompressor(PromptCompressor):
    """Keep the prompt tokens with the smallest key norms, once, after prefill."""

    name = "keynorm"
    default_ratio = 0.5
    default_window = 8

    def default_scoring(self) -> ScoringPolicy:
        return KeyNormScoring()


@kvsieve.hookimpl
def kvsieve_scoring_policies():
    return {KeyNormScoring.name: KeyNormScoring}


@kvsieve.hookimpl
def kvsieve_compressors():
    return {KeyNormCompressor.name: KeyNormCompressor}
