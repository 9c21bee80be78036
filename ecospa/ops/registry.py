"""The op table: per op, how it moves channel labels, how it is rewritten narrow, and its facts.

Every op ecospa understands has one :class:`OpSpec` in :data:`OPS`:

- its *channel rule* (``rule(ctx, node) -> value``: the factors of the op's output, recording
  edges, poison, tags and events; see ``ecospa.ir.labels``), run by the channel flow of coupling
  discovery (``ecospa.analysis.flow``);
- its *narrow rule* (``rule(b, node) -> new node``: the op rebuilt at the kept widths with the
  builder ``b`` of ``ecospa.narrow.rewrite``), or the reason it has none (``no_narrow``): a call
  whose narrowed tensors pass through the op then runs on the exact fallback with that reason;
- its *facts*, words of :data:`FACTS` that the rest of the engine queries instead of keeping its
  own lists of op names.

Ops are keyed by ATen overload packet (``aten.view.default`` and ``aten.view.dtype`` share one
entry), by Python callable, or by qualified name (``"namespace::name"``) for custom ops that exist
only once a library registers them. Elementwise ops that ATen tags ``pointwise`` need no entry of
their own: they share the pointwise rules and facts of ``ecospa.ops.pointwise``
(:func:`set_pointwise`).

Adding support for an op is one :func:`register` call next to its channel rule and one
:func:`narrow_rule` (or :func:`no_narrow_rule`) call next to its narrow rule, in the family file
of the op, plus a case in ``tests/ops/rule_cases.py`` whose captured graph contains it.
``tests/ops/test_rules.py`` fails for a registered op that no case's graph contains, and for an op
with a channel rule but neither a narrow rule nor a stated reason.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["FACTS", "OpSpec", "OPS", "NarrowError", "register", "narrow_rule", "no_narrow_rule", "set_pointwise",
           "spec", "lookup", "has", "op_name", "is_pointwise", "entry_key"]

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
    "observer": "only its first operand reaches the output; the others are looked at (ecospa::observe)",
}


class NarrowError(Exception):
    """The narrow rewrite of one node is impossible (the reason is the message)."""


@dataclass(frozen=True)
class OpSpec:
    """What ecospa knows about one op.

    Attributes:
        channel: the channel rule ``(ctx, node) -> value``, or None (the op only appears in
            narrow graphs: runtime metadata checks, symbolic sizes).
        facts: words of :data:`FACTS`.
        narrow: the narrow rule ``(b, node) -> new node | None``, or None.
        no_narrow: why the op has no narrow rule (a narrowed tensor through it sends the call to
            the exact fallback), or None.
    """

    channel: Rule | None = None
    facts: frozenset[str] = frozenset()
    narrow: Rule | None = None
    no_narrow: str | None = None


OPS: dict[object, OpSpec] = {}
_POINTWISE: dict[str, Callable] = {}


def _key(target):
    return getattr(target, "overloadpacket", target)


def _qualified(target) -> str | None:
    """``"namespace::name"`` of an op (the key of ops registered by name), or None."""
    return getattr(_key(target), "_qualified_op_name", None)


def _update(targets, field: str, value, who: str) -> None:
    for t in targets:
        k = _key(t)
        old = OPS.get(k, OpSpec())
        if getattr(old, field) is not None and field != "facts":
            raise RuntimeError(f"{field} rule for {k} registered twice ({who})")
        OPS[k] = dataclasses.replace(old, **{field: value})


def register(*targets, facts: tuple[str, ...] = ()) -> Callable[[Rule], Rule]:
    """Register ``fn`` as the channel rule of each op in ``targets``, with ``facts``.

    A target may be an op or, for custom ops that exist only once a library registers them
    (``"transformers::grouped_mm_fallback"``), the op's qualified name.

    Raises:
        RuntimeError: an op's channel rule is registered twice, or a fact is not a word of
            :data:`FACTS`.
    """
    unknown = sorted(set(facts) - set(FACTS))
    if unknown:
        raise RuntimeError(f"unknown op facts {unknown}; known: {sorted(FACTS)}")

    def deco(fn: Rule) -> Rule:
        _update(targets, "channel", fn, fn.__name__)
        _update(targets, "facts", frozenset(facts), fn.__name__)
        return fn

    return deco


def narrow_rule(*targets) -> Callable[[Rule], Rule]:
    """Register ``fn`` as the narrow rule of each op in ``targets`` (as :func:`register`)."""
    def deco(fn: Rule) -> Rule:
        _update(targets, "narrow", fn, fn.__name__)
        return fn

    return deco


def no_narrow_rule(*targets, reason: str) -> None:
    """State why the ops in ``targets`` have no narrow rule (calls that narrow a tensor through
    them run on the exact fallback, reporting ``reason``)."""
    _update(targets, "no_narrow", reason, reason)


def set_pointwise(channel_spec: Callable[[object], OpSpec]) -> None:
    """Install the spec of ops ATen tags ``pointwise`` that have no entry of their own
    (``ecospa.ops.pointwise`` does, when it is imported)."""
    _POINTWISE["spec"] = channel_spec


def is_pointwise(target) -> bool:
    """True for ops ATen tags ``pointwise`` (elementwise with broadcasting)."""
    return torch.Tag.pointwise in getattr(target, "tags", ())


def op_name(target) -> str:
    """Short name of an op: ``"view"`` for ``aten.view.default``; the callable's name otherwise."""
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", getattr(target, "__name__", str(target)))


def entry_key(target):
    """The key of :data:`OPS` whose entry ``target`` uses (its overload packet, or the qualified
    name of a custom op registered by name), or None when it has no entry of its own (pointwise
    ops share one; other ops have none)."""
    k = _key(target)
    if k in OPS:
        return k
    name = _qualified(target)
    return name if name in OPS else None


def spec(target) -> OpSpec | None:
    """The :class:`OpSpec` of ``target``: its own entry, completed for ops ATen tags pointwise by
    the shared pointwise one (rules and facts it does not state itself), else None (an op ecospa
    does not know)."""
    k = entry_key(target)
    own = OPS[k] if k is not None else None
    shared = _POINTWISE["spec"](target) if is_pointwise(target) and "spec" in _POINTWISE else None
    if own is None or shared is None:
        return own if own is not None else shared
    return OpSpec(channel=own.channel or shared.channel,
                  facts=own.facts if own.channel is not None else shared.facts,
                  narrow=own.narrow or (None if own.no_narrow else shared.narrow),
                  no_narrow=own.no_narrow)


def lookup(target) -> Rule | None:
    """The channel rule of ``target``, or None."""
    hit = spec(target)
    return hit.channel if hit is not None else None


def has(target, fact: str) -> bool:
    """True when ``target`` is known and has ``fact`` (a word of :data:`FACTS`)."""
    if fact not in FACTS:
        raise KeyError(f"unknown op fact {fact!r}; known: {sorted(FACTS)}")
    hit = spec(target)
    return hit is not None and fact in hit.facts
