"""Composition: one compressor made of others, per phase (prefill, decode) and, optionally, per layer range.

Long-context reasoning needs two kinds of compression: FastKV compresses the long prompt while it is
prefilled, and RPC keeps compressing the reasoning while it is generated. A :class:`Composite` holds such
parts and gives the result one name::

    Composite("fastkv+rpc", [Part(FastKV(tsp_rate=0.2), "prefill"), Part(RPC(interval=1024), "decode")])

A :class:`Preset` names a composition of *registered* compressors and is registered like any compressor
(the preset ``fastkv+rpc`` lives in :mod:`kvsieve.policies.hybrid`). Its parameters are addressed as
``part.param``::

    registry().create("compressor", "fastkv+rpc", **{"fastkv.tsp_rate": 0.2, "rpc.interval": 1024})
    kvsieve generate --compressor fastkv+rpc --set fastkv.tsp_rate=0.2 --set rpc.interval=1024

An unregistered name ``"a+b"`` is composed on the fly from the registered ``a`` (prefill) and ``b`` (decode)
(:meth:`Preset.parse`, used by :func:`kvsieve.integration.resolve_compressor`).

How the parts meet: each part receives only the layer events of its phase (and layers), and sees only the
selector queries it asked for (its own ``query_window``). Nothing is passed between parts: a decode part reads
the cache the prefill part left. RPC's protected prompt region is :meth:`SieveLayer.prompt_ends
<kvsieve.cache.SieveLayer.prompt_ends>`, i.e. the prompt KV that FastKV kept in that layer (its own length per
layer and row); its candidates are generated tokens only; positions stay the original ones.

A composition is refused when it is built (:class:`CompositionError`, a ``ValueError``) if a part does not
act in its slot's phase (a decode-only compressor in the prefill slot), if more than one part propagates
tokens, if a propagating part is given a layer range, if two parts of one phase share a layer, or if a part is
unknown.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from kvsieve.compressor import Compressor, LayerEvent
from kvsieve.params import UnknownParameterError
from kvsieve.plugins import UnknownNameError, build_compressor, registry
from kvsieve.validators import one_of

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from kvsieve.engine import Engine


__all__ = ["PHASES", "Composite", "CompositionError", "Part", "Preset"]

PHASES = ("prefill", "decode")


class CompositionError(ValueError):
    """An invalid composition (refused when it is built)."""


def _layer_range(instance, attribute, value) -> None:
    if value is None:
        return
    ok = len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or not 0 <= value[0] < value[1]:
        raise CompositionError(f"layers must be (start, stop) with 0 <= start < stop, got {value!r}")


def _default_key(part: Part) -> str:
    return part.compressor if isinstance(part.compressor, str) else getattr(part.compressor, "name", "?")


@attrs.frozen
class Part:
    """One compressor of a composition and where it acts.

    Args:
        compressor: a Compressor instance, or a registered compressor name (a :class:`Composite` builds it
            with its defaults; a :class:`Preset` with the parameters addressed to this part).
        phase: ``"prefill"`` or ``"decode"``: the slot, i.e. which layer events the part receives.
        layers: ``(start, stop)``: the part acts on decoder layers ``start .. stop - 1`` only. Default: all.
        key: the part's name inside the composition (parameters ``key.param``, its entry in ``config()``).
            Default: the compressor's name.
    """

    compressor: str | Compressor = attrs.field(validator=attrs.validators.instance_of((str, Compressor)))
    phase: str = attrs.field(validator=one_of(*PHASES))
    layers: tuple[int, int] | None = attrs.field(
        default=None, converter=attrs.converters.optional(tuple), validator=_layer_range
    )
    key: str = attrs.field(default=attrs.Factory(_default_key, takes_self=True))

    def acts_on(self, event: LayerEvent) -> bool:
        """Whether this part handles ``event`` (its phase, and its layers if it has a range)."""
        if event.phase != self.phase:
            return False
        return self.layers is None or self.layers[0] <= event.layer_idx < self.layers[1]

    def __str__(self) -> str:
        name = _default_key(self)
        where = self.phase
        if self.layers is not None:
            where += f", layers {self.layers[0]}..{self.layers[1] - 1}"
        return f"{name} ({where})" if self.key == name else f"{self.key}={name} ({where})"


def _create(name: str, params: dict[str, Any], composition: str, key: str) -> Compressor:
    """:func:`~kvsieve.plugins.build_compressor`; errors name the composition and the part."""
    try:
        return build_compressor(name, params)
    except UnknownNameError as exc:
        raise UnknownNameError(f"{composition}: part {key!r}: {exc}") from exc
    except UnknownParameterError as exc:
        raise UnknownParameterError(f"{composition}: part {key!r}: {exc}") from exc
    except ValueError as exc:
        raise CompositionError(f"{composition}: part {key!r}: {exc}") from exc


def _parameters(name: str) -> list[str]:
    """The parameter names of the registered compressor ``name`` (empty when it is not an attrs class; nested
    policy parameters such as ``scoring.pooling`` are not listed)."""
    factory = registry().get("compressor", name).obj
    if not (isinstance(factory, type) and attrs.has(factory)):
        return []
    return [field.name for field in attrs.fields(factory) if field.init]


def _check(name: str, parts: tuple[Part, ...]) -> None:
    """The composition rules (see the module docstring); raise :class:`CompositionError`."""
    if not parts:
        raise CompositionError(f"{name}: a composition needs at least one part")
    keys = [part.key for part in parts]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise CompositionError(f"{name}: part names must be unique, but {', '.join(duplicates)} appears more "
                               "than once; give the parts distinct keys")
    for part in parts:
        acts = part.compressor.phases
        if part.phase not in acts:
            raise CompositionError(
                f"{name}: part {part.key!r} is in the {part.phase} slot, but compressor "
                f"{part.compressor.name!r} acts only in {', '.join(sorted(acts)) or 'no phase'}"
            )
    propagating = [part.key for part in parts if part.compressor.propagates]
    if len(propagating) > 1:
        raise CompositionError(
            f"{name}: parts {', '.join(map(repr, propagating))} both propagate tokens; a composition "
            "may hold at most one propagating part (propagation changes what all later layers compute on)"
        )
    for part in parts:
        if part.compressor.propagates and part.layers is not None:
            raise CompositionError(
                f"{name}: part {part.key!r} propagates tokens, which affects every later layer; it cannot be "
                f"limited to layers {part.layers} (choose its layer with its own parameters)"
            )
    for i, a in enumerate(parts):
        for b in parts[i + 1 :]:
            if a.phase == b.phase and _overlap(a.layers, b.layers):
                raise CompositionError(
                    f"{name}: parts {a.key!r} and {b.key!r} both act in {a.phase} on the same layers "
                    f"({a.layers or 'all'} and {b.layers or 'all'}); give each layer one {a.phase} part"
                )


def _overlap(a: tuple[int, int] | None, b: tuple[int, int] | None) -> bool:
    if a is None or b is None:
        return True
    return a[0] < b[1] and b[0] < a[1]


@attrs.frozen
class Composite(Compressor):
    """Several compressors acting as one, each in its phase (and layer range).

    ``phases`` is the union of the parts' slots; ``query_window`` and ``reserve`` are the max over the parts;
    ``install`` installs every part; ``after_attention`` hands each event to the parts that act on it, in
    order.

    Args:
        name: the composition's name (``compressor.name``, reported in results and to observers).
        parts: the :class:`Part` list. Parts given by name are built with their defaults.

    Raises:
        CompositionError: the parts break a composition rule (module docstring).
    """

    name: str = attrs.field(validator=attrs.validators.instance_of(str))
    parts: tuple[Part, ...] = attrs.field(converter=tuple)

    def __attrs_post_init__(self):
        built = tuple(
            part if isinstance(part.compressor, Compressor)
            else attrs.evolve(part, compressor=_create(part.compressor, {}, self.name, part.key))
            for part in self.parts
        )
        object.__setattr__(self, "parts", built)
        _check(self.name, built)

    @property
    def phases(self) -> frozenset[str]:
        return frozenset(part.phase for part in self.parts)

    @property
    def propagates(self) -> bool:
        return any(part.compressor.propagates for part in self.parts)

    @property
    def query_window(self) -> int:
        return max(part.compressor.query_window for part in self.parts)

    @property
    def reserve(self) -> int:
        return max(part.compressor.reserve for part in self.parts)

    def part(self, key: str) -> Compressor:
        """The compressor of the part named ``key``."""
        for part in self.parts:
            if part.key == key:
                return part.compressor
        raise KeyError(f"{self.name} has no part {key!r} (parts: {', '.join(p.key for p in self.parts)})")

    def check_model(self, config: PretrainedConfig) -> None:
        for part in self.parts:
            part.compressor.check_model(config)
            if part.layers is not None and part.layers[1] > config.num_hidden_layers:
                raise CompositionError(
                    f"{self.name}: part {part.key!r} acts on layers {part.layers[0]}..{part.layers[1] - 1}, "
                    f"but the model has num_hidden_layers={config.num_hidden_layers}"
                )

    def check_prompt(self, prompt_len: int) -> None:
        for part in self.parts:
            part.compressor.check_prompt(prompt_len)

    def install(self, engine: Engine) -> list[Any]:
        handles: list[Any] = []
        for part in self.parts:
            handles += part.compressor.install(engine)
        return handles

    def peak_generated(self, prompt_len: int, prompt_slots: int, appends: int) -> int | None:
        """The largest peak of the decode parts (every appended token on layers no decode part covers)."""
        decode = [part for part in self.parts if part.phase == "decode"]
        peaks = [part.compressor.peak_generated(prompt_len, prompt_slots, appends) for part in decode]
        if not decode or any(part.layers is not None for part in decode):
            peaks.append(appends)  # layers no decode part touches keep every appended token
        return None if None in peaks else max(peaks)

    def after_attention(self, event: LayerEvent) -> None:
        for part in self.parts:
            if part.acts_on(event):
                # each part scores with its own window of recent queries (the layer keeps the largest)
                part.compressor.after_attention(attrs.evolve(event, query_window=part.compressor.query_window))

    def config(self) -> dict[str, Any]:
        """``{"name": ..., "parts": {key: {"phase", "layers", "compressor": the part's config()}}}``."""
        return {
            "name": self.name,
            "parts": {
                part.key: {
                    "phase": part.phase,
                    "layers": None if part.layers is None else list(part.layers),
                    "compressor": part.compressor.config(),
                }
                for part in self.parts
            },
        }


class Preset:
    """A named composition of registered compressors, registered through the ``kvsieve_compressors`` hook like
    any compressor. Calling it builds the :class:`Composite`; parameters are addressed as ``part.param``.

    (A plain class, not an attrs one: ``Registry.create`` checks an attrs class's fields as parameter names,
    while a preset's parameters are ``part.param`` and it checks them itself.)

    Args:
        name: the registered name, e.g. ``"fastkv+rpc"``.
        parts: the :class:`Part` list; each ``compressor`` is a registered compressor name.
    """

    def __init__(self, name: str, parts: Sequence[Part]):
        self.name = name
        self.parts = tuple(parts)
        if not all(isinstance(part.compressor, str) for part in self.parts):
            raise TypeError(f"preset {name!r}: parts name registered compressors (strings), got {self.parts}")

    @property
    def phases(self) -> frozenset[str]:
        """The phases of its slots (what ``kvsieve plugins`` shows, before anything is built)."""
        return frozenset(part.phase for part in self.parts)

    @classmethod
    def parse(cls, name: str) -> Preset:
        """``"a+b"``: registered compressor ``a`` in the prefill slot, ``b`` in the decode slot."""
        names = name.split("+")
        if len(names) != 2 or not all(names):
            raise CompositionError(
                f"{name!r}: an ad-hoc composition is 'PREFILL+DECODE', two registered compressor names"
            )
        return cls(name, [Part(names[0], "prefill"), Part(names[1], "decode")])

    def __call__(self, **params: Any) -> Composite:
        keys = [part.key for part in self.parts]
        per_part: dict[str, dict[str, Any]] = {key: {} for key in keys}
        for full, value in params.items():
            key, dot, param = full.partition(".")
            if not dot or key not in per_part:
                if dot:
                    close = [f"{c}.{param}" for c in difflib.get_close_matches(key, keys, n=1)]
                else:  # a bare parameter: the parts that take it
                    close = [f"{p.key}.{full}" for p in self.parts if full in _parameters(p.compressor)]
                hint = f" Did you mean {' or '.join(close)}?" if close else ""
                raise UnknownParameterError(
                    f"{self.name} has no parameter {full!r}.{hint} Address a part's parameter as "
                    f"PART.PARAM; its parts: {', '.join(keys)}."
                )
            per_part[key][param] = value
        built = [
            attrs.evolve(part, compressor=_create(part.compressor, per_part[part.key], self.name, part.key))
            for part in self.parts
        ]
        return Composite(self.name, built)

    def __repr__(self) -> str:
        return f"Preset({self.name!r}: {' + '.join(map(str, self.parts))})"
