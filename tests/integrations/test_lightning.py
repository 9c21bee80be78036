"""EcoSpaLightningCallback: a LightningModule around a plain nanoGPT (no example inputs: captured
from its first forward), pruning with Lightning's optimizer and LR scheduler, a checkpoint in the
middle of pruning and a resume that replays the plan before Lightning loads the weights."""
from __future__ import annotations

import json

import pytest
import torch

try:
    import lightning.pytorch as pl
except ImportError:
    pl = pytest.importorskip("pytorch_lightning", reason="needs lightning or pytorch-lightning")

from ecospa.integrations.lightning import EcoSpaLightningCallback  # noqa: E402
from ecospa.recipes.nanogpt import GPT, GPTConfig  # noqa: E402

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=13)


class LitGPT(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = GPT(CFG)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.net.loss(x[:, :-1], x[:, 1:])

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader():
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, CFG.vocab_size, (8, CFG.block_size + 1), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=2, shuffle=False)


def fit(tmp_path, cb, model, epochs, ckpt_path=None, accumulate=1):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4 // accumulate, save_top_k=-1,
                                        filename="{step}")
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=[cb, ckpt],
                         enable_progress_bar=False, enable_model_summary=False,
                         accumulate_grad_batches=accumulate, num_sanity_val_steps=0)
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return trainer


def params(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def test_lightning_prunes_and_resumes_mid_pruning(tmp_path):
    kw = dict(target=0.5, module="net", every=2, top_k=0.5, theta=0.8, end=1.0)  # schedule over the whole run
    model = LitGPT()
    dense = sum(p.numel() for p in model.parameters())
    cb = EcoSpaLightningCallback(**kw)
    trainer = fit(tmp_path, cb, model, epochs=2)
    assert len(cb.sp.events) >= 3 and cb.sp.num_params < dense
    assert cb.sp.inputs is not None  # captured from the first forward
    opt = trainer.optimizers[0]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    ckpt = tmp_path / "step=4.ckpt"
    entry = torch.load(ckpt, weights_only=True, mmap=True)["callbacks"][cb.state_key]
    steps_at_4 = json.loads(entry["json"])["plan"]["steps"]
    assert steps_at_4 and len(steps_at_4) < len(cb.sp.plan.steps), "checkpoint should be mid-pruning"

    fresh = LitGPT()  # dense: the callback replays step 4's plan in setup
    cb2 = EcoSpaLightningCallback(**kw)
    fit(tmp_path / "resumed", cb2, fresh, epochs=2, ckpt_path=str(ckpt))
    assert cb2.sp.plan == cb.sp.plan and cb2.sp.steps == cb.sp.steps
    want, got = params(model), params(fresh)
    diff = max(float((want[n] - got[n]).abs().max()) for n in want)
    print(f"max abs diff resumed vs uninterrupted: {diff:.3e}")
    assert diff < 1e-5


def test_gradient_accumulation_steps_once_per_optimizer_step(tmp_path):
    cb = EcoSpaLightningCallback(target=0.5, module="net", every=1000)
    fit(tmp_path, cb, LitGPT(), epochs=1, accumulate=2)
    assert cb.sp.steps == 2  # 4 batches, 2 optimizer steps


def test_max_steps_sets_the_schedule(tmp_path):
    """max_epochs=2 over 4 batches: Lightning's estimated 8 steps, the target by step 4."""
    cb = EcoSpaLightningCallback(target=0.5, module="net", every=2)
    fit(tmp_path, cb, LitGPT(), epochs=2)
    assert cb.sp.config.total_steps == 8 and cb.sp.config.end_step == 4
    assert cb.sp.done and max(e.step for e in cb.sp.events) <= 4


def test_export_to_writes_the_pruned_transformers_module_at_the_end_of_fit(tmp_path):
    transformers = pytest.importorskip("transformers")

    class LitHF(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=CFG.vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=16))

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return self.net(input_ids=x, labels=x).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    lit = LitHF()
    cb = EcoSpaLightningCallback(target=0.7, module="net", every=1, top_k=1.0, exportable=True, end=None,
                                 export_to=tmp_path / "deploy")
    fit(tmp_path, cb, lit, epochs=2)
    r = cb.export_report
    assert cb.sp.events and r.params == r.pruned_params < r.dense_params and r.overhead == 0.0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "deploy").eval()
    x = loader().dataset.tensors[0][:2]
    lit.net.eval()
    with torch.no_grad():
        want, got = lit.net(input_ids=x).logits, loaded(input_ids=x).logits
    assert float((got - want).norm() / want.norm()) <= 1e-5
