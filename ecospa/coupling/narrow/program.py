"""One call of a module, captured as an ATen graph that later runs in its place.

:func:`signature` turns a call ``module(*args, **kwargs)`` into a hashable key (argument
structure, constant arguments, tensor ranks/dtypes/devices, train/eval flags, autocast) or says
why the call cannot be served by a graph (an argument with Python-side state, such as a
Hugging Face ``Cache``). :func:`export_call` captures the dense module for such a call with
``torch.export`` (non-strict), every tensor dimension dynamic unless export specialises it, and
returns a :class:`Program`: the graph, what each placeholder is (a parameter, a buffer, a constant,
an input) and the guards a later call must pass to reuse it.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import sympy
import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind

__all__ = ["Program", "Signature", "signature", "export_call", "CallNotServable"]

_SIMPLE = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.memory_format,
           torch.layout, type(Ellipsis))
_CONTAINERS = (tuple, list, dict)
_WRAP = "mod"


class CallNotServable(Exception):
    """This call cannot run as a captured graph (the reason is the message)."""


@dataclass(frozen=True)
class Signature:
    """What two calls must share to run the same graph."""

    spec: pytree.TreeSpec
    constants: tuple  # (position, type, value) of every non-tensor leaf
    tensors: tuple  # (ndim, dtype, device) of every tensor leaf
    modes: tuple[bool, ...]  # training flag of every module of the subtree
    autocast: tuple


def _check_spec(spec: pytree.TreeSpec) -> None:
    if spec.type is None or spec.is_leaf():
        return
    if spec.type not in _CONTAINERS and not (isinstance(spec.type, type) and issubclass(spec.type, tuple)
                                             and hasattr(spec.type, "_fields")):
        raise CallNotServable(f"an argument of type {getattr(spec.type, '__name__', spec.type)} "
                              "(a container ecospa cannot rebuild around a graph)")
    for child in spec.children():
        _check_spec(child)


def signature(modules: Sequence[nn.Module], args: tuple, kwargs: dict) -> tuple[Signature, list[torch.Tensor]]:
    """The :class:`Signature` of a call and its tensor arguments, in order.

    Raises:
        CallNotServable: an argument holds Python-side state or is not a plain value.
    """
    leaves, spec = pytree.tree_flatten((args, kwargs))
    _check_spec(spec)
    tensors, consts, metas = [], [], []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            tensors.append(leaf)
            metas.append((leaf.dim(), leaf.dtype, leaf.device))
        elif isinstance(leaf, _SIMPLE):
            consts.append((i, type(leaf), leaf))
        else:
            raise CallNotServable(f"an argument of type {type(leaf).__name__} (Python-side state "
                                  "such as a KV cache: the graph cannot update it)")
    dev = tensors[0].device.type if tensors else "cpu"
    autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None)
    return Signature(spec, tuple(consts), tuple(metas), tuple(m.training for m in modules), autocast), tensors


class _Call(nn.Module):
    """Calls ``mod`` with the constant leaves of a signature and the given tensors."""

    def __init__(self, module: nn.Module, sig: Signature):
        super().__init__()
        setattr(self, _WRAP, module)
        self.sig = sig
        self._const = {i: v for i, _, v in sig.constants}

    def forward(self, *tensors):
        n = len(self._const) + len(tensors)
        it = iter(tensors)
        leaves: list[Any] = [self._const[i] if i in self._const else next(it) for i in range(n)]
        args, kwargs = pytree.tree_unflatten(leaves, self.sig.spec)
        return getattr(self, _WRAP)(*args, **kwargs)


@dataclass
class Program:
    """A captured module call.

    Attributes:
        graph: the ATen graph (placeholders: parameters, buffers, constants, then inputs).
        kinds: per placeholder, ``("param" | "buffer", relative name)``, ``("const", tensor)``
            or ``("input", position)``.
        out_spec: the structure of the module's output.
        input_shapes: per tensor input, its shape with ints and sympy symbols.
        lower: smallest value of each symbol.
        shapes: ``{relative parameter name: shape}`` of the dense module.
    """

    graph: torch.fx.Graph
    kinds: list[tuple]
    out_spec: pytree.TreeSpec
    input_shapes: list[tuple]
    lower: dict
    shapes: dict[str, tuple[int, ...]]

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
                    if bound.setdefault(want, size) != size or size < self.lower.get(want, 0):
                        return False
                else:
                    later.append((size, want))
        for size, expr in later:
            value = expr.subs(bound)
            if not value.is_number or int(value) != size:
                return False
        return True


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "specialized" not in record.getMessage() and "Dim.AUTO" not in record.getMessage()


@contextlib.contextmanager
def _quiet_export():
    loggers = [logging.getLogger(n) for n in ("torch._export.non_strict_utils", "torch.export",
                                              "torch._dynamo", "torch.fx.experimental.symbolic_shapes")]
    filt = _Quiet()
    for lg in loggers:
        lg.addFilter(filt)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(filt)


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


def export_call(module: nn.Module, sig: Signature, tensors: Sequence[torch.Tensor]) -> Program:
    """Capture ``module`` (as it is now: call it inside ``record.dense_view``) for one call.

    Raises:
        CallNotServable: export failed, or the call mutates state (buffers, inputs) that a graph
            run would not write back.
    """
    wrap = _Call(module, sig)
    dyn = (tuple({i: Dim.AUTO for i in range(t.dim())} for t in tensors),)
    try:
        with _quiet_export(), _no_fake_tensor_cache(), torch.enable_grad(), torch.inference_mode(False):
            ep = torch.export.export(wrap, tuple(tensors), dynamic_shapes=dyn, strict=False)
    except Exception as exc:  # any export failure: this call runs on the fallback path
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CallNotServable(f"torch.export failed: {type(exc).__name__}: {first[:200]}") from exc
    bad = [s for s in ep.graph_signature.output_specs if s.kind != OutputKind.USER_OUTPUT]
    if bad:
        raise CallNotServable(f"the forward writes {bad[0].kind.name.lower()} {bad[0].target!r}, which a "
                              "graph run would not write back")
    consts = dict(ep.constants)
    kinds: list[tuple] = []
    n_input = 0
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.PARAMETER:
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
    lower = {}
    for sym, vr in ep.range_constraints.items():
        lo = vr.lower
        lower[sym] = int(lo) if getattr(lo, "is_number", True) and lo not in (-sympy.oo,) else 0
    shapes = {k[1]: tuple(int(s) for s in n.meta["val"].shape)
              for n, k in zip(placeholders, kinds) if k[0] == "param"}
    return Program(ep.graph, kinds, ep.call_spec.out_spec, input_shapes, lower, shapes)
