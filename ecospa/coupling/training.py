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
on the ``"ecospa"`` logger; ``sp.plan`` is the :class:`~ecospa.coupling.planner.Plan` so far.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Iterable

import torch
import torch.nn as nn

from ecospa.coupling.discovery import auto_couple
from ecospa.coupling.distributed import broadcast_json, dist_group
from ecospa.coupling.executor import _check_optimizer, prune_pass, resolve
from ecospa.coupling.first_forward import as_example, detached
from ecospa.coupling.importance import Importance
from ecospa.coupling.scores import needed_stats
from ecospa.coupling.planner import Plan, PlanConfig, PlanStep, plan_round, resolve_target
from ecospa.errors import ConfigError, EcospaError
from ecospa.graph.capture import default_inputs
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
            ``sp.dense_widths`` raise :class:`~ecospa.EcospaError` if the model has not run yet
            (after its first forward they capture on access), ``sp.done`` is False, and an
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
        **knobs: the other fields of :class:`~ecospa.coupling.planner.PlanConfig` (``every``,
            ``start``, ``top_k``, ``theta``, ``min_units``, ``width_multiple``,
            ``coupling_score``, ``unit_score``, ``seed``); or ``config=`` a whole PlanConfig.

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
        if target is not None:
            knobs["target"] = target
        unknown = sorted(set(knobs) - set(PlanConfig.help()))
        if unknown:
            raise ConfigError(f"unknown EcoSpa options {unknown}; valid: {sorted(PlanConfig.help())}")
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
        if couplings is None and example_inputs is None and default_inputs(model) is None:
            self._hook = model.register_forward_pre_hook(self._record, with_kwargs=True)
            log.info("ecospa: %s has no example inputs; the couplings are found from the inputs of "
                     "its first forward", type(model).__name__)
        else:
            self._setup(couplings if couplings is not None else auto_couple(model, example_inputs))

    def _setup(self, couplings: CouplingGraph) -> None:
        self._check_couplings(couplings)  # these may raise: set nothing before
        target = resolve_target(self.config, couplings, self._shapes())
        importance = Importance(self.model, couplings,
                                stats=needed_stats(self.config.coupling_score, self.config.unit_score),
                                seed=self.config.seed)
        self.dense_widths = {c.name: c.width for c in couplings}
        self.target_params, self.importance = target, importance
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
        _check_optimizer(self.optimizer, self.model, {t.param for c in exact for t in c.tables})
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
        # couplings, importance, target_params, dense_widths: found at the first use after the
        # first forward when EcoSpa was built without example inputs
        if name in _LAZY and "_plan_steps" in self.__dict__:
            self.capture()
            return self.__dict__[name]
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
        """True once the model is at or below the target size (False before the first forward
        of a model given no example inputs: the target is not known yet)."""
        if not self.ready and self.inputs is None:
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
            config=self.config, target_params=self.target_params)
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
                 "seconds": [e.seconds for e in self.events],
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
        if state.get("importance") is not None:
            self.importance.load_state_dict(state["importance"])
