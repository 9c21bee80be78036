"""The models the speed benchmark times.

- :func:`hf_gpt2`: transformers ``GPT2LMHeadModel`` (SDPA attention), GPT-2-small shape by
  default, random weights. Its attention (``Conv1D``, split/view heads) is what ecospa must follow
  and what torch_pruning cannot.
- :class:`LinearGPT`: a GPT-2-shaped model of nn.Linear layers with timm-style attention
  (``qkv(x).reshape(B, T, 3, H, -1)``), which torch_pruning can prune; its head width and FFN
  width are constructor arguments, so the *physical reference* (a dense model built directly at
  the kept widths) is the same class.
- :class:`TinyLM`: a small research-style LM written independently of ecospa's test zoo: fused
  GQA qkv projection, interleaved rotary (pairs ``2i, 2i+1`` through ``unflatten``/``unbind``),
  ``repeat_interleave`` for the KV groups, RMSNorm, SwiGLU with one fused ``w12`` Linear and
  ``chunk(2)``, tied embeddings. Head width and FFN width are constructor arguments.

Every model's forward takes ``(idx, targets=None)``-like inputs; :func:`loss_of` and
:func:`logits_of` hide the difference between the HF model and the plain ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, head_dim=64, ffn=3072, vocab=50257)


def hf_gpt2(n_layer=12, n_embd=768, n_head=12, ffn=3072, vocab=50257, n_positions=2048,
            seed: int = 0) -> nn.Module:
    """``GPT2LMHeadModel`` with SDPA attention (eval mode; ``use_cache`` at its default, on)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_inner=ffn, vocab_size=vocab,
                     n_positions=n_positions, attn_implementation="sdpa",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, loss_type="ForCausalLM",
                     bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    return GPT2LMHeadModel(cfg).eval()


# ----------------------------------------------------------------------------- LinearGPT
class TimmAttention(nn.Module):
    """timm-style causal attention: one qkv Linear, ``reshape(B, T, 3, H, -1)``, SDPA, proj.
    The scale is fixed at construction (``1/sqrt(head_dim)``), so a pruned copy keeps it."""

    def __init__(self, d: int, n_head: int, head_dim: int):
        super().__init__()
        self.n_head = n_head
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(d, 3 * n_head * head_dim)
        self.proj = nn.Linear(n_head * head_dim, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class Mlp(nn.Module):
    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.fc = nn.Linear(d, ffn)
        self.proj = nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, head_dim: int, ffn: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = TimmAttention(d, n_head, head_dim)
        self.mlp = Mlp(d, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class LinearGPT(nn.Module):
    """GPT-2 of nn.Linear layers (tied lm_head); ``head_dim`` and ``ffn`` free."""

    def __init__(self, n_layer=12, n_embd=768, n_head=12, head_dim=64, ffn=3072, vocab=50257,
                 n_positions=2048):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head, head_dim, ffn) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(_init)

    def body(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for blk in self.h:
            x = blk(x)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.body(idx))


def _init(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.normal_(m.bias, std=0.02)  # non-zero, so removed bias entries matter in checks


# ----------------------------------------------------------------------------- TinyLM
@dataclass
class TinyConfig:
    vocab: int = 1024
    dim: int = 192
    n_layers: int = 4
    n_heads: int = 6
    n_kv_heads: int = 2
    head_dim: int = 32
    ffn: int = 512
    max_seq: int = 1024
    rope_base: float = 10000.0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class InterleavedRope(nn.Module):
    """Rotary embedding over interleaved pairs (GPT-J / Meta-llama layout): ``(x[2i], x[2i+1])``
    rotated by angle ``t * base^(-2i/D)``."""

    def __init__(self, head_dim: int, max_seq: int, base: float):
        super().__init__()
        inv = base ** (-torch.arange(0, head_dim, 2).float() / head_dim)
        ang = torch.outer(torch.arange(max_seq).float(), inv)  # (L, D/2)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, T, D)
        T = x.shape[-2]
        c, s = self.cos[:T], self.sin[:T]
        x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


class GQAttention(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.h, self.kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.rope = InterleavedRope(cfg.head_dim, cfg.max_seq, cfg.rope_base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split([self.h * self.hd, self.kv * self.hd, self.kv * self.hd], dim=-1)
        q = q.view(B, T, self.h, self.hd).transpose(1, 2)
        k = k.view(B, T, self.kv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.kv, self.hd).transpose(1, 2)
        q, k = self.rope(q), self.rope(k)
        k = k.repeat_interleave(self.h // self.kv, dim=1)
        v = v.repeat_interleave(self.h // self.kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.h * self.hd))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class TinyBlock(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.attn_norm, self.ffn_norm = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.attn, self.ffn = GQAttention(cfg), SwiGLU(cfg.dim, cfg.ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class TinyLM(nn.Module):
    def __init__(self, cfg: TinyConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or TinyConfig(**overrides)
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(TinyBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        self.out.weight = self.tok.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=1 / math.sqrt(cfg.dim))

    def body(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(idx))


# ----------------------------------------------------------------------------- helpers
def is_hf(model: nn.Module) -> bool:
    return hasattr(model, "transformer") and hasattr(model, "config")


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).logits if is_hf(model) else model(x)


def body_of(model: nn.Module, x: torch.Tensor):
    """The transformer body without the lm_head."""
    return model.transformer(x) if is_hf(model) else model.body(x)


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``x`` on itself (shifted)."""
    if is_hf(model):
        return model(x, labels=x).loss
    logits = model(x)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
