"""The decode lane: a call that repeats the last one's signature skips the lookup.

A decode loop calls each pruned attention module step after step with arguments of one
structure. At batch 1 a step's narrow graph is a few dozen small ops, and the full lookup of a
call (finding a cache among the arguments, the call's :func:`~ecospa.narrow.program.signature`,
the search of the signature's variants) costed a fifth of it, measured in a whole ``generate()``
(SmolLM2-135M shape, 1 CPU thread: 66 us of Python per attention call beside a 244 us graph).

:func:`fingerprint` computes, in one pass over the arguments, a flat key that is equal for two
calls only where their signatures are equal: every property a signature holds (argument
structure and keyword order, constant values and types, tensor rank/dtype/device/class/
requires_grad/stride order, which arguments share storage, grad mode, default dtype, autocast,
the scope's train/eval flags; the hooks are the :class:`Lane`'s to compare). It covers the calls
a decode loop makes (tensors, plain values, the cache, plain tuples and lists of those, plain
dataclasses such as x-transformers' cache) and gives up (None) on anything else, which then
takes the full lookup. A :class:`Lane` remembers the key of the last call a region served, with
the entry that served it; the next call with an equal key is served by that entry where the
entry's own checks pass as the full lookup would make them: its guard for these input shapes
(remembered per shapes, ``Entry.fits``; a past that grows step by step is a new shape each
step), the module state its capture read, and for a cache (:class:`CachedLane`, ``CachedGraphs
.lane``) the same cache object and layer, still a decode step, the layer stored at the entry's
layout and the past length within the graph's range.
"""
from __future__ import annotations

import dataclasses
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

_MODULE = sys.modules[nn.Module.__module__]  # torch.nn.modules.module: the global hook tables

from ecospa.narrow.program import hooks_of, stride_order

__all__ = ["Lane", "CachedLane", "fingerprint", "MISS", "NO_CACHE"]

_CACHE = object()  # the cache's place in a key
MISS = object()  # what ``CachedGraphs.lane`` returns when the lane does not serve the call
NO_CACHE = object()  # the ``cache`` of :func:`fingerprint` for a call without one
_PLAIN = frozenset((type(None), bool, int, float, str, torch.dtype, torch.device, torch.memory_format, torch.layout))


def fingerprint(args: tuple, kwargs: dict, cache: Any,
                modules: Sequence[nn.Module]) -> tuple[tuple, list[torch.Tensor]] | None:
    """``(key, tensors)`` of a call with ``cache`` among its arguments, or None for a call it
    does not cover (a module, a dict, nested containers, a dataclass holding more than plain
    fields: the full lookup serves it). A plain dataclass (x-transformers' ``Intermediates``)
    counts as its class, its field names and its fields, as the signature flattens it
    (``capture/datafields.py``).

    Args:
        args, kwargs: the call's arguments.
        cache: the cache object (its place is marked in the key; its contents are not read).
        modules: the scope's subtree (train/eval flags). (The hooks, the rest of a signature,
            are the :class:`Lane`'s to check: :meth:`Lane.same_hooks`.)

    Returns:
        the key, and the tensor arguments in the order :func:`~ecospa.narrow.program.signature`
        gives them (pytree's: positional, then keyword in the call's order, tuples in order).
    """
    key: list[Any] = [len(args), tuple(kwargs)]
    tensors: list[torch.Tensor] = []
    stores: dict[int, int] = {}
    for v in (*args, *kwargs.values()):
        kind = type(v)
        if v is None:  # (alone: every other plain value is a (type, value) pair)
            key.append(None)
        elif v is cache:
            key.append(_CACHE)
        elif isinstance(v, torch.Tensor):
            key.append(_tensor(v, tensors, stores))
        elif kind in _PLAIN:
            key.append((kind, v))
        elif kind is tuple or kind is list:
            key.append((kind, len(v)))
            if not _items(v, key, tensors, stores):
                return None
        elif hasattr(kind, "__dataclass_fields__"):  # a plain dataclass (x-transformers' cache)
            names = _field_names(v)
            if names is None:
                return None
            key.append((kind, names))
            try:
                fields = [getattr(v, n) for n in names]
            except AttributeError:  # a field never set
                return None
            for x in fields:
                if type(x) is tuple:
                    key.append((tuple, len(x)))
                    if not _items(x, key, tensors, stores):
                        return None
                elif not _items((x,), key, tensors, stores):
                    return None
        else:
            return None
    autocast = None
    if _any_autocast():
        dev = tensors[0].device.type if tensors else "cpu"
        autocast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    key += (torch.is_grad_enabled(), torch.get_default_dtype(), autocast, *[m.training for m in modules])
    return tuple(key), tensors


def _items(values, key: list, tensors: list, stores: dict) -> bool:
    """Add tensors and plain values to a key; False at anything else (a nested container)."""
    for x in values:
        if isinstance(x, torch.Tensor):
            key.append(_tensor(x, tensors, stores))
        elif type(x) in _PLAIN:
            key.append((type(x), x))
        else:
            return False
    return True


_FIELDS: dict[type, tuple[str, ...]] = {}


def _field_names(obj: Any) -> tuple[str, ...] | None:
    """The field names of a dataclass instance holding nothing but its fields (the signature
    refuses one with other attributes), or None."""
    kind = type(obj)
    names = _FIELDS.get(kind)
    if names is None:
        names = _FIELDS[kind] = tuple(f.name for f in dataclasses.fields(kind))
    extra = getattr(obj, "__dict__", None)
    if extra is not None and (len(extra) > len(names) or any(k not in names for k in extra)):
        return None
    return names


def _any_autocast() -> bool:
    """True unless autocast is off for every device (one call where torch has it)."""
    probe = getattr(torch._C, "_is_any_autocast_enabled", None)
    return True if probe is None else probe()


def _tensor(t: torch.Tensor, tensors: list, stores: dict) -> tuple:
    """One tensor's part of a key, as a signature has it: rank, dtype, device, class,
    requires_grad, the order of its strides when not contiguous, and the index of the first
    tensor argument sharing its storage."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (subclasses): by identity
        ptr = id(t)
    n = len(tensors)
    tensors.append(t)
    return (t.dim(), t.dtype, t.device, type(t), t.requires_grad,
            None if t.is_contiguous() else stride_order(t), stores.setdefault(ptr, n) if ptr else n)


@dataclass(frozen=True)
class Lane:
    """The last call a region served by a narrow graph, for the next: :meth:`serves` says
    whether a new call's :func:`fingerprint` lets the same entry serve it (the plain path of
    ``RegionForward``; :class:`CachedLane` adds the cache's own checks)."""

    key: tuple  # fingerprint of the call
    entries: dict  # the region's entries then (a new dict when the region forgets its graphs)
    entry: Any  # the Entry that served it
    hooks: tuple  # ``program.hooks_of`` the scope's hook modules then
    hook_tables: tuple  # the hook dicts read for it (global and per module), all empty or ()

    @staticmethod
    def hooks_now(hook_modules: Sequence[nn.Module]) -> tuple[tuple, tuple]:
        """``(hooks, tables)`` for a new lane: the modules' hooks and, where there are none, the
        hook dicts whose staying empty :meth:`same_hooks` checks (torch adds and removes hooks in
        these dicts in place)."""
        hooks = hooks_of(hook_modules)
        if any(hooks):
            return hooks, ()
        tables = [getattr(_MODULE, "_global_forward_pre_hooks", {}), getattr(_MODULE, "_global_forward_hooks", {})]
        for m in hook_modules:
            tables += (m._forward_pre_hooks, m._forward_hooks)
        return hooks, tuple(tables)

    def same_hooks(self, hook_modules: Sequence[nn.Module]) -> bool:
        """True while the hooks a signature holds are those the lane's call had."""
        if self.hook_tables:
            return not any(self.hook_tables)
        return hooks_of(hook_modules) == self.hooks

    def serves(self, found: tuple | None, entries: dict, hook_modules: Sequence[nn.Module]) -> bool:
        """True when a call of fingerprint ``found`` has the lane's signature (the same key and
        hooks) and its entry is still among the region's ``entries`` with its graph. (The
        entry's guard and module state are for the caller to check: ``Entry.fits``,
        ``Entry.state_ok``.)"""
        return (found is not None and found[0] == self.key and entries is self.entries
                and self.entry.gm is not None and self.same_hooks(hook_modules))


@dataclass(frozen=True)
class CachedLane(Lane):
    """A :class:`Lane` of a call with a cache (``CachedGraphs.lane``), with where the cache was
    passed, the layer it read and wrote, and whether that was a prefill. Weak references to the
    cache and its layer: a finished ``generate()`` frees both (and the keys and values the layer
    holds)."""

    slot: int | str = 0  # where the cache was: a positional index or a keyword
    outer: weakref.ref | None = None  # the cache object passed
    layer: weakref.ref | None = None  # its layer for the module
    prefill: bool = False  # the layer was empty (the call was a prefill)

    def cache_of(self, args: tuple, kwargs: dict) -> Any:
        """The cache a new call passes at the lane's slot if it is the lane's, else None."""
        slot, outer = self.slot, self.outer()
        if type(slot) is str:
            got = kwargs.get(slot)
        else:
            got = args[slot] if slot < len(args) else None
        return outer if got is outer and outer is not None else None

    @staticmethod
    def slot_of(cache: Any, args: tuple, kwargs: dict) -> int | str | None:
        """The position or keyword at which ``cache`` is passed (None: not at the top level)."""
        for i, v in enumerate(args):
            if v is cache:
                return i
        for k, v in kwargs.items():
            if v is cache:
                return k
        return None
