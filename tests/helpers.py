"""Shared test helpers: the masked reference, output comparison and coupling comparison.

The central check of the project: pruning units physically must give the outputs of the dense
model with those units' slices zeroed, and the parameter count must drop by exactly the entries of
the removed slices.
"""
from __future__ import annotations

import copy
import math
import random
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

__all__ = [
    "REL_TOL",
    "call",
    "flat_outputs",
    "rel_err",
    "assert_close_outputs",
    "param_count",
    "removed_by_param",
    "removed_numel",
    "delete_indices",
    "masked_copy",
    "resolve_plan",
    "plan_units",
    "random_plan",
    "assert_pruned_equals_masked",
    "canon",
    "assert_couplings_match",
    "snapshot",
    "assert_unchanged",
]

REL_TOL = 1e-5

Slice3 = tuple[str, int, int]


def call(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on a tuple of positional inputs or a dict of keyword inputs."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    return model(*inputs)


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor of a (nested) output: tensors, tuples, lists, dicts and ``ModelOutput``.

    Other objects (caches) are skipped.
    """
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in flat_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flat_outputs(v)]
    return []


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` in float64 (absolute error when ``ref`` is zero)."""
    assert got.shape == ref.shape, f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    g, r = got.detach().double(), ref.detach().double()
    denom = r.norm().item()
    num = (g - r).norm().item()
    return num / denom if denom > 0 else num


def assert_close_outputs(got: Any, ref: Any, tol: float = REL_TOL, what: str = "output") -> None:
    """All tensors of two outputs agree to relative error ``tol``."""
    g, r = flat_outputs(got), flat_outputs(ref)
    assert len(g) == len(r) and r, f"{what}: {len(g)} tensors vs {len(r)} in the reference"
    for i, (a, b) in enumerate(zip(g, r)):
        if not b.is_floating_point():
            assert torch.equal(a, b), f"{what}[{i}]: integer output differs"
            continue
        assert torch.isfinite(a).all(), f"{what}[{i}]: non-finite values"
        err = rel_err(a, b)
        assert err <= tol, f"{what}[{i}] {tuple(b.shape)}: relative error {err:.2e} > {tol:.0e}"


def param_count(model: nn.Module) -> int:
    """Number of parameter entries (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def removed_by_param(units: Iterable[Sequence[Slice3]]) -> dict[str, dict[int, set[int]]]:
    """``{param: {dim: {indices}}}`` of every slice of ``units``."""
    out: dict[str, dict[int, set[int]]] = {}
    for unit in units:
        for name, dim, idx in unit:
            out.setdefault(name, {}).setdefault(int(dim), set()).add(int(idx))
    return out


def removed_numel(model: nn.Module, units: Iterable[Sequence[Slice3]]) -> int:
    """Entries that disappear when every slice of ``units`` is removed (overlaps counted once)."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    drop = 0
    for name, dims in removed_by_param(units).items():
        shape = shapes[name]
        kept = math.prod(s - len(dims.get(d, ())) for d, s in enumerate(shape))
        drop += math.prod(shape) - kept
    return drop


def delete_indices(t: torch.Tensor, dims: Mapping[int, set[int]]) -> torch.Tensor:
    """``t`` without the given indices along each dim."""
    for dim, idx in dims.items():
        keep = [i for i in range(t.shape[dim]) if i not in idx]
        t = t.index_select(dim, torch.tensor(keep, dtype=torch.long, device=t.device))
    return t


def masked_copy(model: nn.Module, units: Iterable[Sequence[Slice3]]) -> nn.Module:
    """A deep copy of ``model`` with every slice of ``units`` set to zero."""
    m = copy.deepcopy(model)
    params = dict(m.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for unit in units:
            for name, dim, idx in unit:
                params[name].select(dim, idx).zero_()
    return m


def resolve_plan(plan: Mapping[Any, Sequence[int]], cg=None) -> list[tuple[Any, list[int]]]:
    """``[(Coupling, indices)]`` of a plan whose keys are couplings or names (names need ``cg``)."""
    out = []
    for key, idx in plan.items():
        if isinstance(key, str):
            assert cg is not None, "a plan keyed by names needs the CouplingGraph"
            key = cg[key]
        out.append((key, list(idx)))
    return out


def plan_units(plan: Mapping[Any, Sequence[int]], cg=None) -> list[list[Slice3]]:
    """Every unit a plan removes, as lists of slices."""
    units = []
    for c, idx in resolve_plan(plan, cg):
        all_units = c.units()
        units += [list(all_units[i]) for i in idx]
    return units


def random_plan(cg: Iterable, rng: random.Random, frac: float = 1 / 3) -> dict:
    """About ``frac`` of every coupling's units (at least one, never all of a coupling)."""
    plan = {}
    for c in cg:
        if c.width < 2:
            continue
        n = min(c.width - 1, max(1, round(c.width * frac)))
        plan[c] = sorted(rng.sample(range(c.width), n))
    return plan


def assert_pruned_equals_masked(model: nn.Module, inputs: Any, plan: Mapping, *, cg=None,
                                check_inputs: Sequence[Any] = (), optimizer=None,
                                tol: float = REL_TOL, narrow: bool | str = True) -> nn.Module:
    """Prune ``model`` in place with ``plan`` and check it against the masked dense model.

    Checks: ``prune`` returns the same object; parameter names are unchanged; the parameter
    count drops by exactly the entries of the removed slices; on ``inputs`` (and every entry of
    ``check_inputs``) the outputs equal those of the dense model with the slices zeroed.
    Returns the pruned model.
    """
    import ecospa

    model.eval()
    units = plan_units(plan, cg)
    ref_model = masked_copy(model, units).eval()
    all_inputs = [inputs, *check_inputs]
    with torch.no_grad():
        refs = [call(ref_model, x) for x in all_inputs]
    n0, names0 = param_count(model), [n for n, _ in model.named_parameters()]
    expected_drop = removed_numel(model, units)
    out = ecospa.prune(model, plan, optimizer=optimizer, couplings=cg, narrow=narrow)
    assert out is model, "prune must prune in place and return the same model object"
    assert [n for n, _ in model.named_parameters()] == names0, "parameter names changed"
    drop = n0 - param_count(model)
    assert drop == expected_drop, f"parameter count dropped by {drop}, expected {expected_drop}"
    model.eval()
    with torch.no_grad():
        for i, (x, ref) in enumerate(zip(all_inputs, refs)):
            assert_close_outputs(call(model, x), ref, tol, what=f"inputs #{i}")
    return model


def canon(units: Iterable[Iterable[Slice3]]) -> frozenset:
    """Order-free form of a coupling's units: a set of sets of plain tuples."""
    return frozenset(frozenset((str(n), int(d), int(i)) for n, d, i in u) for u in units)


def _describe(kind: str, units) -> str:
    params = sorted({s[0] for u in units for s in u})
    return f"{kind} width={len(units)} params={params}"


def _unit_diffs(missing: Counter, extra: Counter) -> list[str]:
    """For a missing and an unexpected coupling of the same kind and parameters: unit diffs."""
    lines = []
    for mk in missing:
        for ek in extra:
            if mk[0] != ek[0]:
                continue
            m_params = {s[0] for u in mk[1] for s in u}
            e_params = {s[0] for u in ek[1] for s in u}
            if m_params != e_params:
                continue
            want_only = sorted(sorted(u) for u in mk[1] - ek[1])[:2]
            got_only = sorted(sorted(u) for u in ek[1] - mk[1])[:2]
            lines.append(f"  {mk[0]} on {sorted(m_params)}: expected units like {want_only}")
            lines.append(f"      but found units like {got_only}")
    return lines


def assert_couplings_match(couplings: Iterable, expects: Iterable,
                           rename: Mapping[str, str] | None = None) -> None:
    """The discovered couplings equal the expected ones as a multiset of (kind, units).

    ``couplings``: Coupling objects (e.g. a CouplingGraph). ``expects``: :class:`Expect`.
    ``rename`` maps discovered parameter names before comparing. The failure message lists what
    is missing and what is unexpected, with kind, width and parameters.
    """
    rename = rename or {}
    got = Counter()
    got_desc = {}
    for c in couplings:
        units = [[(rename.get(n, n), d, i) for n, d, i in u] for u in c.units()]
        key = (c.kind, canon(units))
        got[key] += 1
        got_desc[key] = f"{c.name}: " + _describe(c.kind, units)
    want = Counter()
    want_desc = {}
    for e in expects:
        key = (e.kind, canon(e.units))
        want[key] += 1
        want_desc[key] = _describe(e.kind, e.units)
    missing = want - got
    extra = got - want
    if missing or extra:
        lines = ["discovered couplings differ from the expected ones"]
        lines += [f"  missing:    {want_desc[k]} (x{n})" for k, n in missing.items()]
        lines += [f"  unexpected: {got_desc[k]} (x{n})" for k, n in extra.items()]
        lines += _unit_diffs(missing, extra)
        raise AssertionError("\n".join(lines))


def _call_zeroed(model: nn.Module, inputs: Any, slices: Sequence[Slice3]) -> Any:
    """``model(inputs)`` with ``slices`` set to zero, restored afterwards (no copy)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    saved = [(params[n].select(d, i), params[n].select(d, i).clone()) for n, d, i in slices]
    try:
        with torch.no_grad():
            for view, _ in saved:
                view.zero_()
            return call(model, inputs)
    finally:
        with torch.no_grad():
            for view, old in reversed(saved):
                view.copy_(old)


def check_expect_sides(model: nn.Module, inputs: Any, expects: Iterable, *,
                       skip_roles: Iterable[str] = (), units_per_coupling: int = 3,
                       require_effect: bool = True) -> None:
    """Self-check of ground truth (no ecospa needed): each side of a unit carries all of it.

    For a few units of every expected coupling: zeroing the slices of any one role (the k side,
    the q side, the consumer columns...) gives the same output as zeroing the whole unit, and
    zeroing some of the units changes the output (a ReLU unit may be dead;
    ``require_effect=False`` drops that part). A wrong index, a missing head or a forgotten
    bias breaks one of these.
    """
    skip = set(skip_roles)
    model.eval()
    with torch.no_grad():
        dense = call(model, inputs)
    for e in expects:
        if e.roles is None:
            continue
        picks = sorted({0, e.width // 2, e.width - 1})[:units_per_coupling]
        moved_any = 0.0
        for j in picks:
            unit, roles = e.units[j], e.roles[j]
            whole = _call_zeroed(model, inputs, unit)
            moved = max(rel_err(a, b) for a, b in zip(flat_outputs(whole), flat_outputs(dense)))
            moved_any = max(moved_any, moved)
            for role in sorted(set(roles) - skip):
                part = [s for s, r in zip(unit, roles) if r == role]
                assert_close_outputs(_call_zeroed(model, inputs, part), whole, 1e-5,
                                     what=f"{e.kind} unit {j} of {e.params}, side {role!r}")
        assert moved_any > 1e-6 or not require_effect, (
            f"{e.kind} on {e.params}: zeroing units {picks} changes nothing")


def snapshot(model: nn.Module, opt=None) -> dict:
    """Everything an error must leave as it was: the state dict (values and shapes), parameter
    names and identities, each module's attributes, mode and hooks, and the optimizer's param groups
    (members and hyperparameters) and per-parameter state. Compare with :func:`assert_unchanged`."""
    out = {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": [(n, id(p)) for n, p in model.named_parameters()],
        "attrs": _module_attrs(model),
    }
    if opt is not None:
        out["groups"] = [([id(p) for p in g["params"]], {k: v for k, v in g.items() if k != "params"})
                         for g in opt.param_groups]
        out["opt_state"] = {id(p): {k: (v.detach().clone() if torch.is_tensor(v) else v)
                                    for k, v in opt.state[p].items()}
                            for g in opt.param_groups for p in g["params"] if p in opt.state}
    return out


def _module_attrs(model: nn.Module) -> dict:
    out = {}
    for n, m in model.named_modules():
        out[n] = (sorted(m.__dict__), sorted(m._buffers), m.training, len(m._forward_pre_hooks),
                  len(m._forward_hooks))
    return out


def assert_unchanged(model: nn.Module, snap: dict, opt=None) -> None:
    """The model (and optimizer) are exactly as :func:`snapshot` saw them: values, shapes,
    parameter identities, module attributes (no leftover removal record or installed forward),
    buffers (no registered-but-empty slot), modes, hooks, optimizer groups and state."""
    now = model.state_dict()
    assert now.keys() == snap["state"].keys(), "state dict keys changed"
    for k, v in snap["state"].items():
        assert now[k].shape == v.shape, f"{k}: shape {tuple(now[k].shape)} != {tuple(v.shape)}"
        assert torch.equal(now[k], v), f"{k} changed"
    assert [(n, id(p)) for n, p in model.named_parameters()] == snap["params"], "parameters replaced"
    attrs = _module_attrs(model)
    assert attrs.keys() == snap["attrs"].keys(), "modules added or removed"
    changed = {n: [sorted(set(a) ^ set(b)) if isinstance(a, list) else (b, a)
                   for a, b in zip(attrs[n], snap["attrs"][n]) if a != b]
               for n in attrs if attrs[n] != snap["attrs"][n]}
    assert not changed, f"module attributes, buffers, mode or hooks changed: {dict(list(changed.items())[:3])}"
    if opt is not None:
        groups = [([id(p) for p in g["params"]], {k: v for k, v in g.items() if k != "params"})
                  for g in opt.param_groups]
        assert groups == snap["groups"], "optimizer param groups changed"
        held = {id(p): p for g in opt.param_groups for p in g["params"]}
        assert {i for i in held if held[i] in opt.state} == set(snap["opt_state"]), "optimizer state keys changed"
        for i, before in snap["opt_state"].items():
            state = opt.state[held[i]]
            assert state.keys() == before.keys(), "optimizer state entries changed"
            for k, v in before.items():
                if torch.is_tensor(v):
                    assert state[k].shape == v.shape and torch.equal(state[k], v), f"optimizer state {k} changed"
                else:
                    assert state[k] == v, f"optimizer state {k} changed"
