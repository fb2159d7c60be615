"""The accuracy harness: synthetic retrieval tasks, decode-time fidelity, sweeps and their reports.

* :mod:`kvsieve.evaluation.tasks`: seeded passkey / needle prompts of exact token length and controlled depth.
* :mod:`kvsieve.evaluation.scoring`: exact-match scoring and partial credit (standard library only).
* :mod:`kvsieve.evaluation.fidelity`: teacher-forced NLL, free-running agreement, decode-path retrieval and
  repeat-copy NLL against the full cache.
* :mod:`kvsieve.evaluation.configs`: the compressor configurations of a sweep (compressors x budgets).
* :mod:`kvsieve.evaluation.retrieval`: passkey / needle sweeps over configurations x lengths x depths.
* :mod:`kvsieve.evaluation.report`: their markdown tables and PNG plots, redrawn from earlier runs too.
* :mod:`kvsieve.evaluation.outputs`: JSON / JSONL files and each run's metadata.
* :mod:`kvsieve.evaluation.cli`: the ``kvsieve eval`` subcommand.

docs/accuracy.md holds the measured results and how each was produced.
"""

from kvsieve.evaluation.scoring import key_prefix, score
from kvsieve.evaluation.tasks import Prompt, PromptTooLongError, make_prompt, make_prompts

__all__ = ["Prompt", "PromptTooLongError", "key_prefix", "make_prompt", "make_prompts", "score"]
