"""Baselines that follow EcoSpa's schedule: ``uncoupled`` (masks) and ``svd`` (Fig. 5 ablation).

Both are step hooks (see :class:`ecospa.recipes.train.Run`) given EcoSpa's events as a schedule
``{step: {coupling name: units removed}}``. Which side of a coupling a slice is on (0 produces
the unit's channel, 1 reads it) is discovery's answer, ``SliceTable.side``; slice norms come from
``ecospa.Importance``. What is this benchmark's own is the baselines: per-side masks, and the
truncated SVD of a product written back into the kept slices.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

import ecospa

__all__ = ["Side", "side_slices", "side_matrix", "write_side", "UncoupledMasks", "SvdAtEvents"]

Side = list[tuple[str, int, np.ndarray]]
"""One side of a coupling: ``(param, dim, index)`` per ``(param, dim)``, ``index[j]`` the slice of unit ``j``."""


def side_slices(c: ecospa.Coupling) -> dict[int, Side]:
    """The slices of ``c`` split by discovery's ``SliceTable.side``: ``{0: producers, 1: readers}``.

    Raises:
        ConfigError: a table without sides, or a side holding other than one slice per unit of a
            ``(param, dim)`` (this benchmark writes one row per unit).
    """
    out: dict[int, Side] = {0: [], 1: []}
    for t in c.tables:
        if t.side is None:
            raise ecospa.ConfigError(f"coupling {c.name!r}: discovery gave no sides for {t.param} dim {t.dim}")
        side, unit, index = np.asarray(t.side), np.asarray(t.unit), np.asarray(t.index)
        for s in (0, 1):
            m = side == s
            if not m.any():
                continue
            o = np.argsort(unit[m], kind="stable")
            if not np.array_equal(unit[m][o], np.arange(c.width)):
                raise ecospa.ConfigError(f"coupling {c.name!r}: {t.param} dim {t.dim} side {s} does not hold "
                                         "exactly one slice per unit; this benchmark cannot split it")
            out[s].append((t.param, t.dim, index[m][o]))
    return out


def side_matrix(params: dict[str, torch.Tensor], side: Side) -> torch.Tensor:
    """``(width, n)`` float64: each unit's slices on one side, concatenated."""
    cols = []
    for name, dim, idx in side:
        sl = params[name].detach().index_select(dim, torch.as_tensor(idx)).movedim(dim, 0)
        cols.append(sl.reshape(sl.shape[0], -1).double())
    return torch.cat(cols, dim=1)


def write_side(params: dict[str, torch.Tensor], side: Side, rows: torch.Tensor,
               optimizer: torch.optim.Optimizer | None) -> None:
    """Write ``rows`` ``(width, n)`` back into one side's slices; zero their AdamW moments."""
    off = 0
    with torch.no_grad():
        for name, dim, idx in side:
            p = params[name]
            shape = [k for d, k in enumerate(p.shape) if d != dim]
            k = int(np.prod(shape)) if shape else 1
            block = rows[:, off:off + k].reshape(rows.shape[0], *shape).to(p.dtype).movedim(0, dim)
            ix = torch.as_tensor(idx)
            p.index_copy_(dim, ix, block)
            if optimizer is not None:
                for v in optimizer.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        v.index_fill_(dim, ix, 0.0)
            off += k


class UncoupledMasks:
    """``uncoupled``: per coupling cut by k units, zero the k weakest producer slices and,
    independently, the k weakest reader slices (L1 norm each, among those still alive); the
    masks are re-applied after every step, so the model keeps its dense shapes."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: dict[int, dict[str, int]], example: tuple):
        self.model, self.schedule = model, schedule
        self.params = dict(model.named_parameters())
        cg = ecospa.auto_couple(model, example)
        self.imp = ecospa.Importance(model, cg, stats=())  # only the "l1" statistic is read
        self.sides = {c.name: side_slices(c) for c in cg}
        self.alive = {c.name: [np.ones(c.width, dtype=bool), np.ones(c.width, dtype=bool)] for c in cg}
        self.masks: dict[str, torch.Tensor] = {}
        self.dense_params = sum(p.numel() for p in model.parameters())

    def _remove(self, name: str, k: int) -> None:
        for s in (0, 1):
            score = self.imp.per_unit(name, "l1", side=s).numpy()  # (width,)
            alive = np.flatnonzero(self.alive[name][s])
            drop = alive[np.argsort(score[alive], kind="stable")[:k]]
            self.alive[name][s][drop] = False
            for pname, dim, idx in self.sides[name][s]:
                m = self.masks.setdefault(pname, torch.ones_like(self.params[pname], dtype=torch.bool))
                m.index_fill_(dim, torch.as_tensor(idx[drop]), False)

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        for name, k in self.schedule.get(step, {}).items():
            self._remove(name, k)
        for pname, m in self.masks.items():
            self.params[pname].mul_(m)

    def effective_params(self) -> int:
        """Dense count minus the masked entries."""
        return self.dense_params - sum(int((~m).sum()) for m in self.masks.values())

    def extra_bytes(self) -> int:
        """Bytes of the masks."""
        return sum(m.numel() * m.element_size() for m in self.masks.values())


class SvdAtEvents:
    """``svd``: at each scheduled event, the rank-r truncated SVD of each cut q·k / v·o product
    written into the r kept units (AdamW moments of those slices reset); Eq. 9 for the others."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: dict[int, dict[str, int]], example: tuple):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.cg = ecospa.auto_couple(model, example)
        self.imp = ecospa.Importance(model, self.cg, stats=())
        self.kept_energy: list[float] = []

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        todo = self.schedule.get(step)
        if not todo:
            return
        params = dict(self.model.named_parameters())
        removal: dict[ecospa.Coupling, list[int]] = {}
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, k in todo.items():
            c = self.cg[name]
            r = c.width - k
            if c.kind in ("qk", "vo"):
                sides = side_slices(c)
                a, b = side_matrix(params, sides[0]), side_matrix(params, sides[1])  # (w, n0), (w, n1)
                u, s, vh = torch.linalg.svd(a.T @ b, full_matrices=False)  # M = sum_j a_j b_j^T
                self.kept_energy.append(float((s[:r] ** 2).sum() / (s ** 2).sum().clamp_min(1e-30)))
                root = s[:r].sqrt()
                factors[name] = ((u[:, :r] * root).T, (vh[:r].T * root).T)  # (r, n0), (r, n1)
                removal[c] = list(range(r, c.width))  # which r slots stay does not matter: rewritten
            else:
                v = self.imp.unit_scores(c, "eq9")
                removal[c] = sorted(torch.argsort(v, stable=True)[:k].tolist())
        ecospa.prune(self.model, removal, self.optimizer, couplings=self.cg)
        self.cg = ecospa.remaining(self.cg, removal)
        self.imp.rebind(self.cg)
        params = dict(self.model.named_parameters())
        for name, (f0, f1) in factors.items():
            sides = side_slices(self.cg[name])
            write_side(params, sides[0], f0, self.optimizer)
            write_side(params, sides[1], f1, self.optimizer)

    def info(self) -> dict[str, Any]:
        """Mean fraction of the squared singular values kept by the truncations."""
        e = self.kept_energy
        return {"truncations": len(e), "mean_kept_energy": float(np.mean(e)) if e else None}
