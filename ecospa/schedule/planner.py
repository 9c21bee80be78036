"""Algorithm 1 of EcoSpa: which units to remove, round after round, until the target size.

One round (``plan_round``), when the model has more parameters than the target:

1. rank the couplings that can still lose a unit by their coupling score (Eq. 6), ascending;
2. take the ``top_k`` fraction of them (at least one);
3. in each, sort the units by their unit score ``v`` (Eq. 9, normalised to sum 1), ascending, and
   remove the smallest **while the kept mass is still above theta**. This is the paper's literal
   loop ``while sum(v kept) > theta: remove the smallest v``: the unit that takes the kept mass
   to ``<= theta`` is removed too, so every selected coupling loses at least one unit per round
   and the schedule always makes progress (the stricter reading "remove only while the mass
   stays >= theta" removes nothing from couplings whose smallest unit holds more than
   ``1 - theta``, and can stall);
4. round each kept width *down* to a multiple of ``width_multiple`` (never below the minimum);
5. **last round**: if removing everything selected would go below the target, remove only the
   shortest prefix (couplings in ascending score, units in ascending ``v``, in blocks that keep
   widths valid) that reaches it. The final size is then ``<= target`` and undershoots it by
   less than one block: one unit's parameters (``width_multiple`` units' with a multiple). The
   schedule stops when the size is ``<= target``; a round that cannot reach the target takes
   everything it selected.

**Scheduled rounds** (``EcoSpa(..., end=...)``): the round's target is the size the cubic
gradual-pruning schedule asks for at that step (:func:`schedule_target`), and steps 1-4 run
again on the same scores, each time on the units the earlier passes kept, until the selection
reaches it (``plan_round(..., passes=None)``); step 5 then takes the shortest prefix. A round
that asks for less than one pass selects removes only that prefix.

**Head widths.** With ``head_widths="ragged"`` (the paper's reading) each coupling is ranked and
cut on its own, so the heads of one attention end with different widths; they run padded to the
widest (``ecospa.narrow``). With ``"uniform"`` the couplings of one width group (the
heads batched in one tensor: ``Coupling.group``) are ranked by their mean Eq. 6 score and cut
together: every head loses the same number of units, the ones its own Eq. 9 scores rank lowest
(the number is the mean over the heads of what theta would remove from each). Equal widths need
no padding: the fastest layout.

**Exportable plans** (``exportable=True``, :mod:`ecospa.schedule.exportable`): the rounds run
on a view of the couplings where the heads of one attention are one coupling whose units are
whole heads, and the repeated blocks (the same coupling in every layer) are cut in lockstep, as
``"uniform"`` cuts a width group; couplings the config cannot shrink keep every unit. Every
layer then keeps the same heads count and FFN width: ``ecospa.export`` needs no padding. Head
counts are not rounded to ``width_multiple``; ``min_units`` is the heads each attention keeps.

**Minimum width.** Each coupling keeps at least ``min_units`` units (default 1), rounded up to a
multiple of ``width_multiple``: whole heads and whole FFNs do not empty out by default. With
``min_units=0`` a coupling may be removed entirely. The minimum is a rule of the *planner* (and so
of ``EcoSpa``): a target below it is refused up front (:func:`resolve_target`). ``ecospa.prune``
removes whatever a removal names, every unit of a coupling included (the result is still the
dense model with those slices zeroed), so a plan made by hand or with ``min_units=0`` replays.

**theta = 1** keeps the whole mass: the literal loop removes nothing, and the progress rule (at
least one unit per selected coupling) makes it the slowest schedule, one unit per selected
coupling per round (the limit of theta -> 1).

The knobs are :class:`~ecospa.schedule.config.PlanConfig`; what the rounds removed is a
:class:`~ecospa.ir.plan.Plan` (data: JSON, replayable), both re-exported here.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ecospa.schedule.budget import ParamCounter, resolve_target
from ecospa.schedule.config import PlanConfig
from ecospa.schedule.exportable import HEADS, ExportRules, ExportView, exportable_rules, view
from ecospa.ir.plan import Plan, PlanStep
from ecospa.errors import PlanError
from ecospa.ir.coupling import Coupling

# PlanConfig (ecospa.schedule.config) and Plan, PlanStep (ecospa.ir.plan) are re-exported:
# ``from ecospa.schedule.planner import Plan, PlanConfig`` keeps working.
__all__ = ["PlanConfig", "PlanStep", "Plan", "plan_round", "resolve_target", "schedule_target",
           "ParamCounter"]


def _theta_count(v: np.ndarray, theta: float) -> int:
    """Units removed by ``while kept mass > theta: remove the smallest`` (``v`` sorted ascending);
    0 for theta = 1 (the caller removes at least one unit)."""
    kept_before = v.sum() - np.concatenate([[0.0], np.cumsum(v)[:-1]])
    return int((kept_before > theta * v.sum()).sum())


def schedule_target(step: int, *, start: int, end: int, dense_params: int, target_params: int) -> int:
    """The size the cubic gradual-pruning schedule asks for after ``step`` optimizer steps.

    ``size(t) = target + (dense - target) * (1 - (t - start) / (end - start))^3`` for ``start <=
    t <= end`` (Zhu & Gupta's schedule, in parameters): ``dense`` at ``start``, ``target`` from
    ``end`` on. Its slope is steepest at the start: the early rounds remove the most, so most
    of the steps run on a small model.
    """
    if step <= start:
        return int(dense_params)
    if step >= end:
        return int(target_params)
    frac = 1.0 - (step - start) / (end - start)
    return int(math.ceil(target_params + (dense_params - target_params) * frac ** 3))


def plan_round(couplings: Sequence[Coupling], shapes: Mapping[str, Sequence[int]], *,
               coupling_scores: Mapping[str, float],
               unit_scores: Callable[[Coupling], torch.Tensor | np.ndarray],
               config: PlanConfig, target_params: int, passes: int | None = 1,
               rules: ExportRules | None = None) -> dict[str, list[int]]:
    """One round of Algorithm 1 (see the module docstring).

    Args:
        couplings: current couplings, indices numbered in the current model.
        shapes: ``{param: shape}`` of every parameter of the current model.
        coupling_scores: ``{name: score}``, smaller = pruned first (Eq. 6).
        unit_scores: ``coupling -> (width,)`` scores, smaller = removed first (Eq. 9); only
            called for the selected couplings (once each).
        config: the knobs; target_params: the target total parameter count (of this round:
            with a schedule, the size the schedule asks for now).
        passes: how many times steps 1-4 may run on the same scores, each on the units the
            earlier passes kept, while the selection does not reach ``target_params`` (1: the
            paper's round; None: until it is reached, as a scheduled round does). The last pass
            takes the shortest prefix that reaches the target (step 5).
        rules: with ``config.exportable``, what may shrink (:func:`ecospa.schedule.exportable.
            exportable_rules` of the dense couplings and the model: the config fields); default:
            the rules the couplings alone give (whole heads, lockstep blocks, nothing frozen).

    Returns:
        ``{coupling name: sorted unit indices}``; empty when the target is met or nothing can go.
    """
    counter = ParamCounter(shapes)
    if counter.total <= target_params:
        return {}
    ev = None
    if config.exportable:  # whole heads, lockstep blocks, only what the config can state
        ev = view(couplings, rules if rules is not None else exportable_rules(couplings))
        blocks = ev.blocks
        coupling_scores, unit_scores = _merged_scores(ev, coupling_scores, unit_scores)
    else:
        blocks = _blocks(couplings, config.head_widths)

    def multiple(block) -> int:  # head counts are not rounded to width_multiple
        return 1 if block[0].kind == HEADS else config.width_multiple

    def least(block) -> int:
        return config.min_units if block[0].kind == HEADS else config.min_keep
    scores: dict[str, np.ndarray] = {}
    gone: dict[str, np.ndarray] = {}  # name -> bool (width,): removed by an earlier pass
    out: dict[str, set[int]] = {}

    def left(c: Coupling) -> int:
        return c.width - int(gone[c.name].sum()) if c.name in gone else c.width

    def values(c: Coupling) -> np.ndarray:
        if c.name not in scores:
            v = np.asarray(torch.as_tensor(unit_scores(c)).double().cpu(), dtype=np.float64)
            if v.shape != (c.width,):
                raise PlanError(f"unit scores of {c.name!r} have shape {v.shape}, expected ({c.width},)")
            scores[c.name] = v
        return scores[c.name]

    def take(block, orders, s) -> None:
        for c, o in zip(block, orders):
            out.setdefault(c.name, set()).update(int(u) for u in o[:s])
            gone.setdefault(c.name, np.zeros(c.width, dtype=bool))[o[:s]] = True

    def remove(counter_, block, orders, s) -> int:
        total = counter_.total
        for c, o in zip(block, orders):
            total = counter_.remove(c, o[:s])
        return total

    done = 0
    while passes is None or done < passes:
        done += 1
        eligible = [(i, b) for i, b in enumerate(blocks) if min(left(c) for c in b) > least(b)]
        if not eligible:
            break
        missing = [c.name for _, b in eligible for c in b if c.name not in coupling_scores]
        if missing:
            raise PlanError(f"no coupling score for {missing[:3]} ({len(missing)} missing)")
        eligible.sort(key=lambda ib: (float(np.mean([coupling_scores[c.name] for c in ib[1]])), ib[0]))
        k = max(1, int(math.ceil(config.top_k * len(eligible))))
        candidates: list[tuple[list[Coupling], list[np.ndarray], list[int]]] = []
        for _, block in eligible[:k]:
            orders, counts = [], []
            for c in block:
                v = values(c)
                kept = np.nonzero(~gone[c.name])[0] if c.name in gone else np.arange(c.width)
                order = kept[np.lexsort((kept, v[kept]))]
                orders.append(order)
                counts.append(_theta_count(v[order], config.theta))
            width = min(left(c) for c in block)
            m, min_keep = multiple(block), least(block)
            r = min(int(round(float(np.mean(counts)))) or 1, width - min_keep)
            kept_width = max(min_keep, ((width - r) // m) * m)
            r = width - kept_width
            if r <= 0:
                continue
            cuts = [s for s in range(1, r + 1) if (width - s) % m == 0]
            candidates.append((block, orders, cuts))
        if not candidates:
            break
        full = counter.copy()
        for block, orders, cuts in candidates:
            remove(full, block, orders, cuts[-1])
        if full.total > target_params:  # not the last pass: take everything selected
            for block, orders, cuts in candidates:
                take(block, orders, cuts[-1])
            counter = full
            continue
        for block, orders, cuts in candidates:
            trial = counter.copy()
            if remove(trial, block, orders, cuts[-1]) > target_params:
                counter = trial
                take(block, orders, cuts[-1])
                continue
            lo, hi = 0, len(cuts) - 1  # smallest cut that reaches the target
            while lo < hi:
                mid = (lo + hi) // 2
                if remove(counter.copy(), block, orders, cuts[mid]) <= target_params:
                    hi = mid
                else:
                    lo = mid + 1
            take(block, orders, cuts[lo])
            break
        break
    if ev is not None:
        return ev.expand({n: sorted(u) for n, u in out.items()})
    return {n: sorted(u) for n, u in out.items()}


def _merged_scores(ev: ExportView, coupling_scores: Mapping[str, float], unit_scores):
    """Scores of an exportable view: a merged head coupling ranks by the mean Eq. 6 score of its
    couplings, and its units (whole heads) by the sum of their couplings' Eq. 6 scores (Eq. 9 is
    normalised per coupling, so it cannot compare heads); other couplings keep their scores."""
    scores = dict(coupling_scores)
    for c in ev.couplings:
        names = [m.name for head in ev.members.get(c.name, ()) for m in head]
        if names and all(n in coupling_scores for n in names):
            scores[c.name] = float(np.mean([coupling_scores[n] for n in names]))

    def units(c: Coupling):
        if c.kind == HEADS:
            return ev.merge_values(c, lambda m: coupling_scores[m.name])
        return unit_scores(c)

    return scores, units


def _blocks(couplings: Sequence[Coupling], head_widths: str) -> list[list[Coupling]]:
    """What is removed together: each exact coupling alone (``"ragged"``), or every coupling of
    a width group, the same number of units from each (``"uniform"``), in graph order."""
    exact = [c for c in couplings if c.exact]
    if head_widths == "ragged":
        return [[c] for c in exact]
    groups: dict[str, list[Coupling]] = {}
    for c in exact:
        groups.setdefault(c.group or c.name, []).append(c)
    return list(groups.values())
