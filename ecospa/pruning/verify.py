"""The self-check of ``prune(..., verify=True)``: pruned outputs against the masked dense model.

The reference is computed on the model itself before it changes: the slices about to be removed
are zeroed in place, the model runs on the example inputs (eval mode, no gradients), and the
slices get their values back. After the transaction, the pruned model must give the same outputs.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from ecospa.ir.coupling import Coupling

__all__ = ["masked_reference", "outputs_match", "run_eval"]


def run_eval(model: nn.Module, inputs: tuple[tuple, dict[str, Any]]) -> list[torch.Tensor]:
    """The floating-point tensors of ``model(*args, **kwargs)`` in eval mode without gradients
    (the model's mode is restored)."""
    args, kwargs = inputs
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
    finally:
        model.train(was)
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t.detach().clone() for t in pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def masked_reference(model: nn.Module, resolved: Mapping[Coupling, np.ndarray],
                     inputs: tuple[tuple, dict[str, Any]]) -> list[torch.Tensor]:
    """Outputs of ``model`` with the slices of the ``resolved`` units zeroed (then restored)."""
    params = dict(model.named_parameters())
    saved = []
    try:
        with torch.no_grad():
            for c, units in resolved.items():
                for t in c.tables:
                    idx = t.index[np.isin(t.unit, units)]
                    if idx.size:
                        p = params[t.param]
                        ix = torch.as_tensor(idx, device=p.device)
                        saved.append((p, t.dim, ix, p.index_select(t.dim, ix).clone()))
                        p.index_fill_(t.dim, ix, 0.0)
        return run_eval(model, inputs)
    finally:
        with torch.no_grad():
            for p, dim, ix, old in reversed(saved):
                p.index_copy_(dim, ix, old)


def outputs_match(model: nn.Module, inputs, reference: list[torch.Tensor], tol: float) -> bool:
    """True when ``model``'s outputs on ``inputs`` equal ``reference`` to relative error ``tol``."""
    got = run_eval(model, inputs)
    if len(got) != len(reference):
        return False
    for a, b in zip(got, reference):
        if a.shape != b.shape or not torch.isfinite(a).all():
            return False
        denom = float(b.double().norm())
        err = float((a.double() - b.double()).norm()) / (denom if denom > 0 else 1.0)
        if err > tol:
            return False
    return True
