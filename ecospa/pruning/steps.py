"""What ``prune`` accepts as a removal, as a list of steps.

A dict ``{coupling or name: [units]}`` is one step; an ``ecospa.Plan`` is its steps in order,
each with the widths its couplings had when it was made (checked, so that a plan is applied only
to the model state it was made on).

A plan is recognised by its shape (:func:`plan_steps`), not by importing ``ecospa.ir.plan``:
``Plan.replay`` calls the executor, and the executor must not depend on the plan in turn.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch.nn as nn

from ecospa.errors import PlanError
from ecospa.ir.coupling import CouplingGraph

__all__ = ["Step", "as_steps", "plan_steps", "keyed_by_names", "couplings_for"]


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
    if isinstance(removal, Mapping):
        return [Step(removal)]
    steps = plan_steps(removal)
    if steps is not None:
        return [Step(dict(s.removals), dict(s.widths or {})) for s in steps]
    raise PlanError(f"a removal is a dict {{coupling or name: [unit indices]}} or an ecospa.Plan, "
                    f"got {type(removal).__name__}")


def plan_steps(removal) -> tuple | None:
    """The steps of a plan (an ``ecospa.Plan``, or any object whose ``steps`` is a list or tuple
    of objects with ``removals`` and ``widths``), or None for anything else."""
    steps = getattr(removal, "steps", None)
    if isinstance(steps, (list, tuple)) and all(hasattr(s, "removals") and hasattr(s, "widths") for s in steps):
        return tuple(steps)
    return None


def keyed_by_names(steps: Iterable[Step]) -> bool:
    """True when some removal of ``steps`` names a coupling by its name (a string), which needs
    the couplings of the model to look it up in."""
    return any(isinstance(k, str) for s in steps for k in s.removals)


def couplings_for(model: nn.Module) -> CouplingGraph:
    """The couplings to look names up in, for a model that carries its own example inputs.

    Raises:
        PlanError: a plain module (no dummy inputs): pass ``couplings=``.
    """
    from ecospa.analysis.auto_couple import auto_couple
    from ecospa.capture.export import default_inputs

    if default_inputs(model) is None:
        raise PlanError(
            f"coupling names need the couplings of this {type(model).__name__}: pass "
            "couplings=ecospa.auto_couple(model, example_inputs), or key the removal by Coupling objects")
    return auto_couple(model)
