"""Replaying a checkpoint's removal record on a model: check it, turn it into units, prune.

The record (``ecospa.param_records``) says, per sliced parameter, its dense shape and the dense
indices it kept. On a freshly built dense model (or one pruned less than the checkpoint) the
units to remove are, for every coupling of the model, the units whose slices the record
removed. A unit's slices are all removed or all kept; anything else means the checkpoint does
not follow this model's couplings, and is refused before anything changes. So is a record that
removes slices no coupling covers.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn

from ecospa.ir.record import ParamRecord, param_records
from ecospa.errors import CheckpointError
from ecospa.ir.coupling import Coupling, CouplingGraph

__all__ = ["check_removals", "units_to_remove", "replay", "same_records"]


def _dense_shape(p: torch.Tensor, rec: ParamRecord | None) -> tuple[int, ...]:
    return tuple(rec.dense_shape) if rec is not None else tuple(p.shape)


def check_removals(model: nn.Module, saved: Mapping[str, ParamRecord], where: str) -> dict[str, tuple[int, ...]]:
    """Check that ``model`` can take the record ``saved``; nothing is changed.

    Returns:
        ``{param name: shape after replaying}`` for every parameter.

    Raises:
        CheckpointError: a parameter the model lacks, another dense shape, or a model already
            pruned where the checkpoint is not.
    """
    params = dict(model.named_parameters())
    current = param_records(model)
    cls = type(model).__name__
    for name, rec in saved.items():
        if name not in params:
            raise CheckpointError(f"{where}: the checkpoint prunes parameter {name!r}, which this {cls} "
                                  "does not have; load it into a model of the saved architecture")
        dense = _dense_shape(params[name], current.get(name))
        if dense != tuple(rec.dense_shape):
            raise CheckpointError(f"{where}: {name} has dense shape {tuple(rec.dense_shape)} in the "
                                  f"checkpoint and {dense} in this {cls}; build the model with the "
                                  "config it was saved with")
    for name, rec in current.items():
        target = saved.get(name)
        for dim, kept in rec.kept.items():
            if target is None or not np.isin(target.kept_or_all(dim), kept).all():
                raise CheckpointError(f"{where}: this {cls} is already pruned at {name} (dim {dim}) "
                                      "where the checkpoint keeps more; load it into a freshly built "
                                      "dense model")
    out = {}
    for name, p in params.items():
        rec = saved.get(name)
        out[name] = tuple(p.shape) if rec is None else tuple(
            int(rec.kept_or_all(d).size) for d in range(len(rec.dense_shape)))
    return out


def same_records(a: Mapping[str, ParamRecord], b: Mapping[str, ParamRecord]) -> bool:
    """Whether two removal records describe the same kept slices."""
    if set(a) != set(b):
        return False
    for name, ra in a.items():
        rb = b[name]
        if tuple(ra.dense_shape) != tuple(rb.dense_shape):
            return False
        if any(not np.array_equal(ra.kept_or_all(d), rb.kept_or_all(d)) for d in range(len(ra.dense_shape))):
            return False
    return True


def units_to_remove(model: nn.Module, saved: Mapping[str, ParamRecord], cg: CouplingGraph,
                    where: str) -> dict[Coupling, list[int]]:
    """``{coupling of cg: unit indices}`` that take ``model`` (in the state ``cg`` was found on)
    to the record ``saved``.

    Raises:
        CheckpointError: a unit with only some of its slices removed, units of an inexact
            coupling, or removed slices that no coupling covers.
    """
    params = dict(model.named_parameters())
    current = param_records(model)

    def kept_now(p: str, d: int) -> np.ndarray:
        rec = current.get(p)
        return rec.kept_or_all(d) if rec is not None else np.arange(params[p].shape[d], dtype=np.int64)

    need: dict[tuple[str, int], np.ndarray] = {}
    for name, rec in saved.items():
        for d in range(len(rec.dense_shape)):
            gone = np.setdiff1d(kept_now(name, d), rec.kept_or_all(d))
            if gone.size:
                need[(name, d)] = gone
    covered: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)
    out: dict[Coupling, list[int]] = {}
    for c in cg.all:
        hits = np.zeros(c.width, dtype=np.int64)
        total = np.zeros(c.width, dtype=np.int64)
        dense_of = []
        for t in c.tables:
            dense = kept_now(t.param, t.dim)[t.index]
            gone = need.get((t.param, t.dim))
            hit = np.isin(dense, gone) if gone is not None else np.zeros(dense.size, dtype=bool)
            np.add.at(hits, t.unit, hit)
            np.add.at(total, t.unit, 1)
            dense_of.append((t, dense))
        full = (hits == total) & (total > 0)
        partial = (hits > 0) & ~full
        if partial.any():
            u = int(np.nonzero(partial)[0][0])
            raise CheckpointError(f"{where}: unit {u} of coupling {c.name!r} lost only some of its "
                                  "slices in the checkpoint, so its removals do not follow this model's "
                                  "couplings; load it into a model of the saved architecture and config")
        if not full.any():
            continue
        if not c.exact:
            raise CheckpointError(f"{where}: the checkpoint removed units of {c.name!r}, which is not "
                                  f"exact in this model ({c.reason}); load it into the saved architecture")
        units = np.nonzero(full)[0]
        out[c] = units.tolist()
        for t, dense in dense_of:
            covered[(t.param, t.dim)].append(dense[np.isin(t.unit, units)])
    for (name, d), gone in need.items():
        got = np.concatenate(covered[(name, d)]) if covered.get((name, d)) else np.zeros(0, np.int64)
        left = np.setdiff1d(gone, got)
        if left.size:
            raise CheckpointError(f"{where}: the checkpoint removed slices {left[:5].tolist()} of {name} "
                                  f"(dim {d}) that no coupling of this model covers; it was pruned on "
                                  "another architecture, or the example inputs do not reach that layer")
    return out


def replay(model: nn.Module, saved: Mapping[str, ParamRecord], optimizer, *, example_inputs=None,
           couplings: CouplingGraph | None = None, narrow: bool | str = True, where: str = "checkpoint") -> None:
    """Prune ``model`` (and ``optimizer``) in place until its record equals ``saved``.

    Everything is checked before the model changes: :func:`check_removals` first, then the units.

    Raises:
        CheckpointError: see :func:`check_removals` and :func:`units_to_remove`; also a plain
            module without ``example_inputs`` when there is something to replay.
    """
    from ecospa.analysis.auto_couple import auto_couple
    from ecospa.pruning.apply import prune
    from ecospa.errors import CaptureError
    from ecospa.capture.export import default_inputs

    if same_records(param_records(model), saved):
        return
    if couplings is None:
        if example_inputs is None and default_inputs(model) is None:
            raise CheckpointError(f"{where}: the checkpoint is pruned and replaying its removals needs "
                                  f"the couplings of this {type(model).__name__}: pass "
                                  "ecospa.load(directory, model, example_inputs=...)")
        try:
            couplings = auto_couple(model, example_inputs)
        except CaptureError as e:
            raise CheckpointError(f"{where}: could not find the couplings of {type(model).__name__} to "
                                  f"replay the removals: {e}") from e
    removal = units_to_remove(model, saved, couplings, where)
    prune(model, removal, optimizer, couplings=couplings, narrow=narrow)
    if not same_records(param_records(model), saved):  # pragma: no cover - a bug if it happens
        raise CheckpointError(f"{where}: internal error: after replaying, the model's removal record "
                              "differs from the checkpoint's; please report this")
