"""A model's ``state_dict`` as safetensors: tied tensors stored once, checked before loading.

safetensors refuses two names for one storage (GPT-2 and nanoGPT share ``wte.weight`` and
``lm_head.weight``). :func:`split_state` keeps the first key of every group of identical tensors
and lists the others as aliases (written to the manifest); :func:`load_weights` gives every alias
its tensor back, so ``load_state_dict(strict=True)`` sees every key.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from ecospa.errors import CheckpointError

__all__ = ["split_state", "expected_shapes", "check_weights", "load_weights", "uniform_float_dtype"]


def _identity(t: torch.Tensor) -> tuple:
    return (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors to store, {alias key: stored key})`` of ``model.state_dict()``.

    Raises:
        CheckpointError: a tensor on the meta device (it has no values to save).
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"state_dict entry {key!r} is a {type(t).__name__}, not a tensor; "
                                  "checkpoints hold tensors only (extra state: pass it as extra=)")
        if t.device.type == "meta":
            raise CheckpointError(f"{key} is on the meta device and has no values; load or "
                                  "initialise the weights before saving")
        ident = _identity(t)
        if ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
            tensors[key] = t
    return tensors, aliases


def expected_shapes(model: nn.Module, target: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shape of every ``state_dict`` key once the model has the parameter shapes ``target``
    (``{param name: shape}``, parameters named as in ``named_parameters()``)."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for key, t in model.state_dict(keep_vars=True).items():
        name = canonical.get(id(t))
        out[key] = tuple(target[name]) if name in target else tuple(t.shape)
    return out


def check_weights(where: str, tensors: Mapping[str, torch.Tensor], aliases: Mapping[str, str],
                  shapes: Mapping[str, tuple[int, ...]], model_name: str) -> None:
    """Every key of the model is stored (or an alias of a stored key) with the expected shape.

    Raises:
        CheckpointError: a missing or unexpected key, a dangling alias, a tensor of another shape.
    """
    have = set(tensors) | set(aliases)
    missing = sorted(set(shapes) - have)
    extra = sorted(have - set(shapes))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)})")
        if extra:
            parts.append(f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''} ({len(extra)})")
        raise CheckpointError(f"{where} does not match this {model_name}: {'; '.join(parts)}; load it "
                              "into a model built like the one that was saved (same class and config)")
    for alias, key in aliases.items():
        if key not in tensors:
            raise CheckpointError(f"{where}: {alias!r} is an alias of {key!r}, which is not stored; "
                                  "the checkpoint is damaged: save it again")
    for key in sorted(shapes):
        stored = tensors[aliases.get(key, key)]
        if tuple(stored.shape) != tuple(shapes[key]):
            raise CheckpointError(f"{where}: {key} has shape {tuple(stored.shape)}, this {model_name} "
                                  f"needs {tuple(shapes[key])} after replaying the removals; the "
                                  "checkpoint was saved from a model of another size or config")


def load_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> None:
    """``model.load_state_dict(strict=True)`` with every alias pointing to its stored tensor."""
    state = dict(tensors)
    for alias, key in aliases.items():
        state[alias] = tensors[key]
    model.load_state_dict(state, strict=True)


def uniform_float_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The floating dtype shared by every floating tensor, or None when they differ (or none)."""
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None
