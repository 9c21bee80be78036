"""Baselines built on ecospa's couplings (same units, other choices): Wanda-sp and uncoupled.
Public API only: the Wanda-sp score is registered with ``ecospa.register_unit_score`` and
applied by ``ecospa.compress(score="wanda_sp", allocation="uniform", reconstruct=False)``.

- ``wanda_sp``: the structured Wanda criterion of An et al. ("Fluctuation-based Adaptive
  Structured Pruning", AAAI 2024, their Wanda-sp baseline): a unit's score is
  ``sum |W_ij| * ||X_j||`` over every weight of its slices, ``||X_j||`` the L2 norm over the
  calibration tokens of the input channel the weight multiplies; every coupling loses the same
  fraction of its units (Wanda's uniform per-layer sparsity); no reconstruction.
- ``uncoupled``: each matrix's slices are scored *alone* and removed without their partners:
  per coupling, the same number of units ecospa removed there, but every ``(param, dim)`` of the
  coupling zeroes its own weakest unit slices (the Wanda score of that matrix alone). Rows of a
  producer and columns of its reader then go at different indices, so the model keeps its dense
  shapes (masks; gradients masked during recovery); parameters are counted as the entries left
  non-zero.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

import ecospa

_WANDA: dict[str, torch.Tensor] = {}  # coupling name -> unit scores, set by wanda_sp before compress


@ecospa.register_unit_score("wanda_sp")
def _wanda_unit_score(imp, c, salt):
    return _WANDA[c.name]


@torch.no_grad()
def input_norms(model: nn.Module, couplings, batches) -> dict[str, torch.Tensor]:
    """``{module path: (n_in,) L2 norm over calibration tokens of each input channel}``."""
    mods = dict(model.named_modules())
    paths = sorted({s.module for c in couplings for s in c.sites if s.role in ("in", "out")})
    acc: dict[str, torch.Tensor] = {}
    hooks = []
    for path in paths:
        def hook(mod, args, out, path=path):
            x = args[0].detach().float()
            acc[path] = acc.get(path, 0) + x.reshape(-1, x.shape[-1]).pow(2).sum(0)
        hooks.append(mods[path].register_forward_hook(hook))
    try:
        for b in batches:
            model(input_ids=b)
    finally:
        for h in hooks:
            h.remove()
    return {p: v.sqrt() for p, v in acc.items()}


def _table_scores(c, t, params, sites, norms) -> torch.Tensor:
    """``(width,)`` Wanda score of one (param, dim) table of coupling ``c``."""
    s = sites[(t.param, t.dim)]
    w = params[t.param].detach().abs().float()
    xn = norms.get(s.module)
    if xn is None:
        per = w.sum([d for d in range(w.dim()) if d != t.dim]) if w.dim() > 1 else w
    elif s.role == "in":  # columns: |W_ij| * ||x_j||
        per = w.sum(0) * xn if t.dim == 1 else w.sum(1) * xn
    else:  # rows (or a bias): sum_i |W_ji| ||x_i||
        per = (w * xn[None]).sum(1) if w.dim() == 2 else w
    out = torch.zeros(c.width, dtype=torch.float64)
    out.index_add_(0, torch.as_tensor(np.asarray(t.unit)), per.double()[torch.as_tensor(np.asarray(t.index))])
    return out


def wanda_scores(model, couplings, norms) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    out = {}
    for c in couplings:
        sites = {(s.param, s.dim): s for s in c.sites}
        out[c.name] = sum(_table_scores(c, t, params, sites, norms) for t in c.tables)
    return out


def wanda_sp(model: nn.Module, target_params: int, batches, couplings=None):
    """Prune ``model`` in place with Wanda-sp to ``target_params``; return ``ecospa.compress``'s report."""
    cg = couplings or ecospa.auto_couple(model)
    C = [c for c in cg if c.exact]
    _WANDA.clear()
    _WANDA.update(wanda_scores(model, C, input_norms(model, C, batches)))
    # compress only allocates (uniform) and removes here: its one calibration sample is unused
    _, rep = ecospa.compress(model, target_params, [batches[0][:1, :64]], couplings=cg, score="wanda_sp",
                             allocation="uniform", reconstruct=False, rounds=1)
    return rep


class Uncoupled:
    """Masks of the uncoupled baseline, with a gradient hook keeping masked entries at zero."""

    def __init__(self, model: nn.Module, counts: dict[str, int], batches, couplings=None):
        cg = couplings or ecospa.auto_couple(model)
        C = [c for c in cg if c.exact and counts.get(c.name, 0) > 0]
        params = dict(model.named_parameters())
        norms = input_norms(model, C, batches)
        self.masks: dict[str, torch.Tensor] = {}
        for c in C:
            sites = {(s.param, s.dim): s for s in c.sites}
            k = counts[c.name]
            for t in c.tables:
                sc = _table_scores(c, t, params, sites, norms)
                drop = torch.argsort(sc, stable=True)[:k].numpy()
                idx = np.asarray(t.index)[np.isin(np.asarray(t.unit), drop)]
                m = self.masks.setdefault(t.param, torch.ones_like(params[t.param], dtype=torch.bool))
                m.index_fill_(t.dim, torch.as_tensor(idx), False)
        with torch.no_grad():
            for n, m in self.masks.items():
                params[n].mul_(m)
        self.hooks = [params[n].register_hook(lambda g, m=m: g * m) for n, m in self.masks.items()]
        self.dense = sum(p.numel() for p in model.parameters())

    def effective_params(self) -> int:
        return self.dense - sum(int((~m).sum()) for m in self.masks.values())
