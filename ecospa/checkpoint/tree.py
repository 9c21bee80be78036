"""JSON with tensors: nested state (optimizer state, EcoSpa state, user extras) as JSON text plus
a flat ``{key: tensor}`` dict for a safetensors file, and back. No pickle.

In the JSON, a tensor is ``{"__tensor__": key}`` (its key in the tensor file) and a tuple is
``{"__tuple__": [...]}`` so that tuples (Adam's ``betas``) come back as tuples. Dict keys must be
strings. Everything else is plain JSON: ``None``, bools, ints, floats (NaN and infinities
included, as Python's ``json`` writes them), strings, lists.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
import torch

from ecospa.errors import CheckpointError

__all__ = ["encode", "decode", "references", "parse_json", "dump_json", "is_int", "is_number"]

TENSOR, TUPLE = "__tensor__", "__tuple__"


def encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON data; every tensor goes into ``tensors`` under a key derived from ``path``.

    Raises:
        CheckpointError: a value that is neither JSON data nor a tensor (the message gives its path).
    """
    if isinstance(value, torch.Tensor):
        key, i = path, 1
        while key in tensors:
            i += 1
            key = f"{path}#{i}"
        tensors[key] = value.detach()
        return {TENSOR: key}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, tuple):
        return {TUPLE: [encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"cannot save {path}: dict key {k!r} is a {type(k).__name__}; "
                                      "checkpoints hold JSON, whose keys are strings")
            out[k] = encode(v, f"{path}/{k}", tensors)
        if len(out) == 1 and next(iter(out)) in (TENSOR, TUPLE):
            raise CheckpointError(f"cannot save {path}: a dict whose only key is {next(iter(out))!r} "
                                  "(reserved by the checkpoint format); rename the key")
        return out
    raise CheckpointError(f"cannot save {path}: a {type(value).__name__} is neither JSON data nor a "
                          "tensor (checkpoints never pickle); convert it to tensors, numbers, "
                          "strings, lists and dicts")


def decode(value: Any, tensors: Mapping[str, torch.Tensor], where: str) -> Any:
    """Inverse of :func:`encode`: tensor references looked up in ``tensors``.

    Raises:
        CheckpointError: a reference to a tensor that is not there, or a malformed marker.
    """
    if isinstance(value, list):
        return [decode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if len(value) == 1 and TENSOR in value:
            key = value[TENSOR]
            if not isinstance(key, str) or key not in tensors:
                raise CheckpointError(f"{where}: refers to tensor {key!r}, which the tensor file does "
                                      "not hold; the checkpoint is damaged, save it again")
            return tensors[key]
        if len(value) == 1 and TUPLE in value:
            items = value[TUPLE]
            if not isinstance(items, list):
                raise CheckpointError(f"{where}: a tuple marker holds a {type(items).__name__}, not a list")
            return tuple(decode(v, tensors, f"{where}[{i}]") for i, v in enumerate(items))
        return {k: decode(v, tensors, f"{where}.{k}") for k, v in value.items()}
    return value


def references(value: Any) -> set[str]:
    """Keys of every tensor referenced in encoded JSON data."""
    if isinstance(value, list):
        return set().union(*(references(v) for v in value)) if value else set()
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get(TENSOR), str):
            return {value[TENSOR]}
        return set().union(*(references(v) for v in value.values())) if value else set()
    return set()


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_json(data: bytes, where: str) -> Any:
    """Parse untrusted JSON bytes (UTF-8; duplicate keys refused).

    Raises:
        CheckpointError: not UTF-8, not JSON, nested too deeply, or duplicate keys.
    """
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: not valid JSON ({type(e).__name__}: {str(e)[:200]}); the file "
                              "is damaged or was not written by ecospa.save: save the checkpoint again") from None


def dump_json(value: Any) -> bytes:
    """``value`` as indented UTF-8 JSON (floats written exactly, NaN/Infinity allowed)."""
    return (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def is_int(x: Any) -> bool:
    """A JSON integer (not a bool)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """A JSON number (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)
