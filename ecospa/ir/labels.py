"""Channel labels: which weight slice each position of a tensor carries.

Every dimension of every parameter gets one fresh integer label per index: label ``l`` stands
for the slice ``(param, dim, index)``. A tensor in the graph carries a list of *factors*: numpy
int64 arrays with the tensor's number of dimensions, of size 1 on the dimensions along which the
factor does not vary (so batch and sequence dimensions cost nothing), holding a label or -1 at
each position. A weight of shape (out, in) carries two factors, of shapes (out, 1) and (1, in).

Op rules (``ecospa.ops``) push factors through the graph and record facts in the
:class:`LabelSpace`: *edges* (two labels must be removed together), *poison* (a label meets an op
that mixes its channel, so removing it is not exact), *tags* (a label sits at a given head of a
batched product, which separates per-head couplings) and *events* (what kind of product it is
part of). Connected components of the edges are the units.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

__all__ = ["LabelSpace", "Factors", "varying", "to_ndim", "merge_aligned", "connected_components"]

Factors = list  # list[np.ndarray]; None for non-tensor values

EVENTS = ("contract", "actact", "bmm", "gate", "nonlinear", "reader", "lost")
# "lost": labels an op does not follow (no rule, a write into storage it cannot track): they
# become units of an inexact coupling with the reason, instead of vanishing


def varying(f: np.ndarray) -> tuple[int, ...]:
    """Dimensions along which factor ``f`` varies (size > 1)."""
    return tuple(d for d, k in enumerate(f.shape) if k > 1)


def to_ndim(f: np.ndarray, ndim: int) -> np.ndarray:
    """Prepend size-1 dimensions (numpy/torch broadcasting aligns on the right)."""
    if f.ndim == ndim:
        return f
    if f.ndim > ndim:
        extra = f.shape[: f.ndim - ndim]
        if any(k != 1 for k in extra):
            raise ValueError(f"cannot drop varying leading dims {extra}")
        return f.reshape(f.shape[f.ndim - ndim :])
    return f.reshape((1,) * (ndim - f.ndim) + f.shape)


class LabelSpace:
    """Allocates labels for parameter slices and collects edges, poison, tags and events."""

    def __init__(self) -> None:
        self.n = 0
        self.pd_names: list[tuple[str, int]] = []  # (param, dim) per pd id
        self.pd_start: list[int] = []
        self.pd_size: list[int] = []
        self._param_factors: dict[str, list[np.ndarray]] = {}
        self._edges: list[tuple[np.ndarray, np.ndarray]] = []
        self._cross: list[bool] = []
        self._poison: list[tuple[np.ndarray, int]] = []
        self.reasons: list[str] = []
        self._reason_ids: dict[str, int] = {}
        self._tags: list[tuple[np.ndarray, np.ndarray]] = []
        self.n_tags = 0
        self._events: dict[str, list[np.ndarray]] = defaultdict(list)
        self._sites: list[tuple[np.ndarray, int]] = []  # labels contracted at node index

    # -- allocation -------------------------------------------------------------------------
    def param_factors(self, name: str, shape: Sequence[int]) -> list[np.ndarray]:
        """Factors of a parameter: one fresh label per index of each dimension of size > 1."""
        if name in self._param_factors:
            return self._param_factors[name]
        ndim = len(shape)
        out = []
        for d, k in enumerate(shape):
            if k <= 1:
                continue
            self.pd_names.append((name, d))
            self.pd_start.append(self.n)
            self.pd_size.append(k)
            lab = np.arange(self.n, self.n + k, dtype=np.int64)
            self.n += k
            fshape = [1] * ndim
            fshape[d] = k
            out.append(lab.reshape(fshape))
        self._param_factors[name] = out
        return out

    # -- facts ------------------------------------------------------------------------------
    def edge(self, a: np.ndarray, b: np.ndarray, *, cross: bool = False) -> None:
        """Labels ``a[i]`` and ``b[i]`` must be removed together (both arrays broadcast).

        ``cross`` marks an edge across a contraction (producer meets reader); the others join
        slices on the same side (a bias with its weight's rows, GLU's gate with up).
        """
        a, b = np.broadcast_arrays(a, b)
        keep = (a >= 0) & (b >= 0) & (a != b)
        if keep.any():
            self._edges.append((a[keep].ravel(), b[keep].ravel()))
            self._cross.append(cross)

    def poison(self, labels: np.ndarray, reason: str) -> None:
        """Removing any of ``labels`` changes the function: ``reason`` says why."""
        lab = np.unique(labels[labels >= 0])
        if lab.size == 0:
            return
        rid = self._reason_ids.setdefault(reason, len(self.reasons))
        if rid == len(self.reasons):
            self.reasons.append(reason)
        self._poison.append((lab, rid))

    def tag(self, labels: np.ndarray, tag_ids: np.ndarray) -> None:
        """Label ``labels[i]`` sits at tag ``tag_ids[i]`` (a head of a batched product)."""
        labels, tag_ids = np.broadcast_arrays(labels, tag_ids)
        keep = labels >= 0
        if keep.any():
            self._tags.append((labels[keep].ravel(), tag_ids[keep].ravel()))

    def new_tags(self, count: int) -> np.ndarray:
        ids = np.arange(self.n_tags, self.n_tags + count, dtype=np.int64)
        self.n_tags += count
        return ids

    def event(self, kind: str, labels: np.ndarray) -> None:
        if kind not in EVENTS:
            raise KeyError(kind)
        lab = labels[labels >= 0]
        if lab.size:
            self._events[kind].append(np.unique(lab))

    def site(self, labels: np.ndarray, node_index: int) -> None:
        """Labels contracted (summed over) at graph node ``node_index``."""
        lab = labels[labels >= 0]
        if lab.size:
            self._sites.append((np.unique(lab), node_index))

    def lose(self, labels: np.ndarray, reason: str, node_index: int | None = None) -> None:
        """``labels`` go where the analysis cannot follow them (at graph node ``node_index``):
        poisoned with ``reason`` and marked ``lost``, so that they are reported (an inexact
        coupling, placed in graph order where they were lost) even when no contraction of theirs
        is seen."""
        self.poison(labels, reason)
        self.event("lost", labels)
        if node_index is not None:
            self.site(labels, node_index)

    def mark(self) -> tuple[int, int, int, int]:
        """A bookmark of the facts recorded so far (for :meth:`handled_since`)."""
        return len(self._poison), len(self._sites), len(self._events.get("lost", ())), len(self._edges)

    def handled_since(self, mark: tuple[int, int, int, int]) -> np.ndarray:
        """Labels poisoned, contracted, lost or joined by an edge since ``mark`` (repeats included)."""
        parts = [lab for lab, _ in self._poison[mark[0]:]] + [lab for lab, _ in self._sites[mark[1]:]]
        parts += list(self._events.get("lost", [])[mark[2]:])
        parts += [x for e in self._edges[mark[3]:] for x in e]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def poisoned_mask(self) -> np.ndarray:
        """True for every label with a poison reason."""
        return self.poison_array() >= 0

    # -- results ----------------------------------------------------------------------------
    def components(self, *, same_side: bool = False) -> tuple[int, np.ndarray]:
        """Connected components of the edges: ``(count, component id per label)``.

        With ``same_side``, only edges that do not cross a contraction: the components are the
        slices that sit on one side of a unit.
        """
        edges = [e for e, c in zip(self._edges, self._cross) if not (same_side and c)]
        if edges:
            a = np.concatenate([e[0] for e in edges])
            b = np.concatenate([e[1] for e in edges])
        else:
            a = b = np.zeros(0, dtype=np.int64)
        return connected_components(self.n, a, b)

    def poison_array(self) -> np.ndarray:
        """Reason id per label (-1 when not poisoned); the first reason recorded wins."""
        out = np.full(self.n, -1, dtype=np.int64)
        for lab, rid in reversed(self._poison):
            out[lab] = rid
        return out

    def event_mask(self, kind: str) -> np.ndarray:
        out = np.zeros(self.n, dtype=bool)
        for lab in self._events.get(kind, ()):
            out[lab] = True
        return out

    def tag_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._tags:
            z = np.zeros(0, dtype=np.int64)
            return z, z
        return (
            np.concatenate([t[0] for t in self._tags]),
            np.concatenate([t[1] for t in self._tags]),
        )

    def site_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._sites:
            z = np.zeros(0, dtype=np.int64)
            return z, z
        return (
            np.concatenate([s[0] for s in self._sites]),
            np.concatenate([np.full(s[0].size, s[1], dtype=np.int64) for s in self._sites]),
        )

    def pd_of_labels(self) -> np.ndarray:
        """(param, dim) id of every label."""
        out = np.empty(self.n, dtype=np.int64)
        for i, (s, k) in enumerate(zip(self.pd_start, self.pd_size)):
            out[s : s + k] = i
        return out


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> tuple[int, np.ndarray]:
    """Connected components of the undirected graph on ``n`` nodes with edges ``a[i] -- b[i]``.

    Returns ``(count, component id per node)``, ids numbered ``0..count-1`` in order of each
    component's smallest node. Vectorised union-find: every round hooks each edge's larger root
    under the smaller one and halves every path (pointer jumping), until no edge joins two roots.
    """
    parent = np.arange(n, dtype=np.int64)
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    while a.size:
        ra, rb = parent[a], parent[b]
        while True:  # roots of the endpoints (full pointer jumping)
            ra2, rb2 = parent[ra], parent[rb]
            if np.array_equal(ra2, ra) and np.array_equal(rb2, rb):
                break
            ra, rb = ra2, rb2
        live = ra != rb
        if not live.any():
            break
        lo, hi = np.minimum(ra[live], rb[live]), np.maximum(ra[live], rb[live])
        np.minimum.at(parent, hi, lo)
        a, b = a[live], b[live]
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    while True:
        nxt = parent[parent]
        if np.array_equal(nxt, parent):
            break
        parent = nxt
    roots, comp = np.unique(parent, return_inverse=True)
    return int(roots.size), comp.astype(np.int64)


def merge_aligned(space: LabelSpace, factors: list[np.ndarray], where: str) -> list[np.ndarray]:
    """Combine factors that meet elementwise at the same positions (all of one ndim).

    Factors whose varying dimensions overlap describe the same channels: their labels are joined
    by edges and they become one factor. A factor that is broadcast across a dimension along
    which another one varies is shared by several channels: it cannot be removed per channel,
    so its labels are poisoned.
    """
    if len(factors) <= 1:
        return list(factors)
    scalars = [f for f in factors if not varying(f)]
    factors = [f for f in factors if varying(f)]
    for f in scalars:  # one weight entry broadcast over everything: shared, not removable
        space.poison(f, f"a single weight entry broadcast over channels at {where}")
    groups: list[list[np.ndarray]] = []
    for f in factors:
        vf = set(varying(f))
        hit = [i for i, g in enumerate(groups) if any(vf & set(varying(h)) for h in g)]
        merged = [f]
        for i in hit:
            merged += groups[i]
        groups = [g for i, g in enumerate(groups) if i not in hit]
        groups.append(merged)
    out = []
    for g in groups:
        if len(g) == 1:
            out.append(g[0])
            continue
        dims = set().union(*(set(varying(f)) for f in g))
        res = None
        for f in g:
            if set(varying(f)) != dims and any(
                f.shape[d] == 1 for d in dims
            ):
                space.poison(f, f"broadcast across the channels of another weight at {where}")
                continue
            if res is None:
                res = f
                continue
            res, f2 = np.broadcast_arrays(res, f)
            space.edge(res, f2)
            res = np.where(res >= 0, res, f2)
        if res is not None:
            out.append(res)
    return out
