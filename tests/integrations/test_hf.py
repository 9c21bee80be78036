"""EcoSpaCallback in transformers.Trainer: tiny GPT-2 and Llama configs, CPU, a few steps, no
downloads; pruning with the Trainer's (accelerate-wrapped) optimizer, a rebuilt optimizer, and a
checkpoint save + resume in the middle of pruning."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from ecospa.integrations._state import STATE_JSON, STATE_TENSORS  # noqa: E402
from ecospa.integrations.hf import EcoSpaCallback  # noqa: E402

SEQ, VOCAB = 12, 50


def gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=SEQ,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                   max_position_embeddings=SEQ)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


class PlainLM(torch.nn.Module):
    """A model without dummy inputs: EcoSpa captures it from its first forward, and the saved
    state carries those inputs so that a resumed run can replay the plan before any forward."""

    def __init__(self):
        super().__init__()
        from ecospa.recipes.nanogpt import GPT, GPTConfig

        torch.manual_seed(0)
        self.gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=SEQ, vocab_size=VOCAB))
        # untied: the Trainer saves plain modules with safetensors, which refuses shared tensors
        self.gpt.lm_head.weight = torch.nn.Parameter(self.gpt.lm_head.weight.detach().clone())

    def forward(self, input_ids, labels=None):
        logits = self.gpt(input_ids)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return out


def dataset(n=32):
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": r, "labels": r} for r in rows]


def trainer(model, out, cb, max_steps=8, **kw):
    settings = dict(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=3e-3,
                    save_strategy="steps", save_steps=4, logging_strategy="no", report_to=[], use_cpu=True,
                    disable_tqdm=True, seed=0, dataloader_num_workers=0)
    args = transformers.TrainingArguments(**{**settings, **kw})
    return transformers.Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[cb])


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_optimizer_follows(model, opt):
    inner = getattr(opt, "optimizer", opt)
    held = {id(p) for g in inner.param_groups for p in g["params"]}
    assert all(id(p) in held for p in model.parameters())
    for p in model.parameters():
        for v in inner.state.get(p, {}).values():
            assert not torch.is_tensor(v) or v.dim() == 0 or v.shape == p.shape


def test_trainer_prunes_llama_with_its_own_optimizer(tmp_path):  # GPT-2: the resume test below
    model = llama()
    dense = sum(p.numel() for p in model.parameters())
    cb = EcoSpaCallback(target=0.6, every=2, top_k=0.5, theta=0.8)
    t = trainer(model, tmp_path, cb)
    t.train()
    assert len(cb.sp.events) >= 2 and cb.sp.num_params < dense
    assert type(t.optimizer).__name__ == "AcceleratedOptimizer"  # what the callback unwrapped
    assert_optimizer_follows(model, t.optimizer)
    ckpt = tmp_path / "checkpoint-4"
    assert (ckpt / STATE_JSON).is_file() and (ckpt / STATE_TENSORS).is_file()
    saved = json.loads((ckpt / STATE_JSON).read_text())
    assert saved["extra"]["global_step"] == 4 and saved["plan"]["steps"]
    out = model(input_ids=dataset(1)[0]["input_ids"][None])
    assert torch.isfinite(out.logits).all()


def test_rebuilt_optimizer_is_followed(tmp_path):
    model = gpt2()
    cb = EcoSpaCallback(target=0.5, every=2, top_k=0.5, theta=0.8, end=None)  # Algorithm 1's pace: not done at 4
    t = trainer(model, tmp_path, cb, max_steps=4, save_strategy="no")
    t.train()
    first_opt, rounds = cb.sp.optimizer, len(cb.sp.events)
    assert rounds >= 1
    t.optimizer, t.lr_scheduler = None, None  # the Trainer builds new ones on the pruned model
    t.train()
    assert cb.sp.optimizer is not first_opt and len(cb.sp.events) > rounds
    assert_optimizer_follows(model, t.optimizer)


@pytest.mark.slow
@pytest.mark.parametrize("build", [gpt2, PlainLM], ids=["gpt2", "plain_module"])
def test_resume_mid_pruning_replays_the_plan_and_matches(build, tmp_path):
    kw = dict(target=0.5, every=2, top_k=0.5, theta=0.8, end=1.0)  # the schedule ends at the last step
    model = build()
    dense = sum(p.numel() for p in model.parameters())
    cb = EcoSpaCallback(**kw)
    t = trainer(model, tmp_path / "a", cb)
    t.train()
    assert len(cb.sp.events) >= 2 and cb.sp.num_params < dense
    assert type(t.optimizer).__name__ == "AcceleratedOptimizer"  # what the callback unwrapped
    assert_optimizer_follows(model, t.optimizer)
    assert (tmp_path / "a" / "checkpoint-4" / STATE_TENSORS).is_file()
    at4 = json.loads((tmp_path / "a" / "checkpoint-4" / STATE_JSON).read_text())
    assert at4["plan"]["steps"] and len(at4["plan"]["steps"]) < len(cb.sp.plan.steps), \
        "the checkpoint should be taken in the middle of pruning"
    ckpt = tmp_path / "a" / "checkpoint-4"
    fresh = build()  # dense: the callback's load hook replays checkpoint-4's plan before its weights
    cb2 = EcoSpaCallback(**kw)
    t2 = trainer(fresh, tmp_path / "a", cb2)
    t2.train(resume_from_checkpoint=str(ckpt))
    assert cb2.sp.plan == cb.sp.plan
    assert cb2.sp.steps == cb.sp.steps
    want, got = params(model), params(fresh)
    assert {n: p.shape for n, p in want.items()} == {n: p.shape for n, p in got.items()}
    diff = max(float((want[n] - got[n]).abs().max()) for n in want)
    print(f"max abs diff resumed vs uninterrupted: {diff:.3e}")
    assert diff < 1e-5, diff


def test_the_trainers_max_steps_sets_the_schedule_and_a_short_run_warns(tmp_path):
    """target=0.5, every=5 over 30 steps: the callback reads max_steps and reaches the target by
    step 15 (halfway); with end=None (Algorithm 1's own pace) the run ends above the target and
    says so with an EcospaWarning."""
    import ecospa

    model = gpt2()
    cb = EcoSpaCallback(target=0.5, every=5)
    trainer(model, tmp_path / "a", cb, max_steps=30, save_strategy="no").train()
    assert cb.sp.config.total_steps == 30 and cb.sp.config.end_step == 15
    assert cb.sp.done and max(e.step for e in cb.sp.events) <= 15
    assert cb.sp.summary()["state_bytes"]["mean"] < cb.sp.summary()["state_bytes"]["peak"]
    model = gpt2()
    cb = EcoSpaCallback(target=0.5, every=5, end=None, top_k=0.1)
    with pytest.warns(ecospa.EcospaWarning, match="above its target"):
        trainer(model, tmp_path / "b", cb, max_steps=10, save_strategy="no").train()
    assert not cb.sp.done


def test_export_to_writes_a_checkpoint_that_transformers_loads_at_the_end_of_training(tmp_path):
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    cb = EcoSpaCallback(target=0.6, every=2, top_k=1.0, exportable=True, export_to=tmp_path / "deploy")
    trainer(model, tmp_path / "run", cb, save_strategy="no").train()
    r = cb.export_report
    assert cb.sp.events and r.params == r.pruned_params < r.dense_params and r.overhead == 0.0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "deploy").eval()
    x = dataset(1)[0]["input_ids"][None]
    model.eval()
    with torch.no_grad():
        want, got = model(input_ids=x).logits, loaded(input_ids=x).logits
    assert float((got - want).norm() / want.norm()) <= 1e-5
