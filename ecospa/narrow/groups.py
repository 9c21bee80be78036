"""Ragged heads grouped by width: one narrow graph per group, their outputs summed.

Padding every head of a layer to its widest kept head (``layout``) wastes the padding's FLOPs in
the projections and the attention kernel. Grouping heads of (nearly) the same width runs each
group at its own width instead: the call is split into one narrow graph per group, each keeping
only its group's heads (the others are left out: ``layout.analyse(drop_blocks=True)``), and the
outputs are added. That is exact when the module's output is the sum of its heads' contributions
through the output product plus terms that do not depend on the heads; the output product's
bias is fed to the first group only. Anything else (another head-independent term in the output,
a norm after the output product) shows in the first-call check against the exact path, and the
call then runs the padded layout.

Heads are found from the data flow, not from names: rows of the blocked tensors (a head's
channels) that share units, or sit at the same position of a head axis of the same size, are one
head (with GQA: one KV group with its query heads). A head's width key is its kept count per
blocked tensor, rounded up to the padding multiple; heads are grouped by key, and the groups
with the least padding between them are merged until at most ``max_groups`` remain.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ecospa.narrow.positions import blocked_factors, channel_dim, factor_rows, kept_labels, part_dims
from ecospa.capture.export import Captured
from ecospa.analysis.flow import propagate

__all__ = ["head_groups", "output_biases", "GroupSum"]

aten = torch.ops.aten


class _UF:
    def __init__(self):
        self.p: dict = {}

    def find(self, x):
        self.p.setdefault(x, x)
        while self.p[x] != x:
            self.p[x] = self.p[self.p[x]]
            x = self.p[x]
        return x

    def union(self, a, b):
        self.p[self.find(a)] = self.find(b)


def head_groups(captured: Captured, kept: Mapping[str, Mapping[int, np.ndarray]], *, multiple: int = 8,
                max_groups: int = 3, flow=None) -> list[dict[str, dict[int, np.ndarray]]] | None:
    """Per group of heads, the removal record that keeps only that group's heads (every other
    unit of the heads removed); None when grouping does not apply (one width, a single head,
    units outside the heads, blocks that are not heads). ``flow``: ``propagate(captured)`` if known."""
    flow = flow if flow is not None else propagate(captured)
    space = flow.space
    _, comp = space.components()
    keep_lab = kept_labels(space, kept)
    ncomp = int(comp.max()) + 1 if comp.size else 0
    kept_comp = np.ones(ncomp, dtype=bool)
    np.logical_and.at(kept_comp, comp, keep_lab)
    uf = _UF()
    rows_of: list[tuple[int, dict]] = []  # per blocked factor: (factor id, {head key: kept count})
    for fi, f in enumerate(blocked_factors(flow)):
        n = channel_dim(f, comp)
        rows, sel = factor_rows(f, n)
        c = np.where(rows >= 0, comp[np.maximum(rows, 0)], -1)
        parts = part_dims(f, comp, sel)
        blocks = [d for d in sel if d not in parts]
        if len(blocks) != 1:
            return None
        head = blocks[0]
        shape = [f.shape[d] for d in sel]
        hpos = np.indices(shape)[sel.index(head)].reshape(-1)
        counts: dict = {}
        for r in range(rows.shape[0]):
            key = ("head", f.shape[head], int(hpos[r]))
            for u in np.unique(c[r][c[r] >= 0]):
                uf.union(key, ("unit", int(u)))
            live = (c[r] < 0) | kept_comp[np.maximum(c[r], 0)]
            counts[key] = max(counts.get(key, 0), int(live.sum()))
        rows_of.append((fi, counts))
    heads = {k for _, counts in rows_of for k in counts}
    clusters: dict = {}
    for h in heads:
        clusters.setdefault(uf.find(h), []).append(h)
    if len(clusters) < 2:
        return None
    # every removed-or-kept unit of the record must belong to a head (nothing else in the call)
    unit_cluster = {k[1]: uf.find(k) for k in list(uf.p) if k[0] == "unit"}
    for i, (name, dim) in enumerate(space.pd_names):
        if kept.get(name, {}).get(dim) is None or name.startswith("<"):
            continue
        cs = comp[space.pd_start[i]: space.pd_start[i] + space.pd_size[i]]
        if any(int(u) not in unit_cluster for u in np.unique(cs)):
            return None
    # width key per cluster: per factor, the widest kept count of its rows, rounded up
    keys = {}
    for root, members in clusters.items():
        key = []
        for fi, counts in rows_of:
            w = max((counts[m] for m in members if m in counts), default=0)
            key.append(-(-w // multiple) * multiple)
        keys[root] = tuple(key)
    groups: dict[tuple, list] = {}
    for root, key in keys.items():
        groups.setdefault(key, []).append(root)
    if len(groups) < 2:
        return None
    merged = [(np.array(k), roots) for k, roots in groups.items()]
    while len(merged) > max_groups:
        best = None
        for a in range(len(merged)):
            for b in range(a + 1, len(merged)):
                new = np.maximum(merged[a][0], merged[b][0])
                cost = sum(((new - k).sum()) * len(r) for k, r in (merged[a], merged[b]))
                if best is None or cost < best[0]:
                    best = (cost, a, b, new)
        _, a, b, new = best
        merged[a] = (new, merged[a][1] + merged[b][1])
        del merged[b]
    root_of = [uf.find(("unit", u)) for u in range(ncomp)]
    out = []
    for _, roots in merged:
        mine = set(roots)
        comps = np.array([r in mine for r in root_of], dtype=bool)
        rec: dict[str, dict[int, np.ndarray]] = {}
        for i, (name, dim) in enumerate(space.pd_names):
            k = kept.get(name, {}).get(dim)
            if k is None or name.startswith("<"):
                continue
            cs = comp[space.pd_start[i]: space.pd_start[i] + space.pd_size[i]]
            k = np.asarray(k)
            rec.setdefault(name, {})[dim] = k[comps[cs[k]]]
        out.append(rec)
    return out


def output_biases(program, kept: Mapping[str, Mapping[int, np.ndarray]]) -> set[str]:
    """Parameters added by the products that consume the heads' channels (the output
    projection's bias): ``linear(x, W, b)`` with ``W`` sliced along its input dim, or
    ``addmm(b, x, W)`` with ``W`` sliced along dim 0."""
    names = {n.name: kind[1] for n, kind in zip((n for n in program.graph.nodes if n.op == "placeholder"),
                                               program.kinds) if kind[0] == "param"}
    out = set()
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        packet = getattr(node.target, "overloadpacket", None)
        if packet is aten.linear and len(node.args) > 2:
            w, b, dim = node.args[1], node.args[2], 1
        elif packet is aten.addmm:
            w, b, dim = node.args[2], node.args[0], 0
        else:
            continue
        wn = names.get(getattr(w, "name", None))
        bn = names.get(getattr(b, "name", None))
        if wn is not None and bn is not None and kept.get(wn, {}).get(dim) is not None:
            out.add(bn)
    return out


class GroupSum(torch.nn.Module):
    """The narrow graphs of the head groups of one call, run in turn and their outputs added
    (floating outputs; others are taken from the first group). ``zeroed[g]``: argument positions
    fed zeros in group ``g`` (the output product's bias, added once)."""

    def __init__(self, graphs: list[torch.fx.GraphModule], zeroed: list[tuple[int, ...]]):
        super().__init__()
        self.graphs = torch.nn.ModuleList(graphs)
        self.zeroed = zeroed

    def forward(self, *args):
        total = None
        for gm, zero in zip(self.graphs, self.zeroed):
            a = list(args)
            for i in zero:
                a[i] = torch.zeros_like(a[i])
            out = list(gm(*a))
            if total is None:
                total = out
                continue
            total = [t + o if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                     for t, o in zip(total, out)]
        return total
