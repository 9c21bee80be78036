"""How many units each coupling loses in a compress round, and which (``ecospa.compress``).

Every allocator gets per-unit *values* (the estimated cost of removing the unit: smaller goes
first), the units still alive, and a parameter goal; it returns ``{coupling name: unit indices}``
in the numbering of the couplings it was given (the dense ones: compress masks units and prunes
physically only at the end). Within a coupling units always go in ascending value.

With an exportable view (``CompressConfig(exportable=True)``, :mod:`ecospa.schedule.exportable`)
the allocators run on merged head couplings (a unit is a whole head, its value the sum of its
units' values) and on blocks of repeated couplings cut in lockstep; the removal is expanded
back to the couplings' units.

A *step* removes ``multiple`` units from a coupling (the first step of a coupling whose width is
not a multiple removes what it takes to get there), never leaving fewer than ``min_keep``. With
``uniform_groups`` the couplings of one width group (``Coupling.group``: the heads of one
attention) form a block whose steps take the same number of units from each of them, so the
heads keep equal widths.

- :func:`allocate_global`: all steps of the model ranked by value per parameter (a step's value
  is the sum of its units' values over their parameter count), cheapest first, until the goal.
  Values ascend inside a block, so this is a greedy over a heap of each block's next step.
- :func:`allocate_uniform`: every coupling loses (about) the same fraction of its alive units.
- :func:`allocate_planner`: EcoSpa's Algorithm 1 (``plan_round``) repeated until the goal.

The count is exact (``ParamCounter``): the result is at or below the goal, by less than one step.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ecospa.schedule.exportable import HEADS, ExportRules, ExportView
from ecospa.schedule.planner import ParamCounter, PlanConfig, plan_round
from ecospa.ir.coupling import Coupling

__all__ = ["Allocation", "allocate_global", "allocate_uniform", "allocate_planner", "merged_values",
           "merged_alive"]


@dataclass
class Allocation:
    """The state an allocator works on.

    Attributes:
        couplings: the (dense) couplings; shapes: ``{param: shape}`` of every parameter.
        alive: ``{name: (width,) bool}``, units not removed yet.
        values: ``{name: (width,) float}``, cost of removing each unit (smaller goes first).
        min_keep: units each coupling keeps; multiple: kept widths are multiples of it.
        uniform_groups: block the couplings of a width group together.
        lockstep: the blocks, given (an exportable view's: repeated blocks cut together); then
            ``uniform_groups`` is not used.
        min_heads: heads a merged head coupling (kind ``"heads"``) keeps.
    """

    couplings: Sequence[Coupling]
    shapes: Mapping[str, tuple[int, ...]]
    alive: Mapping[str, np.ndarray]
    values: Mapping[str, np.ndarray]
    min_keep: int = 1
    multiple: int = 1
    uniform_groups: bool = False
    lockstep: Sequence[Sequence[Coupling]] | None = None
    min_heads: int = 1
    blocks: list[list[Coupling]] = field(init=False)
    order: dict[str, np.ndarray] = field(init=False)  # alive units, ascending value
    cost: dict[str, np.ndarray] = field(init=False)  # parameters per unit

    def __post_init__(self) -> None:
        self.order, self.cost = {}, {}
        for c in self.couplings:
            v = np.asarray(self.values[c.name], dtype=np.float64)
            if v.shape != (c.width,):
                raise ValueError(f"values of {c.name!r} have shape {v.shape}, expected ({c.width},)")
            v = np.where(np.isfinite(v), v, np.inf)
            idx = np.nonzero(self.alive[c.name])[0]
            self.order[c.name] = idx[np.lexsort((idx, v[idx]))]
            self.cost[c.name] = c.unit_numel(self.shapes).astype(np.float64)
        groups: dict[str, list[Coupling]] = {}
        self.blocks = []
        if self.lockstep is not None:  # an exportable view's blocks (ecospa.schedule.exportable)
            self.blocks = [list(b) for b in self.lockstep]
            return
        for c in self.couplings:
            if self.uniform_groups and getattr(c, "group", ""):
                if c.group not in groups:
                    groups[c.group] = []
                    self.blocks.append(groups[c.group])
                groups[c.group].append(c)
            else:
                self.blocks.append([c])

    def cuts(self, block: Sequence[Coupling]) -> list[int]:
        """Allowed numbers of units to remove from each coupling of ``block``, ascending."""
        widths = [len(self.order[c.name]) for c in block]
        heads = block[0].kind == HEADS  # whole heads: counted in heads, never rounded to a multiple
        top = min(w - (self.min_heads if heads else self.min_keep) for w in widths)
        m = 1 if heads else self.multiple
        return [s for s in range(1, top + 1) if all((w - s) % m == 0 for w in widths)]

    def counter(self, extra: Mapping[str, Sequence[int]] = {}) -> ParamCounter:
        """Exact count with the removed units and ``extra`` gone."""
        pc = ParamCounter(self.shapes)
        for c in self.couplings:
            gone = np.nonzero(~self.alive[c.name])[0]
            more = np.asarray(extra.get(c.name, ()), dtype=np.int64)
            units = np.union1d(gone, more)
            if units.size:
                pc.remove(c, units)
        return pc

    def take(self, block: Sequence[Coupling], lo: int, hi: int) -> dict[str, np.ndarray]:
        """Units ``lo:hi`` (in value order) of each coupling of ``block``."""
        return {c.name: self.order[c.name][lo:hi] for c in block}

    def step_value(self, block: Sequence[Coupling], lo: int, hi: int) -> tuple[float, float]:
        """(value per parameter, parameters) of removing units ``lo:hi`` of each coupling."""
        val = cost = 0.0
        for c in block:
            u = self.order[c.name][lo:hi]
            val += float(np.asarray(self.values[c.name], dtype=np.float64)[u].sum())
            cost += float(self.cost[c.name][u].sum())
        return (val / cost if cost > 0 else np.inf), cost


def _merge(out: dict[str, list[int]], part: Mapping[str, np.ndarray]) -> None:
    for n, u in part.items():
        out.setdefault(n, []).extend(int(i) for i in u)


def _finish(a: Allocation, out: dict[str, list[int]], goal: int, pending) -> dict[str, list[int]]:
    """Keep taking steps from ``pending`` (an iterator of (block, lo, hi)) until the exact count
    is at or below ``goal`` (overlapping slices make the estimate optimistic)."""
    total = a.counter(out).total
    for block, lo, hi in pending:
        if total <= goal:
            break
        _merge(out, a.take(block, lo, hi))
        total = a.counter(out).total
    return out


def allocate_global(a: Allocation, goal: int) -> dict[str, list[int]]:
    """Steps ranked by value per parameter over the whole model until ``goal`` parameters."""
    need = a.counter().total - goal
    heap: list[tuple[float, int, int, int]] = []
    cuts = [a.cuts(b) for b in a.blocks]

    def push(bi: int, k: int) -> None:
        if k < len(cuts[bi]):
            lo = cuts[bi][k - 1] if k > 0 else 0
            v, _ = a.step_value(a.blocks[bi], lo, cuts[bi][k])
            heapq.heappush(heap, (v, bi, k, lo))

    for bi in range(len(a.blocks)):
        push(bi, 0)
    out: dict[str, list[int]] = {}
    done = 0.0

    skipped: list[tuple[float, int, int, int]] = []

    def steps():
        while heap:
            v, bi, k, lo = heapq.heappop(heap)
            if a.lockstep is not None and heap:
                # lockstep steps are coarse (a head in every layer): one that would go past the
                # goal waits while smaller steps of other blocks are left to reach it
                cost = a.step_value(a.blocks[bi], lo, cuts[bi][k])[1]
                smaller = min(a.step_value(a.blocks[b], l, cuts[b][kk])[1] for _, b, kk, l in heap) < cost
                if done + cost > need and smaller and not skipped_block(bi):
                    skipped.append((v, bi, k, lo))
                    continue
            push(bi, k + 1)
            yield a.blocks[bi], lo, cuts[bi][k]
        while skipped:  # nothing smaller reached the goal: the waiting steps, best first
            v, bi, k, lo = min(skipped)
            skipped.remove((v, bi, k, lo))
            yield a.blocks[bi], lo, cuts[bi][k]

    def skipped_block(bi: int) -> bool:
        return any(b == bi for _, b, _, _ in skipped)

    it = steps()
    if need <= 0:
        return out
    for block, lo, hi in it:
        _merge(out, a.take(block, lo, hi))
        done += a.step_value(block, lo, hi)[1]
        if done >= need:
            break
    return _finish(a, out, goal, it)


def allocate_uniform(a: Allocation, goal: int) -> dict[str, list[int]]:
    """The same fraction of every block's alive units (cut points rounded down), then single
    steps by value per parameter for the remainder."""
    cuts = [a.cuts(b) for b in a.blocks]

    def plan(f: float) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for b, cs in zip(a.blocks, cuts):
            width = min(len(a.order[c.name]) for c in b)
            ok = [s for s in cs if s <= f * width]
            if ok:
                _merge(out, a.take(b, 0, ok[-1]))
        return out

    if a.counter().total <= goal:
        return {}
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if a.counter(plan(mid)).total > goal:
            lo = mid
        else:
            hi = mid
    out = plan(lo)
    # the remainder: next steps of every block, cheapest per parameter first
    pending = []
    for bi, (b, cs) in enumerate(zip(a.blocks, cuts)):
        taken = len(out.get(b[0].name, ()))
        nxt = [s for s in cs if s > taken]
        if nxt:
            pending.append((a.step_value(b, taken, nxt[0])[0], bi, taken, nxt[0]))
    pending.sort()
    return _finish(a, out, goal, ((a.blocks[bi], l, h) for _, bi, l, h in pending))


def allocate_planner(a: Allocation, goal: int, importance, config: PlanConfig, cg, salt: int = 0,
                     rules: ExportRules | None = None) -> dict[str, list[int]]:
    """Algorithm 1 (``plan_round``) repeated until ``goal``: Eq. 6 (``config.coupling_score``,
    from ``importance``) ranks the couplings, ``a.values`` ranks the units inside them."""
    from ecospa.pruning.apply import remaining

    scores = importance.coupling_scores(config.coupling_score, salt=salt)
    dead = {c.name: np.nonzero(~a.alive[c.name])[0].tolist() for c in a.couplings}
    cur = remaining(cg, {n: u for n, u in dead.items() if u})
    idx = {c.name: np.nonzero(a.alive[c.name])[0] for c in a.couplings}
    values = {n: np.asarray(v, dtype=np.float64) for n, v in a.values.items()}
    names = {c.name for c in a.couplings}
    out: dict[str, list[int]] = {}
    while True:
        live = [c for c in cur if c.name in names]
        shapes = dict(cur.shapes)
        step = plan_round(live, shapes, coupling_scores=scores,
                          unit_scores=lambda c: values[c.name][idx[c.name]], config=config, target_params=goal,
                          rules=rules)
        if not step:
            break
        for n, u in step.items():
            dense = idx[n][np.asarray(u, dtype=np.int64)]
            out.setdefault(n, []).extend(int(i) for i in dense)
            idx[n] = np.delete(idx[n], np.asarray(u, dtype=np.int64))
        cur = remaining(cur, step)
        if a.counter(out).total <= goal:
            break
    return out


def merged_values(ev: ExportView, values: Mapping[str, np.ndarray],
                  alive: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Unit values of an exportable view: a whole head costs the sum of its alive units' values
    (over all its couplings), other couplings keep theirs."""
    out = {c.name: values[c.name] for c in ev.couplings if c.name not in ev.members}
    for name, heads in ev.members.items():
        out[name] = np.asarray([sum(float(np.asarray(values[m.name], dtype=np.float64)[alive[m.name]].sum())
                                    for m in head) for head in heads], dtype=np.float64)
    return out


def merged_alive(ev: ExportView, alive: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Alive masks of an exportable view (every head of a view is alive: it has alive units)."""
    out = {c.name: alive[c.name] for c in ev.couplings if c.name not in ev.members}
    out.update({name: np.ones(len(heads), dtype=bool) for name, heads in ev.members.items()})
    return out
