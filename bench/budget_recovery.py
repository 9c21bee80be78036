"""The recovery fine-tune the compression benchmarks give every method: a fixed CPU budget.

AdamW (no weight decay), linear warm-up over the first 5% of the budget and linear decay to zero
at its end, batches in a seeded random order; stops once the process used ``cpu_seconds`` of CPU
time (``time.process_time``), so every method gets the same compute whatever its speed.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch

__all__ = ["recover_for_cpu_seconds"]


def recover_for_cpu_seconds(model: torch.nn.Module, batches: Sequence[Any],
                            loss_of: Callable[[Any], torch.Tensor], *, cpu_seconds: float,
                            lr: float = 1e-4, seed: int = 0) -> list[float]:
    """Train ``model`` on ``loss_of(batch)`` for ``cpu_seconds`` of CPU time; the loss per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    c0 = time.process_time()
    while (spent := (time.process_time() - c0) / cpu_seconds) < 1.0:
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (spent + 1e-3) / 0.05) * max(0.0, 1.0 - spent)
        if not order:
            order = torch.randperm(len(batches), generator=g).tolist()
        loss = loss_of(batches[order.pop()])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    opt.zero_grad(set_to_none=True)
    model.eval()
    return losses
