"""From labels to couplings: connected components become units, units group into couplings.

A unit is a component whose labels are contracted somewhere, or lost (an op the analysis
cannot follow them through: they are reported as an inexact coupling with the reason rather than
vanishing; ``ecospa.analysis.accounting``). Two units belong to the same coupling when they touch the same ``(param, dim)`` pairs, sit at the
same heads of batched products (tags), and are both exact or both not. Everything here is
vectorised with numpy so that a LLaMA-7B-sized graph (millions of slices) groups in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ecospa.capture.export import module_of
from ecospa.analysis.flow import FlowResult
from ecospa.ir.coupling import SliceTable

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


def _set_hash(keys: np.ndarray, values: np.ndarray, n_keys: int, n_values: int, seed: int) -> np.ndarray:
    """Per key, a 64-bit hash of the *set* of values paired with it (order and repeats ignored)."""
    out = np.zeros(n_keys, dtype=np.uint64)
    if keys.size == 0:
        return out
    rand = np.random.default_rng(seed).integers(1, 2**63, size=max(n_values, 1), dtype=np.int64).astype(np.uint64)
    pair = np.unique(keys.astype(np.int64) * np.int64(n_values) + values.astype(np.int64))
    k, v = pair // n_values, pair % n_values
    np.add.at(out, k, rand[v])
    return out


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
    # labels lost where the analysis cannot follow them are units too (of an inexact coupling,
    # poisoned with the reason): their contraction, if any, happens where it cannot be seen
    is_unit[comp[space.event_mask("lost")]] = True

    reason = np.full(ncomp, -1, dtype=np.int64)
    pl = np.nonzero(poison >= 0)[0][::-1]
    reason[comp[pl]] = poison[pl]
    events = {}
    for kind in ("actact", "bmm", "gate", "nonlinear"):
        m = np.zeros(ncomp, dtype=bool)
        m[comp[space.event_mask(kind)]] = True
        events[kind] = m

    labels = np.nonzero(is_unit[comp])[0]
    npd = len(space.pd_names)
    sig = _set_hash(comp[labels], pd[labels], ncomp, npd, seed=1)
    tl, tt = space.tag_pairs()
    keep = is_unit[comp[tl]] if tl.size else np.zeros(0, dtype=bool)
    tags = _set_hash(comp[tl[keep]], tt[keep], ncomp, max(space.n_tags, 1), seed=2)
    sl, sn = space.site_pairs()
    big = np.iinfo(np.int64).max
    first_site = np.full(ncomp, big, dtype=np.int64)
    if sl.size:
        np.minimum.at(first_site, comp[sl], sn)
    min_label = np.full(ncomp, big, dtype=np.int64)
    np.minimum.at(min_label, comp[labels], labels)

    units = np.nonzero(is_unit)[0]
    poisoned = (reason[units] >= 0).astype(np.uint64)
    order = np.lexsort((min_label[units], poisoned, tags[units], sig[units]))
    su = units[order]
    k_sig, k_tag, k_poi = sig[su], tags[su], poisoned[order]
    new = np.r_[True, (np.diff(k_sig.view(np.int64)) != 0) | (np.diff(k_tag.view(np.int64)) != 0) | (np.diff(k_poi.view(np.int64)) != 0)] if su.size else np.zeros(0, bool)
    gstart = np.nonzero(new)[0]
    gend = np.r_[gstart[1:], su.size]
    # order groups by (first contraction site, first label)
    g_site = np.minimum.reduceat(first_site[su], gstart) if su.size else np.zeros(0, np.int64)
    g_lab = np.minimum.reduceat(min_label[su], gstart) if su.size else np.zeros(0, np.int64)
    gorder = np.lexsort((g_lab, g_site))

    gid_of = np.full(ncomp, -1, dtype=np.int64)
    rank_of = np.zeros(ncomp, dtype=np.int64)
    raws: list[RawCoupling] = []
    for g, gi in enumerate(gorder.tolist()):
        comps_arr = su[gstart[gi]:gend[gi]]  # already sorted by min label within the group
        gid_of[comps_arr] = g
        rank_of[comps_arr] = np.arange(comps_arr.size)
        rid = reason[comps_arr]
        why = space.reasons[int(rid[rid >= 0][0])] if (rid >= 0).any() else None
        ev = {k: bool(m[comps_arr].any()) for k, m in events.items()}
        kind = ("qk" if ev["actact"] else "vo" if ev["bmm"] else "glu" if ev["gate"]
                else "ffn" if ev["nonlinear"] else "linear")
        raws.append(RawCoupling(kind=kind, reason=why, tables=(), width=int(comps_arr.size),
                                first_site=int(g_site[gi]), site_modules=(), comps=comps_arr))

    _, side_comp = space.components(same_side=True)
    reader_side = np.zeros(int(side_comp.max()) + 1 if side_comp.size else 0, dtype=bool)
    reader_side[side_comp[space.event_mask("reader")]] = True
    reader = reader_side[side_comp]
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
    for a, b in zip(starts.tolist(), ends.tolist()):
        if a == b:
            continue
        pid = int(p[a])
        name, dim = space.pd_names[pid]
        if name.startswith("<"):  # pseudo-parameters (model inputs) are not part of any plan
            continue
        tab = SliceTable(name, dim, r[a:b].copy(), lab[a:b] - space.pd_start[pid],
                         reader[lab[a:b]].astype(np.int8))
        per_group.setdefault(int(g[a]), []).append(tab)
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
