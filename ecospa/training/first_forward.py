"""The example inputs EcoSpa records from a model's first forward (when it was given none).

EcoSpa registers a forward pre-hook that keeps :func:`detached` copies of the first call's
``(args, kwargs)``; :func:`as_example` turns them into what ``ecospa.auto_couple`` takes.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

from ecospa.errors import EcospaError

__all__ = ["detached", "as_example"]


def detached(x):
    """Detached copies of the tensors in a nested tuple/list/dict; other leaves as they are."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: detached(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        items = [detached(v) for v in x]
        if hasattr(x, "_fields"):  # namedtuple
            return type(x)(*items)
        try:
            return type(x)(items)
        except TypeError:
            return tuple(items) if isinstance(x, tuple) else items
    return x


def as_example(model: nn.Module, args: tuple, kwargs: dict):
    """Recorded ``(args, kwargs)`` as what ``auto_couple`` takes: a tuple, or a dict of keywords
    (positional inputs bound to their names when the forward mixes both)."""
    if not kwargs:
        return tuple(args)
    if not args:
        return dict(kwargs)
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        bound = None
    kinds = {n: p.kind for n, p in inspect.signature(model.forward).parameters.items()} if bound else {}
    if bound is None or any(kinds[n] in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY)
                            for n in bound.arguments):
        raise EcospaError(f"the first forward of {type(model).__name__} took positional and keyword inputs "
                          "that cannot all be passed by name; give EcoSpa example_inputs=...")
    out: dict[str, Any] = {}
    for n, v in bound.arguments.items():
        if kinds[n] == inspect.Parameter.VAR_KEYWORD:
            out.update(v)
        else:
            out[n] = v
    return out
