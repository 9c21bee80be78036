"""Hugging Face transformers models: their config in the checkpoint, and the dense model rebuilt
from it by ``ecospa.load(directory)``.

``config.json`` is the model's full config with ``architectures`` set to the model class (as
``save_pretrained`` writes it); ``load`` builds the class it names. Rebuilding never runs code from the checkpoint: the config
class comes from ``transformers.AutoConfig.for_model(model_type)`` (built-in model types only;
no ``trust_remote_code``) and the model class must be a ``PreTrainedModel`` exported by
``transformers`` itself, built with the saved ``attn_implementation`` and random weights (the
saved ones are loaded afterwards). Submodules the saved model did not have but its class builds
by default (``BertModel(config, add_pooling_layer=False)`` has no ``pooler``: constructor
arguments are not in the config) are set to None on the rebuilt model, as the constructor does;
the saved manifest lists the module paths for that.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import torch.nn as nn

from ecospa.checkpoint.tree import dump_json, parse_json
from ecospa.errors import CheckpointError

__all__ = ["hf_section", "build_from_config", "drop_absent_modules"]


def _transformers():
    return sys.modules.get("transformers")


def hf_section(model: nn.Module) -> tuple[dict | None, bytes | None]:
    """``(manifest "hf" entry, config.json bytes)`` for a transformers model, else ``(None, None)``."""
    tf = _transformers()
    if tf is None or not isinstance(model, tf.PreTrainedModel):
        return None, None
    config = json.loads(model.config.to_json_string(use_diff=False))  # JSON-safe (dtypes as strings)
    config["architectures"] = [type(model).__name__]
    attn = getattr(model.config, "_attn_implementation", None)
    return ({"architecture": type(model).__name__, "attn_implementation": attn if isinstance(attn, str) else None,
             "modules": sorted(name for name, _ in model.named_modules())},
            dump_json(config))


def drop_absent_modules(model: nn.Module, saved: list[str] | None) -> list[str]:
    """Set to None every submodule of the rebuilt ``model`` that the saved model did not have
    although its parent was there (an optional part its constructor left out); return their
    paths. ``saved``: the saved module paths (None for checkpoints written before they were
    recorded: nothing is dropped)."""
    if saved is None:
        return []
    have = set(saved)
    dropped: list[str] = []
    for name, _ in list(model.named_modules()):
        if name in have or not name or any(name.startswith(d + ".") for d in dropped):
            continue
        parent, _, child = name.rpartition(".")
        if parent in have:
            setattr(model.get_submodule(parent), child, None)
            dropped.append(name)
    return dropped


def build_from_config(hf: dict, config_bytes: bytes, where: str) -> nn.Module:
    """A freshly built dense transformers model of the saved class and config.

    Raises:
        CheckpointError: transformers not installed, a config that is not JSON or names an
            unknown model type, a class that transformers does not export.
    """
    try:
        import transformers
    except ImportError:
        raise CheckpointError(f"{where} holds a transformers model ({hf['architecture']}); install "
                              "transformers to rebuild it, or pass a built model: "
                              "ecospa.load(directory, model)") from None
    config: Any = parse_json(config_bytes, f"{where}/config.json")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise CheckpointError(f"{where}/config.json has no model_type; the checkpoint is damaged, save it again")
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else hf["architecture"]
    if arch != hf["architecture"]:
        raise CheckpointError(f"{where}/config.json names {arch!r}, the manifest {hf['architecture']!r}; "
                              "the checkpoint was edited or damaged: save it again")
    cls = getattr(transformers, arch, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"{where}: transformers {transformers.__version__} has no model class "
                              f"{arch!r}; build the model yourself and call ecospa.load(directory, model)")
    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        cfg = transformers.AutoConfig.for_model(config["model_type"], **fields)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}/config.json: transformers cannot build a "
                              f"{config['model_type']!r} config ({e}); build the model yourself and call "
                              "ecospa.load(directory, model)") from None
    kwargs = {"attn_implementation": hf["attn_implementation"]} if hf.get("attn_implementation") else {}
    return cls._from_config(cfg, **kwargs)
