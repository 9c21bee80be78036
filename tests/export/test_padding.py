"""Padding decisions that only the logits check can make: a Llama whose heads all drop the same
rotary pair would fit ``head_dim`` 6, but the rotary frequencies depend on ``head_dim``, so the
export keeps 8 (zero rows) and says why; the dims no field sets alone (GPT-2's fused ``c_attn``)
are exported dense."""
from __future__ import annotations

import pytest
import torch

import ecospa
from tests.export.models import build, inputs

transformers = pytest.importorskip("transformers")


def test_a_smaller_head_dim_that_changes_rotary_frequencies_is_padded_back(tmp_path):
    m = build("llama")
    cg = ecospa.auto_couple(m, (inputs()[:1],))
    # the same rotary pair (dims 0 and 4) in every q/k head, the same dims of every v/o head
    ecospa.prune(m, {c.name: [0] if c.kind == "qk" else [0, 4] for c in cg if c.kind in ("qk", "vo")})
    r = ecospa.export(m, tmp_path / "x")
    assert r.params > r.pruned_params and "head_dim" not in r.config_changes
    why = r.padded["model.layers.*.self_attn.q_proj.weight dim 0"]
    assert "head_dim=8 (a smaller head_dim does not reproduce" in why
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "x").eval()
    with torch.no_grad():
        ref = m(inputs()).logits
        assert float((back(inputs()).logits - ref).norm() / ref.norm()) <= 1e-5


def test_a_dense_model_exports_unchanged(tmp_path):
    m = build("qwen2")
    r = ecospa.export(m, tmp_path / "d")
    assert r.params == r.pruned_params == r.dense_params and not r.config_changes and not r.padded
