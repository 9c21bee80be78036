"""Argument checks of ``ecospa.save`` and ``ecospa.load``: a model that is not a module, a
directory that is not a path, or the two swapped, is a :class:`~ecospa.CheckpointError` naming the
argument and the call to make (never an ``AttributeError`` from deep inside)."""
from __future__ import annotations

import os

import torch.nn as nn

from ecospa.errors import CheckpointError

__all__ = ["check_call"]


def _is_path(v) -> bool:
    return isinstance(v, (str, bytes, os.PathLike))


def check_call(fn: str, model, directory, *, model_optional: bool = False, optimizer=None) -> None:
    """Check ``fn``'s ``model`` (a module; None allowed when ``model_optional``), ``directory``
    (a ``str`` or ``os.PathLike``, not empty) and ``optimizer`` (None or an optimizer).

    Raises:
        CheckpointError: naming the bad argument, its type and the call to make.
    """
    call = "ecospa.load(directory) or ecospa.load(directory, dense_model)" if fn == "load" else "ecospa.save(model, directory)"
    if isinstance(directory, nn.Module) and _is_path(model):
        raise CheckpointError(f"ecospa.{fn} got the model and the directory swapped: call {call}")
    if not _is_path(directory):
        raise CheckpointError(f"ecospa.{fn}'s directory should be a path (str or os.PathLike), got "
                              f"{type(directory).__name__} {directory!r:.60}: call {call}")
    if not os.fspath(directory):
        raise CheckpointError(f"ecospa.{fn}'s directory is an empty path: give a folder, e.g. {call}")
    if optimizer is not None and not (hasattr(optimizer, "param_groups") and hasattr(optimizer, "state")):
        raise CheckpointError(f"ecospa.{fn}'s optimizer should be a torch.optim.Optimizer (or None), got "
                              f"{type(optimizer).__name__} {optimizer!r:.60}")
    if model is None and model_optional:
        return
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"ecospa.{fn}'s model should be a torch.nn.Module, got {type(model).__name__} "
                              f"{model!r:.60}: call {call}")
