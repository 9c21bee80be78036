"""EcoSpa in a training loop: equivalence with masked dense training, target, plan, state."""
from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch

import ecospa
from ecospa.schedule.planner import PlanConfig
from ecospa.training.sparse import EcoSpa
from ecospa.errors import ConfigError
from ecospa.recipes.nanogpt import GPT, GPTConfig
from tests.helpers import delete_indices, removed_by_param

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=13)


def tiny_gpt(dtype=torch.float64) -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).to(dtype)


def batches(n, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (b, CFG.block_size + 1), generator=g) for _ in range(n)]


def example():
    return (torch.zeros(1, CFG.block_size, dtype=torch.long),)


def train(model, opt, sp, xs, *, until_done=False) -> int:
    """Plain loop with ``sp.step()`` after each optimizer step; returns the steps taken."""
    i = 0
    for i, x in enumerate(xs, 1):
        opt.zero_grad(set_to_none=True)
        model.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        sp.step()
        if until_done and sp.done:
            break
    return i


def make_opt(kind, params):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)


def removed_slices(dense_cg, plan, widths):
    """``{param: {dim: {original indices}}}`` removed by ``plan`` so far."""
    units = []
    for name, idx in plan.removed_original(widths).items():
        all_units = dense_cg[name].units()
        units += [all_units[i] for i in idx]
    return removed_by_param(units)


def hold_at_zero(model, opt, removed):
    """Zero the removed slices of the parameters, their grads and every moment."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, dims in removed.items():
            p = params[name]
            tensors = [p] + ([p.grad] if p.grad is not None else [])
            tensors += [v for v in opt.state.get(p, {}).values() if torch.is_tensor(v) and v.shape == p.shape]
            for t in tensors:
                for dim, idx in dims.items():
                    t.index_fill_(dim, torch.tensor(sorted(idx)), 0.0)


@pytest.mark.parametrize("opt_kind", ["adamw", "sgd"])
def test_pruned_training_equals_masked_dense_training(opt_kind):
    """Steps of AdamW (weight decay) / SGD momentum on the pruned model give the surviving
    parameters of the dense model trained with the removed units (params, grads, moments) held
    at zero, through several pruning rounds."""
    dense = tiny_gpt()
    sparse = copy.deepcopy(dense)
    opt_d, opt_s = make_opt(opt_kind, dense.parameters()), make_opt(opt_kind, sparse.parameters())
    dense_cg = ecospa.auto_couple(dense, example())
    sp = EcoSpa(sparse, opt_s, 0.5, example_inputs=example(), every=3, top_k=0.5, theta=0.8)
    removed: dict = {}
    for x in batches(14):
        for model, opt in ((dense, opt_d), (sparse, opt_s)):
            opt.zero_grad(set_to_none=True)
            model.loss(x[:, :-1], x[:, 1:]).backward()
        hold_at_zero(dense, opt_d, removed)
        opt_d.step()
        opt_s.step()
        if sp.step() is not None:
            removed = removed_slices(dense_cg, sp.plan, sp.dense_widths)
        hold_at_zero(dense, opt_d, removed)
    assert len(sp.events) >= 3, "the test should cover several pruning rounds"
    sparse_params = dict(sparse.named_parameters())
    for name, p in dense.named_parameters():
        want = delete_indices(p.detach(), removed.get(name, {}))
        got = sparse_params[name].detach()
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=f"parameter {name}")
        for key, moment in opt_s.state[sparse_params[name]].items():
            if torch.is_tensor(moment) and moment.shape == got.shape:
                dense_m = delete_indices(opt_d.state[p][key], removed.get(name, {}))
                torch.testing.assert_close(moment, dense_m, rtol=1e-9, atol=1e-12, msg=f"{key} of {name}")


def test_reaches_target_exactly_and_logs(caplog):
    model = tiny_gpt(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = EcoSpa(model, opt, target=0.5, example_inputs=example(), every=2)
    caplog.set_level(logging.INFO, logger="ecospa")
    i = train(model, opt, sp, batches(400), until_done=True)
    assert sp.done, f"not at target after {i} steps: {sp.num_params} > {sp.target_params}"
    biggest_unit = max(int(c.unit_numel(dict(sp.couplings.shapes)).max()) for c in sp.couplings)
    assert sp.target_params - biggest_unit < sp.num_params <= sp.target_params
    assert sp.events and sp.events[-1].params_after == sp.num_params
    assert all(e.params_after < e.params_before for e in sp.events)
    assert sum("removed" in r.message and "->" in r.message for r in caplog.records) == len(sp.events)
    assert sp.step() is None  # done: no more pruning
    assert all(c.width >= 1 for c in sp.couplings)  # min_units=1: no head empties out


def test_plan_replay_reproduces_the_pruned_model():
    model = tiny_gpt()
    fresh = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = EcoSpa(model, opt, 0.6, example_inputs=example(), every=2, theta=0.7)
    train(model, opt, sp, batches(12))
    plan = type(sp.plan).from_json(sp.plan.to_json())
    plan.replay(fresh, example_inputs=example())
    assert {n: p.shape for n, p in fresh.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    fresh.load_state_dict(model.state_dict())
    x = batches(1, seed=9)[0][:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_scheduler_clipping_bf16_autocast_grad_accumulation_and_step_before_optimizer():
    model = tiny_gpt(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    sp = EcoSpa(model, opt, 0.6, example_inputs=example(), every=3, width_multiple=2)
    data = batches(40)
    losses = []
    for step in range(20):
        opt.zero_grad(set_to_none=False)  # stale grads must be sliced too
        for micro in data[2 * step:2 * step + 2]:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model.loss(micro[:, :-1], micro[:, 1:]) / 2
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if step % 2:
            sp.step()  # before optimizer.step(): the executor slices .grad
            opt.step()
        else:
            opt.step()
            sp.step()
        sched.step()
        losses.append(loss.item())
    assert len(sp.events) >= 3
    assert all(torch.isfinite(torch.tensor(losses)))
    for p in model.parameters():
        assert p.grad is None or p.grad.shape == p.shape
        for v in opt.state[p].values():
            assert not torch.is_tensor(v) or v.dim() == 0 or v.shape == p.shape
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters()}
    assert all(c.width % 2 == 0 for c in sp.couplings)


def test_state_dict_resume_matches_uninterrupted_run():
    data = batches(16)

    def run(model, opt, sp, xs):
        for x in xs:
            opt.zero_grad(set_to_none=True)
            model.loss(x[:, :-1], x[:, 1:]).backward()
            opt.step()
            sp.step()

    kw = dict(example_inputs=example(), every=3, theta=0.8)
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sp = EcoSpa(model, opt, 0.5, **kw)
    run(model, opt, sp, data[:8])
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()})
    run(model, opt, sp, data[8:])

    model2 = tiny_gpt()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=3e-3)
    sp2 = EcoSpa(model2, opt2, 0.5, **kw)
    sp2.load_state_dict(ckpt["sp"])
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    run(model2, opt2, sp2, data[8:])
    assert sp2.plan == sp.plan
    for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=n)


def test_every_epoch_and_prune_now():
    model = tiny_gpt(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = EcoSpa(model, opt, config=PlanConfig(target=0.9, every="epoch"), example_inputs=example())
    assert sp.prune_now() is None  # no gradient yet: nothing to rank by
    for x in batches(3):
        opt.zero_grad()
        model.loss(x[:, :-1], x[:, 1:]).backward()
        assert sp.step() is None
    event = sp.end_epoch()
    assert event is not None and event.step == 3 and "params" in str(event)


def test_errors_name_the_bad_value():
    model = tiny_gpt(torch.float32)
    with pytest.raises(ConfigError, match="'thetta'"):
        EcoSpa(model, None, 0.5, example_inputs=example(), thetta=0.8)
    with pytest.raises(ConfigError, match="smallest reachable size"):
        EcoSpa(model, None, 0.01, example_inputs=example())
    with pytest.raises(ConfigError, match="top_k"):
        EcoSpa(model, None, 0.5, example_inputs=example(), top_k=2.0)


@pytest.mark.parametrize("score", ["magnitude", "taylor", "random"])
def test_baseline_scores_run_through_the_same_planner(score):
    model = tiny_gpt(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = EcoSpa(model, opt, 0.7, example_inputs=example(), every=2, unit_score=score, coupling_score=score)
    for x in batches(40):
        opt.zero_grad()
        model.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        sp.step()
        if sp.done:
            break
    assert sp.done


def test_min_units_zero_may_empty_a_coupling():
    model = tiny_gpt(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = EcoSpa(model, opt, 0.05, example_inputs=example(), every=1, top_k=1.0, theta=0.5, min_units=0)
    train(model, opt, sp, batches(60), until_done=True)
    assert sp.done
    assert any(c.width == 0 for c in sp.couplings)
    x = batches(1, seed=5)[0]
    loss = model.loss(x[:, :-1], x[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- schedule (end=...)


def test_end_reaches_the_target_on_the_cubic_schedule():
    """every=5 over 30 steps with end=0.5: rounds at 5, 10, 15, each down to the schedule's size;
    at step 15 the model is at the target (today's pace would end far above it)."""
    from ecospa.schedule.planner import schedule_target

    model = tiny_gpt(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = EcoSpa(model, opt, 0.5, example_inputs=example(), every=5, end=0.5, total_steps=30)
    unit = max(int(c.unit_numel(dict(sp.couplings.shapes)).max()) for c in sp.couplings)
    train(model, opt, sp, batches(30))
    assert [e.step for e in sp.events] == [5, 10, 15]
    for e in sp.events:
        goal = schedule_target(e.step, start=0, end=15, dense_params=sp.dense_params, target_params=sp.target_params)
        assert goal - unit < e.params_after <= goal, (e.step, e.params_after, goal)
    assert sp.done and sp.target_params - unit < sp.num_params <= sp.target_params
    # the first round removes the most: most steps run on the small model
    removed = [e.params_before - e.params_after for e in sp.events]
    assert removed[0] > removed[1] > removed[2]
    # a round is forced at end even when every does not land on it
    model = tiny_gpt(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = EcoSpa(model, opt, 0.5, example_inputs=example(), every=4, end=6)
    train(model, opt, sp, batches(8))
    assert [e.step for e in sp.events] == [4, 6] and sp.done


def test_a_run_that_ends_above_its_target_warns_with_how_far():
    model = tiny_gpt(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = EcoSpa(model, opt, 0.5, example_inputs=example(), every=5, total_steps=10, top_k=0.1)
    with pytest.warns(ecospa.EcospaWarning, match=r"above its target .* by [\d,]+ \([\d.]+% of the dense"):
        train(model, opt, sp, batches(10))
    assert not sp.done
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp.finish()  # warned once already
    # a run that reaches its target does not warn
    model = tiny_gpt(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = EcoSpa(model, opt, 0.5, example_inputs=example(), every=5, end=10, total_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, opt, sp, batches(10))
        assert sp.finish()["reached"]


def test_summary_reports_peak_and_mean_training_state_bytes():
    model = tiny_gpt(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = EcoSpa(model, opt, 0.5, example_inputs=example(), every=3, end=6)
    train(model, opt, sp, batches(12))
    s = sp.summary()["state_bytes"]
    fp32, tensors = 4, len(list(model.parameters()))

    def expected(n_params):  # weights + grads + AdamW exp_avg, exp_avg_sq (fp32) + a scalar step each
        return n_params * fp32 * 4 + tensors * fp32

    assert s["initial"] == s["peak"] == expected(sp.dense_params)  # at step 1, before any round
    assert s["final"] == expected(sp.num_params) == sp.state_bytes()
    assert s["final"] < s["mean"] < s["peak"] and s["final"] <= s["time_mean"] < s["peak"]
    assert "peak" in sp.report() and "mean" in sp.report()
    # the accounting survives a resume
    state = sp.state_dict()
    fresh = tiny_gpt(torch.float32)
    sp2 = EcoSpa(fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-3), 0.5, example_inputs=example(), every=3, end=6)
    sp2.load_state_dict(state)
    assert sp2.summary()["state_bytes"]["peak"] == s["peak"] and sp2.summary()["steps"] == 12
