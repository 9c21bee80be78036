"""A Llama-family model (Llama, Mistral, Qwen2) as a GGUF file, with the ``gguf`` package.

Tensor names come from gguf's own name map (``gguf.get_tensor_name_map``, the names llama.cpp
and transformers' GGUF reader use), the metadata from the exported config. The ``llama``
architecture stores q/k rows in llama.cpp's interleaved rotary order (each head's two halves
interleaved), which the readers undo; ``qwen2`` stores them as they are. A Mistral is written as
a ``llama`` (what llama.cpp does too; gguf-py has no ``mistral`` architecture), which is the same
model when it has no sliding window shorter than its context. The transformers GGUF
reader derives Qwen2's head width from ``hidden_size / num_attention_heads``, so a Qwen2 with
fewer heads (its head width stated) has no GGUF form there and is refused. Tokenizer metadata is
not written: load the tokenizer from the checkpoint folder.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ecospa.export.report import ExportError

__all__ = ["write_gguf", "GGUF_ARCHS"]

GGUF_ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}
"""model_type -> gguf.MODEL_ARCH member."""


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from (two halves) to llama.cpp's interleaved order."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if rope_type != "default":
        raise ExportError(f"GGUF export writes default rotary embeddings; this config has rope_type {rope_type!r}: "
                          "use the transformers checkpoint (ecospa.export without gguf)")
    theta = getattr(cfg, "rope_theta", None) or (params.get("rope_theta") if isinstance(params, dict) else None)
    return float(theta if theta is not None else 10000.0)


def write_gguf(model: nn.Module, path: str | Path, *, dtype: str = "f32") -> Path:
    """Write ``model`` (an *exported* transformers model: plain, no ecospa removals) to ``path``.

    Args:
        dtype: ``"f32"`` or ``"f16"`` (matrices in f16, norms in f32).

    Raises:
        ExportError: gguf not installed, an architecture other than Llama/Mistral/Qwen2, a Qwen2
            head width the GGUF reader cannot express, a non-default rotary scaling.
    """
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the gguf package: pip install gguf") from None
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    if mt not in GGUF_ARCHS:
        raise ExportError(f"GGUF export knows the Llama family ({', '.join(sorted(GGUF_ARCHS))}); "
                          f"{type(model).__name__} is {mt!r}: use the transformers checkpoint")
    if dtype not in ("f32", "f16"):
        raise ExportError(f"gguf dtype should be 'f32' or 'f16', got {dtype!r}")
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if mt == "qwen2" and head_dim * heads != cfg.hidden_size:
        raise ExportError(f"a Qwen2 with {heads} heads of {head_dim} (hidden size {cfg.hidden_size}) has no GGUF "
                          "form transformers reads (it derives the head width from hidden_size / heads); use the "
                          "transformers checkpoint, or keep every attention head for GGUF")
    window = getattr(cfg, "sliding_window", None)
    if mt == "mistral" and window is not None and window < cfg.max_position_embeddings:
        raise ExportError(f"a Mistral with a sliding window ({window} < {cfg.max_position_embeddings} positions) has "
                          "no GGUF form transformers reads (gguf-py has no 'mistral' architecture and 'llama' has no "
                          "window); use the transformers checkpoint")
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCHS[mt])
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    path = Path(path)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_name("ecospa export")  # not "mistral": transformers would ask gguf-py for that architecture
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for key, t in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        base, _, suffix = key.rpartition(".")
        name = names.get_name(base)
        if name is None:
            raise ExportError(f"GGUF has no name for {key} of {type(model).__name__}; use the transformers checkpoint")
        a = t.detach().to(torch.float32).cpu().numpy()
        if arch == gguf.MODEL_ARCH.LLAMA and base.endswith(("q_proj", "k_proj")):
            a = _permute(a, heads if base.endswith("q_proj") else kv)
        if dtype == "f16" and a.ndim > 1:
            a = a.astype(np.float16)
        w.add_tensor(f"{name}.{suffix}", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
