"""One-shot compression of a trained model: ``ecospa.compress(model, target, data)``.

Rounds (``rounds``, default 4). In round ``r`` of ``R`` the model goes down to
``dense - (r / R) * (dense - target)`` parameters:

1. **calibrate** (:mod:`ecospa.coupling.calibration`): forward + backward on the calibration
   samples, no weight update: the Fisher of every unit's mask (its estimated loss increase
   when removed, in units of loss, so comparable across layers and kinds) and the input Gram
   matrix of every consumer module (a module reading the units' channels);
2. **allocate and select** (``allocation``):

   - ``"global"`` (default): every unit's estimated loss increase divided by its parameter
     count, ranked over the whole model; the cheapest go first. How much each layer and each
     kind loses falls out of the ranking. Units of one coupling go in their score order, so
     a coupling is cut in steps (``width_multiple`` units at a time; with
     ``head_widths="uniform"`` a step takes one unit from every coupling of a width group,
     so the heads of an attention keep equal widths);
   - ``"uniform"``: every coupling loses the same fraction of its units (the lowest scored);
   - ``"planner"``: EcoSpa's Algorithm 1 (``plan_round``: Eq. 6 ranks the couplings, the top
     ``top_k`` lose their lowest units by ``score`` while the kept mass stays above ``theta``),
     repeated until the round's size;
3. **remove and reconstruct**: each consumer's kept input columns (and bias) are refitted by
   least squares to give the outputs it gave before the round: ``W_K += W_S G_SK (G_KK + damp *
   mean(diag G_KK) * I)^-1`` (the consumer column update of OBS / SlimGPT, with the input Gram
   ``G`` from step 1); then the round's units are **cut out physically** (``ecospa.prune``), so
   the next round calibrates and refits the model as pruned so far, at its smaller size: later
   rounds cost less than the first. (With ``physical=False`` they are only zeroed and the model
   keeps its shapes: the same function, what the physical removal must equal, tested.)

``recover_steps`` steps of recovery fine-tuning follow if asked (:mod:`ecospa.coupling.recovery`:
distillation from the dense model's outputs by default).

**Progress** (``progress(stage, done, total)``): ``"compress"`` counts the calibration samples of
all rounds (an overall bar, whose rate gives the ETA); ``"round k/N calibrate"`` the samples of
round ``k``; ``"round k/N refit"`` the consumers refitted after it; ``"recover"`` the recovery.

Scores (``score``): ``"fisher"`` (default, the mask Fisher above); or any unit score of the
registry (``"eq9"``, ``"magnitude"``, ``"taylor"``, ``"random"``, ...), read from an
:class:`ecospa.Importance` fed by the same calibration pass (Eq. 6 for the planner's coupling
ranking). Why these defaults: bench/results/smollm2.md and docs/compress.md.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ecospa.coupling.calibration import (CalibrationError, CalibrationStats, LossFn, as_batches,
                                         calibrate, consumers_of, resolve_loss_fn)
from ecospa.coupling.calibration import split_samples
from ecospa.coupling.reconstruction import consumer_columns as _consumer_columns
from ecospa.coupling.reconstruction import reconstruct
from ecospa.coupling.reconstruction import zero_units as _zero_units
from ecospa.coupling.allocate import Allocation, allocate_global, allocate_planner, allocate_uniform
from ecospa.coupling.sharded import refuse_sharded
from ecospa.coupling.planner import ParamCounter, PlanConfig, resolve_target
from ecospa.coupling.scores import COUPLING_SCORES, UNIT_SCORES, lookup, needed_stats
from ecospa.errors import ConfigError, EcospaError
from ecospa.graph.ir import Coupling

__all__ = ["compress", "CompressReport", "CompressRound", "CompressError"]

log = logging.getLogger("ecospa")

Progress = Callable[[str, int, int], None]


class CompressError(EcospaError, ValueError):
    """A ``compress`` argument is invalid (the message names it and what to pass instead)."""


@dataclass(frozen=True)
class CompressRound:
    """One calibration round: sizes, what went (unit indices of the dense couplings), timings."""

    round: int
    params_before: int
    params_after: int
    removed: dict[str, tuple[int, ...]]
    calibration_loss: float
    calibration_seconds: float
    seconds: float

    @property
    def units_removed(self) -> int:
        """Units removed in this round, over every coupling."""
        return sum(len(v) for v in self.removed.values())


@dataclass(frozen=True)
class CompressReport:
    """What :func:`compress` did. Plain data: ``to_dict()`` / ``to_json()``.

    ``removed`` lists every removed unit per coupling name, in the numbering of the couplings
    the model had when ``compress`` was called (``ecospa.auto_couple`` of it).
    """

    params_before: int
    params_after: int
    target_params: int
    prunable_params: int
    score: str
    allocation: str
    head_widths: str
    reconstruct: bool
    rounds: tuple[CompressRound, ...]
    removed: dict[str, tuple[int, ...]]
    calibration_samples: int
    recover_steps: int = 0
    recovery: str | None = None
    recovery_losses: tuple[float, ...] = ()
    recovery_seconds: float = 0.0
    seconds: float = 0.0
    widths: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (dense, kept)

    @property
    def kept_fraction(self) -> float:
        """Kept share of the prunable parameters."""
        gone = self.params_before - self.params_after
        return 1.0 - gone / self.prunable_params if self.prunable_params else 1.0

    def to_dict(self) -> dict:
        """JSON-able dict (tuples become lists)."""
        d = asdict(self)
        d["kept_fraction"] = self.kept_fraction
        return json.loads(json.dumps(d))

    def to_json(self, **kwargs) -> str:
        """``json.dumps(self.to_dict())``."""
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        return (f"compress: {self.params_before} -> {self.params_after} params (target {self.target_params}, "
                f"{self.kept_fraction:.3f} of the prunable kept) in {len(self.rounds)} rounds, score "
                f"{self.score!r}, allocation {self.allocation!r}, {self.seconds:.0f} s")


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise CompressError(f"{name} should be an int >= {lo}, got {v!r}")
    return int(v)


def _example_inputs(batch: Any):
    if isinstance(batch, torch.Tensor):
        return (batch[:1],) if batch.dim() >= 2 else (batch,)
    return batch


def compress(model: nn.Module, target: int | float, data: Iterable[Any], *, loss_fn: LossFn | None = None,
             recover_steps: int = 0, score: str = "fisher", allocation: str = "global", rounds: int = 4,
             reconstruct: bool = True, damp: float = 0.01, head_widths: str = "ragged",
             min_units: int = 1, width_multiple: int = 1, calibration_batches: int | None = None,
             per_sample: bool = True, top_k: float = 0.3, theta: float = 0.9, coupling_score: str = "fisher",
             recovery: str = "distill", recover_lr: float = 1e-4, recover_data: Iterable[Any] | None = None,
             recover_loss_fn: Callable | None = None, recover_cpu_seconds: float | None = None,
             example_inputs=None, couplings=None, seed: int = 0, physical: bool = True,
             progress: Progress | None = None) -> tuple[nn.Module, CompressReport]:
    """Compress a trained ``model`` in place to ``target`` parameters; return ``(model, report)``.

    Args:
        model: any model ``ecospa.auto_couple`` understands (pruned in place).
        target: a float in (0, 1]: the fraction of the prunable parameters (those in exact
            couplings) to keep; or an int: the total parameter count to reach.
        data: iterable of calibration batches. For transformers causal LMs, ``(B, T)`` LongTensors
            of token ids (the loss is the next-token loss); otherwise anything ``loss_fn`` takes.
        loss_fn: ``(model, batch) -> scalar loss``; required unless the model is a causal LM.
        recover_steps: optimizer steps of recovery fine-tuning after pruning (0: none).
        score: unit score: ``"fisher"`` (mask Fisher, default) or a registered unit score name.
        allocation: ``"global"`` (default), ``"uniform"`` or ``"planner"`` (module docstring).
        rounds: calibration rounds (each recalibrates the partly pruned model).
        reconstruct: refit the consumers' kept columns by least squares after each round.
        damp: ridge of the reconstruction, relative to the mean diagonal of the Gram matrix.
        head_widths: ``"ragged"`` or ``"uniform"`` (equal widths inside each width group).
        min_units: units every coupling keeps; width_multiple: kept widths are multiples of it.
        calibration_batches: use at most this many batches of ``data`` for calibration.
        per_sample: split tensor batches into rows (one Fisher sample per row).
        top_k, theta, coupling_score: Algorithm 1's knobs, for ``allocation="planner"``.
        recovery: ``"distill"`` (KL to the dense model's outputs; default) or ``"lm"`` (``loss_fn``).
        recover_lr: peak learning rate of the recovery (AdamW, linear warm-up and decay).
        recover_data: batches for recovery (default: ``data``, cycled).
        recover_loss_fn: ``(student_out, teacher_out, batch) -> loss`` for ``"distill"``.
        recover_cpu_seconds: stop the recovery once the process used this much CPU time.
        example_inputs: inputs for ``auto_couple`` (default: the first batch, for plain modules).
        couplings: the model's couplings (default: ``ecospa.auto_couple``).
        seed: seed of random scores and of the recovery's data order.
        physical: cut the removed units out (default); False leaves them zeroed in a model of
            the original shapes (the same function: what the physical removal must equal).
        progress: ``progress(stage, done, total)`` callback; progress is also logged at DEBUG
            level on the ``"ecospa"`` logger.

    Raises:
        CompressError / ConfigError: an argument out of range (checked before anything changes).
        CalibrationError: empty data, no ``loss_fn`` for a non-LM model, a non-finite loss.
    """
    from ecospa.coupling.discovery import auto_couple
    from ecospa.coupling.executor import prune_pass

    t_start = time.perf_counter()
    # ------------------------------------------------------------- validate everything first
    if not isinstance(model, nn.Module):
        raise CompressError(f"model should be a torch.nn.Module, got {type(model).__name__}: call "
                            "ecospa.compress(model, target, data)")
    refuse_sharded(model, "ecospa.compress")
    rounds = _check_int("rounds", rounds, 1)
    recover_steps = _check_int("recover_steps", recover_steps, 0)
    if allocation not in ("global", "uniform", "planner"):
        raise CompressError(f"allocation should be 'global', 'uniform' or 'planner', got {allocation!r}")
    if score != "fisher" and score not in UNIT_SCORES:
        raise CompressError(f"score should be 'fisher' or one of {sorted(UNIT_SCORES)}, got {score!r}")
    if head_widths not in ("ragged", "uniform"):
        raise CompressError(f"head_widths should be 'ragged' or 'uniform', got {head_widths!r}")
    if recovery not in ("distill", "lm"):
        raise CompressError(f"recovery should be 'distill' or 'lm', got {recovery!r}")
    if not (isinstance(damp, (int, float)) and damp > 0 and math.isfinite(damp)):
        raise CompressError(f"damp should be a positive float, got {damp!r}")
    if allocation == "planner":
        lookup(COUPLING_SCORES, coupling_score, "coupling score")
    cfg = PlanConfig(target=target, min_units=min_units, width_multiple=width_multiple, top_k=top_k, theta=theta,
                     coupling_score=coupling_score, unit_score=score if score in UNIT_SCORES else "eq9",
                     head_widths=head_widths, seed=seed)
    batches = as_batches(data, calibration_batches)
    loss = resolve_loss_fn(model, loss_fn)
    cg = couplings if couplings is not None else auto_couple(
        model, example_inputs if example_inputs is not None or getattr(model, "dummy_inputs", None) is not None
        else _example_inputs(batches[0]))
    C = [c for c in cg if c.exact]
    if not C:
        raise CompressError(f"{type(model).__name__} has no exact coupling to prune "
                            f"({len(getattr(cg, 'inexact', ()))} inexact); nothing to compress")
    params = dict(model.named_parameters())
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    target_params = resolve_target(cfg, C, shapes)
    dense = _count(model)
    everything = ParamCounter(shapes)
    for c in C:
        everything.remove(c, range(c.width))
    prunable = dense - everything.total
    teacher = None
    if recover_steps > 0 and recovery == "distill":
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    def report_progress(stage: str, done: int, total: int) -> None:
        log.debug("ecospa compress: %s %d/%d", stage, done, total)
        if progress is not None:
            progress(stage, done, total)

    # ------------------------------------------------------------- rounds
    alive = {c.name: np.ones(c.width, dtype=bool) for c in C}  # dense numbering, for the report
    orig = {c.name: np.arange(c.width) for c in C}  # current index -> dense index (physical)
    cur_cg = cg  # the couplings of the model as it is now
    consumers = consumers_of(model, C)
    dead_cols: dict[str, set[int]] = {p: set() for p in consumers}  # masked rounds only
    history: list[CompressRound] = []
    samples = 0
    n_samples = sum(len(split_samples(b, per_sample)) for b in batches)
    log.info("ecospa compress: %d couplings, %d params (%d prunable), target %d", len(C), dense, prunable,
             target_params)
    for r in range(rounds):
        t0 = time.perf_counter()
        tag = f"round {r + 1}/{rounds}"
        if physical:  # the model as pruned so far: calibrate and refit it at its current size
            Cr = [c for c in cur_cg if c.exact and c.name in orig]
            shapes_r = {n: tuple(p.shape) for n, p in model.named_parameters()}
            alive_r = {c.name: np.ones(c.width, dtype=bool) for c in Cr}
            cons_r = consumers_of(model, Cr) if r else consumers
        else:  # the original shapes, removed units zeroed
            Cr, shapes_r, alive_r, cons_r = C, shapes, alive, consumers
        before = _total_after(shapes_r, Cr, alive_r)
        goal = int(round(dense - (r + 1) / rounds * (dense - target_params))) if r < rounds - 1 else target_params
        if before <= goal:
            report_progress("compress", (r + 1) * n_samples, rounds * n_samples)
            continue
        imp = None
        need_imp = score != "fisher" or allocation == "planner"
        if need_imp:
            from ecospa.coupling.importance import Importance
            stats_needed = needed_stats(coupling_score if allocation == "planner" else "magnitude", cfg.unit_score)
            imp = Importance(model, Cr, stats=stats_needed or ("sq",), seed=seed)

        def calib_progress(stage: str, done: int, total: int, r=r, tag=tag) -> None:
            report_progress(f"{tag} calibrate", done, total)
            report_progress("compress", r * n_samples + done, rounds * n_samples)

        stats = calibrate(model, Cr, batches, loss, grams=reconstruct, per_sample=per_sample, consumers=cons_r,
                          on_backward=imp.accumulate if imp is not None else None, progress=calib_progress)
        samples = stats.samples
        values = _unit_values(stats, imp, Cr, score, salt=r)
        alloc = Allocation(Cr, shapes_r, alive_r, values, min_keep=cfg.min_keep, multiple=width_multiple,
                           uniform_groups=head_widths == "uniform")
        if allocation == "global":
            removal = allocate_global(alloc, goal)
        elif allocation == "uniform":
            removal = allocate_uniform(alloc, goal)
        else:
            removal = allocate_planner(alloc, goal, imp, cfg, cur_cg, salt=r)
        removal = {n: sorted(int(u) for u in v) for n, v in removal.items() if len(v)}
        by_name = {c.name: c for c in Cr}
        params = dict(model.named_parameters())
        cols = _consumer_columns(Cr, cons_r, removal) if cons_r else {}
        if reconstruct:  # before removing: the update reads the removed columns' weights
            todo = [pname for pname in cols if pname in stats.grams]
            for k, pname in enumerate(todo):
                reconstruct_fn(params, cons_r[pname], stats.grams[pname], stats.means[pname], cols[pname],
                               set() if physical else dead_cols[pname], damp)
                report_progress(f"{tag} refit", k + 1, len(todo))
        dense_ids = {n: orig[n][np.asarray(u, dtype=np.int64)] for n, u in removal.items()}
        for n, ids in dense_ids.items():
            alive[n][ids] = False
        if physical:
            if removal:
                cur_cg = prune_pass(model, removal, couplings=cur_cg).couplings
            for n, u in removal.items():
                orig[n] = np.delete(orig[n], np.asarray(u, dtype=np.int64))
            after_total = _count(model)
        else:
            for pname, removed in cols.items():
                dead_cols[pname] |= removed
            for name, units in removal.items():
                _zero_units(params, by_name[name], units)
            after_total = _total_after(shapes, C, alive)
        rec = CompressRound(r, before, after_total, {n: tuple(int(i) for i in np.sort(v)) for n, v in dense_ids.items()},
                            stats.loss, stats.seconds, time.perf_counter() - t0)
        history.append(rec)
        log.info("ecospa compress: round %d/%d: %d units from %d couplings, params %d -> %d (calibration loss "
                 "%.4f, %.1f s)", r + 1, rounds, rec.units_removed, len(removal), before, after_total, stats.loss,
                 rec.seconds)
    removed_all = {c.name: tuple(int(u) for u in np.nonzero(~alive[c.name])[0]) for c in C}
    widths = {c.name: (c.width, int(alive[c.name].sum())) for c in C}
    # ------------------------------------------------------------- recovery
    losses: tuple[float, ...] = ()
    rec_seconds = 0.0
    if recover_steps > 0:
        from ecospa.coupling.recovery import recover

        t0 = time.perf_counter()
        rdata = as_batches(recover_data) if recover_data is not None else batches
        losses = tuple(recover(model, rdata, steps=recover_steps, teacher=teacher, loss_fn=loss,
                               distill_fn=recover_loss_fn, lr=recover_lr, max_cpu_seconds=recover_cpu_seconds,
                               seed=seed, progress=report_progress))
        rec_seconds = time.perf_counter() - t0
        del teacher
    report = CompressReport(
        params_before=dense, params_after=_count(model), target_params=target_params, prunable_params=prunable,
        score=score, allocation=allocation, head_widths=head_widths, reconstruct=bool(reconstruct),
        rounds=tuple(history), removed={k: v for k, v in removed_all.items() if v}, calibration_samples=samples,
        recover_steps=recover_steps, recovery=recovery if recover_steps > 0 else None, recovery_losses=losses,
        recovery_seconds=rec_seconds, seconds=time.perf_counter() - t_start, widths=widths)
    log.info("ecospa %s", report)
    return model, report


reconstruct_fn = reconstruct


def _total_after(shapes, couplings, alive) -> int:
    """Parameters of a model of ``shapes`` once the units not ``alive`` of ``couplings`` are gone."""
    counter = ParamCounter(shapes)
    for c in couplings:
        gone = np.nonzero(~alive[c.name])[0]
        if gone.size:
            counter.remove(c, gone)
    return counter.total


def _unit_values(stats: CalibrationStats, imp, couplings: Sequence[Coupling], score: str,
                 salt: int) -> dict[str, np.ndarray]:
    """``{coupling: (width,) float64}``: the cost of removing each unit (smaller goes first)."""
    if score == "fisher":
        return {c.name: stats.unit_loss(c.name).numpy() for c in couplings}
    fn = lookup(UNIT_SCORES, score, "unit score")
    return {c.name: np.asarray(torch.as_tensor(fn(imp, c, salt)).double().cpu()) for c in couplings}
