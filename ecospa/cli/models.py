"""``MODEL`` arguments: what the commands accept and how each becomes a model.

    gpt2, llama, bert, ...    a transformers model type: built from its config with small sizes
                              (``--full-size`` for the library defaults), random weights
    path/config.json          a transformers config file: built from it, random weights
    path/folder               a local pretrained transformers folder (``from_pretrained``), a
                              folder with only a config.json (random weights), a folder holding one
                              GGUF file, or an ``ecospa.save`` checkpoint (``ecospa.load``)
    path/model.gguf           a GGUF file, through transformers (needs the ``gguf`` package)
    owner/name                a Hugging Face Hub id, only if the local Hugging Face cache holds it
    timm:NAME or NAME         a timm model (``timm.create_model``, random weights; needs timm)
    module:factory            your own code: ``factory()`` returns a model or (model, example inputs);
                              ``module`` is an importable module or a path to a ``.py`` file

Nothing is downloaded: every source is local or built from a config (``local_files_only=True``).
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import ecospa
from ecospa.cli._common import CliError, need

__all__ = ["Loaded", "load_model", "local_source", "gguf_config", "quiet_transformers", "small_config_kwargs", "hf_inputs", "MODEL_HELP"]

MODEL_HELP = ("a transformers model type (gpt2, llama, bert, ...: small sizes, random weights), a config.json, "
              "a local pretrained folder or GGUF file, a Hub id (owner/name) already in the local Hugging Face "
              "cache, an ecospa checkpoint folder, timm:NAME, or module:factory (your code; factory() returns a "
              "model or (model, example_inputs))")

# Small sizes for a model type's config (the library defaults are the full-size models). Each key
# is used only when the config class takes it (directly or through its attribute_map).
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
         "d_ff": 128, "head_dim": 16, "d_kv": 16, "vocab_size": 256, "max_position_embeddings": 128,
         "image_size": 32, "patch_size": 8, "num_local_experts": 4}

NO_DOWNLOAD = ("ecospa never downloads: fetch the model first (huggingface-cli download ID --local-dir DIR, or "
               "from_pretrained(ID).save_pretrained(DIR)) and pass DIR")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

PRETRAINED_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")


@dataclass
class Loaded:
    """A model and what it came from; ``example_inputs`` None: the model carries dummy inputs."""

    model: nn.Module
    example_inputs: Any
    source: str  # "config", "pretrained", "gguf", "checkpoint", "timm", "factory"
    label: str


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def _transformers():
    try:
        import transformers
    except ImportError:
        raise CliError("this model needs transformers, which is not installed: pip install transformers") from None
    import logging

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return transformers


def quiet_transformers():
    """transformers, imported with its logging and progress bars quieted; CliError if not installed."""
    return _transformers()


def small_config_kwargs(config_class) -> dict[str, Any]:
    """``SMALL`` under the names ``config_class.__init__`` takes."""
    import inspect

    params = inspect.signature(config_class.__init__).parameters
    amap = getattr(config_class, "attribute_map", {}) or {}
    try:
        default = config_class()
    except Exception:  # noqa: BLE001 - a config that needs arguments: no small defaults
        return {}
    out: dict[str, Any] = {}
    for key, value in SMALL.items():
        name = key if key in params else amap.get(key)
        if name is None or name not in params or getattr(default, name, None) is None:
            continue
        out[name] = value
    kv = "num_key_value_heads"
    if kv in params and getattr(default, kv, None) is not None:
        heads = getattr(default, amap.get("num_attention_heads", "num_attention_heads"), None)
        out[kv] = 4 if getattr(default, kv) == heads else 2  # keep MHA as MHA, GQA as GQA
    return out


def _model_class(transformers, config):
    """The transformers class to build: the config's ``architectures``, else the LM / base model."""
    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from transformers.models.auto import modeling_auto as ma

    mt = config.model_type
    if mt in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    if mt in ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForSeq2SeqLM
    return transformers.AutoModel


def hf_inputs(model: nn.Module) -> Any:
    """Example inputs for a transformers model that carries no dummy inputs (vision, audio)."""
    name = getattr(model, "main_input_name", "input_ids")
    cfg = getattr(model, "config", None)
    if name == "pixel_values" and cfg is not None:
        size = getattr(cfg, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        return {"pixel_values": torch.randn(1, getattr(cfg, "num_channels", 3), h, w)}
    if name == "input_values":
        return {"input_values": torch.randn(1, 16000)}
    return None


def _from_config(transformers, config, label: str) -> Loaded:
    cls = _model_class(transformers, config)
    torch.manual_seed(0)
    try:
        model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
    except Exception as e:  # noqa: BLE001 - any construction failure is bad input here
        raise CliError(f"cannot build {label} from its config: {type(e).__name__}: {e}") from None
    return Loaded(model, hf_inputs(model), "config", f"{label} ({type(model).__name__}, random weights)")


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--set takes KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _check_overrides(cls, overrides: dict[str, Any], label: str) -> None:
    """Refuse ``--set`` keys that ``cls`` (a transformers config class) does not have: a config
    would keep an unknown key as a silent extra attribute. The message lists the valid keys."""
    import inspect

    if not overrides:
        return
    try:
        default = cls()
    except Exception:  # noqa: BLE001 - a config that needs arguments: nothing to check against
        return
    params = [p for p, v in inspect.signature(cls.__init__).parameters.items()
              if p != "self" and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]
    amap = getattr(cls, "attribute_map", {}) or {}
    valid = set(params) | set(default.to_dict()) | set(amap)
    unknown = [k for k in overrides if k not in valid and not hasattr(default, k)]
    if not unknown:
        return
    from transformers import PretrainedConfig

    generic = set(inspect.signature(PretrainedConfig.__init__).parameters)
    own = sorted({p for p in params if p not in generic} | set(amap))
    close = [c for k in unknown for c in difflib.get_close_matches(k, sorted(valid), n=2)]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise CliError(f"--set {', '.join(unknown)}: not a field of {label}'s config ({cls.__name__}){hint}; its fields: "
                   f"{', '.join(own)}")


def _config_name(name: str, overrides: dict[str, Any], full_size: bool) -> Loaded:
    transformers = _transformers()
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[name]
    _check_overrides(cls, overrides, name)
    kwargs = {} if full_size else small_config_kwargs(cls)
    kwargs.update(overrides)
    try:
        config = cls(**kwargs)
    except Exception as e:  # noqa: BLE001
        raise CliError(f"bad config for {name!r} ({kwargs}): {type(e).__name__}: {e}") from None
    return _from_config(transformers, config, f"{name}{'' if full_size else ' (small)'}")


def _config_file(path: Path, overrides: dict[str, Any]) -> Loaded:
    transformers = _transformers()
    from transformers import CONFIG_MAPPING

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CliError(f"{path} is not a readable JSON config: {e}") from None
    mt = data.get("model_type") if isinstance(data, dict) else None
    if mt not in CONFIG_MAPPING:
        raise CliError(f"{path} has no known transformers model_type (got {mt!r})")
    _check_overrides(CONFIG_MAPPING[mt], overrides, str(path))
    try:
        config = CONFIG_MAPPING[mt].from_dict({**data, **overrides})
    except Exception as e:  # noqa: BLE001
        raise CliError(f"bad config in {path}: {type(e).__name__}: {_first_line(e)}") from None
    return _from_config(transformers, config, str(path))


def gguf_config(transformers, gguf_file: str | None) -> dict[str, Any]:
    """``from_pretrained`` keywords for a GGUF file: every weight dequantized at load (a plain dense
    model, no quantizer attached: ``.float()``, pruning and saving work as on any model)."""
    if gguf_file is None:
        return {}
    config = getattr(transformers, "GgufConfig", None)  # older transformers always dequantize GGUF
    return {"gguf_file": gguf_file, **({"quantization_config": config(dequantize=True)} if config else {})}


def _pretrained(source: str, gguf_file: str | None = None) -> Loaded:
    """``from_pretrained`` of a local folder (or a Hub id already in the local cache), never downloading."""
    transformers = _transformers()
    if gguf_file is not None:
        need("gguf", why="GGUF files", install="pip install gguf")
    try:
        config = transformers.AutoConfig.from_pretrained(source, gguf_file=gguf_file, local_files_only=True)
        cls = _model_class(transformers, config)
        model = cls.from_pretrained(source, local_files_only=True, **gguf_config(transformers, gguf_file))
    except Exception as e:  # noqa: BLE001
        what = f"GGUF file {Path(source) / gguf_file}" if gguf_file else f"pretrained model {source}"
        raise CliError(f"cannot load the {what}: {type(e).__name__}: {_first_line(e)}") from None
    label = f"{Path(source) / gguf_file if gguf_file else source} ({type(model).__name__})"
    return Loaded(model, hf_inputs(model), "gguf" if gguf_file else "pretrained", label)


def _hub_id(spec: str) -> Loaded:
    """``owner/name`` that is no path here: a Hub id, loaded only if the local Hugging Face cache has it."""
    transformers = _transformers()
    try:
        transformers.AutoConfig.from_pretrained(spec, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or not a Hub id at all)
        raise CliError(f"no such file or directory: {spec!r}, and no Hugging Face Hub model of that name in the local "
                       f"cache; {NO_DOWNLOAD}") from None
    return _pretrained(spec)


def _checkpoint(folder: Path, factory: str | None) -> Loaded:
    if factory is not None:
        dense = _factory(factory)
        model = ecospa.load(folder, dense.model, example_inputs=dense.example_inputs)
        return Loaded(model, dense.example_inputs, "checkpoint", f"{folder} (ecospa checkpoint, {type(model).__name__})")
    if not (folder / "config.json").is_file():
        raise CliError(f"{folder} is an ecospa checkpoint of a plain module: pass the code that builds the dense "
                       "model with --model module:factory")
    _transformers()
    model = ecospa.load(folder)
    return Loaded(model, hf_inputs(model), "checkpoint", f"{folder} (ecospa checkpoint, {type(model).__name__})")


def _import_module(spec: str):
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        path = Path(spec)
        if not path.is_file():
            raise CliError(f"no such file: {spec!r}")
        name = f"_ecospa_user_{path.stem}"
        mspec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mspec)
        sys.modules[name] = module
        sys.path.insert(0, str(path.resolve().parent))
        try:
            mspec.loader.exec_module(module)
        finally:
            sys.path.pop(0)
        return module
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as e:
        if e.name and spec.startswith(e.name):
            raise CliError(f"no module named {spec!r} (run from the folder that holds it, or give a path to the .py "
                           "file)") from None
        raise


def _factory(spec: str) -> Loaded:
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise CliError(f"expected module:factory, got {spec!r}")
    obj: Any = _import_module(mod_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"{mod_name} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CliError(f"{spec} is not callable")
    out = obj()
    model, inputs = (out if isinstance(out, tuple) and len(out) == 2 else (out, None))
    if not isinstance(model, nn.Module):
        raise CliError(f"{spec}() should return a torch.nn.Module or (module, example_inputs), got "
                       f"{type(out).__name__}")
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    return Loaded(model, inputs, "factory", f"{spec} ({type(model).__name__})")


def _timm(name: str, explicit: bool) -> Loaded:
    try:
        import timm
    except Exception as e:  # noqa: BLE001 - timm may be installed but fail to import (torchvision)
        raise CliError(f"{'timm model' if explicit else 'model'} {name!r}: timm model names need timm, which does "
                       f"not import here ({type(e).__name__}: {_first_line(e)}): "
                       "pip install timm") from None
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise CliError(f"unknown timm model {name!r}" + (f" (similar: {', '.join(close)})" if close else ""))
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    return Loaded(model, (torch.randn(1, *size),), "timm", f"timm:{name} ({type(model).__name__}, random weights)")


def local_source(spec: str) -> tuple[str, Path, str | None]:
    """What a local pretrained ``MODEL`` is, without loading it: ``(kind, folder, gguf file name)``
    with kind ``"checkpoint"``, ``"pretrained"`` or ``"gguf"`` (the choice :func:`load_model` makes).

    Raises:
        CliError: no such path, or a file or folder that is none of these.
    """
    path = Path(spec)
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path.parent, path.name
        raise CliError(f"{spec} is a file: give a folder (save_pretrained or an ecospa checkpoint) or a .gguf file")
    if not path.is_dir():
        raise CliError(f"no such file or folder: {spec!r}")
    if (path / "ecospa.json").is_file():
        return "checkpoint", path, None
    if (path / "config.json").is_file() and any((path / w).is_file() for w in PRETRAINED_WEIGHTS):
        return "pretrained", path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise CliError(f"{path} holds several GGUF files ({', '.join(ggufs)}): name one")
    if ggufs:
        return "gguf", path, ggufs[0]
    raise CliError(f"{path} is neither a pretrained transformers folder (config.json + weights), a GGUF file or "
                   "folder, nor an ecospa checkpoint")


def _no_overrides(over: dict[str, Any], spec: str, what: str) -> None:
    """``--set`` only changes a config that ecospa builds a model from: refuse it for anything else."""
    if over:
        raise CliError(f"--set {', '.join(over)}: {spec!r} is {what}, so there is no config to override; --set "
                       "applies to a transformers model type (gpt2, llama, ...) or a config.json")


def load_model(spec: str, *, overrides: list[str] | None = None, full_size: bool = False,
               factory: str | None = None) -> Loaded:
    """Resolve a ``MODEL`` argument (see the module docstring).

    Raises:
        CliError: unknown name, missing file, missing package, or a model that cannot be built.
    """
    over = _parse_overrides(overrides or [])
    path = Path(spec)
    if path.is_dir():
        if (path / "ecospa.json").is_file():
            _no_overrides(over, spec, "an ecospa checkpoint")
            return _checkpoint(path, factory)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if (path / "config.json").is_file() and any((path / w).is_file() for w in PRETRAINED_WEIGHTS):
            _no_overrides(over, spec, "a pretrained folder")
            return _pretrained(str(path))
        if ggufs:
            if len(ggufs) > 1:
                raise CliError(f"{path} holds several GGUF files ({', '.join(ggufs)}): name one")
            _no_overrides(over, spec, "a GGUF folder")
            return _pretrained(str(path), ggufs[0])
        if (path / "config.json").is_file():
            return _config_file(path / "config.json", over)
        raise CliError(f"{path} is neither a pretrained transformers folder (config.json + weights), a GGUF folder "
                       "nor an ecospa checkpoint")
    if path.is_file():
        if path.suffix == ".gguf":
            _no_overrides(over, spec, "a GGUF file")
            return _pretrained(str(path.parent), path.name)
        if path.suffix == ".json":
            return _config_file(path, over)
        raise CliError(f"{spec}: a file MODEL is a config .json or a .gguf file (a .py file needs :factory)")
    if spec.startswith("timm:"):
        _no_overrides(over, spec, "a timm model")
        return _timm(spec[5:], explicit=True)
    if ":" in spec:
        _no_overrides(over, spec, "your own code (module:factory)")
        return _factory(spec)
    if HUB_ID.match(spec) and not spec.endswith((".json", ".gguf", ".py")):
        _no_overrides(over, spec, "a Hub model")
        return _hub_id(spec)
    if spec.endswith((".json", ".gguf", ".py")) or "/" in spec or "\\" in spec:
        raise CliError(f"no such file or directory: {spec!r}")
    try:
        from transformers import CONFIG_MAPPING
        types = list(CONFIG_MAPPING.keys())
    except ImportError:
        types = None
    if types is not None and spec in types:
        return _config_name(spec, over, full_size)
    _no_overrides(over, spec, "not a transformers model type")
    try:
        return _timm(spec, explicit=False)
    except CliError as e:
        if "unknown timm model" not in str(e) and types is None:
            raise
        close = difflib.get_close_matches(spec, types or [], n=3)
        hint = f" (similar transformers types: {', '.join(close)})" if close else ""
        tail = "" if "unknown timm model" in str(e) else ("; timm model names need timm, which does not import "
                                                           "here: pip install timm")
        raise CliError(f"unknown model {spec!r}: not a transformers model type{hint}, a file or folder, timm:NAME, "
                       f"module:factory or a Hub id (owner/name) in the local cache{tail}") from None
