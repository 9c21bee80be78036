"""``ecospa.save``: a (pruned) model, and optionally its training state, as a checkpoint directory."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ecospa.checkpoint.args import check_call
from ecospa.checkpoint.atomic import MANIFEST, atomic_directory
from ecospa.checkpoint.ecospa_state import ecospa_to_json
from ecospa.checkpoint.hf import hf_section
from ecospa.checkpoint.manifest import FORMAT, FORMAT_VERSION, HF_CONFIG, STATE, WEIGHTS, records_to_json
from ecospa.checkpoint.optim import optimizer_to_json
from ecospa.checkpoint.rng import rng_to_json
from ecospa.checkpoint.tensorfile import write_tensors
from ecospa.checkpoint.tree import dump_json, encode
from ecospa.checkpoint.weights import split_state
from ecospa.version import __version__
from ecospa.ir.record import param_records
from ecospa.errors import CheckpointError

__all__ = ["save"]


def save(model: nn.Module, directory: str | os.PathLike, *, optimizer: torch.optim.Optimizer | None = None,
         ecospa=None, extra: Any = None, rng: bool = False) -> Path:
    """Save ``model`` (dense or pruned by ecospa) to ``directory``, atomically; return its path.

    The directory holds ``model.safetensors`` (the ``state_dict``, tied tensors once),
    ``ecospa.json`` (format version, ecospa version, model class, the removal record keyed by
    parameter names, and the JSON part of the training state), ``config.json`` for transformers
    models, and ``state.safetensors`` for the tensors of the training state. No pickle. See
    docs/checkpoints.md. An existing checkpoint at ``directory`` is replaced as a whole; a reader
    (or a crash) sees the old one or the new one, never a mix.

    Args:
        model: the model.
        directory: where to write (created; must be new, empty, or a previous checkpoint).
        optimizer: also save its state (by parameter name) and hyperparameters.
        ecospa: an :class:`~ecospa.EcoSpa` on ``model``: also save its progress (steps, rounds,
            plan, events, Eq. 6 statistics); its optimizer is saved too unless ``optimizer`` is
            given.
        extra: anything else to resume with (step counters, an LR scheduler's ``state_dict()``,
            a data loader position): nested dicts (string keys), lists, tuples, numbers,
            strings, None and tensors. Read back with ``ecospa.checkpoint.read_extra(directory)``.
        rng: also save the torch (CPU, CUDA), Python ``random`` and NumPy global generator states,
            restored by ``ecospa.load(..., rng=True)``: a resumed run then draws the same
            dropout masks and shuffles as an uninterrupted one.

    Raises:
        CheckpointError: ``model`` is not a module or ``directory`` not a path; ``directory`` is a file or a non-empty directory that is not a
            checkpoint, or cannot be created (a read-only or virtual file system, a file on the
            way, no permission); the optimizer holds tensors that are not parameters of ``model``; state
            that is neither JSON data nor tensors.
    """
    check_call("save", model, directory, optimizer=optimizer)
    if ecospa is not None:
        if ecospa.model is not model:
            raise CheckpointError("ecospa= must be the EcoSpa built on the model being saved")
        if optimizer is None:
            optimizer = ecospa.optimizer
    weights, aliases = split_state(model)
    state: dict[str, torch.Tensor] = {}
    hf, config_bytes = hf_section(model)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ecospa_version": _version(),
        "torch_version": torch.__version__,
        "files": {},
        "model": {
            "class": type(model).__qualname__,
            "module": type(model).__module__,
            "training": model.training,
            "removals": records_to_json(param_records(model)),
            "aliases": aliases,
            "hf": hf,
        },
        "optimizer": optimizer_to_json(optimizer, model, state) if optimizer is not None else None,
        "ecospa": ecospa_to_json(ecospa, state) if ecospa is not None else None,
        "extra": encode(extra, "extra", state) if extra is not None else None,
        "rng": rng_to_json(state) if rng else None,
    }
    with atomic_directory(directory) as w:
        w.write(WEIGHTS, lambda f: write_tensors(f, weights, {"format": "pt"}))
        if state:
            w.write(STATE, lambda f: write_tensors(f, state))
        if config_bytes is not None:
            w.write(HF_CONFIG, config_bytes)
        manifest["files"] = {n: {"bytes": s} for n, s in sorted(w.sizes.items())}
        w.write(MANIFEST, dump_json(manifest))  # last
    return Path(os.path.realpath(directory))


def _version() -> str:
    return __version__
