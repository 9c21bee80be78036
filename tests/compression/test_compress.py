"""``compress``: one-shot compression from calibration data (tiny models, random weights).

Checks: the target is reached within one unit's parameters; the physically pruned model equals
the same compression left masked (zeroed slices, original shapes) and, without reconstruction,
the dense model with the removed slices zeroed; calibration changes no weight, gradient, flag
or mode; bad inputs raise clear errors before anything changes; the report is JSON.
"""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import ecospa
from ecospa.compression.calibration import CalibrationError, as_batches, calibrate, causal_lm_loss
from ecospa.compression.compress import CompressError, CompressReport, compress
from ecospa.errors import ConfigError
from tests.helpers import assert_close_outputs, masked_copy, param_count

transformers = pytest.importorskip("transformers")


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=32, use_cache=False, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, n_inner=48,
                                  bos_token_id=0, eos_token_id=0, use_cache=False, attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(cfg).eval()


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=32, attn_implementation="sdpa")
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _tokens(n=3, b=2, t=12, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (b, t), generator=g) for _ in range(n)]


def _bert_loss(model, batch):
    h = model(input_ids=batch).last_hidden_state
    return (h[:, 0] - h[:, 1:].mean(1)).pow(2).mean()


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 24), nn.Linear(24, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _mlp_data():
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)) for _ in range(3)]


def _mlp_loss(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _unit_params(rep: CompressReport, cg) -> int:
    shapes = cg.shapes or {}
    return max(int(c.unit_numel(shapes).max()) for c in cg)


def _masked_reference(model, cg, removed):
    units = [list(cg[n].units()[i]) for n, idx in removed.items() for i in idx]
    return masked_copy(model, units).eval()


CASES = {
    "llama": (_llama, lambda: _tokens(), None, lambda d: d[0]),
    "gpt2": (_gpt2, lambda: _tokens(), None, lambda d: d[0]),
    "bert": (_bert, lambda: _tokens(), _bert_loss, lambda d: d[0]),
}


def _call(model, x):
    return model(input_ids=x) if isinstance(x, torch.Tensor) else model(x)


@pytest.mark.parametrize("name", list(CASES))
def test_target_reached_and_pruned_equals_masked(name):
    build, data_fn, loss_fn, probe = CASES[name]
    data = data_fn()
    dense = build()
    cg = ecospa.auto_couple(dense)
    kw = dict(loss_fn=loss_fn, rounds=2, couplings=cg)
    masked_model, rep_m = compress(copy.deepcopy(dense), 0.55, data, physical=False, **kw)
    pruned, rep = compress(copy.deepcopy(dense), 0.55, data, **kw)
    assert rep.removed == rep_m.removed
    assert rep.params_after == param_count(pruned) <= rep.target_params
    assert rep.target_params - rep.params_after < _unit_params(rep, cg)
    x = probe(data)
    with torch.no_grad():
        assert_close_outputs(_call(pruned.eval(), x), _call(masked_model.eval(), x), tol=1e-4)
    # without reconstruction the result is exactly the dense model with the removed units zeroed
    plain, rep_p = compress(copy.deepcopy(dense), 0.55, data, reconstruct=False, **kw)
    ref = _masked_reference(dense, cg, rep_p.removed)
    with torch.no_grad():
        assert_close_outputs(_call(plain.eval(), x), _call(ref, x), tol=1e-4)


def test_plain_module_with_loss_fn_and_exact_count():
    model = MLP()
    data = _mlp_data()
    cg = ecospa.auto_couple(model, (data[0][0],))
    target = param_count(model) - 7 * 13  # 7 hidden units of 13 parameters each
    pruned, rep = compress(model, target, data, loss_fn=_mlp_loss, rounds=1, example_inputs=(data[0][0],))
    assert rep.params_after == target and pruned.fc1.out_features == 24 - 7
    assert len(cg) == 1 and rep.removed[cg[0].name] and len(rep.removed[cg[0].name]) == 7


def test_calibration_changes_nothing():
    model = _llama()
    model.train()
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    params["lm_head.weight"].grad = torch.ones_like(params["lm_head.weight"])
    params["model.norm.weight"].requires_grad_(False)
    cg = ecospa.auto_couple(model)
    stats = calibrate(model, list(cg), as_batches(_tokens()), causal_lm_loss)
    assert model.training
    assert not params["model.norm.weight"].requires_grad
    assert torch.equal(params["lm_head.weight"].grad, torch.ones_like(params["lm_head.weight"]))
    for n, p in params.items():
        assert torch.equal(p.detach(), before[n]), n
        if n != "lm_head.weight":
            assert p.grad is None, n
    assert stats.samples == 6 and all(v.shape == (cg[v_n].width,) for v_n, v in stats.fisher.items())
    assert all(float(v.sum()) > 0 for v in stats.fisher.values())
    assert stats.grams and all(g.shape[0] == g.shape[1] for g in stats.grams.values())


def test_report_is_json_and_uniform_heads():
    model, rep = compress(_llama(), 0.6, _tokens(), rounds=2, head_widths="uniform")
    d = json.loads(rep.to_json())
    assert d["params_after"] == rep.params_after and len(d["rounds"]) == 2
    assert math.isclose(d["kept_fraction"], rep.kept_fraction)
    assert str(rep).startswith("compress:")
    # equal kept widths inside each width group (the heads of one attention)
    cg = ecospa.auto_couple(_llama())
    groups = {}
    for c in cg:
        if c.group:
            groups.setdefault(c.group, set()).add(rep.widths[c.name][1])
    assert groups and all(len(w) == 1 for w in groups.values())


def test_planner_eq9_and_recovery():
    data = _tokens()
    model, rep = compress(_llama(), 0.7, data, score="eq9", allocation="planner", rounds=1,
                          recover_steps=3, recover_lr=1e-3)
    assert rep.params_after <= rep.target_params and rep.allocation == "planner"
    assert len(rep.recovery_losses) == 3 and all(math.isfinite(v) for v in rep.recovery_losses)
    assert param_count(model) == rep.params_after
    model2, rep2 = compress(_llama(), 0.7, data, allocation="uniform", rounds=1, recover_steps=2, recovery="lm")
    assert rep2.recovery == "lm" and len(rep2.recovery_losses) == 2


@pytest.mark.parametrize("target", [1.5, 0.0, -3, "half", True])
def test_bad_target(target):
    model = _llama()
    state = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ConfigError, match="target"):
        compress(model, target, _tokens())
    assert all(torch.equal(state[n], p) for n, p in model.state_dict().items())


def test_unreachable_target():
    with pytest.raises(ConfigError, match="unreachable"):
        compress(_llama(), 100, _tokens())


def test_errors():
    model = _llama()
    with pytest.raises(CalibrationError, match="no batch"):
        compress(model, 0.5, [])
    with pytest.raises(CalibrationError, match="1-D"):
        compress(model, 0.5, torch.arange(10))
    with pytest.raises(CalibrationError, match="loss_fn"):
        compress(_bert(), 0.5, _tokens())
    with pytest.raises(CalibrationError, match="loss_fn"):
        compress(MLP(), 0.5, _mlp_data(), example_inputs=(torch.randn(2, 8),))
    with pytest.raises(CompressError, match="allocation"):
        compress(model, 0.5, _tokens(), allocation="best")
    with pytest.raises(CompressError, match="score"):
        compress(model, 0.5, _tokens(), score="vibes")
    with pytest.raises(CompressError, match="rounds"):
        compress(model, 0.5, _tokens(), rounds=0)
    state = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(CalibrationError, match="nan"):
        compress(model, 0.5, _tokens(), loss_fn=lambda m, b: m(input_ids=b).logits.sum() * float("nan"))
    assert all(torch.equal(state[n], p) for n, p in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_compress_again_a_pruned_model(tmp_path):
    """A pruned model (here saved and loaded back) calibrates and compresses further. Its pruned
    attention runs the exact path during calibration, so a consumer inside a narrow region
    (``o_proj``) gets a Gram of its kept input columns: equal to the masked dense model's Gram
    restricted to those columns; none is a traced (fake) tensor."""
    from ecospa.ir.record import param_records

    model, data = _llama(), _tokens()
    masked, _ = compress(copy.deepcopy(model), 0.8, data, rounds=1, physical=False)
    model, first = compress(model, 0.8, data, rounds=1)
    ecospa.save(model, tmp_path / "ck")
    loaded = ecospa.load(tmp_path / "ck", _llama())
    C = [c for c in ecospa.auto_couple(loaded) if c.exact]
    loaded(input_ids=data[0])  # the narrow graphs are built: calibration must not use them
    stats = calibrate(loaded, C, as_batches(data), causal_lm_loss)
    assert stats.grams and all(type(g) is torch.Tensor for g in stats.grams.values())
    assert any("o_proj" in p for p in stats.grams) and any("down_proj" in p for p in stats.grams)
    params = dict(loaded.named_parameters())
    for p, g in stats.grams.items():
        n_in = params[p].shape[1]
        assert g.shape == (n_in, n_in), p
    dense_C = [c for c in ecospa.auto_couple(masked) if c.exact]
    ref = calibrate(masked, dense_C, as_batches(data), causal_lm_loss)
    records = param_records(loaded)
    for p, g in stats.grams.items():
        kept = torch.as_tensor(records[p].kept_or_all(1)) if p in records else torch.arange(g.shape[0])
        torch.testing.assert_close(g, ref.grams[p][kept][:, kept], rtol=1e-4, atol=1e-5, msg=p)
    loaded, again = compress(loaded, first.params_after - 600, data, rounds=1)
    assert param_count(loaded) == again.params_after <= first.params_after - 600


def test_rounds_calibrate_the_model_as_pruned_so_far():
    """Every round calibrates the model at its size after the rounds before it (pruned
    physically, not zeroed), so later rounds are cheaper; progress names the round and counts
    all rounds' samples on one overall stage."""
    from ecospa.compression.calibration import causal_lm_loss as lm_loss

    sizes, stages = [], {}

    def loss(m, b):
        sizes.append(param_count(m))
        return lm_loss(m, b)

    data = _tokens()
    model, rep = compress(_llama(), 0.5, data, rounds=3, loss_fn=loss,
                          progress=lambda stage, done, total: stages.__setitem__(stage, (done, total)))
    seen = sorted(set(sizes), reverse=True)
    assert len(seen) == 3 and seen[0] == rep.params_before
    assert seen[1:] == [r.params_before for r in rep.rounds[1:]]  # round k calibrates round k-1's result
    samples = sum(b.shape[0] for b in data)
    assert stages["compress"] == (3 * samples, 3 * samples)
    assert {"round 1/3 calibrate", "round 3/3 calibrate", "round 1/3 refit"} <= set(stages)
