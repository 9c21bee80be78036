"""Build the narrow graph of a captured call: same ops, fewer positions.

:func:`rewrite` walks the captured graph in order and asks each op's narrow rule
(``ecospa.coupling.narrow.rules``) for its narrow version. Parameters enter as they are in the
pruned model (only kept slices); where padding units are retained (ragged heads) they are first
laid out with zero slices (``ops.expand_param``). Index tensors become buffers of the resulting
``torch.fx.GraphModule``, so ``.to(device)`` moves them.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn as nn

from ecospa.coupling.narrow import ops
from ecospa.coupling.narrow.layout import Layout, Narrowing
from ecospa.coupling.narrow.program import Program
from ecospa.coupling.narrow.rules import NarrowError, rule_for
from ecospa.graph.capture import module_of

__all__ = ["Builder", "rewrite"]


class Builder:
    """State of one rewrite: the new graph, the old-to-new node map, index buffers, and the
    zero-safety flags (``zero[node]``: the node's dropped positions are zero in the masked dense
    model)."""

    def __init__(self, program: Program, layout: Layout, constants: Mapping[str, torch.Tensor]):
        self.program, self.lay = program, layout
        self.graph = torch.fx.Graph()
        self.env: dict[torch.fx.Node, torch.fx.Node | None] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        self.zero: dict[torch.fx.Node, bool] = {}
        self._constants = constants

    # --------------------------------------------------------------------- queries
    def layout(self, node) -> dict:
        """``{dim: Narrowing}`` of a tensor node (``{}`` when nothing is narrowed)."""
        lay = self.lay.nodes.get(node) if isinstance(node, torch.fx.Node) else None
        return lay if isinstance(lay, dict) else {}

    @staticmethod
    def shape(node) -> tuple:
        return tuple(node.meta["val"].shape)

    def constant(self, node) -> torch.Tensor | None:
        """Value of a constant/buffer placeholder, or None."""
        return self._constants.get(node.name) if isinstance(node, torch.fx.Node) else None

    def arg(self, a):
        """The new node (or value) standing for old argument ``a``."""
        return torch.fx.node.map_arg(a, lambda n: self.env[n])

    # --------------------------------------------------------------------- emitting
    def index(self, array: np.ndarray) -> torch.fx.Node:
        """A long tensor buffer holding ``array``, as a ``get_attr`` node."""
        name = f"_ecospa_idx{len(self.buffers)}"
        self.buffers[name] = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.long)
        return self.graph.get_attr(name)

    def call(self, target, args, kwargs=None) -> torch.fx.Node:
        return self.graph.call_function(target, args, kwargs or {})

    def copy(self, node, args=None, kwargs=None) -> torch.fx.Node:
        """``node`` with its arguments mapped (optionally replaced before mapping)."""
        return self.emit(node, node.args if args is None else args,
                         node.kwargs if kwargs is None else kwargs)

    def emit(self, node, args, kwargs, *, mapped: bool = False) -> torch.fx.Node:
        if not mapped:
            args, kwargs = self.arg(args), self.arg(kwargs)
        new = self.graph.call_function(node.target, tuple(args), dict(kwargs))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        return new

    def dense(self, node: torch.fx.Node) -> torch.fx.Node:
        """The new node for ``node`` at its dense width: narrowed dims scattered back with zeros
        (exact only where the dropped positions are zero in the masked dense model)."""
        new = self.env[node]
        lay = self.layout(node)
        if not lay:
            return new
        if not self.zero.get(node, True):
            raise NarrowError("the module returns pruned channels that are not zero")
        ndim = len(self.shape(node))
        # per-head channel positions first, while the head dim is still narrow (their index
        # rows follow the kept heads), then the heads themselves
        for dim, nar in sorted(lay.items(), key=lambda kv: (not kv[1].selectors, -kv[0])):
            if nar.selectors:
                shape = [1] * ndim
                for d, k in zip(nar.selectors, nar.index.shape[:-1]):
                    shape[d] = k
                shape[dim] = nar.width
                order = list(nar.selectors) + [dim]
                arr = np.moveaxis(nar.index, range(len(order)), np.argsort(np.argsort(order))).reshape(shape)
            else:
                arr = nar.index
            new = self.call(ops.scatter, (new, dim, self.index(arr), nar.size))
        return new

    def gather(self, x: torch.fx.Node, dim: int, positions: np.ndarray, selectors, ndim: int) -> torch.fx.Node:
        """``x`` at narrow/dense ``positions`` along ``dim`` (1-D: everywhere the same; else per
        selector position, ``positions`` shaped ``(*selector sizes, k)``)."""
        if positions.ndim == 1 or not selectors:
            return self.call(ops.gather, (x, dim, self.index(positions.reshape(-1)), ndim))
        shape = [1] * ndim
        for d, k in zip(selectors, positions.shape[:-1]):
            shape[d] = k
        shape[dim] = positions.shape[-1]
        order = list(selectors) + [dim]
        arr = np.moveaxis(positions, range(len(order)), np.argsort(np.argsort(order)))
        return self.call(ops.gather, (x, dim, self.index(arr.reshape(shape)), ndim))

    def align_operand(self, a: torch.fx.Node, out: Mapping[int, Narrowing], ndim: int):
        """Operand ``a`` of an elementwise op whose output has layout ``out``: narrowed alike
        already, broadcast along the narrowed dims, or gathered there (a label-free table)."""
        new = self.env[a]
        own = self.layout(a)
        off = ndim - len(self.shape(a))
        shape = [1] * off + list(self.shape(a))  # right-aligned to the output's rank
        for dim, nar in sorted(out.items()):
            if dim < off or shape[dim] == 1:
                continue
            mine = own.get(dim - off)
            if mine is not None:
                if mine.index.shape != nar.index.shape or not np.array_equal(mine.index, nar.index):
                    raise NarrowError(f"operands narrowed differently along dim {dim}")
                continue
            if shape[dim] != nar.size:
                raise NarrowError(f"an operand of size {shape[dim]} along narrowed dim {dim}")
            new = self.gather(new, dim, nar.index, nar.selectors, ndim)
            off = 0  # the gathered operand has the output's rank now
            shape[dim] = nar.width
            for s, k in zip(nar.selectors, nar.index.shape[:-1]):
                shape[s] = max(shape[s], k)
        return new


def _param_src(kept: np.ndarray | None, retained: np.ndarray, dense: int) -> np.ndarray | None:
    """Where each retained dense position sits in the live parameter (``len(kept)``: zeros)."""
    k = np.arange(dense) if kept is None else kept
    if np.array_equal(k, retained):
        return None
    pos = np.searchsorted(k, retained)
    hit = (pos < k.size) & (k[np.minimum(pos, max(k.size - 1, 0))] == retained) if k.size else np.zeros(retained.size, bool)
    return np.where(hit, pos, k.size)


def rewrite(program: Program, layout: Layout, kept: Mapping[str, Mapping[int, np.ndarray]],
            constants: Mapping[str, torch.Tensor]) -> torch.fx.GraphModule:
    """The narrow ``GraphModule`` of ``program`` (same placeholders, same output structure).

    Args:
        kept: the removal record of the module's parameters (relative names, dense indices).
        constants: values of buffer/constant placeholders by node name.

    Raises:
        NarrowError: a node cannot be narrowed; the message names it.
    """
    if layout.problem:
        raise NarrowError(layout.problem)
    b = Builder(program, layout, constants)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    kinds = dict(zip(placeholders, program.kinds))
    for node in program.graph.nodes:
        try:
            if node.op == "placeholder":
                new = b.graph.placeholder(node.name)
                new.meta["val"] = node.meta.get("val")
                kind = kinds[node]
                if kind[0] == "param" and kind[1] in layout.retained:
                    shape = program.shapes[kind[1]]
                    for dim, ret in sorted(layout.retained[kind[1]].items()):
                        src = _param_src(kept.get(kind[1], {}).get(dim), ret, shape[dim])
                        if src is not None:
                            new = b.call(ops.expand_param, (new, dim, b.index(src)))
                b.env[node] = new
            elif node.op == "output":
                b.graph.output(torch.fx.node.map_arg(node.args[0], b.dense))
            elif node.op == "get_attr":
                b.env[node] = b.graph.get_attr(node.target)
            else:
                touched = any(b.layout(a) for a in node.all_input_nodes) or b.layout(node)
                if not touched:
                    b.env[node] = b.copy(node)
                    continue
                rule = rule_for(node.target)
                if rule is None:
                    raise NarrowError(f"no narrow rule for {node.target}")
                b.env[node] = rule(b, node)
        except NarrowError as e:
            raise NarrowError(f"{e} at {node.format_node()} in module "
                              f"{module_of(node) or '<root>'!r}") from None
    root = nn.Module()
    for name, t in b.buffers.items():
        root.register_buffer(name, t, persistent=False)
    return torch.fx.GraphModule(root, b.graph)
