"""Run-time checks where plugin output enters the cache: a faulty scoring or selection policy cannot corrupt it.

:func:`kvsieve.compressor.compress_layer` passes every score tensor and every selection through a
:class:`ContractGuard` before the cache is compacted, and :func:`kvsieve.propagation.propagate` every token
selection before later layers compute on it. What is checked (docs/reliability.md):

* scores: a tensor of exactly ``[B, Hkv, N]`` (``N`` the candidate count), floating point, finite on every valid
  candidate; the scoring call left the layer's cache unchanged (a fingerprint of the live keys, values and
  positions and of the live range, taken before and after the call);
* a selection: a :class:`~kvsieve.policy.Selection` whose ``keep`` is ``int64 [B, Hkv, K]`` and ``counts``
  ``int64 [B, Hkv]``; per row and KV head exactly ``min(budget, n)`` kept (for a ``head_adaptive`` policy: per row
  ``sum_h min(budget, n_h)`` in all, each head keeping from its protected candidates to all of them), ``counts <=
  K``, the kept indices strictly increasing (sorted, unique), inside ``[0, n)``, the protected head and tail among
  them;
* a token propagation: ``keep``, ``int64 [B, K]`` with ``0 < K <= n`` (``n`` the tokens the calling layer computed
  on), holds per row strictly increasing indices (sorted, unique) inside ``[0, n)``, the last token ``n - 1`` among
  them.

Shape and type faults are known on the host and raised at once (``propagate`` raises them as ``ValueError``). Value
faults live on the device: reading them would stall the GPU, so they are recorded as device flags and raised at the
next host read the run already makes (the next layer's eviction check, the end of the forward, or the end of a
decode step's schedule); until then a faulty selection is replaced, on the device, by a valid one (the first
candidates), and a faulty propagation by the last ``K`` tokens, so the cache stays consistent and no gather reads
out of range. The error is a :class:`PluginContractError` naming the policy (or compressor), its distribution and
entry point.

The device work runs through the kernel backend (:meth:`KVBackend.cache_fingerprint
<kvsieve.backend.KVBackend.cache_fingerprint>`, ``cache_changed``, ``nonfinite_scores``, ``check_selection``;
torch references in :mod:`kvsieve.contract_ops`), so a backend can run it in a few fused kernels.

The checks are on by default. ``KVSIEVE_CHECKS=off`` in the environment (or ``apply(..., checks=False)``) turns
the device checks off for a plugin that passed the conformance kit; the shape checks cost nothing and always run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from kvsieve import contract_ops
from kvsieve.policy import Selection

if TYPE_CHECKING:
    from kvsieve.backend import KVBackend
    from kvsieve.cache import SieveLayer

__all__ = ["ContractGuard", "FlagSink", "PluginContractError", "checks_enabled", "debug_checks", "describe_class"]

_OFF = ("0", "off", "false", "no")


class PluginContractError(RuntimeError):
    """A scoring or selection policy, or a propagating compressor, broke its contract (the message names the plugin
    and what it did)."""


def checks_enabled(default: bool | None = None) -> bool:
    """``default`` when given, else whether ``KVSIEVE_CHECKS`` is unset or not one of 0/off/false/no."""
    if default is not None:
        return default
    return os.environ.get("KVSIEVE_CHECKS", "on").strip().lower() not in _OFF


def debug_checks() -> bool:
    """Whether ``KVSIEVE_DEBUG`` asks for the checks that cost a host read each (e.g. that tensor-parallel ranks
    agree on what FastKV propagates)."""
    return os.environ.get("KVSIEVE_DEBUG", "").strip().lower() not in ("", *_OFF)


def describe_class(policy: Any, kind: str) -> str:
    """``scoring policy 'x' (class module.Class)`` (``compressor 'x' (...)`` for ``kind="compressor"``): how a guard
    without a registry names a plugin."""
    name = getattr(policy, "name", "") or type(policy).__name__
    label = f"{kind} policy" if kind in ("scoring", "selection") else kind
    return f"{label} {name!r} (class {type(policy).__module__}.{type(policy).__qualname__})"


def _read_all(values: list[torch.Tensor]) -> list[int]:
    """Device scalars as host ints: one read per device they live on (a model split over devices puts each
    layer's flags on that layer's device)."""
    by_device: dict[torch.device, list[int]] = {}
    for i, value in enumerate(values):
        by_device.setdefault(value.device, []).append(i)
    out = [0] * len(values)
    for indices in by_device.values():
        for i, got in zip(indices, torch.stack([values[i].to(torch.long) for i in indices]).tolist(), strict=True):
            out[i] = got
    return out


def _ops(backend: KVBackend | None) -> Any:
    """Where the device checks run: ``backend``'s methods, or the torch references (:mod:`kvsieve.contract_ops`,
    the same names) without one."""
    return contract_ops if backend is None else backend


class FlagSink:
    """Device fault flags that accumulate over replays of a captured CUDA graph.

    ``flags`` (``bool [capacity]``) is allocated outside any capture, so a graph's private memory never aliases
    it; the ``i``-th check a run makes ORs its flag into ``flags[i]``, so a fault in any replay stays set until
    :meth:`reset` (once per forward). Every run must make the same checks in the same order (the same captured
    work): ``messages[i]`` names entry ``i``.
    """

    def __init__(self, device: torch.device, capacity: int = 64):
        self.flags = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.messages: list[str] = []
        self._views: list[torch.Tensor] = []
        self._next = 0

    def begin(self) -> None:
        self._next = 0

    def add(self, broken: torch.Tensor, message: str) -> None:
        i = self._next
        if i >= self.flags.numel():
            raise RuntimeError(f"more than {self.flags.numel()} contract checks in one captured compression")
        if i == len(self.messages):
            self.messages.append(message)
            self._views.append(self.flags[i])
        elif self.messages[i] != message:
            raise RuntimeError("a captured compression made other contract checks than its first run")
        self._views[i].logical_or_(broken.reshape(()))
        self._next = i + 1

    def entries(self) -> list[tuple[torch.Tensor, str]]:
        """``(flag, message)`` of every entry in use (0-dim views of ``flags``)."""
        return list(zip(self._views, self.messages, strict=True))

    def reset(self) -> None:
        """Clear the flags (a device write, no read)."""
        self.flags.zero_()


class ContractGuard:
    """Checks plugin output and holds the device-side faults until the next host read (module docstring).

    Args:
        enabled: run the device checks (the host-side shape checks always run).
        immediate: raise device faults at once (one host read per check) instead of deferring them; for code
            that drives a compressor without an engine (unit tests).
        describe: ``describe(policy, kind) -> str`` names the plugin in an error (the engine passes
            :func:`kvsieve.plugins.describe_object`, which adds the distribution and entry point).
    """

    def __init__(self, enabled: bool = True, immediate: bool = False,
                 describe: Callable[[Any, str], str] = describe_class):
        self.enabled, self.immediate, self.describe = enabled, immediate, describe
        self._pending: list[tuple[torch.Tensor, str]] = []
        self._sink: FlagSink | None = None
        self._before_read: list[Callable[[], None]] = []  # joins of the streams that write watched flags

    # ------------------------------------------------------------------ host reads
    def read(self, *values: torch.Tensor) -> list[int]:
        """Read ``values`` (device scalars) in one host read, together with the pending fault flags; raise the
        first fault found."""
        waits, self._before_read = self._before_read, []
        for wait in waits:
            wait()
        flags = [flag for flag, _ in self._pending]
        got = _read_all([*values, *flags])
        self._raise_first(got[len(values):])
        return got[: len(values)]

    def flush(self) -> None:
        """Raise a pending fault, if any (one host read; nothing when none is pending)."""
        if self._pending or self._before_read:
            self.read()

    def defer(self, broken: torch.Tensor, message: str) -> None:
        """Hold ``broken`` (a device scalar, bool or int32, nonzero = a fault) until the next host read, then raise a
        :class:`PluginContractError` with ``message`` if it is set (at once for an ``immediate`` guard; into the
        active :class:`FlagSink` inside :meth:`accumulating`). Every device check goes through it, this class's and
        others' (:func:`kvsieve.propagation.propagate`'s declared padding)."""
        if self._sink is not None:
            self._sink.add(broken, message)
            return
        self._pending.append((broken, message))
        if self.immediate:
            self.flush()

    # ------------------------------------------------------------------ work replayed from a CUDA graph
    @contextlib.contextmanager
    def accumulating(self, sink: FlagSink) -> Iterator[None]:
        """While active, every device fault flag is OR-ed into ``sink``'s next entry instead of being queued
        (work captured in a CUDA graph: the flags must land in storage that outlives the replays)."""
        previous, self._sink = self._sink, sink
        sink.begin()
        try:
            yield
        finally:
            self._sink = previous

    def watch(self, sink: FlagSink, ready: Callable[[], None] | None = None) -> None:
        """Queue ``sink``'s accumulated flags for the next host read (once: a flag already queued is not added
        again). ``ready``: called before that read, e.g. to make the reading stream wait for the side stream that
        writes the flags."""
        queued = {id(flag) for flag, _ in self._pending}
        self._pending += [(flag, message) for flag, message in sink.entries() if id(flag) not in queued]
        if ready is not None and ready not in self._before_read:
            self._before_read.append(ready)

    def _raise_first(self, values: list[int]) -> None:
        pending, self._pending = self._pending, []
        for (_, message), broken in zip(pending, values, strict=True):
            if broken:
                raise PluginContractError(message)

    # ------------------------------------------------------------------ scores
    def fingerprint(self, layer: SieveLayer, backend: KVBackend | None = None) -> torch.Tensor | None:
        """The layer's fingerprint before a scoring call (None when the checks are off), by ``backend``'s
        :meth:`~kvsieve.backend.KVBackend.cache_fingerprint` (None: the torch reference); pass the same backend to
        :meth:`check_scores`."""
        if not self.enabled:
            return None
        return _ops(backend).cache_fingerprint(layer.keys, layer.values, layer.positions, layer.starts, layer.ends)

    def check_scores(self, scores: Any, counts: torch.Tensor, num_candidates: int, policy: Any,
                     layer: SieveLayer, before: torch.Tensor | None,
                     backend: KVBackend | None = None) -> torch.Tensor:
        """``scores`` from ``policy`` for candidates ``counts`` (``int64 [B, Hkv]``, at most ``num_candidates``),
        checked (the device checks by ``backend``, None: the torch references); returns them as float32.
        ``before``: the layer's :meth:`fingerprint` taken before the scoring call (None: the cache is not
        compared, as in the work a prefill graph captures, whose first run compared it)."""
        who = self.describe(policy, "scoring")
        expected = (*counts.shape, num_candidates)
        if not isinstance(scores, torch.Tensor):
            raise PluginContractError(f"{who} returned {type(scores).__name__}, not a tensor of shape {expected}")
        if tuple(scores.shape) != expected or not scores.is_floating_point():
            raise PluginContractError(
                f"{who} returned scores of shape {tuple(scores.shape)} and dtype {scores.dtype}; expected a floating "
                f"tensor of shape {expected} ([B, Hkv, N], N = {num_candidates} candidates)"
            )
        if self.enabled:
            ops = _ops(backend)
            self.defer(ops.nonfinite_scores(scores, counts), f"{who} returned a non-finite score for a candidate")
            if before is not None:
                self.defer(ops.cache_changed(before, layer.keys, layer.values, layer.positions, layer.starts,
                                             layer.ends),
                           f"{who} changed the cache it was scoring (keys, values, positions or the live range)")
        return scores.float()

    # ------------------------------------------------------------------ selections
    def check_selection(self, chosen: Any, counts: torch.Tensor, budget: int | torch.Tensor, protect_head: int,
                        protect_tail: int | torch.Tensor, policy: Any,
                        backend: KVBackend | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keep, kept)`` of ``chosen`` (a :class:`~kvsieve.policy.Selection` from ``policy`` over candidates
        ``counts``, ``int64 [B, Hkv]``; ``budget`` and ``protect_tail`` an int or one per row and KV head),
        checked (the device rules by ``backend``'s :meth:`~kvsieve.backend.KVBackend.check_selection`, None: the
        torch reference); when a device check fails, a valid stand-in (the first candidates) is returned and the
        fault raised at the next host read."""
        who = self.describe(policy, "selection")
        if not isinstance(chosen, Selection):
            raise PluginContractError(f"{who} returned {type(chosen).__name__}, not a kvsieve.policy.Selection")
        keep, kept = chosen.keep, chosen.counts
        shape = tuple(counts.shape)
        for what, tensor, dims in (("keep", keep, 3), ("counts", kept, 2)):
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.long or tensor.dim() != dims \
                    or tuple(tensor.shape[:2]) != shape:
                got = (tensor.dtype, tuple(tensor.shape)) if isinstance(tensor, torch.Tensor) else type(tensor)
                raise PluginContractError(
                    f"{who} returned {what} {got}; expected int64 [{', '.join(map(str, shape))}"
                    f"{', K' if dims == 3 else ''}]"
                )
        if not self.enabled:
            return keep, kept
        adaptive = bool(getattr(policy, "head_adaptive", False))
        broken, keep, kept = _ops(backend).check_selection(keep, kept, counts, budget, protect_head, protect_tail,
                                                           adaptive)
        rule = "budget" if isinstance(budget, torch.Tensor) else f"budget={budget}"
        count_rule = (f"sum over KV heads of min({rule}, candidates) per row, each head keeping at least its "
                      f"protected candidates and at most its candidates" if adaptive else
                      f"exactly min({rule}, candidates) per row and KV head")
        self.defer(broken, f"{who} returned an invalid selection (kept indices must be sorted, unique, inside the "
                           f"candidates, {count_rule}, with the protected first {protect_head} and last "
                           f"candidates kept)")
        return keep, kept

    # ------------------------------------------------------------------ token propagation
    def check_propagation(self, keep: torch.Tensor, num_live: int, who: str) -> torch.Tensor:
        """``keep`` (``int64 [B, K]``, ``0 < K <= num_live``: the tokens a propagation keeps among the ``num_live``
        the calling layer computed on; its shape checked by the caller), checked on the device: per row, strictly
        increasing (sorted, unique), inside ``[0, num_live)``, ending with the last token ``num_live - 1``.

        Returns ``keep``, or, in each row that breaks a rule, the stand-in ``num_live - K .. num_live - 1`` (the last
        ``K`` tokens: sorted, unique, in range, the last token kept), so nothing downstream gathers out of range;
        the fault is raised at the next host read (at once for an ``immediate`` guard), naming ``who`` (e.g.
        ``compressor 'fastkv' (...)``). With the checks off, ``keep`` unchecked.
        """
        if not self.enabled:
            return keep
        n, K = num_live, keep.shape[1]
        outside = ((keep < 0) | (keep >= n)).any(dim=1)  # [B]
        unsorted = (keep[:, 1:] <= keep[:, :-1]).any(dim=1)
        no_last = keep[:, -1] != n - 1
        what = f"{who} propagated an invalid keep:"
        self.defer(outside.any(), f"{what} keep must hold token indices inside [0, {n}) (the tokens the calling "
                                   f"layer computed on)")
        self.defer(unsorted.any(), f"{what} keep must hold sorted, unique token indices per row")
        self.defer(no_last.any(), f"{what} keep must include the last token (index {n - 1}): generation reads its "
                                   f"logits")
        stand_in = torch.arange(n - K, n, device=keep.device)
        return torch.where((outside | unsorted | no_last)[:, None], stand_in, keep)
