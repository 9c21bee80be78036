"""The registry of op rules: how each op moves channel labels from its inputs to its output.

A rule is a small function ``rule(ctx, node) -> value`` where value is a list of factors for a
tensor output (see ``ecospa.graph.labels``), a tuple of such lists for ops returning several
tensors, or None for non-tensor outputs. Rules are keyed by ATen overload packet (so
``aten.view.default`` and ``aten.view.dtype`` share one) or by Python callable. Adding support
for an op is adding one rule and a test.
"""
from __future__ import annotations

from typing import Callable

__all__ = ["RULES", "register", "lookup", "Rule"]

Rule = Callable[..., object]
RULES: dict[object, Rule] = {}


def _key(target):
    return getattr(target, "overloadpacket", target)


def register(*targets) -> Callable[[Rule], Rule]:
    """Register ``fn`` as the rule for each op in ``targets``; double registration is an error."""

    def deco(fn: Rule) -> Rule:
        for t in targets:
            k = _key(t)
            if k in RULES:
                raise RuntimeError(f"op rule for {k} registered twice ({RULES[k].__name__}, {fn.__name__})")
            RULES[k] = fn
        return fn

    return deco


def lookup(target) -> Rule | None:
    """The rule for ``target``, or None."""
    return RULES.get(_key(target))
