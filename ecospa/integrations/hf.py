"""EcoSpa in ``transformers.Trainer``: one callback.

    from ecospa.integrations.hf import EcoSpaCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[EcoSpaCallback(target=0.5, every=100)])
    trainer.train()                       # and later: trainer.train(resume_from_checkpoint=True)

What it does, at the Trainer's events:

- ``on_train_begin``: builds an :class:`ecospa.EcoSpa` on the Trainer's model and the torch
  optimizer inside the Trainer's optimizer (accelerate wraps it in an ``AcceleratedOptimizer``);
- ``on_optimizer_step`` (after ``optimizer.step()``, before the scheduler step and
  ``zero_grad``, once per optimizer step whatever the gradient accumulation): ``sp.step()``.
  The optimizer is looked up again at every step: if the Trainer (or a callback, or the user)
  has rebuilt it, EcoSpa follows the new one. A prune slices the same optimizer object in place,
  so the Trainer's LR scheduler, which holds that optimizer, keeps working;
- ``on_epoch_end``: ``sp.end_epoch()`` (for ``every="epoch"``);
- the schedule: at ``on_train_begin`` the callback reads the Trainer's ``max_steps`` (known by then,
  also for ``num_train_epochs``) and gives EcoSpa ``total_steps`` and ``end``: by default the
  target is reached halfway between ``start`` and the last step, on the cubic schedule
  (``end=`` a step or a fraction of the run changes it; ``end=None`` keeps Algorithm 1's own
  pace, which may end above the target); ``on_train_end`` calls ``sp.finish()``, which warns
  (:class:`ecospa.EcospaWarning`) when the model ended above its target and logs
  ``sp.report()`` (rounds, sizes, peak and mean training-state bytes);
- ``export_to="dir"``: at ``on_train_end`` (after ``sp.finish()``), on the main process only,
  ``ecospa.export(model, dir, tokenizer)`` writes the pruned model as a standard transformers
  checkpoint that loads without ecospa (the tokenizer is the Trainer's ``processing_class``
  when it has ``save_pretrained``; ``export_options={...}``: more keywords of ``ecospa.export``,
  e.g. ``gguf=True``); the report is ``callback.export_report``. With ``exportable=True`` (a
  :class:`ecospa.PlanConfig` knob) the export is exactly as small as the pruned model;
- ``on_save``: writes ``ecospa_state.json`` + ``ecospa_state.safetensors`` (plan, counters,
  Eq. 6 statistics; no pickle) into the checkpoint folder the Trainer has just written.

**Resume.** The Trainer saves the pruned model's ``state_dict`` (smaller shapes), and on
``trainer.train(resume_from_checkpoint=...)`` loads it into the freshly built dense model before
any callback event. So at ``on_init_end`` the callback puts a ``load_state_dict`` pre-hook on the
model: when a state dict with other shapes arrives, it finds the checkpoint's saved EcoSpa state
(``resume_from=`` if given, else ``args.resume_from_checkpoint``, else the checkpoints of
``args.output_dir`` whose saved shapes match the incoming ones), replays the saved plan on the
dense model (and restores the counters and statistics), and the Trainer's own loading proceeds
on the pruned shapes; the optimizer and scheduler states it loads next fit too. At
``on_train_begin`` the statistics of ``checkpoint-<global_step>`` are loaded if the pre-hook
picked another checkpoint with the same plan.

Not supported yet: multi-process Trainer runs (DDP/FSDP/DeepSpeed through accelerate: the
Trainer's wrapped model is not reachable from a callback; use the plain loop with
``ecospa.integrations.ddp.rewrap``, docs/distributed.md), ``load_best_model_at_end`` with a best
checkpoint from an earlier pruning stage (its shapes differ from the model's), and hyperparameter
search with ``model_init`` after a prune.
"""
from __future__ import annotations

import glob
import logging
import os
import re

import torch.nn as nn
from transformers import TrainerCallback

from ecospa.training.sparse import EcoSpa
from ecospa.errors import ConfigError, EcospaError
from ecospa.integrations._common import DEFAULT_END, attach_optimizer, export_at_end, schedule_run
from ecospa.integrations._state import load_state, read_json, save_state

__all__ = ["EcoSpaCallback"]

log = logging.getLogger("ecospa")

_CKPT = re.compile(r"checkpoint-(\d+)$")


class EcoSpaCallback(TrainerCallback):
    """Prune the Trainer's model during training with EcoSpa (Algorithm 1).

    Args:
        target: as :class:`ecospa.EcoSpa` (parameter count, or fraction of the prunable ones).
        example_inputs: as :class:`ecospa.EcoSpa` (Hugging Face models carry dummy inputs; other
            models are captured from the inputs of their first forward).
        resume_from: a checkpoint folder whose EcoSpa state to restore when the Trainer loads a
            pruned state dict (default: found automatically, see the module docstring).
        export_to: a folder: at the end of training the model is written there with
            :func:`ecospa.export` (main process only); None: no export.
        export_options: more keyword arguments of :func:`ecospa.export` (``gguf``, ``inputs``,
            ``save_kwargs``).
        **knobs: :class:`ecospa.PlanConfig` fields (``every``, ``top_k``, ``theta``, ...) and
            other :class:`ecospa.EcoSpa` keywords. ``end``: the step (int) or fraction of the run
            (float) at which the target is reached, on the cubic schedule (default: halfway
            between ``start`` and ``max_steps``; None: no schedule); ``total_steps``: default
            the Trainer's ``max_steps``.

    Attributes:
        sp: the :class:`ecospa.EcoSpa` (None before training starts): ``sp.events``, ``sp.plan``.
        export_report: the :class:`ecospa.ExportReport` of ``export_to`` (None before).
    """

    def __init__(self, target: int | float | None = 0.5, *, example_inputs=None, resume_from: str | None = None,
                 export_to: str | os.PathLike | None = None, export_options: dict | None = None, **knobs):
        self.export_to, self.export_options = export_to, dict(export_options or {})
        self.export_report = None
        self.end = knobs.pop("end", DEFAULT_END)
        self.total_steps = knobs.pop("total_steps", None)
        self.target, self.example_inputs, self.resume_from, self.knobs = target, example_inputs, resume_from, knobs
        self.sp: EcoSpa | None = None
        self.model: nn.Module | None = None
        self._output_dir: str | None = None
        self._args_resume: str | None = None
        self._hook = None
        self._restored_step: int | None = None

    # ---------------------------------------------------------------- building
    def _build(self, model: nn.Module, optimizer=None) -> EcoSpa:
        sp = EcoSpa(model, None, self.target, example_inputs=self.example_inputs, **self.knobs)
        attach_optimizer(sp, optimizer)
        return sp

    def _bind(self, model: nn.Module) -> None:
        if model is self.model:
            return
        if self._hook is not None:
            self._hook.remove()
        self.model = model
        self._hook = model.register_load_state_dict_pre_hook(self._before_load)

    # ---------------------------------------------------------------- events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._output_dir = args.output_dir
        resume = getattr(args, "resume_from_checkpoint", None)
        self._args_resume = resume if isinstance(resume, str) else None
        if model is not None:
            self._bind(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "world_size", 1) > 1:
            raise ConfigError("EcoSpaCallback does not support multi-process Trainer runs yet (the Trainer's "
                              "DDP/FSDP wrapper would keep the parameters from before a prune); see "
                              "docs/distributed.md for the plain-loop DDP recipe")
        self._output_dir = args.output_dir
        self._bind(model)
        if self.sp is not None and self.sp.model is not model:
            if self.sp.plan.steps:
                raise EcospaError("the Trainer's model was replaced after EcoSpa pruned the previous one")
            self.sp = None
        if self.sp is None:
            self.sp = self._build(model, optimizer)
        else:
            attach_optimizer(self.sp, optimizer)
        if state.global_step > 0 and self._restored_step != state.global_step:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if read_json(folder) is not None:
                self.sp.load_state_dict(load_state(folder))  # same plan: counters and statistics
                self._restored_step = state.global_step
        schedule_run(self.sp, self.end, self.total_steps, state.max_steps, state.global_step)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.sp is None:
            self.sp = self._build(model, optimizer)
            schedule_run(self.sp, self.end, self.total_steps, state.max_steps, state.global_step)
        attach_optimizer(self.sp, optimizer)
        self.sp.step()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.sp is not None:
            self.sp.end_epoch()

    def on_save(self, args, state, control, **kwargs):
        if self.sp is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            log.warning("ecospa: checkpoint folder %s not found; EcoSpa's state was not saved", folder)
            return
        save_state(self.sp, folder, extra={"global_step": int(state.global_step)})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.sp is not None and self.sp.ready:
            self.sp.finish()  # warns when the model ended above its target
            log.info("%s", self.sp.report())
        if self.export_to is not None and state.is_world_process_zero:
            model = model if model is not None else (self.sp.model if self.sp is not None else self.model)
            tok = kwargs.get("processing_class") or kwargs.get("tokenizer")
            tok = tok if hasattr(tok, "save_pretrained") else None
            self.export_report = export_at_end(model, self.export_to, tok, self.export_options)

    # ---------------------------------------------------------------- resume
    def _candidates(self) -> list[str]:
        out = [p for p in (self.resume_from, self._args_resume) if p]
        if self._output_dir and os.path.isdir(self._output_dir):
            found = [d for d in glob.glob(os.path.join(self._output_dir, "checkpoint-*"))
                     if _CKPT.search(d) and os.path.isdir(d)]
            out += sorted(found, key=lambda d: -int(_CKPT.search(d).group(1)))
        return out

    def _before_load(self, module, state_dict, prefix, local_metadata, strict, missing_keys,
                     unexpected_keys, error_msgs) -> None:
        """``load_state_dict`` pre-hook: prune the dense model the way the checkpoint was pruned."""
        if prefix:
            return
        params = dict(module.named_parameters())
        differ = {k: tuple(v.shape) for k, v in state_dict.items()
                  if k in params and tuple(v.shape) != tuple(params[k].shape)}
        if not differ:
            return
        if self.sp is not None and self.sp.plan.steps:
            raise EcospaError(
                f"loading weights of other shapes ({len(differ)} parameters, e.g. {next(iter(differ))}) into a "
                "model EcoSpa has already pruned: a checkpoint from another pruning stage (for example "
                "load_best_model_at_end with an earlier best checkpoint) cannot be loaded into it")
        chosen = None
        for folder in self._candidates():
            data = read_json(folder)
            if data is None:
                continue
            shapes = {k: tuple(v) for k, v in data.get("shapes", {}).items()}
            if all(shapes.get(k) == s for k, s in differ.items()):
                chosen = folder
                break
        if chosen is None:
            raise EcospaError(
                f"the weights being loaded are pruned ({len(differ)} parameters have other shapes, e.g. "
                f"{next(iter(differ))}) and no saved EcoSpa state matches them: pass "
                "EcoSpaCallback(resume_from='<checkpoint folder>') with a folder holding ecospa_state.json")
        log.info("ecospa: replaying the pruning plan of %s before loading its weights", chosen)
        state = load_state(chosen)
        sp = self._build(module) if self.sp is None else self.sp
        sp.load_state_dict(state)
        self.sp = sp
        m = _CKPT.search(os.path.normpath(chosen))
        self._restored_step = int(m.group(1)) if m else None
