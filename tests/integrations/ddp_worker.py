"""One rank of the DDP test (run by torchrun with the gloo backend), and the loop it shares with
the single-process reference: tiny GPT in float64, AdamW, EcoSpa without example inputs.

    torchrun --standalone --nproc_per_node=2 tests/integrations/ddp_worker.py OUT_DIR
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

STEPS, BATCH, SEQ = 14, 4, 8  # BATCH: rows of the combined batch


def build():
    from ecospa.recipes.nanogpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=SEQ, vocab_size=13)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    return model, opt


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 13, (BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def train(forward, opt, sp, xs, on_prune=None):
    """The loop of both runs: ``forward`` is the DDP wrapper or the plain model."""
    for x in xs:
        opt.zero_grad(set_to_none=True)
        logits = forward()(x[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1)).backward()
        opt.step()
        if sp.step() is not None and on_prune is not None:
            on_prune()


def snapshot(model, opt, sp) -> tuple[dict[str, torch.Tensor], dict]:
    """Parameters and optimizer moments by name, and the plan."""
    tensors = {}
    for n, p in model.named_parameters():
        tensors[f"param/{n}"] = p.detach().clone()
        for k, v in opt.state[p].items():
            if torch.is_tensor(v):
                tensors[f"{k}/{n}"] = v.detach().clone().reshape(v.shape)
    return tensors, sp.plan.to_dict()


def lightning_run(tensors: dict, rank: int):
    """Lightning's DDP strategy in the same processes (it reuses the initialised group):
    the callback re-wraps ``trainer.strategy.model`` after each prune. None without Lightning."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError:
            return None
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ecospa.integrations.lightning import EcoSpaLightningCallback

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = build()[0]

        def training_step(self, batch, batch_idx):
            (x,) = batch
            wrapper = self.trainer.strategy.model  # after a prune: the re-wrapped DDP
            current.append(isinstance(wrapper, DDP)
                           and {id(p) for p in wrapper.parameters()} == {id(p) for p in self.parameters()})
            return self.net.loss(x[:, :-1], x[:, 1:])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    current: list[bool] = []

    data = torch.utils.data.TensorDataset(torch.cat(batches()))
    cb = EcoSpaLightningCallback(0.5, module="net", every=3, top_k=0.5, theta=0.8)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=10, logger=False, callbacks=[cb],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    lit = Lit()
    trainer.fit(lit, torch.utils.data.DataLoader(data, batch_size=2))
    for n, p in lit.net.named_parameters():
        tensors[f"lightning/{n}"] = p.detach().clone()
    return {"plan": cb.sp.plan.to_dict(), "events": len(cb.sp.events),
            "ddp_holds_current_params": len(current) == 10 and all(current)}


def main(out: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel as DDP

    import ecospa
    from ecospa.integrations.ddp import ddp_settings, rewrap

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt = build()
    holder = {"ddp": DDP(model, bucket_cap_mb=1, gradient_as_bucket_view=True)}
    settings = []
    sp = ecospa.EcoSpa(holder["ddp"].module, opt, 0.5, every=3, top_k=0.5, theta=0.8)  # no example inputs
    per = BATCH // world
    xs = [x[rank * per:(rank + 1) * per] for x in batches()]

    def on_prune():
        holder["ddp"] = rewrap(holder["ddp"])
        settings.append({k: str(v) for k, v in ddp_settings(holder["ddp"]).items()})

    train(lambda: holder["ddp"], opt, sp, xs, on_prune)
    tensors, plan = snapshot(model, opt, sp)

    # without DDP each rank trains on its own gradients: EcoSpa's all-reduce of the statistics
    # and the first rank's removals still make every rank prune the same units
    local, local_opt = build()
    local_sp = ecospa.EcoSpa(local, local_opt, 0.5, every=3, top_k=0.5, theta=0.8)
    train(lambda: local, local_opt, local_sp, xs)
    lit = lightning_run(tensors, rank)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"plan": plan, "events": len(sp.events), "num_params": sp.num_params,
                   "recorded": sp.inputs is not None, "settings": settings,
                   "local_plan": local_sp.plan.to_dict(), "lightning": lit}, f)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, f"rank{rank}.safetensors"))
    dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
