"""Importance of couplings (Eq. 6, coupled empirical Fisher) and of their units (Eq. 9).

:class:`Importance` is fed by the gradients of ordinary training steps (``accumulate()`` after
``loss.backward()``, no extra forward or backward pass) and scores, on demand:

- a whole coupling (``coupling_scores``), default ``"fisher"`` (Eq. 6)::

      I(c) = 1/K * sum_k  1/|W_k| * 1/|D| * sum_{entries of W_k in c} (dL/dW)^2

  where the K = 2 "matrices" of a coupling are the two sides of its product: W_1 every slice
  that produces the units (rows of W_in and its bias; a GLU's gate and up rows together; a
  head's q rows; all the q heads of a GQA group) and W_2 every slice that reads them (columns
  of W_out; the head's k rows). So a fused and an unfused layout of one model score the same.
  ``|W_k|`` counts the entries of side k inside the coupling and ``|D|`` the number of
  ``accumulate()`` calls since the last ``reset()``; a coupling with one side has K = 1.
- every unit of a coupling (``unit_scores``), default ``"eq9"`` (Eq. 9)::

      a_j = sum of |w| over the producer slices of unit j     (rows of W_in, its bias, ...)
      b_j = sum of |w| over the reader slices of unit j       (columns of W_out)
      v_j = a_j * b_j / sum_l a_l * b_l

Every unit score is normalised to sum to 1, so the planner's ``theta`` means the same for each.
The baselines (``magnitude``, ``taylor``, ``random``) and the registries that hold every score
are in :mod:`ecospa.scoring.scores`; checked against numpy in ``tests/scoring/test_importance.py``
(and against the zoo's ground-truth sides).

**Which side is which**: :mod:`ecospa.scoring.sides`.

**Cost.** Per step and per tracked ``(param, dim)``: one reduction of ``grad**2`` to a
per-channel vector added to an accumulator (float32; float64 for float64 parameters), no
per-slice work; slices are gathered into couplings only when scoring. ``taylor`` adds one
product and reduction per parameter. ``bench/bench_importance_overhead.py`` measures it.
"""
from __future__ import annotations

import math
import warnings
import zlib
from typing import Iterable, Mapping

import torch
import torch.nn as nn

from ecospa.scoring.scores import COUPLING_SCORES, UNIT_SCORES, lookup
from ecospa.scoring.sides import build_index
from ecospa.errors import ConfigError, EcospaError, NonFiniteGradientWarning
from ecospa.ir.coupling import Coupling

__all__ = ["Importance", "normalise"]


def normalise(x: torch.Tensor) -> torch.Tensor:
    """``x / x.sum()`` as float64; uniform when the sum is not positive and finite. Shape kept."""
    x = x.double()
    s = float(x.sum())
    if not math.isfinite(s) or s <= 0.0:
        return torch.full_like(x, 1.0 / max(1, x.numel()))
    return x / s


_CHUNK = 1 << 20  # entries per block in column reductions (4 MiB of float32)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision and float32 parameters, float64 for float64 ones."""
    return torch.promote_types(dtype, torch.float32)


def _channel_reduce(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``(x**2).sum`` over every dim but ``dim``: ``(shape[dim],)``, at least float32, one pass."""
    dtype = _acc_dtype(x.dtype)
    if x.dim() == 1:
        return x.to(dtype).square()
    other = [d for d in range(x.dim()) if d != dim]
    if dim == 0 and x.is_contiguous():  # rows: a fused norm over contiguous memory is fastest
        return torch.linalg.vector_norm(x, 2, dim=other, dtype=dtype).square_()
    if x.dim() == 2 and dim == 1:  # columns: strided norms are slow on CPU and a full-size
        out = torch.zeros(x.shape[1], dtype=dtype, device=x.device)  # temporary thrashes the
        for rows in x.split(max(1, _CHUNK // x.shape[1])):  # cache: square blocks of rows
            out.add_(rows.to(dtype).square().sum(0))
        return out
    return x.to(dtype).square().sum(other)


class Importance:
    """Gradient statistics of a model's couplings, and the scores computed from them.

    Args:
        model: the model whose ``named_parameters()`` the couplings refer to.
        couplings: the couplings to score (a ``CouplingGraph`` or any iterable of them).
        stats: which gradient statistics to accumulate: ``"sq"`` (squared gradients, for
            ``fisher``) and/or ``"wg"`` (``|w * g|``, for ``taylor``).
        seed: seed of the ``random`` scores.
    """

    def __init__(self, model: nn.Module, couplings: Iterable[Coupling], *,
                 stats: Iterable[str] = ("sq",), seed: int = 0):
        stats = tuple(stats)
        bad = [s for s in stats if s not in ("sq", "wg")]
        if bad:
            raise ConfigError(f"unknown gradient statistics {bad}; choose from 'sq', 'wg'")
        self.model, self.stats, self.seed = model, stats, int(seed)
        self.rebind(couplings)

    # ----------------------------------------------------------------- bookkeeping
    def rebind(self, couplings: Iterable[Coupling]) -> None:
        """Index new couplings (for example after pruning) and ``reset()`` the statistics."""
        self.params: dict[str, nn.Parameter] = dict(self.model.named_parameters())
        self.couplings = tuple(c for c in couplings)
        shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        devices = {n: p.device for n, p in self.params.items()}
        for c in self.couplings:
            missing = [t.param for t in c.tables if t.param not in self.params]
            if missing:
                raise EcospaError(f"coupling {c.name!r} names parameters {missing} that the model does "
                                  "not have; pass the couplings found on this model")
        self._index = {c.name: build_index(c, shapes, devices) for c in self.couplings}
        dims: dict[str, set[int]] = {}
        for ix in self._index.values():
            for part in ix.parts:
                dims.setdefault(part.param, set()).add(part.dim)
        self._tracked = [(n, self.params[n], tuple(sorted(ds))) for n, ds in dims.items()]
        self._on_cpu = any(p.device.type == "cpu" for _, p, _ in self._tracked)
        self._l1_cache: dict[tuple[str, int], tuple[int, int, torch.Tensor]] = {}
        self.reset()

    @property
    def tracked_params(self) -> int:
        """Entries of the parameters whose gradients ``accumulate()`` reads."""
        return sum(p.numel() for _, p, _ in self._tracked)

    def reset(self) -> None:
        """Forget the accumulated statistics (``num_batches`` back to 0)."""
        self.num_batches = 0
        self.skipped = getattr(self, "skipped", 0)  # steps with non-finite gradients, never reset
        self._acc: dict[str, dict[tuple[str, int], torch.Tensor]] = {
            s: {(n, d): torch.zeros(p.shape[d], dtype=_acc_dtype(p.dtype), device=p.device)
                for n, p, ds in self._tracked for d in ds}
            for s in self.stats
        }

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add the current ``.grad`` of every tracked parameter; call once per optimizer step.

        Parameters without a gradient are skipped; ``num_batches`` (Eq. 6's ``|D|``) still counts.

        **Non-finite gradients** (NaN or Inf in any tracked gradient, or a square that overflows):
        the whole step is skipped, nothing is added and ``num_batches`` does not count it, so one
        bad batch (an fp16 overflow, a loss spike) never poisons the scores. Each skip issues a
        :class:`~ecospa.errors.NonFiniteGradientWarning` (``warnings.warn``) naming the
        parameters, and is counted in ``skipped``. Returns False for a skipped step, else True.

        On CPU the reductions run on one thread: they are memory-bound, and with several threads
        each op pays a thread barrier, which costs milliseconds per op when other processes
        share the cores (measured on GPT-2 small, 2 cores shared: 940 ms -> 32 ms per call).
        """
        threads = torch.get_num_threads()
        single = threads > 1 and self._on_cpu
        if single:
            torch.set_num_threads(1)
        try:
            added = self._accumulate()
        finally:
            if single:
                torch.set_num_threads(threads)
        if not added:
            self.skipped = getattr(self, "skipped", 0) + 1
            bad = [n for n, p, _ in self._tracked if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
            where = (", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
                     if bad else "a squared gradient (float overflow)")
            warnings.warn(
                f"ecospa: non-finite gradients (NaN or Inf) in {where}; skipped this step's Eq. 6 "
                f"statistics ({self.skipped} step(s) skipped so far, {self.num_batches} counted since the "
                "last round). If this repeats, lower the learning rate or use a loss scaler / gradient "
                "clipping before EcoSpa.step()", NonFiniteGradientWarning, stacklevel=2)
            return False
        self.num_batches += 1
        return True

    def _accumulate(self) -> bool:
        """Reduce every gradient, then add the reductions only if all of them are finite."""
        sq, wg = self._acc.get("sq"), self._acc.get("wg")
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, p, dims in self._tracked:
            g = p.grad
            if g is None:
                continue
            if sq is not None:
                if len(dims) == 1:
                    pending.append((sq[(name, dims[0])], _channel_reduce(g, dims[0])))
                else:
                    g2 = g.to(_acc_dtype(g.dtype)).square()
                    for d in dims:
                        pending.append((sq[(name, d)], g2.sum([o for o in range(g.dim()) if o != d])))
            if wg is not None:
                a = (p.detach() * g).abs_().to(_acc_dtype(g.dtype))
                for d in dims:
                    other = [o for o in range(g.dim()) if o != d]
                    pending.append((wg[(name, d)], a.sum(other) if other else a))
        flags: dict[torch.device, list[torch.Tensor]] = {}
        for _, v in pending:  # NaN/Inf in a gradient reaches its reductions: one check per device
            flags.setdefault(v.device, []).append(torch.isfinite(v).all())
        if not all(bool(torch.stack(f).all()) for f in flags.values()):
            return False
        for acc, v in pending:
            acc.add_(v)
        return True

    @torch.no_grad()
    def all_reduce(self, group=None) -> None:
        """Average the accumulated statistics over the ranks of a ``torch.distributed`` group
        (None: the default group), in place; ``num_batches`` becomes the largest over the ranks.

        A collective: every rank of the group must call it at the same point. Under DDP the
        ranks' gradients are already the average over the global batch, so this leaves Eq. 6
        what a single process on the combined batches computes, and makes it identical on every
        rank (bit for bit), so every rank plans the same removal. With ranks that see only
        their own gradients (no gradient all-reduce), it averages their squared gradients.
        """
        import torch.distributed as dist

        world = dist.get_world_size(group)
        if world <= 1:
            return
        nccl = "nccl" in str(dist.get_backend(group)).lower() and torch.cuda.is_available()
        comm = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        buckets: dict[torch.dtype, list[torch.Tensor]] = {}
        for s in self.stats:  # fixed order: the same collectives on every rank
            for key in sorted(self._acc[s]):
                v = self._acc[s][key]
                buckets.setdefault(v.dtype, []).append(v)
        for dtype in sorted(buckets, key=str):
            ts = buckets[dtype]
            flat = torch.cat([t.reshape(-1).to(comm) for t in ts])
            dist.all_reduce(flat, group=group)
            flat.div_(world)
            offset = 0
            for t in ts:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
        n = torch.tensor([self.num_batches], dtype=torch.long, device=comm)
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
        self.num_batches = int(n.item())

    def state_dict(self) -> dict:
        """Accumulators (CPU copies) and ``num_batches``."""
        return {"num_batches": self.num_batches,
                "acc": {s: {f"{n}:{d}": v.cpu() for (n, d), v in acc.items()} for s, acc in self._acc.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` returned, on the same couplings."""
        self.num_batches = int(state["num_batches"])
        for s, acc in state["acc"].items():
            for key, v in acc.items():
                n, d = key.rsplit(":", 1)
                cur = self._acc[s][(n, int(d))]
                if cur.shape != v.shape:
                    raise EcospaError(f"accumulator {key!r} has shape {tuple(v.shape)}, expected "
                                      f"{tuple(cur.shape)}: restore the plan before the statistics")
                cur.copy_(v)

    # ----------------------------------------------------------------- per channel
    def channel(self, stat: str, param: str, dim: int) -> torch.Tensor:
        """Per-channel statistic ``(shape[dim],)``: ``"sq"``, ``"wg"`` (sums over steps) or ``"l1"``."""
        if stat == "l1":
            p = self.params[param]
            key = (param, dim)
            hit = self._l1_cache.get(key)
            if hit is not None and hit[0] == p._version and hit[1] == p.data_ptr():
                return hit[2]
            with torch.no_grad():
                other = [o for o in range(p.dim()) if o != dim]
                v = p.detach().abs().to(_acc_dtype(p.dtype))
                v = v.sum(other) if other else v
            self._l1_cache[key] = (p._version, p.data_ptr(), v)
            return v
        if stat not in self._acc:
            raise ConfigError(f"statistic {stat!r} is not accumulated here (have {list(self._acc)}); "
                              f"build Importance with stats including {stat!r}")
        return self._acc[stat][(param, dim)]

    def per_unit(self, c: Coupling | str, stat: str, side: int | None = None) -> torch.Tensor:
        """``(width,)`` float64: the statistic summed over every slice of each unit (one side only
        when ``side`` is 0 (producers) or 1 (readers))."""
        ix = self._index[c if isinstance(c, str) else c.name]
        out = torch.zeros(ix.coupling.width, dtype=torch.float64)
        for part in ix.parts:
            if side is not None and part.side != side:
                continue
            vals = self.channel(stat, part.param, part.dim)[part.channels]
            out.index_add_(0, part.units.cpu(), vals.double().cpu())
        return out

    def per_matrix_mean(self, c: Coupling | str, stat: str) -> float:
        """Average over the coupling's sides of (statistic summed over the side's slices /
        number of its entries): Eq. 6 without the ``1/|D|``, for ``stat="sq"``."""
        ix = self._index[c if isinstance(c, str) else c.name]
        sums = [0.0] * len(ix.matrix_numel)
        for part in ix.parts:
            sums[part.matrix] += float(self.channel(stat, part.param, part.dim)[part.channels].double().sum())
        terms = [s / n for s, n in zip(sums, ix.matrix_numel) if n > 0]
        return sum(terms) / len(terms) if terms else 0.0

    def sides(self, c: Coupling | str) -> set[int]:
        """Which sides (0 producers, 1 readers) the coupling has."""
        return {p.side for p in self._index[c if isinstance(c, str) else c.name].parts}

    def generator(self, name: str, salt: int = 0) -> torch.Generator:
        """A generator seeded by ``(seed, salt, name)``: same draws for the same round and coupling."""
        key = (self.seed * 1_000_003 + salt * 7_919 + zlib.crc32(name.encode())) % (2 ** 62)
        return torch.Generator().manual_seed(key)

    # ----------------------------------------------------------------- scores
    def coupling_scores(self, method: str = "fisher", *, salt: int = 0) -> dict[str, float]:
        """``{coupling name: score}``, smaller = less important (Eq. 6 for ``"fisher"``)."""
        fn = lookup(COUPLING_SCORES, method, "coupling score")
        return {c.name: float(fn(self, c, salt)) for c in self.couplings}

    def unit_scores(self, c: Coupling | str, method: str = "eq9", *, salt: int = 0) -> torch.Tensor:
        """``(width,)`` float64 scores of the units of ``c``, summing to 1 (Eq. 9 for ``"eq9"``)."""
        fn = lookup(UNIT_SCORES, method, "unit score")
        c = self._index[c if isinstance(c, str) else c.name].coupling
        return normalise(fn(self, c, salt))
