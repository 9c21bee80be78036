"""The executor: the only code that mutates a model or an optimizer.

``prune_pass(model, removal, optimizer)`` removes units of couplings in place, as a pass with a
contract:

1. **check** everything first (:func:`resolve`, which never captures the model: a removal keyed
   by names, given no ``couplings=``, has them found by ``auto_couple`` just before): known couplings, exact ones only, indices in
   range and unique, stamps equal to the model's state (a stale coupling, or one found on a model
   in another state, is refused), an optimizer that holds the parameters it must slice;
2. **transform** as one transaction: slice every affected parameter once per dimension (with its
   gradient and optimizer state), update the removal record (``ecospa.ir.record``) and the
   forwards of the modules whose channels changed (``ecospa.pruning.transaction``); any failure
   undoes everything;
3. **check** the result: every parameter has the shape the plan implies; with ``verify=True`` the
   pruned model's outputs on the example inputs equal the dense model's with the removed slices
   zeroed, or the transaction is undone and :class:`~ecospa.PruneError` raised;
4. **return** what the caller needs next: a :class:`PruneResult` with the couplings of the pruned
   model. ``prune`` is the same pass returning the model (the public contract).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping, Union

import numpy as np
import torch
import torch.nn as nn

from ecospa.pruning.transaction import Transaction, update_forwards
from ecospa.ir.record import ParamRecord, module_record, param_records, state_of
from ecospa.analysis.renumber import renumber
from ecospa.pruning.steps import Step, as_steps, couplings_for, keyed_by_names
from ecospa.pruning.verify import masked_reference, outputs_match
from ecospa.errors import ConfigError, PlanError, PruneError
from ecospa.capture.sharded import refuse_sharded
from ecospa.export.guard import guard as guard_save_pretrained
from ecospa.ir.coupling import Coupling, CouplingGraph

__all__ = ["Removal", "PruneResult", "prune", "prune_pass", "resolve", "remaining", "check_optimizer"]

Removal = Mapping[Union[Coupling, str], Iterable[int]]
"""One removal: ``{coupling or coupling name: [unit indices]}``."""


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune_pass` did.

    Attributes:
        model: the pruned model (the same object).
        couplings: the couplings of the pruned model, renumbered (None when the removal was keyed
            by Coupling objects and no ``couplings=`` graph was given).
        removed: units removed per coupling name.
        params_before, params_after: parameter counts.
    """

    model: nn.Module
    couplings: CouplingGraph | None
    removed: dict[str, int]
    params_before: int
    params_after: int


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_model(model) -> None:
    """PlanError for a ``model`` that is not a module (``ecospa.prune("model.pt", ...)``)."""
    if not isinstance(model, nn.Module):
        raise PlanError(f"ecospa.prune's model should be a torch.nn.Module, got {type(model).__name__} "
                        f"{model!r:.40}: call ecospa.prune(model, removal)")


def _valid_range(c: Coupling) -> str:
    """Which unit indices ``c`` takes, or, once emptied, that it has none and what to do."""
    if c.width == 0:
        return ("the coupling has no units left (every unit was pruned): leave it out of the removal "
                "(a plan or EcoSpa with min_units >= 1 never empties a coupling)")
    return f"indices are 0..{c.width - 1}"


def _unit_list(c: Coupling, idx) -> np.ndarray:
    """``idx`` as a 1-D int64 array; PlanError naming ``c`` for anything that is not a flat
    collection of integers (bools, floats, strings, nested lists, dicts are refused, never
    coerced: numpy would turn ``[True, 2]`` into ``[1, 2]`` and flatten ``[[0, 1]]``)."""
    how = "a list of unit indices (ints), e.g. [0, 3]"
    if isinstance(idx, (torch.Tensor, np.ndarray)):
        arr = idx.detach().cpu().numpy() if isinstance(idx, torch.Tensor) else idx
        if arr.ndim != 1 or (arr.size and (arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer))):
            raise PlanError(f"units of {c.name!r} must be {how}; got a {arr.ndim}-D array of {arr.dtype}")
        return arr.astype(np.int64)
    if isinstance(idx, (str, bytes, Mapping)) or not isinstance(idx, Iterable):
        raise PlanError(f"units of {c.name!r} must be {how}; got {type(idx).__name__} {idx!r:.60}")
    out = []
    for x in idx:
        if isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim == 0:
            x = x.item() if isinstance(x, torch.Tensor) else x[()]
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
            raise PlanError(f"units of {c.name!r} must be {how}; got {type(x).__name__} {x!r:.40} "
                            f"among {idx!r:.60}")
        if not -(1 << 62) < int(x) < (1 << 62):
            raise PlanError(f"unit index {int(x)} out of range for {c.name!r} (width {c.width}); "
                            f"{_valid_range(c)}")
        out.append(int(x))
    return np.asarray(out, dtype=np.int64)


def _units(c: Coupling, idx) -> np.ndarray:
    arr = _unit_list(c, idx)
    if arr.size and (arr.min() < 0 or arr.max() >= c.width):
        bad = arr[(arr < 0) | (arr >= c.width)].tolist()
        raise PlanError(f"unit indices {bad} out of range for {c.name!r} (width {c.width}); {_valid_range(c)}")
    if np.unique(arr).size != arr.size:
        vals, counts = np.unique(arr, return_counts=True)
        raise PlanError(f"duplicate unit indices {vals[counts > 1].tolist()} for {c.name!r}; "
                        "list each unit once")
    return np.sort(arr)


def _check_stamps(c: Coupling, params: Mapping[str, torch.Tensor], state: Mapping) -> None:
    for t in c.tables:
        if t.param not in params:
            raise PlanError(f"coupling {c.name!r} names parameter {t.param!r}, which this model does "
                            "not have: it was found on another model; call ecospa.auto_couple(model)")
    for s in c.stamp:
        size = params[s.param].shape[s.dim]
        if size != s.size or state.get((s.param, s.dim), 0) != s.fingerprint:
            raise PlanError(
                f"coupling {c.name!r} is stale: it was found when {s.param} had {s.size} entries along "
                f"dim {s.dim} (record {s.fingerprint:#x}); the model now has {size} "
                f"(record {state.get((s.param, s.dim), 0):#x}). Use the couplings of the model as it is "
                "now: ecospa.auto_couple(model) again, or cg = ecospa.remaining(cg, removal) after each prune")
    for t in c.tables:
        if t.index.size and t.index.max() >= params[t.param].shape[t.dim]:
            raise PlanError(f"coupling {c.name!r} is stale: {t.param} has {params[t.param].shape[t.dim]} "
                            f"entries along dim {t.dim}, the coupling indexes {int(t.index.max())}. "
                            "Call ecospa.auto_couple(model) again")


def resolve(model: nn.Module, removal, couplings: CouplingGraph | None = None) -> list[tuple[CouplingGraph | None, dict[Coupling, np.ndarray]]]:
    """Check a removal (a dict or an ``ecospa.Plan``) against ``model``; nothing is changed and
    nothing is captured: names are looked up in ``couplings`` only (``prune_pass`` finds them
    first when it is not given).

    Returns:
        ``[(couplings before the step or None, {Coupling: sorted unique unit indices})]``, one
        entry per step (one for a dict), entries with no units dropped.

    Raises:
        PlanError: unknown name (or names without ``couplings``), inexact coupling,
            bad/duplicate/out-of-range index, a stale coupling or one found on another model, a
            Plan that does not start from this model's state, two couplings removing the same slice.
    """
    _check_model(model)
    refuse_sharded(model, "ecospa.prune")
    steps: list[Step] = as_steps(removal)
    params = dict(model.named_parameters())
    state = state_of(model)
    cg = couplings
    if cg is None and keyed_by_names(steps):
        raise PlanError("the removal names couplings and no couplings= graph was given to look the names up "
                        "in: pass couplings=ecospa.auto_couple(model, example_inputs), or key the removal by "
                        "Coupling objects (ecospa.prune finds the couplings itself for models with dummy inputs)")
    out = []
    is_plan = not isinstance(removal, Mapping)
    for i, step in enumerate(steps):
        try:
            resolved = _resolve_step(i, step, cg, params, state)
        except PlanError as e:
            if not is_plan:
                raise
            raise PlanError(f"plan step {i} (of {len(steps)}): {e}") from None
        out.append((cg, resolved))
        if i + 1 < len(steps):
            if cg is None:
                raise PlanError("a plan of several steps is keyed by names: pass couplings=cg")
            cg = remaining(cg, resolved)
    return out


def _resolve_step(i: int, step: Step, cg: CouplingGraph | None, params, state) -> dict[Coupling, np.ndarray]:
    """One step of :func:`resolve` (the ``i``-th): ``{Coupling: sorted unit indices}``."""
    resolved: dict[Coupling, np.ndarray] = {}
    for key, idx in step.removals.items():
        if isinstance(key, str):
            c = cg[key]
        elif isinstance(key, Coupling):
            c = key
        else:
            raise PlanError(f"removal keys are Couplings or coupling names, got {type(key).__name__}: {key!r}")
        if not c.exact:
            raise PlanError(f"coupling {c.name!r} is not exact ({c.reason}); it cannot be removed")
        if c in resolved:
            raise PlanError(f"coupling {c.name!r} appears twice in the removal")
        if step.widths and c.name in step.widths and step.widths[c.name] != c.width:
            raise PlanError(
                f"the plan expects coupling {c.name!r} to have width {step.widths[c.name]} at this "
                f"step, the model has {c.width}: apply the plan to the model "
                "state it was made on (for a full EcoSpa plan: a fresh dense model)")
        if i == 0:
            _check_stamps(c, params, state)
        resolved[c] = _units(c, idx)
    resolved = {c: a for c, a in resolved.items() if a.size}
    seen: dict[tuple[str, int], list[tuple[str, np.ndarray]]] = {}
    for c, arr in resolved.items():
        for t in c.tables:
            rm = t.index[np.isin(t.unit, arr)]
            for other, prev in seen.get((t.param, t.dim), ()):
                both = np.intersect1d(prev, rm)
                if both.size:
                    raise PlanError(
                        f"couplings {other!r} and {c.name!r} both remove slices {both[:5].tolist()} of "
                        f"{t.param} dim {t.dim}: they come from different graphs (or a graph built with "
                        "include_inexact=True); use the couplings of one ecospa.auto_couple(model)")
            seen.setdefault((t.param, t.dim), []).append((c.name, rm))
    return resolved


def _removed(resolved: Mapping[Coupling, np.ndarray]) -> dict[tuple[str, int], np.ndarray]:
    acc: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)
    for c, arr in resolved.items():
        for t in c.tables:
            acc[(t.param, t.dim)].append(t.index[np.isin(t.unit, arr)])
    return {k: np.unique(np.concatenate(v)) for k, v in acc.items()}


def remaining(cg: CouplingGraph, removal: Removal) -> CouplingGraph:
    """The couplings of the model after ``prune(model, removal)``, without capturing it again.

    Removed units disappear, indices are renumbered to the smaller tensors; names, kinds and
    order stay. ``removal`` maps Couplings (of ``cg``) or their names to unit indices.
    """
    resolved = {}
    for k, v in removal.items():
        c = cg[k] if isinstance(k, str) else k
        resolved[c] = np.asarray(sorted(v), dtype=np.int64)
    removed = _removed(resolved)
    kept = dict(cg.kept)
    for (param, dim), rm in removed.items():
        base = kept.get((param, dim))
        if base is None:
            base = np.arange(cg.shapes[param][dim], dtype=np.int64)
        kept[(param, dim)] = np.delete(base, rm)
    return renumber(cg, removed, kept)


def _keep(size: int, removed: np.ndarray) -> np.ndarray:
    mask = np.ones(size, dtype=bool)
    mask[removed] = False
    return np.nonzero(mask)[0]


def check_optimizer(optimizer, model: nn.Module, sliced: Iterable[str]) -> None:
    """Refuse, before anything changes, an optimizer that would be left holding stale tensors.

    Raises:
        PruneError: ``optimizer`` (None passes) holds none of ``model``'s parameters, or misses a
            trainable one among ``sliced`` (parameter names that the prune slices).
    """
    if optimizer is None:
        return
    if not (hasattr(optimizer, "param_groups") and hasattr(optimizer, "state")):
        raise PruneError(f"optimizer= should be a torch.optim.Optimizer built on model.parameters() (or None), "
                         f"got {type(optimizer).__name__} {optimizer!r:.40}")
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    if not any(id(p) in held for p in params.values()):
        raise PruneError(f"the optimizer ({type(optimizer).__name__}) holds none of this model's parameters: "
                         "pass the optimizer built on model.parameters(), or optimizer=None")
    missing = [n for n in sliced if params[n].requires_grad and id(params[n]) not in held]
    if missing:
        raise PruneError(f"the optimizer does not hold {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
                         "which this prune slices: build the optimizer on all trainable parameters "
                         "(model.parameters()), or pass optimizer=None and rebuild it after pruning")


def prune_pass(model: nn.Module, removal, optimizer: torch.optim.Optimizer | None = None, *,
               couplings: CouplingGraph | None = None, verify: bool = False,
               example_inputs=None, tol: float = 1e-4, narrow: bool | str = True) -> PruneResult:
    """Remove units in place (see the module docstring) and return a :class:`PruneResult`.

    Args:
        model: the model; the same object keeps its parameter names.
        removal: ``{coupling or coupling name: [unit indices]}``, or an ``ecospa.Plan``
            (its steps are applied in order).
        optimizer: if given, its state for every sliced parameter (Adam moments, SGD momentum,
            anything shaped like the parameter) is sliced the same way, and its param groups
            point to the new tensors.
        couplings: where names are looked up (default: ``ecospa.auto_couple(model)`` for models
            that carry dummy inputs).
        verify: compare the pruned model with the masked dense one on example inputs
            (``example_inputs``, else those ``couplings`` were found with); on a mismatch undo
            everything and raise :class:`~ecospa.PruneError`.
        tol: relative error allowed by ``verify``.
        narrow: run pruned attention at its kept widths (a rewritten graph per call signature,
            checked once against the exact path, which stays the fallback); False keeps only the
            exact scatter path. Heads of unequal kept widths run their projections at the exact
            kept widths and their attention core padded to the layer's widest kept head
            (``True`` or ``"padded"``: one graph), or as one graph per width group with the
            outputs added (``"grouped"``, where the call allows it: fewer attention FLOPs, more
            ops; on GPT-2-small measured 3% faster at 2048 tokens, slower at 256-1024).

    Raises:
        PlanError: before anything changes, when the removal is not valid for this model.
        PruneError: the optimizer does not hold the parameters to slice, or ``verify`` failed.
    """
    if narrow not in (True, False, "grouped", "padded"):
        raise ConfigError(f"narrow should be True, False, 'grouped' or 'padded', got {narrow!r}")
    _check_model(model)
    lookup = couplings
    if lookup is None and keyed_by_names(as_steps(removal)):
        refuse_sharded(model, "ecospa.prune")
        lookup = couplings_for(model)  # the one capture of a prune: before the checks, which never capture
    steps = resolve(model, removal, lookup)
    before = _count(model)
    removed_units: dict[str, int] = {}
    cg_after = None
    inputs = _verify_inputs(model, verify, example_inputs, couplings)
    for cg, resolved in steps:
        if not resolved:
            cg_after = cg
            continue
        removed = _removed(resolved)
        check_optimizer(optimizer, model, {p for p, _ in removed})
        reference = masked_reference(model, resolved, inputs) if verify else None
        with Transaction(model, optimizer) as tx:
            _apply(model, resolved, removed, optimizer, tx, narrow)
            if verify and not outputs_match(model, inputs, reference, tol):
                tx.rollback()
                raise PruneError(
                    f"verify: the pruned model differs from the masked dense model on the example inputs "
                    f"(couplings {[c.name for c in list(resolved)[:4]]}...); the model and optimizer were "
                    "restored. Please report this with the model: it is a bug in ecospa")
        for c, arr in resolved.items():
            removed_units[c.name] = removed_units.get(c.name, 0) + int(arr.size)
        cg_after = remaining(cg, resolved) if cg is not None else None
    if verify:
        from ecospa.narrow.forward import verify_narrow_calls  # (imports torch.export: lazily)

        verify_narrow_calls(model)  # and every call signature the first time a narrow graph serves it
    if removed_units:
        guard_save_pretrained(model)  # save_pretrained writes the exported form (ecospa/export/guard.py)
    return PruneResult(model, cg_after if cg_after is not None else couplings if not removed_units else None,
                       removed_units, before, _count(model))


def _verify_inputs(model, verify, example_inputs, couplings):
    if not verify:
        return None
    from ecospa.errors import ConfigError
    from ecospa.capture.export import normalise_inputs

    if example_inputs is not None:
        return normalise_inputs(model, example_inputs)
    if couplings is not None and couplings.inputs is not None:
        return couplings.inputs
    try:
        return normalise_inputs(model, None)
    except Exception:
        raise ConfigError("verify=True needs example inputs: pass example_inputs=..., or couplings=cg "
                          "from ecospa.auto_couple(model, example_inputs)") from None


def _apply(model: nn.Module, resolved, removed, optimizer, tx: Transaction, narrow: bool | str) -> None:
    params = dict(model.named_parameters())
    per_param: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for (pname, dim), rm in removed.items():
        per_param[pname][dim] = _keep(params[pname].shape[dim], rm)
    owners: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for mod in model.modules():
        for attr, p in mod._parameters.items():
            if p is not None:
                owners[id(p)].append((mod, attr))
    for pname, keeps in per_param.items():
        old = params[pname]
        for mod, attr in owners[id(old)]:
            rec = module_record(mod)  # created, if need be, by tx.set_record (undone on rollback)
            prev = (rec.params.get(attr) if rec is not None else None) or ParamRecord(tuple(old.shape))
            tx.set_record(mod, attr, prev.after(keeps))
        tx.slice_param(old, owners[id(old)], keeps)
    update_forwards(model, resolved, tx, narrow=narrow)
    for pname, keeps in per_param.items():  # postcondition: the shapes the removal implies
        new = dict(model.named_parameters())[pname]
        want = list(params[pname].shape)
        for d, k in keeps.items():
            want[d] = k.size
        if list(new.shape) != want:
            raise PruneError(f"internal error: {pname} has shape {tuple(new.shape)} after pruning, "
                             f"expected {tuple(want)}")
    recs = param_records(model)
    for pname in per_param:
        r = recs.get(pname)
        if r is None or any(r.kept_or_all(d).size != dict(model.named_parameters())[pname].shape[d]
                            for d in range(len(r.dense_shape))):
            raise PruneError(f"internal error: the removal record of {pname} disagrees with its shape")


def prune(model: nn.Module, removal, optimizer: torch.optim.Optimizer | None = None, *,
          couplings: CouplingGraph | None = None, verify: bool = False, example_inputs=None,
          narrow: bool | str = True) -> nn.Module:
    """Remove units of couplings from ``model`` in place and return it.

    Args:
        model: the model; the same object keeps its parameter names.
        removal: ``{coupling or coupling name: [unit indices]}``, or an ``ecospa.Plan`` (for
            example ``EcoSpa(...).plan``, replayed on a fresh dense copy of the model).
        optimizer: if given, its state for every sliced parameter is sliced the same way and its
            param groups point to the new tensors.
        couplings: where coupling names are looked up (default: ``ecospa.auto_couple(model)``
            for models that carry dummy inputs, such as Hugging Face models).
        verify: check the result against the masked dense model on example inputs, undo and
            raise on a mismatch (see :func:`prune_pass`).
        example_inputs: inputs for ``verify`` (default: those the couplings were found with).
        narrow: run pruned attention at its kept widths; ``"grouped"``: ragged heads grouped
            by width instead of padded to the widest (see :func:`prune_pass`).

    Afterwards ``model(x)`` equals the dense model with the removed slices zeroed. The couplings
    of the pruned model are ``ecospa.remaining(cg, removal)`` (or a new ``auto_couple``).

    Raises:
        PlanError: before anything changes, when the removal is not valid for this model.
        PruneError: the optimizer does not hold the parameters to slice, or ``verify`` failed.
    """
    return prune_pass(model, removal, optimizer, couplings=couplings, verify=verify,
                      example_inputs=example_inputs, narrow=narrow).model
