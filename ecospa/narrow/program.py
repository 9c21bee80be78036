"""One call of a module, captured as an ATen graph that later runs in its place.

:func:`signature` turns a call ``module(*args, **kwargs)`` into a hashable key or says why the call
cannot be served by a graph (an argument with Python-side state, such as a Hugging Face
``Cache``). :func:`export_call` captures the dense module for such a call with ``torch.export``
(non-strict), every tensor dimension dynamic unless export specialises it, and returns a
:class:`Program`: the graph, what each placeholder is (a parameter, a buffer, a constant, an
input), the guards a later call must pass to reuse it, and the module attributes the capture read.

What a capture can specialise on, and how each is guarded (docs/ARCHITECTURE.md, "Guards"):

========================================  ==================================================
property of a call                        guard
========================================  ==================================================
argument structure, keyword order, None   ``Signature.spec`` (pytree spec of args/kwargs)
non-tensor argument values and types      ``Signature.constants``
a plain dataclass argument (a cache of    ``Signature.spec`` (its class and field names: an
tensors, x-transformers' Intermediates)   ecospa pytree node, ``capture/datafields.py``); its
                                          fields as the other leaves; a field the forward
                                          assigns: refused at the capture
a module passed as an argument (held)     ``Signature.constants``: the module by identity, the
                                          train/eval flags and hooks of its subtree
tensor rank, dtype, device, class          ``Signature.tensors``
requires_grad of each tensor              ``Signature.tensors``
strides / memory format                   ``Signature.tensors`` (contiguous, else stride order
                                          and broadcast dims)
aliasing / identity between arguments     ``Signature.aliases`` (which arguments share storage)
grad mode, default dtype, autocast        ``Signature.modes``/``grad``/``autocast``
train/eval of every module of the scope   ``Signature.modes``
hooks on the scope's submodules           ``Signature.hooks`` (hook ids, global hooks)
tensor sizes                              :meth:`Program.guard` (export's symbols and ranges)
buffers of a held module the graph reads  their shapes (``Program.held_buffers``)
module attributes the forward reads       :class:`Reads`: recorded during the capture, compared
(``num_heads``, ``sliding_window``,        at every call (values; plain tensor attributes by
plain tensor attributes), buffer shapes   identity and version; buffer shapes)
========================================  ==================================================

A module passed as an argument (x-transformers hands its attention the model's ALiBi module) is
*held* (``signature(..., hold_modules=True)``): the signature keeps the object itself, the capture
registers it on the traced wrapper so that its parameters and buffers become graph inputs fed live
at every call (kind ``"held"``), and its computation is traced as part of the region.

Not guarded: attributes of objects that modules hold (a Hugging Face config read as
``self.config.x``) and the plain attributes of a held module: a change to such a setting after a
signature's first call is not seen; make it before pruning. Made general instead of guarded: the module's own hooks (the capture calls
``forward``, its ``__call__`` runs the hooks around the installed forward, once), output classes
pytree does not know (returned as plain containers, rebuilt after the graph), and state a forward
writes while it is captured (restored by ``ecospa.capture.state.preserved``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import operator
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import sympy
import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind

from ecospa.capture.argtypes import rebuildable, register_argument_types
from ecospa.capture.asserts import asserts_as_checks
from ecospa.capture import datafields
from ecospa.capture.inline import WRAPPERS, inline_wrappers
from ecospa.capture.state import preserved

__all__ = ["Program", "Signature", "signature", "export_call", "CallNotServable", "Reads", "hooks_of", "HeldModule",
           "held_modules",
           "plain_output", "track_reads", "MISSING",
           "getter", "feeder", "placeholder_feeds", "stride_order", "value_free", "leaf_name"]

_SIMPLE = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.memory_format,
           torch.layout, type(Ellipsis))
_CONTAINERS = (tuple, list, dict)
_WRAP = "mod"
_HELD = "held"  # prefix of the names a held module argument gets on the traced wrapper


class CallNotServable(Exception):
    """This call cannot run as a captured graph (the reason is the message)."""


@dataclass(frozen=True)
class Signature:
    """What two calls must share to run the same graph (see the table of the module docstring).

    Signatures are dictionary keys on every call of a region: the hash is computed once, and
    the argument structure ``spec`` is interned (:func:`_interned`), so that comparing and hashing
    it does not walk the pytree each time."""

    spec: pytree.TreeSpec
    constants: tuple  # (position, type, value) of every non-tensor leaf
    tensors: tuple  # (ndim, dtype, device, class, requires_grad, strides) of every tensor leaf
    modes: tuple[bool, ...]  # training flag of every module of the subtree
    autocast: tuple
    aliases: tuple = ()  # per tensor leaf: index of the first tensor leaf sharing its storage
    grad: bool = True  # torch.is_grad_enabled()
    default_dtype: torch.dtype = torch.float32
    hooks: tuple = ()  # hook ids of the subtree's modules and the global hooks

    def __post_init__(self) -> None:
        if _INTERNED.get(id(self.spec)) is not self.spec:
            object.__setattr__(self, "spec", _interned(self.spec))

    def _fields(self) -> tuple:
        return (id(self.spec), self.constants, self.tensors, self.modes, self.autocast, self.aliases, self.grad,
                self.default_dtype, self.hooks)

    def __hash__(self) -> int:
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash(self._fields())

    def __eq__(self, other) -> bool:
        if not isinstance(other, Signature):
            return NotImplemented
        return self is other or (hash(self) == hash(other) and self._fields() == other._fields())


# Argument structures seen, interned: ``(len(args), kwargs names)`` of flat calls -> spec (None:
# this pytree does not flatten such a call to its arguments in order), and ``id(spec) -> spec`` of
# every interned spec (they live as long as the process: a handful).
_FLAT_SPECS: dict[tuple, pytree.TreeSpec | None] = {}
_INTERNED: dict[int, pytree.TreeSpec] = {}
_BY_VALUE: dict[pytree.TreeSpec, pytree.TreeSpec] = {}


def _interned(spec: pytree.TreeSpec) -> pytree.TreeSpec:
    """The one spec object equal to ``spec`` (checked for containers ecospa can rebuild)."""
    hit = _BY_VALUE.get(spec)
    if hit is None:
        _check_spec(spec)
        hit = _BY_VALUE.setdefault(spec, spec)
        _INTERNED[id(hit)] = hit
    return hit


def _leaf(v: Any) -> bool:
    return v is None or type(v) is torch.Tensor or isinstance(v, _SIMPLE)


def _shallow(v: Any) -> Any:
    """The structure key of one argument for :func:`_flatten`'s fast path: ``True``/``False`` for
    a leaf (None or not), ``(type, None flags)`` for a plain tuple or list of leaves (Hugging Face's
    ``position_embeddings``), ``(class, field keys)`` for a dataclass instance whose fields are
    such leaves or tuples (x-transformers' ``Intermediates``), ``_DEEP`` for anything else."""
    if _leaf(v):
        return v is None
    kind = type(v)
    if (kind is tuple or kind is list) and all(_leaf(x) for x in v):
        return kind, tuple(x is None for x in v)
    names = _field_names(kind)
    if names is not None and len(getattr(v, "__dict__", names)) == len(names):
        sub = []
        for n in names:
            x = getattr(v, n, _DEEP)
            if _leaf(x):
                sub.append(x is None)
            elif type(x) is tuple and all(_leaf(y) for y in x):
                sub.append((tuple, tuple(y is None for y in x)))
            else:
                return _DEEP
        return kind, tuple(sub)
    return _DEEP


_DEEP = object()
_FIELDS: dict[type, tuple[str, ...] | None] = {}


def _field_names(kind: type) -> tuple[str, ...] | None:
    """The field names of a dataclass (None for any other class), looked up once per class."""
    names = _FIELDS.get(kind, _DEEP)
    if names is _DEEP:
        names = tuple(f.name for f in dataclasses.fields(kind)) if dataclasses.is_dataclass(kind) else None
        _FIELDS[kind] = names
    return names


def _add_leaves(leaves: list, v: Any) -> None:
    """The leaves of one argument of a call on :func:`_flatten`'s fast path, in pytree's order."""
    kind = type(v)
    if kind is tuple or kind is list:
        leaves.extend(v)
        return
    names = _FIELDS.get(kind) if not _leaf(v) else None
    if names is None:
        leaves.append(v)
        return
    for n in names:
        x = getattr(v, n)
        if type(x) is tuple:
            leaves.extend(x)
        else:
            leaves.append(x)


def _flatten(args: tuple, kwargs: dict) -> tuple[list, pytree.TreeSpec]:
    """``pytree.tree_flatten((args, kwargs))`` with an interned spec; calls whose arguments are
    leaves (tensors, plain values) or plain tuples/lists of leaves take a fast path that does
    not walk a pytree (checked once per structure against ``tree_flatten``: same leaves, same
    order)."""
    key = (tuple(_shallow(a) for a in args), tuple((k, _shallow(v)) for k, v in kwargs.items()))
    if not any(k is _DEEP for k in key[0]) and not any(k is _DEEP for _, k in key[1]):
        leaves = []
        for v in (*args, *kwargs.values()):
            _add_leaves(leaves, v)
        if key not in _FLAT_SPECS:
            full, spec = _deep_flatten(args, kwargs)
            same = len(full) == len(leaves) and all(a is b for a, b in zip(full, leaves))
            _FLAT_SPECS[key] = _interned(spec) if same else None
        spec = _FLAT_SPECS[key]
        if spec is not None:
            return leaves, spec
    leaves, spec = _deep_flatten(args, kwargs)
    return leaves, _interned(spec)


def _deep_flatten(args: tuple, kwargs: dict) -> tuple[list, pytree.TreeSpec]:
    """``pytree.tree_flatten((args, kwargs))``, plain dataclass instances flattened into their
    fields (``capture/datafields.py``).

    Raises:
        CallNotServable: a dataclass argument holds a field the graph could not update.
    """
    register_argument_types()  # a BlockMask among the arguments (capture/argtypes.py)
    leaves, spec = pytree.tree_flatten((args, kwargs))
    if any(datafields.is_dataclass_instance(v) for v in leaves):  # x-transformers' Intermediates
        tree, why = datafields.as_nodes((args, kwargs))
        if why is not None:
            raise CallNotServable(why)
        leaves, spec = pytree.tree_flatten(tree)
    return leaves, spec


def _check_spec(spec: pytree.TreeSpec) -> None:
    if spec.type is None or spec.is_leaf():
        return
    if spec.type not in _CONTAINERS and spec.type is not datafields.DataFields and spec.type not in rebuildable() and not (
            isinstance(spec.type, type) and issubclass(spec.type, tuple) and hasattr(spec.type, "_fields")):
        raise CallNotServable(f"an argument of type {getattr(spec.type, '__name__', spec.type)} "
                              "(a container ecospa cannot rebuild around a graph)")
    for child in spec.children():
        _check_spec(child)


def stride_order(t: torch.Tensor) -> Any:
    """None for a contiguous tensor, else what export may rely on: the order of the strides and
    which dimensions are broadcast (stride 0)."""
    if t.is_contiguous():
        return None
    st = t.stride()
    return tuple(sorted(range(len(st)), key=lambda i: (-st[i], i))), tuple(s == 0 for s in st)


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (subclasses): by identity
        return id(t)


_MODULE = sys.modules[nn.Module.__module__]  # torch.nn.modules.module: the global hook tables


def hooks_of(modules: Sequence[nn.Module]) -> tuple:
    """Ids of the forward hooks of ``modules`` and of the global module hooks: a capture holds the
    hooks that ran during it, so adding or removing one needs a new capture."""
    out = [tuple(getattr(_MODULE, "_global_forward_pre_hooks", ())), tuple(getattr(_MODULE, "_global_forward_hooks", ()))]
    for mod in modules:
        if mod._forward_hooks or mod._forward_pre_hooks:
            out.append((id(mod), tuple(mod._forward_pre_hooks), tuple(mod._forward_hooks)))
    return tuple(out)


class HeldModule:
    """A module passed as an argument, held in a signature by identity (with the train/eval flags
    and hooks of its subtree: a capture traces its forward as it is now)."""

    __slots__ = ("module", "_key")

    def __init__(self, module: nn.Module):
        self.module = module
        subtree = list(module.modules())
        self._key = (id(module), tuple(m.training for m in subtree), hooks_of(subtree))

    def __eq__(self, other) -> bool:
        if not isinstance(other, HeldModule):
            return NotImplemented
        return self.module is other.module and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"HeldModule({type(self.module).__name__} at {id(self.module):#x})"


def value_free(sig: Signature) -> tuple:
    """``sig`` with the values of its plain arguments left out (their positions and types kept):
    equal for calls that differ only in such values (a position passed as a Python int)."""
    return (id(sig.spec), tuple((i, t) for i, t, _ in sig.constants), sig.tensors, sig.modes, sig.autocast,
            sig.aliases, sig.grad, sig.default_dtype, sig.hooks)


def leaf_name(sig: Signature, index: int) -> str:
    """The argument of a call with signature ``sig`` that holds its leaf ``index``: a keyword
    (``"start_pos"``), a position (``"argument 1"``), or the keyword/position holding the
    container it is in."""
    n = len(sig.constants) + len(sig.tensors)
    args, kwargs = pytree.tree_unflatten(list(range(n)), sig.spec)
    for where, value in [*((f"argument {i}", v) for i, v in enumerate(args)), *kwargs.items()]:
        if index in pytree.tree_leaves(value):
            return where
    return f"leaf {index}"


def held_modules(sig: Signature) -> list[nn.Module]:
    """The modules ``sig`` holds (module arguments of the call), in argument order."""
    return [v.module for _, _, v in sig.constants if isinstance(v, HeldModule)]


def signature(modules: Sequence[nn.Module], args: tuple, kwargs: dict, *,
              hooks: Sequence[nn.Module] | None = None,
              hold_modules: bool = False) -> tuple[Signature, list[torch.Tensor]]:
    """The :class:`Signature` of a call and its tensor arguments, in order.

    Args:
        modules: the modules of the scope's subtree (their train/eval flags).
        hooks: the modules whose hooks a capture runs (default: ``modules``).
        hold_modules: an ``nn.Module`` argument is held by identity (:class:`HeldModule`); the
            caller checks that it belongs to the model (else a new module per call would be a new
            signature per call).

    Raises:
        CallNotServable: an argument holds Python-side state or is not a plain value.
    """
    leaves, spec = _flatten(args, kwargs)
    tensors, consts, metas, aliases = [], [], [], []
    seen: dict[int, int] = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            key = _storage(leaf)
            aliases.append(seen.setdefault(key, len(tensors)) if key else len(tensors))
            tensors.append(leaf)
            metas.append((leaf.dim(), leaf.dtype, leaf.device, type(leaf), leaf.requires_grad, stride_order(leaf)))
        elif isinstance(leaf, _SIMPLE):
            consts.append((i, type(leaf), leaf))
        elif hold_modules and isinstance(leaf, nn.Module):
            consts.append((i, HeldModule, HeldModule(leaf)))
        else:
            raise CallNotServable(f"an argument of type {type(leaf).__name__} (Python-side state "
                                  "such as a KV cache: the graph cannot update it)")
    dev = tensors[0].device.type if tensors else "cpu"
    on = torch.is_autocast_enabled(dev)
    autocast = (on, torch.get_autocast_dtype(dev) if on else None)
    return Signature(spec, tuple(consts), tuple(metas), tuple(m.training for m in modules), autocast,
                     tuple(aliases), torch.is_grad_enabled(), torch.get_default_dtype(),
                     hooks_of(modules if hooks is None else hooks)), tensors


class _Box:
    """A holder pytree does not know: torch.export puts every attribute of the module it traces
    back as it was (``__dict__.update`` with a copy taken by ``tree_map``, containers rebuilt),
    so what the forward learns must live in an object that copy shares."""

    value: Any = None


class _Call(nn.Module):
    """Calls ``mod.forward`` with the constant leaves of a signature and the given tensors. The
    module's own hooks are left out (its ``__call__`` runs them around the installed forward);
    an output of a class export does not know (a dataclass, an object with attributes) is
    returned as plain containers, rebuilt by :attr:`rebuild`."""

    def __init__(self, module: nn.Module, sig: Signature):
        super().__init__()
        setattr(self, _WRAP, module)
        self.sig = sig
        self._const = {i: v.module if isinstance(v, HeldModule) else v for i, _, v in sig.constants}
        for i, _, v in sig.constants:  # their parameters and buffers become graph inputs
            if isinstance(v, HeldModule):
                self.add_module(f"{_HELD}{i}", v.module)
        self._rebuild = _Box()
        self._assigned = _Box()  # "Class.field" of a dataclass argument the forward assigned

    @property
    def rebuild(self) -> Any:
        """The function that gives back the module's output class (None: nothing to rebuild)."""
        return self._rebuild.value

    def forward(self, *tensors):
        n = len(self._const) + len(tensors)
        it = iter(tensors)
        leaves: list[Any] = [self._const[i] if i in self._const else next(it) for i in range(n)]
        with datafields.watch() as made:  # dataclass arguments rebuilt from their fields
            args, kwargs = pytree.tree_unflatten(leaves, self.sig.spec)
        out = getattr(self, _WRAP).forward(*args, **kwargs)
        self._assigned.value = datafields.assigned(made)
        plain, self._rebuild.value = plain_output(out)
        return plain


def _known(obj: Any) -> bool:
    return (obj is None or isinstance(obj, (torch.Tensor, *_SIMPLE))
            or type(obj) in pytree.SUPPORTED_NODES)


def plain_output(out: Any) -> tuple[Any, Any]:
    """``(plain, rebuild)``: ``out`` with every object of a class pytree does not know (a
    dataclass, an object with attributes) replaced by a dict of its fields, and a function giving
    back an object like ``out`` from such a plain value (None when nothing was replaced)."""
    if _known(out) and not isinstance(out, (tuple, list, dict)):
        return out, None
    if isinstance(out, (tuple, list)) and (type(out) in (tuple, list) or hasattr(out, "_fields")):
        parts = [plain_output(v) for v in out]
        if all(r is None for _, r in parts):
            return out, None
        kind, fields = type(out), [r for _, r in parts]

        def rebuild_seq(p, kind=kind, fields=fields):
            items = [f(v) if f else v for f, v in zip(fields, p)]
            return kind(*items) if hasattr(kind, "_fields") else kind(items)
        return type(out)(p for p, _ in parts) if not hasattr(out, "_fields") else tuple(p for p, _ in parts), rebuild_seq
    if isinstance(out, dict) and type(out) is dict:
        parts = {k: plain_output(v) for k, v in out.items()}
        if all(r is None for _, r in parts.values()):
            return out, None

        def rebuild_dict(p, parts=parts):
            return {k: (parts[k][1](v) if parts[k][1] else v) for k, v in p.items()}
        return {k: v for k, (v, _) in parts.items()}, rebuild_dict
    if _known(out):
        return out, None
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        names = [f.name for f in dataclasses.fields(out) if f.init]
        state = {n: getattr(out, n) for n in names}
        make = lambda d, cls=type(out): cls(**d)  # noqa: E731
    elif hasattr(out, "__dict__") and not isinstance(out, (nn.Module, type)):
        state = dict(vars(out))

        def make(d, cls=type(out)):
            obj = cls.__new__(cls)
            obj.__dict__.update(d)
            return obj
    else:
        return out, None  # export says what it cannot handle
    plain, inner = plain_output(state)
    return plain, (lambda p, make=make, inner=inner: make(inner(p) if inner else p))


class Reads:
    """The plain attributes of a module's subtree that a forward read: the capture depends on
    them. Recorded by :func:`track_reads`; :meth:`values` takes their values on a module of the
    same structure (a twin, or the live module after ``dense_view``)."""

    def __init__(self, names: dict[str, set[str]]):
        self.names = {p: tuple(sorted(n)) for p, n in names.items() if n}

    def values(self, root: nn.Module) -> tuple:
        """``((path, name, kind, value, version), ...)`` of ``root``'s subtree now."""
        out = []
        for path, names in sorted(self.names.items()):
            mod = root.get_submodule(path) if path else root
            for n in names:
                v = mod.__dict__.get(n, MISSING)
                if isinstance(v, torch.Tensor):
                    out.append((path, n, "tensor", v, v._version))
                else:
                    out.append((path, n, "value", v, None))
        return tuple(out)


MISSING = object()  # an attribute a module does not have (in Reads.values)
_TRACKED: dict[type, type] = {}
_READ_LOG: dict[int, set] = {}  # id(module) -> names read, while a capture records them


def _recorded(value: Any) -> bool:
    return (isinstance(value, (*_SIMPLE, torch.Tensor))
            or (isinstance(value, tuple) and all(isinstance(x, _SIMPLE) for x in value)))


def _tracked_class(cls: type) -> type:
    """A subclass of ``cls`` whose attribute reads are logged in ``_READ_LOG`` (same name)."""
    sub = _TRACKED.get(cls)
    if sub is not None:
        return sub

    def __getattribute__(self, name):
        value = super(sub, self).__getattribute__(name)
        log = _READ_LOG.get(id(self))
        if log is not None and name[:1] != "_" and _recorded(value) \
                and name in object.__getattribute__(self, "__dict__"):
            log.add(name)
        return value

    sub = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__})
    _TRACKED[cls] = sub
    return sub


@contextlib.contextmanager
def track_reads(root: nn.Module):
    """Record which plain attributes (numbers, strings, flags, tuples of them, plain tensors) of
    ``root``'s subtree are read inside the block; yields a dict ``{path: set of names}`` filled
    as they are read. A module whose class cannot be swapped for a recording subclass has all its
    plain attributes counted as read (conservative)."""
    names: dict[str, set] = {}
    swapped = []
    try:
        for path, mod in root.named_modules(remove_duplicate=True):
            log = names.setdefault(path, set())
            cls = type(mod)
            try:
                mod.__class__ = _tracked_class(cls)
            except TypeError:
                log.update(k for k, v in mod.__dict__.items() if _recorded(v) and not k.startswith("_"))
                continue
            _READ_LOG[id(mod)] = log
            swapped.append((mod, cls))
        yield names
    finally:
        for mod, cls in swapped:
            mod.__class__ = cls
            _READ_LOG.pop(id(mod), None)
        for log in names.values():
            log.discard("training")  # in the signature already
            log.discard("forward")


@dataclass
class Program:
    """A captured module call.

    Attributes:
        graph: the ATen graph (placeholders: parameters, buffers, constants, then inputs).
        kinds: per placeholder, ``("param" | "buffer", relative name)``, ``("const", tensor)``,
            ``("held", "_parameters" | "_buffers", owner module, attribute name)`` (a tensor of a
            held module argument, see :class:`HeldModule`) or ``("input", position)``.
        out_spec: the structure of the module's output.
        input_shapes: per tensor input, its shape with ints and sympy symbols.
        lower: smallest value of each symbol.
        upper: largest value of the symbols export bounded above (a size compared with a
            buffer's length), absent where unbounded.
        shapes: ``{relative parameter name: shape}`` of the dense module.
        reads: the plain module attributes the forward read while it was captured.
        read_values: their values on the captured (dense) module; a twin module shares this
            program only where its own values are the same.
        buffer_shapes: ``{relative buffer name: shape}`` the graph was captured with.
        rebuild: gives back the module's own output class from the graph's plain output (None:
            the output is made of types pytree knows).
        held_buffers: ``(owner, attribute name, shape)`` of every buffer of a held module
            argument the graph reads.
    """

    graph: torch.fx.Graph
    kinds: list[tuple]
    out_spec: pytree.TreeSpec
    input_shapes: list[tuple]
    lower: dict
    shapes: dict[str, tuple[int, ...]]
    reads: Reads | None = None
    read_values: tuple = ()
    buffer_shapes: dict = dataclasses.field(default_factory=dict)
    rebuild: Any = None
    shared: bool = False  # taken from a twin module's capture
    upper: dict = dataclasses.field(default_factory=dict)
    held_buffers: tuple = ()

    def output(self, flat: Sequence[Any]) -> Any:
        """The module's output from the graph's flat outputs."""
        build = self._unflatten
        out = build(iter(flat)) if build is not None else pytree.tree_unflatten(list(flat), self.out_spec)
        return out if self.rebuild is None else self.rebuild(out)

    @functools.cached_property
    def _unflatten(self):
        """A function of an iterator over the flat outputs that rebuilds an output made of tuples
        and lists only (the common case; runs on every call), or None."""
        return _tuple_builder(self.out_spec)

    def fits_module(self, module: nn.Module, ignore: frozenset | set = frozenset()) -> bool:
        """True when ``module`` (dense, as captured) reads the same attribute values (but those in
        ``ignore``: ``(path, name)`` known not to change the capture) and has the same buffer
        shapes as the module this program was captured on."""
        if self.reads is not None:
            mine = [v for v in self.read_values if (v[0], v[1]) not in ignore]
            theirs = [v for v in self.reads.values(module) if (v[0], v[1]) not in ignore]
            if not _same_values(tuple(theirs), tuple(mine)):
                return False
        return all(tuple(module.get_buffer(n).shape) == shape for n, shape in self.buffer_shapes.items())

    def differing_reads(self, other: "Program") -> set | None:
        """``(path, name)`` of the attributes read with different values by ``other``, a capture of
        the same code whose graph is identical to this one (None when the graphs differ): those
        values did not change the capture."""
        if other.reads is None or self.reads is None or self.reads.names != other.reads.names:
            return None
        if self.graph.python_code("self").src != other.graph.python_code("self").src:
            return None
        return {(a[0], a[1]) for a, b in zip(self.read_values, other.read_values)
                if not _same_values((a,), (b,))}

    def guard(self, tensors: Sequence[torch.Tensor]) -> bool:
        """True when ``tensors`` fit the shapes this program was captured for."""
        bound: dict = {}
        later = []
        for t, shape in zip(tensors, self.input_shapes):
            if t.dim() != len(shape):
                return False
            for size, want in zip(t.shape, shape):
                if isinstance(want, int):
                    if size != want:
                        return False
                elif isinstance(want, sympy.Symbol):
                    if bound.setdefault(want, size) != size or size < self.lower.get(want, 0) \
                            or size > self.upper.get(want, size):
                        return False
                else:
                    later.append((size, want))
        for size, expr in later:
            value = _evaluator(expr)(bound)
            if value is None or value != size:
                return False
        return True


@functools.lru_cache(maxsize=1024)
def _evaluator(expr: sympy.Expr):
    """``f(bound) -> int | None``: the value of a size expression of export's symbols (``s0 + 1``,
    the length of a KV cache after a step) for ``{symbol: size}``, None when it is not a number.
    Sums, products, powers and the integer divisions of torch's shape symbols are compiled to
    Python once per expression (``sympy.subs`` on every call of a decode step cost about a third
    of a millisecond per guard); anything else is substituted by sympy."""
    from torch.utils._sympy import functions as symfn

    def compile_(e):
        if e.is_Integer:
            value = int(e)
            return lambda b: value
        if e.is_Symbol:
            return lambda b: b.get(e)
        parts = [compile_(a) for a in e.args]
        if any(p is None for p in parts):
            return None
        if e.is_Add:
            return lambda b: _fold(parts, b, lambda x, y: x + y)
        if e.is_Mul:
            return lambda b: _fold(parts, b, lambda x, y: x * y)
        if e.is_Pow and e.args[1].is_Integer and int(e.args[1]) >= 0:
            return lambda b: _fold(parts, b, lambda x, y: x ** y)
        if isinstance(e, symfn.FloorDiv):
            return lambda b: _fold(parts, b, lambda x, y: x // y if y else None)
        if isinstance(e, (symfn.Mod, symfn.PythonMod)):
            return lambda b: _fold(parts, b, lambda x, y: x % y if y else None)
        return None

    fn = compile_(expr)
    if fn is not None:
        return fn

    def slow(bound):
        value = expr.subs(bound)
        return int(value) if value.is_number else None
    return slow


def _fold(parts, bound, op):
    """``op`` folded over the values of compiled ``parts`` (None if any is None)."""
    acc = None
    for p in parts:
        v = p(bound)
        if v is None:
            return None
        acc = v if acc is None else op(acc, v)
        if acc is None:
            return None
    return acc


def _tuple_builder(spec: pytree.TreeSpec):
    """``f(iterator) -> value`` rebuilding ``spec`` where it is made of plain tuples, lists, dicts
    (an output dataclass made plain: ``plain_output``) and leaves; None for any other container."""
    if spec.is_leaf():
        return next
    if spec.type not in (tuple, list, dict):
        return None
    parts = [_tuple_builder(c) for c in spec.children()]
    if any(p is None for p in parts):
        return None
    if spec.type is dict:
        keys = list(spec.context)
        return lambda it: {k: p(it) for k, p in zip(keys, parts)}
    kind = spec.type
    return lambda it: kind([p(it) for p in parts])


def _same_values(a: tuple, b: tuple) -> bool:
    """Attribute values from :meth:`Reads.values` equal (tensors: the same object, unchanged)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x[2] == "tensor":
            if x[3] is not y[3] or x[4] != y[4]:
                return False
        elif type(x[3]) is not type(y[3]) or x[3] != y[3]:
            return False
    return True


class _Quiet(logging.Filter):
    """Keeps torch's export chatter (specialisation notes, and the whole FX graph it prints with a
    data-dependent guard) off the user's stderr: a failed export is one line in
    ``execution_report``; the records go to ecospa's logger at DEBUG level."""

    def filter(self, record: logging.LogRecord) -> bool:
        log.debug("torch during a narrow export: %s", record.getMessage().strip().splitlines()[0][:300]
                  if record.getMessage().strip() else "")
        return False


log = logging.getLogger("ecospa")
_EXPORT_LOGGERS = ("torch._export.non_strict_utils", "torch.export", "torch._export", "torch._dynamo",
                   "torch.fx.experimental.symbolic_shapes", "torch._functorch", "torch._subclasses.fake_tensor",
                   "torch.fx.experimental.recording", "torch._guards", "torch.fx._symbolic_trace")


@contextlib.contextmanager
def _quiet_export():
    loggers = [logging.getLogger(n) for n in _EXPORT_LOGGERS]
    filt = _Quiet()
    for lg in loggers:
        lg.addFilter(filt)
    # a failed torch.export prints the partial FX graph to sys.stderr (not through logging)
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    finally:
        for lg in loggers:
            lg.removeFilter(filt)
        if held.getvalue().strip():
            log.debug("torch.export wrote to stderr during a narrow export:\n%s", held.getvalue()[:2000])


@contextlib.contextmanager
def _no_fake_tensor_cache():
    """torch's fake-tensor dispatch cache off during the export: with every dimension symbolic
    its bookkeeping costs more than it saves (a random attention block: about 35% less CPU per
    export, measured for bench/fuzz.py); the exported graph is the same."""
    config = getattr(getattr(torch, "_dynamo", None), "config", None)
    if config is None or not hasattr(config, "fake_tensor_cache_enabled"):
        yield
        return
    with config.patch(fake_tensor_cache_enabled=False):
        yield


def _shape(val) -> tuple:
    out = []
    for s in val.shape:
        if isinstance(s, int):
            out.append(s)
        else:
            expr = s.node.expr
            out.append(int(expr) if expr.is_number else expr)
    return tuple(out)


def _mode_blocks_are_noops(graph: torch.fx.Graph, sig: Signature) -> bool:
    """True when the graph has mode blocks (``with torch.autocast(enabled=False)``, ``with
    torch.no_grad()``, exported as wrapper higher-order ops) and every one of them changes nothing
    for this signature's call (autocast off, gradients off): inlining them is then exact."""
    found = False
    for n in graph.nodes:
        if n.op != "call_function" or n.target not in WRAPPERS:
            continue
        found = True
        name = getattr(n.target, "__name__", str(n.target))
        if name == "wrap_with_autocast":
            if n.args[2] or sig.autocast[0]:
                return False
        elif name == "wrap_with_set_grad_enabled":
            if n.args[0] or sig.grad:
                return False
        elif name != "wrap":
            return False
    return found


@contextlib.contextmanager
def _preserved_all(modules: Sequence[nn.Module]):
    """:func:`~ecospa.capture.state.preserved` around each of ``modules`` (held arguments: an
    ALiBi module that registers its bias table as a buffer when it first runs)."""
    with contextlib.ExitStack() as stack:
        for m in modules:
            stack.enter_context(preserved(m))
        yield


def export_call(module: nn.Module, sig: Signature, tensors: Sequence[torch.Tensor]) -> Program:
    """Capture ``module`` (as it is now: call it inside ``record.dense_view``) for one call.

    Raises:
        CallNotServable: export failed, or the call mutates state (buffers, inputs) that a graph
            run would not write back.
    """
    wrap = _Call(module, sig)
    dyn = (tuple({i: Dim.AUTO for i in range(t.dim())} for t in tensors),)
    try:
        with _quiet_export(), _no_fake_tensor_cache(), torch.inference_mode(False), \
                torch.set_grad_enabled(sig.grad), preserved(module), _preserved_all(held_modules(sig)), \
                track_reads(module) as read, asserts_as_checks():
            ep = torch.export.export(wrap, tuple(tensors), dynamic_shapes=dyn, strict=False)
    except CallNotServable:  # the traced forward itself said why (a stand-in cache not updated)
        raise
    except Exception as exc:  # any export failure: this call runs on the fallback path
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CallNotServable(f"torch.export failed: {type(exc).__name__}: {first[:200]}") from exc
    if wrap._assigned.value is not None:
        raise CallNotServable(f"the forward assigns {wrap._assigned.value} of a dataclass argument, which a graph "
                              "run would not write back")
    bad = [s for s in ep.graph_signature.output_specs if s.kind != OutputKind.USER_OUTPUT]
    if bad:
        raise CallNotServable(f"the forward writes {bad[0].kind.name.lower()} {bad[0].target!r}, which a "
                              "graph run would not write back")
    if _mode_blocks_are_noops(ep.graph, sig):
        inline_wrappers(ep.graph_module)  # e.g. a rotary under autocast(enabled=False), called without autocast
    consts = dict(ep.constants)
    kinds: list[tuple] = []
    n_input = 0
    for spec in ep.graph_signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and not spec.target.startswith(_WRAP + "."):
            kinds.append(_held_kind(wrap, spec.target, spec.kind == InputKind.PARAMETER))
        elif spec.kind == InputKind.PARAMETER:
            kinds.append(("param", spec.target[len(_WRAP) + 1:]))
        elif spec.kind == InputKind.BUFFER:
            kinds.append(("buffer", spec.target[len(_WRAP) + 1:]))
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            kinds.append(("const", consts[spec.target]))
        elif spec.kind == InputKind.USER_INPUT:
            kinds.append(("input", n_input))
            n_input += 1
        else:
            raise CallNotServable(f"an input of kind {spec.kind.name} ({spec.target})")
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    input_shapes = [_shape(n.meta["val"]) for n, k in zip(placeholders, kinds) if k[0] == "input"]
    lower, upper = {}, {}
    for sym, vr in ep.range_constraints.items():
        lo, hi = vr.lower, vr.upper
        lower[sym] = int(lo) if getattr(lo, "is_number", True) and lo not in (-sympy.oo,) else 0
        if getattr(hi, "is_number", True) and getattr(hi, "is_finite", True) is not False and hi < sys.maxsize:
            upper[sym] = int(hi)
    shapes = {k[1]: tuple(int(s) for s in n.meta["val"].shape)
              for n, k in zip(placeholders, kinds) if k[0] == "param"}
    reads = Reads(read)
    buffer_shapes = {k[1]: tuple(int(x) for x in n.meta["val"].shape)  # the buffers the graph reads
                     for n, k in zip(placeholders, kinds) if k[0] == "buffer" and n.users}
    held_buffers = tuple((k[2], k[3], tuple(int(x) for x in n.meta["val"].shape))
                         for n, k in zip(placeholders, kinds) if k[0] == "held" and k[1] == "_buffers" and n.users)
    return Program(ep.graph, kinds, ep.call_spec.out_spec, input_shapes, lower, shapes, reads,
                   reads.values(module), buffer_shapes, wrap.rebuild, upper=upper, held_buffers=held_buffers)


def _held_kind(wrap: nn.Module, target: str, param: bool) -> tuple:
    """The kind of a lifted parameter or buffer that belongs to a held module argument
    (``held<i>.<path>``): ``("held", store, owner module, attribute name)``."""
    path, _, attr = target.rpartition(".")
    if not path.startswith(_HELD):
        raise CallNotServable(f"an input {target!r} that is neither the module's nor a held argument's")
    return ("held", "_parameters" if param else "_buffers", wrap.get_submodule(path), attr)


def getter(root: nn.Module, store: str, name: str):
    """A function returning ``root``'s parameter or buffer ``name`` (``store``: ``"_parameters"``
    or ``"_buffers"``) as it is when called."""
    path, _, attr = name.rpartition(".")
    owner = root.get_submodule(path) if path else root
    return functools.partial(operator.getitem, getattr(owner, store), attr)


def _none() -> None:
    return None


def feeder(feeds: Sequence[Callable[[], Any]]) -> Callable[[], list]:
    """One function returning ``[f() for f in feeds]``: the parameter and buffer lookups of
    :func:`getter` written inline (a dict subscript each) and unread buffers as None, so that a
    call reads its graph's feeds in one Python frame."""
    env: dict[str, Any] = {}
    parts = []
    for i, f in enumerate(feeds):
        if f is _none:
            parts.append("None")
        elif isinstance(f, functools.partial) and f.func is operator.getitem and not f.keywords and len(f.args) == 2:
            env[f"t{i}"], env[f"k{i}"] = f.args
            parts.append(f"t{i}[k{i}]")
        else:
            env[f"f{i}"] = f
            parts.append(f"f{i}()")
    src = f"def feed():\n    return [{', '.join(parts)}]\n"
    exec(compile(src, "<ecospa feeds>", "exec"), env)
    return env["feed"]


def placeholder_feeds(program: Program, module: nn.Module, device) -> tuple[dict, dict, list]:
    """What a graph of ``program`` run on ``module`` is fed before the call's own inputs.

    Returns:
        ``(params, consts, feeds)``: ``{placeholder: relative parameter name}``, ``{placeholder:
        buffer or constant tensor}`` (for the label analysis and the rewrite), and per placeholder
        before the inputs a function giving its value at call time (live parameters and buffers).
        A buffer the graph never reads (an index buffer ecospa's adapters keep, which a capture of
        the dense view lifts with the rest) is fed None: it may come and go between rounds.
    """
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    params, consts, feeds = {}, {}, []
    for node, kind in zip(placeholders, program.kinds):
        if kind[0] == "param":
            params[node.name] = kind[1]
            feeds.append(getter(module, "_parameters", kind[1]))
        elif kind[0] == "buffer":
            if not node.users:
                feeds.append(_none)
                continue
            consts[node.name] = module.get_buffer(kind[1])
            feeds.append(getter(module, "_buffers", kind[1]))
        elif kind[0] == "const":
            consts[node.name] = kind[1]
            value = kind[1].to(device) if device is not None else kind[1]
            feeds.append(lambda v=value: v)
        elif kind[0] == "held":
            if not node.users:
                feeds.append(_none)
                continue
            table = getattr(kind[2], kind[1])
            consts[node.name] = table[kind[3]]
            feeds.append(lambda table=table, name=kind[3]: table[name])
    return params, consts, feeds
