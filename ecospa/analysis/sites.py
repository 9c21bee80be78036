"""Execution planning: how each coupling can be removed physically, or why it cannot.

For every ``(param, dim)`` of a coupling this decides a :class:`~ecospa.ir.coupling.Site`:

- *linear-like modules* (a module whose forward is one product with its own weight, give or
  take reshapes: ``nn.Linear``, GPT-2's ``Conv1D``, a custom ``x @ self.w``) get their forward
  replaced by a small adapter; their weight rows are ``"out"``, columns ``"in"``, bias ``"bias"``;
- ``torch.nn.MultiheadAttention`` parameters are ``"mha"`` (the module's forward is replaced);
- any other parameter is ``"direct"`` (a raw ``nn.Parameter`` used through ``einsum``/``@``, a
  norm's weight): it is sliced in place. In a compact region its uses simply see the smaller
  tensor; in a scatter region the coupling's scope module gets a forward that shows it the
  parameter at its dense shape, zeros in the removed slices (the exact fallback,
  ``ecospa.pruning.adapters.DenseParamsForward``), and its narrow graph reads the sliced one.

A coupling is *compact* when every op its channels pass through between producers and consumers
is elementwise (or a product with a weight): the channels can simply disappear. Otherwise (heads
reshaped, split, rotated, attended) it is *scatter*: producers scatter their output back to the
original width with zeros where units were removed, consumers gather the kept channels, and the
model's own code in between runs unchanged, so head counts, views, rotary tables, repeat_kv and
the attention scale all stay valid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ecospa.capture.export import module_of
from ecospa.analysis.flow import FlowResult, coupled_factors
from ecospa.ir.coupling import Site
from ecospa.ir.labels import varying
from ecospa.ops import has, is_pointwise, op_name
from ecospa.ops.base import param_behind

__all__ = ["LinearLike", "linear_like_modules", "assign_sites"]


@dataclass(frozen=True)
class LinearLike:
    """A module whose forward is a single product with its own weight."""

    module: str
    weight: str  # parameter name
    bias: str | None
    transposed: bool  # weight stored (in, out)


def _param_of(flow: FlowResult, arg) -> tuple[str | None, bool]:
    """Parameter behind ``arg`` (itself or its transpose) and whether it was transposed."""
    return param_behind(flow.captured, arg, same_shape=True)


def _call_of(node: torch.fx.Node) -> str:
    """Which call of its innermost module produced ``node``: torch.export keys the module stack
    by call (``...attn.q_proj`` for the first call, ``...attn.q_proj@1`` for the second)."""
    stack = node.meta.get("nn_module_stack")
    return list(stack)[-1] if stack else ""


def _product_of(flow: FlowResult, path: str, nodes: list) -> LinearLike | None:
    """The linear-like view of one call of module ``path`` (its ``nodes``), or None when that
    call is not a single product with the module's own weight (plus passive ops)."""
    prods = [n for n in nodes if has(n.target, "product")]
    others = [n for n in nodes if not has(n.target, "product")]
    if len(prods) != 1 or not all(has(n.target, "passive") for n in others):
        return None
    node = prods[0]
    name = op_name(node.target)
    if name == "linear":
        w, flip = _param_of(flow, node.args[1])
        transposed = flip
        b, _ = _param_of(flow, node.args[2]) if len(node.args) > 2 else (None, False)
    elif name == "addmm":
        w, flip = _param_of(flow, node.args[2])
        transposed = not flip
        b, _ = _param_of(flow, node.args[0])
    else:
        w, flip = _param_of(flow, node.args[1])
        transposed = not flip
        b = None
        adds = [n for n in others if op_name(n.target) == "add"]
        if adds:
            b, _ = _param_of(flow, adds[0].args[1])
    prefix = path + "." if path else ""
    if w is None or not w.startswith(prefix) or "." in w[len(prefix):]:
        return None
    if b is not None and (not b.startswith(prefix) or "." in b[len(prefix):]):
        return None
    if any(op_name(n.target) == "add" for n in others) and b is None:
        return None
    return LinearLike(path, w, b, transposed)


def linear_like_modules(flow: FlowResult, model: nn.Module) -> dict[str, LinearLike]:
    """Modules whose forward is one product with their own weight (see module docstring).

    A module called several times per forward (a shared layer, a block applied twice) is
    linear-like when every call is such a product, with the same weight, bias and orientation:
    the adapter that replaces its forward then serves every call.
    """
    by_call: dict[str, dict[str, list]] = {}
    for node in flow.nodes:
        if node.op == "call_function":
            by_call.setdefault(module_of(node), {}).setdefault(_call_of(node), []).append(node)
    out: dict[str, LinearLike] = {}
    mods = dict(model.named_modules())
    for path, calls in by_call.items():
        if path not in mods or isinstance(mods[path], nn.MultiheadAttention):
            continue
        views = {_product_of(flow, path, nodes) for nodes in calls.values()}
        if len(views) == 1 and None not in views:
            out[path] = views.pop()
    return out


def _owner(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


def _mha_supported(m: nn.MultiheadAttention) -> bool:
    return m.bias_k is None and not m.add_zero_attn and bool(m._qkv_same_embed_dim)


def _node_ok_compact(node: torch.fx.Node, flow: FlowResult, labels: np.ndarray) -> bool:
    """Can the channels ``labels`` simply vanish at ``node``? Only through elementwise ops (and
    weight products) whose other operands carry the same channels or broadcast along them."""
    if node.op != "call_function" or not has(node.target, "compact"):
        return False
    if not is_pointwise(node.target):
        return True
    out = flow.values.get(node)
    if not isinstance(out, list):
        return False
    nd = len(node.meta["val"].shape)
    dims = {d for f in out if np.isin(f, labels).any() for d in varying(f)}
    for a in node.all_input_nodes:
        val = a.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            continue
        shape = (1,) * (nd - val.dim()) + tuple(val.shape)
        fs = flow.values.get(a) or []
        covered = {d + nd - f.ndim for f in fs if np.isin(f, labels).any() for d in varying(f)}
        if any(shape[d] > 1 and d not in covered for d in dims):
            return False
    return True


def assign_sites(flow: FlowResult, model: nn.Module, raws, comp: np.ndarray, gid_of: np.ndarray):
    """``(sites, problem)`` per raw coupling: problem is None when it can be executed."""
    linear = linear_like_modules(flow, model)
    mods = dict(model.named_modules())
    # region: nodes whose value carries labels of each coupling
    region: dict[int, list[torch.fx.Node]] = {}
    for node, items in coupled_factors(flow, np.where(comp >= 0, gid_of[comp], -1)):
        for g in np.unique(np.concatenate([gs for _, gs in items])).tolist():
            region.setdefault(g, []).append(node)

    lab_group = gid_of[comp]
    by_group = np.argsort(lab_group, kind="stable")
    bounds = np.searchsorted(lab_group[by_group], np.arange(len(raws) + 1))
    roles: list[list[tuple]] = []
    compact = []
    for g, raw in enumerate(raws):
        rs = []
        inside = set()
        for t in raw.tables:
            owner = _owner(t.param)
            ll = linear.get(owner)
            mod = mods.get(owner)
            if ll is not None and t.param == ll.weight:
                out_dim = 1 if ll.transposed else 0
                rs.append((t.param, t.dim, "out" if t.dim == out_dim else "in", owner, ll.transposed))
                inside.add(owner)
            elif ll is not None and t.param == ll.bias:
                rs.append((t.param, t.dim, "bias", owner, ll.transposed))
                inside.add(owner)
            elif isinstance(mod, nn.MultiheadAttention) or isinstance(mods.get(_owner(owner)), nn.MultiheadAttention):
                mha = owner if isinstance(mod, nn.MultiheadAttention) else _owner(owner)
                rs.append((t.param, t.dim, "mha", mha, False))
                inside.add(mha)
            else:
                rs.append((t.param, t.dim, "direct", owner, False))
        roles.append(rs)
        nodes = [n for n in region.get(g, []) if module_of(n) not in inside]
        labels = by_group[bounds[g]:bounds[g + 1]]
        compact.append(all(_node_ok_compact(n, flow, labels) for n in nodes)
                       and not any(r[2] == "mha" for r in rs))

    # couplings that share a module's output or input must share a layout
    parent = list(range(len(raws)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    seen: dict[tuple, int] = {}
    for g, rs in enumerate(roles):
        for (param, dim, role, owner, _) in rs:
            if role in ("out", "in", "bias", "mha"):
                key = (owner, "in" if role == "in" else "out")
            else:  # every use of a direct parameter sees a dim dense or sliced: one layout per dim
                key = ("param", param, dim)
            if key in seen:
                parent[find(g)] = find(seen[key])
            else:
                seen[key] = g
    scatter_root = {find(g) for g in range(len(raws)) if not compact[g]}
    results = []
    for g, rs in enumerate(roles):
        layout = "scatter" if find(g) in scatter_root else "compact"
        problem = None
        mha_bad = [r for r in rs if r[2] == "mha" and not _mha_supported(mods[r[3]])]
        if mha_bad:
            problem = (f"MultiheadAttention {mha_bad[0][3]!r} uses bias_k/bias_v, add_zero_attn or "
                       "separate kdim/vdim projections, which ecospa cannot prune yet")
        sites = tuple(Site(p, d, role, owner, layout, tr) for (p, d, role, owner, tr) in rs)
        results.append((sites, problem))
    return results
