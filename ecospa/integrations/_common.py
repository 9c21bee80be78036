"""What the trainer integrations share: finding the torch optimizer inside wrappers, and
attaching an EcoSpa to the optimizer a trainer holds now."""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ecospa.errors import EcospaError

__all__ = ["unwrap_optimizer", "attach_optimizer", "optimizer_for"]

log = logging.getLogger("ecospa")


def unwrap_optimizer(optimizer):
    """The innermost ``torch.optim.Optimizer`` of a wrapper (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``: both keep it in ``.optimizer``;
    Lightning's also in ``._optimizer``), or ``optimizer`` itself. None stays None."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            inner = getattr(optimizer, "_optimizer", None)
        if inner is None or not hasattr(inner, "param_groups"):
            break
        optimizer = inner
    return optimizer


def _holds(optimizer, model: nn.Module) -> bool:
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return any(id(p) in held for p in model.parameters())


def optimizer_for(model: nn.Module, optimizers) -> torch.optim.Optimizer | None:
    """The one optimizer among ``optimizers`` (unwrapped) that holds ``model``'s parameters.

    Raises:
        EcospaError: several optimizers hold them (one EcoSpa slices one optimizer's state).
    """
    found = [o for o in (unwrap_optimizer(o) for o in optimizers if o is not None) if _holds(o, model)]
    if len(found) > 1:
        raise EcospaError(f"{len(found)} optimizers hold parameters of {type(model).__name__}; EcoSpa slices "
                          "the state of one optimizer: train the pruned module with a single optimizer")
    return found[0] if found else None


def attach_optimizer(sp, optimizer) -> None:
    """Point ``sp`` at ``optimizer`` (unwrapped) when the trainer has built a new one."""
    opt = unwrap_optimizer(optimizer)
    if opt is not None and opt is not sp.optimizer:
        if sp.optimizer is not None:
            log.info("ecospa: the trainer's optimizer changed (%s); EcoSpa follows the new one",
                     type(opt).__name__)
        sp.optimizer = opt
