"""Leave the model exactly as it was: snapshot its Python state before an analysis, restore it after.

Capturing a forward runs it (under ``torch.export``, on fake tensors), and a forward may change
its module: a rotary cache registered as a new buffer when it is too short, ``self.seen = T``,
a dict of caches filled, a plain tensor attribute written in place. Left as they are, those
changes hold FakeTensors (``copy.deepcopy(model)`` then fails) or stale autograd history.

:func:`preserved` records, for every module reachable from the model (registered or held in a
plain attribute) and every plain Python object or container reachable from their attributes
(bounded depth): the attribute dict and the contents of every container (``_parameters``,
``_buffers``, ``_modules``, ``_non_persistent_buffers_set``, the hook dicts, user dicts, lists and
sets), by identity; for every tensor found there: its version counter, ``requires_grad`` and
``grad``; and (``values=True``) a copy of the values of the non-parameter tensors within a size
budget. On exit, also when the body raises, whatever changed is put back *in place* (the same
dict, list and set objects, holding the same objects as before), tensors written in place get
their values and autograd state back, and the model is checked to hold no FakeTensor or
functional tensor anywhere.
"""
from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn

from ecospa.errors import CaptureError

__all__ = ["ModelState", "snapshot_state", "preserved", "traced_tensors"]

MAX_DEPTH = 4  # how far below a module's attributes plain objects and containers are followed
VALUE_BUDGET = 64 * 2**20  # bytes of non-parameter tensor values copied to restore in-place writes

_SKIP = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
         str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)


def _is_traced(t: torch.Tensor) -> bool:
    """A tensor that only exists inside a trace (FakeTensor, FunctionalTensor, functional wrapper)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if isinstance(t, (FakeTensor, FunctionalTensor)):
        return True
    try:
        return bool(torch._is_functional_tensor(t))
    except (RuntimeError, TypeError):
        return False


@dataclass
class _TensorState:
    tensor: torch.Tensor
    version: int | None  # None: an inference tensor (no version counter; cannot be written here)
    requires_grad: bool
    grad: torch.Tensor | None
    grad_fn: object | None
    values: torch.Tensor | None = None


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


@dataclass
class ModelState:
    """What :func:`snapshot_state` saw: containers (by identity) with their contents, objects with
    their attribute dicts, tensors with their version, autograd state and (some) values."""

    dicts: list[tuple[dict, list[tuple[Any, Any]]]] = field(default_factory=list)
    lists: list[tuple[list, list[Any]]] = field(default_factory=list)
    sets: list[tuple[set, list[Any]]] = field(default_factory=list)
    tensors: list[_TensorState] = field(default_factory=list)
    paths: dict[int, str] = field(default_factory=dict)  # id of a container -> where it lives

    def restore(self) -> list[str]:
        """Put back everything that changed, in place; returns where changes were undone."""
        undone: list[str] = []
        for d, items in self.dicts:
            now = list(d.items())
            if len(now) != len(items) or any(not _same_key(a[0], b[0]) or a[1] is not b[1]
                                             for a, b in zip(now, items)):
                d.clear()
                d.update(items)
                undone.append(self.paths.get(id(d), "?"))
        for lst, items in self.lists:
            if len(lst) != len(items) or any(a is not b for a, b in zip(lst, items)):
                lst[:] = items
                undone.append(self.paths.get(id(lst), "?"))
        for s, items in self.sets:
            if len(s) != len(items) or any(x not in s for x in items):
                s.clear()
                s.update(items)
                undone.append(self.paths.get(id(s), "?"))
        for ts in self.tensors:
            undone += _restore_tensor(ts, self.paths.get(id(ts.tensor), "?"))
        return undone


def _same_key(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and isinstance(a, (str, int)) and a == b)


def _restore_tensor(ts: _TensorState, where: str) -> list[str]:
    t = ts.tensor
    out = []
    if ts.version is None:
        return out
    if t._version != ts.version or t.requires_grad != ts.requires_grad or (t.is_leaf and t.grad is not ts.grad):
        if t.grad_fn is not None and ts.grad_fn is None:  # written under autograd: drop the history
            try:
                t.detach_()
            except RuntimeError as exc:
                raise CaptureError(
                    f"capturing the forward wrote in place into the tensor at {where}, a view that "
                    f"cannot be detached ({exc}); keep caches the forward writes as registered "
                    "buffers, or run ecospa.auto_couple on a copy of the model") from exc
        if ts.values is not None and t._version != ts.version:
            with torch.no_grad():
                t.copy_(ts.values)
        if t.requires_grad != ts.requires_grad and t.is_leaf:
            t.requires_grad_(ts.requires_grad)
        if t.is_leaf and t.grad is not ts.grad:
            t.grad = ts.grad
        out.append(where)
    return out


class _Walker:
    """Collects the state reachable from a model (see the module docstring)."""

    def __init__(self, values: bool):
        self.state = ModelState()
        self.seen: set[int] = set()
        self.values = values
        self.budget = VALUE_BUDGET
        self.params: set[int] = set()

    def module(self, mod: nn.Module, path: str) -> None:
        if id(mod) in self.seen:
            return
        self.seen.add(id(mod))
        for p in mod._parameters.values():
            if p is not None:
                self.params.add(id(p))
        self.attrs(mod, path or "<model>", 0)
        for name, child in list(mod._modules.items()):
            if child is not None:
                self.module(child, f"{path}.{name}" if path else name)

    def attrs(self, obj: Any, path: str, depth: int) -> None:
        """The attribute dict of ``obj`` and, below it, its values; a module's parameter, buffer
        and submodule dicts name their entries as attributes."""
        d = getattr(obj, "__dict__", None)
        if not isinstance(d, dict) or id(d) in self.seen:
            return
        self.seen.add(id(d))
        self.record(d, f"{path}.__dict__")
        for k, x in list(d.items()):
            if isinstance(obj, nn.Module) and k in ("_parameters", "_buffers", "_modules") and isinstance(x, dict):
                self.seen.add(id(x))
                self.record(x, f"{path}.{k}")
                for name, y in list(x.items()):
                    if not isinstance(y, nn.Module):  # submodules: visited by module()
                        self.value(y, f"{path}.{name}", depth)
            else:
                self.value(x, f"{path}.{k}", depth)

    def record(self, v: Any, path: str) -> None:
        self.state.paths[id(v)] = path
        if isinstance(v, dict):
            self.state.dicts.append((v, list(v.items())))
        elif isinstance(v, list):
            self.state.lists.append((v, list(v)))
        elif isinstance(v, set):
            self.state.sets.append((v, list(v)))

    def value(self, v: Any, path: str, depth: int) -> None:
        if isinstance(v, _SKIP):
            return
        if isinstance(v, torch.Tensor):
            self.tensor(v, path)
            return
        if isinstance(v, nn.Module):
            self.module(v, path)
            return
        if id(v) in self.seen or depth >= MAX_DEPTH:
            return
        self.seen.add(id(v))
        if isinstance(v, (dict, list, set)):
            self.record(v, path)
            if isinstance(v, dict):
                for k, x in list(v.items()):
                    self.value(x, f"{path}[{k!r}]", depth + 1)
            elif isinstance(v, list):
                for i, x in enumerate(v):
                    self.value(x, f"{path}[{i}]", depth + 1)
        elif isinstance(v, tuple):
            for i, x in enumerate(v):
                self.value(x, f"{path}[{i}]", depth + 1)
        elif hasattr(v, "__dict__") and not callable(v):
            self.attrs(v, path, depth + 1)

    def tensor(self, t: torch.Tensor, path: str) -> None:
        if id(t) in self.seen:
            return
        self.seen.add(id(t))
        self.state.paths[id(t)] = path
        values = None
        if self.values and id(t) not in self.params and not isinstance(t, nn.Parameter) \
                and t.device.type != "meta" and not t.is_inference() and not _is_traced(t):
            size = t.numel() * t.element_size()
            if size <= self.budget:
                self.budget -= size
                values = t.detach().clone()
        self.state.tensors.append(_TensorState(t, _version(t), t.requires_grad,
                                               t.grad if t.is_leaf else None, t.grad_fn, values))


def snapshot_state(model: nn.Module, *, values: bool = True) -> ModelState:
    """The state of ``model`` that :meth:`ModelState.restore` puts back (see the module docstring).
    With ``values``, non-parameter tensors (buffers, tensor attributes) up to
    :data:`VALUE_BUDGET` bytes in all are copied, so that writes into them can be undone."""
    w = _Walker(values)
    if isinstance(model, nn.Module):  # anything else is refused by the capture itself
        w.module(model, "")
    return w.state


def traced_tensors(model: nn.Module) -> list[str]:
    """Where ``model`` holds a FakeTensor or functional tensor (parameters, buffers, attributes,
    containers up to :data:`MAX_DEPTH`): empty for a model no trace has leaked into."""
    w = _Walker(False)
    if isinstance(model, nn.Module):
        w.module(model, "")
    return [w.state.paths.get(id(ts.tensor), "?") for ts in w.state.tensors if _is_traced(ts.tensor)]


@contextlib.contextmanager
def preserved(model: nn.Module, *, values: bool = True) -> Iterator[ModelState]:
    """Run the body, then put ``model`` back exactly as it was (see the module docstring), also
    when the body raises.

    Raises:
        CaptureError: after restoring, the model still holds a traced tensor (somewhere the
            snapshot does not reach, deeper than :data:`MAX_DEPTH`); the message names it.
    """
    state = snapshot_state(model, values=values)
    failed = False
    try:
        yield state
    except BaseException:
        failed = True
        raise
    finally:
        state.restore()
        if not failed:
            left = traced_tensors(model)
            if left:
                raise CaptureError(
                    f"capturing the forward left traced tensors (FakeTensor) in the model at "
                    f"{left[:3]}, where ecospa cannot put the originals back; keep the state the "
                    "forward creates in registered buffers or module attributes, or run "
                    "ecospa.auto_couple on a copy of the model")
