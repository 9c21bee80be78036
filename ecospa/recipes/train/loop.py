"""Training loops that compare models fairly: same data, same order, interleaved step by step.

:class:`Run` is one model being trained (its AdamW, learning-rate schedule, optional step hook
such as EcoSpa, clocks and history). :func:`train_interleaved` trains several runs *in lockstep*:
at every step every run takes one optimizer step on the same batch, in an order that rotates
from step to step, so that load from other processes on a shared machine falls on all runs
alike and their wall clocks can be compared. Evaluation is not counted in the wall clock;
pruning is (it is part of training), and so is a hook's setup (for EcoSpa: discovering the
couplings).

A *hook* is called once per optimizer step, after ``optimizer.step()``, with the 1-based step
number; it may change the model in place (prune it). ``ecospa.EcoSpa`` fits as
``lambda model, opt: EcoSpaHook(ecospa.EcoSpa(model, opt, ...))``; see :func:`ecospa_hook`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ecospa import ConfigError
from ecospa.recipes.train.corpus import CharCorpus
from ecospa.recipes.train.measure import count_params, evaluate, state_bytes

__all__ = ["TrainConfig", "Point", "StepHook", "HookFactory", "Run", "EcoSpaHook", "ecospa_hook",
           "train_interleaved"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and evaluation settings shared by every run of a comparison."""

    steps: int = 400
    batch_size: int = 32
    block_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_windows: int = 192
    final_eval_windows: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "block_size", "eval_every", "eval_windows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} should be a positive int, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"warmup should be a non-negative int, got {self.warmup!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr should be a positive number, got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio should be in [0, 1], got {self.min_lr_ratio!r}")
        if self.final_eval_windows is not None and self.final_eval_windows < 1:
            raise ConfigError(f"final_eval_windows should be positive or None, got {self.final_eval_windows!r}")

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at 0-based ``step``: linear warm-up, then cosine to ``min_lr_ratio``."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Point:
    """One evaluation: after ``step`` optimizer steps and ``train_seconds`` of training."""

    step: int
    train_seconds: float
    val_loss: float
    params: int
    state_bytes: int


class StepHook(Protocol):
    """Called after every optimizer step; may prune the model in place.

    Optional methods a hook may define: ``effective_params() -> int`` (the parameter count to
    report, for hooks that mask instead of removing), ``extra_bytes() -> int`` (state the hook
    keeps beside the model, such as masks, added to the state bytes) and ``info() -> dict``
    (JSON-able details). A numeric attribute ``excluded_seconds`` (cumulative) is time the hook
    spent on bookkeeping that is not part of the method it implements (for example a benchmark's
    search for a pruning ratio); it is left out of the wall clock.
    """

    def __call__(self, step: int) -> Any: ...


HookFactory = Callable[[nn.Module, torch.optim.Optimizer], StepHook]


class Run:
    """One model under training: optimizer, schedule, hook, clocks and history.

    Args:
        name: label in tables and plots.
        model: the model (trained, and possibly pruned, in place); ``model(idx) -> logits``.
        cfg: the shared :class:`TrainConfig`.
        hook: builds the step hook from ``(model, optimizer)``; its build time counts as
            training time (``setup_seconds``).
    """

    def __init__(self, name: str, model: nn.Module, cfg: TrainConfig, hook: HookFactory | None = None):
        self.name, self.model, self.cfg = name, model, cfg
        model.train()
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, cfg.beta2))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cfg.lr_factor)
        t0 = time.perf_counter()
        self.hook = hook(model, self.optimizer) if hook is not None else None
        self.setup_seconds = time.perf_counter() - t0
        self.train_seconds = self.setup_seconds
        self.step_seconds: list[float] = []
        self.steps = 0
        self.history: list[Point] = []
        self.param_trace: list[tuple[int, int]] = [(0, self.params())]
        self.peak_state_bytes = 0
        self.state_bytes_sum = 0
        self.state_trace: list[tuple[int, int]] = []  # (step, state bytes) where it changes
        self.last_loss = float("nan")
        self.final_val_loss: float | None = None

    def params(self) -> int:
        """Parameter count to report (the hook's ``effective_params()`` when it has one)."""
        fn = getattr(self.hook, "effective_params", None)
        return int(fn()) if fn is not None else count_params(self.model)

    def state_bytes(self) -> int:
        """Bytes of weights + allocated gradients + optimizer state (+ the hook's ``extra_bytes()``)."""
        fn = getattr(self.hook, "extra_bytes", None)
        return state_bytes(self.model, self.optimizer)["total"] + (int(fn()) if fn is not None else 0)

    def train_step(self, batch: torch.Tensor) -> float:
        """One optimizer step on ``batch`` ``(B, T + 1)``, then the hook; returns the loss."""
        t0 = time.perf_counter()
        logits = self.model(batch[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        t1 = time.perf_counter()
        sb = self.state_bytes()  # everything allocated, not timed
        self.peak_state_bytes = max(self.peak_state_bytes, sb)
        self.state_bytes_sum += sb
        self.steps += 1
        if not self.state_trace or self.state_trace[-1][1] != sb:
            self.state_trace.append((self.steps, sb))
        excluded = float(getattr(self.hook, "excluded_seconds", 0.0))
        t2 = time.perf_counter()
        if self.hook is not None:
            self.hook(self.steps)
        t3 = time.perf_counter()
        excluded = float(getattr(self.hook, "excluded_seconds", 0.0)) - excluded
        dt = (t1 - t0) + (t3 - t2) - excluded
        self.step_seconds.append(dt)
        self.train_seconds += dt
        if self.hook is not None:
            n = self.params()
            if n != self.param_trace[-1][1]:
                self.param_trace.append((self.steps, n))
        self.last_loss = float(loss.detach())
        return self.last_loss

    def record(self, val_loss: float) -> Point:
        """Append an evaluation point at the current step."""
        p = Point(self.steps, self.train_seconds, float(val_loss), self.params(), self.state_bytes())
        self.history.append(p)
        return p

    def summary(self) -> dict[str, Any]:
        """JSON-able results of the run (without throughput, measured across runs)."""
        info_fn = getattr(self.hook, "info", None)
        final = self.final_val_loss if self.final_val_loss is not None else (
            self.history[-1].val_loss if self.history else float("nan"))
        return {
            "name": self.name,
            "steps": self.steps,
            "val_loss": final,
            "val_ppl": math.exp(final) if math.isfinite(final) else float("nan"),
            "params": self.params(),
            "params_initial": self.param_trace[0][1],
            "train_seconds": self.train_seconds,
            "setup_seconds": self.setup_seconds,
            "peak_state_bytes": self.peak_state_bytes,
            "mean_state_bytes": self.state_bytes_sum / max(1, self.steps),
            "final_state_bytes": self.state_bytes(),
            "history": [asdict(p) for p in self.history],
            "param_trace": [list(t) for t in self.param_trace],
            "state_trace": [list(t) for t in self.state_trace],
            "hook": info_fn() if info_fn is not None else None,
        }


class EcoSpaHook:
    """Adapts an :class:`ecospa.EcoSpa` to the hook protocol (``sp.step()`` once per step)."""

    def __init__(self, sp: Any):
        self.sp = sp

    def __call__(self, step: int) -> Any:
        return self.sp.step()

    def info(self) -> dict[str, Any]:
        """Target, rounds and every pruning event (step, params before/after, seconds, units)."""
        sp = self.sp
        return {
            "dense_params": sp.dense_params,
            "target_params": sp.target_params,
            "reached": sp.done,
            "rounds": len(sp.events),
            "prune_seconds": sum(e.seconds for e in sp.events),
            "events": [{"step": e.step, "params_before": e.params_before, "params_after": e.params_after,
                        "units_removed": e.units_removed, "seconds": e.seconds,
                        "removed": {n: len(v) for n, v in e.removals.items()}} for e in sp.events],
            "kept_widths": {c.name: c.width for c in sp.couplings},
            "summary": sp.summary() if hasattr(sp, "summary") else None,
        }


def ecospa_hook(target: int | float, example_inputs: tuple, **knobs: Any) -> HookFactory:
    """A hook factory that runs ``ecospa.EcoSpa(model, optimizer, target, example_inputs=..., **knobs)``."""
    import ecospa

    def factory(model: nn.Module, optimizer: torch.optim.Optimizer) -> EcoSpaHook:
        return EcoSpaHook(ecospa.EcoSpa(model, optimizer, target=target, example_inputs=example_inputs, **knobs))

    return factory


def train_interleaved(runs: Sequence[Run], corpus: CharCorpus, cfg: TrainConfig, *,
                      progress: bool = True, desc: str = "train") -> None:
    """Train ``runs`` in lockstep on the same batches (see the module docstring).

    Evaluates every ``cfg.eval_every`` steps on ``cfg.eval_windows`` validation windows (and at
    step 0), and at the end on ``cfg.final_eval_windows`` of them (None: the whole validation
    text), stored in each run's ``final_val_loss``.
    """
    from tqdm import tqdm  # the demo extra

    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"run names should be distinct, got {names}")
    starts = corpus.train_starts(cfg.steps, cfg.batch_size, cfg.block_size, cfg.seed)
    val_starts = corpus.val_starts(cfg.block_size, cfg.eval_windows)

    def ev(r: Run, windows: torch.Tensor) -> float:
        return evaluate(r.model, corpus.val, windows, cfg.block_size)

    for r in runs:
        if r.steps == 0 and not r.history:
            r.record(ev(r, val_starts))
    bar = tqdm(range(cfg.steps), desc=desc, unit="step", dynamic_ncols=True, disable=not progress,
               leave=True)
    for i in bar:
        batch = CharCorpus.windows(corpus.train, starts[i], cfg.block_size)  # (B, T+1)
        k = i % len(runs)
        for r in list(runs[k:]) + list(runs[:k]):
            r.train_step(batch)
        last = i + 1 == cfg.steps
        if (i + 1) % cfg.eval_every == 0 or last:
            for r in runs:
                r.record(ev(r, val_starts))
        if progress and (i % 5 == 0 or last):
            bar.set_postfix_str("  ".join(
                f"{r.name}: loss {r.last_loss:.3f} {r.params() / 1e3:.0f}k" for r in runs))
    bar.close()
    final_starts = corpus.val_starts(cfg.block_size, cfg.final_eval_windows)
    for r in runs:
        r.final_val_loss = ev(r, final_starts)
