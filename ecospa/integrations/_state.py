"""EcoSpa's state next to a checkpoint, without pickle: ``ecospa_state.json`` (plan, counters,
parameter shapes, how the tensors nest) and ``ecospa_state.safetensors`` (the Eq. 6 statistics
and, for models given no example inputs, the recorded inputs of the first forward)."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import torch

__all__ = ["STATE_JSON", "STATE_TENSORS", "save_state", "load_state", "state_to_files", "state_from_files"]

STATE_JSON = "ecospa_state.json"
STATE_TENSORS = "ecospa_state.safetensors"
FORMAT = "ecospa-state"
VERSION = 1

log = logging.getLogger("ecospa")


class _NotSerialisable(Exception):
    pass


def _flatten(x, key: str, tensors: dict[str, torch.Tensor]):
    """JSON spec of a nest of tuples/lists/dicts with tensor and JSON-scalar leaves."""
    if isinstance(x, torch.Tensor):
        tensors[key] = x.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(x, dict):
        if not all(isinstance(k, str) for k in x):
            raise _NotSerialisable(f"dict with non-string keys at {key}")
        return {"dict": {k: _flatten(v, f"{key}/{k}", tensors) for k, v in x.items()}}
    if type(x) in (tuple, list):
        return {type(x).__name__: [_flatten(v, f"{key}/{i}", tensors) for i, v in enumerate(x)]}
    if x is None or isinstance(x, (bool, int, float, str)):
        return {"value": x}
    raise _NotSerialisable(f"{type(x).__name__} at {key}")


def _unflatten(spec, tensors: Mapping[str, torch.Tensor]):
    (kind, v), = spec.items()
    if kind == "tensor":
        return tensors[v]
    if kind == "dict":
        return {k: _unflatten(s, tensors) for k, s in v.items()}
    if kind == "tuple":
        return tuple(_unflatten(s, tensors) for s in v)
    if kind == "list":
        return [_unflatten(s, tensors) for s in v]
    return v


def state_to_files(state: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]] | None = None,
                   extra: Mapping[str, Any] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``EcoSpa.state_dict()`` as ``(JSON data, {name: tensor})``."""
    tensors: dict[str, torch.Tensor] = {}
    data: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    for k, v in state.items():
        if k in ("importance", "inputs"):
            continue
        data[k] = v
    imp = state.get("importance")
    data["importance"] = None if imp is None else {
        "num_batches": int(imp["num_batches"]),
        "acc": {s: _flatten(dict(acc), f"importance/{s}", tensors)["dict"] for s, acc in imp["acc"].items()}}
    data["inputs"] = None
    if state.get("inputs") is not None:
        try:
            data["inputs"] = _flatten(state["inputs"], "inputs", tensors)
        except _NotSerialisable as e:
            tensors = {k: v for k, v in tensors.items() if not k.startswith("inputs")}
            log.warning("ecospa: the recorded example inputs cannot be saved without pickle (%s); "
                        "a resumed run needs example_inputs=...", e)
    if shapes is not None:
        data["shapes"] = {n: list(s) for n, s in shapes.items()}
    if extra:
        data["extra"] = dict(extra)
    return data, tensors


def state_from_files(data: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict:
    """Inverse of :func:`state_to_files`: an ``EcoSpa.load_state_dict`` argument."""
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ValueError(f"not an ecospa state (format {data.get('format')!r}, version {data.get('version')!r})")
    state = {k: v for k, v in data.items() if k not in ("format", "version", "shapes", "extra")}
    imp = data.get("importance")
    state["importance"] = None if imp is None else {
        "num_batches": imp["num_batches"],
        "acc": {s: _unflatten({"dict": spec}, tensors) for s, spec in imp["acc"].items()}}
    state["inputs"] = _unflatten(data["inputs"], tensors) if data.get("inputs") is not None else None
    return state


def save_state(sp, folder: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> None:
    """Write ``sp.state_dict()`` (and the model's parameter shapes) into ``folder``."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    shapes = {n: tuple(p.shape) for n, p in sp.model.named_parameters()}
    data, tensors = state_to_files(sp.state_dict(), shapes, extra)
    save_file(tensors, os.path.join(folder, STATE_TENSORS))
    tmp = os.path.join(folder, STATE_JSON + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, os.path.join(folder, STATE_JSON))


def read_json(folder: str | os.PathLike) -> dict | None:
    """The JSON part of a saved state in ``folder``, or None when there is none."""
    path = os.path.join(folder, STATE_JSON)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_state(folder: str | os.PathLike) -> dict:
    """What :func:`save_state` wrote, as an ``EcoSpa.load_state_dict`` argument (CPU tensors)."""
    from safetensors.torch import load_file

    data = read_json(folder)
    if data is None:
        raise FileNotFoundError(f"no {STATE_JSON} in {folder}")
    tpath = os.path.join(folder, STATE_TENSORS)
    tensors = load_file(tpath) if os.path.isfile(tpath) else {}
    return state_from_files(data, tensors)
