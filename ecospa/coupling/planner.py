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

**Head widths.** With ``head_widths="ragged"`` (the paper's reading) each coupling is ranked and
cut on its own, so the heads of one attention end with different widths; they run padded to the
widest (``ecospa.coupling.narrow``). With ``"uniform"`` the couplings of one width group (the
heads batched in one tensor: ``Coupling.group``) are ranked by their mean Eq. 6 score and cut
together: every head loses the same number of units, the ones its own Eq. 9 scores rank lowest
(the number is the mean over the heads of what theta would remove from each). Equal widths need
no padding: the fastest layout.

**Minimum width.** Each coupling keeps at least ``min_units`` units (default 1), rounded up to a
multiple of ``width_multiple``: whole heads and whole FFNs do not empty out by default. With
``min_units=0`` a coupling may be removed entirely.

Plans are data: a :class:`Plan` is a list of :class:`PlanStep` ``(step, {coupling name: [unit
indices]})``, indices numbered in the model as it was at that step (before that step's removal).
It round-trips through JSON and ``Plan.replay`` applies it to a fresh copy of the model.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from ecospa.coupling.scores import COUPLING_SCORES, UNIT_SCORES
from ecospa.errors import ConfigError, PlanError
from ecospa.graph.ir import Coupling, CouplingGraph

__all__ = ["PlanConfig", "PlanStep", "Plan", "plan_round", "resolve_target", "ParamCounter"]


def _int(x) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"expected an integer, got {x!r}")
    return int(x)


def _help(text: str, default=None):
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class PlanConfig:
    """Knobs of Algorithm 1, validated on construction."""

    target: int | float = _help(
        "target size: an int is a total parameter count; a float in (0, 1] the fraction of the "
        "prunable parameters (those inside exact couplings) to keep", 0.5)
    top_k: float = _help("fraction of couplings (lowest coupling score) pruned in each round", 0.3)
    theta: float = _help("kept cumulative unit-score mass in each selected coupling, in (0, 1)", 0.9)
    every: int | str = _help("act every N optimizer steps, or 'epoch' (on EcoSpa.end_epoch())", 100)
    start: int = _help("no pruning before this many steps", 0)
    min_units: int = _help("units every coupling keeps (0: a coupling may be emptied)", 1)
    width_multiple: int = _help("kept widths are multiples of this (e.g. 8 for fast kernels)", 1)
    coupling_score: str = _help("how couplings are ranked: 'fisher' (Eq. 6), 'magnitude', "
                                "'taylor', 'random'", "fisher")
    unit_score: str = _help("how units are ranked: 'eq9', 'magnitude', 'taylor', 'random'", "eq9")
    seed: int = _help("seed of the random scores", 0)
    head_widths: str = _help(
        "'ragged': every head's couplings lose units on their own (Eq. 9 per coupling; heads end "
        "up with different widths, run padded); 'uniform': the couplings of one width group (the "
        "heads of one attention) lose the same number of units each, chosen per head by the unit "
        "scores: equal head widths, the fastest layout", "ragged")

    def __post_init__(self) -> None:
        t = self.target
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise ConfigError(f"target should be an int (parameter count) or a float fraction, got {t!r}")
        if isinstance(t, float) and not (0.0 < t <= 1.0):
            raise ConfigError(f"target as a fraction should be in (0, 1], got {t!r} "
                              "(pass an int for a parameter count)")
        if isinstance(t, int) and t <= 0:
            raise ConfigError(f"target as a parameter count should be positive, got {t!r}")
        if not (0.0 < self.top_k <= 1.0):
            raise ConfigError(f"top_k should be in (0, 1], got {self.top_k!r}")
        if not (0.0 < self.theta < 1.0):
            raise ConfigError(f"theta should be in (0, 1), got {self.theta!r}")
        if self.every != "epoch" and (isinstance(self.every, bool) or not isinstance(self.every, int)
                                      or self.every < 1):
            raise ConfigError(f"every should be a positive int (steps) or 'epoch', got {self.every!r}")
        for name in ("start", "min_units", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} should be a non-negative int, got {v!r}")
        m = self.width_multiple
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"width_multiple should be a positive int, got {m!r}")
        if self.coupling_score not in COUPLING_SCORES:
            raise ConfigError(f"coupling_score should be one of {sorted(COUPLING_SCORES)}, "
                              f"got {self.coupling_score!r}")
        if self.head_widths not in ("ragged", "uniform"):
            raise ConfigError(f"head_widths should be 'ragged' or 'uniform', got {self.head_widths!r}")
        if self.unit_score not in UNIT_SCORES:
            raise ConfigError(f"unit_score should be one of {sorted(UNIT_SCORES)}, got {self.unit_score!r}")

    @property
    def min_keep(self) -> int:
        """Smallest kept width: ``min_units`` rounded up to a multiple of ``width_multiple``."""
        m = self.width_multiple
        return int(math.ceil(self.min_units / m) * m)

    @classmethod
    def help(cls) -> dict[str, str]:
        """``{field: help text}``."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


class ParamCounter:
    """Exact parameter count while units are removed (a slice along two dims counts once).

    Args:
        shapes: ``{param: shape}`` of *every* parameter of the model.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]]):
        self.shapes = {n: tuple(int(k) for k in s) for n, s in shapes.items()}
        self.removed: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.total = sum(self._numel(n) for n in self.shapes)

    def _numel(self, name: str) -> int:
        r = self.removed.get(name, {})
        return int(np.prod([k - r.get(d, 0) for d, k in enumerate(self.shapes[name])], dtype=np.int64))

    def remove(self, c: Coupling, units: Iterable[int]) -> int:
        """Account for removing ``units`` of ``c``; return the new total."""
        units = np.asarray(list(units), dtype=np.int64)
        for t in c.tables:
            k = int(np.isin(t.unit, units).sum())
            if k:
                before = self._numel(t.param)
                self.removed[t.param][t.dim] += k
                self.total += self._numel(t.param) - before
        return self.total

    def copy(self) -> "ParamCounter":
        """An independent copy."""
        out = ParamCounter.__new__(ParamCounter)
        out.shapes, out.total = self.shapes, self.total
        out.removed = defaultdict(lambda: defaultdict(int), {n: defaultdict(int, r) for n, r in self.removed.items()})
        return out


def resolve_target(config: PlanConfig, couplings: Iterable[Coupling], shapes: Mapping[str, Sequence[int]]) -> int:
    """The target as a total parameter count; checks that it is reachable.

    Args:
        couplings: the couplings that may be pruned (inexact ones are ignored).
        shapes: ``{param: shape}`` of every parameter of the model.

    Raises:
        ConfigError: the target is below the smallest size the couplings allow (the message
            gives that size, as a count and as a fraction of the prunable parameters).
    """
    exact = [c for c in couplings if c.exact]
    everything, floor = ParamCounter(shapes), ParamCounter(shapes)
    total = everything.total
    for c in exact:
        everything.remove(c, range(c.width))
        if c.width > config.min_keep:
            floor.remove(c, range(c.width - config.min_keep))
    prunable = total - everything.total
    if isinstance(config.target, float):
        target = int(round(total - (1.0 - config.target) * prunable))
    else:
        target = int(config.target)
    if target < floor.total:
        frac = (floor.total - (total - prunable)) / prunable if prunable else 1.0
        raise ConfigError(
            f"target {config.target!r} ({target} parameters) is unreachable: the model has {total} "
            f"parameters, {prunable} of them in {len(exact)} exact couplings, and with "
            f"min_units={config.min_units}, width_multiple={config.width_multiple} the smallest "
            f"reachable size is {floor.total} parameters (keeping {frac:.3f} of the prunable ones); "
            "ask for at least that, or lower min_units")
    return target


def _theta_count(v: np.ndarray, theta: float) -> int:
    """Units removed by ``while kept mass > theta: remove the smallest`` (``v`` sorted ascending)."""
    kept_before = v.sum() - np.concatenate([[0.0], np.cumsum(v)[:-1]])
    return int((kept_before > theta * v.sum()).sum())


def plan_round(couplings: Sequence[Coupling], shapes: Mapping[str, Sequence[int]], *,
               coupling_scores: Mapping[str, float],
               unit_scores: Callable[[Coupling], torch.Tensor | np.ndarray],
               config: PlanConfig, target_params: int) -> dict[str, list[int]]:
    """One round of Algorithm 1 (see the module docstring).

    Args:
        couplings: current couplings, indices numbered in the current model.
        shapes: ``{param: shape}`` of every parameter of the current model.
        coupling_scores: ``{name: score}``, smaller = pruned first (Eq. 6).
        unit_scores: ``coupling -> (width,)`` scores, smaller = removed first (Eq. 9); only
            called for the selected couplings.
        config: the knobs; target_params: the target total parameter count.

    Returns:
        ``{coupling name: sorted unit indices}``; empty when the target is met or nothing can go.
    """
    counter = ParamCounter(shapes)
    if counter.total <= target_params:
        return {}
    m, min_keep = config.width_multiple, config.min_keep
    blocks = _blocks(couplings, config.head_widths)
    eligible = [(i, b) for i, b in enumerate(blocks) if min(c.width for c in b) > min_keep]
    if not eligible:
        return {}
    missing = [c.name for _, b in eligible for c in b if c.name not in coupling_scores]
    if missing:
        raise PlanError(f"no coupling score for {missing[:3]} ({len(missing)} missing)")
    eligible.sort(key=lambda ib: (float(np.mean([coupling_scores[c.name] for c in ib[1]])), ib[0]))
    k = max(1, int(math.ceil(config.top_k * len(eligible))))
    candidates: list[tuple[list[Coupling], list[np.ndarray], list[int]]] = []
    for _, block in eligible[:k]:
        orders, counts = [], []
        for c in block:
            v = np.asarray(torch.as_tensor(unit_scores(c)).double().cpu(), dtype=np.float64)
            if v.shape != (c.width,):
                raise PlanError(f"unit scores of {c.name!r} have shape {v.shape}, expected ({c.width},)")
            order = np.lexsort((np.arange(c.width), v))
            orders.append(order)
            counts.append(_theta_count(v[order], config.theta))
        width = min(c.width for c in block)
        r = min(int(round(float(np.mean(counts)))) or 1, width - min_keep)
        kept = max(min_keep, ((width - r) // m) * m)
        r = width - kept
        if r <= 0:
            continue
        cuts = [s for s in range(1, r + 1) if (width - s) % m == 0]
        candidates.append((block, orders, cuts))

    def take(block, orders, s) -> dict[str, list[int]]:
        return {c.name: sorted(o[:s].tolist()) for c, o in zip(block, orders)}

    def remove(counter_, block, orders, s) -> int:
        total = counter_.total
        for c, o in zip(block, orders):
            total = counter_.remove(c, o[:s])
        return total

    full = counter.copy()
    for block, orders, cuts in candidates:
        remove(full, block, orders, cuts[-1])
    out: dict[str, list[int]] = {}
    if full.total > target_params:  # not the last round: take everything selected
        for block, orders, cuts in candidates:
            out.update(take(block, orders, cuts[-1]))
        return out
    for block, orders, cuts in candidates:
        trial = counter.copy()
        if remove(trial, block, orders, cuts[-1]) > target_params:
            counter = trial
            out.update(take(block, orders, cuts[-1]))
            continue
        lo, hi = 0, len(cuts) - 1  # smallest cut that reaches the target
        while lo < hi:
            mid = (lo + hi) // 2
            if remove(counter.copy(), block, orders, cuts[mid]) <= target_params:
                hi = mid
            else:
                lo = mid + 1
        out.update(take(block, orders, cuts[lo]))
        break
    return out


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


@dataclass(frozen=True)
class PlanStep:
    """Units removed at one optimizer step: ``{coupling name: unit indices}``, numbered in the
    model as it was just before this removal. ``widths`` (optional) are the widths those
    couplings had then: ``ecospa.prune`` checks them, so that a plan is only applied to the model
    state it was made on."""

    step: int
    removals: dict[str, tuple[int, ...]]
    params_before: int | None = None
    params_after: int | None = None
    widths: dict[str, int] | None = None


@dataclass(frozen=True)
class Plan:
    """Every removal so far, in order; JSON-serialisable and replayable on a fresh model."""

    steps: tuple[PlanStep, ...] = ()

    def __len__(self) -> int:
        return len(self.steps)

    def to_dict(self) -> dict:
        """Plain data: ``{"version": 2, "steps": [{"step", "removals", "widths", ...}]}``."""
        return {"version": 2, "steps": [
            {**asdict(s), "removals": {k: list(v) for k, v in s.removals.items()}} for s in self.steps]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Plan":
        """Inverse of :meth:`to_dict` (also reads version 1, which has no widths).

        Raises:
            PlanError: not a plan, an unknown version, or a malformed step (the message says
                which step and what is wrong).
        """
        if not isinstance(data, Mapping):
            raise PlanError(f"a plan is a JSON object, got {type(data).__name__}")
        if data.get("version") not in (1, 2):
            raise PlanError(f"unknown plan version {data.get('version')!r} (expected 1 or 2)")
        steps = []
        for i, s in enumerate(data.get("steps", ())):
            try:
                removals = {str(k): tuple(_int(x) for x in v) for k, v in s["removals"].items()}
                widths = s.get("widths")
                widths = {str(k): _int(v) for k, v in widths.items()} if widths is not None else None
                steps.append(PlanStep(_int(s["step"]), removals, s.get("params_before"),
                                      s.get("params_after"), widths))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise PlanError(f"malformed plan step {i}: {type(e).__name__}: {e}") from None
        return cls(tuple(steps))

    def to_json(self, **kwargs) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def replay(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
               example_inputs=None, couplings: CouplingGraph | None = None) -> nn.Module:
        """Apply every step to ``model`` (a fresh copy of the dense model) in place; return it.

        ``couplings`` defaults to ``ecospa.auto_couple(model, example_inputs)``. Same as
        ``ecospa.prune(model, plan, optimizer, couplings=couplings)``.
        """
        from ecospa.coupling.discovery import auto_couple
        from ecospa.coupling.executor import prune

        cg = couplings if couplings is not None else auto_couple(model, example_inputs)
        return prune(model, self, optimizer, couplings=cg)

    def removed_original(self, widths: Mapping[str, int]) -> dict[str, list[int]]:
        """Every removed unit in the numbering of the dense model, given its widths ``{name: width}``."""
        alive = {n: list(range(w)) for n, w in widths.items()}
        out: dict[str, list[int]] = defaultdict(list)
        for s in self.steps:
            for name, idx in s.removals.items():
                if name not in alive:
                    raise PlanError(f"plan names coupling {name!r}, not among the given widths")
                gone = set(idx)
                out[name] += [alive[name][i] for i in idx]
                alive[name] = [a for i, a in enumerate(alive[name]) if i not in gone]
        return {n: sorted(v) for n, v in out.items()}
