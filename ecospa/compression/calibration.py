"""Calibration statistics for one-shot compression, gathered without updating any weight.

:func:`calibrate` runs the model on calibration batches (forward and backward, in eval mode) and
returns, for every coupling it is given:

- **the Fisher of each unit's mask** (``fisher``, ``(width,)`` float64): put a multiplicative
  mask ``m_j`` (1 in the dense model) on unit ``j``'s channel; per calibration sample ``s``
  ``d_j(s) = dL_s / dm_j`` and ``fisher_j = sum_s d_j(s)**2``. Removing unit ``j`` sets ``m_j``
  to 0, so ``fisher_j / (2 * samples)`` estimates the loss it costs (second order, the first
  order term averaging to ~0 on a trained model; Kwon et al. 2022, "A Fast Post-Training
  Pruning Framework for Transformers"). ``d_j`` needs no hook: every slice on the *reader* side
  of a coupling (``SliceTable.side == 1``: a consumer column, a head's ``k`` rows) is linear in
  the unit's channel, so ``d_j = sum over those slices of w * dL/dw``. The scores are in units
  of loss, so they compare across layers and kinds: that is what lets compress allocate
  globally.
- **input Gram matrices of the consumers** (``grams``): for every linear-like module that reads
  a coupling's units (a site with role ``"in"``), ``X^T X / tokens`` ``(n_in, n_in)`` float32
  and the input mean ``(n_in,)``, from a forward hook. They drive the least-squares
  reconstruction of the consumers after removal (``compress(reconstruct=True)``). On a model
  already pruned (``compress`` prunes after every round), the pruned regions run their narrow
  graphs, at the kept widths: a narrow graph calls no module, so while a region is captured the
  hook puts ``ecospa::observe(out, x, weight)`` in its graph (``ecospa.ops.observe``), and the
  narrow graph hands the consumer's narrow input, with the dense position of each column, to the
  Gram. A region on its exact path calls the module at the dense width; the hook keeps the
  columns the pruned weight still has. Either way the Gram matches the weight. A module whose
  input has neither width gets no Gram, nor does one whose hook missed a sample.

**Samples.** A batch that is a tensor (token ids, ``(B, T)``) is split into its ``B`` rows, one
sample each (``per_sample=True``): the Fisher is a sum over samples, so more, smaller samples
estimate it better at the same cost. Other batches (dicts, tuples, anything ``loss_fn`` reads)
are one sample each.

**Cost.** One forward and one backward per sample. Only the reader-side parameters require
gradients during the pass (the others' weight gradients, the embedding's included, are never
computed); every ``requires_grad`` flag, ``.grad`` and the train/eval mode are restored after.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from ecospa.ir.record import param_records
from ecospa.errors import EcospaError
from ecospa.ir.coupling import Coupling
from ecospa.ops.observe import is_unobserved, observe, observing

__all__ = [
    "CalibrationError",
    "split_samples",
    "LossFn",
    "Consumer",
    "CalibrationStats",
    "as_batches",
    "causal_lm_loss",
    "resolve_loss_fn",
    "consumers_of",
    "calibrate",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]
Progress = Callable[[str, int, int], None]


class CalibrationError(EcospaError, ValueError):
    """Calibration data or loss unusable: empty data, no loss function, a non-finite loss."""


def as_batches(data: Iterable[Any], limit: int | None = None) -> list[Any]:
    """The calibration batches as a list (an iterator is consumed once), at most ``limit``.

    Raises:
        CalibrationError: ``data`` is not iterable or holds no batch.
    """
    if isinstance(data, (torch.Tensor, Mapping)):
        if isinstance(data, torch.Tensor) and data.dim() == 1:
            raise CalibrationError(
                f"data is a 1-D tensor of {data.numel()} values; pass batches: a list of (B, T) "
                "LongTensors, or one (N, T) tensor (split into rows)")
        data = [data]
    try:
        it = iter(data)
    except TypeError:
        raise CalibrationError(f"data should be an iterable of batches, got {type(data).__name__}") from None
    out = []
    for b in it:
        out.append(b)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise CalibrationError("data holds no batch: pass at least one calibration batch "
                               "(for a causal LM, a (B, T) LongTensor of token ids)")
    return out


def causal_lm_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Next-token loss of a transformers causal LM: ``model(input_ids=b, labels=b).loss``.

    ``batch`` is a ``(B, T)`` LongTensor of token ids, or a dict of model inputs (``labels``
    default to ``input_ids``).
    """
    if isinstance(batch, torch.Tensor):
        return model(input_ids=batch, labels=batch).loss
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        kwargs.setdefault("labels", kwargs.get("input_ids"))
        return model(**kwargs).loss
    raise CalibrationError(f"a causal-LM batch should be a LongTensor of token ids or a dict of inputs, "
                           f"got {type(batch).__name__}; pass loss_fn=(model, batch) -> loss")


def resolve_loss_fn(model: nn.Module, loss_fn: LossFn | None) -> LossFn:
    """``loss_fn``, or :func:`causal_lm_loss` for a transformers model with an LM head.

    Raises:
        CalibrationError: no ``loss_fn`` and the model is not a transformers causal LM.
    """
    if loss_fn is not None:
        if not callable(loss_fn):
            raise CalibrationError(f"loss_fn should be a callable (model, batch) -> loss, got {loss_fn!r}")
        return loss_fn
    cfg = getattr(model, "config", None)
    head = getattr(model, "get_output_embeddings", None)
    is_lm = cfg is not None and callable(head) and head() is not None and type(model).__name__.endswith(
        ("ForCausalLM", "LMHeadModel"))
    if not is_lm:
        raise CalibrationError(
            f"{type(model).__name__} is not a transformers causal LM, so compress cannot compute a "
            "loss by itself: pass loss_fn=lambda model, batch: <scalar loss tensor>")
    return causal_lm_loss


def split_samples(batch: Any, per_sample: bool) -> list[Any]:
    if per_sample and isinstance(batch, torch.Tensor) and batch.dim() >= 2 and batch.shape[0] > 1:
        return list(batch.split(1))
    return [batch]


@dataclass(frozen=True)
class Consumer:
    """A linear-like module reading units' channels: ``param`` holds its weight, ``in_dim`` is the
    weight's input dimension (1 for ``nn.Linear``, 0 for a transposed GPT-2 ``Conv1D``)."""

    module: str
    param: str
    in_dim: int
    bias: str | None  # the module's bias parameter, if it has one


def consumers_of(model: nn.Module, couplings: Sequence[Coupling]) -> dict[str, Consumer]:
    """``{weight param: Consumer}`` for every role-``"in"`` site of a 2-D weight."""
    params = dict(model.named_parameters())
    mods = dict(model.named_modules())
    out: dict[str, Consumer] = {}
    for c in couplings:
        for s in c.sites:
            if s.role != "in" or s.param in out or s.param not in params or params[s.param].dim() != 2:
                continue
            mod = mods.get(s.module)
            if mod is None:
                continue
            b = getattr(mod, "bias", None)
            bname = None
            if isinstance(b, torch.Tensor) and b.dim() == 1:
                bname = next((n for n, p in params.items() if p is b), None)
            out[s.param] = Consumer(s.module, s.param, s.dim, bname)
    return out


@dataclass
class CalibrationStats:
    """What :func:`calibrate` measured.

    Attributes:
        fisher: ``{coupling: (width,) float64}``, sum over samples of the squared mask gradient.
        grad: ``{coupling: (width,) float64}``, sum over samples of the mask gradient.
        samples: number of samples (Fisher terms).
        grams: ``{consumer weight param: (n_in, n_in) float32}``, ``X^T X / tokens``.
        means: ``{consumer weight param: (n_in,) float32}``, mean input.
        tokens: ``{consumer weight param: rows of X seen}``.
        loss: mean calibration loss.
        seconds: wall time of the pass.
    """

    fisher: dict[str, torch.Tensor]
    grad: dict[str, torch.Tensor]
    samples: int
    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    means: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    loss: float = math.nan
    seconds: float = 0.0

    def unit_loss(self, name: str) -> torch.Tensor:
        """``(width,)`` estimated loss increase of removing each unit alone: ``fisher / (2 samples)``."""
        return self.fisher[name] / (2.0 * max(1, self.samples))


class _Readers:
    """Per coupling: the reader-side slices, as (param, dim, unit ids, indices) tensors."""

    def __init__(self, couplings: Sequence[Coupling], params: Mapping[str, torch.Tensor]):
        self.parts: dict[str, list[tuple[str, int, torch.Tensor, torch.Tensor]]] = {}
        for c in couplings:
            parts = []
            tables = [t for t in c.tables if t.side is not None and (np.asarray(t.side) == 1).any()]
            use_side = bool(tables)
            for t in c.tables:
                if t.param not in params:
                    raise EcospaError(f"coupling {c.name!r} names parameter {t.param!r} that the model "
                                      "does not have; pass the couplings found on this model")
                if use_side:
                    if t.side is None:
                        continue
                    sel = np.asarray(t.side) == 1
                else:  # no side information: the input-dimension slices read the units
                    sel = np.full(t.unit.size, t.dim == params[t.param].dim() - 1 and params[t.param].dim() == 2)
                if sel.any():
                    parts.append((t.param, t.dim, torch.as_tensor(np.asarray(t.unit)[sel], dtype=torch.long),
                                  torch.as_tensor(np.asarray(t.index)[sel], dtype=torch.long)))
            if not parts:  # fall back to every slice (a one-sided coupling)
                parts = [(t.param, t.dim, torch.as_tensor(np.asarray(t.unit), dtype=torch.long),
                          torch.as_tensor(np.asarray(t.index), dtype=torch.long)) for t in c.tables]
            self.parts[c.name] = parts
        self.keys = sorted({(p, d) for parts in self.parts.values() for p, d, _, _ in parts})


class _Grams:
    """Input Grams of the consumers, from forward hooks on their modules.

    Where a module runs its own code (an unpruned model, or a region on its exact path) the hook
    sees its input: at the weight's width, or at the dense width (exact path of a pruned region:
    the kept columns are picked). Inside a narrow graph no module is called: while a region is
    captured the hook returns ``ecospa::observe(out, x, weight)`` instead, and the narrow graph
    hands the narrow input and the dense positions of its columns to :meth:`observed`.
    """

    def __init__(self, model: nn.Module, consumers: Mapping[str, Consumer]):
        self.grams: dict[str, torch.Tensor] = {}
        self.means: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.fired: set[str] = set()  # consumers seen in the current sample
        params = dict(model.named_parameters())
        records = param_records(model)
        mods = dict(model.named_modules())
        self._n_in: dict[str, int] = {}
        self._where: dict[str, torch.Tensor] = {}  # (dense width,) current column of each dense one, -1: removed
        self._kept: dict[str, torch.Tensor] = {}  # (n_in,) dense position of each current column
        self._by_ptr: dict[int, str] = {}
        self._cols: dict[tuple[str, int], tuple] = {}  # (consumer, id of a positions buffer) -> _columns
        self._mods: dict[str, tuple[nn.Module, str]] = {}
        for pname, cons in consumers.items():
            w = params[pname]
            n_in = w.shape[cons.in_dim]
            rec = records.get(pname)
            dense_in = rec.dense_shape[cons.in_dim] if rec is not None else n_in
            kept = torch.as_tensor(np.asarray(rec.kept_or_all(cons.in_dim)) if rec is not None else np.arange(n_in),
                                   dtype=torch.long)
            where = torch.full((dense_in,), -1, dtype=torch.long)
            where[kept] = torch.arange(n_in)
            self._n_in[pname], self._where[pname], self._kept[pname] = n_in, where, kept
            self._by_ptr[w.data_ptr()] = pname
            self._mods[pname] = (mods[cons.module], pname[len(cons.module) + 1:] if cons.module else pname)

    def hooks(self) -> list:
        """Install the forward hooks; returns their handles."""
        return [mod.register_forward_hook(self._hook(pname, attr)) for pname, (mod, attr) in self._mods.items()]

    def _hook(self, pname: str, attr: str):
        def hook(mod, args, out):
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            if torch.compiler.is_compiling():  # a region being captured: its narrow graph will tell
                w = getattr(mod, attr, None)
                if isinstance(out, torch.Tensor) and isinstance(w, torch.Tensor):
                    return observe(out, args[0], w)
                return None
            if is_unobserved():  # a check or probe run of ecospa's own, not a call of the model
                return None
            x = args[0].detach()
            n_in, where = self._n_in[pname], self._where[pname]
            if x.shape[-1] == where.numel() and x.shape[-1] != n_in:  # dense width: a region's exact path
                x = x.index_select(-1, self._kept[pname].to(x.device))
            self.add(pname, x)
            return None

        return hook

    def observed(self, weight: torch.Tensor, x: torch.Tensor, positions: torch.Tensor | None) -> None:
        """An input seen by a narrow graph (``ecospa.ops.observe``); ``positions`` ``(n,)``: the
        dense position of each of ``x``'s columns."""
        pname = self._by_ptr.get(weight.data_ptr())
        if pname is None:
            return
        x = x.detach()
        if positions is not None:
            cols = self._columns(pname, positions)
            if cols is not None:  # x's columns are not the weight's, in order: scatter them there
                src, dst = cols
                full = x.new_zeros(x.shape[:-1] + (self._n_in[pname],))
                full[..., dst] = x[..., src]
                x = full
        self.add(pname, x)

    def _columns(self, pname: str, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(x columns, weight columns)`` of the kept inputs for a narrow input with dense
        ``positions``; None when they are the weight's columns in order. Computed once per
        (consumer, index buffer of the graph): the same for every sample."""
        key = (pname, id(positions))
        hit = self._cols.get(key)
        if hit is None or hit[0] is not positions:
            n_in = self._n_in[pname]
            cols = self._where[pname].to(positions.device)[positions]
            same = cols.numel() == n_in and bool((cols == torch.arange(n_in, device=cols.device)).all())
            keep = cols >= 0
            hit = (positions, None if same else (torch.nonzero(keep).flatten(), cols[keep]))
            self._cols[key] = hit  # (the buffer itself kept: its id stays its own)
        return hit[1]

    def add(self, pname: str, x: torch.Tensor) -> None:
        """Accumulate ``x`` ``(..., n_in)`` into the Gram and the mean of ``pname``."""
        n_in = self._n_in[pname]
        if x.shape[-1] != n_in:
            return
        x = x.reshape(-1, n_in).float()
        g = x.T @ x
        if pname in self.grams:
            self.grams[pname].add_(g)
            self.means[pname].add_(x.sum(0))
        else:
            self.grams[pname], self.means[pname] = g, x.sum(0)
        self.tokens[pname] = self.tokens.get(pname, 0) + x.shape[0]
        self.fired.add(pname)


def calibrate(model: nn.Module, couplings: Sequence[Coupling], batches: Sequence[Any], loss_fn: LossFn, *,
              grams: bool = True, per_sample: bool = True, consumers: Mapping[str, Consumer] | None = None,
              on_backward: Callable[[], None] | None = None, progress: Progress | None = None) -> CalibrationStats:
    """Mask Fisher of every unit of ``couplings`` and the consumers' input Grams (module docstring).

    Args:
        model: the model (its weights are not changed).
        couplings: the couplings to score (exact ones; names must be unique).
        batches: calibration batches, as returned by :func:`as_batches`.
        loss_fn: ``(model, batch) -> scalar loss``.
        grams: also gather the consumers' input Gram matrices.
        per_sample: split tensor batches into rows, one Fisher sample each.
        consumers: from :func:`consumers_of` (computed when None).
        on_backward: called after each backward, while the gradients are there (e.g. an
            :meth:`ecospa.Importance.accumulate`).
        progress: ``progress("calibrate", done, total)`` after each sample.

    Raises:
        CalibrationError: the loss is not a finite scalar (the message names the sample).
    """
    t0 = time.perf_counter()
    params = dict(model.named_parameters())
    readers = _Readers(couplings, params)
    need = {p for p, _ in readers.keys}
    flags = {n: p.requires_grad for n, p in params.items()}
    saved_grads = {n: p.grad for n, p in params.items()}
    was_training = model.training
    cons = consumers_of(model, couplings) if consumers is None else consumers
    gr = _Grams(model, cons if grams else {})
    fired = gr.fired
    calls: dict[str, int] = {}  # consumer -> samples it saw
    hooks = gr.hooks()
    fisher = {c.name: torch.zeros(c.width, dtype=torch.float64) for c in couplings}
    grad = {c.name: torch.zeros(c.width, dtype=torch.float64) for c in couplings}
    samples = [s for b in batches for s in split_samples(b, per_sample)]
    losses = []
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(observing(gr.observed))
        model.eval()
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(n in need or (on_backward is not None and flags[n]))
        for i, sample in enumerate(samples):
            loss = loss_fn(model, sample)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise CalibrationError(f"loss_fn returned {type(loss).__name__} "
                                       f"{tuple(getattr(loss, 'shape', ()))} for sample {i}: expected a scalar tensor")
            if not torch.isfinite(loss.detach()).all():
                raise CalibrationError(f"the calibration loss of sample {i} is {float(loss.detach())}: the model or "
                                       "the batch produces non-finite values; check the data (token ids in "
                                       "range, no empty sequences) and the model's dtype")
            if not loss.requires_grad:
                raise CalibrationError("the loss does not depend on the model's weights (no gradient): "
                                       "loss_fn must return a loss computed from model(batch)")
            loss.backward()
            losses.append(float(loss.detach()))
            for pname in fired:
                calls[pname] = calls.get(pname, 0) + 1
            fired.clear()
            with torch.no_grad():
                chan = {}
                for pname, dim in readers.keys:
                    p = params[pname]
                    if p.grad is None:
                        continue
                    other = [d for d in range(p.dim()) if d != dim]
                    wg = p.detach().float() * p.grad.float()  # float32 product (no copy of fp32), float64 sum
                    chan[(pname, dim)] = wg.sum(other, dtype=torch.float64) if other else wg.double()
                for c in couplings:
                    v = torch.zeros(c.width, dtype=torch.float64)
                    for pname, dim, units, idx in readers.parts[c.name]:
                        s = chan.get((pname, dim))
                        if s is not None:
                            v.index_add_(0, units, s[idx])
                    fisher[c.name] += v * v
                    grad[c.name] += v
            if on_backward is not None:
                on_backward()
            for n in need:
                params[n].grad = None
            if on_backward is not None:
                for p in params.values():
                    p.grad = None
            if progress is not None:
                progress("calibrate", i + 1, len(samples))
    finally:
        stack.close()
        for h in hooks:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = saved_grads[n]
        model.train(was_training)
    full = {p for p in gr.grams if calls.get(p, 0) == len(samples)}  # a Gram of some samples only is dropped
    out_g = {p: g / gr.tokens[p] for p, g in gr.grams.items() if p in full}
    out_m = {p: m / gr.tokens[p] for p, m in gr.means.items() if p in full}
    return CalibrationStats(fisher, grad, len(samples), out_g, out_m, dict(gr.tokens),
                            float(np.mean(losses)) if losses else math.nan, time.perf_counter() - t0)
