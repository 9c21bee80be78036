"""The registry of ops: how each op moves channel labels, and what else is known about it.

Every op ecospa understands has one :class:`OpInfo`: its *rule* (a small function
``rule(ctx, node) -> value`` that computes the factors of the op's output and records edges,
poison, tags and events; see ``ecospa.graph.labels``) and its *facts*, a set of words from
:data:`FACTS` that the rest of the engine queries instead of keeping its own lists of op names.
Ops are keyed by ATen overload packet (``aten.view.default`` and ``aten.view.dtype`` share one
entry) or by Python callable. Elementwise ops that ATen tags ``pointwise`` need no entry of their
own: they share the pointwise rule, with facts from ``ecospa.graph.rules.pointwise``.

Adding support for an op is one :func:`register` call next to its rule, plus a case in
``tests/graph/rule_cases.py`` whose captured graph contains the op, with the expected outcome
(``tests/graph/test_rules.py`` fails for a registered op that no case's graph contains).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["FACTS", "OpInfo", "RULES", "register", "lookup", "info", "has", "op_name", "is_pointwise",
           "entry_key"]

Rule = Callable[..., object]

FACTS: dict[str, str] = {
    "layout": "moves channels without mixing them: views, permutations, slices, cat, repeats",
    "transparent": "a weight passed through it is still that weight (t, view, to, contiguous, ...)",
    "transposing": "swaps the two dimensions of a matrix operand (t, transpose, permute)",
    "compact": "channels can simply vanish through it: no op argument depends on their number",
    "product": "a product with a weight: what the forward of a linear-like module is made of",
    "passive": "may sit next to the product in a linear-like module's forward (reshapes, bias add)",
    "linear": "linear in its labelled operands: no 'nonlinear' event (add, mul, neg, to, ...)",
    "gate": "a product of its operands: two labelled operands make a gate (GLU)",
    "zero": "zero wherever one labelled operand is zero (mul, neg, relu, gelu, to, ...; div: its numerator)",
    "additive": "zero wherever every operand is zero (add, sub)",
    "fresh": "creates a tensor whose values do not depend on any weight (zeros, arange, ...)",
}


@dataclass(frozen=True)
class OpInfo:
    """What ecospa knows about one op: its channel rule and its facts (words of :data:`FACTS`)."""

    rule: Rule
    facts: frozenset[str]


RULES: dict[object, OpInfo] = {}


def _key(target):
    return getattr(target, "overloadpacket", target)


def _qualified(target) -> str | None:
    """``"namespace::name"`` of an op (the key of ops registered by name), or None."""
    return getattr(_key(target), "_qualified_op_name", None)


def register(*targets, facts: tuple[str, ...] = ()) -> Callable[[Rule], Rule]:
    """Register ``fn`` as the rule of each op in ``targets``, with ``facts``.

    A target may be an op or, for custom ops that exist only once a library registers them
    (``"transformers::grouped_mm_fallback"``), the op's qualified name.

    Raises:
        RuntimeError: an op is registered twice, or a fact is not a word of :data:`FACTS`.
    """
    unknown = sorted(set(facts) - set(FACTS))
    if unknown:
        raise RuntimeError(f"unknown op facts {unknown}; known: {sorted(FACTS)}")

    def deco(fn: Rule) -> Rule:
        for t in targets:
            k = _key(t)
            if k in RULES:
                raise RuntimeError(f"op rule for {k} registered twice ({RULES[k].rule.__name__}, {fn.__name__})")
            RULES[k] = OpInfo(fn, frozenset(facts))
        return fn

    return deco


def is_pointwise(target) -> bool:
    """True for ops ATen tags ``pointwise`` (elementwise with broadcasting)."""
    return torch.Tag.pointwise in getattr(target, "tags", ())


def op_name(target) -> str:
    """Short name of an op: ``"view"`` for ``aten.view.default``; the callable's name otherwise."""
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", getattr(target, "__name__", str(target)))


def entry_key(target):
    """The key of :data:`RULES` whose entry ``target`` uses (its overload packet, or the
    qualified name of a custom op registered by name), or None when it has no entry of its own
    (pointwise ops share one rule; other ops have none)."""
    k = _key(target)
    if k in RULES:
        return k
    name = _qualified(target)
    return name if name in RULES else None


def info(target) -> OpInfo | None:
    """The :class:`OpInfo` of ``target``: its own entry, else the pointwise one for ops ATen tags
    pointwise, else None (an op without a rule)."""
    hit = RULES.get(_key(target))
    if hit is None:
        name = _qualified(target)
        hit = RULES.get(name) if name is not None else None
    if hit is not None:
        return hit
    if is_pointwise(target):
        from ecospa.graph.rules.pointwise import pointwise_info

        return pointwise_info(target)
    return None


def lookup(target) -> Rule | None:
    """The channel rule of ``target``, or None."""
    hit = info(target)
    return hit.rule if hit is not None else None


def has(target, fact: str) -> bool:
    """True when ``target`` is known and has ``fact`` (a word of :data:`FACTS`)."""
    if fact not in FACTS:
        raise KeyError(f"unknown op fact {fact!r}; known: {sorted(FACTS)}")
    hit = info(target)
    return hit is not None and fact in hit.facts
