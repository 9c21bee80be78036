"""Transformer blocks and small whole models built from the zoo's attention and FFN modules.

Each class has a static ``expected(...)`` giving the exact couplings it must yield.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from tests.zoo.attention import (
    AlibiAttention,
    CrossAttention,
    LlamaAttention,
    MHAttention,
    NanoGPTAttention,
    PerHeadAttention,
    QKNormAttention,
    RMSNorm,
)
from tests.zoo.expect import Expect
from tests.zoo.ffn import FFN, SwiGLU

__all__ = [
    "NanoGPTBlock",
    "NanoGPT",
    "RenamedGPTBlock",
    "LlamaBlock",
    "AlibiBlock",
    "CrossBlock",
    "PerHeadBlock",
    "MHABlock",
    "QKNormBlock",
    "SharedFFN",
    "Residual",
]


class NanoGPTBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` with a 4x GELU MLP."""

    def __init__(self, d: int = 32, h: int = 4, dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = NanoGPTAttention(d, h, dropout)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = FFN(d, 4 * d, "gelu", dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    @staticmethod
    def expected(prefix: str = "", d: int = 32, h: int = 4) -> list[Expect]:
        """qk/vo per head and the MLP's ffn."""
        return NanoGPTAttention.expected(f"{prefix}attn.", d, h) + FFN.expected(
            f"{prefix}mlp.", 4 * d
        )


class NanoGPT(nn.Module):
    """nanoGPT: token + position embeddings, blocks, final norm, LM head tied to ``wte``."""

    def __init__(self, vocab: int = 50, d: int = 32, h: int = 4, n_layer: int = 2,
                 block_size: int = 16, dropout: float = 0.1):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d),
            wpe=nn.Embedding(block_size, d),
            drop=nn.Dropout(dropout),
            h=nn.ModuleList(NanoGPTBlock(d, h, dropout) for _ in range(n_layer)),
            ln_f=nn.LayerNorm(d),
        ))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)

    @staticmethod
    def expected(n_layer: int = 2, d: int = 32, h: int = 4) -> list[Expect]:
        """Every block's couplings; the embeddings and the tied head couple with nothing."""
        return [e for i in range(n_layer)
                for e in NanoGPTBlock.expected(f"transformer.h.{i}.", d, h)]


class _Mixer(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.wqkv = nn.Linear(d, 3 * d)
        self.wo = nn.Linear(d, d)
        self.n = h

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.wqkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n, c // self.n).transpose(1, 2) for z in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).contiguous().view(b, t, c))


class _FF(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


class RenamedGPTBlock(nn.Module):
    """:class:`NanoGPTBlock` with other attribute names; same function for the same weights."""

    RENAME = {  # renamed parameter prefix -> NanoGPTBlock parameter prefix
        "norm_a.": "ln_1.", "mixer.wqkv.": "attn.c_attn.", "mixer.wo.": "attn.c_proj.",
        "norm_b.": "ln_2.", "ff.up.": "mlp.c_fc.", "ff.down.": "mlp.c_proj.",
    }

    def __init__(self, d: int = 32, h: int = 4):
        super().__init__()
        self.norm_a, self.mixer = nn.LayerNorm(d), _Mixer(d, h)
        self.norm_b, self.ff = nn.LayerNorm(d), _FF(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm_a(x))
        return x + self.ff(self.norm_b(x))

    @classmethod
    def to_original(cls, name: str) -> str:
        """The NanoGPTBlock name of a parameter of this block."""
        for new, old in cls.RENAME.items():
            if name.startswith(new):
                return old + name[len(new):]
        raise KeyError(name)


class LlamaBlock(nn.Module):
    """Llama decoder layer: RMSNorm, GQA attention with rotary, RMSNorm, SwiGLU."""

    def __init__(self, d: int = 32, h: int = 4, kv: int = 2, hd: int = 8, f: int = 24,
                 rotary: str | None = "half"):
        super().__init__()
        self.input_layernorm = RMSNorm(d)
        self.self_attn = LlamaAttention(d, h, kv, hd, rotary)
        self.post_attention_layernorm = RMSNorm(d)
        self.mlp = SwiGLU(d, f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))

    @staticmethod
    def expected(h: int = 4, kv: int = 2, hd: int = 8, f: int = 24,
                 rotary: str | None = "half") -> list[Expect]:
        """qk/vo per kv head and one glu."""
        return LlamaAttention.expected("self_attn.", h, kv, hd, rotary) + SwiGLU.expected("mlp.", f)


class AlibiBlock(nn.Module):
    """Hand-written ALiBi attention and a ReLU MLP, pre-norm."""

    def __init__(self, d: int = 24, h: int = 4, f: int = 40):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), AlibiAttention(d, h)
        self.ln2, self.mlp = nn.LayerNorm(d), FFN(d, f, "relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    @staticmethod
    def expected(d: int = 24, h: int = 4, f: int = 40) -> list[Expect]:
        """qk/vo per head and the ffn."""
        return AlibiAttention.expected("attn.", d, h) + FFN.expected("mlp.", f, act="relu")


class CrossBlock(nn.Module):
    """Cross-attention to a context (two inputs) and a tanh-GELU MLP."""

    def __init__(self, d: int = 24, d_ctx: int = 16, h: int = 4, hd: int = 5, f: int = 32):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.cross = CrossAttention(d, d_ctx, h, hd)
        self.mlp = FFN(d, f, "gelu_tanh")

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = x + self.cross(self.norm(x), ctx)
        return x + self.mlp(x)

    @staticmethod
    def expected(h: int = 4, hd: int = 5, f: int = 32) -> list[Expect]:
        """qk/vo per head and the ffn."""
        return CrossAttention.expected("cross.", h, hd) + FFN.expected("mlp.", f)


class PerHeadBlock(nn.Module):
    """``x + PerHeadAttention(x)``."""

    def __init__(self, d: int = 16, h: int = 3, hd: int = 4):
        super().__init__()
        self.attn = PerHeadAttention(d, h, hd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(x)

    @staticmethod
    def expected(h: int = 3, hd: int = 4) -> list[Expect]:
        """qk/vo per head module."""
        return PerHeadAttention.expected("attn.", h, hd)


class MHABlock(nn.Module):
    """``x + nn.MultiheadAttention(ln(x))``."""

    def __init__(self, d: int = 32, h: int = 4):
        super().__init__()
        self.ln, self.attn = nn.LayerNorm(d), MHAttention(d, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.ln(x))

    @staticmethod
    def expected(d: int = 32, h: int = 4) -> list[Expect]:
        """qk/vo per head of the packed projection."""
        return MHAttention.expected("attn.", d, h)


class QKNormBlock(nn.Module):
    """QK-norm attention and a GELU MLP: qk inexact, vo and ffn exact."""

    def __init__(self, d: int = 32, h: int = 4, f: int = 48):
        super().__init__()
        self.attn, self.mlp = QKNormAttention(d, h), FFN(d, f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)

    @staticmethod
    def expected(d: int = 32, h: int = 4, f: int = 48) -> list[Expect]:
        """vo per head and the ffn (the qk couplings are inexact)."""
        return QKNormAttention.expected("attn.", d, h) + FFN.expected("mlp.", f)


class SharedFFN(nn.Module):
    """One FFN module applied twice (shared weights): one coupling, not two."""

    def __init__(self, d: int = 16, f: int = 24):
        super().__init__()
        self.ffn = FFN(d, f, "gelu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ffn(x)
        return x + self.ffn(x)

    @staticmethod
    def expected(f: int = 24) -> list[Expect]:
        """The single ffn coupling of the shared module."""
        return FFN.expected("ffn.", f)


class Residual(nn.Module):
    """``x + body(x)`` (parameters named ``body.*``)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)
