"""What the trainer integrations share: finding the torch optimizer inside wrappers, and
attaching an EcoSpa to the optimizer a trainer holds now."""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ecospa.errors import EcospaError

__all__ = ["unwrap_optimizer", "attach_optimizer", "optimizer_for", "schedule_run", "export_at_end", "DEFAULT_END"]

DEFAULT_END = "halfway"  # the callbacks' default end: halfway between start and the last step

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


def schedule_run(sp, end, total_steps: int | None, max_steps: int | None, global_step: int = 0) -> None:
    """Give ``sp`` the run's length and the step that reaches the target, once the trainer
    knows its ``max_steps``.

    Args:
        end: the user's ``end`` (a step, a fraction of the run, or None: no schedule), or
            :data:`DEFAULT_END`: halfway between ``start`` and the last step.
        total_steps: the user's ``total_steps`` (None: from ``max_steps``).
        max_steps: the trainer's last optimizer step (0 or less, or None, when unknown or endless).
        global_step: the trainer's step now (after a resume: the checkpoint's). ``sp.steps``
            may be ahead of it when the same callback fits a second time: that fit's steps count
            from ``sp.steps - global_step`` on.

    Raises:
        ConfigError: an ``end`` the run cannot reach (after the last step, before ``start``).
    """
    begin = max(0, sp.steps - int(global_step))
    total = total_steps if total_steps is not None else (
        begin + int(max_steps) if max_steps is not None and max_steps > 0 else None)
    if end == DEFAULT_END:
        start = max(sp.config.start, begin)
        if total is None or total <= start + 1:
            if total is None:
                log.info("ecospa: the trainer does not know its number of steps; pruning at Algorithm 1's "
                         "own pace (pass end= and total_steps= for a schedule)")
            end = None
        else:
            end = start + (total - start + 1) // 2
    sp.set_schedule(total_steps=total, end=end)
    if end is not None:
        log.info("ecospa: target %r by step %d of %s (cubic schedule from step %d, a round every %s steps)",
                 sp.config.target, sp.config.end_step, total, sp.config.start, sp.config.every)


def export_at_end(model: nn.Module, directory, tokenizer=None, options=None):
    """``ecospa.export(model, directory, tokenizer, **options)`` at the end of training (the
    callers run it on the main process only); the :class:`ecospa.ExportReport`, also logged."""
    import os

    from ecospa.export.write import export

    report = export(model, os.fspath(directory), tokenizer, **dict(options or {}))
    log.info("ecospa: %s", report.summary())
    return report
