"""Prefill compression replayed from a CUDA graph: the per-layer prompt compression without per-layer host work.

Every layer of a prefill compresses tensors of the same shapes (the same batch, prompt length, heads, window and
budget), so the work of :func:`kvsieve.compressor.compress_layer` -- scoring, selection, the contract checks and
the compaction, about a hundred small operators -- is captured once in a CUDA graph and replayed for every later
layer, with the layer's tensors copied into the graph's static inputs first (device copies). The host then issues
a handful of operators per layer instead of the whole sequence, and reads nothing from the device.

For a layer of shape key ``k`` (:func:`compress_prompt`):

1. the first layer with ``k`` copies its tensors into static buffers and runs the work on them eagerly (it warms
   the kernels up: Triton compiles there), reading nothing on the host: what it needs to know (the candidates,
   the size after compaction) the host knows in prefill;
2. the second captures the same work in a graph (recorded, not run; on a capture stream of its own, without
   waiting for the device), then replays it;
3. every later layer with ``k`` (in this forward and later ones of the same engine) copies its tensors in and
   replays the graph.

The work runs on a side stream of the device (:class:`PrefillGraphs`): a layer's compression is not on the
forward's critical path (the next layer computes on the hidden states, not on this layer's cache), so it overlaps
the next layers' GEMMs and attention. The forward's stream waits for it at the end of the forward
(:meth:`PrefillGraphs.join`, called by the engine) and before any host read of the contract flags; tensors that
cross streams are recorded on the stream that uses them, so the allocator does not reuse their memory early.

The kernels are those of the eager path (:func:`~kvsieve.compressor.score_and_select` on copies of the same shapes,
then :meth:`SieveLayer.compact <kvsieve.cache.SieveLayer.compact>`), so the scores, the kept slots and the cache are
exactly the eager path's. The contract checks' device flags accumulate in a :class:`~kvsieve.contracts.FlagSink`
and are read at the next host read (the end of the forward at the latest). The cache fingerprint around the
scoring call (two passes over the layer's K/V) runs in the first, eager run of a shape and is left out of the
captured work (:data:`CHECK_CACHE_IN_REPLAYS`): a replay runs the kernels that capture recorded from the policy code
the first run checked, and beside the forward's GEMMs those passes cost more than every other check together.

The eager path runs instead (unchanged) when the device is not CUDA, the option is off (``apply(...,
prefill_graphs=False)`` or ``KVSIEVE_PREFILL_GRAPHS=0``), autograd is on, an observer watches compactions, the
model is split by heads over ranks (tensor parallelism), the layer has per-slot side buffers, the budget leaves
nothing to score, or the policies cannot be captured: a policy that reads the device on the host (``.item()``,
``.tolist()``, a synchronisation), or reads ``ScoringContext.layer_idx`` (a replay would repeat the captured
layer's value), is run eagerly from then on, with one :class:`PrefillGraphWarning` naming it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch

from kvsieve.cache import DynamicSieveLayer, SieveLayer
from kvsieve.compressor import LayerEvent, _row_tensor, compress_layer, score_and_select
from kvsieve.contracts import FlagSink
from kvsieve.policy import ScoringContext

if TYPE_CHECKING:
    from kvsieve.engine import Engine
    from kvsieve.policy import ScoringPolicy, SelectionPolicy

__all__ = ["ENV", "PrefillGraphWarning", "PrefillGraphs", "compress_prompt", "prefill_graphs_enabled"]

#: the environment variable that turns the prefill graphs off (0/off/false/no)
ENV = "KVSIEVE_PREFILL_GRAPHS"
_OFF = ("0", "off", "false", "no")
_MAX_GRAPHS = 2  # shape keys kept per engine (FastKV: before and after its TSP layer)
#: whether the captured work also fingerprints the cache around the scoring call (the first, eager run of a key always
#: does). Off: a replay runs the kernels that run recorded, so a scoring policy that writes into the cache is caught
#: there, and the two passes over the whole cache per layer stay off the replays (at 8K they cost more than every
#: other check together: docs/benchmarks.md). Benchmarks turn it on to compare.
CHECK_CACHE_IN_REPLAYS = False


class PrefillGraphWarning(UserWarning):
    """A policy's prefill compression could not be captured in a CUDA graph; it runs eagerly (same results)."""


def prefill_graphs_enabled(default: bool | None = None) -> bool:
    """``default`` when given, else whether ``KVSIEVE_PREFILL_GRAPHS`` is unset or not one of 0/off/false/no."""
    if default is not None:
        return bool(default)
    return os.environ.get(ENV, "on").strip().lower() not in _OFF


class PrefillGraphs:
    """One engine's captured compressions (at most two shape keys, the most recent kept), the keys whose policies
    cannot be captured, and the side streams the compressions run on (one per device)."""

    def __init__(self) -> None:
        self.runners: OrderedDict[tuple, _Runner] = OrderedDict()
        self.refused: set[tuple] = set()
        self.captures = 0  # graphs captured (tests and the benchmark read it)
        self.replays = 0
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.joined = True  # nothing issued on a side stream since the last join
        self.produced: list[torch.Tensor] = []  # tensors made on a side stream, used later on the forward's stream

    def clear(self) -> None:
        """Free every graph and its static buffers."""
        self.join()
        self.runners.clear()

    def side(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Run what follows on ``device``'s side stream, after the work issued so far on its current stream (on a
        CPU, where the static path runs in tests, a plain context)."""
        if device.type != "cuda":
            return contextlib.nullcontext()
        stream = self.streams.get(device)
        if stream is None:
            stream = self.streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        self.joined = False
        return torch.cuda.stream(stream)

    def join(self) -> None:
        """Make every device's current stream wait for the compressions issued on its side stream, and record the
        tensors they made as used there (the forward's end; before a host read of their contract flags)."""
        if self.joined:
            return
        for device, stream in self.streams.items():
            current = torch.cuda.current_stream(device)
            current.wait_stream(stream)
            for tensor in self.produced:
                if tensor.device == device:
                    tensor.record_stream(current)
        self.produced.clear()
        self.joined = True


def compress_prompt(event: LayerEvent, *, scoring: ScoringPolicy, selection: SelectionPolicy,
                    budget: Sequence[int], protect_tail: Sequence[int]) -> None:
    """Compress a layer's whole prompt in prefill (what :class:`~kvsieve.prompt.PromptCompressor` does): every
    real prompt token is a candidate, the left padding is dropped, ``budget[b]`` are kept in row ``b`` with its
    last ``protect_tail[b]`` always among them. Replays a captured graph when it can (module docstring), else
    :func:`~kvsieve.compressor.compress_layer`."""
    budgets, tails = [int(b) for b in budget], [int(t) for t in protect_tail]
    plan = _plan(event, scoring, selection, budgets, tails)
    if plan is _NOTHING:
        return
    graphs = None if plan is None else _graphs(event.engine)
    if plan is None or plan.key in graphs.refused:
        _eager(event, scoring, selection, budgets, tails)
        return
    runner = graphs.runners.get(plan.key)
    if runner is None:
        with graphs.side(event.layer.keys.device):  # its static buffers live on the side stream
            runner = _Runner(event, plan, scoring, selection)
        graphs.runners[plan.key] = runner
        while len(graphs.runners) > _MAX_GRAPHS:
            graphs.runners.popitem(last=False)
    else:
        graphs.runners.move_to_end(plan.key)
    runner.run(event, graphs)


def _eager(event: LayerEvent, scoring, selection, budgets: list[int], tails: list[int]) -> None:
    layer = event.layer
    compress_layer(
        event,
        scoring=scoring,
        selection=selection,
        cand_starts=layer.starts,  # every real prompt token is a candidate
        region_starts=layer.starts.new_zeros(layer.starts.shape),  # the left padding before them is dropped
        budget=budgets,
        protect_tail=tails,
        queries_are_last=True,
    )


def _graphs(engine: Engine) -> PrefillGraphs:
    graphs = getattr(engine, "prefill_graph_cache", None)
    if graphs is None:
        graphs = engine.prefill_graph_cache = PrefillGraphs()
    return graphs


# ---------------------------------------------------------------------------------------------- the plan (host)
@attrs.frozen
class _Plan:
    """What the host knows of a layer's compression without reading the device.

    ``key`` identifies the captured work; ``N``: candidates of the longest row; ``used``: ``max(ends)`` after the
    compaction (every row keeps ``min(budget, length)``, packed from slot 0), or ``None`` when the host cannot know
    it (a ``head_adaptive`` selection: each KV head keeps its own count, read after the replay).
    """

    key: tuple
    budgets: tuple[int, ...]
    tails: tuple[int, ...]
    N: int
    used: int | None
    window: int  # W of the window queries (0: the scoring reads none)
    scored: int  # candidates of the longest row once its protected tail is left out (the scores' width)


_NOTHING = object()  # nothing to evict


def _graph_device(device: torch.device) -> bool:
    """Whether work on ``device`` can be captured (CUDA; the CPU tests replace this to run the static path)."""
    return device.type == "cuda"


def _window(layer: SieveLayer, query_window: int) -> int:
    """W of ``LayerEvent.window_queries()`` (known on the host)."""
    if layer.queries is None:
        return -1  # window_queries() raises: the eager path reports it
    W = min(layer.num_queries, layer.query_window)
    return min(W, query_window) if query_window else W


def _plan(event: LayerEvent, scoring, selection, budgets: list[int], tails: list[int]):
    """``None`` (run eagerly), ``_NOTHING`` (nothing to evict) or a :class:`_Plan`."""
    engine, layer = event.engine, event.layer
    if engine is None or not getattr(engine, "prefill_graphs", False) or event.phase != "prefill":
        return None
    if type(layer) is not DynamicSieveLayer or layer.keys is None or not _graph_device(layer.keys.device):
        return None
    if engine.observed or engine.heads.distributed or layer.slot_buffers or torch.is_grad_enabled():
        return None
    lengths, rows = layer.row_lengths, layer.keys.shape[0]
    if len(lengths) != rows or len(budgets) != rows or len(tails) != rows or scoring is None:
        return None
    if any(t > b for b, t in zip(budgets, tails, strict=True)) or all(b <= t for b, t in zip(budgets, tails,
                                                                                             strict=True)):
        return None  # a refused budget (the eager path raises) or nothing to score
    end = layer.max_end  # remembered since the prefill's append: no read
    # prefill: every row and head ends at `end` and starts after its padding, so row b has lengths[b] candidates
    N = max(lengths)
    if N <= min(budgets) and all(n == end for n in lengths):
        return _NOTHING
    window = _window(layer, event.query_window) if scoring.needs_queries else 0
    if window < 0:
        return None
    key = (
        id(scoring), id(selection), id(event.backend), tuple(layer.keys.shape), layer.keys.dtype,
        tuple(layer.values.shape), layer.values.dtype, str(layer.keys.device), window, tuple(budgets), tuple(tails),
        tuple(lengths), end, float(event.scale), engine.guard.enabled, torch.is_inference_mode_enabled(),
    )
    used = None if selection.head_adaptive else max(min(b, n) for b, n in zip(budgets, lengths, strict=True))
    scored = max(max(n - t, 0) for n, t in zip(lengths, tails, strict=True))
    return _Plan(key=key, budgets=tuple(budgets), tails=tuple(tails), N=N, used=used, window=window, scored=scored)


# ---------------------------------------------------------------------------------------------- the graph
class _StaticLayer:
    """The static copies of a layer's tensors that a graph reads and compacts in place: what
    :func:`~kvsieve.compressor.score_and_select` and :meth:`SieveLayer.compact` use of a layer.

    ``keys``, ``values``: ``[B, Hkv, C, d]``; ``positions``: ``int64 [B, Hkv, C]``; ``starts``, ``ends``:
    ``int64 [B, Hkv]``. ``stored``: the live range a compaction produced (``_store_range``)."""

    def __init__(self, layer: SieveLayer):
        self.keys, self.values = torch.empty_like(layer.keys), torch.empty_like(layer.values)
        self.positions = torch.empty_like(layer.positions)
        self.starts, self.ends = torch.empty_like(layer.starts), torch.empty_like(layer.ends)
        self.slot_buffers: dict[str, torch.Tensor] = {}
        self.slot_fills: dict[str, float] = {}
        self.compactions = 0
        self.stored: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def load(self, layer: SieveLayer) -> None:
        for mine, theirs in ((self.keys, layer.keys), (self.values, layer.values), (self.positions, layer.positions),
                             (self.starts, layer.starts), (self.ends, layer.ends)):
            mine.copy_(theirs)

    def _store_range(self, starts: torch.Tensor, ends: torch.Tensor, reserve: int) -> None:
        self.stored = (starts, ends)


def _probing_context(reads: list[bool]) -> type:
    """A :class:`ScoringContext` subclass that records whether a policy read ``layer_idx`` (a replay would give
    every layer the captured one's)."""

    def get(self):
        reads[0] = True
        return object.__getattribute__(self, "_probed_layer_idx")

    def put(self, value):
        object.__setattr__(self, "_probed_layer_idx", value)

    return type("ProbedScoringContext", (ScoringContext,), {"__slots__": ("_probed_layer_idx",),
                                                            "layer_idx": property(get, put)})


class _Runner:
    """The static buffers and the captured graph of one shape key."""

    def __init__(self, event: LayerEvent, plan: _Plan, scoring, selection):
        layer = event.layer
        self.plan, self.scoring, self.selection = plan, scoring, selection  # the policies stay alive with the key
        self.static = _StaticLayer(layer)
        device = layer.keys.device
        if plan.window:
            B, H, _, d = layer.queries.shape
            self.queries = layer.queries.new_empty(B, H, plan.window, d)
        else:
            self.queries = layer.keys.new_zeros(0)
        self.region = torch.zeros_like(layer.starts)  # the compacted region begins at slot 0 (padding dropped)
        budgets, tails = list(plan.budgets), list(plan.tails)
        if len(set(budgets)) == 1 and len(set(tails)) == 1:
            self.budget_arg, self.tail_arg = budgets[0], tails[0]
        else:  # made here, before any capture, on the side stream whose later work reads them (an async copy)
            self.budget_arg, self.tail_arg = _row_tensor(budgets, layer.starts), _row_tensor(tails, layer.starts)
        # the contract flags of the replays, and of the eager runs (which also compare the cache around the scoring
        # call: one check more than the captured work makes, so a sink of their own)
        self.sink, self.eager_sink = FlagSink(device), FlagSink(device)
        self.forward = -1
        self.runs = 0  # layers this runner compressed
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None

    def _body(self, event: LayerEvent, context_type: type = ScoringContext,
              check_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The compression of the static copies (eager or captured): ``(starts, ends)`` after it; ``check_cache``:
        fingerprint the cache around the scoring call (:data:`CHECK_CACHE_IN_REPLAYS`)."""
        static, plan = self.static, self.plan
        counts = (static.ends - static.starts).clamp(min=0)
        keep_slots, kept, dest = score_and_select(
            event, event.engine.guard, static, self.queries, scoring=self.scoring, selection=self.selection,
            cand_starts=static.starts, counts=counts, N=plan.N, budgets=list(plan.budgets), tails=list(plan.tails),
            protect_head=0, budget_arg=self.budget_arg, tail_arg=self.tail_arg, region_starts=self.region,
            queries_are_last=True, context_type=context_type, scored_count=plan.scored, check_cache=check_cache,
        )
        SieveLayer.compact(static, event.backend, keep_slots, kept, dest, reserve=0)
        return static.stored

    def run(self, event: LayerEvent, graphs: PrefillGraphs) -> None:
        """Compress ``event``'s layer on the side stream: its first layer of this key eagerly on the static copies,
        the second through a capture and a replay, every later one through a replay (module docstring)."""
        engine, layer = event.engine, event.layer
        guard = engine.guard
        read = [t for t in (layer.keys, layer.values, layer.positions, layer.starts, layer.ends, layer.queries)
                if t is not None]
        with graphs.side(layer.keys.device):
            stream = torch.cuda.current_stream(layer.keys.device) if layer.keys.is_cuda else None
            for tensor in read if stream is not None else ():  # made on the forward's stream, read on this one
                tensor.record_stream(stream)
            if self.forward != engine.forwards:  # a new forward: its faults start clear
                self.sink.reset()
                self.eager_sink.reset()
                self.forward = engine.forwards
            if self.plan.window:
                self.queries.copy_(event.window_queries())
            self.static.load(layer)
            if self.graph is None and self.runs > 0 and self._capture(event, graphs):
                graphs.captures += 1
            if self.graph is not None:
                self.graph.replay()
                graphs.replays += 1
                starts, ends = self.outputs
            else:  # the first layer of this key, or one whose capture was refused: the same work, eagerly
                starts, ends = self._run_eagerly(event, graphs)
            self.runs += 1
            guard.watch(self.sink if self.graph is not None else self.eager_sink, graphs.join)
            self._store(layer, starts, ends, event.reserve)
            if stream is not None:  # made here, used on the forward's stream after the join
                graphs.produced += [layer.keys, layer.values, layer.positions, layer.starts, layer.ends]

    def _run_eagerly(self, event: LayerEvent, graphs: PrefillGraphs) -> tuple[torch.Tensor, torch.Tensor]:
        """The work on the static copies, run (on the side stream); on its first run it watches whether the
        policies read ``ScoringContext.layer_idx``, which a replay could not change (then the key stays eager)."""
        guard = event.engine.guard
        reads = [False]
        with guard.accumulating(self.eager_sink):
            starts, ends = self._body(event, _probing_context(reads) if self.runs == 0 else ScoringContext)
        if reads[0]:
            self._refuse(graphs, f"{self._who(guard)} reads ScoringContext.layer_idx, which a replayed graph cannot "
                                 f"change")
        return starts, ends

    def _who(self, guard) -> str:
        return f"{guard.describe(self.scoring, 'scoring')} with {guard.describe(self.selection, 'selection')}"

    def _capture(self, event: LayerEvent, graphs: PrefillGraphs) -> bool:
        """Capture the work in a graph (recorded, not run) on a capture stream of its own: nothing waits for the
        device (the work ran eagerly on the key's first layer, so its kernels are loaded). ``False``: it cannot be
        captured (the key is refused; this layer runs it eagerly)."""
        guard = event.engine.guard
        device = self.static.keys.device
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(torch.cuda.Stream(device)):  # a capture cannot run on the default stream
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    with guard.accumulating(self.sink):
                        outputs = self._body(event, check_cache=CHECK_CACHE_IN_REPLAYS)
                finally:
                    graph.capture_end()
        except Exception as exc:  # noqa: BLE001 - any failure to capture: this key stays eager, results unchanged
            try:
                torch.cuda.synchronize(device)
            except Exception:  # noqa: BLE001, S110 - the error was the capture's; nothing else to undo
                pass
            self._refuse(graphs, f"{self._who(guard)} cannot be captured in a CUDA graph ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})")
            return False
        self.graph, self.outputs = graph, outputs
        return True

    def _refuse(self, graphs: PrefillGraphs, why: str) -> None:
        graphs.refused.add(self.plan.key)
        graphs.runners.pop(self.plan.key, None)
        warnings.warn(f"kvsieve: {why}; its prefill compression runs eagerly (the same results, more host time). "
                      f"{ENV}=0 turns the prefill graphs off.", PrefillGraphWarning, stacklevel=2)

    def _store(self, layer: DynamicSieveLayer, starts: torch.Tensor, ends: torch.Tensor, reserve: int) -> None:
        """Make the compacted static copies the layer's cache, as ``compact`` + ``_store_range`` would: the live
        range, and the storage shrunk (a fresh buffer holding the first ``used`` slots) or, when it keeps its
        capacity, the compacted slots written back into it."""
        static = self.static
        own = (layer.keys, layer.values, layer.positions)
        layer.compactions += 1
        layer.keys, layer.values, layer.positions = static.keys, static.values, static.positions
        layer.starts, layer.ends = starts.clone(), ends.clone()  # the graph's outputs are rewritten by each replay
        if self.plan.used is not None:
            layer._max_end_memo = (layer.ends, self.plan.used)  # known on the host: no read
        used = layer.max_end  # a head-adaptive selection: one read, as the eager path's shrink makes
        layer.shrink_to_fit(reserve)
        if layer.keys is static.keys:  # no shrink: the layer keeps its own storage, compacted as in place
            keys, values, positions = own
            keys[:, :, :used].copy_(static.keys[:, :, :used])
            values[:, :, :used].copy_(static.values[:, :, :used])
            positions.copy_(static.positions)
            layer.keys, layer.values, layer.positions = keys, values, positions


def describe_graphs(engine: Any) -> dict[str, int]:
    """``{"captures": ..., "replays": ...}`` of an engine's prefill graphs (zeros when none ran)."""
    graphs = getattr(engine, "prefill_graph_cache", None)
    return {"captures": graphs.captures if graphs else 0, "replays": graphs.replays if graphs else 0}
