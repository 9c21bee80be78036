"""Sizes of a captured graph that depend on tensor values (unbacked symbols), seen as stand-ins.

MoE routing (``token_idx, _ = torch.where(mask)``, ``nonzero``) makes the number of rows an
expert sees a size computed from tensor values: torch.export gives it an *unbacked* symbol
(``u0``) with no example value. The channel rules only need such a size to line dimensions up
(a reshape's blocks, a broadcast, an index's output rank); labels never vary along a token
dimension. So a data-dependent size is read as a *stand-in*: a prime, distinct per symbol, that
no product of ordinary sizes equals (a reshape cannot pair it with the wrong dims). Whether a
rule then put weight channels along such a dimension is checked after the rule
(:func:`data_dependent_dims`, ``ecospa.analysis.flow``): there the analysis cannot tell which
channel sits where, and the labels are lost with a reason.
"""
from __future__ import annotations

import re

import torch

__all__ = ["size_of", "data_dependent_dims", "is_data_dependent", "STANDIN_BASE"]

#: Stand-ins are the primes from here on, one per unbacked symbol (``u0``, ``u1``, ...): unlike
#: the sizes of models and example inputs (products of small factors), and small enough that a
#: rule that materialises labels along one (refused afterwards) stays cheap.
STANDIN_BASE = 1009

_primes: list[int] = []


def _standin(k: int) -> int:
    """The ``k``-th prime from :data:`STANDIN_BASE` on."""
    n = _primes[-1] + 2 if _primes else STANDIN_BASE
    while len(_primes) <= k:
        if all(n % p for p in range(3, int(n ** 0.5) + 1, 2)):
            _primes.append(n)
        n += 2
    return _primes[k]


def is_data_dependent(size) -> bool:
    """``size`` (an int or a ``torch.SymInt``) is computed from tensor values: a symbolic size
    without an example value (an unbacked symbol, as after ``torch.where(mask)`` or ``nonzero``)."""
    return isinstance(size, torch.SymInt) and not size.node.has_hint()


def size_of(size) -> int:
    """``size`` as a Python int: an int as it is, a symbolic size its example value, a
    data-dependent one the value its expression takes with each unbacked symbol replaced by its
    stand-in (see the module docstring)."""
    if not isinstance(size, torch.SymInt):
        return int(size)
    if size.node.has_hint():
        return int(size)
    import sympy  # loaded already: torch's symbolic sizes are sympy expressions

    expr = size.node.expr
    env = size.node.shape_env
    hints = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val
    subs = {s: sympy.Integer(hints[s] if s in hints else _symbol_standin(s)) for s in expr.free_symbols}
    return int(expr.xreplace(subs))


def _symbol_standin(sym) -> int:
    m = re.fullmatch(r"[a-z]+(\d+)", str(sym))
    return _standin(int(m.group(1)) if m else 0)


def data_dependent_dims(val) -> tuple[int, ...]:
    """The dimensions of tensor ``val`` (a node's ``meta['val']``) whose size depends on tensor
    values; ``()`` for a non-tensor or a tensor of static (or example-backed) sizes."""
    if not isinstance(val, torch.Tensor):
        return ()
    return tuple(d for d, s in enumerate(val.shape) if is_data_dependent(s))
