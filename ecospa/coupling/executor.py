"""The executor: the only code that mutates a model or an optimizer.

``prune(model, plan, optimizer)`` removes units of couplings in place, as a pass with a
contract: check the plan completely (nothing changes if anything is wrong), slice every
parameter once along every affected dimension, slice the optimizer state and gradients the same
way, then install or update the adapters of the modules whose channels changed
(``ecospa.coupling.adapters``). ``remaining(cg, plan)`` gives the couplings of the pruned model
without capturing it again.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn

from ecospa.coupling.adapters import IN_INDEX, OUT_INDEX, OUT_SRC, LinearAdapter, MHAAdapter, set_index, source_index
from ecospa.errors import PlanError
from ecospa.graph.discover import _CACHE_ATTR, auto_couple
from ecospa.graph.ir import Coupling, CouplingGraph, SliceTable

__all__ = ["prune", "resolve_plan", "remaining"]

Plan = Mapping[object, Iterable[int]]


def _couplings_for(model: nn.Module, couplings: CouplingGraph | None) -> CouplingGraph:
    if couplings is not None:
        return couplings
    cached = model.__dict__.get(_CACHE_ATTR)
    if cached is not None:
        return cached
    from ecospa.graph.capture import default_inputs

    if default_inputs(model) is None:
        raise PlanError(
            f"coupling names need the couplings of this {type(model).__name__}: call "
            "ecospa.auto_couple(model, example_inputs) first (prune then looks names up in it), "
            "or pass couplings=cg, or key the plan by Coupling objects"
        )
    return auto_couple(model)


def resolve_plan(model: nn.Module, plan: Plan, couplings: CouplingGraph | None = None) -> dict[Coupling, np.ndarray]:
    """Check ``plan`` against ``model``; return ``{Coupling: sorted unique unit indices}``.

    Raises:
        PlanError: unknown coupling name, inexact coupling, bad/duplicate/out-of-range index,
            or a coupling whose parameters no longer have the shapes it was found with.
    """
    if not isinstance(plan, Mapping):
        raise PlanError(f"a plan is a dict {{coupling or name: [unit indices]}}, got {type(plan).__name__}")
    cg = None
    out: dict[Coupling, np.ndarray] = {}
    for key, idx in plan.items():
        if isinstance(key, str):
            cg = cg or _couplings_for(model, couplings)
            c = cg[key]
        elif isinstance(key, Coupling):
            c = key
        else:
            raise PlanError(f"plan keys are Couplings or coupling names, got {type(key).__name__}: {key!r}")
        if not c.exact:
            raise PlanError(f"coupling {c.name!r} is not exact ({c.reason}); it cannot be removed")
        try:
            arr = np.asarray(list(idx))
        except TypeError:
            raise PlanError(f"units of {c.name!r} must be a list of ints, got {idx!r}") from None
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise PlanError(f"units of {c.name!r} must be ints, got {arr.tolist()!r}")
        arr = arr.astype(np.int64).ravel()
        if arr.size and (arr.min() < 0 or arr.max() >= c.width):
            bad = arr[(arr < 0) | (arr >= c.width)].tolist()
            raise PlanError(f"unit indices {bad} out of range for {c.name!r} (width {c.width})")
        if np.unique(arr).size != arr.size:
            dup = sorted({int(v) for v in arr if (arr == v).sum() > 1})
            raise PlanError(f"duplicate unit indices {dup} for {c.name!r}")
        if c in out:
            raise PlanError(f"coupling {c.name!r} appears twice in the plan")
        out[c] = np.sort(arr)
    params = dict(model.named_parameters())
    seen: dict[tuple[str, int], set] = defaultdict(set)
    for c, arr in out.items():
        for t in c.tables:
            p = params.get(t.param)
            if p is None:
                raise PlanError(f"coupling {c.name!r} names parameter {t.param!r}, which the model "
                                "does not have: was the coupling found on another model?")
            if t.index.size and t.index.max() >= p.shape[t.dim]:
                raise PlanError(f"coupling {c.name!r} is stale: {t.param} has {p.shape[t.dim]} entries "
                                f"along dim {t.dim}, the coupling expects more. Call auto_couple again.")
            rm = set(t.index[np.isin(t.unit, arr)].tolist())
            clash = seen[(t.param, t.dim)] & rm
            if clash:
                raise PlanError(f"two couplings remove the same slices of {t.param} dim {t.dim}: {sorted(clash)[:5]}")
            seen[(t.param, t.dim)] |= rm
    return out


def _removed(resolved: Mapping[Coupling, np.ndarray]) -> dict[tuple[str, int], np.ndarray]:
    acc: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)
    for c, arr in resolved.items():
        for t in c.tables:
            acc[(t.param, t.dim)].append(t.index[np.isin(t.unit, arr)])
    return {k: np.unique(np.concatenate(v)) for k, v in acc.items()}


def _keep(size: int, removed: np.ndarray) -> np.ndarray:
    mask = np.ones(size, dtype=bool)
    mask[removed] = False
    return np.nonzero(mask)[0]


def _slice(t: torch.Tensor, keeps: dict[int, np.ndarray]) -> torch.Tensor:
    for dim, keep in keeps.items():
        t = t.index_select(dim, torch.as_tensor(keep, device=t.device))
    return t.contiguous()


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    out: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                out[id(p)].append((mod, name))
    return out


def _slice_optimizer(opt, old: nn.Parameter, new: nn.Parameter, keeps: dict[int, np.ndarray]) -> None:
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
    state = opt.state.pop(old, None)
    if state is None:
        return
    for k, v in list(state.items()):
        if isinstance(v, torch.Tensor) and v.shape == old.shape and v.dim() > 0:
            state[k] = _slice(v, keeps)
    opt.state[new] = state


def _module_sites(resolved) -> dict[str, dict]:
    """Per module: its adapter kind and the (param, dim) of its in/out channels."""
    mods: dict[str, dict] = {}
    for c in resolved:
        for s in c.sites:
            if s.role == "direct":
                continue
            info = mods.setdefault(s.module, {"layout": s.layout, "transposed": s.transposed,
                                              "kind": "mha" if s.role == "mha" else "linear"})
            if s.layout == "scatter":
                info["layout"] = "scatter"
            if s.role == "out" or (s.role == "mha" and s.dim == 0 and "in_proj" in s.param):
                info["out"] = (s.param, s.dim)
            elif s.role == "in" or (s.role == "mha" and s.dim == 1):
                info["in"] = (s.param, s.dim)
            elif s.role == "bias":
                info["bias"] = s.param
    return mods


def _compose(module: nn.Module, name: str, full: int, keep: np.ndarray) -> torch.Tensor:
    """New index (original layout) after keeping positions ``keep`` of the current one."""
    cur = module._buffers.get(name)
    base = cur.cpu().numpy() if cur is not None else np.arange(full)
    dev = next(iter(module.parameters())).device
    return torch.as_tensor(base[keep], device=dev, dtype=torch.long)


def prune(model: nn.Module, plan: Plan, optimizer: torch.optim.Optimizer | None = None, *,
          couplings: CouplingGraph | None = None) -> nn.Module:
    """Remove units of couplings from ``model`` in place and return it.

    Args:
        model: the model; the same object keeps its parameter names.
        plan: ``{coupling or coupling name: [unit indices]}``.
        optimizer: if given, its state for every sliced parameter (Adam moments, SGD momentum,
            anything shaped like the parameter) is sliced the same way, and its param groups
            point to the new tensors.
        couplings: where to look coupling names up (default: the last ``auto_couple`` of this
            model, or a fresh one for models that carry dummy inputs).

    Afterwards ``model(x)`` equals the dense model with the removed slices zeroed.

    Raises:
        PlanError: before anything changes, when the plan is not valid for this model.
    """
    resolved = resolve_plan(model, plan, couplings)
    resolved = {c: a for c, a in resolved.items() if a.size}
    if not resolved:
        return model
    removed = _removed(resolved)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    mod_sites = _module_sites(resolved)
    for path, info in mod_sites.items():
        if path not in modules:
            raise PlanError(f"module {path!r} of the plan is not in the model")
        if info["kind"] == "mha" and not isinstance(modules[path], nn.MultiheadAttention):
            raise PlanError(f"module {path!r} is not a MultiheadAttention")
    # --- from here on the model changes --------------------------------------------------
    owners = _owners(model)
    per_param: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for (pname, dim), rm in removed.items():
        per_param[pname][dim] = _keep(params[pname].shape[dim], rm)
    # adapters first need the original sizes
    for path, info in mod_sites.items():
        mod = modules[path]
        if info["kind"] == "mha":
            _update_mha(mod, info, per_param, params)
        else:
            _update_linear(mod, path, info, per_param, params)
    with torch.no_grad():
        for pname, keeps in per_param.items():
            old = params[pname]
            new = nn.Parameter(_slice(old.data, keeps), requires_grad=old.requires_grad)
            if old.grad is not None:
                new.grad = _slice(old.grad, keeps)
            for mod, attr in owners[id(old)]:
                mod._parameters[attr] = new
            if optimizer is not None:
                _slice_optimizer(optimizer, old, new, keeps)
    for path, info in mod_sites.items():
        mod = modules[path]
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
    cached = model.__dict__.get(_CACHE_ATTR)
    if cached is not None and all(any(c is d for d in cached.all) for c in resolved):
        model.__dict__[_CACHE_ATTR] = remaining(cached, resolved)
    return model


def _update_linear(mod, path, info, per_param, params) -> None:
    weight = info.get("out", info.get("in"))[0]
    attr_w = weight[len(path) + 1:] if path else weight
    bias = info.get("bias")
    if bias is None:
        for name, p in mod.named_parameters(recurse=False):
            if name != attr_w and p.dim() == 1:
                bias = f"{path}.{name}" if path else name
    attr_b = (bias[len(path) + 1:] if path else bias) if bias else None
    w = params[weight]
    out_dim = 1 if info["transposed"] else 0
    in_dim = 1 - out_dim
    keeps = per_param.get(weight, {})
    scatter = info["layout"] == "scatter"
    adapter = mod.__dict__.get("forward")
    needs = scatter or info["transposed"] or not isinstance(mod, nn.Linear) or isinstance(adapter, LinearAdapter)
    if not needs:
        return
    if not isinstance(adapter, LinearAdapter):
        adapter = LinearAdapter(mod, attr_w, attr_b, info["transposed"], w.shape[out_dim])
        mod.forward = adapter
        set_index(mod, IN_INDEX, None)
        set_index(mod, OUT_INDEX, None)
        set_index(mod, OUT_SRC, None)
    if out_dim in keeps:
        full = adapter.out_full
        if scatter or mod._buffers.get(OUT_INDEX) is not None:
            idx = _compose(mod, OUT_INDEX, full, keeps[out_dim])
            set_index(mod, OUT_INDEX, idx)
            set_index(mod, OUT_SRC, source_index(idx, full))
    if in_dim in keeps and (scatter or mod._buffers.get(IN_INDEX) is not None):
        set_index(mod, IN_INDEX, _compose(mod, IN_INDEX, w.shape[in_dim], keeps[in_dim]))


def _update_mha(mod: nn.MultiheadAttention, info, per_param, params) -> None:
    adapter = mod.__dict__.get("forward")
    if not isinstance(adapter, MHAAdapter):
        mod._qkv_same_embed_dim_orig = mod._qkv_same_embed_dim
        adapter = MHAAdapter(mod)
        mod.forward = adapter
        mod._qkv_same_embed_dim = False  # turns off fused fast paths that read raw weights
        set_index(mod, IN_INDEX, None)
        set_index(mod, OUT_INDEX, None)
    E = mod.embed_dim
    if "out" in info:
        keep = per_param[info["out"][0]].get(0)
        if keep is not None:
            set_index(mod, OUT_INDEX, _compose(mod, OUT_INDEX, 3 * E, keep))
    if "in" in info:
        keep = per_param[info["in"][0]].get(1)
        if keep is not None:
            set_index(mod, IN_INDEX, _compose(mod, IN_INDEX, E, keep))


def remaining(cg: CouplingGraph, plan: Mapping[Coupling, Iterable[int]]) -> CouplingGraph:
    """The couplings of the model after ``prune(model, plan)``, without capturing it again.

    Removed units disappear, indices are renumbered to the smaller tensors; names, kinds and
    order stay. ``plan`` maps Couplings (of ``cg``) or their names to unit indices.
    """
    resolved = {}
    for k, v in plan.items():
        c = cg[k] if isinstance(k, str) else k
        resolved[c] = np.asarray(sorted(v), dtype=np.int64)
    removed = _removed(resolved)
    out = []
    for c in cg.all:
        drop = resolved.get(c, np.zeros(0, dtype=np.int64))
        keep_units = _keep(c.width, drop)
        new_id = np.full(c.width, -1, dtype=np.int64)
        new_id[keep_units] = np.arange(keep_units.size)
        tables = []
        for t in c.tables:
            mask = new_id[t.unit] >= 0
            rm = removed.get((t.param, t.dim))
            idx = t.index[mask]
            if rm is not None:
                idx = idx - np.searchsorted(rm, idx)
            side = t.side[mask] if t.side is not None else None
            tables.append(SliceTable(t.param, t.dim, new_id[t.unit][mask], idx, side))
        out.append(Coupling(c.name, c.kind, c.exact, c.reason, int(keep_units.size), tuple(tables), c.sites))
    shapes = dict(cg.shapes)
    for (pname, dim), rm in removed.items():
        if pname in shapes:
            s = list(shapes[pname])
            s[dim] -= rm.size
            shapes[pname] = tuple(s)
    return CouplingGraph(out, shapes=shapes, include_inexact=cg.include_inexact)
