"""A fast-path decoder put into the state a run has at a chosen cache length, to time its steps."""

from __future__ import annotations

import torch

from kvsieve.bench.timing import timed
from kvsieve.fastpath import StaticDecoder

__all__ = ["DecodeProbe"]


class DecodeProbe:
    """A :class:`StaticDecoder` after a random prompt, put into chosen states to time its steps.

    Args:
        model, engine: inside :func:`kvsieve.apply`.
        batch, prompt_len: the random prompt (no padding).
        new_tokens: sizes the static cache as a run of that many tokens would.
        use_cuda_graph, fuse_layers: as :class:`StaticDecoder` (default: on CUDA; when the model allows it).

    Under tensor parallelism every rank makes its own probe with the same arguments and calls the same methods in
    the same order (each step runs the model's collectives); the prompt is the same on every rank (a seeded CPU
    generator), and the clocks start and stop with every rank of the group (:func:`~kvsieve.bench.timing.timed`).
    """

    def __init__(self, model, engine, batch: int, prompt_len: int, new_tokens: int,
                 use_cuda_graph: bool | None = None, seed: int = 0, fuse_layers: bool | None = None):
        self.device = next(model.parameters()).device
        self.group = engine.heads.group  # the tensor-parallel group, or None
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(100, model.config.vocab_size, (batch, prompt_len), generator=gen).to(self.device)
        self.decoder = StaticDecoder(model, engine, use_cuda_graph, fuse_layers=fuse_layers)
        self.prefill_seconds, logits = timed(lambda: self.decoder.prefill(ids, None, new_tokens), self.device,
                                             self.group)
        self.tokens = logits.argmax(-1)
        cache = self.decoder.cache
        self.base_starts = [layer.starts.clone() for layer in cache.layers]
        self.base_ends = [layer.ends.clone() for layer in cache.layers]
        self.prompt_slots = max(int(e.max()) for e in self.base_ends)
        for layer in cache.layers:  # random K/V in the generated region (its contents do not change the cost)
            layer.keys[:, :, self.prompt_slots:].normal_()
            layer.values[:, :, self.prompt_slots:].normal_()
        self.capacity = min(layer.capacity for layer in cache.layers)
        self.step_seconds(1, steps=4)  # warm-up: eager steps, the graph capture, Triton compilation

    def set_state(self, generated: int, held: int) -> None:
        """Every layer holds its prefilled slots plus ``held`` generated entries; ``generated`` tokens were seen."""
        if held < 0 or self.prompt_slots + held + 1 > self.capacity:
            raise ValueError(f"held={held} generated entries do not fit the probe's capacity {self.capacity} "
                             f"after {self.prompt_slots} prompt slots")
        for layer, starts, ends in zip(self.decoder.cache.layers, self.base_starts, self.base_ends):
            layer.starts.copy_(starts)
            layer.ends.copy_(ends + held)
            layer.end_bound = int(ends.max()) + held
            layer.seen = layer.prompt_len + generated
            layer.device_seen.fill_(layer.seen)
            if layer.query_window:
                layer.num_queries = max(layer.num_queries, layer.query_window)
                layer.device_queries.fill_(layer.num_queries)

    def _steps(self, count: int) -> float:
        def run():
            tokens = self.tokens
            for _ in range(count):
                tokens = self.decoder.step(tokens).argmax(-1)

        return timed(run, self.device, self.group)[0]

    def step_seconds(self, live: int, steps: int = 16) -> float:
        """Mean time of a decode step attending over the prompt plus ``live`` generated entries (no compression
        fires: the generated count is kept at 1)."""
        if live < 1 or self.prompt_slots + live + steps > self.capacity:
            raise ValueError(f"live={live} (+{steps} steps) does not fit the probe's capacity {self.capacity}")
        self.set_state(generated=1, held=live - 1)
        return self._steps(steps) / steps

    def firing_step_seconds(self, generated: int, live_before: int) -> float:
        """Time of the step that appends generated token ``generated`` (with ``live_before - 1`` generated entries
        held) and runs the compression that fires there. Raises if no compaction ran."""
        self.set_state(generated=generated - 1, held=live_before - 1)
        before = [layer.compactions for layer in self.decoder.cache.layers]
        seconds = self._steps(1)
        if any(layer.compactions == b for layer, b in zip(self.decoder.cache.layers, before)):
            raise RuntimeError(f"no compaction ran at generated={generated}: the schedule model is wrong")
        return seconds

    def kv_bytes(self) -> int:
        return self.decoder.cache.nbytes()


