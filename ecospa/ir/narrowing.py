"""Kept positions along one dimension of a tensor: what a narrow graph computes instead of the dense
tensor (see ``ecospa.narrow.positions``, which derives them from the channel labels)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Narrowing", "same_layout"]


@dataclass(frozen=True)
class Narrowing:
    """Positions kept along ``dim`` (dense size ``size``): ``index[..., j]`` is the dense position
    of narrow position ``j``; its leading axes follow the ``selectors`` dims (none: the same
    positions everywhere, ``index`` is 1-D)."""

    dim: int
    size: int
    index: np.ndarray
    selectors: tuple[int, ...] = ()

    @property
    def width(self) -> int:
        return int(self.index.shape[-1])

    def same(self, other: "Narrowing") -> bool:
        """The same positions (dims and selectors aside: compared per dim by the caller)."""
        return self.index.shape == other.index.shape and np.array_equal(self.index, other.index)


def same_layout(a, b, selectors: bool = False) -> bool:
    """Two node layouts (``{dim: Narrowing}``) narrow the same dims at the same positions (and,
    with ``selectors``, choose them along the same dims)."""
    if not isinstance(a, dict) or not isinstance(b, dict) or a.keys() != b.keys():
        return False
    return all(a[d].same(b[d]) and (not selectors or a[d].selectors == b[d].selectors) for d in a)
