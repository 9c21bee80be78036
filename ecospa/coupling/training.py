"""EcoSpa in a plain PyTorch training loop: three added lines.

    sp = ecospa.EcoSpa(model, optimizer, target=0.5, example_inputs=(x,), every=200)
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
- **LR schedulers** hold the optimizer, whose param groups stay valid: nothing to do.

Each pruning round is a :class:`PruneEvent` appended to ``sp.events`` and logged at INFO level
on the ``"ecospa"`` logger; ``sp.plan`` is the :class:`~ecospa.coupling.planner.Plan` so far.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Iterable

import torch
import torch.nn as nn

from ecospa.coupling.discovery import auto_couple
from ecospa.coupling.executor import prune_pass
from ecospa.coupling.importance import Importance
from ecospa.coupling.scores import needed_stats
from ecospa.coupling.planner import Plan, PlanConfig, PlanStep, plan_round, resolve_target
from ecospa.errors import ConfigError, EcospaError
from ecospa.graph.ir import CouplingGraph

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


class EcoSpa:
    """Structured sparse training of ``model`` down to ``target`` parameters (Algorithm 1).

    Args:
        model: the model being trained (pruned in place).
        optimizer: its optimizer (its state is pruned along); None to prune parameters only.
        target: total parameter count (int) or fraction of the prunable parameters to keep
            (float); default ``config.target``, or 0.5.
        example_inputs: inputs that run ``model`` for :func:`ecospa.auto_couple` (optional for
            Hugging Face models).
        couplings: use these couplings instead of calling ``auto_couple``.
        **knobs: the other fields of :class:`~ecospa.coupling.planner.PlanConfig` (``every``,
            ``start``, ``top_k``, ``theta``, ``min_units``, ``width_multiple``,
            ``coupling_score``, ``unit_score``, ``seed``); or ``config=`` a whole PlanConfig.

    Raises:
        ConfigError: a knob out of range, or an unreachable target (the message says what is
            reachable).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 target: int | float | None = None, *, example_inputs=None,
                 couplings: CouplingGraph | None = None, config: PlanConfig | None = None, **knobs):
        if target is not None:
            knobs["target"] = target
        unknown = sorted(set(knobs) - set(PlanConfig.help()))
        if unknown:
            raise ConfigError(f"unknown EcoSpa options {unknown}; valid: {sorted(PlanConfig.help())}")
        self.config = replace(config, **knobs) if config is not None else PlanConfig(**knobs)
        self.model, self.optimizer = model, optimizer
        self.couplings = couplings if couplings is not None else auto_couple(model, example_inputs)
        self.dense_params = _count(model)
        self.dense_widths = {c.name: c.width for c in self.couplings}
        self.target_params = resolve_target(self.config, self.couplings, self._shapes())
        self.importance = Importance(model, self.couplings,
                                     stats=needed_stats(self.config.coupling_score, self.config.unit_score),
                                     seed=self.config.seed)
        self.steps = 0
        self.rounds = 0
        self.events: list[PruneEvent] = []
        self._plan_steps: list[PlanStep] = []
        log.info("ecospa: %d exact couplings, %d params, target %d params",
                 len(self.couplings), self.dense_params, self.target_params)

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
        """True once the model is at or below the target size."""
        return self.num_params <= self.target_params

    def step(self) -> PruneEvent | None:
        """Call once per optimizer step after ``backward()``: accumulate, and prune when due.

        Returns the :class:`PruneEvent` when this call pruned, else None.
        """
        self.steps += 1
        if self.done:
            return None
        self.importance.accumulate()
        every = self.config.every
        if every != "epoch" and self.steps >= self.config.start and self.steps % every == 0:
            return self.prune_now()
        return None

    def end_epoch(self) -> PruneEvent | None:
        """Call at the end of each epoch; prunes when ``every="epoch"``."""
        if self.config.every == "epoch" and self.steps >= self.config.start:
            return self.prune_now()
        return None

    def prune_now(self) -> PruneEvent | None:
        """Run one round of Algorithm 1 now, on the statistics accumulated since the last round."""
        if self.done:
            return None
        if self.importance.num_batches == 0 and "sq" in self.importance.stats:
            log.warning("ecospa: no gradients accumulated since the last round; not pruning at step %d",
                        self.steps)
            return None
        t0 = time.perf_counter()
        salt = self.rounds
        scores = self.importance.coupling_scores(self.config.coupling_score, salt=salt)
        removals = plan_round(
            list(self.couplings), self._shapes(), coupling_scores=scores,
            unit_scores=lambda c: self.importance.unit_scores(c, self.config.unit_score, salt=salt),
            config=self.config, target_params=self.target_params)
        self.rounds += 1
        if not removals:
            log.info("ecospa: step %d: nothing left to remove (%d params, target %d)",
                     self.steps, self.num_params, self.target_params)
            return None
        widths = {n: self.couplings[n].width for n in removals}
        result = prune_pass(self.model, removals, self.optimizer, couplings=self.couplings)
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
        return {"steps": self.steps, "rounds": self.rounds, "plan": self.plan.to_dict(),
                "seconds": [e.seconds for e in self.events], "importance": self.importance.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`. If this EcoSpa has not pruned yet, the saved plan is first
        replayed on the model and optimizer; load the model's and optimizer's state dicts after."""
        plan = Plan.from_dict(state["plan"])
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
        self.importance.load_state_dict(state["importance"])
