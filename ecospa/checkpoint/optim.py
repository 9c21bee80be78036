"""Optimizer state by parameter name: tensors in ``state.safetensors``, the rest in JSON.

The manifest's ``optimizer`` section::

    {"class": "AdamW",
     "param_groups": [{"params": ["h.0.attn.c_attn.weight", ...], "hyper": {"lr": 0.001,
                       "betas": {"__tuple__": [0.9, 0.999]}, ...}}],
     "state": {"h.0.attn.c_attn.weight": {"step": {"__tensor__": "optimizer/state/..."},
                                          "exp_avg": {"__tensor__": ...}, ...}}}

Parameters are named as in ``model.named_parameters()``, so the state goes back to the right
tensors of a freshly built (and replayed) model whatever the optimizer's internal numbering.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn

from ecospa.checkpoint.tree import decode, encode
from ecospa.errors import CheckpointError

__all__ = ["optimizer_to_json", "OptimizerState", "check_optimizer", "restore_optimizer"]


def _group_names(optimizer: torch.optim.Optimizer, model: nn.Module, what: str) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for i, g in enumerate(optimizer.param_groups):
        row = []
        for p in g["params"]:
            n = names.get(id(p))
            if n is None:
                raise CheckpointError(f"{what}: param group {i} of the {type(optimizer).__name__} holds a "
                                      f"tensor of shape {tuple(p.shape)} that is not a parameter of the "
                                      "model; checkpoints name optimizer state by model parameter names: "
                                      "build the optimizer on model.parameters()")
            row.append(n)
        out.append(row)
    return out


def optimizer_to_json(optimizer: torch.optim.Optimizer, model: nn.Module,
                      tensors: dict[str, torch.Tensor]) -> dict:
    """The ``optimizer`` section; its tensors are added to ``tensors``.

    Raises:
        CheckpointError: the optimizer holds tensors that are not parameters of ``model``, or
            state that is neither JSON data nor tensors.
    """
    groups = _group_names(optimizer, model, "cannot save the optimizer")
    sd = optimizer.state_dict()
    name_of = {}
    for names, g in zip(groups, sd["param_groups"]):
        name_of.update(zip(g["params"], names))
    return {
        "class": type(optimizer).__name__,
        "param_groups": [
            {"params": names, "hyper": encode({k: v for k, v in g.items() if k != "params"},
                                              f"optimizer/param_groups/{i}", tensors)}
            for i, (names, g) in enumerate(zip(groups, sd["param_groups"]))],
        "state": {name_of[idx]: encode(s, f"optimizer/state/{name_of[idx]}", tensors)
                  for idx, s in sd["state"].items()},
    }


@dataclass(frozen=True)
class OptimizerState:
    """A checked optimizer section: hyperparameters per group and state per parameter name."""

    groups: list[tuple[list[str], dict]]
    state: dict[str, dict]


def _fail(where: str, path: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{where}: optimizer.{path}: {problem}")


def check_optimizer(section: Any, tensors: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    model: nn.Module, shapes: Mapping[str, tuple[int, ...]], where: str) -> OptimizerState:
    """Check the saved optimizer section against ``optimizer`` and the parameter shapes the model
    will have (``shapes``); nothing is changed.

    Raises:
        CheckpointError: no optimizer saved, another optimizer class, other param groups, or a
            state tensor whose shape does not fit its parameter.
    """
    cls = type(optimizer).__name__
    if section is None:
        raise CheckpointError(f"{where}: the checkpoint holds no optimizer state (saved without "
                              "optimizer=); load without optimizer= and build the optimizer afterwards")
    if not isinstance(section, dict) or not isinstance(section.get("class"), str):
        raise _fail(where, "class", "missing; the checkpoint is damaged, save it again")
    if section["class"] != cls:
        raise CheckpointError(f"{where}: the optimizer state was saved from a {section['class']}, not a "
                              f"{cls}; build the same optimizer class to restore it")
    saved_groups, saved_state = section.get("param_groups"), section.get("state")
    if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
        raise _fail(where, "param_groups/state", "expected a list and an object; save the checkpoint again")
    current = _group_names(optimizer, model, where)
    if len(saved_groups) != len(current):
        raise CheckpointError(f"{where}: the optimizer was saved with {len(saved_groups)} param groups, "
                              f"this {cls} has {len(current)}; build it with the same groups")
    groups = []
    for i, (g, names) in enumerate(zip(saved_groups, current)):
        if not (isinstance(g, dict) and isinstance(g.get("params"), list)
                and all(isinstance(n, str) for n in g["params"]) and isinstance(g.get("hyper"), dict)):
            raise _fail(where, f"param_groups[{i}]", "expected {params: [names], hyper: {...}}")
        if set(g["params"]) != set(names) or len(g["params"]) != len(names):
            diff = sorted(set(g["params"]) ^ set(names))[:4]
            raise CheckpointError(f"{where}: param group {i} held other parameters when saved (differing: "
                                  f"{diff}); build the optimizer with the same parameter groups")
        hyper = decode(g["hyper"], tensors, f"{where}: optimizer.param_groups[{i}]")
        if "params" in hyper:
            raise _fail(where, f"param_groups[{i}].hyper", "must not hold 'params'")
        groups.append((list(g["params"]), hyper))
    held = {n for names in current for n in names}
    state = {}
    for name, s in saved_state.items():
        if name not in held or not isinstance(s, dict):
            raise _fail(where, f"state[{name!r}]", "state of a parameter the optimizer does not hold")
        s = decode(s, tensors, f"{where}: optimizer.state[{name!r}]")
        shape = shapes[name]
        for key, v in s.items():
            if isinstance(v, torch.Tensor) and v.dim() == len(shape) and v.numel() > 1 and any(
                    a != b and a != 1 for a, b in zip(v.shape, shape)):
                raise CheckpointError(f"{where}: optimizer state {key!r} of {name} has shape "
                                      f"{tuple(v.shape)}, the parameter will have {shape}; the checkpoint "
                                      "does not belong to this model")
        state[name] = s
    return OptimizerState(groups, state)


def restore_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, saved: OptimizerState) -> None:
    """Load a checked :class:`OptimizerState` into ``optimizer`` (after the removals are replayed,
    so its param groups hold the model's current parameters)."""
    current = _group_names(optimizer, model, "restoring the optimizer")
    index: dict[str, int] = {}
    for names in current:
        for n in names:
            index[n] = len(index)
    groups = [{**hyper, "params": [index[n] for n in names]}
              for (_, hyper), names in zip(saved.groups, current)]
    optimizer.load_state_dict({"state": {index[n]: dict(s) for n, s in saved.state.items()},
                               "param_groups": groups})
