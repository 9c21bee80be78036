"""``assert`` on a data-dependent tensor during a capture: a runtime check, not a failed export.

Research code checks positions with tensors: torchtune's ``KVCache.update`` runs
``assert (self.cache_pos[0] + seq_len) <= self.k_cache.shape[2]``. ``torch.export`` (non-strict)
cannot turn a value it does not know into a Python ``bool`` and fails with
``GuardOnDataDependentSymNode``. Inside :func:`asserts_as_checks`, ``Tensor.__bool__`` of such a
value, called by an ``assert`` statement (the calling frame's next instruction raises
``AssertionError``), records the condition as a runtime assertion of the graph (``expect_true``
on the unbacked value: export keeps it as ``aten._assert_scalar``, so the graph still raises when
the condition fails) and lets the capture go on. Any other use of such a value (``if t:``) still
fails the capture, with torch's one-line reason.
"""
from __future__ import annotations

import contextlib
import dis
import os
import sys
from types import FrameType

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["asserts_as_checks"]

_TORCH = os.path.dirname(torch.__file__) + os.sep


def _caller() -> FrameType | None:
    """The first frame outside this file and torch (export's own torch-function handler)."""
    f = sys._getframe(1)
    while f is not None and (f.f_code.co_filename == __file__ or f.f_code.co_filename.startswith(_TORCH)):
        f = f.f_back
    return f


def _in_assert(frame: FrameType | None) -> bool:
    """True when ``frame`` is evaluating the condition of an ``assert`` statement: the
    instruction after the current jump loads ``AssertionError``."""
    if frame is None:
        return False
    ins = list(dis.get_instructions(frame.f_code))
    for i, x in enumerate(ins[:-1]):
        if x.offset == frame.f_lasti:
            return "JUMP" in x.opname and ins[i + 1].opname == "LOAD_ASSERTION_ERROR"
    return False


def _data_dependent(exc: BaseException) -> bool:
    mod = sys.modules.get("torch.fx.experimental.symbolic_shapes")
    return mod is not None and isinstance(exc, mod.GuardOnDataDependentSymNode)


class _AssertsAsChecks(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.Tensor.__bool__:
            return func(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            if not _data_dependent(exc) or not _in_assert(_caller()):
                raise
        from torch.fx.experimental.symbolic_shapes import expect_true  # loaded already (export): no sympy at import

        value = args[0].item()
        expect_true(value if isinstance(value, torch.SymBool) else value != 0)  # a runtime assert of the graph
        return True


@contextlib.contextmanager
def asserts_as_checks():
    """Within the block, ``assert`` on a data-dependent tensor becomes a runtime check of the
    captured graph (see the module docstring)."""
    with _AssertsAsChecks():
        yield
