"""EcoSpa in (PyTorch) Lightning: one callback.

    from ecospa.integrations.lightning import EcoSpaLightningCallback
    trainer = L.Trainer(max_steps=1000, callbacks=[EcoSpaLightningCallback(target=0.5, every=100, module="model")])
    trainer.fit(lit_module)               # and later: trainer.fit(lit_module, ckpt_path="last")

``module`` names the submodule to prune (``"model"`` for ``self.model = GPT2LMHeadModel(...)``;
default: the LightningModule itself, whose ``forward`` must then run the network). What it
does, at Lightning's hooks:

- ``on_before_optimizer_step`` marks that an optimizer step happens (once per step, after
  gradient accumulation); ``on_train_batch_end`` then calls ``sp.step()``, after
  ``optimizer.step()`` and before the next ``zero_grad``. The optimizer is the one in
  ``trainer.optimizers`` that holds the module's parameters, looked up at every step, so an
  optimizer rebuilt by the user or the strategy is followed; LR schedulers keep working (the
  same optimizer object is sliced in place);
- under Lightning's DDP strategy, after a round that pruned, ``trainer.strategy.model`` is
  wrapped again (:func:`ecospa.integrations.ddp.rewrap`); EcoSpa averages its statistics over
  the ranks (docs/distributed.md);
- ``on_train_epoch_end``: ``sp.end_epoch()`` (for ``every="epoch"``);
- the schedule: at ``on_train_start`` the callback reads ``trainer.max_steps`` (or, when it is
  -1, ``trainer.estimated_stepping_batches``) and gives EcoSpa ``total_steps`` and ``end``: by
  default the target is reached halfway between ``start`` and the last step, on the cubic
  schedule (``end=`` a step or a fraction of the run; ``end=None``: Algorithm 1's own pace);
  ``on_train_end`` calls ``sp.finish()``, which warns (:class:`ecospa.EcospaWarning`) when the
  module ended above its target, and logs ``sp.report()``;
- ``export_to="dir"``: at ``on_train_end`` (after ``sp.finish()``), on global rank 0 only,
  ``ecospa.export(module, dir, tokenizer)`` writes the pruned (transformers) module as a standard
  checkpoint that loads without ecospa (``tokenizer=``, ``export_options={...}``: more keywords
  of ``ecospa.export``); the report is ``callback.export_report``;
- ``state_dict``: the plan, counters and statistics go into Lightning's checkpoint (JSON text
  and tensors only, loadable with ``weights_only=True``);
- **resume**: Lightning loads the checkpoint's (pruned) weights into the module before any
  callback sees its state, so the callback puts a ``load_state_dict`` pre-hook on the
  LightningModule in ``setup``: when weights of other shapes arrive, it reads its own entry from
  the checkpoint (``trainer.ckpt_path``, memory-mapped) and replays the plan on the dense module
  first; Lightning then loads the weights, the optimizer and scheduler states.

Not supported yet: strategies that restore checkpoints after setup (FSDP, DeepSpeed), several
optimizers over the pruned module, and ``ModelCheckpoint(save_weights_only=True)`` checkpoints
for resuming (they carry no callback state).
"""
from __future__ import annotations

import json
import logging

import torch
import torch.nn as nn

from ecospa.training.sparse import EcoSpa
from ecospa.errors import EcospaError
from ecospa.integrations._common import DEFAULT_END, attach_optimizer, export_at_end, optimizer_for, schedule_run
from ecospa.integrations._state import state_from_files, state_to_files

try:  # the unified package first, then the standalone one
    import lightning.pytorch as _pl
except ImportError:  # pragma: no cover - depends on what is installed
    import pytorch_lightning as _pl

__all__ = ["EcoSpaLightningCallback", "make_callback_class"]

log = logging.getLogger("ecospa")


def _read_checkpoint(path) -> dict:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # a checkpoint with other objects: load it the way Lightning will anyway
        try:
            from lightning.fabric.utilities.cloud_io import _load
        except ImportError:
            from lightning_fabric.utilities.cloud_io import _load
        return _load(path, map_location="cpu", weights_only=False)


def make_callback_class(base: type) -> type:
    """The callback class on ``base`` (``lightning.pytorch.Callback`` or
    ``pytorch_lightning.Callback``): for environments that have both packages."""

    class EcoSpaLightningCallback(base):
        """Prune a LightningModule (or its submodule ``module``) during ``fit`` with EcoSpa.

        Args:
            target: as :class:`ecospa.EcoSpa`.
            module: attribute path of the submodule to prune; None: the LightningModule.
            example_inputs: as :class:`ecospa.EcoSpa` (else: the inputs of the first forward).
            export_to: a folder: at the end of ``fit`` the module (a transformers model) is
                written there with :func:`ecospa.export`, on global rank 0 only; None: no export.
            tokenizer: saved into ``export_to`` too; export_options: more keywords of
                :func:`ecospa.export` (``gguf``, ``inputs``, ``save_kwargs``).
            **knobs: :class:`ecospa.PlanConfig` fields and other :class:`ecospa.EcoSpa` keywords.
                ``end``: the step (int) or fraction of the run (float) at which the target is
                reached, on the cubic schedule (default: halfway between ``start`` and the
                trainer's last step; None: no schedule); ``total_steps``: default the trainer's.

        Attributes:
            sp: the :class:`ecospa.EcoSpa` (None before ``fit``).
            export_report: the :class:`ecospa.ExportReport` of ``export_to`` (None before).
        """

        def __init__(self, target: int | float | None = 0.5, *, module: str | None = None,
                     example_inputs=None, export_to=None, tokenizer=None, export_options: dict | None = None,
                     **knobs):
            super().__init__()
            self.export_to, self.tokenizer, self.export_options = export_to, tokenizer, dict(export_options or {})
            self.export_report = None
            self.end = knobs.pop("end", DEFAULT_END)
            self.total_steps = knobs.pop("total_steps", None)
            self._max_steps: int | None = None  # known at on_train_start
            self._global_step = 0
            self.target, self.module_path, self.example_inputs, self.knobs = target, module, example_inputs, knobs
            self.sp: EcoSpa | None = None
            self._stepped = False
            self._trainer = None
            self._hook = None

        @property
        def state_key(self) -> str:
            return "EcoSpaLightningCallback" + (f"[{self.module_path}]" if self.module_path else "")

        def _module(self, pl_module) -> nn.Module:
            return pl_module.get_submodule(self.module_path) if self.module_path else pl_module

        def _ensure(self, pl_module) -> EcoSpa:
            module = self._module(pl_module)
            if self.sp is not None and self.sp.model is not module:
                if self.sp.plan.steps:
                    raise EcospaError("the pruned module was replaced after EcoSpa pruned it")
                self.sp = None
            if self.sp is None:
                self.sp = EcoSpa(module, None, self.target, example_inputs=self.example_inputs, **self.knobs)
                if self._max_steps is not None:
                    schedule_run(self.sp, self.end, self.total_steps, self._max_steps, self._global_step)
            return self.sp

        @staticmethod
        def _run_steps(trainer) -> int:
            """The trainer's optimizer steps in this fit (0 when unknown or endless)."""
            steps = getattr(trainer, "max_steps", -1)
            if steps is None or steps < 0:
                try:
                    steps = trainer.estimated_stepping_batches
                except Exception:  # noqa: BLE001 - no estimate: no schedule
                    return 0
            return int(steps) if steps is not None and steps == steps and steps != float("inf") else 0

        def on_train_start(self, trainer, pl_module) -> None:
            sp = self._ensure(pl_module)
            self._max_steps, self._global_step = self._run_steps(trainer), int(trainer.global_step)
            schedule_run(sp, self.end, self.total_steps, self._max_steps, self._global_step)

        def on_train_end(self, trainer, pl_module) -> None:
            if self.sp is not None and self.sp.ready:
                self.sp.finish()  # warns when the module ended above its target
                log.info("%s", self.sp.report())
            if self.export_to is not None and getattr(trainer, "is_global_zero", True):
                self.export_report = export_at_end(self._module(pl_module), self.export_to, self.tokenizer,
                                                   self.export_options)

        # ------------------------------------------------------------ hooks
        def setup(self, trainer, pl_module, stage: str) -> None:
            if stage != "fit":
                return
            self._ensure(pl_module)
            self._trainer = trainer
            if self._hook is not None:
                self._hook.remove()
            self._hook = pl_module.register_load_state_dict_pre_hook(self._before_load)

        def _before_load(self, module, state_dict, prefix, *args) -> None:
            """``load_state_dict`` pre-hook on the LightningModule: when Lightning restores pruned
            weights (``trainer.ckpt_path`` is known by then), replay the checkpoint's plan first."""
            if prefix or self.sp is None:
                return
            params = dict(module.named_parameters())
            differ = [k for k, v in state_dict.items() if k in params and tuple(v.shape) != tuple(params[k].shape)]
            if not differ or self.sp.plan.steps:
                return
            path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
            entry = _read_checkpoint(path).get("callbacks", {}).get(self.state_key) if path else None
            if entry is None:
                raise EcospaError(f"the weights being loaded are pruned ({differ[0]} and {len(differ) - 1} more "
                                  f"have other shapes) but the checkpoint {path!r} has no {self.state_key} state")
            log.info("ecospa: replaying the pruning plan of %s before Lightning loads its weights", path)
            self.sp.load_state_dict(state_from_files(json.loads(entry["json"]), entry["tensors"]))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self._stepped = True

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if not self._stepped:  # gradient accumulation: no optimizer step on this batch
                return
            self._stepped = False
            sp = self._ensure(pl_module)
            opt = optimizer_for(sp.model, trainer.optimizers)
            if opt is not None:
                attach_optimizer(sp, opt)
            if sp.step() is not None:
                self._rewrap(trainer)

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if self.sp is not None and self.sp.end_epoch() is not None:
                self._rewrap(trainer)

        @staticmethod
        def _rewrap(trainer) -> None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            from ecospa.integrations.ddp import rewrap

            strategy = trainer.strategy
            if isinstance(getattr(strategy, "model", None), DDP):
                strategy.model = rewrap(strategy.model)

        def state_dict(self) -> dict:
            if self.sp is None:
                return {}
            data, tensors = state_to_files(self.sp.state_dict(),
                                           {n: tuple(p.shape) for n, p in self.sp.model.named_parameters()})
            return {"json": json.dumps(data), "tensors": tensors}

        def load_state_dict(self, state_dict: dict) -> None:
            if not state_dict:
                return
            state = state_from_files(json.loads(state_dict["json"]), state_dict["tensors"])
            if self.sp is None:
                raise EcospaError("EcoSpaLightningCallback state arrived before setup(); resume with trainer.fit")
            self.sp.load_state_dict(state)  # plan already replayed in setup: counters and statistics

    EcoSpaLightningCallback.__qualname__ = "EcoSpaLightningCallback"
    EcoSpaLightningCallback.__module__ = __name__
    return EcoSpaLightningCallback


EcoSpaLightningCallback = make_callback_class(_pl.Callback)
