"""``ecospa.json``: the manifest of a checkpoint directory, and its schema check.

Format version 1::

    {
      "format": "ecospa.checkpoint", "format_version": 1,
      "ecospa_version": "0.1.0", "torch_version": "2.13.0",
      "files": {"model.safetensors": {"bytes": 123}, "state.safetensors": {...}, "config.json": {...}},
      "model": {
        "class": "GPT2LMHeadModel", "module": "transformers.models.gpt2.modeling_gpt2",
        "training": false,
        "removals": {"<param>": {"dense_shape": [96, 32], "kept": {"0": [0, 2, 5, ...]}}},
        "aliases": {"lm_head.weight": "transformer.wte.weight"},
        "hf": {"architecture": "GPT2LMHeadModel", "attn_implementation": "sdpa",
               "modules": ["", "transformer", ...]} | null
      },
      "optimizer": {...} | null,      # ecospa.checkpoint.optim
      "ecospa": {...} | null,         # ecospa.checkpoint.training
      "extra": <JSON with tensor references> | null,
      "rng": {...} | null
    }

``removals`` is ``ecospa.param_records(model)``: per sliced parameter its dense shape and, per
sliced dimension, the kept indices of the dense model (sorted). ``aliases`` maps each
``state_dict`` key whose tensor is another key's (tied weights) to that key; the tensor is stored
once. Tensors of the other sections are ``{"__tensor__": key}`` references into
``state.safetensors`` (``ecospa.checkpoint.tree``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ecospa.checkpoint.tree import is_int, parse_json, references
from ecospa.ir.record import ParamRecord
from ecospa.errors import CheckpointError

__all__ = ["FORMAT", "FORMAT_VERSION", "WEIGHTS", "STATE", "HF_CONFIG", "KNOWN_FILES",
           "Manifest", "parse_manifest", "file_names", "records_to_json"]

FORMAT = "ecospa.checkpoint"
FORMAT_VERSION = 1
WEIGHTS, STATE, HF_CONFIG = "model.safetensors", "state.safetensors", "config.json"
KNOWN_FILES = (WEIGHTS, STATE, HF_CONFIG)
_SECTIONS = ("optimizer", "ecospa", "extra", "rng")


def records_to_json(records: Mapping[str, ParamRecord]) -> dict:
    """``{param: {"dense_shape", "kept"}}`` of ``ecospa.param_records(model)``."""
    return {name: r.to_dict() for name, r in sorted(records.items())}


@dataclass(frozen=True)
class Manifest:
    """A checked manifest.

    Attributes:
        where: the manifest's path (for messages).
        data: the JSON object.
        removals: ``{param: ParamRecord}`` the saved model had.
        aliases: ``{state_dict key: key whose tensor it shares}``.
    """

    where: str
    data: dict
    removals: dict[str, ParamRecord]
    aliases: dict[str, str]

    @property
    def files(self) -> dict[str, int]:
        """``{file name: size in bytes}``."""
        return {n: f["bytes"] for n, f in self.data["files"].items()}

    @property
    def model(self) -> dict:
        """The ``model`` section."""
        return self.data["model"]

    def section(self, name: str) -> Any:
        """``optimizer``, ``ecospa``, ``extra`` or ``rng`` (None when not saved)."""
        return self.data.get(name)


def _need(obj: Any, key: str, kind, path: str, fail) -> Any:
    if not isinstance(obj, dict):
        raise fail(path, f"expected a JSON object, got {type(obj).__name__}")
    at = f"{path}.{key}" if path else key
    if key not in obj:
        raise fail(at, "missing")
    v = obj[key]
    ok = is_int(v) if kind is int else isinstance(v, kind)
    if not ok:
        raise fail(at, f"expected {getattr(kind, '__name__', kind)}, got {type(v).__name__}")
    return v


def _record(name: str, r: Any, fail) -> ParamRecord:
    path = f"model.removals[{name!r}]"
    shape = _need(r, "dense_shape", list, path, fail)
    if not all(is_int(k) and k >= 0 for k in shape):
        raise fail(f"{path}.dense_shape", f"{shape!r} is not a list of non-negative ints")
    kept: dict[int, np.ndarray] = {}
    for d, idx in _need(r, "kept", dict, path, fail).items():
        if not (d.isdigit() and int(d) < len(shape)):
            raise fail(f"{path}.kept", f"dimension {d!r} is not one of 0..{len(shape) - 1}")
        if not (isinstance(idx, list) and all(is_int(i) for i in idx)):
            raise fail(f"{path}.kept[{d}]", "expected a list of ints")
        arr = np.asarray(idx, dtype=np.int64)
        if arr.size and (arr[0] < 0 or arr[-1] >= shape[int(d)] or (np.diff(arr) <= 0).any()):
            raise fail(f"{path}.kept[{d}]", f"indices must be increasing and in 0..{shape[int(d)] - 1}")
        kept[int(d)] = arr
    return ParamRecord(tuple(shape), kept)


def parse_manifest(data: bytes, where: str) -> Manifest:
    """Parse and check a manifest (the schema above).

    Raises:
        CheckpointError: not JSON, not an ecospa checkpoint, a format version this ecospa does
            not read, or a field of the wrong type (the message names the field).
    """
    obj = parse_json(data, where)

    def fail(path: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{where}: {path}: {problem}; the manifest is damaged or was not "
                               "written by ecospa.save: save the checkpoint again")

    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not an ecospa checkpoint manifest (no \"format\": "
                              f"\"{FORMAT}\"); load a directory written by ecospa.save")
    version = obj.get("format_version")
    if not is_int(version) or version < 1:
        raise fail("format_version", f"{version!r} is not a format version")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{where}: checkpoint format version {version} was written by a newer "
                              f"ecospa ({obj.get('ecospa_version')!r}); this one reads version "
                              f"{FORMAT_VERSION}: upgrade ecospa")
    for key in ("ecospa_version", "torch_version"):
        _need(obj, key, str, "", fail)
    files = _need(obj, "files", dict, "", fail)
    for name, info in files.items():
        if name not in KNOWN_FILES:
            raise fail(f"files[{name!r}]", f"unknown file (a checkpoint holds {list(KNOWN_FILES)})")
        if _need(info, "bytes", int, f"files[{name!r}]", fail) < 0:
            raise fail(f"files[{name!r}].bytes", "negative")
    if WEIGHTS not in files:
        raise fail("files", f"{WEIGHTS} is not listed")
    model = _need(obj, "model", dict, "", fail)
    for key in ("class", "module"):
        _need(model, key, str, "model", fail)
    _need(model, "training", bool, "model", fail)
    removals = {n: _record(n, r, fail) for n, r in _need(model, "removals", dict, "model", fail).items()}
    aliases = _need(model, "aliases", dict, "model", fail)
    if not all(isinstance(v, str) for v in aliases.values()):
        raise fail("model.aliases", "values must be strings (state_dict keys)")
    hf = model.get("hf")
    if hf is not None:
        _need(hf, "architecture", str, "model.hf", fail)
        attn = hf.get("attn_implementation")
        if attn is not None and not isinstance(attn, str):
            raise fail("model.hf.attn_implementation", "expected a string or null")
        mods = hf.get("modules")
        if mods is not None and not (isinstance(mods, list) and all(isinstance(x, str) for x in mods)):
            raise fail("model.hf.modules", "expected a list of module paths or null")
        if HF_CONFIG not in files:
            raise fail("files", f"a transformers model without {HF_CONFIG}")
    for key in _SECTIONS:
        if key not in obj:
            raise fail(key, "missing (null when not saved)")
    for key in ("optimizer", "ecospa", "rng"):
        if obj[key] is not None and not isinstance(obj[key], dict):
            raise fail(key, f"expected an object or null, got {type(obj[key]).__name__}")
    if STATE not in files and any(references(obj[k]) for k in _SECTIONS):
        raise fail("files", f"tensors are referenced but {STATE} is not listed")
    return Manifest(where, obj, removals, dict(aliases))


def file_names(data: bytes, directory: Path) -> list[str]:
    """The files a manifest lists (for ``atomic.open_snapshot``)."""
    return list(parse_manifest(data, str(directory / "ecospa.json")).files)
