"""plan_round with ``exportable=True`` on the couplings alone (no config probed): whole heads,
the same count in every layer, FFN widths equal across layers."""
from __future__ import annotations

import numpy as np
import pytest

import ecospa
from ecospa.schedule.planner import ParamCounter, PlanConfig, plan_round

transformers = pytest.importorskip("transformers")


def llama():
    import torch

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    m = transformers.LlamaForCausalLM(cfg).eval()
    return m, ecospa.auto_couple(m, (torch.randint(0, 50, (1, 8)),))


@pytest.mark.parametrize("target", [0.8, 0.5, 0.3])
def test_exportable_rounds_remove_whole_heads_and_equal_ffn_widths(target):
    m, cg = llama()
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    cfg = PlanConfig(target=target, exportable=True, top_k=1.0, theta=0.5)
    rng = np.random.default_rng(0)
    scores = {c.name: float(rng.random()) for c in cg}
    removal = plan_round(list(cg), shapes, coupling_scores=scores, unit_scores=lambda c: rng.random(c.width),
                         config=cfg, target_params=cfg.target_params(cg, m), passes=None)
    assert removal
    by = {c.name: c for c in cg}
    for name, units in removal.items():
        c = by[name]
        if c.kind in ("qk", "vo"):
            assert len(units) == c.width  # whole
            twin = name.replace(".qk.", ".vo.") if ".qk." in name else name.replace(".vo.", ".qk.")
            assert len(removal.get(twin, ())) == by[twin].width  # with its other half
    for kind in ("qk", "glu"):
        per_layer = [len(removal.get(c.name, ())) for c in cg if c.kind == kind and c.name.endswith(("glu", "head0"))]
        heads = [sum(len(removal.get(c.name, ())) == c.width for c in cg if c.kind == "qk"
                     and c.name.startswith(f"model.layers.{i}.")) for i in range(3)]
        assert len(set(per_layer if kind == "glu" else heads)) == 1
    pc = ParamCounter(shapes)
    for name, units in removal.items():
        pc.remove(by[name], units)
    assert pc.total <= cfg.target_params(cg, m)


def test_compress_allocation_does_not_overshoot_with_a_coarse_head_step():
    """A head step (one head in every layer) much larger than what is left to remove waits
    while FFN steps can still reach the goal."""
    from ecospa.compression.allocate import Allocation, allocate_global, merged_alive, merged_values
    from ecospa.schedule.exportable import exportable_rules, view

    m, cg = llama()
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    alive = {c.name: np.ones(c.width, bool) for c in cg}
    rng = np.random.default_rng(0)
    values = {c.name: rng.random(c.width) for c in cg}
    ev = view(list(cg), exportable_rules(cg, m), alive)
    a = Allocation(ev.couplings, shapes, merged_alive(ev, alive), merged_values(ev, values, alive), lockstep=ev.blocks)
    total = a.counter().total
    out = allocate_global(a, total - 1000)
    ffn_step = 3 * 32 * 3  # one unit of gate, up and down in each of the 3 layers
    assert total - 1000 - ffn_step < a.counter(out).total <= total - 1000
    assert not any(n.endswith("heads") for n in out)
