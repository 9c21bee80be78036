"""The op-rule cases: one small model per op (or per behaviour of an op) and what discovery must say.

Most cases are a :class:`Pair`: ``x -> a(x) -> op -> b``, where ``op`` acts on the hidden
channels of the Linear pair ``a``/``b``; the case says whether ``a``'s rows stay an exact coupling
(and of which kind) or why not. Products of activations use :class:`Attn` (q, k, v, o projections
around a core), and products with weights use small linear-like modules. ``tests/analysis/
test_rules.py`` runs every case and checks that every op registered in
``ecospa.ops.OPS`` appears in the captured graph of some case.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

aten = torch.ops.aten
D, HID = 6, 8


class Pair(nn.Module):
    """x -> a(x) -> op -> b -> out, where op acts on the hidden channels (and may read x)."""

    def __init__(self, op, hid=HID, out_hid=None, with_input=False):
        super().__init__()
        self.a = nn.Linear(D, hid)
        self.b = nn.Linear(out_hid or hid, D)
        self.op = op
        self.with_input = with_input

    def forward(self, x):
        h = self.a(x)
        return self.b(self.op(h, x) if self.with_input else self.op(h))


class Attn(nn.Module):
    """q, k, v projections, ``core(q, k, v) -> (B, T, HID)``, output projection o (2 heads of 4)."""

    def __init__(self, core):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(D, HID) for _ in range(3))
        self.o = nn.Linear(HID, D)
        self.core = core

    def forward(self, x):
        return self.o(self.core(self.q(x), self.k(x), self.v(x)))


def _split(t):  # (B, T, 8) -> (B, 2, T, 4)
    b, s, _ = t.shape
    return t.view(b, s, 2, 4).transpose(1, 2)


def _merge(t):  # (B, 2, T, 4) -> (B, T, 8)
    b, h, s, d = t.shape
    return t.transpose(1, 2).reshape(b, s, h * d)


def _bh(t):  # (B, T, 8) -> (B * 2, T, 4)
    return _split(t).reshape(-1, t.shape[1], 4)


def _unbh(t, b):  # (B * 2, T, 4) -> (B, T, 8)
    return _merge(t.reshape(b, 2, t.shape[1], 4))


def _bmm_attn(q, k, v):
    p = torch.softmax(torch.bmm(_bh(q), _bh(k).transpose(1, 2)), -1)
    return _unbh(torch.bmm(p, _bh(v)), q.shape[0])


def _baddbmm_attn(q, k, v):
    qh, kh = _bh(q), _bh(k)
    bias = torch.zeros(qh.shape[0], qh.shape[1], kh.shape[1])
    p = torch.softmax(torch.baddbmm(bias, qh, kh.transpose(1, 2), alpha=0.5), -1)
    return _unbh(torch.bmm(p, _bh(v)), q.shape[0])


def _einsum_attn(q, k, v):
    p = torch.softmax(torch.einsum("bhtd,bhsd->bhts", _split(q), _split(k)), -1)
    return _merge(torch.einsum("bhts,bhsd->bhtd", p, _split(v)))


def _addbmm_attn(q, k, v):  # one score matrix summed over batch and heads
    qh, kh = _bh(q), _bh(k)
    p = torch.softmax(torch.addbmm(torch.zeros(qh.shape[1], kh.shape[1]), qh, kh.transpose(1, 2)), -1)
    return _merge(p @ _split(v))


def _sdpa_attn(q, k, v):
    return _merge(F.scaled_dot_product_attention(_split(q), _split(k), _split(v)))


def _kv_append_attn(q, k, v):
    """SDPA over keys/values appended to a cache's past (ecospa::kv_append, as a cached call's
    capture holds it); the past is zeros here, with the dense widths."""
    from ecospa.ops.cache import kv_append  # noqa: F401  (defines ecospa::kv_append)

    q, k, v = _split(q), _split(k), _split(v)
    past = torch.zeros(k.shape[0], 2, 2, 4)
    k, v = torch.ops.ecospa.kv_append(past, k), torch.ops.ecospa.kv_append(past, v)
    return _merge(F.scaled_dot_product_attention(q, k, v))


class ObservedAttn(Attn):
    """:class:`Attn` whose output projection's input is shown to ``ecospa::observe`` (what a
    calibration hook puts in a captured region)."""

    def __init__(self):
        super().__init__(_sdpa_attn)

    def forward(self, x):
        from ecospa.ops.observe import observe

        h = self.core(self.q(x), self.k(x), self.v(x))
        return observe(self.o(h), h, self.o.weight)


def _kv_write_attn(q, k, v):
    """SDPA over keys/values written into a static cache's buffer (ecospa::kv_write, as a cached
    call's capture holds it); the buffer is zeros here, with the dense widths."""
    from ecospa.ops.cache import kv_write  # noqa: F401  (defines ecospa::kv_write)

    q, k, v = _split(q), _split(k), _split(v)
    buf, start = torch.zeros(k.shape[0], 2, k.shape[2] + 2, 4), torch.tensor(1)
    k, v = torch.ops.ecospa.kv_write(buf, k, start), torch.ops.ecospa.kv_write(buf, v, start)
    return _merge(F.scaled_dot_product_attention(q, k, v))


def _softcap(score, b, h, q_idx, kv_idx):  # a score_mod: scalar scores and indices only
    return torch.tanh(score / 4) * 4


class FlexCore(nn.Module):
    """FlexAttention (2 heads of 4) with a causal block mask and a soft-cap score_mod; with
    ``capture``, the score_mod also reads the q tensor itself (its channels enter the scores)."""

    def __init__(self, capture=False, t=3):
        super().__init__()
        from torch.nn.attention.flex_attention import create_block_mask

        self.mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, t, t, device="cpu")
        self.capture = capture

    def forward(self, q, k, v):
        from torch.nn.attention.flex_attention import flex_attention

        q, k, v = _split(q), _split(k), _split(v)
        mod = _softcap
        if self.capture:
            def mod(score, b, h, q_idx, kv_idx):
                return score + q[b, h, q_idx, 0]
        return _merge(flex_attention(q, k, v, score_mod=mod, block_mask=self.mask))


class WeightProduct(nn.Module):
    """A linear-like module written with another product op: ``how(x, w, b)``, weight (D, HID)."""

    def __init__(self, how):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D, HID) / 3)
        self.bias = nn.Parameter(torch.randn(HID) / 3)
        self.how = how

    def forward(self, x):
        return self.how(x, self.w, self.bias)


def _addmm(x, w, b):  # GPT-2's Conv1D
    return torch.addmm(b, x.reshape(-1, D), w).view(*x.shape[:-1], HID)


def _mm(x, w, b):
    return torch.mm(x.reshape(-1, D), w).view(*x.shape[:-1], HID) + b


def _matmul(x, w, b):
    return x @ w + b


class ProductPair(nn.Module):
    """``out(gelu(a(x)))`` where ``a`` is a :class:`WeightProduct`."""

    def __init__(self, how):
        super().__init__()
        self.a = WeightProduct(how)
        self.b = nn.Linear(HID, D)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


class EmbPair(nn.Module):
    """Token ids -> embedding -> gelu -> Linear: the embedding's columns pair with b's."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, HID)
        self.b = nn.Linear(HID, D)

    def forward(self, ids):
        return self.b(F.gelu(self.emb(ids)))


class Experts(nn.Module):
    """2-D tokens -> a -> grouped product with per-expert weights (offsets: 3 rows each) -> b."""

    def __init__(self, grouped, dtype=torch.float32, hid=HID):
        super().__init__()
        self.a = nn.Linear(D, hid, dtype=dtype)
        self.w = nn.Parameter(torch.randn(2, hid, hid, dtype=dtype) / 3)
        self.b = nn.Linear(hid, D, dtype=dtype)
        self.grouped = grouped

    def forward(self, x):
        offs = torch.tensor([3, 6], dtype=torch.int32)
        return self.b(self.grouped(self.a(x), self.w, offs))


def _fallback_grouped_mm(h, w, offs):
    import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

    return torch.ops.transformers.grouped_mm_fallback(h, w, offs)


def _buf_index():
    return torch.tensor([5, 0, 2, 7])


@dataclass(frozen=True)
class Case:
    """One rule case: ``build() -> (model, inputs)``; the coupling that slices ``param`` along
    ``dim`` must be ``exact`` (of ``kind``) or inexact with ``reason`` in its reason."""

    build: Callable[[], tuple[nn.Module, tuple]]
    exact: bool
    kind: str | None = None
    reason: str | None = None
    param: str = "a.weight"
    dim: int = 0
    tol: float = 1e-5


class BufferWrite(nn.Module):
    """x -> a(x) written in place into a buffer the module owns (a KV cache: ``index_copy_`` or
    ``index_put_`` along the sequence), read back -> b -> out."""

    def __init__(self, how: str):
        super().__init__()
        self.a, self.b, self.how = nn.Linear(D, HID), nn.Linear(HID, D), how
        self.register_buffer("cache", torch.zeros(2, 5, HID), persistent=False)

    def forward(self, x):
        h = self.a(x)
        pos = torch.arange(x.shape[1])
        if self.how == "index_copy":
            kept = self.cache[: x.shape[0]].index_copy_(1, pos, h)
        else:
            self.cache[:, pos] = h
            kept = self.cache
        return self.b(kept[:, : x.shape[1]])


def _x(*shape):
    return (torch.randn(*(shape or (2, 3, D))),)


def ok(op, kind="linear", out_hid=None, with_input=False) -> Case:
    return Case(lambda: (Pair(op, out_hid=out_hid, with_input=with_input), _x()), True, kind)


def bad(op, reason, out_hid=None, with_input=False, param="a.weight", dim=0) -> Case:
    return Case(lambda: (Pair(op, out_hid=out_hid, with_input=with_input), _x()), False, reason=reason,
                param=param, dim=dim)


# An op that ends labels (a gather by data) leaves the consumer's columns facing no channels
LOST = dict(reason="carries no weight channels", param="b.weight", dim=1)


def attn(core, param="q.weight", kind="qk") -> Case:
    return Case(lambda: (Attn(core), _x()), True, kind, param=param)


def _heads(h):  # (B, T, 8) -> (B, 2, T, 4) -> back
    b, t, _ = h.shape
    return h.view(b, t, 2, 4).transpose(1, 2).contiguous().transpose(1, 2).reshape(b, t, 8)


def _dd_index(x):  # an index computed from the input: its values are not known
    return (x[0, 0, :4].abs() * 3).long().clamp(max=7)


# a label-free complex rotary table for HID // 2 = 4 complex positions (captured as a constant)
_CIS = torch.polar(torch.ones(HID // 2), torch.arange(HID // 2) / 3.0)


def _complex_rotary(h):  # Meta's Llama / torchtitan: channel pairs as complex numbers, times a table
    return torch.view_as_real(torch.view_as_complex(h.reshape(*h.shape[:-1], -1, 2)) * _CIS).flatten(-2)


def _routed_rows(h, x):  # MoE routing: the rows of the tokens a mask picks (a data-dependent count)
    rows, = torch.where(x.reshape(-1, D)[:, 0] > 0)
    return h.reshape(-1, HID)[rows]


def _routed_rows_flattened(h, x):  # the routed rows flattened into the channels: where each sits depends on the data
    return _routed_rows(h, x).flatten().view(-1, HID)


def _norm_nd(fn):  # (B, T, C) -> channels second for batch/instance/group norms, and back
    return lambda h: fn(h.transpose(1, 2)).transpose(1, 2)


OVER_CH = "over channels"
CASES: dict[str, Case] = {
    # elementwise and identity-like
    "gelu": ok(F.gelu, "ffn"),
    "relu_dropout": ok(lambda h: F.dropout(F.relu(h), 0.0), "ffn"),
    "sigmoid": ok(torch.sigmoid, "ffn"),
    "scale_add_scalar": ok(lambda h: 2 * h + 1),
    "identity": ok(lambda h: h.clone().contiguous()),
    "alias_detach": ok(lambda h: aten.alias(h.detach())),
    "to_copy_type_as": ok(lambda h: aten._to_copy(h, dtype=torch.float64).type_as(h)),
    "to_dtype": ok(lambda h: h.to(torch.float64).to(torch.float32)),
    "constant_tensor": ok(lambda h: h * torch.tensor([2.0])),
    "dropout_eval": ok(lambda h: F.alpha_dropout(F.dropout1d(h, 0.5, False), 0.5, False)),
    "native_dropout": ok(lambda h: aten.native_dropout(h, 0.0, False)[0]),
    "fresh_like": ok(lambda h: h + h.new_zeros(h.shape) + torch.zeros_like(h) + h.new_empty(h.shape).zero_()
                     + torch.empty_like(h).zero_() + (h.new_ones(h.shape) - torch.ones_like(h))
                     + (h.new_full(h.shape, 2.0) - torch.full_like(h, 2.0))),
    "fresh_random": ok(lambda h: h * (1 + 0 * torch.rand_like(h)) * (1 + 0 * torch.randn_like(h))
                       + 0 * torch.rand(HID) + 0 * torch.randn(HID)),
    "fresh_new": ok(lambda h: h + torch.zeros(HID) + torch.ones(HID) - torch.full((HID,), 1.0)
                    + torch.empty(HID).zero_() + 0 * torch.arange(HID) + torch.scalar_tensor(0.0)),
    # layout
    "view_transpose": ok(_heads),
    "permute": ok(lambda h: h.permute(1, 0, 2).permute(1, 0, 2)),
    "numpy_T_3d": ok(lambda h: h.T.permute(2, 1, 0)),  # x.T of a 3-D tensor reverses every dim
    "mT_mH_adjoint_matrix_H": ok(lambda h: torch.stack([aten.matrix_H(m) for m in h.mT.mH.adjoint()])),
    "swapaxes_swapdims_movedim": ok(lambda h: h.swapaxes(0, 1).swapdims(1, 0).movedim(-1, 0).moveaxis(0, -1)
                                    .movedim((0, 1), (1, 0)).moveaxis((1, 0), (0, 1))),
    "view_as_complex_real_rotary": ok(_complex_rotary),  # pairs (2i, 2i + 1) become one unit each
    "t_numpy_T": ok(lambda h: torch.stack([h[i].t().T.t() for i in range(2)]).transpose(1, 2)),
    "flatten_unflatten": ok(lambda h: h.unflatten(-1, (2, 4)).flatten(-2)),
    "view_as_unsafe_view": ok(lambda h: aten._unsafe_view(h, [6, 8]).view_as(h)),
    "reshape_alias": ok(lambda h: aten._reshape_alias(h.contiguous(), [2, 3, 2, 4], [24, 8, 4, 1]).flatten(-2)),
    "unsqueeze_squeeze": ok(lambda h: h.unsqueeze(0).squeeze(0)),
    "split_cat": ok(lambda h: torch.cat(h.split(3, dim=-1)[::-1], dim=-1)),
    "split_sizes_concat": ok(lambda h: torch.concat(h.split([3, 5], dim=-1)[::-1], dim=-1)),
    "chunk_concatenate": ok(lambda h: torch.concatenate(h.chunk(2, dim=-1)[::-1], dim=-1)),
    "chunk_mul_glu": ok(lambda h: F.silu(h.chunk(2, dim=-1)[0]) * h.chunk(2, dim=-1)[1], "glu", HID // 2),
    "unbind_stack": ok(lambda h: torch.stack(h.view(*h.shape[:-1], 2, 4).unbind(-2), dim=-2).flatten(-2)),
    "select_stack_over_time": ok(lambda h: torch.stack([h[:, t] for t in range(3)], 1)),
    "slice": ok(lambda h: h[..., 2:], out_hid=HID - 2),
    "empty_slice_cat": ok(lambda h: torch.cat([h, h[..., 8:]], dim=-1)),
    "repeat_interleave": ok(lambda h: h.repeat_interleave(2, dim=-1), out_hid=2 * HID),
    "repeat_interleave_tensor": bad(lambda h: h.repeat_interleave(torch.tensor([1, 2, 1, 1, 1, 1, 1, 1]), dim=-1),
                                    out_hid=HID + 1, **LOST),
    "repeat": ok(lambda h: h.repeat(1, 1, 2), out_hid=2 * HID),
    "tile": ok(lambda h: h.tile(2), out_hid=2 * HID),
    "expand": ok(lambda h: h.unsqueeze(-2).expand(*h.shape[:-1], 2, HID).sum(-2)),
    "expand_as_broadcast_to": ok(lambda h: h.unsqueeze(-2).expand_as(torch.zeros(2, 3, 2, HID)).sum(-2)
                                 + torch.broadcast_to(h.unsqueeze(-2), (2, 3, 2, HID)).sum(-2)),
    # indexing
    "index_constant_list": ok(lambda h: h[..., [5, 0, 2, 7]], out_hid=4),
    "index_over_time_by_data": ok(lambda h, x: h[:, _dd_index(x) % 3], with_input=True),
    "index_channels_by_data": bad(lambda h, x: h[..., _dd_index(x)], out_hid=4, with_input=True, **LOST),
    "index_select_constant": ok(lambda h: h.index_select(-1, _buf_index()), out_hid=4),
    "index_select_by_data": bad(lambda h, x: h.index_select(-1, _dd_index(x)), out_hid=4, with_input=True,
                                **LOST),
    "index_copy_constant": ok(lambda h: h.new_zeros(2, 3, HID + 2).index_copy(-1, torch.tensor([9, 0, 1, 3, 4, 6, 7, 8]), h),
                              out_hid=HID + 2),
    "rows_by_data_dependent_count": ok(_routed_rows, with_input=True),
    "rows_by_data_dependent_count_flattened": bad(_routed_rows_flattened, "data-dependent shape (a size computed "
                                                  "from tensor values, as after torch.where(mask) or nonzero) along "
                                                  "dim 0, which carries weight channels", with_input=True),
    "sym_size_of_data": ok(lambda h, x: h * (x[0, 0] > 0).nonzero().shape[0], with_input=True),
    # reductions over other dims keep the channels; over the channels they poison
    "sum_over_channels": ok(lambda h: h + h.sum(-1, keepdim=True)),
    "nansum_over_time": ok(lambda h: h - h.nansum(1, keepdim=True)),
    "mean_over_time": ok(lambda h: h - h.mean(1, keepdim=True)),
    "softmax_over_time": ok(lambda h: torch.softmax(h, 1), "ffn"),
    "_softmax_over_time": ok(lambda h: aten._softmax(h, 1, False), "ffn"),
    "log_softmax_over_time": ok(lambda h: F.log_softmax(h, 1), "ffn"),
    "sort_over_time": ok(lambda h: h.sort(1).values),
    "topk_over_time": ok(lambda h: h.topk(2, dim=1).values),
    "cumsum_over_time": ok(lambda h: h.cumsum(1)),
    "max_over_time": ok(lambda h: h - h.max(1, keepdim=True).values),
    "softmax_over_channels": bad(lambda h: torch.softmax(h, -1), "softmax " + OVER_CH),
    "special_softmax_over_channels": bad(lambda h: torch.special.softmax(h, -1), "softmax " + OVER_CH),
    "_log_softmax_over_channels": bad(lambda h: aten._log_softmax(h, -1, False), "softmax " + OVER_CH),
    "layer_norm_over_channels": bad(lambda h: F.layer_norm(h, (HID,)), "layer_norm " + OVER_CH),
    "native_layer_norm": bad(lambda h: aten.native_layer_norm(h, [HID], None, None, 1e-5)[0], "layer_norm " + OVER_CH),
    "rms_norm_over_channels": bad(lambda h: F.rms_norm(h, (HID,)), "rms_norm " + OVER_CH),
    "mean_over_channels": bad(lambda h: h - h.mean(-1, keepdim=True), "mean " + OVER_CH),
    "var_std_over_channels": bad(lambda h: h * h.var(-1, keepdim=True) * h.std(-1, keepdim=True), "var " + OVER_CH),
    "var_mean_std_mean": bad(lambda h: h * torch.var_mean(h, -1, keepdim=True)[0] * torch.std_mean(h, -1, keepdim=True)[1],
                             "var_mean " + OVER_CH),
    "max_over_channels": bad(lambda h: h - h.amax(-1, keepdim=True), "amax " + OVER_CH),
    "amin_over_channels": bad(lambda h: h - h.amin(-1, keepdim=True), "amin " + OVER_CH),
    "logsumexp_prod_over_channels": bad(lambda h: h * h.logsumexp(-1, keepdim=True) * h.prod(-1, keepdim=True),
                                        "logsumexp " + OVER_CH),
    "norms_over_channels": bad(lambda h: h * aten.norm(h, 2, [-1], True) * torch.linalg.vector_norm(h, dim=-1, keepdim=True),
                               "norm " + OVER_CH),
    "max_min_dim_over_channels": bad(lambda h: h * h.max(-1, keepdim=True).values * h.min(-1, keepdim=True).values,
                                     "max " + OVER_CH),
    "arg_over_channels": bad(lambda h: h * (h.argmax(-1, keepdim=True) + h.argmin(-1, keepdim=True)), "argmax " + OVER_CH),
    "median_over_channels": bad(lambda h: h - h.median(-1, keepdim=True).values, "median " + OVER_CH),
    "sort_over_channels": bad(lambda h: h.sort(-1).values, "sort " + OVER_CH),
    "topk_over_channels": bad(lambda h: h.topk(2).values, out_hid=2, **LOST),
    "cumsum_over_channels": bad(lambda h: h.cumsum(-1), "cumsum " + OVER_CH),
    "cumprod_over_channels": bad(lambda h: h.cumprod(-1), "cumprod " + OVER_CH),
    "batch_norm": bad(_norm_nd(lambda c: F.batch_norm(c, torch.zeros(HID), torch.ones(HID))), "batch_norm"),
    "native_batch_norm": bad(_norm_nd(lambda c: aten.native_batch_norm(c, None, None, torch.zeros(HID), torch.ones(HID),
                                                                        False, 0.1, 1e-5)[0]), "native_batch_norm"),
    "batch_norm_legit": bad(_norm_nd(lambda c: aten._native_batch_norm_legit(c, None, None, torch.zeros(HID), torch.ones(HID),
                                                                              False, 0.1, 1e-5)[0]), "_native_batch_norm_legit"),
    "batch_norm_legit_no_training": bad(_norm_nd(lambda c: aten._native_batch_norm_legit_no_training(
        c, None, None, torch.zeros(HID), torch.ones(HID), 0.1, 1e-5)[0]), "_native_batch_norm_legit_no_training"),
    "instance_norm": bad(_norm_nd(F.instance_norm), "instance_norm"),
    "group_norm": bad(_norm_nd(lambda c: F.group_norm(c, 2)), "group_norm"),
    # products
    "addmm_conv1d": Case(lambda: (ProductPair(_addmm), _x()), True, "ffn", param="a.w", dim=1),
    "mm": Case(lambda: (ProductPair(_mm), _x()), True, "ffn", param="a.w", dim=1),
    "matmul": Case(lambda: (ProductPair(_matmul), _x()), True, "ffn", param="a.w", dim=1),
    "sdpa_qk": attn(_sdpa_attn),
    "sdpa_vo": attn(_sdpa_attn, "v.weight", "vo"),
    "flex_attention_qk": Case(lambda: (Attn(FlexCore()), _x()), True, "qk", param="q.weight"),
    "flex_attention_vo": Case(lambda: (Attn(FlexCore()), _x()), True, "vo", param="v.weight"),
    "flex_attention_captures_q": Case(lambda: (Attn(FlexCore(capture=True)), _x()), False,
                                      reason="captured by the score_mod of flex_attention", param="q.weight"),
    "observe_vo": Case(lambda: (ObservedAttn(), _x()), True, "vo", param="v.weight"),
    "observe_qk": Case(lambda: (ObservedAttn(), _x()), True, "qk", param="q.weight"),
    "kv_append_qk": attn(_kv_append_attn),
    "kv_append_vo": attn(_kv_append_attn, "v.weight", "vo"),
    "kv_write_qk": attn(_kv_write_attn),
    "kv_write_vo": attn(_kv_write_attn, "v.weight", "vo"),
    "bmm_qk": attn(_bmm_attn),
    "bmm_vo": attn(_bmm_attn, "v.weight", "vo"),
    "baddbmm_qk": attn(_baddbmm_attn),
    "addbmm_qk": attn(_addbmm_attn),  # one coupling: the score matrix is summed over heads
    "einsum_qk": attn(_einsum_attn),
    "einsum_vo": attn(_einsum_attn, "v.weight", "vo"),
    "dot_of_activations": ok(lambda h: h * torch.dot(h[0, 0], h[0, 1]), "qk"),
    "embedding_columns": Case(lambda: (EmbPair(), (torch.randint(0, 10, (2, 3)),)), True, "ffn", param="emb.weight",
                              dim=1),
    # torch._grouped_mm wants 16-byte strides: 16 bf16 channels, half of them kept
    "grouped_mm_experts": Case(lambda: (Experts(torch._grouped_mm, torch.bfloat16, 16), (_x(6, D)[0].to(torch.bfloat16),)), True,
                               "linear", tol=1e-2),
    "grouped_mm_fallback_experts": Case(lambda: (Experts(_fallback_grouped_mm), _x(6, D)), True, "linear"),
    # where / masked_fill in the overloads ATen does not tag pointwise (a Python scalar, a 0-d mask value)
    "where_scalar_other": ok(lambda h: torch.where(h > 0, h, 0.0), "ffn"),
    "masked_fill_tensor_value": ok(lambda h: h.masked_fill(h < 0, torch.tensor(0.0)), "ffn"),
    # an in-place write into a tensor of fixed width (created in the forward): followed, not exact
    "copy_into_fresh_tensor": bad(lambda h: torch.zeros_like(h).copy_(h), "written into"),
    # written into a buffer the model owns (a KV cache in research code): dense storage, exact
    "index_copy_into_buffer": Case(lambda: (BufferWrite("index_copy"), _x()), True, "linear"),
    "index_put_into_buffer": Case(lambda: (BufferWrite("index_put"), _x()), True, "linear"),
}
