"""``ecospa.export``: a pruned transformers model as a standard checkpoint of its own class.

1. the pruned model's structure by state-dict key (``structure.py``);
2. which config fields set which sizes (``fields.py``, probed on the meta device);
3. the smallest expressible widths that contain the kept ones (``padding.py``);
4. the model rebuilt from the edited config, the masked dense tensors cut to those widths and
   loaded *strictly*, and its logits compared with the pruned model's (computed as the masked
   dense model, ``record.dense_view``, which ecospa guarantees equal) on the check inputs. If
   they differ (a head width that sets the rotary frequencies, an attention scale read from the
   head width), the inner fields (head widths) are kept dense and it is tried again, then every
   field (the dense config, zero-padded: always exact). The first exact one is written with
   ``save_pretrained``: ``config.json`` + ``model.safetensors``, loadable without ecospa.
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from ecospa.ir.record import dense_view
from ecospa.export.fields import FieldMap, config_with, probe_fields
from ecospa.export.padding import Selection, select
from ecospa.export.report import ExportError, ExportReport
from ecospa.export.structure import Structure, dense_tensor, structure_of

__all__ = ["export", "build_exported", "HINT"]

HINT = ("prune whole heads (every unit of a head's couplings: min_units=0), the same number of heads "
        "and the same FFN width in every layer (head_widths='uniform' keeps head widths equal; a "
        "head width below the dense one is only expressible where the config states it and no "
        "rotary embedding depends on it)")


def _transformers_model(model: nn.Module):
    tf = sys.modules.get("transformers")
    if tf is None or not isinstance(model, tf.PreTrainedModel):
        raise ExportError(f"ecospa.export writes transformers checkpoints; {type(model).__name__} is not a "
                          "transformers PreTrainedModel: keep it with ecospa.save(model, directory)")
    return tf


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_inputs(model: nn.Module, inputs: Mapping[str, torch.Tensor] | torch.Tensor | None) -> dict:
    if inputs is None:
        vocab = int(getattr(model.config, "vocab_size", 0) or 0)
        if vocab <= 0:
            raise ExportError(f"{type(model).__name__}'s config has no vocab_size to make check inputs "
                              "from: pass inputs={'input_ids': ...} to ecospa.export")
        g = torch.Generator().manual_seed(0)
        inputs = torch.randint(0, vocab, (2, 12), generator=g)
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    return dict(inputs)


@torch.no_grad()
def _logits(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        out = model(**{k: v.to(dev) for k, v in inputs.items()})
    finally:
        model.train(was)
    t = out.logits if hasattr(out, "logits") else out[0]
    return t.detach().float().cpu()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def build_exported(model: nn.Module, s: Structure, fm: FieldMap, sel: Selection) -> nn.Module:
    """``type(model)`` built from the edited config, the cut masked-dense tensors loaded strictly."""
    cfg = config_with(model.config, {**fm.stated, **sel.values})
    attn = getattr(model.config, "_attn_implementation", None)
    kwargs = {"attn_implementation": attn} if isinstance(attn, str) else {}
    out = type(model)._from_config(cfg, **kwargs).to(_dtype(model))
    if getattr(model, "generation_config", None) is not None:
        out.generation_config = copy.deepcopy(model.generation_config)
    state = {}
    for key, want in out.state_dict().items():
        if key not in s.tensors:
            raise ExportError(f"the exported {type(model).__name__} has {key}, the pruned model does not")
        t = dense_tensor(s, key)
        for dim in range(t.dim()):
            idx = sel.index.get((key, dim))
            if idx is not None and idx.size != t.shape[dim]:
                t = t.index_select(dim, torch.as_tensor(idx, device=t.device))
        state[key] = t.to(want.dtype)
    try:
        out.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"internal error: the edited config {dict(sel.values)} does not fit the cut tensors "
                          f"({str(e).splitlines()[0]}); please report this with the model") from None
    return out.eval()


def _attempts(fm: FieldMap) -> list[dict[str, str]]:
    """Fields kept dense (``{field: why}``), tried in order: none, the inner ones (head widths),
    all of them."""
    out: list[dict[str, str]] = [{}]
    inner = fm.inner_fields()
    if inner:
        out.append({f: f"a smaller {f} does not reproduce the pruned model (rotary frequencies or the "
                       "attention scale depend on it) or does not run" for f in inner})
    out.append({f: "no smaller config reproduces the pruned model, or runs" for f in fm.values})
    return out


def export(model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None, *,
           inputs: Mapping[str, torch.Tensor] | torch.Tensor | None = None, gguf: bool | str = False,
           save_kwargs: Mapping[str, Any] | None = None) -> ExportReport:
    """Write ``model`` (a transformers model, pruned by ecospa or dense) as a standard transformers
    checkpoint that loads with its Auto class in a process without ecospa.

    The config states the pruned sizes (``num_attention_heads``, ``num_key_value_heads``,
    ``head_dim``, ``intermediate_size``, ...). Where the config cannot express what the model
    kept (heads of different widths, different widths per layer, a head width that sets rotary
    frequencies, GPT-2's head width tied to ``n_embd / n_head``) the exported model is the
    smallest one it can express that contains the pruned one exactly (zero units or heads fill
    up); the report says how much larger it is and how to avoid it. The exported model's logits
    are checked against the pruned model's before anything is written.

    Args:
        model: the model (its ``config`` must still describe the dense model it was pruned from).
        directory: where to write (``save_pretrained``'s folder).
        tokenizer: saved into the folder too when given.
        inputs: the check inputs (``{"input_ids": LongTensor[B, T]}`` or that tensor; default:
            2 x 12 seeded random token ids).
        gguf: also write ``model.gguf`` (Llama-family models; ``True`` or ``"f32"``, or ``"f16"``).
        save_kwargs: passed on to ``save_pretrained`` (``max_shard_size``, ``push_to_hub``, ...).

    Returns:
        ExportReport: path, parameters exported vs pruned vs dense, config changes, padding.

    Raises:
        ExportError: not a transformers model; a config that does not describe the dense model;
            no exported form reproduces the pruned model (report it: a bug).
    """
    _transformers_model(model)
    s = structure_of(model)
    pruned = {(k, d) for k, r in s.records.items() for d in r.kept}
    fm = probe_fields(model, s.dense, pruned) if pruned else FieldMap({}, {})
    check = _check_inputs(model, inputs)
    try:
        # the masked dense model: equal to the pruned one, and no narrow forward to capture
        with dense_view(model):
            reference = _logits(model, check)
    except Exception as e:  # noqa: BLE001 - the model's own forward refusing the default check inputs
        raise ExportError(f"{type(model).__name__} does not run on the check inputs {sorted(check)} "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); pass the inputs it takes: "
                          "ecospa.export(model, directory, inputs={...})") from None
    tol = 1e-5 if _dtype(model) == torch.float32 else (1e-2 if _dtype(model).itemsize <= 2 else 1e-9)
    errors: list[str] = []
    found = None
    for fixed in _attempts(fm):
        for multiple in (1, 8):  # 8: when the exported model does not run at the exact widths
            sel = select(fm, s, fixed, multiple)
            try:
                out = build_exported(model, s, fm, sel)
                err = _rel_err(_logits(out, check), reference)
            except ExportError:
                raise
            except Exception as e:  # noqa: BLE001 - the exported model's own code refusing these widths
                errors.append(f"{dict(sel.values)}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                continue
            if err <= tol:
                found = out
            else:
                errors.append(f"{dict(sel.values)}: rel err {err:.2e}")
            break  # exact, or wrong at these widths (aligning them would not help)
        if found is not None:
            break
    else:
        raise ExportError(f"no exported form of {type(model).__name__} reproduces the pruned model "
                          f"({'; '.join(errors)}); "
                          "please report this with the model; ecospa.save(model, directory) keeps it meanwhile")
    out = found
    path = Path(directory)
    gguf_path = None
    if gguf:  # first: a model GGUF cannot express is refused before anything is written
        from ecospa.export.gguf import write_gguf

        path.mkdir(parents=True, exist_ok=True)
        gguf_path = write_gguf(out, path / "model.gguf", dtype="f32" if gguf is True else gguf)
    out.save_pretrained(path, **dict(save_kwargs or {}))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    dense = sum(int(torch.Size(shape).numel()) for key, shape in s.dense.items()
                if key in dict(model.named_parameters()))
    changes = {f: (v, sel.values[f]) for f, v in fm.values.items() if sel.values.get(f, v) != v}
    changes.update({f: (None, sel.values.get(f, v)) for f, v in fm.stated.items()})
    return ExportReport(path=Path(os.path.realpath(path)), params=_count(out), pruned_params=_count(model),
                        dense_params=dense, config_changes=changes,
                        padded=dict(sel.padded), hint=HINT if _count(out) > _count(model) else "",
                        rel_err=err, gguf=gguf_path)
