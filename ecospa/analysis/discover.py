"""``discover``: find every coupling of a (dense) model from its dataflow graph.

No layer maps and no name matching: the captured graph is analysed op by op (see
``ecospa.analysis.flow``), so a renamed or never-seen module gives the same couplings. The public
``ecospa.auto_couple`` (``ecospa.analysis.auto_couple``) calls this on the dense view of a model,
so that it works on pruned models too.
"""
from __future__ import annotations

import torch.nn as nn

from ecospa.errors import CaptureError
from ecospa.analysis.blocks import consistent, find_stacks, replicate, thinned
from ecospa.capture.export import capture
from ecospa.analysis.flow import propagate
from ecospa.ir.coupling import Coupling, CouplingGraph
from ecospa.analysis.sites import assign_sites
from ecospa.analysis.scopes import common_prefix, scopes_and_groups
from ecospa.analysis.units import group_units

__all__ = ["discover", "name_couplings"]


def name_couplings(raws) -> list[str]:
    """Stable readable names: ``<common module path>.<kind>[.head<i> | .<i>]``."""
    bases = []
    for raw in raws:
        owners = [t.param.rsplit(".", 1)[0] if "." in t.param else "" for t in raw.tables]
        prefix = common_prefix(owners + list(raw.site_modules))
        bases.append(f"{prefix}.{raw.kind}" if prefix else raw.kind)
    counts: dict[str, int] = {}
    for b in bases:
        counts[b] = counts.get(b, 0) + 1
    seen: dict[str, int] = {}
    names = []
    for raw, b in zip(raws, bases):
        if counts[b] == 1:
            names.append(b)
            continue
        i = seen.get(b, 0)
        seen[b] = i + 1
        names.append(f"{b}.head{i}" if raw.kind in ("qk", "vo") else f"{b}.{i}")
    return names


def _group_names(raws, scopes: list[str], groups: list[int]) -> list[str]:
    """``<scope>.<kind of its first coupling>`` per width group, numbered where two collide."""
    first: dict[int, int] = {}
    for i, g in enumerate(groups):
        first.setdefault(g, i)
    base = {g: (f"{scopes[i]}.{raws[i].kind}" if scopes[i] else raws[i].kind) for g, i in first.items()}
    taken: dict[str, list[int]] = {}
    for g in sorted(first, key=first.get):
        taken.setdefault(base[g], []).append(g)
    name = {}
    for b, gs in taken.items():
        for k, g in enumerate(gs):
            name[g] = b if len(gs) == 1 else f"{b}.{k}"
    return [name[g] for g in groups]


def discover(model: nn.Module, example_inputs=None, *, include_inexact: bool = False,
             reuse_blocks: bool = True) -> CouplingGraph:
    """Find every coupling of ``model`` as it is (its graph is captured as it runs now).

    Args:
        model: any ``torch.nn.Module`` (left unchanged; it is run once, in eval mode, to capture
            its graph, and put back in its previous mode).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs that
            run the forward. Optional for Hugging Face models (their ``dummy_inputs`` are used).
        include_inexact: also offer inexact couplings when iterating (they are always listed in
            ``cg.inexact`` with the reason).
        reuse_blocks: analyse a stack of identical blocks through three of them and copy the
            result to the others (``ecospa.analysis.blocks``); the full model is analysed when the
            thinned one cannot be captured or its first two blocks disagree.

    Returns:
        A :class:`CouplingGraph`; iterate it for the exact couplings, in graph order.

    Raises:
        CaptureError: the forward could not be captured (the message names the module at fault).
    """
    stacks = find_stacks(model) if reuse_blocks else []
    if stacks:
        try:
            with thinned(model, stacks):
                couplings, cap = _analyse(model, example_inputs)
        except CaptureError:
            couplings = None  # the thinned model does not run: analyse the full one
        if couplings is not None and consistent(couplings, stacks):
            shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
            return CouplingGraph(replicate(couplings, stacks), shapes=shapes,
                                 include_inexact=include_inexact, inputs=cap.inputs)
    couplings, cap = _analyse(model, example_inputs)
    return CouplingGraph(couplings, shapes=cap.shapes, include_inexact=include_inexact, inputs=cap.inputs)


def _analyse(model: nn.Module, example_inputs) -> tuple[list[Coupling], object]:
    """Capture, channel flow, units, sites, names: the couplings of ``model`` as it is."""
    cap = capture(model, example_inputs)
    flow = propagate(cap)
    raws, comp, gid_of = group_units(flow)
    planned = assign_sites(flow, model, raws, comp, gid_of)
    names = name_couplings(raws)
    owners = [{t.param.rsplit(".", 1)[0] if "." in t.param else "" for t in raw.tables} for raw in raws]
    scopes, groups = scopes_and_groups(flow, len(raws), comp, gid_of, owners)
    group_names = _group_names(raws, scopes, groups)
    couplings = []
    for i, (raw, name, (sites, problem)) in enumerate(zip(raws, names, planned)):
        reason = raw.reason or problem
        couplings.append(Coupling(name=name, kind=raw.kind, exact=reason is None, reason=reason,
                                  width=raw.width, tables=raw.tables, sites=sites, scope=scopes[i],
                                  group=group_names[i]))
    return couplings, cap
