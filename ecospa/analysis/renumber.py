"""Couplings of a model after some of its slices are gone: drop removed units, renumber the rest.

Used twice, with one meaning: by ``remaining`` (the couplings after a prune, without capturing
the model again) and by ``auto_couple`` on a pruned model (the couplings of the dense model it
came from, renumbered to what it kept).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ecospa.ir.record import fingerprint
from ecospa.errors import EcospaError
from ecospa.ir.coupling import Coupling, CouplingGraph, SliceTable, Stamp

__all__ = ["renumber", "stamps"]


def stamps(c: Coupling, shapes: Mapping[str, tuple[int, ...]],
           kept: Mapping[tuple[str, int], np.ndarray]) -> tuple[Stamp, ...]:
    """One :class:`Stamp` per table of ``c`` for a model with ``shapes`` and record ``kept``."""
    return tuple(Stamp(t.param, t.dim, int(shapes[t.param][t.dim]) if t.param in shapes else -1,
                       fingerprint(kept.get((t.param, t.dim)))) for t in c.tables)


def renumber(cg: CouplingGraph, removed: Mapping[tuple[str, int], np.ndarray],
             kept: Mapping[tuple[str, int], np.ndarray]) -> CouplingGraph:
    """``cg`` after the slices ``removed[(param, dim)]`` (sorted indices in ``cg``'s numbering)
    are gone; ``kept`` is the resulting record (dense indices kept, per sliced dim).

    A unit loses all of its slices or none: units whose slices are removed disappear, the others
    are renumbered ``0..k-1`` in order and their indices shifted down past the removed ones.
    Names, kinds, order and sites stay.

    Raises:
        EcospaError: a unit lost only some of its slices (the removal does not follow units).
    """
    shapes = dict(cg.shapes)
    for (param, dim), rm in removed.items():
        if param in shapes and rm.size:
            s = list(shapes[param])
            s[dim] -= int(rm.size)
            shapes[param] = tuple(s)
    out = []
    for c in cg.all:
        gone = np.ones(c.width, dtype=bool)  # every slice of the unit removed
        some = np.zeros(c.width, dtype=bool)  # at least one
        for t in c.tables:
            rm = removed.get((t.param, t.dim))
            hit = np.isin(t.index, rm) if rm is not None and rm.size else np.zeros(t.index.size, bool)
            np.logical_or.at(some, t.unit, hit)
            np.logical_and.at(gone, t.unit, hit)
        if (some & ~gone).any():
            u = int(np.nonzero(some & ~gone)[0][0])
            raise EcospaError(f"unit {u} of coupling {c.name!r} lost only some of its slices; the "
                              "removal does not follow the coupling's units")
        new_id = np.full(c.width, -1, dtype=np.int64)
        keep_units = np.nonzero(~gone)[0]
        new_id[keep_units] = np.arange(keep_units.size)
        tables = []
        for t in c.tables:
            mask = new_id[t.unit] >= 0
            idx = t.index[mask]
            rm = removed.get((t.param, t.dim))
            if rm is not None and rm.size:
                idx = idx - np.searchsorted(rm, idx)
            side = t.side[mask] if t.side is not None else None
            tables.append(SliceTable(t.param, t.dim, new_id[t.unit][mask], idx, side))
        d = c.replace(width=int(keep_units.size), tables=tuple(tables))
        out.append(d.replace(stamp=stamps(d, shapes, kept)))
    return CouplingGraph(out, shapes=shapes, kept=kept, include_inexact=cg.include_inexact,
                         inputs=cg.inputs)
