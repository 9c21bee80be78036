"""Forwards that replace those of modules whose weights were sliced.

An adapter keeps the module's parameter names and its call signature. Index tensors live on
the module as non-persistent buffers (so ``.to(device)`` moves them and ``state_dict`` is
unchanged): ``_ecospa_in_index`` (kept input channels, in the original layout) and
``_ecospa_out_index`` (kept output channels, in the original layout). With an out index the
output is scattered back to the original width (zeros where units were removed), so the model's
own code downstream (views into heads, rotary, repeat_kv, the attention scale) runs unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ecospa.ir.record import EcospaForward, ParamRecord, module_record

__all__ = ["LinearAdapter", "MHAAdapter", "DenseParamsForward", "dense_param", "scatter_last", "source_index",
           "IN_INDEX", "OUT_INDEX", "OUT_SRC"]

IN_INDEX = "_ecospa_in_index"
OUT_INDEX = "_ecospa_out_index"
OUT_SRC = "_ecospa_out_src"  # derived from OUT_INDEX: see source_index()


def scatter_last(y: torch.Tensor, index: torch.Tensor | None, full: int) -> torch.Tensor:
    """``(..., k) -> (..., full)`` with ``y`` at positions ``index`` and zeros elsewhere.

    Written as a gather (``index_select`` of ``y`` with one zero column appended): on CPU a
    gather along the last dimension is faster than ``index_copy`` there (bench/results/).
    """
    if index is None:
        return y
    return gather_with_zero(y, source_index(index, full))


def gather_with_zero(y: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``cat([y, 0], -1)[..., src]``: position ``j`` reads ``y[..., src[j]]``, or zero when
    ``src[j] == y.shape[-1]``. (Appending the zero row to the weight instead gives the product
    an odd width, which is slower than this extra column on CPU.)"""
    y = torch.cat([y, y.new_zeros(y.shape[:-1] + (1,))], dim=-1)
    return y.index_select(-1, src)


def source_index(index: torch.Tensor, full: int) -> torch.Tensor:
    """``(full,)``: for each original position, the kept row it reads, or ``k`` (the zero row)."""
    k = index.numel()
    src = torch.full((full,), k, dtype=torch.long, device=index.device)
    src[index] = torch.arange(k, device=index.device)
    return src


class LinearAdapter(EcospaForward):
    """Forward of a linear-like module: gather inputs, product, add bias, scatter outputs.

    Args:
        module: the module (its parameters keep their names).
        weight: attribute name of the weight; bias: of the bias (or None).
        transposed: weight stored ``(in, out)`` (GPT-2 ``Conv1D``) rather than ``(out, in)``.
        out_full: original output width (used when scattering).

    ``poison`` (False; set only for the duration of a KV-cache probe,
    ``ecospa.narrow.kvcache``): write NaN instead of zero at removed output positions,
    so what depends on removed units shows.
    """

    poisonable = True

    def __init__(self, module: nn.Module, weight: str, bias: str | None, transposed: bool, out_full: int):
        self.module = module
        self.weight = weight
        self.bias = bias
        self.transposed = transposed
        self.out_full = out_full

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        m = self.module
        idx_in = m._buffers.get(IN_INDEX)
        if idx_in is not None:
            x = x.index_select(-1, idx_in)
        w = getattr(m, self.weight)
        b = getattr(m, self.bias) if self.bias else None
        src = m._buffers.get(OUT_SRC)
        kept = w.shape[1 if self.transposed else 0]
        if src is not None:
            w, b = _pad_rows(w, b, self.transposed)
        if self.transposed:
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1])
            y = (torch.addmm(b, x2, w) if b is not None else x2 @ w).view(*lead, w.shape[1])
        else:
            y = F.linear(x, w, b)
        if src is not None:
            y = y.index_select(-1, src)
            if self.poison:
                y = y.masked_fill(src >= kept, float("nan"))
        return y


def _pad_rows(w: torch.Tensor, b: torch.Tensor | None, transposed: bool):
    """Append zero output rows so the output width is a multiple of 8 (at least one zero row,
    which the scatter reads for removed positions): GEMMs of odd widths are much slower on CPU
    (1153 outputs took 1.5x the time of 1160 here)."""
    k = w.shape[1] if transposed else w.shape[0]
    pad = (-(k + 1)) % 8 + 1
    if transposed:
        w = torch.cat([w, w.new_zeros(w.shape[0], pad)], dim=1)
    else:
        w = torch.cat([w, w.new_zeros(pad, w.shape[1])], dim=0)
    if b is not None:
        b = torch.cat([b, b.new_zeros(pad)])
    return w, b


def _float_mask(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class MHAAdapter(EcospaForward):
    """Forward of a pruned ``torch.nn.MultiheadAttention`` (packed ``in_proj_weight``).

    Rows of ``in_proj_weight`` (q, k, v) may be removed per head dimension, and the matching
    columns of ``out_proj.weight``; heads keep their original width (zeros where removed), so
    the attention scale stays ``1/sqrt(embed_dim // num_heads)``. Supports batch_first or not,
    unbatched inputs, ``key_padding_mask``, ``attn_mask`` (bool or float), ``is_causal``,
    ``need_weights`` and dropout in training mode.
    """

    def __init__(self, module: nn.MultiheadAttention):
        rec = module_record(module)
        same = rec.overridden.get("_qkv_same_embed_dim", module._qkv_same_embed_dim) if rec else module._qkv_same_embed_dim
        if module.bias_k is not None or module.add_zero_attn or not same:
            raise NotImplementedError("MultiheadAttention with bias_k/add_zero_attn/kdim/vdim")
        self.module = module

    def __call__(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                 average_attn_weights=True, is_causal=False):
        m = self.module
        E, H = m.embed_dim, m.num_heads
        D = E // H
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if m.batch_first and not unbatched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # now (L, N, E)
        L, N = query.shape[0], query.shape[1]
        S = key.shape[0]
        w, b = m.in_proj_weight, m.in_proj_bias
        out_idx = m._buffers.get(OUT_INDEX)
        if out_idx is None:
            out_idx = torch.arange(3 * E, device=w.device)
        parts = []
        for i, x in enumerate((query, key, value)):
            sel = ((out_idx >= i * E) & (out_idx < (i + 1) * E)).nonzero().flatten()
            y = F.linear(x, w.index_select(0, sel), None if b is None else b.index_select(0, sel))
            parts.append(scatter_last(y, out_idx.index_select(0, sel) - i * E, E))
        q, k, v = parts
        q = q.reshape(L, N * H, D).transpose(0, 1).reshape(N, H, L, D)
        k = k.reshape(S, N * H, D).transpose(0, 1).reshape(N, H, S, D)
        v = v.reshape(S, N * H, D).transpose(0, 1).reshape(N, H, S, D)
        mask = _float_mask(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:
            mask = mask.view(N, H, L, S)
        if key_padding_mask is not None:
            kpm = _float_mask(key_padding_mask, q.dtype).view(N, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        if is_causal and mask is None:
            mask = torch.full((L, S), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        p = m.dropout if m.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / (D ** 0.5)
            if mask is not None:
                scores = scores + mask
            attn = torch.softmax(scores, dim=-1)
            if p > 0:
                attn = F.dropout(attn, p)
            out = attn @ v
        else:
            attn = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.permute(2, 0, 1, 3).reshape(L, N, E)  # (L, N, E)
        in_idx = m._buffers.get(IN_INDEX)
        if in_idx is not None:
            out = out.index_select(-1, in_idx)
        out = F.linear(out, m.out_proj.weight, m.out_proj.bias)
        if m.batch_first and not unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        if attn is not None:
            if average_attn_weights:
                attn = attn.mean(dim=1)
            if unbatched:
                attn = attn.squeeze(0)
        return out, attn


def dense_param(p: torch.Tensor, rec: ParamRecord, dims) -> torch.Tensor:
    """``p`` at its dense size along ``dims`` (zeros in the removed slices), differentiable:
    gradients reach the kept entries of ``p``. Other dims stay as they are."""
    for d in sorted(dims):
        kept = rec.kept.get(d)
        full = rec.dense_shape[d]
        if kept is None or p.shape[d] == full:
            continue
        src = source_index(torch.as_tensor(kept, dtype=torch.long, device=p.device), full)
        zero = p.new_zeros(p.shape[:d] + (1,) + p.shape[d + 1:])
        p = torch.cat([p, zero], dim=d).index_select(d, src)
    return p


class DenseParamsForward(EcospaForward):
    """Forward of the scope of a scatter coupling that slices parameters used outside linear
    modules (raw ``nn.Parameter`` weights through ``einsum`` or ``@``, as research code writes
    attention): for the duration of the call each such parameter is seen at its dense size along
    its scatter dims, kept values in place and zeros in the removed slices, so the module's own
    code (head counts, views, einsum equations) runs unchanged: the masked dense computation, exact
    by construction. This is the exact fallback; a ``RegionForward`` on the same module runs the
    narrow graph, which reads the sliced parameters.

    Args:
        module: the scope module.
        params: ``{parameter name relative to module: dims to show dense}``.
        inner: the forward installed before (None: the module's class forward).
    """

    def __init__(self, module: nn.Module, params: Mapping[str, frozenset], inner=None):
        self.module = module
        self.params = dict(params)
        self.inner = inner

    def __call__(self, *args, **kwargs):
        with self.dense():
            if self.inner is not None:
                return self.inner(*args, **kwargs)
            return type(self.module).forward(self.module, *args, **kwargs)

    @contextlib.contextmanager
    def dense(self) -> Iterator[None]:
        """Swap the dense views in (every module of the scope that holds the parameter), and back.
        Narrow regions nested in the scope run their exact fallback meanwhile: their graphs read
        the sliced parameters, and a capture of theirs would see the dense views."""
        undo: list[tuple[dict, str, object]] = []
        try:
            for mod in self.module.modules():
                fwd = mod.__dict__.get("forward")
                exact = fwd.exact_path() if mod is not self.module and isinstance(fwd, EcospaForward) else None
                if exact is not None:
                    undo.append((mod.__dict__, "forward", fwd))
                    mod.__dict__["forward"] = exact
            for name, dims in self.params.items():
                path, _, attr = name.rpartition(".")
                owner = self.module.get_submodule(path) if path else self.module
                p = owner._parameters.get(attr)
                rec = module_record(owner)
                r = rec.params.get(attr) if rec is not None else None
                if p is None or r is None:
                    continue
                view = dense_param(p, r, dims)
                if view is p:
                    continue
                holders = [(mod._parameters, a) for mod in self.module.modules()
                           for a, q in mod._parameters.items() if q is p]
                for store, a in holders:  # a parameter shared by several modules stays shared
                    undo.append((store, a, p))
                    store[a] = view
            yield
        finally:
            for store, key, value in reversed(undo):
                store[key] = value
