"""How the executor changes a model: a transaction (every change logged, undone on failure) and
the forwards of the modules whose channels changed.

Per module, from the sites of the pruned couplings (``Site``, decided by discovery):

- an ``nn.Linear`` whose channels vanish *compactly* (FFN, GLU, low-rank pairs) keeps its own
  forward; ``in_features``/``out_features`` are updated;
- any other linear-like module (GPT-2 ``Conv1D``, a custom ``x @ self.w``) gets a
  :class:`~ecospa.pruning.adapters.LinearAdapter`, since its own forward may use stale sizes;
- on a *scatter* side (attention: channels reshaped into heads) the adapter scatters the output
  back to the dense width (zeros where units were removed) or gathers the kept input channels,
  so that the model's own code in between runs unchanged;
- ``torch.nn.MultiheadAttention`` gets a :class:`~ecospa.pruning.adapters.MHAAdapter`;
- parameters used outside linear modules (``"direct"`` sites: raw ``nn.Parameter`` weights through
  ``einsum``/``@``) on a scatter side are shown to the model's code at their dense size by a
  :class:`~ecospa.pruning.adapters.DenseParamsForward` on the coupling's scope (the fallback of
  its narrow region).

Index tensors are non-persistent buffers computed from the removal record, so ``state_dict``
holds only the smaller weights under their usual names.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn

from ecospa.pruning.adapters import (IN_INDEX, OUT_INDEX, OUT_SRC, DenseParamsForward, LinearAdapter, MHAAdapter,
                                      source_index)
from ecospa.ir.record import ModuleRecord, ParamRecord, installed_forward, module_record
from ecospa.ir.coupling import Coupling

__all__ = ["Transaction", "update_forwards"]

_MISSING = object()


class Transaction:
    """Every change the executor makes to a model and an optimizer, undone by :meth:`rollback`
    (and automatically when the ``with`` block raises)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.model, self.optimizer = model, optimizer
        self._undo: list = []

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.rollback()
        return False

    def rollback(self) -> None:
        """Undo every change, newest first."""
        while self._undo:
            self._undo.pop()()

    # ------------------------------------------------------------------ primitives
    def set_item(self, store: dict, key, value) -> None:
        """``store[key] = value`` (``value`` ``_MISSING`` deletes), logged."""
        old = store.get(key, _MISSING)
        if value is _MISSING:
            store.pop(key, None)
        else:
            store[key] = value

        def undo():
            if old is _MISSING:
                store.pop(key, None)
            else:
                store[key] = old
        self._undo.append(undo)

    def set_attr(self, module: nn.Module, name: str, value) -> None:
        """A plain attribute of ``module`` (``in_features``, a flag), logged."""
        self.set_item(module.__dict__, name, value)

    def set_attr_of(self, obj, name: str, value) -> None:
        """A plain attribute of any object (an installed forward's bookkeeping), logged."""
        self.set_item(obj.__dict__, name, value)

    def set_forward(self, module: nn.Module, forward) -> None:
        """Install ``forward`` on ``module`` (None removes ecospa's), logged."""
        self.set_item(module.__dict__, "forward", _MISSING if forward is None else forward)

    def set_buffer(self, module: nn.Module, name: str, value: torch.Tensor | None) -> None:
        """A non-persistent buffer of ``module`` (None clears it), logged."""
        if name not in module._buffers:  # a new slot: registered here, unregistered on rollback
            module.register_buffer(name, None, persistent=False)

            def unregister():
                module._buffers.pop(name, None)
                module._non_persistent_buffers_set.discard(name)
            self._undo.append(unregister)
        self.set_item(module._buffers, name, value)

    def invalidate(self, forward) -> None:
        """``forward.invalidate()``: an installed forward forgets what it built for the old widths
        (a :class:`~ecospa.narrow.RegionForward`'s graphs); logged with the undo it
        returns, so that a rollback gives them back."""
        self._undo.append(forward.invalidate())

    def _record(self, module: nn.Module):
        """The removal record of ``module``, created if need be (removed again on rollback)."""
        mr = module_record(module)
        if mr is None:
            mr = module_record(module, create=True)
            self._undo.append(lambda: module.__dict__.pop("ecospa_record", None))
        return mr

    def set_record(self, module: nn.Module, attr: str, rec: ParamRecord) -> None:
        """The removal record of ``module``'s parameter ``attr``, logged."""
        self.set_item(self._record(module).params, attr, rec)

    def override(self, module: nn.Module, name: str, value) -> None:
        """Set attribute ``name`` of ``module``, remembering its original value in the record
        (``record.dense_view`` restores it), logged."""
        mr = self._record(module)
        if name not in mr.overridden:
            self.set_item(mr.overridden, name, getattr(module, name))
        self.set_attr(module, name, value)

    def slice_param(self, old: nn.Parameter, owners, keeps: Mapping[int, np.ndarray]) -> nn.Parameter:
        """Replace ``old`` in every owning module by its slice ``keeps`` (dim -> kept positions),
        with its gradient and its optimizer state; logged."""
        with torch.no_grad():
            new = nn.Parameter(_slice(old.data, keeps), requires_grad=old.requires_grad)
            if old.grad is not None:
                new.grad = _slice(old.grad, keeps)
        for mod, attr in owners:
            self.set_item(mod._parameters, attr, new)
        opt = self.optimizer
        if opt is not None:
            for group in opt.param_groups:
                for i, p in enumerate(group["params"]):
                    if p is old:
                        self.set_item(_ListView(group["params"]), i, new)
            state = opt.state.get(old)
            if state is not None:
                moved = {k: (_slice(v, keeps) if isinstance(v, torch.Tensor) and v.dim() > 0
                             and v.shape == old.shape else v) for k, v in state.items()}
                self.set_item(opt.state, old, _MISSING)
                self.set_item(opt.state, new, moved)
        return new


class _ListView:
    """A list seen as a dict of positions, for :meth:`Transaction.set_item`."""

    def __init__(self, items: list):
        self.items = items

    def get(self, key, default=None):
        return self.items[key]

    def __setitem__(self, key, value):
        self.items[key] = value

    def pop(self, key, default=None):  # never called: positions are only replaced
        raise TypeError("positions of a param group are replaced, not removed")


def _slice(t: torch.Tensor, keeps: Mapping[int, np.ndarray]) -> torch.Tensor:
    for dim, keep in keeps.items():
        t = t.index_select(dim, torch.as_tensor(keep, device=t.device))
    return t.contiguous()


def _module_sides(resolved: Mapping[Coupling, np.ndarray]) -> dict[str, dict]:
    """Per module path: adapter kind, transposed, and per side (``"out"``/``"in"``) the
    ``(param, dim)`` and layout of the channels pruned now."""
    mods: dict[str, dict] = defaultdict(dict)
    for c in resolved:
        for s in c.sites:
            if s.role == "direct":
                continue
            info = mods[s.module]
            info.setdefault("kind", "mha" if s.role == "mha" else "linear")
            info.setdefault("transposed", s.transposed)
            if s.role == "mha":
                side = "in" if s.dim == 1 and not s.param.endswith("in_proj_weight") else "out"
                if s.param.endswith("in_proj_bias"):
                    continue
            elif s.role == "bias":
                info["bias"] = s.param
                continue
            else:
                side = s.role
            prev = info.get(side)
            layout = "scatter" if s.layout == "scatter" or (prev and prev[2] == "scatter") else "compact"
            info[side] = (s.param, s.dim, layout)
    return mods


def _attr(path: str, name: str) -> str:
    return name[len(path) + 1:] if path else name


def _bias_attr(module: nn.Module, weight_attr: str, bias: str | None, path: str) -> str | None:
    if bias is not None:
        return _attr(path, bias)
    for name, p in module.named_parameters(recurse=False):
        if name != weight_attr and p.dim() == 1:
            return name
    return None


def _index(rec: ModuleRecord | None, attr: str, dim: int, device) -> torch.Tensor | None:
    r = rec.params.get(attr) if rec is not None else None
    if r is None or dim not in r.kept:
        return None
    return torch.as_tensor(r.kept[dim], dtype=torch.long, device=device)


def _update_linear(module: nn.Module, path: str, info: dict, tx: Transaction) -> None:
    side = info.get("out") or info.get("in")
    w_attr = _attr(path, side[0])
    transposed = info["transposed"]
    scatter_out = info.get("out", (None, None, "compact"))[2] == "scatter"
    scatter_in = info.get("in", (None, None, "compact"))[2] == "scatter"
    w = getattr(module, w_attr)
    if isinstance(module, nn.Linear) and not transposed:
        tx.set_attr(module, "out_features", w.shape[0])
        tx.set_attr(module, "in_features", w.shape[1])
    adapter = installed_forward(module)
    if adapter is None and not (scatter_out or scatter_in or transposed or not isinstance(module, nn.Linear)):
        return
    rec = module_record(module)
    out_dim = 1 if transposed else 0
    if not isinstance(adapter, LinearAdapter):
        dense = rec.params[w_attr].dense_shape if rec and w_attr in rec.params else tuple(w.shape)
        adapter = LinearAdapter(module, w_attr, _bias_attr(module, w_attr, info.get("bias"), path),
                                transposed, dense[out_dim])
        tx.set_forward(module, adapter)
    if scatter_out:
        idx = _index(rec, w_attr, out_dim, w.device)
        tx.set_buffer(module, OUT_INDEX, idx)
        tx.set_buffer(module, OUT_SRC, None if idx is None else source_index(idx, adapter.out_full))
    if scatter_in:
        tx.set_buffer(module, IN_INDEX, _index(rec, w_attr, 1 - out_dim, w.device))


def _update_mha(module: nn.MultiheadAttention, tx: Transaction) -> None:
    if not isinstance(installed_forward(module), MHAAdapter):
        tx.override(module, "_qkv_same_embed_dim", False)  # off: fused fast paths read raw weights
        tx.set_forward(module, MHAAdapter(module))
    dev = module.in_proj_weight.device
    tx.set_buffer(module, OUT_INDEX, _index(module_record(module), "in_proj_weight", 0, dev))
    tx.set_buffer(module, IN_INDEX, _index(module_record(module.out_proj), "weight", 1, dev))


def update_forwards(model: nn.Module, resolved: Mapping[Coupling, np.ndarray], tx: Transaction, *,
                    narrow: bool | str = True) -> None:
    """Install or update the forwards of every module whose channels ``resolved`` changed (the
    parameters are already sliced and the record updated): adapters of linear-like modules, and,
    with ``narrow``, a :class:`~ecospa.narrow.RegionForward` on the scope of every
    coupling that is not compact (its narrow graphs are built at the next call); ``narrow="grouped"``
    runs ragged heads grouped by width instead of padded."""
    modules = dict(model.named_modules())
    for path, info in _module_sides(resolved).items():
        mod = modules.get(path)
        if mod is None:
            from ecospa.errors import PruneError

            raise PruneError(f"module {path!r} of the removal is not in the model")
        if info["kind"] == "mha":
            _update_mha(mod, tx)
        else:
            _update_linear(mod, path, info, tx)
    _update_direct(modules, resolved, tx)
    if narrow:
        _update_regions(model, modules, resolved, tx, group_heads=narrow == "grouped")


def _update_direct(modules, resolved, tx: Transaction) -> None:
    """A :class:`DenseParamsForward` on the scope of every coupling that slices a ``"direct"``
    parameter on a scatter side (added to the one installed there, or to the fallback of the
    scope's narrow region)."""
    from ecospa.narrow import RegionForward

    wanted: dict[str, dict[str, set[int]]] = defaultdict(dict)
    for c in resolved:
        for s in c.sites:
            if s.role == "direct" and s.layout == "scatter":
                wanted[c.scope].setdefault(_attr(c.scope, s.param), set()).add(s.dim)
    for path, params in sorted(wanted.items()):
        mod = modules.get(path)
        if mod is None:
            continue
        fwd = installed_forward(mod)
        holder = fwd.fallback if isinstance(fwd, RegionForward) else fwd
        if isinstance(holder, DenseParamsForward):
            merged = {n: frozenset(holder.params.get(n, frozenset()) | params.get(n, set()))
                      for n in set(holder.params) | set(params)}
            tx.set_attr_of(holder, "params", merged)
            continue
        new = DenseParamsForward(mod, {n: frozenset(d) for n, d in params.items()}, inner=holder)
        if isinstance(fwd, RegionForward):
            tx.set_attr_of(fwd, "fallback", new)
        else:
            tx.set_forward(mod, new)


def _update_regions(model: nn.Module, modules, resolved, tx: Transaction, *, group_heads: bool = False) -> None:
    from ecospa.narrow import ProgramCache, RegionForward

    scopes: dict[str, set[str]] = {}
    for c in resolved:
        if any(s.layout == "scatter" for s in c.sites):
            scopes.setdefault(c.scope, set()).add(c.name)
    cache = next((f.cache for m in model.modules() if isinstance(f := installed_forward(m), RegionForward)),
                 None) or ProgramCache()
    for path in sorted(scopes):
        mod = modules.get(path)
        if mod is None:
            continue
        fwd = installed_forward(mod)
        if not isinstance(fwd, RegionForward):
            fwd = RegionForward(mod, path, cache, fallback=fwd, group_heads=group_heads, root=model)
            tx.set_forward(mod, fwd)
        tx.set_attr_of(fwd, "couplings", frozenset(fwd.couplings | scopes[path]))
        if fwd.group_heads != group_heads:
            tx.set_attr_of(fwd, "group_heads", group_heads)
    for m in model.modules():  # a region containing the changed ones must rebuild too
        fwd = installed_forward(m)
        if isinstance(fwd, RegionForward):
            tx.invalidate(fwd)
