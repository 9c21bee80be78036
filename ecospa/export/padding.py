"""The smallest config-expressible widths that contain a pruned model, and which dense indices
each exported tensor takes.

Per field (``fields.FieldMap``) and per layer (the state-dict key up to its last numeric
component: ``model.layers.3``), the kept values of that field's factor are collected from every
dim it sets (``q_proj`` rows ``(head, d)`` give kept heads and kept head positions). The exported
value of the field is the largest count any layer keeps; a layer that keeps fewer takes removed
(all-zero) units to fill up: *padding*, exact because a removed unit contributes zero (the pruned
model equals the masked dense model). Grouped heads (GQA) keep whole key/value groups, and the
same number of query heads in every group. A *fixed* field keeps its dense value and every index.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ecospa.export.fields import FieldMap
from ecospa.export.structure import Structure

__all__ = ["Selection", "select", "layer_of"]

_LAYER = re.compile(r"^(.*\.\d+)\.")


def layer_of(key: str) -> str:
    """The layer of a state-dict key: up to its last numeric component ("" for none)."""
    m = _LAYER.match(key)
    return m.group(1) if m else ""


@dataclass(frozen=True)
class Selection:
    """``values``: exported value of each editable field; ``index``: ``{(key, dim): dense
    indices}`` the exported tensor takes (dims absent: all); ``padded``: ``{field: why}``."""

    values: Mapping[str, int]
    index: Mapping[tuple[str, int], np.ndarray]
    padded: Mapping[str, str]


def _pad(kept: set[int], n: int, total: int) -> list[int]:
    """``kept`` plus the first removed values up to ``n`` of them, sorted."""
    out = sorted(kept)
    if len(out) < n:
        have = set(out)
        out = sorted(out + [v for v in range(total) if v not in have][: n - len(out)])
    return out


def _counts(per_layer: Mapping[str, set[int]]) -> tuple[int, int]:
    sizes = [len(v) for v in per_layer.values()]
    return min(sizes), max(sizes)


def select(fm: FieldMap, s: Structure, fixed: Mapping[str, str] | None = None, multiple: int = 1) -> Selection:
    """The exported field values and indices for the pruned model ``s``; fields in ``fixed``
    (``{field: why}``; the head field grouped with one too) keep their dense value; the other
    widths (not head counts) are rounded up to a ``multiple`` (never above the dense value):
    some kernels need aligned widths (grouped expert matmuls: rows of 16 bytes)."""
    kept: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    for (key, dim), lay in fm.layouts.items():
        radix = (lay.const,) + tuple(fm.values[f] for f in lay.fields)
        comps = np.unravel_index(s.kept(key, dim), radix)
        layer = layer_of(key)
        for f, comp in zip(lay.fields, comps[1:]):
            kept[f][layer].update(comp.tolist())
    fixed = dict(fixed or {})
    for a, (b, _) in fm.groups.items():
        if a in fixed or b in fixed:
            why = fixed.get(a) or fixed[b]
            fixed.setdefault(a, why)
            fixed.setdefault(b, why)
    sel: dict[str, dict[str, list[int]]] = {}
    values: dict[str, int] = {}
    padded: dict[str, str] = {}
    grouped = {b for b, _ in fm.groups.values()} | set(fm.groups)
    rounded: set[str] = set()
    for f, dense in fm.values.items():
        if f in fixed:
            values[f] = dense
            sel[f] = {layer: list(range(dense)) for layer in kept[f]}
            lo, hi = _counts(kept[f]) if kept[f] else (dense, dense)
            if lo < dense:
                padded[f] = f"layers keep {lo}..{hi} of {dense}; exported {dense}: {fixed[f]}"
        elif f not in grouped:
            lo, hi = _counts(kept[f]) if kept[f] else (dense, dense)
            values[f] = min(dense, -(-max(1, hi) // multiple) * multiple)
            if values[f] > max(1, hi):
                rounded.add(f)
            sel[f] = {layer: _pad(k, values[f], dense) for layer, k in kept[f].items()}
            if lo < values[f]:
                padded[f] = f"layers keep {lo}..{hi} of {dense}; exported {values[f]}"
    for a, (b, r) in fm.groups.items():
        if a in fixed:
            continue
        groups = {layer: kept[b][layer] | {h // r for h in kept[a][layer]} for layer in kept[a].keys() | kept[b].keys()}
        members = {(layer, g): {h % r for h in kept[a][layer] if h // r == g}
                   for layer, gs in groups.items() for g in gs}
        lo_g, hi_g = _counts(groups)
        n_groups = max(1, hi_g)
        per_group = max([1] + [len(m) for m in members.values()])
        values[b], values[a] = n_groups, n_groups * per_group
        sel[b], sel[a] = {}, {}
        for layer, gs in groups.items():
            sel[b][layer] = _pad(gs, n_groups, fm.values[b])
            sel[a][layer] = [g * r + j for g in sel[b][layer]
                             for j in _pad(members.get((layer, g), set()), per_group, r)]
        if lo_g < n_groups:
            padded[b] = f"layers keep {lo_g}..{hi_g} of {fm.values[b]} groups; exported {n_groups}"
        if any(len(m) < per_group for m in members.values()):
            padded[a] = f"groups keep 0..{per_group} of {r} heads; exported {per_group} per group"
    index: dict[tuple[str, int], np.ndarray] = {}
    for (key, dim), lay in fm.layouts.items():
        layer = layer_of(key)
        radix = (lay.const,) + tuple(fm.values[f] for f in lay.fields)
        axes = [np.arange(lay.const)] + [np.asarray(sel[f][layer], dtype=np.int64) for f in lay.fields]
        grid = np.meshgrid(*axes, indexing="ij")
        index[(key, dim)] = np.ravel_multi_index(tuple(g.ravel() for g in grid), radix).astype(np.int64)
    return Selection(values, index, _padding(fm, s, index, values, fixed, rounded, multiple))


def _padding(fm: FieldMap, s: Structure, index, values, fixed: Mapping[str, str], rounded: set[str],
             multiple: int) -> dict[str, str]:
    """``{"<key pattern> dim d": why}`` for every pruned dim exported larger than what it kept."""
    seen: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
    for key, r in s.records.items():
        for dim, k in r.kept.items():
            idx = index.get((key, dim))
            size = r.dense_shape[dim] if idx is None else idx.size
            if size > k.size:
                seen[(re.sub(r"\.\d+\.", ".*.", key), dim)].append((k.size, size))
    out: dict[str, str] = {}
    for (pattern, dim), pairs in sorted(seen.items()):
        lay = fm.layouts.get(next((k, dim) for k in s.records if re.fullmatch(
            re.escape(pattern).replace(r"\*", r"\d+"), k)))
        if lay is None:
            why = ("no editable config field sets this size" +
                   (f" ({'; '.join(f'{f}: {w}' for f, w in sorted(fm.fixed.items()))})" if fm.fixed else ""))
        else:
            parts = [f"{f}={values[f]}" + (f" ({fixed[f]})" if f in fixed else "") for f in lay.fields]
            why = " x ".join(([str(lay.const)] if lay.const > 1 else []) + parts)
            if rounded & set(lay.fields):
                why += (f" (widths rounded up to a multiple of {multiple}: the exported model does not run at the "
                        "exact ones)")
        kept = [k for k, _ in pairs]
        out[f"{pattern} dim {dim}"] = f"keeps {min(kept)}..{max(kept)}, exported {max(e for _, e in pairs)}: {why}"
    return out
