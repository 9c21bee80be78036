"""The removal record: which slices of each parameter a pruned model still has.

Every module whose own parameters the executor sliced carries a :class:`ModuleRecord` (attribute
``ecospa_record``, set and read only through this module): for each such parameter its dense
shape and, per sliced dimension, the kept indices in the numbering of the dense model. It is the
single source of truth of a pruned model's structure: ``ecospa.save`` writes it, ``ecospa.load``
replays it, ``auto_couple`` on a pruned model analyses the dense model it describes
(:func:`dense_view`) and renumbers, and couplings carry a fingerprint of it (:func:`state_of`) so
that a stale coupling is refused instead of removing the wrong rows. Because the record lives on
the modules that own the parameters, wrapping the model (``nn.Sequential(model)``, DDP) or
deep-copying it keeps it valid.
"""
from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn as nn

__all__ = ["ParamRecord", "ModuleRecord", "RECORD_ATTR", "module_record", "param_records",
           "fingerprint", "state_of", "dense_view", "EcospaForward", "installed_forward"]

RECORD_ATTR = "ecospa_record"


@dataclass(frozen=True)
class ParamRecord:
    """One parameter's removals: ``dense_shape`` and, per sliced dim, kept dense indices (sorted)."""

    dense_shape: tuple[int, ...]
    kept: Mapping[int, np.ndarray] = field(default_factory=dict)

    def kept_or_all(self, dim: int) -> np.ndarray:
        """Kept dense indices along ``dim`` (all of them when the dim was never sliced)."""
        k = self.kept.get(dim)
        return np.arange(self.dense_shape[dim], dtype=np.int64) if k is None else k

    def after(self, keeps: Mapping[int, np.ndarray]) -> "ParamRecord":
        """The record after keeping positions ``keeps[dim]`` (current numbering) of each dim."""
        kept = dict(self.kept)
        for dim, keep in keeps.items():
            kept[dim] = self.kept_or_all(dim)[np.asarray(keep, dtype=np.int64)]
        return ParamRecord(self.dense_shape, kept)

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {"dense_shape": list(self.dense_shape),
                "kept": {str(d): k.tolist() for d, k in sorted(self.kept.items())}}


@dataclass
class ModuleRecord:
    """What the executor changed on one module: its sliced parameters (by attribute name) and the
    attributes it overrode (their original values, restored by :func:`dense_view`)."""

    params: dict[str, ParamRecord] = field(default_factory=dict)
    overridden: dict[str, object] = field(default_factory=dict)


def module_record(module: nn.Module, *, create: bool = False) -> ModuleRecord | None:
    """The record of ``module`` (created empty when ``create``)."""
    rec = module.__dict__.get(RECORD_ATTR)
    if rec is None and create:
        rec = ModuleRecord()
        module.__dict__[RECORD_ATTR] = rec
    return rec


def param_records(model: nn.Module) -> dict[str, ParamRecord]:
    """``{parameter name: ParamRecord}`` of every sliced parameter, named as in
    ``model.named_parameters()``."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, ParamRecord] = {}
    for path, mod in model.named_modules():
        rec = mod.__dict__.get(RECORD_ATTR)
        if rec is None:
            continue
        for attr, r in rec.params.items():
            name = canonical.get(id(mod._parameters.get(attr)))
            if name is not None:
                out[name] = r
    return out


def fingerprint(kept: np.ndarray | None) -> int:
    """A 32-bit fingerprint of a kept-index set (0 for a dimension never sliced)."""
    if kept is None:
        return 0
    return zlib.crc32(np.ascontiguousarray(kept, dtype=np.int64).tobytes()) or 1


def state_of(model: nn.Module) -> dict[tuple[str, int], int]:
    """``{(param, dim): fingerprint}`` of every sliced dimension (absent: never sliced)."""
    return {(name, dim): fingerprint(k) for name, r in param_records(model).items()
            for dim, k in r.kept.items()}


class EcospaForward:
    """Base class of the forwards the executor installs on modules (``module.forward``).

    Attributes:
        poisonable: the forward can write NaN at removed output positions (``poison``), which a
            KV-cache probe uses to see which positions of a cached tensor are removed.
        poison: write NaN there now (set only for the duration of such a probe).
    """

    poisonable = False
    poison = False

    def exact_path(self) -> Callable | None:
        """The exact forward to run in this one's place while a scope around the module swaps its
        dense views in (a narrow graph reads the sliced parameters), or None when this forward
        is exact already."""
        return None

    def store_dense(self) -> None:
        """Give back their dense width to tensors of the module this forward stores narrow
        between its calls (module buffers a narrow graph writes: ``narrow.stored``); none here."""


def installed_forward(module: nn.Module) -> EcospaForward | None:
    """The ecospa forward installed on ``module``, or None."""
    fwd = module.__dict__.get("forward")
    return fwd if isinstance(fwd, EcospaForward) else None


def _dense_tensor(p: torch.Tensor, rec: ParamRecord) -> torch.Tensor:
    """``p`` scattered into its dense shape, zeros in the removed slices."""
    if p.device.type == "meta":
        return torch.empty(rec.dense_shape, dtype=p.dtype, device="meta")
    out = p.detach().new_zeros(rec.dense_shape)
    index = tuple(torch.as_tensor(rec.kept_or_all(d), device=p.device).view(
        [-1 if i == d else 1 for i in range(p.dim())]) for d in range(p.dim()))
    out[index] = p.detach()
    return out


@contextlib.contextmanager
def dense_view(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily give ``model`` back its dense structure: every sliced parameter replaced by a
    dense tensor (kept values in place, zeros where slices were removed), installed forwards and
    overridden attributes removed. Restored on exit, whatever happens. Gradients and optimizer
    state are not touched. Used to capture the graph of a pruned model."""
    undo: list[tuple[dict, str, object]] = []
    dense: dict[int, nn.Parameter] = {}  # a parameter shared by several modules stays shared
    try:
        with torch.no_grad():
            for mod in model.modules():
                rec = mod.__dict__.get(RECORD_ATTR)
                if rec is not None:
                    for attr, r in rec.params.items():
                        p = mod._parameters[attr]
                        undo.append((mod._parameters, attr, p))
                        if id(p) not in dense:
                            dense[id(p)] = nn.Parameter(_dense_tensor(p, r), requires_grad=p.requires_grad)
                        mod._parameters[attr] = dense[id(p)]
                    for attr, value in rec.overridden.items():
                        undo.append((mod.__dict__, attr, mod.__dict__.get(attr)))
                        mod.__dict__[attr] = value
                if installed_forward(mod) is not None:
                    installed_forward(mod).store_dense()  # the next narrow call slices them again
                    undo.append((mod.__dict__, "forward", mod.__dict__["forward"]))
                    del mod.__dict__["forward"]
        yield model
    finally:
        for store, key, value in reversed(undo):
            store[key] = value
