"""``ecospa.load``: a checkpoint directory back into a model (and optimizer, EcoSpa, RNG states).

Everything is read and checked first (files, schema, format version, parameter names, dense and
pruned shapes, optimizer groups and state shapes, EcoSpa's plan and statistics, RNG states);
only then are the removals replayed on the model, the weights loaded, and the optimizer, EcoSpa
and generators restored. A checkpoint that does not fit raises
:class:`~ecospa.errors.CheckpointError` with the model, the optimizer and EcoSpa unchanged.
Loading reads JSON and safetensors only: nothing is unpickled, no code from the directory runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ecospa.checkpoint.args import check_call
from ecospa.checkpoint.atomic import MANIFEST, open_snapshot
from ecospa.checkpoint.ecospa_state import check_ecospa, restore_ecospa
from ecospa.checkpoint.hf import build_from_config, drop_absent_modules
from ecospa.checkpoint.manifest import HF_CONFIG, STATE, WEIGHTS, Manifest, file_names, parse_manifest
from ecospa.checkpoint.optim import check_optimizer, restore_optimizer
from ecospa.checkpoint.removals import check_removals, replay, same_records
from ecospa.checkpoint.rng import check_rng, restore_rng
from ecospa.checkpoint.tensorfile import read_tensors
from ecospa.checkpoint.tree import decode
from ecospa.checkpoint.weights import check_weights, expected_shapes, load_weights, uniform_float_dtype
from ecospa.ir.record import param_records
from ecospa.errors import CheckpointError

__all__ = ["load", "read_extra", "Checkpoint", "read_checkpoint"]


@dataclass(frozen=True)
class Checkpoint:
    """Everything a checkpoint directory holds, read and schema-checked (nothing applied yet)."""

    where: str
    manifest: Manifest
    weights: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]
    config: bytes | None


def read_checkpoint(directory: str | os.PathLike) -> Checkpoint:
    """Read and check every file of a checkpoint (one consistent version of it; see
    ``ecospa.checkpoint.atomic``).

    Raises:
        CheckpointError: no checkpoint there, a missing, truncated or malformed file, a format
            version this ecospa does not read.
    """
    with open_snapshot(directory, file_names) as snap:
        where = str(snap.path)
        manifest = parse_manifest(snap.manifest, os.path.join(where, MANIFEST))
        for name, size in manifest.files.items():
            actual = os.fstat(snap.files[name].fileno()).st_size
            if actual != size:
                raise CheckpointError(f"{where}/{name} has {actual} bytes, the manifest says {size}: "
                                      "the file was truncated or replaced; save the checkpoint again")
        weights = read_tensors(snap.files[WEIGHTS], f"{where}/{WEIGHTS}")
        state = read_tensors(snap.files[STATE], f"{where}/{STATE}") if STATE in snap.files else {}
        config = snap.files[HF_CONFIG].read() if HF_CONFIG in snap.files else None
    return Checkpoint(where, manifest, weights, state, config)


def read_extra(directory: str | os.PathLike) -> Any:
    """The ``extra=`` a checkpoint was saved with (None if none), tensors included.

    Raises:
        CheckpointError: see :func:`read_checkpoint`.
    """
    ck = read_checkpoint(directory)
    return decode(ck.manifest.section("extra"), ck.state, f"{ck.where}: extra")


def _rebuild(ck: Checkpoint) -> nn.Module:
    hf = ck.manifest.model.get("hf")
    if hf is None or ck.config is None:
        raise CheckpointError(f"{ck.where} holds a {ck.manifest.model['class']}, not a transformers model, so "
                              "it cannot be rebuilt from a config: build the dense model yourself and "
                              "call ecospa.load(directory, model)")
    model = build_from_config(hf, ck.config, ck.where)
    drop_absent_modules(model, hf.get("modules"))
    dtype = uniform_float_dtype(ck.weights)
    if dtype is not None:
        model.to(dtype)
    return model


def load(directory: str | os.PathLike, model: nn.Module | None = None, *,
         optimizer: torch.optim.Optimizer | None = None, ecospa=None, example_inputs=None,
         rng: bool = False, narrow: bool | str = True) -> nn.Module:
    """Load a checkpoint written by :func:`ecospa.save`; return the (pruned) model.

    ``load(directory, dense)`` takes a freshly built dense model of the saved architecture and
    config, prunes it in place as the saved one was (the removal record, replayed through the
    couplings ``ecospa.auto_couple`` finds) and loads the weights: the model computes what the
    saved one computed, with the same parameter names and shapes. ``load(directory)`` builds the
    dense transformers model from the saved ``config.json`` first (then in the saved train/eval
    mode and floating dtype).

    Args:
        directory: the checkpoint directory.
        model: a freshly built dense model (or one pruned less than the checkpoint); None for a
            transformers model rebuilt from its config.
        optimizer: restore the saved optimizer state into this optimizer, built on the dense
            model's parameters with the same param groups (it is pruned along). An optimizer
            built on the dense model but not passed here keeps pointing to the dense
            parameters: pass it, or build it after loading.
        ecospa: restore the saved :class:`~ecospa.EcoSpa` progress into this EcoSpa, built on
            ``model`` (and its optimizer) with the same settings; the run then continues exactly
            as it would have. Its optimizer's state is restored too when saved.
        example_inputs: inputs for ``ecospa.auto_couple(model, ...)`` when the model carries no
            dummy inputs (needed to replay removals on plain modules).
        rng: restore the generator states saved with ``save(..., rng=True)``.
        narrow: as in :func:`ecospa.prune` (pruned attention runs at its kept widths); a model
            pruned with ``narrow=False`` computes bit-identically after loading with
            ``narrow=False``, and up to float rounding otherwise.

    Raises:
        CheckpointError: before anything changes, when the directory does not match: missing
            or damaged files, schema or format version, another model class, a parameter missing
            or of another dense shape, weights of the wrong shape, optimizer or EcoSpa state
            that does not fit, a state that was not saved but is asked for.
    """
    check_call("load", model, directory, model_optional=True, optimizer=optimizer)
    ck = read_checkpoint(directory)
    m = ck.manifest
    rebuilt = model is None
    if rebuilt:
        if ecospa is not None or optimizer is not None:
            raise CheckpointError("optimizer= and ecospa= are built on a model: build the model, then "
                                  "call ecospa.load(directory, model, optimizer=..., ecospa=...)")
        model = _rebuild(ck)
    elif type(model).__qualname__ != m.model["class"]:
        raise CheckpointError(f"{ck.where} holds a {m.model['class']}, not a {type(model).__qualname__}; "
                              "load it into a freshly built model of the saved class")
    if ecospa is not None and optimizer is None and m.section("optimizer") is not None:
        optimizer = ecospa.optimizer
    if ecospa is not None and optimizer is not None and ecospa.optimizer is not optimizer:
        raise CheckpointError("optimizer= must be the optimizer EcoSpa was built with (ecospa.optimizer), "
                              "since EcoSpa prunes it along")
    shapes = check_removals(model, m.removals, ck.where)
    check_weights(f"{ck.where}/{WEIGHTS}", ck.weights, m.aliases, expected_shapes(model, shapes),
                  type(model).__name__)
    opt_state = (check_optimizer(m.section("optimizer"), ck.state, optimizer, model, shapes, ck.where)
                 if optimizer is not None else None)
    rng_state = check_rng(m.section("rng"), ck.state, ck.where) if rng else None
    sp_state = (check_ecospa(m.section("ecospa"), ck.state, ecospa, model, m.removals, shapes, ck.where,
                             example_inputs) if ecospa is not None else None)
    # everything checked: apply
    if sp_state is not None:
        restore_ecospa(ecospa, sp_state)
        if not same_records(param_records(model), m.removals):  # pragma: no cover - checked above
            raise CheckpointError(f"{ck.where}: internal error: EcoSpa's replayed plan differs from the "
                                  "saved removals; please report this")
    else:
        replay(model, m.removals, optimizer, example_inputs=example_inputs, narrow=narrow, where=ck.where)
    with torch.no_grad():
        load_weights(model, ck.weights, m.aliases)
    if opt_state is not None:
        restore_optimizer(optimizer, model, opt_state)
    if rebuilt:
        model.train(m.model["training"])
    if rng_state is not None:
        restore_rng(rng_state)
    return model
