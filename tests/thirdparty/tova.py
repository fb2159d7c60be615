"""TOVA (Oren et al., 2024) on PromptCompressor: keep the prompt tokens the last one attends to most."""

import attrs
import torch

import kvsieve
from kvsieve.policy import ScoringContext, ScoringPolicy
from kvsieve.prompt import PromptCompressor


@attrs.frozen
class LastQueryScoring(ScoringPolicy):
    """Attention of the most recent query (softmax over every key it sees), averaged over every head."""

    name = "last_query_example"

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        last = ctx.queries[:, :, -1:]  # [B, H, 1, d]
        lse = ctx.backend.window_lse(last, ctx.keys, ctx.starts, ctx.ends, ctx.scale)  # [B, H, 1]
        scores = ctx.window_scores(lse, queries=last)  # [B, Hkv, N], summed over each GQA group
        return scores.mean(dim=1, keepdim=True).expand_as(scores)


@attrs.frozen
class TOVA(PromptCompressor):
    name = "tova_example"  # "tova" is the built-in (kvsieve.policies.tova); built-ins win name clashes
    default_window = 1  # the last prompt token: the query that scores, always kept

    def default_scoring(self) -> ScoringPolicy:
        return LastQueryScoring()


@kvsieve.hookimpl
def kvsieve_scoring_policies():
    return {LastQueryScoring.name: LastQueryScoring}


@kvsieve.hookimpl
def kvsieve_compressors():
    return {TOVA.name: TOVA}
