"""Removal helpers of :func:`ecospa.compress`: zero a round's units in place, find the consumer
columns they feed, and refit those consumers' kept columns by least squares (OBS / SlimGPT).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from ecospa.compression.calibration import Consumer
from ecospa.ir.coupling import Coupling

__all__ = ["zero_units", "consumer_columns", "reconstruct"]


def zero_units(params: Mapping[str, torch.Tensor], c: Coupling, units: Sequence[int]) -> None:
    with torch.no_grad():
        for t in c.tables:
            mask = np.isin(np.asarray(t.unit), np.asarray(units, dtype=np.int64))
            if mask.any():
                idx = torch.as_tensor(np.asarray(t.index)[mask], dtype=torch.long, device=params[t.param].device)
                params[t.param].index_fill_(t.dim, idx, 0.0)


def consumer_columns(couplings: Sequence[Coupling], consumers: Mapping[str, Consumer],
                      removal: Mapping[str, Sequence[int]]) -> dict[str, set[int]]:
    """``{consumer param: input columns}`` read by the units of ``removal``."""
    by_name = {c.name: c for c in couplings}
    out: dict[str, set[int]] = {}
    for name, units in removal.items():
        c = by_name[name]
        for t in c.tables:
            cons = consumers.get(t.param)
            if cons is None or t.dim != cons.in_dim:
                continue
            mask = np.isin(np.asarray(t.unit), np.asarray(units, dtype=np.int64))
            out.setdefault(t.param, set()).update(np.asarray(t.index)[mask].tolist())
    return out


@torch.no_grad()
def reconstruct(params: Mapping[str, torch.Tensor], cons: Consumer, gram: torch.Tensor, mean: torch.Tensor,
                removed: set[int], dead: set[int], damp: float) -> None:
    """Refit the kept input columns (and bias) of one consumer after removing columns ``removed``.

    Least squares on the calibration inputs: the consumer's output before the removal is the
    target, the kept columns (not in ``removed`` nor ``dead``) the variables. ``gram`` is
    ``X^T X / tokens`` ``(n, n)``, ``mean`` the mean input ``(n,)``.
    """
    p = params[cons.param]
    W = p.detach().double()
    if cons.in_dim == 0:
        W = W.T  # (out, n)
    n = W.shape[1]
    S = torch.as_tensor(sorted(removed), dtype=torch.long)
    keep = np.ones(n, dtype=bool)
    keep[list(removed | dead)] = False
    K = torch.as_tensor(np.nonzero(keep)[0], dtype=torch.long)
    if S.numel() == 0 or K.numel() == 0:
        return
    G = gram.double().to(W.device)
    mu = mean.double().to(W.device)
    bias = params[cons.bias] if cons.bias is not None else None
    Wb = W
    if bias is not None:  # the bias is the weight of a constant-1 input
        G = torch.cat([torch.cat([G, mu[:, None]], 1), torch.cat([mu, mu.new_ones(1)])[None]], 0)
        Wb = torch.cat([W, bias.detach().double()[:, None]], 1)
        K = torch.cat([K, torch.tensor([n])])
    A = G[K][:, K].clone()
    reg = damp * float(A.diagonal()[: len(K) - (bias is not None)].mean().clamp_min(1e-12))
    A.diagonal().add_(reg)
    if bias is not None:
        A[-1, -1] -= reg
    B = Wb[:, S] @ G[S][:, K]  # (out, |K|)
    try:
        L = torch.linalg.cholesky(A)
        upd = torch.cholesky_solve(B.T, L).T
    except RuntimeError:
        upd = torch.linalg.lstsq(A, B.T).solution.T
    new = Wb.clone()
    new[:, K] += upd
    new[:, S] = 0.0
    Wn = new[:, :n]
    p.copy_((Wn.T if cons.in_dim == 0 else Wn).to(p.dtype))
    if bias is not None:
        bias.copy_(new[:, n].to(bias.dtype))
