"""The lockstep training loop: schedule, same batches for every run, hooks, EcoSpa as a hook."""
from __future__ import annotations

import pytest
import torch

from ecospa import ConfigError
from ecospa.recipes.nanogpt import GPT, GPTConfig
from ecospa.recipes.train import CharCorpus, Run, TrainConfig, ecospa_hook, train_interleaved

TEXT = "".join(chr(ord("a") + (i * 5) % 11) for i in range(3000))


def _setup(steps: int = 6):
    corpus = CharCorpus.from_text(TEXT)
    gcfg = GPTConfig(block_size=8, vocab_size=corpus.vocab_size, n_layer=1, n_head=2, n_embd=16)
    tcfg = TrainConfig(steps=steps, batch_size=4, block_size=8, warmup=2, eval_every=3, eval_windows=4,
                       final_eval_windows=8)
    return corpus, gcfg, tcfg


def test_learning_rate_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup=10, min_lr_ratio=0.1)
    assert cfg.lr_factor(0) == pytest.approx(0.1) and cfg.lr_factor(9) == pytest.approx(1.0)
    assert cfg.lr_factor(10) == pytest.approx(1.0) and cfg.lr_factor(100) == pytest.approx(0.1)
    assert cfg.lr_factor(55) == pytest.approx(0.55)  # half way down the cosine


@pytest.mark.parametrize("kw, bad", [({"steps": 0}, "0"), ({"lr": -1.0}, "-1.0"), ({"warmup": -2}, "-2")])
def test_bad_settings_name_the_value(kw, bad):
    with pytest.raises(ConfigError, match=bad):
        TrainConfig(**kw)


def test_runs_from_the_same_weights_stay_identical_in_lockstep():
    corpus, gcfg, tcfg = _setup()
    calls: list[int] = []

    def hook(model, opt):
        return lambda step: calls.append(step)

    torch.manual_seed(1)
    a = Run("a", GPT(gcfg), tcfg)
    torch.manual_seed(1)
    b = Run("b", GPT(gcfg), tcfg, hook)
    train_interleaved([a, b], corpus, tcfg, progress=False)
    assert calls == list(range(1, tcfg.steps + 1))
    assert [p.step for p in a.history] == [0, 3, 6] == [p.step for p in b.history]
    assert [p.val_loss for p in a.history] == [p.val_loss for p in b.history]
    assert a.final_val_loss == b.final_val_loss and a.last_loss == b.last_loss
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    s = a.summary()
    assert s["steps"] == tcfg.steps and s["train_seconds"] > 0 and s["hook"] is None


def test_run_names_must_differ():
    corpus, gcfg, tcfg = _setup()
    with pytest.raises(ConfigError, match="distinct"):
        train_interleaved([Run("x", GPT(gcfg), tcfg), Run("x", GPT(gcfg), tcfg)], corpus, tcfg, progress=False)


def test_ecospa_hook_prunes_to_its_target_and_reports_its_events():
    corpus, gcfg, tcfg = _setup(steps=12)
    example = (torch.zeros(1, gcfg.block_size, dtype=torch.long),)
    run = Run("ecospa", GPT(gcfg), tcfg, ecospa_hook(0.5, example, every=1, start=2, top_k=1.0, theta=0.5))
    dense = run.params()
    train_interleaved([run], corpus, tcfg, progress=False)
    info = run.summary()["hook"]
    assert info["reached"] and info["rounds"] == len(info["events"]) >= 1
    assert run.params() <= info["target_params"] < dense == info["dense_params"]
    assert run.param_trace[0] == (0, dense) and run.param_trace[-1][1] == run.params()
