"""A model's ``state_dict`` as safetensors: tied tensors stored once, checked before loading.

safetensors refuses two names for one storage (GPT-2 and nanoGPT share ``wte.weight`` and
``lm_head.weight``). :func:`split_state` keeps the first key of every group of identical tensors
and lists the others as aliases (written to the manifest); :func:`load_weights` gives every alias
its tensor back, so every key is written.

The keys and tensors are the module's own (:func:`module_state`): every module's parameters and
persistent buffers (and extra state) under their ``state_dict`` keys, collected without running
``state_dict`` hooks, and written back without ``load_state_dict`` hooks. Such hooks convert
between layouts at the sizes the module was built with (torchtitan's fused ``wqkv`` is saved as
``wq``/``wk``/``wv``, split by the dense head counts), which a pruned module no longer has; the
checkpoint is read back by ``ecospa.load`` only, onto a model of the same class with the same
removals replayed, so its own layout is the one to store.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from ecospa.errors import CheckpointError

__all__ = ["split_state", "module_state", "expected_shapes", "check_weights", "load_weights", "uniform_float_dtype"]

_EXTRA = "_extra_state"  # the key suffix nn.Module gives extra state


def _slots(model: nn.Module) -> dict[str, tuple[nn.Module, str, str]]:
    """``{state_dict key: (owner module, "_parameters" | "_buffers" | "extra", attribute)}`` in
    ``state_dict`` order (module by module, parameters then persistent buffers then extra state,
    shared modules under every path), without hooks or ``_save_to_state_dict`` overrides."""
    out: dict[str, tuple[nn.Module, str, str]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for name, p in mod._parameters.items():
            if p is not None:
                out[prefix + name] = (mod, "_parameters", name)
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                out[prefix + name] = (mod, "_buffers", name)
        if type(mod).get_extra_state is not nn.Module.get_extra_state:
            out[prefix + _EXTRA] = (mod, "extra", _EXTRA)
    return out


def module_state(model: nn.Module, *, keep_vars: bool = False) -> dict[str, object]:
    """What ``model.state_dict()`` holds before any state-dict hook runs: ``{key: tensor}`` of every
    parameter and persistent buffer (detached unless ``keep_vars``), and each module's extra
    state (``get_extra_state()``), under the same keys (see the module docstring)."""
    out: dict[str, object] = {}
    for key, (mod, store, name) in _slots(model).items():
        if store == "extra":
            out[key] = mod.get_extra_state()
        else:
            t = getattr(mod, store)[name]
            out[key] = t if keep_vars else t.detach()
    return out


def _identity(t: torch.Tensor) -> tuple:
    return (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors to store, {alias key: stored key})`` of :func:`module_state`.

    Raises:
        CheckpointError: a tensor on the meta device (it has no values to save).
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for key, t in module_state(model).items():
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
    for key, t in module_state(model, keep_vars=True).items():
        if not isinstance(t, torch.Tensor):
            continue  # extra state that is not a tensor: split_state refused to save it
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
    """Copy every stored tensor into the parameter or buffer of its key (an alias: its stored
    key's tensor; extra state through ``set_extra_state``), without ``load_state_dict`` hooks.
    Call it under ``torch.no_grad()`` once :func:`check_weights` passed."""
    for key, (mod, store, name) in _slots(model).items():
        value = tensors[aliases.get(key, key)]
        if store == "extra":
            mod.set_extra_state(value)
        else:
            getattr(mod, store)[name].copy_(value)


def uniform_float_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The floating dtype shared by every floating tensor, or None when they differ (or none)."""
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None
