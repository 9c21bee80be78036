"""One-shot compression of a trained model: ``ecospa.compress(model, target, data)``.

The knobs are the fields of :class:`~ecospa.CompressConfig` (``compression/config.py``).

Rounds (``rounds``, default 4). In round ``r`` of ``R`` the model goes down to
``dense - (r / R) * (dense - target)`` parameters:

1. **calibrate** (:mod:`ecospa.compression.calibration`): forward + backward on the calibration
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

``recover_steps`` steps of recovery fine-tuning follow if asked (:mod:`ecospa.compression.recovery`:
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
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ecospa.capture.sharded import refuse_sharded
from ecospa.compression.allocate import (Allocation, allocate_global, allocate_planner, allocate_uniform,
                                         merged_alive, merged_values)
from ecospa.compression.calibration import (CalibrationStats, LossFn, as_batches, calibrate, consumers_of,
                                            resolve_loss_fn, split_samples)
from ecospa.compression.config import CompressConfig, CompressError
from ecospa.compression.reconstruction import consumer_columns, reconstruct, zero_units
from ecospa.ir.coupling import Coupling
from ecospa.schedule.budget import ParamCounter, resolve_target
from ecospa.schedule.exportable import check_exportable_target, exportable_rules, view
from ecospa.scoring.scores import UNIT_SCORES, lookup, needed_stats

__all__ = ["compress", "CompressConfig", "CompressReport", "CompressRound", "CompressError"]

log = logging.getLogger("ecospa")

Progress = Callable[[str, int, int], None]


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


def _example_inputs(batch: Any):
    if isinstance(batch, torch.Tensor):
        return (batch[:1],) if batch.dim() >= 2 else (batch,)
    return batch


def compress(model: nn.Module, target: int | float, data: Iterable[Any], *, config: CompressConfig | None = None,
             loss_fn: LossFn | None = None, recover_data: Iterable[Any] | None = None,
             recover_loss_fn: Callable | None = None, example_inputs=None, couplings=None,
             progress: Progress | None = None, **options) -> tuple[nn.Module, CompressReport]:
    """Compress a trained ``model`` in place to ``target`` parameters; return ``(model, report)``.

    Args:
        model: any model ``ecospa.auto_couple`` understands (pruned in place).
        target: a float in (0, 1]: the fraction of the prunable parameters (those in exact
            couplings) to keep; or an int: the total parameter count to reach.
        data: iterable of calibration batches. For transformers causal LMs, ``(B, T)`` LongTensors
            of token ids (the loss is the next-token loss); otherwise anything ``loss_fn`` takes.
        config: the knobs (:class:`~ecospa.CompressConfig`: rounds, score, allocation,
            reconstruct, head_widths, recovery, ...; ``CompressConfig.help()`` lists them).
        **options: any knob of :class:`~ecospa.CompressConfig` by name (``rounds=2``,
            ``recover_steps=100``), overriding ``config``.
        loss_fn: ``(model, batch) -> scalar loss``; required unless the model is a causal LM.
        recover_data: batches for recovery (default: ``data``, cycled).
        recover_loss_fn: ``(student_out, teacher_out, batch) -> loss`` for ``recovery="distill"``.
        example_inputs: inputs for ``auto_couple`` (default: the first batch, for plain modules).
        couplings: the model's couplings (default: ``ecospa.auto_couple``).
        progress: ``progress(stage, done, total)`` callback; progress is also logged at DEBUG
            level on the ``"ecospa"`` logger.

    Raises:
        CompressError / ConfigError: an argument out of range (checked before anything changes).
        CalibrationError: empty data, no ``loss_fn`` for a non-LM model, a non-finite loss.
    """
    from ecospa.analysis.auto_couple import auto_couple

    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise CompressError(f"model should be a torch.nn.Module, got {type(model).__name__}: call "
                            "ecospa.compress(model, target, data)")
    refuse_sharded(model, "ecospa.compress")
    cfg = CompressConfig.merged(config, options)
    batches = as_batches(data, cfg.calibration_batches)
    loss = resolve_loss_fn(model, loss_fn)
    cg = couplings if couplings is not None else auto_couple(
        model, example_inputs if example_inputs is not None or getattr(model, "dummy_inputs", None) is not None
        else _example_inputs(batches[0]))
    run = _Run(model, cfg, target, cg, batches, loss, progress)
    for r in range(cfg.rounds):
        run.round(r)
    losses, rec_seconds = run.recover(recover_data, recover_loss_fn)
    removed_all = {c.name: tuple(int(u) for u in np.nonzero(~run.alive[c.name])[0]) for c in run.C}
    report = CompressReport(
        params_before=run.dense, params_after=_count(model), target_params=run.target_params,
        prunable_params=run.prunable, score=cfg.score, allocation=cfg.allocation, head_widths=cfg.head_widths,
        reconstruct=bool(cfg.reconstruct), rounds=tuple(run.history), removed={k: v for k, v in removed_all.items() if v},
        calibration_samples=run.samples, recover_steps=cfg.recover_steps,
        recovery=cfg.recovery if cfg.recover_steps > 0 else None, recovery_losses=losses,
        recovery_seconds=rec_seconds, seconds=time.perf_counter() - t_start,
        widths={c.name: (c.width, int(run.alive[c.name].sum())) for c in run.C})
    log.info("ecospa %s", report)
    return model, report


class _Run:
    """One compression: what is known before the rounds, and what each round changes.

    ``alive`` and ``orig`` are in the numbering of the dense couplings ``C``: per coupling, which
    units are still there, and the dense index of each current unit (physical rounds renumber).
    """

    def __init__(self, model: nn.Module, cfg: CompressConfig, target, cg, batches, loss, progress):
        self.model, self.cfg, self.batches, self.loss, self.progress = model, cfg, batches, loss, progress
        self.plan = cfg.plan_config(target)
        self.C = [c for c in cg if c.exact]
        if not self.C:
            raise CompressError(f"{type(model).__name__} has no exact coupling to prune "
                                f"({len(getattr(cg, 'inexact', ()))} inexact); nothing to compress")
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.target_params = resolve_target(self.plan, self.C, self.shapes)
        self.rules = None
        if cfg.exportable:  # what the config can state: probed once, on the dense couplings
            self.rules = exportable_rules(self.C, model)
            check_exportable_target(self.plan, self.C, self.rules, self.shapes, self.target_params)
        self.dense = _count(model)
        everything = ParamCounter(self.shapes)
        for c in self.C:
            everything.remove(c, range(c.width))
        self.prunable = self.dense - everything.total
        self.teacher = None
        if cfg.recover_steps > 0 and cfg.recovery == "distill":
            self.teacher = copy.deepcopy(model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.alive = {c.name: np.ones(c.width, dtype=bool) for c in self.C}
        self.orig = {c.name: np.arange(c.width) for c in self.C}
        self.cur_cg = cg  # the couplings of the model as it is now
        self.consumers = consumers_of(model, self.C)
        self.dead_cols: dict[str, set[int]] = {p: set() for p in self.consumers}  # masked rounds only
        self.history: list[CompressRound] = []
        self.samples = 0
        self.n_samples = sum(len(split_samples(b, cfg.per_sample)) for b in batches)
        log.info("ecospa compress: %d couplings, %d params (%d prunable), target %d", len(self.C), self.dense,
                 self.prunable, self.target_params)

    def report_progress(self, stage: str, done: int, total: int) -> None:
        log.debug("ecospa compress: %s %d/%d", stage, done, total)
        if self.progress is not None:
            self.progress(stage, done, total)

    def _now(self):
        """The couplings, shapes, alive masks and consumers a round works on: the model as pruned
        so far (physical), or the dense shapes with removed units zeroed."""
        if self.cfg.physical:
            Cr = [c for c in self.cur_cg if c.exact and c.name in self.orig]
            shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters()}
            alive = {c.name: np.ones(c.width, dtype=bool) for c in Cr}
            return Cr, shapes, alive, (consumers_of(self.model, Cr) if self.history else self.consumers)
        return self.C, self.shapes, self.alive, self.consumers

    def round(self, r: int) -> None:
        """Calibrate, allocate, refit and remove: the model goes down to this round's goal."""
        cfg, rounds, n = self.cfg, self.cfg.rounds, self.n_samples
        t0 = time.perf_counter()
        tag = f"round {r + 1}/{rounds}"
        Cr, shapes_r, alive_r, cons_r = self._now()
        before = _total_after(shapes_r, Cr, alive_r)
        goal = (int(round(self.dense - (r + 1) / rounds * (self.dense - self.target_params))) if r < rounds - 1
                else self.target_params)
        if before <= goal:
            self.report_progress("compress", (r + 1) * n, rounds * n)
            return
        imp = None
        if cfg.score != "fisher" or cfg.allocation == "planner":
            from ecospa.scoring.importance import Importance
            stats_needed = needed_stats(cfg.coupling_score if cfg.allocation == "planner" else "magnitude",
                                        self.plan.unit_score)
            imp = Importance(self.model, Cr, stats=stats_needed or ("sq",), seed=cfg.seed)

        def calib_progress(stage: str, done: int, total: int) -> None:
            self.report_progress(f"{tag} calibrate", done, total)
            self.report_progress("compress", r * n + done, rounds * n)

        stats = calibrate(self.model, Cr, self.batches, self.loss, grams=cfg.reconstruct, per_sample=cfg.per_sample,
                          consumers=cons_r, on_backward=imp.accumulate if imp is not None else None,
                          progress=calib_progress)
        self.samples = stats.samples
        removal = self._allocate(Cr, shapes_r, alive_r, _unit_values(stats, imp, Cr, cfg.score, salt=r), goal, imp, r)
        cols = consumer_columns(Cr, cons_r, removal) if cons_r else {}
        if cfg.reconstruct:  # before removing: the update reads the removed columns' weights
            params = dict(self.model.named_parameters())
            todo = [pname for pname in cols if pname in stats.grams]
            for k, pname in enumerate(todo):
                reconstruct_fn(params, cons_r[pname], stats.grams[pname], stats.means[pname], cols[pname],
                               set() if cfg.physical else self.dead_cols[pname], cfg.damp)
                self.report_progress(f"{tag} refit", k + 1, len(todo))
        dense_ids = {name: self.orig[name][np.asarray(u, dtype=np.int64)] for name, u in removal.items()}
        for name, ids in dense_ids.items():
            self.alive[name][ids] = False
        after = self._remove(Cr, removal, cols)
        rec = CompressRound(r, before, after, {k: tuple(int(i) for i in np.sort(v)) for k, v in dense_ids.items()},
                            stats.loss, stats.seconds, time.perf_counter() - t0)
        self.history.append(rec)
        log.info("ecospa compress: round %d/%d: %d units from %d couplings, params %d -> %d (calibration loss "
                 "%.4f, %.1f s)", r + 1, rounds, rec.units_removed, len(removal), before, after, stats.loss,
                 rec.seconds)

    def _allocate(self, Cr, shapes_r, alive_r, values, goal: int, imp, r: int) -> dict[str, list[int]]:
        cfg = self.cfg
        ev = None
        if self.rules is not None and cfg.allocation != "planner":  # the planner merges on its own
            ev = view(Cr, self.rules, alive_r)
            orig_alive = alive_r
            Cr, values, alive_r = ev.couplings, merged_values(ev, values, alive_r), merged_alive(ev, alive_r)
        alloc = Allocation(Cr, shapes_r, alive_r, values, min_keep=self.plan.min_keep, multiple=cfg.width_multiple,
                           uniform_groups=cfg.head_widths == "uniform",
                           lockstep=ev.blocks if ev is not None else None, min_heads=self.plan.min_units)
        if cfg.allocation == "global":
            removal = allocate_global(alloc, goal)
        elif cfg.allocation == "uniform":
            removal = allocate_uniform(alloc, goal)
        else:
            removal = allocate_planner(alloc, goal, imp, self.plan, self.cur_cg, salt=r, rules=self.rules)
        if ev is not None:
            removal = ev.expand(removal, alive=orig_alive)
        return {name: sorted(int(u) for u in v) for name, v in removal.items() if len(v)}

    def _remove(self, Cr, removal: dict[str, list[int]], cols) -> int:
        """Cut the round's units out (physical) or zero them; the parameter count after."""
        from ecospa.pruning.apply import prune_pass

        if self.cfg.physical:
            if removal:
                self.cur_cg = prune_pass(self.model, removal, couplings=self.cur_cg).couplings
            for name, u in removal.items():
                self.orig[name] = np.delete(self.orig[name], np.asarray(u, dtype=np.int64))
            return _count(self.model)
        params = dict(self.model.named_parameters())
        by_name = {c.name: c for c in Cr}
        for pname, removed in cols.items():
            self.dead_cols[pname] |= removed
        for name, units in removal.items():
            zero_units(params, by_name[name], units)
        return _total_after(self.shapes, self.C, self.alive)

    def recover(self, recover_data, recover_loss_fn) -> tuple[tuple[float, ...], float]:
        """Recovery fine-tuning, if asked: ``(losses, seconds)``."""
        cfg = self.cfg
        if cfg.recover_steps <= 0:
            return (), 0.0
        from ecospa.compression.recovery import recover

        t0 = time.perf_counter()
        rdata = as_batches(recover_data) if recover_data is not None else self.batches
        losses = tuple(recover(self.model, rdata, steps=cfg.recover_steps, teacher=self.teacher, loss_fn=self.loss,
                               distill_fn=recover_loss_fn, lr=cfg.recover_lr, max_cpu_seconds=cfg.recover_cpu_seconds,
                               seed=cfg.seed, progress=self.report_progress))
        self.teacher = None
        return losses, time.perf_counter() - t0


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
