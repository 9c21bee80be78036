"""Capture a model's forward as an ATen-level torch.fx graph with parameter names.

``torch.export.export(strict=False)`` is used: it handles Hugging Face models, timm models and
``nn.TransformerEncoderLayer`` where ``torch.fx.symbolic_trace`` fails (see docs/ARCHITECTURE.md).
The model is wrapped so that any output structure (``ModelOutput``, dicts, tuples) becomes a flat
tuple of tensors, and captured in eval mode (restored afterwards); nothing in the model changes: whatever the forward
creates or changes on its modules (a lazily built cache, an attribute) is put back
(``ecospa.capture.state.preserved``).
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from ecospa.errors import CaptureError
from ecospa.capture.argtypes import register_argument_types
from ecospa.capture.asserts import asserts_as_checks
from ecospa.capture.inline import inline_wrappers
from ecospa.capture.state import preserved

__all__ = ["Captured", "capture", "module_of", "default_inputs", "normalise_inputs"]

_WRAP = "m"  # attribute name of the model inside the capture wrapper
_REPEAT = re.compile(r"@\d+$")


class _Flat(nn.Module):
    """Calls the model and returns the tensors of its output as one flat tuple."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, *args, **kwargs):
        out = self.m(*args, **kwargs)
        if hasattr(out, "to_tuple"):
            out = out.to_tuple()
        return tuple(x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor))


@dataclass
class Captured:
    """A captured forward.

    Attributes:
        graph: the ATen-level fx graph (placeholders for parameters, buffers and inputs).
        params: placeholder node name -> parameter name (canonical: first in named_parameters).
        buffers: placeholder node name -> buffer or constant tensor (real values, for index ops).
        shapes: parameter name -> shape.
    """

    graph: torch.fx.Graph
    params: dict[str, str]
    buffers: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    aliases: dict[str, str] = field(default_factory=dict)
    inputs: tuple[tuple, dict[str, Any]] = ((), {})  # the (args, kwargs) the forward ran on


def _strip(name: str) -> str:
    return name[len(_WRAP) + 1 :] if name.startswith(_WRAP + ".") else name


def module_of(node: torch.fx.Node) -> str:
    """Path of the innermost module that produced ``node`` ("" for the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = _REPEAT.sub("", path)
    path = ".".join(_REPEAT.sub("", p) for p in path.split("."))
    return "" if path == _WRAP else _strip(path)


def default_inputs(model: nn.Module) -> dict[str, Any] | None:
    """Example inputs a model carries itself (Hugging Face ``dummy_inputs``), or None."""
    dummy = getattr(model, "dummy_inputs", None)
    if isinstance(dummy, dict) and dummy:
        return dict(dummy)
    return None


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _normalise_inputs(model: nn.Module, example_inputs) -> tuple[tuple, dict]:
    if example_inputs is None:
        dummy = default_inputs(model)
        if dummy is None:
            raise CaptureError(
                f"{type(model).__name__} carries no dummy inputs: call "
                "ecospa.auto_couple(model, example_inputs) with a tuple of example tensors "
                "(any batch size; the shapes only need to run the forward)"
            )
        dev = _device_of(model)
        return (), {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in dummy.items()}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(
        f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword "
        f"inputs, got {type(example_inputs).__name__}"
    )


def _wants(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class _ModuleTracker:
    """Remembers which modules are being called, to name the culprit when capture fails."""

    def __init__(self, model: nn.Module):
        self.stack: list[str] = []
        self.deepest: list[str] = []
        self.handles = []
        for name, mod in model.named_modules():
            self.handles.append(mod.register_forward_pre_hook(self._enter(name)))
            self.handles.append(mod.register_forward_hook(self._leave()))

    def _enter(self, name):
        def hook(mod, args):
            self.stack.append(name or type(mod).__name__)
            self.deepest = list(self.stack)

        return hook

    def _leave(self):
        def hook(mod, args, out):
            if self.stack:
                self.stack.pop()

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def normalise_inputs(model: nn.Module, example_inputs=None) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` that run ``model``: from ``example_inputs`` (a tensor, a tuple of
    positional inputs or a dict of keyword inputs) or, when None, from the model's own dummy
    inputs (Hugging Face models), moved to the model's device.

    Raises:
        CaptureError: no inputs given and the model carries none, or inputs of an unknown type.
    """
    return _normalise_inputs(model, example_inputs)


def capture(model: nn.Module, example_inputs=None) -> Captured:
    """Capture ``model``'s forward on ``example_inputs`` (tuple, tensor or dict of kwargs).

    Raises:
        CaptureError: the forward cannot be captured; the message names the innermost module
            being run and the original error, and says what to try.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"auto_couple expects a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = _normalise_inputs(model, example_inputs)
    register_argument_types()  # a BlockMask among the inputs (capture/argtypes.py)
    if _wants(model, "use_cache") and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    with preserved(model), asserts_as_checks():  # whatever the forward changes is put back; asserts
        # on data-dependent values (a cache position) become runtime checks (capture/asserts.py)
        was_training = model.training
        model.eval()
        tracker = _ModuleTracker(model)
        try:
            try:
                with torch.enable_grad():
                    ep = torch.export.export(_Flat(model), args, kwargs, strict=False)
            except NotImplementedError:  # an op without autograd here (FlexAttention on CPU)
                with torch.no_grad():
                    ep = torch.export.export(_Flat(model), args, kwargs, strict=False)
        except Exception as exc:  # re-raised as CaptureError with the module at fault
            where = tracker.deepest[-1] if tracker.deepest else type(model).__name__
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CaptureError(
                f"could not capture the forward of {type(model).__name__}: it failed inside module "
                f"{where!r} with {type(exc).__name__}: {first[:300]}. Ways out: pass example inputs "
                "that run the forward (ecospa.auto_couple(model, (x,))), or run auto_couple on a "
                "submodule that avoids the failing code (data-dependent control flow, Python side "
                "effects)."
            ) from exc
        finally:
            tracker.close()
            model.train(was_training)

    inline_wrappers(ep.graph_module)  # autocast / no_grad blocks: their ops join the graph
    sig = ep.graph_signature
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in canonical:
            aliases[name] = canonical[id(p)]
        else:
            canonical[id(p)] = name
    named = dict(model.named_parameters())
    params = {}
    for node_name, full in sig.inputs_to_parameters.items():
        pname = _strip(full)
        pname = aliases.get(pname, pname)
        params[node_name] = pname
    state = dict(ep.state_dict)
    state.update(getattr(ep, "constants", {}) or {})
    buffers: dict[str, torch.Tensor] = {}
    for node_name, full in sig.inputs_to_buffers.items():
        if full in state:
            buffers[node_name] = state[full]
    for node_name, full in getattr(sig, "inputs_to_lifted_tensor_constants", {}).items():
        if full in state:
            buffers[node_name] = state[full]
    shapes = {n: tuple(p.shape) for n, p in named.items()}
    return Captured(graph=ep.graph, params=params, buffers=buffers, shapes=shapes, aliases=aliases,
                    inputs=(args, kwargs))


