"""timm models (run in the timm environment): a tiny ViT's couplings and exact pruning."""
from __future__ import annotations

import random

import pytest
import torch

import ecospa
from tests.helpers import assert_couplings_match, assert_pruned_equals_masked, random_plan
from tests.zoo.expect import attention_expects, ffn_expect, lin_in, lin_out

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.timm

D, H, DEPTH, MLP_RATIO = 48, 3, 2, 2.0


def _vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=D, depth=DEPTH, num_heads=H, mlp_ratio=MLP_RATIO,
                             num_classes=10).eval()


def _expected():
    hd, f, out = D // H, int(D * MLP_RATIO), []
    for i in range(DEPTH):
        p = f"blocks.{i}."
        out += attention_expects(
            n_kv=H, rep=1, head_dim=hd,
            q=lambda h, j, p=p: lin_out(f"{p}attn.qkv", h * hd + j),
            k=lambda g, j, p=p: lin_out(f"{p}attn.qkv", D + g * hd + j),
            v=lambda g, j, p=p: lin_out(f"{p}attn.qkv", 2 * D + g * hd + j),
            o=lambda h, j, p=p: lin_in(f"{p}attn.proj", h * hd + j))
        out.append(ffn_expect(f"{p}mlp.fc1", f"{p}mlp.fc2", f))
    return out


def test_timm_vit_discovery():
    """Fused qkv heads and the MLP of every block; the classifier head couples with nothing."""
    model = _vit()
    cg = ecospa.auto_couple(model, (torch.randn(2, 3, 32, 32),))
    assert_couplings_match(cg, _expected())


def test_timm_vit_pruned_equals_masked():
    """A third of every coupling removed: logits equal the masked dense model's."""
    model = _vit()
    x = (torch.randn(2, 3, 32, 32),)
    plan = random_plan(ecospa.auto_couple(model, x), random.Random(0))
    assert_pruned_equals_masked(model, x, plan, check_inputs=[(torch.randn(1, 3, 32, 32),)])
