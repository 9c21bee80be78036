"""Inline the higher-order ops that only wrap a piece of the forward in a mode.

``torch.export`` turns ``with torch.autocast(..., enabled=False):`` (x-transformers decorates
its rotary embedding this way), ``with torch.no_grad():`` and similar blocks inside a forward
into higher-order ops (``wrap_with_autocast``, ``wrap_with_set_grad_enabled``, ``wrap``) that
call a subgraph. The ops inside are ordinary ATen ops; the mode only changes dtypes or autograd,
never which channels meet. :func:`inline_wrappers` copies each subgraph into the main graph in
place of its call, so that the channel flow sees through it (an op without a rule would drop the
labels of everything passing through the block).
"""
from __future__ import annotations

import operator

import torch
import torch.fx

__all__ = ["WRAPPERS", "inline_wrappers"]


def _wrappers() -> tuple:
    out = []
    for name in ("wrap_with_autocast", "wrap_with_set_grad_enabled", "wrap"):
        op = getattr(torch.ops.higher_order, name, None)
        if op is not None:
            out.append(op)
    return tuple(out)


WRAPPERS = _wrappers()


def _is_wrapper(target) -> bool:
    return any(target is w for w in WRAPPERS)


def inline_wrappers(gm: torch.fx.GraphModule) -> int:
    """Replace every call of a wrapper higher-order op in ``gm.graph`` by the ops of its subgraph
    (recursively). Returns how many calls were inlined; ``gm`` is changed in place."""
    count = 0
    changed = True
    while changed:  # a subgraph may itself call a wrapper: inline until none is left
        changed = False
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and _is_wrapper(node.target) and _inline(gm, node):
                count += 1
                changed = True
    if count:
        gm.graph.lint()
    return count


def _inline(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    k = next((i for i, a in enumerate(node.args) if isinstance(a, torch.fx.Node) and a.op == "get_attr"), None)
    if k is None or node.kwargs:
        return False
    holder = node.args[k]
    sub = getattr(gm, holder.target, None)
    if not isinstance(sub, torch.fx.GraphModule):
        return False
    operands = list(node.args[k + 1:])
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(operands):
        return False
    if any(not (u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int))
           for u in node.users):
        return False  # the result tuple is used as a whole: leave the call opaque
    env: dict[torch.fx.Node, object] = dict(zip(placeholders, operands))
    outputs = None
    graph = gm.graph
    with graph.inserting_before(node):
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                outputs = torch.fx.map_arg(n.args[0], lambda a: env[a])
                continue
            if n.op == "get_attr":  # a nested subgraph or constant: register it on gm
                value = getattr(sub, n.target)
                name = _free_name(gm, f"{holder.target}_{n.target}".replace(".", "_"))
                setattr(gm, name, value)
                env[n] = graph.get_attr(name)
                env[n].meta = dict(n.meta)
                continue
            copy = graph.node_copy(n, lambda a: env[a])
            if "nn_module_stack" not in copy.meta and "nn_module_stack" in node.meta:
                copy.meta["nn_module_stack"] = node.meta["nn_module_stack"]
            env[n] = copy
    outs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    for user in list(node.users):
        user.replace_all_uses_with(outs[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(node)
    if not holder.users:
        graph.erase_node(holder)
    return True


def _free_name(gm: torch.fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name
