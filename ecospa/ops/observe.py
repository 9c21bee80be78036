"""What a forward hook sees of a linear-like module's input, inside a narrow graph:
``ecospa::observe(out, x, weight)``.

A narrow graph calls no module, so a forward hook on a module inside a region (the input Gram
hooks of ``ecospa.compress``'s calibration) would not run there. A hook that wants to see the
module's input while a region is captured returns ``observe(out, x, weight)`` instead of
nothing: the op returns ``out`` unchanged and puts ``x`` and the module's ``weight`` in the
graph. Its narrow rule calls :func:`observed` with the narrow ``x``, the pruned ``weight`` and
the dense positions of ``x``'s last dimension, which hands them to every active observer
(:func:`observing`). In eager mode (the module's own code) the hook sees its input directly
and needs none of this.

Channel rule: the output carries the labels of ``out``; ``x`` and ``weight`` are only read.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import numpy as np
import torch

from ecospa.ops.registry import NarrowError, narrow_rule, register

__all__ = ["observe", "observed", "observing", "Observer", "unobserved", "is_unobserved"]

aten = torch.ops.aten

#: ``fn(weight, x, positions)``: ``weight`` the module's (pruned) weight, ``x`` its input
#: ``(..., n)``, ``positions`` ``(n,)`` long: the dense position of each of ``x``'s last-dim
#: entries (None: ``x`` has the width the module's own forward would see).
Observer = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]

class _State(threading.local):
    """Per thread: the active observers and the depth of :func:`unobserved` blocks (a check in
    one thread must not mute, or feed, another thread's observers)."""

    def __init__(self) -> None:
        self.active: list[Observer] = []
        self.muted = 0


_STATE = _State()


@contextlib.contextmanager
def unobserved() -> Iterator[None]:
    """Calls made in the block are checks of ecospa's own (a new narrow graph against the exact
    path), not calls of the model: observers are not told, and hooks that gather statistics
    should skip them (:func:`is_unobserved`), or the call that follows would count twice."""
    _STATE.muted += 1
    try:
        yield
    finally:
        _STATE.muted -= 1


def is_unobserved() -> bool:
    """True inside :func:`unobserved`."""
    return _STATE.muted > 0


@contextlib.contextmanager
def observing(fn: Observer) -> Iterator[None]:
    """Hand ``fn`` every input that an ``observe`` op of a narrow graph sees, while in the block."""
    _STATE.active.append(fn)
    try:
        yield
    finally:
        _STATE.active.remove(fn)


def observed(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
             positions: torch.Tensor | None = None) -> torch.Tensor:
    """What the narrow graph runs: tell the active observers, return ``out`` itself."""
    if _STATE.muted or not _STATE.active:
        return out
    for fn in tuple(_STATE.active):
        fn(weight, x, positions)
    return out


@torch.library.custom_op("ecospa::observe", mutates_args=())
def observe(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out`` (a copy), with the module input ``x`` and its ``weight`` shown to the observers."""
    observed(out, x, weight)
    return out.clone()


@observe.register_fake
def _observe_fake(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(out)


def _observe_setup(ctx, inputs, output) -> None:
    return None


def _observe_backward(ctx, grad: torch.Tensor):
    return grad, None, None


observe.register_autograd(_observe_backward, setup_context=_observe_setup)


@register("ecospa::observe", facts=("layout", "compact", "linear", "zero", "observer"))
def _observe_labels(ctx, node: torch.fx.Node):
    """Channel rule: the labels of ``out``; the input and the weight are only read."""
    return ctx.factors(node.args[0])


@narrow_rule("ecospa::observe")
def _observe_narrow(b, node: torch.fx.Node):
    """Narrow rule: :func:`observed` on the narrow tensors, with the dense positions of the
    input's last dimension (a per-head layout there cannot be told to an observer)."""
    out, x, weight = node.args[0], node.args[1], node.args[2]
    lay = b.layout(x)
    last = len(b.shape(x)) - 1
    positions = None
    if lay:
        if set(lay) != {last}:
            raise NarrowError("an observed module input is narrowed in other dims than its last")
        n = lay[last]
        if n.selectors:
            raise NarrowError("an observed module input is narrowed per head (ragged padding)")
        positions = b.index(np.asarray(n.index))
    b.zero[node] = b.zero.get(out, True)
    # the parameter as the model holds it (its placeholder, not a copy padded for ragged heads):
    # observers know it by identity
    return b.call(observed, (b.env[out], b.env[x], b.raw.get(weight, b.env[weight]), positions))
