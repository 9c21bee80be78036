"""Short recovery fine-tuning after one-shot pruning (``compress(recover_steps=...)``).

Two losses:

- ``"distill"`` (a dense ``teacher`` is given): match the teacher's outputs. For outputs with
  ``.logits`` (language models, classifiers) the KL divergence ``KL(teacher || student)`` of
  the softmax over the last dimension, averaged over positions; for any other output the mean
  squared error of the first tensor of the output. ``distill_fn(student_out, teacher_out,
  batch) -> loss`` replaces both.
- ``"lm"`` (no teacher): ``loss_fn(model, batch)``, the task loss used for calibration.

AdamW (no weight decay), a linear warm-up over the first 5% of the steps and a linear decay to
zero. ``max_cpu_seconds`` stops early once the process has used that much CPU time
(``time.process_time``): the schedule then follows the spent fraction of the budget, so a
CPU-time budget gives a complete warm-up and decay whatever the speed of the model.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ecospa.compression.calibration import CalibrationError, LossFn

__all__ = ["recover", "distill_loss"]

log = logging.getLogger("ecospa")


def _call(model: nn.Module, batch: Any):
    if isinstance(batch, torch.Tensor):
        return model(batch) if not hasattr(model, "config") else model(input_ids=batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, dict):
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(out, (tuple, list)):
        for v in out:
            if isinstance(v, torch.Tensor):
                return v
    raise CalibrationError(f"cannot find a tensor in the model's output ({type(out).__name__}); pass "
                           "recover_loss_fn=(student_out, teacher_out, batch) -> loss")


def distill_loss(student_out, teacher_out, batch: Any = None) -> torch.Tensor:
    """KL(teacher || student) over the last dim of ``.logits`` when there are logits, else the
    MSE of the first output tensor. Shapes: ``(..., classes)`` -> scalar."""
    s_logits = getattr(student_out, "logits", None)
    if isinstance(s_logits, torch.Tensor):
        t = teacher_out.logits.float()
        s = s_logits.float()
        t = t.reshape(-1, t.shape[-1])
        s = s.reshape(-1, s.shape[-1])
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return F.mse_loss(_first_tensor(student_out).float(), _first_tensor(teacher_out).float())


def recover(model: nn.Module, batches: Sequence[Any], *, steps: int, teacher: nn.Module | None = None,
            loss_fn: LossFn | None = None, distill_fn: Callable | None = None, lr: float = 1e-4,
            max_cpu_seconds: float | None = None, seed: int = 0,
            progress: Callable[[str, int, int], None] | None = None) -> list[float]:
    """Fine-tune ``model`` in place for up to ``steps`` optimizer steps; return the losses.

    Args:
        model: the (pruned) model; trained in train mode, its mode restored after.
        batches: training batches, cycled in a seeded random order.
        steps: optimizer steps (one batch each).
        teacher: the dense model for distillation (None: ``loss_fn``).
        loss_fn: ``(model, batch) -> loss`` when there is no teacher.
        distill_fn: ``(student_out, teacher_out, batch) -> loss`` (default :func:`distill_loss`).
        lr: peak learning rate.
        max_cpu_seconds: stop once this much process CPU time was spent in here.

    Raises:
        CalibrationError: a non-finite loss (the step number is given).
    """
    if teacher is None and loss_fn is None:
        raise CalibrationError("recovery needs a teacher (distillation) or a loss_fn")
    distill_fn = distill_fn or distill_loss
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    was = model.training
    model.train()
    losses: list[float] = []
    cpu0 = time.process_time()
    try:
        for step in range(steps):
            spent = (time.process_time() - cpu0) / max_cpu_seconds if max_cpu_seconds else 0.0
            if spent >= 1.0:
                break
            frac = max((step + 0.5) / steps, spent)  # progress through the schedule
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, frac / 0.05) * max(0.0, 1.0 - frac)
            if not order:
                order = torch.randperm(len(batches), generator=g).tolist()
            batch = batches[order.pop()]
            if teacher is not None:
                with torch.no_grad():
                    t_out = _call(teacher, batch)
                loss = distill_fn(_call(model, batch), t_out, batch)
            else:
                loss = loss_fn(model, batch)
            if not torch.isfinite(loss.detach()):
                raise CalibrationError(f"recovery loss is {float(loss)} at step {step}; lower recover_lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress("recover", step + 1, steps)
    finally:
        opt.zero_grad(set_to_none=True)
        model.train(was)
    log.info("ecospa recover: %d steps, loss %.4f -> %.4f", len(losses), losses[0] if losses else math.nan,
             losses[-1] if losses else math.nan)
    return losses
