"""Attention modules of the zoo, each with the couplings it must yield.

Every class is tiny (random weights) and written the way real code bases write attention:
nanoGPT (fused qkv + SDPA), Llama (GQA, rotary in both layouts, RMSNorm, repeat_kv), ALiBi
(hand-written matmul/softmax with an additive bias), cross-attention, one ``nn.Linear`` per head,
``nn.MultiheadAttention`` and QK-norm (which makes the qk couplings inexact).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.zoo.expect import Expect, attention_expects, lin_in, lin_out

__all__ = [
    "RMSNorm",
    "Rotary",
    "repeat_kv",
    "NanoGPTAttention",
    "LlamaAttention",
    "AlibiAttention",
    "CrossAttention",
    "PerHeadAttention",
    "MHAttention",
    "QKNormAttention",
]


class RMSNorm(nn.Module):
    """RMSNorm over the last dim: ``x / rms(x) * weight``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Rotary(nn.Module):
    """Rotary position embedding; ``layout`` is ``"half"`` (rotate_half) or ``"interleaved"``."""

    def __init__(self, head_dim: int, layout: str, max_len: int = 32):
        super().__init__()
        self.layout = layout
        inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        freqs = torch.outer(torch.arange(max_len).float(), inv)  # (L, D/2)
        if layout == "half":
            emb = torch.cat((freqs, freqs), dim=-1)
        elif layout == "interleaved":
            emb = torch.repeat_interleave(freqs, 2, dim=-1)
        else:
            raise ValueError(layout)
        self.register_buffer("cos", emb.cos(), persistent=False)  # (L, D)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "half":
            half = x.shape[-1] // 2
            return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, h, T, D)."""
        t = x.shape[-2]
        cos, sin = self.cos[:t], self.sin[:t]
        return x * cos + self._rotate(x) * sin


def repeat_kv(x: torch.Tensor, rep: int) -> torch.Tensor:
    """HF-style repeat of kv heads: (B, kv, T, D) -> (B, kv * rep, T, D)."""
    if rep == 1:
        return x
    b, kv, t, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, rep, t, d).reshape(b, kv * rep, t, d)


class NanoGPTAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: fused ``c_attn`` split in three, SDPA, ``c_proj``."""

    def __init__(self, d: int, h: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = h, d, dropout
        self.c_attn = nn.Linear(d, 3 * d, bias=bias)
        self.c_proj = nn.Linear(d, d, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))

    @staticmethod
    def expected(prefix: str, d: int, h: int, bias: bool = True) -> list[Expect]:
        """qk and vo per head of the fused ``c_attn`` (q rows, then k, then v)."""
        hd, m = d // h, f"{prefix}c_attn"
        return attention_expects(
            n_kv=h, rep=1, head_dim=hd,
            q=lambda hq, j: lin_out(m, hq * hd + j, bias),
            k=lambda g, j: lin_out(m, d + g * hd + j, bias),
            v=lambda g, j: lin_out(m, 2 * d + g * hd + j, bias),
            o=lambda hq, j: lin_in(f"{prefix}c_proj", hq * hd + j),
        )


class LlamaAttention(nn.Module):
    """Llama attention: separate q/k/v/o without bias, GQA via repeat_kv, optional rotary."""

    def __init__(self, d: int, h: int, kv: int, hd: int, rotary: str | None = "half"):
        super().__init__()
        self.h, self.kv, self.hd = h, kv, hd
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, kv * hd, bias=False)
        self.v_proj = nn.Linear(d, kv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)
        self.rotary = Rotary(hd, rotary) if rotary else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.hd).transpose(1, 2)  # (B, h, T, D)
        k = self.k_proj(x).view(b, t, -1, self.hd).transpose(1, 2)  # (B, kv, T, D)
        v = self.v_proj(x).view(b, t, -1, self.hd).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        rep = self.h // self.kv
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.hd ** -0.5)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))

    @staticmethod
    def expected(prefix: str, h: int, kv: int, hd: int, rotary: str | None) -> list[Expect]:
        """One qk (pairs of dims under rotary) and one vo per kv head."""
        return attention_expects(
            n_kv=kv, rep=h // kv, head_dim=hd, rotary=rotary,
            q=lambda hq, j: lin_out(f"{prefix}q_proj", hq * hd + j, False),
            k=lambda g, j: lin_out(f"{prefix}k_proj", g * hd + j, False),
            v=lambda g, j: lin_out(f"{prefix}v_proj", g * hd + j, False),
            o=lambda hq, j: lin_in(f"{prefix}o_proj", hq * hd + j),
        )


class AlibiAttention(nn.Module):
    """Hand-written causal attention with an ALiBi bias: matmul, scale, bias, mask, softmax."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.h, self.hd = h, d // h
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)])
        self.register_buffer("slopes", slopes.view(h, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q = self.q(x).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.h, self.hd).transpose(1, 2)
        v = self.v(x).view(b, t, self.h, self.hd).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.hd))  # (B, h, T, T)
        pos = torch.arange(t, device=x.device)
        rel = (pos[None, :] - pos[:, None]).to(x.dtype)
        att = att + self.slopes * rel
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        return self.o(y)

    @staticmethod
    def expected(prefix: str, d: int, h: int) -> list[Expect]:
        """qk and vo per head of separate biased projections."""
        hd = d // h
        return attention_expects(
            n_kv=h, rep=1, head_dim=hd,
            q=lambda hq, j: lin_out(f"{prefix}q", hq * hd + j),
            k=lambda g, j: lin_out(f"{prefix}k", g * hd + j),
            v=lambda g, j: lin_out(f"{prefix}v", g * hd + j),
            o=lambda hq, j: lin_in(f"{prefix}o", hq * hd + j),
        )


class CrossAttention(nn.Module):
    """Queries from ``x``, keys/values from a context of another width; head width != d/h."""

    def __init__(self, d: int, d_ctx: int, h: int, hd: int):
        super().__init__()
        self.h, self.hd = h, hd
        self.to_q = nn.Linear(d, h * hd)
        self.to_k = nn.Linear(d_ctx, h * hd)
        self.to_v = nn.Linear(d_ctx, h * hd)
        self.to_out = nn.Linear(h * hd, d)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        s = ctx.shape[1]
        q = self.to_q(x).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.to_k(ctx).view(b, s, self.h, self.hd).transpose(1, 2)
        v = self.to_v(ctx).view(b, s, self.h, self.hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(y.transpose(1, 2).reshape(b, t, self.h * self.hd))

    @staticmethod
    def expected(prefix: str, h: int, hd: int) -> list[Expect]:
        """qk and vo per head; k and v come from the context input."""
        return attention_expects(
            n_kv=h, rep=1, head_dim=hd,
            q=lambda hq, j: lin_out(f"{prefix}to_q", hq * hd + j),
            k=lambda g, j: lin_out(f"{prefix}to_k", g * hd + j),
            v=lambda g, j: lin_out(f"{prefix}to_v", g * hd + j),
            o=lambda hq, j: lin_in(f"{prefix}to_out", hq * hd + j),
        )


class Head(nn.Module):
    """One attention head with its own q/k/v projections (non-causal, softmax)."""

    def __init__(self, d: int, hd: int):
        super().__init__()
        self.hd = hd
        self.query, self.key, self.value = (nn.Linear(d, hd) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = self.query(x) @ self.key(x).transpose(-2, -1) / math.sqrt(self.hd)
        return att.softmax(dim=-1) @ self.value(x)


class PerHeadAttention(nn.Module):
    """Heads as a ``ModuleList`` of :class:`Head`, concatenated, then an output projection."""

    def __init__(self, d: int, h: int, hd: int):
        super().__init__()
        self.heads = nn.ModuleList(Head(d, hd) for _ in range(h))
        self.proj = nn.Linear(h * hd, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([head(x) for head in self.heads], dim=-1))

    @staticmethod
    def expected(prefix: str, h: int, hd: int) -> list[Expect]:
        """qk and vo per head module."""
        return attention_expects(
            n_kv=h, rep=1, head_dim=hd,
            q=lambda hq, j: lin_out(f"{prefix}heads.{hq}.query", j),
            k=lambda g, j: lin_out(f"{prefix}heads.{g}.key", j),
            v=lambda g, j: lin_out(f"{prefix}heads.{g}.value", j),
            o=lambda hq, j: lin_in(f"{prefix}proj", hq * hd + j),
        )


class MHAttention(nn.Module):
    """``nn.MultiheadAttention`` (packed ``in_proj_weight``), self-attention, batch first."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.mha = nn.MultiheadAttention(d, h, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]

    @staticmethod
    def expected(prefix: str, d: int, h: int) -> list[Expect]:
        """qk and vo per head of the packed in-projection."""
        return mha_expected(f"{prefix}mha.", d, h)


def mha_expected(prefix: str, d: int, h: int) -> list[Expect]:
    """qk/vo per head of an ``nn.MultiheadAttention`` whose path (with dot) is ``prefix``."""
    hd = d // h
    w, bb = f"{prefix}in_proj_weight", f"{prefix}in_proj_bias"

    def packed(offset):
        return lambda head, j: [(w, 0, offset + head * hd + j), (bb, 0, offset + head * hd + j)]

    return attention_expects(
        n_kv=h, rep=1, head_dim=hd, q=packed(0), k=packed(d), v=packed(2 * d),
        o=lambda hq, j: lin_in(f"{prefix}out_proj", hq * hd + j),
    )


class QKNormAttention(nn.Module):
    """Separate q/k/v with an RMSNorm over each head's q and k dims (qk becomes inexact)."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.h, self.hd = h, d // h
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.q_norm, self.k_norm = RMSNorm(self.hd), RMSNorm(self.hd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q = self.q_norm(self.q(x).view(b, t, self.h, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k(x).view(b, t, self.h, self.hd)).transpose(1, 2)
        v = self.v(x).view(b, t, self.h, self.hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, c))

    @staticmethod
    def expected(prefix: str, d: int, h: int) -> list[Expect]:
        """Only the vo couplings are exact."""
        hd = d // h
        both = attention_expects(
            n_kv=h, rep=1, head_dim=hd,
            q=lambda hq, j: lin_out(f"{prefix}q", hq * hd + j, False),
            k=lambda g, j: lin_out(f"{prefix}k", g * hd + j, False),
            v=lambda g, j: lin_out(f"{prefix}v", g * hd + j, False),
            o=lambda hq, j: lin_in(f"{prefix}o", hq * hd + j),
        )
        return [e for e in both if e.kind == "vo"]
