"""A module whose ``state_dict`` hooks convert its layout at the sizes it was built with (torchtitan's
fused QKV projection saves ``wqkv`` as ``wq``/``wk``/``wv``, split by the dense head counts, and
merges them back on load): ``ecospa.save`` stores the module's own tensors (no hooks), and
``ecospa.load`` writes them back, so a pruned model round-trips exactly."""
from __future__ import annotations

import random

import torch
import torch.nn as nn
import torch.nn.functional as F

import ecospa
from ecospa.checkpoint.weights import module_state
from tests.checkpoint.helpers import assert_same_outputs, outputs
from tests.helpers import random_plan

H, D, DIM = 4, 8, 32


class FusedQKV(nn.Module):
    """Causal attention with one ``wqkv`` projection, rows ``(head, q|k|v, d)``, saved split."""

    def __init__(self):
        super().__init__()
        self.wqkv = nn.Linear(DIM, 3 * H * D, bias=False)
        self.wo = nn.Linear(H * D, DIM, bias=False)
        self.register_state_dict_post_hook(self._split)
        self.register_load_state_dict_pre_hook(self._merge)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, t, DIM) -> (b, t, DIM)``."""
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).view(b, t, H, 3, -1).permute(3, 0, 2, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))

    @staticmethod
    def _split(module, state_dict, prefix, local_metadata) -> None:
        w = state_dict.pop(f"{prefix}wqkv.weight").reshape(H, 3, D, DIM)  # the dense sizes
        for i, name in enumerate("qkv"):
            state_dict[f"{prefix}w{name}.weight"] = w[:, i].reshape(H * D, DIM)

    @staticmethod
    def _merge(module, state_dict, prefix, *args) -> None:
        keys = [f"{prefix}w{n}.weight" for n in "qkv"]
        if all(k in state_dict for k in keys):
            parts = [state_dict.pop(k).reshape(H, 1, D, DIM) for k in keys]
            state_dict[f"{prefix}wqkv.weight"] = torch.cat(parts, 1).reshape(-1, DIM)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = FusedQKV()
        self.register_buffer("step", torch.zeros(()))  # a persistent buffer rides along

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(x)


def test_the_hooks_convert_the_dense_layout():
    model = Model()
    assert {"attn.wq.weight", "attn.wk.weight", "attn.wv.weight"} <= set(model.state_dict())
    assert set(module_state(model)) == {"attn.wqkv.weight", "attn.wo.weight", "step"}


def test_a_pruned_fused_qkv_module_round_trips(tmp_path):
    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(2, 9, DIM)
    cg = ecospa.auto_couple(model, (x,))
    plan = random_plan(cg, random.Random(0))
    assert plan
    ecospa.prune(model, plan, couplings=cg)
    with torch.no_grad():
        model.step.fill_(3.0)
    ref = outputs(model, (x,))
    ecospa.save(model, tmp_path / "ck")
    torch.manual_seed(1)
    fresh = ecospa.load(tmp_path / "ck", Model().eval(), example_inputs=(x,))
    assert_same_outputs(outputs(fresh, (x,)), ref)
    mine, theirs = module_state(fresh), module_state(model)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert fresh.step.item() == 3.0
