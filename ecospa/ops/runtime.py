"""Small functions the narrow graphs call (fx ``call_function`` targets)."""
from __future__ import annotations

import torch

__all__ = ["expand_param", "gather", "scatter", "pin_scale"]


def expand_param(w: torch.Tensor, dim: int, src: torch.Tensor) -> torch.Tensor:
    """``w`` along ``dim`` laid out as the narrow graph wants it: position ``j`` reads slice
    ``src[j]`` of ``w``, or zeros where ``src[j] == w.shape[dim]`` (a padding unit)."""
    zero_shape = list(w.shape)
    zero_shape[dim] = 1
    return torch.cat([w, w.new_zeros(zero_shape)], dim).index_select(dim, src)


def gather(x: torch.Tensor, dim: int, index: torch.Tensor, ndim: int) -> torch.Tensor:
    """Positions ``index`` of ``x`` along ``dim`` of an ``ndim``-dimensional result.

    ``x`` is right-aligned to ``ndim`` dims first (as broadcasting does). A 1-D ``index`` selects
    the same positions everywhere (``index_select``); an ``ndim``-dimensional one (size 1 except
    along the dims the choice varies on and ``dim``) selects per position (``take_along_dim``).
    """
    if x.dim() < ndim:
        x = x.reshape((1,) * (ndim - x.dim()) + tuple(x.shape))
    if index.dim() == 1:
        return x.index_select(dim, index)
    # take_along_dim's semantics (both broadcast, then gathered) without its wrap of negative
    # indices (a remainder over the index on every call: ``index`` holds none), which cost 4x
    # the gather itself on a decode step's KV cache
    shape = [b if a == 1 else a for a, b in zip(x.shape, index.shape)]  # broadcast (a size 0 stays 0)
    xs, ix = list(shape), list(shape)
    xs[dim], ix[dim] = x.shape[dim], index.shape[dim]
    return torch.gather(x.expand(xs), dim, index.expand(ix))


def scatter(x: torch.Tensor, dim: int, index: torch.Tensor, size: int) -> torch.Tensor:
    """The dense tensor whose positions ``index`` along ``dim`` hold ``x``, zeros elsewhere
    (``index`` 1-D, or shaped like ``x`` up to broadcasting for per-position choices)."""
    shape = list(x.shape)
    shape[dim] = size
    out = x.new_zeros(shape)
    if index.dim() == 1:
        return out.index_copy(dim, index, x)
    return out.scatter(dim, index.expand(x.shape), x)


def pin_scale(head_dim: int) -> float:
    """The attention scale of the dense model: ``1 / sqrt(head_dim)``."""
    return float(head_dim) ** -0.5
