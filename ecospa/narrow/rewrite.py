"""Build the narrow graph of a captured call: same ops, fewer positions.

:func:`rewrite` walks the captured graph in order and asks each op's narrow rule
(``ecospa.ops``: each op's narrow rule) for its narrow version. Parameters enter as they are in the
pruned model (only kept slices). Ragged heads carry padding units in the head-blocked tensors
only: the views between a projection (exact widths) and its heads scatter to and gather from the
padded layout (:meth:`Builder.run_rule`); a parameter that is itself laid out in heads is padded
with zero slices (``ops.expand_param``). Index tensors become buffers of the resulting
``torch.fx.GraphModule``, so ``.to(device)`` moves them.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn as nn

from ecospa.ops import runtime as ops
from ecospa.ir.narrowing import Narrowing
from ecospa.narrow.positions import Layout, same_layout
from ecospa.narrow.program import Program
from ecospa.ops.base import returned_input
from ecospa.ops.registry import NarrowError, spec
from ecospa.ops.inplace import store_write
from ecospa.analysis.mutation import base_of, written_arg
from ecospa.narrow import fastcall, stored
from ecospa.narrow.stored import read_stored, stored_nodes
from ecospa.capture.export import module_of

aten = torch.ops.aten

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
        self._padded_env: dict[torch.fx.Node, torch.fx.Node] = {}
        # tensors written in place and read back (``narrow.stored``): module buffers stored at
        # the kept widths (``narrow_stored``: the buffers, their views and the writes into them)
        # and tensors kept at their dense width (``stored``: gathered where read)
        self.stored: frozenset[torch.fx.Node] = frozenset()
        self.narrow_stored: frozenset[torch.fx.Node] = frozenset()
        # the new placeholder of each parameter, before any padding (``env`` may hold a padded copy)
        self.raw: dict[torch.fx.Node, torch.fx.Node] = {}
        self.slots: list[stored.BufferSlot] = []
        # inputs of the call gathered at the retained positions: their dense placeholder
        self.inputs: dict[torch.fx.Node, torch.fx.Node] = {}
        self._twins: dict[torch.fx.Node, torch.fx.Node | None] = {}

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
        if not lay or node in self.stored:  # stored tensors are dense already
            return new
        if not self.zero.get(node, True):
            twin = self.dense_twin(node)
            if twin is None:
                raise NarrowError("the module returns pruned channels that are not zero")
            return twin
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

    def dense_twin(self, node: torch.fx.Node) -> torch.fx.Node | None:
        """``node`` computed at its dense width from dense operands, for an output whose dropped
        positions are not known to be zero: the call's inputs as they came (``self.inputs``), nodes
        whose dropped positions are zero scattered back (:meth:`dense`), joined by ops that move
        whole positions along dims that are not narrowed (``cat``, ``slice``, ``clone``). A KV
        cache returned as ``cat(past, new)`` is then exact for any past, also one whose removed
        channels are not zero. None where ``node`` is not such a computation."""
        memo = self._twins
        if node in memo:
            return memo[node]
        twin = None
        lay = self.layout(node)
        if node in self.inputs:
            twin = self.inputs[node]
        elif not lay or self.zero.get(node, True):
            twin = self.dense(node)
        elif node.op == "call_function" and node.target in _TWIN_OPS:
            nd = len(self.shape(node))
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            tensors = node.args[0] if node.target in _JOINS else [node.args[0]]
            if node.target in _JOINS or node.target in _SLICES:
                if not isinstance(dim, int) or dim % nd in lay:
                    return None
            parts = [self.dense_twin(a) if isinstance(a, torch.fx.Node) else None for a in tensors]
            if all(p is not None for p in parts):
                if node.target in _JOINS:
                    twin = self.call(node.target, (parts, *node.args[1:]), dict(node.kwargs))
                else:
                    twin = self.call(node.target, (parts[0], *node.args[1:]), dict(node.kwargs))
        memo[node] = twin
        return twin

    def relayout(self, new: torch.fx.Node, have: Mapping[int, Narrowing], want: Mapping[int, Narrowing]) -> torch.fx.Node:
        """``new`` moved from layout ``have`` to layout ``want`` of the same tensor, where one
        holds the other's positions along every dim: exact widths scattered into the padded ones
        (zeros at the padding units), or padded widths gathered down to the exact ones."""
        for dim in sorted(set(have) | set(want)):
            h, w = have.get(dim), want.get(dim)
            size = (h if h is not None else w).size
            hi = np.arange(size) if h is None else h.index  # not narrowed: every dense position
            wi = np.arange(size) if w is None else w.index
            if hi.ndim != 1 or wi.ndim != 1:
                raise NarrowError(f"exact and padded widths laid out per head along dim {dim}")
            if np.array_equal(hi, wi):
                continue
            if np.isin(hi, wi).all():  # exact -> padded
                pos = np.searchsorted(wi, hi)
                new = self.call(ops.scatter, (new, dim, self.index(pos), wi.size))
            elif np.isin(wi, hi).all():  # padded -> exact
                pos = np.searchsorted(hi, wi)
                new = self.call(ops.gather, (new, dim, self.index(pos), 0))  # 1-D: index_select
            else:
                raise NarrowError(f"exact and padded positions do not nest along dim {dim}")
        return new

    def run_rule(self, rule, node: torch.fx.Node) -> torch.fx.Node:
        """``rule(self, node)``; where the node or one of its inputs runs at exact widths and the
        other side carries padding units (the views between projections and heads), the rule
        sees every tensor with the padding (exact inputs scattered once, cached) and an exact
        node's result is gathered back down to its exact widths."""
        padded, blocked = self.lay.padded, self.lay.blocked
        if not padded or (node not in blocked and not any(a in blocked for a in node.all_input_nodes)):
            return rule(self, node)  # flat tensors only: exact widths in and out
        # a tuple (split) is consumed by getitems: each piece has its own exact and padded layouts
        ins = [a for a in node.all_input_nodes if isinstance(padded.get(a), dict)]
        saved_env = {a: self.env[a] for a in ins}
        saved_lay = {n: self.lay.nodes[n] for n in ins + ([node] if node in padded else [])}
        try:
            for a in ins:
                if a not in self._padded_env:
                    self._padded_env[a] = self.relayout(self.env[a], self.layout(a), padded[a])
                self.env[a] = self._padded_env[a]
                self.lay.nodes[a] = padded[a]
            if node in padded:
                self.lay.nodes[node] = padded[node]
            new = rule(self, node)
        finally:
            self.env.update(saved_env)
            self.lay.nodes.update(saved_lay)
        if node in padded:
            new = self.relayout(new, padded[node], self.layout(node))
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
                if not mine.same(nar):
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


_JOINS = frozenset({aten.cat.default})
_SLICES = frozenset({aten.slice.Tensor})
# ops that move whole positions (Builder.dense_twin): joins and slices along a dim not narrowed
_TWIN_OPS = _JOINS | _SLICES | frozenset({aten.clone.default, aten.alias.default})


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
    _plan_stored(b, program)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    kinds = dict(zip(placeholders, program.kinds))
    narrow_roots = {n: i for i, n in enumerate(placeholders) if n in b.narrow_stored}
    for node in program.graph.nodes:
        try:
            if node.op == "placeholder":
                new = b.graph.placeholder(node.name)
                new.meta["val"] = node.meta.get("val")
                b.raw[node] = new
                kind = kinds[node]
                if node in narrow_roots:  # a buffer stored at the kept widths: fed narrow
                    b.slots.append(stored.BufferSlot(narrow_roots[node], kind[1], b.shape(node),
                                                     tuple(b.layout(node).values())))
                    b.zero[node] = True  # every write into it is checked to be (store_write)
                elif kind[0] == "param" and kind[1] in layout.retained:
                    shape = program.shapes[kind[1]]
                    for dim, ret in sorted(layout.retained[kind[1]].items()):
                        src = _param_src(kept.get(kind[1], {}).get(dim), ret, shape[dim])
                        if src is not None:
                            new = b.call(ops.expand_param, (new, dim, b.index(src)))
                elif kind[0] == "input" and b.layout(node) and node not in b.stored:
                    # an input whose channels meet removed ones elementwise (a rotary table times
                    # a single k head): gathered at the retained positions; they are not zero
                    ndim = len(b.shape(node))
                    b.inputs[node] = new
                    for dim, nar in sorted(b.layout(node).items()):
                        new = b.gather(new, dim, nar.index, nar.selectors, ndim)
                    b.zero[node] = False
                b.env[node] = new
            elif node.op == "output":
                b.graph.output(torch.fx.node.map_arg(node.args[0], b.dense))
            elif node.op == "get_attr":
                b.env[node] = b.graph.get_attr(node.target)
            elif (src := _identity_of(b, node)) is not None:
                b.env[node] = b.env[src]
                b.zero[node] = b.zero.get(src, True)
            elif node in b.stored:  # a view of a stored tensor or a write into it: dense
                b.env[node] = store_write(b, node) if written_arg(node) is not None else b.copy(node)
                b.zero[node] = True
            elif b.stored and any(a in b.stored for a in node.all_input_nodes):
                b.env[node] = read_stored(b, node, lambda node=node: _narrow(b, node))
            else:
                b.env[node] = _narrow(b, node)
        except NarrowError as e:
            raise NarrowError(f"{e} at {node.format_node()} in module "
                              f"{module_of(node) or '<root>'!r}") from None
    clean = _common_reads(b.graph)
    _shared_gathers(b, clean)
    _drop_unread_views(b.graph)
    root = nn.Module()
    for name, t in b.buffers.items():
        root.register_buffer(name, t, persistent=False)
    _copy_attrs(program.graph, root)
    gm = fastcall.bind(torch.fx.GraphModule(root, b.graph))
    if b.slots:
        gm.meta[stored.META] = tuple(b.slots)
    return gm


def _identity_of(b: Builder, node: torch.fx.Node) -> torch.fx.Node | None:
    """The input ``node`` returns unchanged in eager mode, where the narrow graph may use that
    input's value in its place: ``aten.alias`` (a view with the same metadata; not where the
    module returns it, nor for tensors kept at their dense width), ``aten.to`` to the dtype the
    tensor has (``Tensor.to`` returns the tensor itself then) and ``aten.dropout`` with ``train``
    false (an eval-mode dropout returns its input). Exported graphs of research code
    carry several per attention call; each is one dispatch less per decode step."""
    if node in b.stored:
        return None
    src = returned_input(node)
    if src is None or (node.target is aten.alias.default and any(u.op == "output" for u in node.users)):
        return None
    if src not in b.env or src in b.stored:
        return None
    return src if same_layout(b.layout(node), b.layout(src), selectors=True) else None


# ops that only view their input (no writes, no copies): one nothing reads is left out
_VIEWS = (aten.slice.Tensor, aten.view.default, aten.transpose.int, aten.unsqueeze.default, aten.select.int,
          aten.expand.default, aten.alias.default, aten.sym_size.int)


def _drop_unread_views(graph: torch.fx.Graph) -> None:
    """Views that nothing reads (a rule left them behind: the empty piece of a join it dropped)
    are left out of the graph; each would cost a dispatch per call."""
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.target in _VIEWS and not node.users:
            graph.erase_node(node)


def _common_reads(graph: torch.fx.Graph) -> dict[torch.fx.Node, bool]:
    """Ops computed twice from the same inputs, one copy kept (torchtune applies its rotary table
    to the queries and to the keys, each time indexing the table anew: the index, its views and
    the gathers at the kept channels were all done twice). Only *clean* nodes are merged: a
    functional ATen op (no input written, not seeded-random, tensors out) whose inputs are clean
    too, down to graph inputs and constants that nothing in the graph writes in place, and
    whose own value nothing writes or returns. Such a node computes the same value wherever it
    stands. Returns which nodes are clean."""
    written = {base_of(n.args[k])[1] for n in graph.nodes if (k := written_arg(n)) is not None}
    if any(w.op == "call_function" and not _functional(w.target) for w in written):
        return {}  # a write through an alias the schemas do not declare (a split's piece): not followed
    clean: dict[torch.fx.Node, bool] = {}
    seen: dict[tuple, torch.fx.Node] = {}
    for node in list(graph.nodes):
        if node.op in ("placeholder", "get_attr"):
            clean[node] = node not in written
            continue
        ok = (node.op == "call_function" and node not in written and _functional(node.target)
              and all(clean.get(a, False) for a in node.all_input_nodes)
              and not any(u.op == "output" for u in node.users))
        clean[node] = ok
        if not ok:
            continue
        key = _frozen((node.target, node.args, tuple(sorted(node.kwargs.items()))))
        if key is None:
            continue
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
    return clean


def _functional(target) -> bool:
    """An ATen op that writes none of its inputs, draws no random numbers and returns tensors."""
    schema = getattr(target, "_schema", None)
    if schema is None or schema.is_mutable or not schema.returns:
        return False
    if torch.Tag.nondeterministic_seeded in getattr(target, "tags", ()):
        return False
    return all(isinstance(r.type, torch.TensorType) for r in schema.returns)


def _frozen(value):
    """``value`` as a hashable key (lists as tuples, nodes by identity), or None."""
    if isinstance(value, (list, tuple)):
        items = [_frozen(v) for v in value]
        return None if any(i is None and v is not None for i, v in zip(items, value)) else (type(value).__name__, *items)
    try:
        hash(value)
    except TypeError:
        return None
    return value


def _shared_gathers(b: Builder, clean: Mapping[torch.fx.Node, bool]) -> None:
    """One gather per (tensor, dim, positions): the rule of each elementwise op gathers its own
    copy of a shared operand (the rotary ``cos``/``sin`` tables of the queries and of the keys,
    at the same kept channels); later copies are replaced by the first and their index buffers
    dropped. ``ops.gather`` is pure, so the graph computes the same as long as the gathered tensor
    is not written between the two: in a graph that writes any tensor in place (a KV cache in a
    module buffer), only gathers of views of a graph input that nothing writes are shared (a
    copy may otherwise read a tensor before a write and the other after it, and aliases an op's
    schema does not declare, the pieces of a ``split``, cannot all be followed)."""
    seen: dict[tuple, torch.fx.Node] = {}
    written = set()
    for n in b.graph.nodes:
        k = written_arg(n)
        if k is not None:
            written.add(base_of(n.args[k])[1])
    for node in list(b.graph.nodes):
        if node.op != "call_function" or node.target is not ops.gather:
            continue
        x, dim, index, ndim = node.args
        if not isinstance(index, torch.fx.Node) or index.op != "get_attr" or index.target not in b.buffers:
            continue
        if written and not clean.get(x, False):  # (``_common_reads``: made from unwritten inputs only)
            base = base_of(x)[1]
            if not isinstance(base, torch.fx.Node) or base.op != "placeholder" or base in written:
                continue
        t = b.buffers[index.target]
        key = (x, dim, ndim, tuple(t.shape), t.numpy().tobytes())
        first = seen.setdefault(key, node)
        if first is node:
            continue
        node.replace_all_uses_with(first)
        b.graph.erase_node(node)
        if not index.users:
            b.graph.erase_node(index)
            del b.buffers[index.target]


def _plan_stored(b: Builder, program: Program) -> None:
    """Which tensors written in place the graph stores at the kept widths (module buffers whose
    layout narrows them: ``b.narrow_stored``) and which at their dense width (``b.stored``); a
    graph that would gather a dense one is refused unless ``stored.SERVE`` (see ``narrow.stored``)."""
    graph = program.graph
    roots = stored.narrow_buffers(graph, program.kinds, b.layout)
    b.narrow_stored = stored_nodes(graph, roots=set(roots)) if roots else frozenset()
    b.stored = stored_nodes(graph, skip=roots)
    if not stored.SERVE and any(b.layout(n) for n in b.stored):
        raise NarrowError(stored.REFUSED)


def _narrow(b: Builder, node: torch.fx.Node) -> torch.fx.Node:
    """The new node of ``node``: copied where nothing about it is narrowed, else its narrow rule."""
    touched = any(b.layout(a) for a in node.all_input_nodes) or b.layout(node)
    if not touched:
        return b.copy(node)
    known = spec(node.target)
    rule = known.narrow if known is not None else None
    if rule is None:
        why = f": {known.no_narrow}" if known is not None and known.no_narrow else ""
        raise NarrowError(f"no narrow rule for {node.target}{why}")
    return b.run_rule(rule, node)


def _copy_attrs(graph: torch.fx.Graph, root: nn.Module) -> None:
    """The submodules and constants the captured graph reads by ``get_attr`` (the ``score_mod``
    and ``mask_mod`` subgraphs of FlexAttention), put on ``root`` under the same names."""
    owner = graph.owning_module
    for node in graph.nodes:
        if node.op != "get_attr" or owner is None:
            continue
        *path, last = node.target.split(".")
        value = owner
        for part in node.target.split("."):
            value = getattr(value, part, None)
        parent = root
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        if hasattr(parent, last) or value is None:
            continue
        if isinstance(value, nn.Module):
            parent.add_module(last, value)
        elif isinstance(value, torch.Tensor):
            parent.register_buffer(last, value, persistent=False)
        else:
            setattr(parent, last, value)
