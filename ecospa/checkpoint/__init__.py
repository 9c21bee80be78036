"""Checkpoints of (pruned) models: ``ecospa.save(model, directory)`` and ``ecospa.load(directory[, model])``.

A checkpoint is a directory: ``model.safetensors`` (weights), ``ecospa.json`` (manifest: format
version, the removal record keyed by parameter names, tied-weight aliases, the JSON part of the
optimizer / EcoSpa / extra / RNG state), ``state.safetensors`` (their tensors) and, for
transformers models, ``config.json``. Written atomically (``ecospa.checkpoint.atomic``), read
without unpickling anything. The format and the write scheme: docs/checkpoints.md.
"""
from ecospa.checkpoint.atomic import check_writable, exists
from ecospa.checkpoint.load import load, read_extra
from ecospa.checkpoint.manifest import FORMAT_VERSION
from ecospa.checkpoint.save import save

__all__ = ["save", "load", "read_extra", "exists", "check_writable", "FORMAT_VERSION"]
