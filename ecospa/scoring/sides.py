"""Which side of a coupling each of its slices is on: the K = 2 "matrices" of Eq. 6.

W_1 is every slice that produces a coupling's units (rows of W_in and its bias; a GLU's gate and
up rows together; a head's q rows), W_2 every slice that reads them (columns of W_out; the head's
k rows). :func:`build_index` turns a coupling into gather indices per ``(param, dim)`` and side,
once, so that scoring a coupling is a few gathers of per-channel statistics
(:class:`~ecospa.scoring.importance.Importance`).

**Which side is which.** From ``SliceTable.side`` when discovery provides it (0 producer,
1 reader). Otherwise: sites with role ``"in"`` (and dim 1 of an ``"mha"`` weight) are
readers; ``"out"``, ``"bias"``, ``"direct"`` are producers. A coupling with no reader (``qk``:
both operands are output rows) is split by module (first module one side, the others the other)
or, when one fused module holds both operands, by position inside each unit: a unit's slice with
the highest index (the k row, after the q rows in fused layouts) is one side, the rest the other.
Without sites, a 1-D parameter is a bias, dim 0 of a 2-D one an output, dim 1 an input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from ecospa.ir.coupling import Coupling

__all__ = ["SidePart", "CouplingIndex", "build_index", "PRODUCER", "READER"]

READER, PRODUCER = 1, 0  # side numbers


@dataclass(frozen=True)
class SidePart:
    """Slices of one ``(param, dim)`` on one side of a coupling; ``(m,)`` long tensors."""

    param: str
    dim: int
    side: int
    matrix: int  # Eq. 6's k: position of this part's side in ``CouplingIndex.matrix_numel``
    channels: torch.Tensor  # (m,) index along ``dim``
    units: torch.Tensor  # (m,) unit id in [0, width)
    slice_numel: int  # entries per slice: numel / shape[dim]


@dataclass(frozen=True)
class CouplingIndex:
    """Precomputed gather indices of one coupling."""

    coupling: Coupling
    parts: tuple[SidePart, ...]
    matrix_numel: tuple[int, ...]  # entries of each side inside the coupling


def _role(c: Coupling, param: str, dim: int, ndim: int) -> str:
    """The site role of ``(param, dim)`` in ``c`` (from its shape when ``c`` has no sites)."""
    for s in c.sites:
        if s.param == param and s.dim == dim:
            if s.role == "mha":
                return "in" if (ndim == 2 and dim == 1) else "out"
            return s.role
    if ndim == 1:
        return "bias"
    return "out" if dim == 0 else "in"


def _module(c: Coupling, param: str, dim: int) -> str:
    """The module that slices ``(param, dim)`` in ``c`` (its parameter's owner without sites)."""
    for s in c.sites:
        if s.param == param and s.dim == dim:
            return s.module
    return param.rsplit(".", 1)[0] if "." in param else ""


def _rank_sides(unit: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Side per slice when one module holds both operands: the highest index of a unit is 1."""
    order = np.lexsort((index, unit))
    u = unit[order]
    last = np.ones(u.size, dtype=bool)
    last[:-1] = u[1:] != u[:-1]
    first = np.ones(u.size, dtype=bool)
    first[1:] = u[1:] != u[:-1]
    side = np.zeros(u.size, dtype=np.int64)
    side[last & ~first] = 1  # units with a single slice here stay on side 0
    out = np.empty_like(side)
    out[order] = side
    return out


def build_index(c: Coupling, shapes: Mapping[str, tuple[int, ...]],
                device_of: Mapping[str, torch.device]) -> CouplingIndex:
    """The gather indices of ``c``: per ``(param, dim)`` and side, the channels and their units
    (on the parameter's device), and the entries of each side inside the coupling (Eq. 6's
    ``|W_k|``). ``shapes``: ``{param: shape}`` of the model; ``device_of``: ``{param: device}``."""
    roles = [_role(c, t.param, t.dim, len(shapes[t.param])) for t in c.tables]
    modules = [_module(c, t.param, t.dim) for t in c.tables]
    has_reader = any(r == "in" for r in roles)
    distinct = list(dict.fromkeys(modules))
    parts: list[SidePart] = []
    matrix_ids: dict[int, int] = {}
    matrix_numel: list[int] = []
    for t, role, mod in zip(c.tables, roles, modules):
        shape = shapes[t.param]
        slice_numel = int(np.prod([k for d, k in enumerate(shape) if d != t.dim], dtype=np.int64))
        if t.side is not None:  # discovery says which side each slice is on
            sides = np.asarray(t.side, dtype=np.int64)
        elif has_reader:
            sides = np.full(t.unit.size, READER if role == "in" else PRODUCER, dtype=np.int64)
        elif len(distinct) > 1:
            sides = np.full(t.unit.size, 0 if mod == distinct[0] else 1, dtype=np.int64)
        else:
            sides = _rank_sides(np.asarray(t.unit), np.asarray(t.index))
        dev = device_of.get(t.param, torch.device("cpu"))
        for side in (0, 1):
            mask = sides == side
            if not mask.any():
                continue
            if side not in matrix_ids:
                matrix_ids[side] = len(matrix_numel)
                matrix_numel.append(0)
            m = matrix_ids[side]
            matrix_numel[m] += int(mask.sum()) * slice_numel
            parts.append(SidePart(
                t.param, t.dim, side, m,
                torch.as_tensor(np.asarray(t.index)[mask], dtype=torch.long, device=dev),
                torch.as_tensor(np.asarray(t.unit)[mask], dtype=torch.long, device=dev),
                slice_numel,
            ))
    return CouplingIndex(c, tuple(parts), tuple(matrix_numel))
