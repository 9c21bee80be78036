"""The result of coupling discovery: :class:`Coupling` and :class:`CouplingGraph`.

A *coupling* is a set of weight slices that the model only uses through a product along one
shared inner dimension. Its *units* are the positions of that inner dimension: removing unit ``j``
means removing every slice listed in ``units()[j]`` together. Everything is identified by
parameter name, so a plan made on one model applies to any structurally identical copy.

Units are stored as tables (one per ``(param, dim)``, numpy arrays of unit id and index) so that
a LLaMA-7B-sized model, with millions of slices, stays cheap; ``units()`` builds the lists on
demand.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from ecospa.errors import PlanError

__all__ = ["Slice", "SliceTable", "Site", "Stamp", "Coupling", "CouplingGraph"]


class Slice(NamedTuple):
    """One slice of a parameter: ``param.select(dim, index)``. Compares equal to a plain tuple."""

    param: str
    dim: int
    index: int


class SliceTable(NamedTuple):
    """All slices of one ``(param, dim)`` in a coupling: slice ``k`` is ``index[k]`` of unit ``unit[k]``.

    ``side[k]`` (optional) is 0 when the slice produces the unit's channel (a producer row, q's
    head dimension) and 1 when it reads it at the contraction (a consumer column, k's head
    dimension): the two sides of Eq. 9.
    """

    param: str
    dim: int
    unit: np.ndarray  # (n,) int64, unit id in [0, width)
    index: np.ndarray  # (n,) int64, index along ``dim``
    side: np.ndarray | None = None  # (n,) int8, 0 producer side, 1 reader side


class Site(NamedTuple):
    """How the executor removes the slices of one ``(param, dim)`` of a coupling.

    ``role`` is one of:
      - ``"out"``: output channels of a linear-like module (``module`` is its path),
      - ``"in"``: input channels of a linear-like module,
      - ``"bias"``: the bias entries that go with ``"out"`` channels,
      - ``"direct"``: a parameter whose uses all see the smaller tensor directly (elementwise
        passengers, raw matmuls inside a compact region): only sliced, no adapter,
      - ``"mha"``: a parameter of a ``torch.nn.MultiheadAttention`` (its forward is replaced).
    ``layout`` is ``"compact"`` (the channels are simply absent downstream) or ``"scatter"``
    (the producer's output is scattered back to its original width, zeros where removed, and
    consumers gather the kept channels, so reshapes into heads keep working unchanged).
    ``transposed`` is True when the module stores its weight as ``(in, out)`` (GPT-2 Conv1D).
    """

    param: str
    dim: int
    role: str
    module: str
    layout: str
    transposed: bool = False


class Stamp(NamedTuple):
    """The state of one ``(param, dim)`` a coupling slices, when the coupling was found: its size
    and a fingerprint of which dense slices it still had (0: never sliced). The executor refuses a
    coupling whose stamps do not match the model (stale, or found on a model in another state)."""

    param: str
    dim: int
    size: int
    fingerprint: int


@dataclass(frozen=True, eq=False)
class Coupling:
    """Weight slices used only through their product along one inner dimension.

    Couplings hash and compare by identity, so they can key a removal plan.

    Attributes:
        name: stable, readable identifier, e.g. ``"h.3.attn.qk.head2"``.
        kind: ``"qk"``, ``"vo"``, ``"ffn"``, ``"glu"`` or ``"linear"``.
        exact: True when removing units keeps ``pruned(x) == masked_dense(x)``.
        reason: why the coupling is not exact (None when it is).
        width: number of units.
        tables: the slices, one :class:`SliceTable` per ``(param, dim)``.
        sites: how each ``(param, dim)`` is executed (see :class:`Site`).
        stamp: the state of the model it was found on, one :class:`Stamp` per table (empty for a
            coupling built by hand: then only index ranges are checked).
        scope: path of the smallest module whose forward contains everything the coupling's
            channels flow through (where a narrow rewrite of the graph happens; "" the root).
        group: name of its width group: the couplings batched side by side in one tensor (the
            heads of one attention), which run fastest at equal widths.
    """

    name: str
    kind: str
    exact: bool
    reason: str | None
    width: int
    tables: tuple[SliceTable, ...] = field(repr=False)
    sites: tuple[Site, ...] = field(default=(), repr=False)
    stamp: tuple[Stamp, ...] = field(default=(), repr=False)
    scope: str = field(default="", repr=False)
    group: str = field(default="", repr=False)

    def replace(self, **changes) -> "Coupling":
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def units(self) -> list[list[Slice]]:
        """One list per unit of ``(param_name, dim, index)``: every slice removed together."""
        out: list[list[Slice]] = [[] for _ in range(self.width)]
        for t in self.tables:
            for u, i in zip(t.unit.tolist(), t.index.tolist()):
                out[u].append(Slice(t.param, t.dim, i))
        return out

    @property
    def params(self) -> tuple[str, ...]:
        """Names of the parameters this coupling slices, sorted."""
        return tuple(sorted({t.param for t in self.tables}))

    def unit_numel(self, shapes: dict[str, Sequence[int]]) -> np.ndarray:
        """``(width,)`` number of parameter entries each unit holds, given ``{param: shape}``."""
        out = np.zeros(self.width, dtype=np.int64)
        for t in self.tables:
            shape = shapes[t.param]
            size = int(np.prod([k for d, k in enumerate(shape) if d != t.dim], dtype=np.int64))
            np.add.at(out, t.unit, size)
        return out

    def __repr__(self) -> str:
        flag = "exact" if self.exact else f"inexact: {self.reason}"
        return f"Coupling({self.name!r}, kind={self.kind!r}, width={self.width}, {flag})"


class CouplingGraph(Sequence[Coupling]):
    """Every coupling of a model, in graph order.

    Iterating, indexing and ``len`` see only the couplings offered for removal (the exact ones,
    unless built with ``include_inexact=True``); ``all`` and ``inexact`` see everything found.
    ``cg["h.0.attn.qk.head1"]`` looks a coupling up by name.

    Attributes:
        all: every coupling found, exact or not.
        shapes: ``{param_name: shape}`` of the model when it was analysed.
        kept: ``{(param, dim): kept dense indices}`` of every dimension the model had already
            lost slices along when it was analysed (empty for a dense model); the stamps of the
            couplings are fingerprints of it.
        inputs: the example inputs it was found with, as ``(args, kwargs)`` (None if unknown):
            ``prune(..., verify=True)`` runs them.
    """

    def __init__(
        self,
        couplings: Sequence[Coupling],
        *,
        shapes: Mapping[str, tuple[int, ...]] | None = None,
        kept: Mapping[tuple[str, int], np.ndarray] | None = None,
        include_inexact: bool = False,
        inputs: tuple[tuple, dict[str, Any]] | None = None,
    ):
        self.all: tuple[Coupling, ...] = tuple(couplings)
        self.shapes: dict[str, tuple[int, ...]] = dict(shapes or {})
        self.kept: dict[tuple[str, int], np.ndarray] = dict(kept or {})
        self.include_inexact = include_inexact
        self.inputs = inputs
        self._offered = tuple(c for c in self.all if include_inexact or c.exact)
        self._by_name = {c.name: c for c in self.all}

    @property
    def inexact(self) -> tuple[Coupling, ...]:
        """The couplings that cannot be removed exactly, each with its ``reason``."""
        return tuple(c for c in self.all if not c.exact)

    def __len__(self) -> int:
        return len(self._offered)

    def __iter__(self) -> Iterator[Coupling]:
        return iter(self._offered)

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            try:
                return self._by_name[key]
            except KeyError:
                if not any(c.exact for c in self.all):
                    why = sorted({c.reason for c in self.all if c.reason})[:3]
                    raise PlanError(
                        f"no coupling named {key!r}: this model has no exact coupling, so there is "
                        f"nothing to prune" + (f" (what was found is inexact: {why})" if why else "")
                        + "; print(cg.summary()) lists what discovery found and why") from None
                close = [n for n in self._by_name if key.split(".")[-1] in n][:3]
                raise PlanError(
                    f"no coupling named {key!r} (there are {len(self._by_name)}; similar: "
                    f"{close}); list them with [c.name for c in ecospa.auto_couple(model)]"
                ) from None
        return self._offered[key]

    def __contains__(self, key) -> bool:
        if isinstance(key, str):
            return key in self._by_name
        return any(key is c for c in self.all)

    def summary(self) -> str:
        """A plain-text table: name, kind, width, exact or the reason it is not."""
        rows = [f"{'name':44s} {'kind':6s} {'width':>6s}  status"]
        for c in self.all:
            status = "exact" if c.exact else f"inexact: {c.reason}"
            rows.append(f"{c.name:44s} {c.kind:6s} {c.width:6d}  {status}")
        return "\n".join(rows)

    def __repr__(self) -> str:
        return f"CouplingGraph({len(self)} offered, {len(self.inexact)} inexact)"
