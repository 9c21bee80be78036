"""The typed results of the narrow pipeline: per call signature and shape variant an :class:`Entry`
(a narrow graph with the :class:`Strategy` that built it, or a :class:`Refusal` kind and its
reason), the ladder of strategies, and the output check against the exact path.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.utils._pytree as pytree

from ecospa.narrow.program import MISSING, Program, feeder, plain_output

__all__ = ["MAX_VARIANTS", "MAX_VALUES", "Refusal", "Strategy", "LADDER", "Entry", "is_random", "output_tensors", "outputs_close"]

MAX_VARIANTS = 8  # shape variants per signature before a signature stays on the fallback
# signatures differing only in the values of plain arguments before new values run the fallback
MAX_VALUES = 8
_GUARD_MEMO = 64  # input shapes whose guard an entry remembers
_RANDOM = {"dropout", "native_dropout", "feature_dropout", "alpha_dropout", "bernoulli", "rand",
           "randn", "rand_like", "randn_like", "randint", "multinomial"}


class Refusal:
    """Why a call runs the fallback: the kind of each reason (tests and retries read the kind,
    never the text)."""

    UNSERVABLE = "unservable"  # the call cannot be a graph (Python-side state, export failed)
    SPECIALISED = "specialised"  # the capture specialised on something this call does not match
    NO_RULE = "no-rule"  # an op without a narrow rule, or a layout the rules cannot express
    BUG = "bug"  # building the narrow graph raised: a bug in a narrow rule
    MISMATCH = "mismatch"  # the narrow graph was checked against the exact path and differed
    VERIFY = "verify"  # under verify, a later call of the signature differed
    LIMIT = "limit"  # too many shape variants


@dataclass(frozen=True)
class Strategy:
    """One rung of the ladder of layouts a narrow graph is built with, tried in order until one
    builds and checks: heads whose units all went are left out (``drop``) where the graph allows
    it, and the projections of ragged heads run at their exact kept widths with only the head
    views padded (``exact``); each later rung pads more (the weights too, then every head)."""

    name: str
    drop: bool
    exact: bool

    def redundant(self, prev) -> str | None:
        """Why this rung would build the same layout as the previous one (then it is skipped)."""
        if prev is None:
            return None
        strategy, layout = prev
        if not self.drop and strategy.drop and not layout.dropped:
            return "same layout: no head was left out"
        if not self.exact and strategy.exact and not layout.problem and layout.padded == {}:
            return "same layout: nothing ran at exact widths"
        return None


LADDER = (Strategy("dropped-heads exact-projections", True, True), Strategy("dropped-heads padded", True, False),
          Strategy("kept-heads exact-projections", False, True), Strategy("kept-heads padded", False, False))


@dataclass
class Entry:
    """One shape variant of one signature: its dense program and narrow graph, or why not.

    ``state`` holds, per module attribute the capture read, ``(attribute dict, name, kind, value,
    version)`` as the live module had them when the entry was built: the entry serves only calls
    made while they are unchanged (see program.py's table of guards)."""

    program: Program | None
    gm: torch.fx.GraphModule | None = None
    reason: str | None = None
    calls: int = 0
    feeds: list = field(default_factory=list)  # per placeholder before the inputs: a getter
    refusal: str | None = None  # a Refusal kind when gm is None
    state: tuple = ()
    buffers: tuple = ()  # (getter, shape) of every buffer the graph reads
    verified: set = field(default_factory=set)  # input shapes checked under verify
    strategy: str | None = None  # the LADDER rung (or "grouped") that built gm
    tried: tuple = ()  # (strategy, Refusal kind or why skipped) of the rungs before it
    guarded: dict = field(default_factory=dict)  # input shapes -> their guard (``remembered``)

    @functools.cached_property
    def feed(self) -> Callable[[], list]:
        """The values of :attr:`feeds` at call time, in one call (``program.feeder``)."""
        return feeder(self.feeds)

    def fits(self, tensors) -> bool:
        """:meth:`Program.guard` of ``tensors``, remembered per input shapes (a guard reads
        nothing but the shapes; a decode loop repeats a handful of them)."""
        return self.remembered(tensors, lambda: self.program.guard(tensors))

    def remembered(self, tensors, guard: Callable[[], bool]) -> bool:
        """``guard()``, computed once per input shapes of ``tensors`` (kept in ``guarded``, cleared
        past ``_GUARD_MEMO`` shapes)."""
        key = tuple([t.shape for t in tensors])
        ok = self.guarded.get(key)
        if ok is None:
            if len(self.guarded) >= _GUARD_MEMO:
                self.guarded.clear()
            ok = self.guarded[key] = guard()
        return ok

    def state_ok(self) -> bool:
        """True while the module attributes and buffer shapes the capture depends on are unchanged."""
        for d, name, kind, value, version in self.state:
            v = d.get(name, MISSING)
            if kind == "tensor":
                if v is not value or v._version != version:
                    return False
            elif v is not value and (type(v) is not type(value) or v != value):
                return False
        for get, shape in self.buffers:
            if getattr(get(), "shape", None) != shape:  # (a held module's buffer may become None)
                return False
        return True


def is_random(program: Program) -> bool:
    """True when the captured call draws random numbers (active dropout, rand, ...): its narrow
    graph cannot be checked against the exact path by running both."""
    for n in program.graph.nodes:
        if n.op != "call_function":
            continue
        name = getattr(getattr(n.target, "overloadpacket", None), "__name__", "")
        if name in _RANDOM:
            if name in ("dropout", "feature_dropout", "alpha_dropout") and (not n.args[2] or n.args[1] == 0):
                continue
            if name == "native_dropout" and (n.args[2] is False or n.args[1] == 0):
                continue
            return True
    return False


def output_tensors(out) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    out, _ = plain_output(out)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def outputs_close(a, b) -> str | None:
    """None when two call outputs match (fp32: rel err <= 1e-3), else what differs."""
    ta, tb = output_tensors(a), output_tensors(b)
    if len(ta) != len(tb):
        return f"{len(ta)} outputs instead of {len(tb)}"
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            return f"an output of shape {tuple(x.shape)} instead of {tuple(y.shape)}"
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return "an integer output differs"
            continue
        tol = 1e-3 if x.dtype in (torch.float32, torch.float64) else 5e-2
        denom = float(y.double().norm()) or 1.0
        err = float((x.double() - y.double()).norm()) / denom
        if not err <= tol:
            return f"outputs differ from the exact path (relative error {err:.1e})"
    return None
