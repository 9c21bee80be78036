"""From labels to couplings: connected components become units, units group into couplings.

Two units belong to the same coupling when they touch the same ``(param, dim)`` pairs, sit at the
same heads of batched products (tags), and are both exact or both not. Everything here is
vectorised with numpy so that a LLaMA-7B-sized graph (millions of slices) groups in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ecospa.graph.capture import module_of
from ecospa.graph.flow import FlowResult
from ecospa.graph.ir import SliceTable

__all__ = ["RawCoupling", "group_units"]


@dataclass
class RawCoupling:
    """A coupling before naming and execution planning."""

    kind: str
    reason: str | None
    tables: tuple[SliceTable, ...]
    width: int
    first_site: int  # index of the first node where its units are contracted
    site_modules: tuple[str, ...]
    comps: np.ndarray  # component ids of its units, in unit order


def _split_by(keys: np.ndarray, values: np.ndarray) -> dict[int, tuple[int, ...]]:
    """``{key: tuple(sorted unique values)}`` for parallel arrays."""
    if keys.size == 0:
        return {}
    pair = np.unique(np.stack([keys, values], axis=1), axis=0)
    cuts = np.nonzero(np.diff(pair[:, 0]))[0] + 1
    ks = pair[np.r_[0, cuts], 0]
    groups = np.split(pair[:, 1], cuts)
    return {int(k): tuple(g.tolist()) for k, g in zip(ks, groups)}


def group_units(flow: FlowResult) -> tuple[list[RawCoupling], np.ndarray, np.ndarray]:
    """Group the units of ``flow`` into couplings.

    Returns (raw couplings in graph order, component id per label, coupling id per component
    (-1 when the component is not a unit of any coupling)).
    """
    space = flow.space
    ncomp, comp = space.components()
    pd = space.pd_of_labels()
    poison = space.poison_array()
    contracted = space.event_mask("contract")
    is_unit = np.zeros(ncomp, dtype=bool)
    is_unit[comp[contracted]] = True

    reason = np.full(ncomp, -1, dtype=np.int64)
    pl = np.nonzero(poison >= 0)[0][::-1]
    reason[comp[pl]] = poison[pl]
    events = {}
    for kind in ("actact", "bmm", "gate", "nonlinear"):
        m = np.zeros(ncomp, dtype=bool)
        m[comp[space.event_mask(kind)]] = True
        events[kind] = m

    labels = np.nonzero(is_unit[comp])[0]
    sig = _split_by(comp[labels], pd[labels])
    tl, tt = space.tag_pairs()
    keep = is_unit[comp[tl]] if tl.size else np.zeros(0, dtype=bool)
    tags = _split_by(comp[tl[keep]], tt[keep]) if tl.size else {}
    sl, sn = space.site_pairs()
    first_site = np.full(ncomp, np.iinfo(np.int64).max, dtype=np.int64)
    if sl.size:
        np.minimum.at(first_site, comp[sl], sn)
    min_label = np.full(ncomp, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(min_label, comp[labels], labels)

    groups: dict[tuple, list[int]] = {}
    for c in np.nonzero(is_unit)[0].tolist():
        key = (sig[c], tags.get(c, ()), int(reason[c]) >= 0)
        groups.setdefault(key, []).append(c)

    gid_of = np.full(ncomp, -1, dtype=np.int64)
    rank_of = np.zeros(ncomp, dtype=np.int64)
    order = sorted(groups.items(), key=lambda kv: (min(first_site[kv[1]]), min(min_label[kv[1]])))
    raws: list[RawCoupling] = []
    for g, (key, comps) in enumerate(order):
        comps_arr = np.array(sorted(comps, key=lambda c: min_label[c]), dtype=np.int64)
        gid_of[comps_arr] = g
        rank_of[comps_arr] = np.arange(comps_arr.size)
        rid = reason[comps_arr]
        why = space.reasons[int(rid[rid >= 0][0])] if (rid >= 0).any() else None
        ev = {k: bool(m[comps_arr].any()) for k, m in events.items()}
        kind = ("qk" if ev["actact"] else "vo" if ev["bmm"] else "glu" if ev["gate"]
                else "ffn" if ev["nonlinear"] else "linear")
        fs = int(first_site[comps_arr].min())
        raws.append(RawCoupling(kind=kind, reason=why, tables=(), width=int(comps_arr.size),
                                first_site=fs, site_modules=(), comps=comps_arr))

    # slice tables, vectorised: sort unit labels by (coupling, pd, unit, label)
    lab = labels
    g = gid_of[comp[lab]]
    r = rank_of[comp[lab]]
    p = pd[lab]
    order_idx = np.lexsort((lab, r, p, g))
    lab, g, r, p = lab[order_idx], g[order_idx], r[order_idx], p[order_idx]
    cuts = np.nonzero((np.diff(g) != 0) | (np.diff(p) != 0))[0] + 1
    starts = np.r_[0, cuts]
    ends = np.r_[cuts, lab.size]
    per_group: dict[int, list[SliceTable]] = {}
    for s, e in zip(starts.tolist(), ends.tolist()):
        if s == e:
            continue
        pid = int(p[s])
        name, dim = space.pd_names[pid]
        tab = SliceTable(name, dim, r[s:e].copy(), lab[s:e] - space.pd_start[pid])
        per_group.setdefault(int(g[s]), []).append(tab)
    site_mods: dict[int, set[str]] = {}
    if sl.size:
        sg = gid_of[comp[sl]]
        for gi, ni in set(zip(sg.tolist(), sn.tolist())):
            if gi >= 0:
                site_mods.setdefault(gi, set()).add(module_of(flow.nodes[ni]))
    for gi, raw in enumerate(raws):
        raw.tables = tuple(per_group.get(gi, ()))
        raw.site_modules = tuple(sorted(site_mods.get(gi, ())))
    return raws, comp, gid_of
