"""What ``prune`` accepts as a removal, as a list of steps.

A dict ``{coupling or name: [units]}`` is one step; an ``ecospa.Plan`` is its steps in order,
each with the widths its couplings had when it was made (checked, so that a plan is applied only
to the model state it was made on).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch.nn as nn

from ecospa.coupling.plan import Plan
from ecospa.errors import PlanError
from ecospa.graph.ir import CouplingGraph

__all__ = ["Step", "as_steps", "couplings_for"]


@dataclass(frozen=True)
class Step:
    """One removal: ``{coupling or name: unit indices}`` and the widths it expects (may be empty)."""

    removals: Mapping
    widths: Mapping[str, int] = field(default_factory=dict)


def as_steps(removal) -> list[Step]:
    """``removal`` (a dict or an ``ecospa.Plan``) as a list of :class:`Step`.

    Raises:
        PlanError: ``removal`` is neither.
    """
    if isinstance(removal, Plan):
        return [Step(dict(s.removals), dict(s.widths or {})) for s in removal.steps]
    if isinstance(removal, Mapping):
        return [Step(removal)]
    raise PlanError(f"a removal is a dict {{coupling or name: [unit indices]}} or an ecospa.Plan, "
                    f"got {type(removal).__name__}")


def couplings_for(model: nn.Module) -> CouplingGraph:
    """The couplings to look names up in, for a model that carries its own example inputs.

    Raises:
        PlanError: a plain module (no dummy inputs): pass ``couplings=``.
    """
    from ecospa.coupling.discovery import auto_couple
    from ecospa.graph.capture import default_inputs

    if default_inputs(model) is None:
        raise PlanError(
            f"coupling names need the couplings of this {type(model).__name__}: pass "
            "couplings=ecospa.auto_couple(model, example_inputs), or key the removal by Coupling objects")
    return auto_couple(model)
