"""EcoSpa in a plain PyTorch training loop: three added lines.

    sp = ecospa.EcoSpa(model, optimizer, target=0.5, every=200)  # couplings from the first forward
    for x, y in loader:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sp.step()                       # accumulates Eq. 6; every N steps, prunes

``sp.step()`` reads ``.grad``: call it **once per optimizer step**, after the last
``backward()`` of the step. It may go before or after ``optimizer.step()``: the executor slices
the parameters, their gradients and the optimizer state (Adam ``exp_avg``/``exp_avg_sq``, SGD
``momentum_buffer``, anything shaped like the parameter), and the same optimizer object keeps
training the same (now smaller) parameters under the same names. So:

- **gradient accumulation**: several ``backward()`` per optimizer step, one ``sp.step()``
  (Eq. 6's ``|D|`` counts optimizer steps, each with the summed gradient);
- **gradient clipping**: clip before or after, Eq. 6 sees whatever ``.grad`` holds;
- **AMP**: bf16 autocast needs nothing; with an fp16 ``GradScaler`` call ``sp.step()`` after
  ``scaler.unscale_(optimizer)`` so the statistics are not scaled;
- **LR schedulers** hold the optimizer, whose param groups stay valid: nothing to do;
- **DDP** (torchrun): give EcoSpa ``ddp.module``; it averages its statistics over the ranks so
  they all prune alike; after a round that pruned, ``ddp = ecospa.integrations.ddp.rewrap(ddp)``
  (docs/distributed.md). Trainer callbacks: ``ecospa.integrations`` (docs/integrations.md).

Each pruning round is a :class:`PruneEvent` appended to ``sp.events`` and logged at INFO level
on the ``"ecospa"`` logger; ``sp.plan`` is the :class:`~ecospa.schedule.planner.Plan` so far.

**When the target is reached.** Without ``end``, every ``every`` steps from ``start`` a round
removes what Algorithm 1 selects (``top_k`` couplings, ``theta`` of their unit mass) until the
target: how many steps that takes depends on the model and the knobs. With ``end`` (a step, or
a fraction of ``total_steps``) the rounds follow the cubic gradual-pruning schedule
(``planner.schedule_target``): the model has ``target + (dense - target) * (1 - (t - start) /
(end - start))^3`` parameters after the round at step ``t``, reaching the target at ``end`` (a
round runs at ``end`` too); the first rounds remove the most, so most steps run on the small
model. ``sp.summary()`` reports the peak and mean bytes of weights + gradients + optimizer state
measured at every step, and a run that reaches ``total_steps`` (or ``sp.finish()``) above its
target warns (:class:`~ecospa.EcospaWarning`) with how far::

    sp = ecospa.EcoSpa(model, opt, target=0.5, every=50, end=0.5, total_steps=len(loader))
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Iterable

import torch
import torch.nn as nn

from ecospa.analysis.auto_couple import auto_couple
from ecospa.training.distributed import broadcast_json, dist_group
from ecospa.pruning.apply import check_optimizer, prune_pass, resolve
from ecospa.training.first_forward import as_example, detached
from ecospa.scoring.importance import Importance
from ecospa.scoring.scores import needed_stats
from ecospa.schedule.planner import Plan, PlanConfig, PlanStep, plan_round, resolve_target, schedule_target
from ecospa.schedule.exportable import check_exportable_target, exportable_rules
from ecospa.errors import ConfigError, EcospaError, EcospaWarning
from ecospa.capture.sharded import refuse_sharded
from ecospa.capture.export import default_inputs
from ecospa.ir.coupling import CouplingGraph

__all__ = ["EcoSpa", "PruneEvent"]

log = logging.getLogger("ecospa")


@dataclass(frozen=True)
class PruneEvent:
    """One pruning round: at which step, what went, and the model size before and after."""

    step: int
    removals: dict[str, tuple[int, ...]]
    params_before: int
    params_after: int
    seconds: float

    @property
    def units_removed(self) -> int:
        """Number of units removed in this round, over every coupling."""
        return sum(len(v) for v in self.removals.values())

    def __str__(self) -> str:
        names = sorted(self.removals)
        shown = ", ".join(f"{n}:-{len(self.removals[n])}" for n in names[:6])
        more = f", ... (+{len(names) - 6} couplings)" if len(names) > 6 else ""
        return (f"step {self.step}: removed {self.units_removed} units from {len(names)} couplings "
                f"({shown}{more}); params {self.params_before} -> {self.params_after} "
                f"({self.seconds * 1e3:.0f} ms)")


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


_LAZY = frozenset({"couplings", "importance", "target_params", "dense_widths"})


def _check_arguments(model, optimizer, config, verify) -> None:
    """ConfigError for arguments of the wrong type (before anything else happens)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"EcoSpa's model should be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not (hasattr(optimizer, "param_groups") and hasattr(optimizer, "state")):
        raise ConfigError(f"EcoSpa's optimizer should be a torch.optim.Optimizer built on model.parameters() "
                          f"(or None), got {type(optimizer).__name__}")
    if config is not None and not isinstance(config, PlanConfig):
        raise ConfigError(f"config should be an ecospa.PlanConfig, got {type(config).__name__}; pass the "
                          "knobs as keywords instead (EcoSpa(model, opt, target=..., top_k=...))")
    if not isinstance(verify, bool):
        raise ConfigError(f"verify should be True or False, got {verify!r}")


class EcoSpa:
    """Structured sparse training of ``model`` down to ``target`` parameters (Algorithm 1).

    Args:
        model: the model being trained (pruned in place).
        optimizer: its optimizer (its state is pruned along); None to prune parameters only.
        target: total parameter count (int) or fraction of the prunable parameters to keep
            (float); default ``config.target``, or 0.5.
        example_inputs: inputs that run ``model`` for :func:`ecospa.auto_couple` (optional).
            Without them (and on a model that carries no dummy inputs, unlike Hugging Face
            models) EcoSpa records the inputs of the model's **first forward** (a forward
            pre-hook, removed after that call; detached copies, kept in ``sp.inputs`` for
            ``verify`` and later captures) and finds the couplings at the first ``sp.step()``.
            Until then ``sp.couplings``, ``sp.importance``, ``sp.target_params`` and
            ``sp.dense_widths`` raise :class:`~ecospa.EcospaError` saying what to do (reading
            them never captures the model), ``sp.done`` is False, and an
            unreachable target raises its :class:`~ecospa.ConfigError` at the first
            ``sp.step()`` rather than here. ``sp.capture(example_inputs)`` captures now.
        couplings: use these couplings instead of calling ``auto_couple``.
        process_group: multi-process training (``torch.distributed``): the group whose ranks
            prune together. Before each round the Eq. 6 statistics are averaged over the group
            (``Importance.all_reduce``) and the round's removals are taken from the group's first
            rank, so every rank removes the same units. None (default): the default group when
            ``torch.distributed`` is initialised with more than one process; False: never
            communicate. Give EcoSpa the inner module (``ddp.module``); see docs/distributed.md.
        verify: self-check every prune (``ecospa.prune(..., verify=True)``): the pruned model's
            outputs on the example inputs (those the couplings were found with) must equal the
            dense model's with the removed slices zeroed, else the model and the optimizer are
            restored and :class:`~ecospa.PruneError` is raised from ``sp.step()``. Costs two
            forwards per round. Needs example inputs (a :class:`~ecospa.ConfigError` otherwise).
        **knobs: the other fields of :class:`~ecospa.schedule.planner.PlanConfig` (``every``,
            ``start``, ``top_k``, ``theta``, ``min_units``, ``width_multiple``,
            ``coupling_score``, ``unit_score``, ``seed``, ``head_widths``, ``end``,
            ``total_steps``); or ``config=`` a whole PlanConfig. ``end``: the step (int) or the
            fraction of ``total_steps`` (float) at which the target is reached, on a cubic
            schedule from ``start`` (module docstring); ``total_steps``: the run's length in
            optimizer steps (a run that ends above the target warns at that step).

    Raises:
        ConfigError: a knob of the wrong type or out of range, an unreachable target (the message
            says what is reachable), a model with nothing to prune (the message lists why), or
            ``verify=True`` without example inputs.
        PlanError: ``couplings`` of another model, or stale ones (found before the model changed).
        PruneError: an optimizer that does not hold the parameters EcoSpa would slice.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 target: int | float | None = None, *, example_inputs=None,
                 couplings: CouplingGraph | None = None, config: PlanConfig | None = None,
                 process_group=None, verify: bool = False, **knobs):
        _check_arguments(model, optimizer, config, verify)
        refuse_sharded(model, "ecospa.EcoSpa")
        if target is not None:
            knobs["target"] = target
        unknown = sorted(set(knobs) - set(PlanConfig.help(show=False)))
        if unknown:
            raise ConfigError(f"unknown EcoSpa options {unknown}; valid: {sorted(PlanConfig.help(show=False))}")
        self.config = replace(config, **knobs) if config is not None else PlanConfig(**knobs)
        self.model, self.optimizer = model, optimizer
        self.verify = verify
        self.process_group = process_group
        self.inputs: tuple[tuple, dict[str, Any]] | None = None  # recorded at the first forward
        self._hook = None
        self.dense_params = _count(model)
        self.steps = 0
        self.rounds = 0
        self.events: list[PruneEvent] = []
        self._plan_steps: list[PlanStep] = []
        self._bytes = {"initial": 0, "peak": 0, "sum": 0, "steps": 0, "final": 0, "time_sum": 0.0, "time": 0.0}
        self._last_step_at: float | None = None
        self._warned_short = False
        if couplings is None and example_inputs is None and default_inputs(model) is None:
            self._hook = model.register_forward_pre_hook(self._record, with_kwargs=True)
            log.info("ecospa: %s has no example inputs; the couplings are found from the inputs of "
                     "its first forward", type(model).__name__)
        else:
            self._setup(couplings if couplings is not None else auto_couple(model, example_inputs))

    def _setup(self, couplings: CouplingGraph) -> None:
        self._check_couplings(couplings)  # these may raise: set nothing before
        target = resolve_target(self.config, couplings, self._shapes())
        rules = None
        if self.config.exportable:  # what the config can state: probed once, on the couplings found
            rules = exportable_rules(couplings, self.model)
            check_exportable_target(self.config, couplings, rules, self._shapes(), target)
        importance = Importance(self.model, couplings,
                                stats=needed_stats(self.config.coupling_score, self.config.unit_score),
                                seed=self.config.seed)
        self.dense_widths = {c.name: c.width for c in couplings}
        self.target_params, self.importance = target, importance
        self._export_rules = rules
        self.couplings = couplings  # last: ``ready`` looks for it
        log.info("ecospa: %d exact couplings, %d params, target %d params",
                 len(self.couplings), self.dense_params, self.target_params)

    def _check_couplings(self, couplings: CouplingGraph) -> None:
        """Refuse, before anything changes: nothing to prune, couplings of another model or state,
        an optimizer without the parameters to slice, ``verify`` without example inputs."""
        exact = [c for c in couplings if c.exact]
        if not exact:
            inexact = list(getattr(couplings, "inexact", ()))
            why = "; ".join(f"{c.name}: {c.reason}" for c in inexact[:5]) + (" ..." if len(inexact) > 5 else "")
            found = (f"it has {len(inexact)} couplings, none exact ({why})" if inexact else
                     "no two weights of it meet in a product along a hidden dimension")
            raise ConfigError(
                f"EcoSpa: nothing to prune in {type(self.model).__name__}: {found}. Only exact couplings "
                "can be removed (cg.summary() lists every coupling with its reason); give EcoSpa a model "
                "with prunable blocks (FFNs, attention heads), or train it without EcoSpa")
        resolve(self.model, {c: () for c in exact})  # PlanError for stale couplings / another model
        check_optimizer(self.optimizer, self.model, {t.param for c in exact for t in c.tables})
        if self.verify and getattr(couplings, "inputs", None) is None and self.inputs is None \
                and default_inputs(self.model) is None:
            raise ConfigError("EcoSpa(verify=True) checks every prune on example inputs and has none: pass "
                              "example_inputs=..., or couplings=ecospa.auto_couple(model, example_inputs)")

    def _verify_inputs(self):
        """Inputs for ``prune(..., verify=True)`` when the couplings do not carry their own."""
        if not self.verify or getattr(self.couplings, "inputs", None) is not None or self.inputs is None:
            return None
        return as_example(self.model, *self.inputs)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: keep detached copies of the first forward's inputs, then go away."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.inputs = (detached(tuple(args)), detached(dict(kwargs)))

    @property
    def ready(self) -> bool:
        """True once the couplings are known (given, or captured: at construction with example
        inputs or dummy inputs, else at the first ``sp.step()`` or ``sp.capture()``)."""
        return "couplings" in self.__dict__

    def capture(self, example_inputs=None) -> CouplingGraph:
        """Find the couplings now, on ``example_inputs`` or else the recorded first-forward inputs,
        and return them (the existing couplings if already known).

        Raises:
            EcospaError: no inputs given and the model has not run a forward yet.
            ConfigError: the target is unreachable for this model.
        """
        if self.ready:
            return self.couplings
        if example_inputs is None:
            if self.inputs is None:
                raise EcospaError(
                    f"EcoSpa finds the couplings of {type(self.model).__name__} from the inputs of its first "
                    "forward, and the model has not run yet: run a training step first, call "
                    "sp.capture(example_inputs), or build EcoSpa(..., example_inputs=...)")
            example_inputs = as_example(self.model, *self.inputs)
        else:
            args, kwargs = ((), example_inputs) if isinstance(example_inputs, dict) else (
                (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs), {})
            self.inputs = (detached(args), detached(kwargs))
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._setup(auto_couple(self.model, example_inputs))
        return self.couplings

    def __getattr__(self, name: str):
        # couplings, importance, target_params, dense_widths exist once the couplings are known;
        # reading them never captures the model (sp.step() and sp.capture() do, explicitly)
        if name in _LAZY and "_plan_steps" in self.__dict__:
            if self.inputs is None:
                raise EcospaError(
                    f"sp.{name} is not known yet: EcoSpa finds the couplings of {type(self.model).__name__} from "
                    "the inputs of its first forward, and the model has not run yet: run a training step first, "
                    "call sp.capture(example_inputs), or build EcoSpa(..., example_inputs=...)")
            raise EcospaError(
                f"sp.{name} is not known yet: EcoSpa finds the couplings of {type(self.model).__name__} (from the "
                "recorded inputs of its first forward) at the first sp.step(); call sp.capture() to find them now")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self.model.named_parameters()}

    @property
    def plan(self) -> Plan:
        """Every removal so far, replayable on a fresh copy with ``plan.replay(model, opt)``."""
        return Plan(tuple(self._plan_steps))

    @property
    def num_params(self) -> int:
        """Current parameter count of the model."""
        return _count(self.model)

    @property
    def done(self) -> bool:
        """True once the model is at or below the target size (False until the couplings are
        known, at the first ``sp.step()`` of a model given no example inputs: no target yet)."""
        if not self.ready:
            return False
        return self.num_params <= self.target_params

    def step(self) -> PruneEvent | None:
        """Call once per optimizer step after ``backward()``: accumulate, and prune when due.

        Returns the :class:`PruneEvent` when this call pruned, else None.

        Raises:
            EcospaError: EcoSpa has no example inputs and the model has not run a forward yet.
        """
        if not self.ready:
            self.capture()  # from the inputs of the first forward
        self.steps += 1
        self._measure()
        if self.done:
            return None
        self.importance.accumulate()
        event = self.prune_now() if self._due() else None
        total = self.config.total_steps
        if total is not None and self.steps >= total:
            self._warn_if_short()
        return event

    def _due(self) -> bool:
        """Whether this step ends a round: every ``every`` steps from ``start``; with a schedule,
        after ``start`` and at ``end`` too."""
        cfg = self.config
        if cfg.every == "epoch" or self.steps < cfg.start:
            return False
        end = cfg.end_step
        if end is None:
            return self.steps % cfg.every == 0
        return self.steps > cfg.start and (self.steps % cfg.every == 0 or self.steps == end)

    def round_target(self) -> int:
        """The size this step's round prunes to: the target, or with ``end`` the cubic schedule's
        size at the current step (``planner.schedule_target``)."""
        end = self.config.end_step
        if end is None:
            return self.target_params
        return schedule_target(self.steps, start=self.config.start, end=end, dense_params=self.dense_params,
                               target_params=self.target_params)

    def set_schedule(self, *, total_steps: int | None, end: int | float | None) -> None:
        """Set ``total_steps`` and ``end`` (as the keywords of the same names) once the run's
        length is known; the trainer callbacks call it with the trainer's max_steps.

        Raises:
            ConfigError: a value out of range, or an end after the last step.
        """
        self.config = replace(self.config, total_steps=total_steps, end=end)

    def state_bytes(self) -> int:
        """Bytes of the model's weights, their allocated gradients and the optimizer's state for
        them (every tensor ``optimizer.state`` holds per parameter)."""
        total = 0
        state = self.optimizer.state if self.optimizer is not None else {}
        for p in self.model.parameters():
            total += p.numel() * p.element_size()
            if p.grad is not None:
                total += p.grad.numel() * p.grad.element_size()
            for v in state.get(p, {}).values():
                if torch.is_tensor(v):
                    total += v.numel() * v.element_size()
        return total

    def _measure(self) -> None:
        """Record this step's training state bytes (weights + gradients + optimizer state)."""
        now = time.perf_counter()
        b, acc = self.state_bytes(), self._bytes
        if acc["steps"] == 0:
            acc["initial"] = b
        acc["peak"] = max(acc["peak"], b)
        acc["sum"] += b
        acc["steps"] += 1
        acc["final"] = b
        if self._last_step_at is not None:  # weighted by the wall clock of the step it ends
            dt = now - self._last_step_at
            acc["time_sum"] += b * dt
            acc["time"] += dt
        self._last_step_at = now

    def summary(self) -> dict[str, Any]:
        """Where the run stands: sizes, rounds, seconds spent pruning, and the bytes of weights +
        gradients + optimizer state measured at every ``sp.step()`` (``initial``: at the first
        step; ``peak``; ``mean``: over steps; ``time_mean``: weighted by each step's wall clock;
        ``final``: at the last step). Plain data (JSON-able)."""
        acc = self._bytes
        ready = self.ready
        return {
            "steps": self.steps,
            "rounds": len(self.events),
            "dense_params": self.dense_params,
            "params": self.num_params,
            "target_params": self.target_params if ready else None,
            "reached": self.done,
            "end_step": self.config.end_step,
            "total_steps": self.config.total_steps,
            "prune_seconds": sum(e.seconds for e in self.events),
            "state_bytes": {
                "initial": acc["initial"], "peak": acc["peak"], "final": acc["final"],
                "mean": acc["sum"] / acc["steps"] if acc["steps"] else 0.0,
                "time_mean": acc["time_sum"] / acc["time"] if acc["time"] > 0 else float(acc["final"]),
            },
        }

    def report(self) -> str:
        """:meth:`summary` as a few lines of text."""
        s = self.summary()
        b = s["state_bytes"]
        mib = lambda x: f"{x / 2 ** 20:.2f} MiB"
        ratio = lambda x: f" ({x / b['initial']:.2f}x the first step's)" if b["initial"] else ""
        target = f"target {s['target_params']:,}" if s["target_params"] is not None else "target not known yet"
        lines = [f"ecospa: {s['steps']} steps, {s['rounds']} pruning rounds ({s['prune_seconds']:.2f} s), params "
                 f"{s['dense_params']:,} -> {s['params']:,} ({target}{', reached' if s['reached'] else ''})",
                 f"training state (weights + gradients + optimizer state): peak {mib(b['peak'])}, mean "
                 f"{mib(b['mean'])}{ratio(b['mean'])}, wall-clock mean {mib(b['time_mean'])}{ratio(b['time_mean'])}, "
                 f"final {mib(b['final'])}"]
        return "\n".join(lines)

    def finish(self) -> dict[str, Any]:
        """Call after the last optimizer step (the trainer callbacks do, at the end of training):
        warns (:class:`~ecospa.EcospaWarning`) if the model is still above its target, with how
        far; returns :meth:`summary`."""
        self._warn_if_short()
        return self.summary()

    def _warn_if_short(self) -> None:
        """Warn once that the run ends above its target, with how far."""
        if self._warned_short or not self.ready or self.done:
            return
        self._warned_short = True
        n, t, d = self.num_params, self.target_params, self.dense_params
        way = (d - n) / (d - t) if d > t else 1.0
        hint = ("pass end=<step or fraction of the run> (with total_steps) to reach it on schedule"
                if self.config.end_step is None else
                "the schedule's last rounds found nothing more to remove (min_units?)")
        warnings.warn(
            f"EcoSpa: the run ended at step {self.steps} with {n:,} parameters ({n / d:.1%} of the dense "
            f"{d:,}), above its target {t:,} ({t / d:.1%}) by {n - t:,} ({(n - t) / d:.1%} of the dense "
            f"model): {way:.0%} of the way there after {len(self.events)} rounds. {hint}",
            EcospaWarning, stacklevel=3)

    def end_epoch(self) -> PruneEvent | None:
        """Call at the end of each epoch; prunes when ``every="epoch"`` (with ``end``: to the
        schedule's size at the current step)."""
        if self.config.every == "epoch" and self.steps >= self.config.start:
            return self.prune_now()
        return None

    def prune_now(self) -> PruneEvent | None:
        """Run one round of Algorithm 1 now, on the statistics accumulated since the last round
        (with ``end``: down to the schedule's size at this step; nothing when already there).
        Captures first (``sp.capture()``) if the couplings are not known yet."""
        if not self.ready:
            self.capture()
        if self.done:
            return None
        goal = self.round_target()
        if self.num_params <= goal:
            log.debug("ecospa: step %d: the schedule asks for %d params, the model has %d", self.steps, goal,
                      self.num_params)
            return None
        t0 = time.perf_counter()
        group = dist_group(self.process_group)
        if group is not None:  # every rank plans on the same statistics (and agrees on num_batches)
            self.importance.all_reduce(group)
        if self.importance.num_batches == 0 and "sq" in self.importance.stats:
            log.warning("ecospa: no gradients accumulated since the last round; not pruning at step %d",
                        self.steps)
            return None
        salt = self.rounds
        scores = self.importance.coupling_scores(self.config.coupling_score, salt=salt)
        removals = plan_round(
            list(self.couplings), self._shapes(), coupling_scores=scores,
            unit_scores=lambda c: self.importance.unit_scores(c, self.config.unit_score, salt=salt),
            config=self.config, target_params=goal, passes=1 if self.config.end_step is None else None,
            rules=getattr(self, "_export_rules", None))
        if group is not None:  # and removes the same units: those of the group's first rank
            first = {k: list(v) for k, v in broadcast_json(removals, group).items()}
            if first != {k: list(v) for k, v in removals.items()}:
                log.warning("ecospa: step %d: this rank's plan differs from the first rank's (float "
                            "differences between ranks?); using the first rank's", self.steps)
            removals = first
        self.rounds += 1
        if not removals:
            log.info("ecospa: step %d: nothing left to remove (%d params, target %d)",
                     self.steps, self.num_params, self.target_params)
            return None
        widths = {n: self.couplings[n].width for n in removals}
        try:  # a failed prune leaves model, optimizer and this EcoSpa as they were
            result = prune_pass(self.model, removals, self.optimizer, couplings=self.couplings,
                                verify=self.verify, example_inputs=self._verify_inputs())
        except BaseException:
            self.rounds -= 1
            raise
        self.couplings = result.couplings
        self.importance.rebind(self.couplings)
        frozen = {n: tuple(v) for n, v in removals.items()}
        event = PruneEvent(self.steps, frozen, result.params_before, result.params_after,
                           time.perf_counter() - t0)
        self.events.append(event)
        self._plan_steps.append(PlanStep(self.steps, frozen, result.params_before, result.params_after, widths))
        log.info("ecospa: %s", event)
        return event

    def state_dict(self) -> dict:
        """Steps, rounds, plan, events and the gradient statistics (save with the model)."""
        state = {"steps": self.steps, "rounds": self.rounds, "plan": self.plan.to_dict(),
                 "seconds": [e.seconds for e in self.events], "state_bytes": dict(self._bytes),
                 "importance": self.importance.state_dict() if self.ready else None}
        if self.inputs is not None:  # recorded at the first forward: a resumed run captures with them
            state["inputs"] = self.inputs
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`. If this EcoSpa has not pruned yet, the saved plan is first
        replayed on the model and optimizer; load the model's and optimizer's state dicts after."""
        plan = Plan.from_dict(state["plan"])
        if not self.ready:  # built without example inputs: capture with the saved ones
            if self.inputs is None and state.get("inputs") is not None:
                self.inputs = tuple(state["inputs"])
            if self.inputs is None and not plan.steps and state.get("importance") is None:
                self.steps, self.rounds = int(state["steps"]), int(state["rounds"])
                return  # nothing to restore but counters
            self.capture()
        if self._plan_steps and self.plan != plan:
            raise EcospaError("this EcoSpa has already pruned along another plan; load the state "
                              "into an EcoSpa built on a fresh dense model")
        if not self._plan_steps:
            if plan.steps:
                self.couplings = prune_pass(self.model, plan, self.optimizer, couplings=self.couplings).couplings
            self.importance.rebind(self.couplings)
            self._plan_steps = list(plan.steps)
            secs: Iterable[float] = state.get("seconds", [0.0] * len(plan.steps))
            self.events = [PruneEvent(s.step, dict(s.removals), s.params_before or 0, s.params_after or 0, t)
                           for s, t in zip(plan.steps, secs)]
        self.steps, self.rounds = int(state["steps"]), int(state["rounds"])
        if isinstance(state.get("state_bytes"), dict):
            self._bytes.update(state["state_bytes"])
        if state.get("importance") is not None:
            self.importance.load_state_dict(state["importance"])
