"""EcoSpa's progress in a checkpoint: ``EcoSpa.state_dict()`` (steps, rounds, plan, event times,
Eq. 6 statistics) as JSON with tensor references, plus its config for a consistency warning.

Restoring goes through ``EcoSpa.load_state_dict``, which replays the saved plan on the model and
the optimizer (so EcoSpa's couplings are those of an uninterrupted run). Before that, everything
is checked without changing anything: the plan is resolved against EcoSpa's couplings and the
record it would produce is compared with the checkpoint's removal record, and every statistic
must fit the parameter shape it will have.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from ecospa.checkpoint.removals import same_records
from ecospa.checkpoint.tree import decode, encode, is_int
from ecospa.ir.plan import Plan
from ecospa.ir.record import ParamRecord, param_records
from ecospa.errors import CheckpointError, EcospaError

__all__ = ["ecospa_to_json", "EcoSpaState", "check_ecospa", "restore_ecospa"]


def ecospa_to_json(sp, tensors: dict[str, torch.Tensor]) -> dict:
    """The ``ecospa`` section of the manifest; tensors are added to ``tensors``."""
    return {"config": encode(dataclasses.asdict(sp.config), "ecospa/config", tensors),
            "state": encode(sp.state_dict(), "ecospa/state", tensors)}


@dataclass(frozen=True)
class EcoSpaState:
    """A checked EcoSpa section: the decoded ``state_dict`` and its plan."""

    state: dict
    plan: Plan


def _plan_records(model: nn.Module, plan: Plan, cg, where: str) -> dict[str, ParamRecord]:
    """The removal record ``model`` would have after ``prune(model, plan, couplings=cg)``."""
    from ecospa.pruning.apply import resolve

    try:
        steps = resolve(model, plan, cg)
    except EcospaError as e:
        raise CheckpointError(f"{where}: EcoSpa's saved plan does not apply to this model: {e}") from None
    params = dict(model.named_parameters())
    records = dict(param_records(model))
    removed: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)
    for cg_i, resolved in steps:
        for c, units in resolved.items():
            for t in c.tables:
                rm = t.index[np.isin(t.unit, units)]
                base = cg_i.kept.get((t.param, t.dim)) if cg_i is not None else None
                if base is None:
                    rec = records.get(t.param)
                    base = rec.kept_or_all(t.dim) if rec is not None else np.arange(
                        params[t.param].shape[t.dim], dtype=np.int64)
                removed[(t.param, t.dim)].append(base[rm])
    for (name, dim), parts in removed.items():
        rec = records.get(name) or ParamRecord(tuple(params[name].shape))
        kept = np.setdiff1d(rec.kept_or_all(dim), np.concatenate(parts))
        records[name] = ParamRecord(rec.dense_shape, {**rec.kept, dim: kept})
    return records


def _couplings(sp, example_inputs, state: Mapping, where: str):
    """EcoSpa's couplings, captured now if it was built without example inputs and has not run."""
    if getattr(sp, "ready", True):
        return sp.couplings
    inputs = example_inputs
    if inputs is None and state.get("inputs") is not None:
        args, kwargs = state["inputs"]
        inputs = tuple(args) if not kwargs else dict(kwargs) if not args else None
    if inputs is None:
        raise CheckpointError(f"{where}: EcoSpa has not found its couplings yet (built without example "
                              "inputs, model never run); pass ecospa.load(..., example_inputs=...)")
    try:
        return sp.capture(inputs)
    except EcospaError as e:
        raise CheckpointError(f"{where}: EcoSpa could not find the couplings to resume: {e}") from None


def check_ecospa(section: Any, tensors: Mapping[str, torch.Tensor], sp, model: nn.Module,
                 saved_records: Mapping[str, ParamRecord], shapes: Mapping[str, tuple[int, ...]],
                 where: str, example_inputs=None) -> EcoSpaState:
    """Check the saved EcoSpa state against ``sp`` and the checkpoint's removal record.

    Raises:
        CheckpointError: no EcoSpa state saved, a malformed one, an EcoSpa on another model or
            already pruned along another plan, a plan that does not produce the saved record,
            statistics of the wrong shape.
    """
    if section is None:
        raise CheckpointError(f"{where}: the checkpoint holds no EcoSpa state (saved without ecospa=); "
                              "load without ecospa=")
    if sp.model is not model:
        raise CheckpointError("ecospa= must be the EcoSpa built on the model being loaded into")
    if not (isinstance(section, dict) and isinstance(section.get("state"), dict)):
        raise CheckpointError(f"{where}: ecospa.state is missing; the checkpoint is damaged, save it again")
    state = decode(section["state"], tensors, f"{where}: ecospa.state")
    for key in ("steps", "rounds"):
        if not is_int(state.get(key)) or state[key] < 0:
            raise CheckpointError(f"{where}: ecospa.state.{key} should be a non-negative int, got "
                                  f"{state.get(key)!r}; the checkpoint is damaged, save it again")
    try:
        plan = Plan.from_dict(state.get("plan"))
    except EcospaError as e:
        raise CheckpointError(f"{where}: ecospa.state.plan: {e}") from None
    saved_config = section.get("config")
    if isinstance(saved_config, dict):
        now = dataclasses.asdict(sp.config)
        diff = sorted(k for k in now if k in saved_config and saved_config[k] != now[k])
        if diff:
            warnings.warn("resuming EcoSpa with other settings than it was saved with: "
                          + ", ".join(f"{k}={now[k]!r} (saved {saved_config[k]!r})" for k in diff),
                          stacklevel=3)
    if sp.plan.steps:
        if sp.plan != plan:
            raise CheckpointError(f"{where}: this EcoSpa has already pruned along another plan; build "
                                  "the model and EcoSpa afresh, then load")
        expected = param_records(model)
    else:
        expected = _plan_records(model, plan, _couplings(sp, example_inputs, state, where), where)
    if not same_records(expected, saved_records):
        raise CheckpointError(f"{where}: EcoSpa's saved plan does not produce the model's saved removals "
                              "(the model was also pruned outside EcoSpa?); load without ecospa=")
    _check_statistics(state.get("importance"), sp, shapes, where)
    return EcoSpaState(state, plan)


def _check_statistics(imp: Any, sp, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    if imp is None:
        return
    acc = imp.get("acc") if isinstance(imp, dict) else None
    if not (isinstance(acc, dict) and is_int(imp.get("num_batches"))):
        raise CheckpointError(f"{where}: ecospa.state.importance is malformed; save the checkpoint again")
    have = sp.importance.state_dict()["acc"]
    for stat, entries in acc.items():
        if stat not in have or not isinstance(entries, dict):
            raise CheckpointError(f"{where}: EcoSpa statistic {stat!r} was saved but this EcoSpa keeps "
                                  f"{sorted(have)}; build EcoSpa with the saved coupling/unit scores")
        for key, v in entries.items():
            name, _, dim = key.rpartition(":")
            if key not in have[stat] or not dim.isdigit() or name not in shapes:
                raise CheckpointError(f"{where}: EcoSpa statistic {stat}[{key!r}] matches no tracked "
                                      "parameter of this EcoSpa; the checkpoint belongs to another model")
            want = (shapes[name][int(dim)],)
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != want:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise CheckpointError(f"{where}: EcoSpa statistic {stat}[{key!r}] is {got}, expected "
                                      f"shape {want}; the checkpoint belongs to another model")


def restore_ecospa(sp, saved: EcoSpaState) -> None:
    """``sp.load_state_dict``: replays the plan on the model and optimizer, restores counters,
    events and statistics."""
    sp.load_state_dict(saved.state)
