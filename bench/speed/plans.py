"""Removal plans (half of every coupling, uniform or ragged) and the masked dense reference.

- :func:`uniform_plan`: every coupling loses the half of its units with the smallest indices, so
  every head keeps the same units (the same kept count in every head).
- :func:`ragged_plan`: every coupling loses a random fraction in [0.25, 0.75] of its units
  (random indices). Couplings of the same scope-free kind and width are paired at random and a
  pair's fractions add up to one, so exactly half of all units (and of all coupled weights) goes.
- :func:`masked_copy`: the dense model with every removed unit's slices zeroed; a pruned model
  must compute what it computes.
"""
from __future__ import annotations

import copy
import random
from collections import defaultdict

import torch
import torch.nn as nn

Plan = dict  # {coupling name: [removed unit indices]}


def uniform_plan(cg) -> Plan:
    return {c.name: list(range(c.width // 2)) for c in cg}


def ragged_plan(cg, seed: int = 0) -> Plan:
    rng = random.Random(seed)
    groups: dict[tuple[str, int], list] = defaultdict(list)
    for c in cg:
        groups[(c.kind, c.width)].append(c)
    plan: Plan = {}
    for (_, width), cs in groups.items():
        cs = list(cs)
        rng.shuffle(cs)
        lo = -(-width // 4)  # ceil(w / 4) .. w - ceil(w / 4) units removed
        for a, b in zip(cs[0::2], cs[1::2]):
            k = rng.randint(lo, width - lo)
            plan[a.name] = sorted(rng.sample(range(width), k))
            plan[b.name] = sorted(rng.sample(range(width), width - k))
        if len(cs) % 2:  # an odd one out loses exactly half
            plan[cs[-1].name] = sorted(rng.sample(range(width), width // 2))
    return plan


def kept_fraction(cg, plan: Plan) -> dict[str, float]:
    """Per coupling name, the fraction of its units the plan keeps."""
    return {c.name: 1 - len(plan.get(c.name, ())) / c.width for c in cg}


def masked_copy(model: nn.Module, cg, plan: Plan) -> nn.Module:
    """``model`` (dense) with the slices of every removed unit set to zero."""
    masked = copy.deepcopy(model)
    params = dict(masked.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for c in cg:
            units = c.units()
            for j in plan.get(c.name, ()):
                for s in units[j]:
                    params[s.param].select(s.dim, s.index).zero_()
    return masked


def plan_summary(cg, plan: Plan) -> dict:
    """Removed units and the range of per-coupling removed fractions."""
    total = sum(c.width for c in cg)
    removed = sum(len(v) for v in plan.values())
    fr = [len(plan.get(c.name, ())) / c.width for c in cg]
    return dict(removed_units=removed, coupled_units=total, removed_fraction=removed / total,
                per_coupling_removed_min_max=[min(fr), max(fr)])
