"""The rule of FlexAttention (``torch.nn.attention.flex_attention.flex_attention``).

torch.export keeps it as one higher-order op, ``torch.ops.higher_order.flex_attention(q, k, v,
score_mod, block_mask, scale, kernel_options, score_mod_other_buffers,
mask_mod_other_buffers)``, whose ``score_mod`` and the block mask's ``mask_mod`` are subgraphs
(``get_attr`` nodes). Those functions see one scalar score and the indices ``b, h, q_idx, kv_idx``:
they cannot mix channels, so q·k pair their head dims and v's channels pass through, as in SDPA.
What they *capture* (the ``*_other_buffers`` tensors: a learned bias table, a tensor computed from
the input) enters the scores: its labels are poisoned, with the reason. Outputs: the attention
output (B.., H, L, Ev), then the logsumexp (and max) of the scores per row, which carry no
channels.

Run eagerly, the op is torch's unfused reference implementation (it materialises the scores):
models call it through ``torch.compile`` for a fused kernel. The narrow graph does the same: its
flex node calls :func:`run_flex`, which runs the op through one process-wide
``torch.compile`` of it (compiled once per shape and ``score_mod`` / ``mask_mod``), and
the eager op where compiling is impossible (tracing, gradients, no compiler, an unsupported mod).
"""
from __future__ import annotations

import inspect
import operator
import warnings
from collections import Counter
from functools import cache
from typing import Callable

import torch

from ecospa.errors import EcospaWarning
from ecospa.ops.base import Ctx
from ecospa.ops.contraction import attention
from ecospa.ops.registry import NarrowError, narrow_rule, register
from ecospa.ops.runtime import pin_scale

__all__ = ["FLEX", "COMPILE", "calls", "flex_attention", "captured_tensors", "run_flex"]

FLEX = getattr(torch.ops.higher_order, "flex_attention", None)


def captured_tensors(node: torch.fx.Node) -> list[tuple[torch.fx.Node, str]]:
    """``[(tensor node, what uses it)]``: the block mask's tensors and what ``score_mod`` and
    ``mask_mod`` capture."""
    out = []
    groups = ((4, "used in the block mask of flex_attention"),
              (7, "captured by the score_mod of flex_attention"),
              (8, "captured by the mask_mod of flex_attention"))
    for pos, how in groups:
        found: list[torch.fx.Node] = []
        torch.fx.node.map_arg(node.args[pos] if len(node.args) > pos else (), found.append)
        out += [(a, how) for a in found if isinstance(a.meta.get("val"), torch.Tensor)]
    return out


if FLEX is not None:
    @register(FLEX)
    def flex_attention(ctx: Ctx, node: torch.fx.Node):
        """``(out, logsumexp[, max])``: out as SDPA's (``attention``); the statistics carry no
        channels (the scores they reduce are poisoned inside the softmax)."""
        q, k, v = node.args[:3]
        out = attention(ctx, node, q, k, v, captured_tensors(node))
        val = node.meta.get("val")
        n = len(val) if isinstance(val, (tuple, list)) else 1
        return tuple([out] + [[] for _ in range(n - 1)]) if n > 1 else out


# ----------------------------------------------------------------------------- narrow rules
def _subgraph(b, arg) -> torch.fx.GraphModule | None:
    """The ``score_mod`` / ``mask_mod`` subgraph a ``get_attr`` argument names, or None."""
    owner = b.program.graph.owning_module
    if not isinstance(arg, torch.fx.Node) or arg.op != "get_attr" or owner is None:
        return None
    try:
        mod = owner.get_submodule(arg.target)
    except AttributeError:
        return None
    return mod if isinstance(mod, torch.fx.GraphModule) else None


def _reads_arg(gm: torch.fx.GraphModule | None, pos: int) -> bool:
    """True unless ``gm`` is known not to use its placeholder number ``pos``."""
    if gm is None:
        return True
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return pos < len(ph) and len(ph[pos].users) > 0


def _flex_heads_free(b, node) -> bool:
    """The head index reaches nothing in ``score_mod``, ``mask_mod`` or the block mask: heads may
    be left out (renumbered) without changing what the kept ones compute."""
    mask = node.args[4] if len(node.args) > 4 else ()
    mask_mod = mask[-1] if isinstance(mask, (tuple, list)) and mask else None
    if _reads_arg(_subgraph(b, node.args[3]), 2) or (mask_mod is not None and _reads_arg(_subgraph(b, mask_mod), 1)):
        return False
    tensors = [a for a in (mask if isinstance(mask, (tuple, list)) else ()) if isinstance(a, torch.fx.Node)
               and isinstance(a.meta.get("val"), torch.Tensor)]
    return all(a.meta["val"].dim() < 2 or a.meta["val"].shape[1] == 1 for a in tensors)


def narrow_flex(b, node):
    """FlexAttention: as SDPA, q.k sums over the narrowed head dims (one of q, k must be zero
    where dropped) and v's channels pass through; the scale was fixed from the dense head width
    when the call was captured (pinned here if not). ``score_mod`` and ``mask_mod`` see scalar
    scores and indices only; whole heads are left out only where the head index reaches neither
    of them nor the block mask. The logsumexp output is not narrowed."""
    q, k, v = node.args[:3]
    nd = len(b.shape(q))
    if any(d != nd - 1 for x in (q, k, v) for d in b.layout(x)) and not _flex_heads_free(b, node):
        raise NarrowError("flex_attention whose score_mod, mask_mod or block mask reads the head index, "
                          "with whole heads left out")
    if b.layout(q) and not (b.zero.get(q, True) or b.zero.get(k, True)):
        raise NarrowError("attention scores over dropped channels that are not zero")
    b.zero[node] = b.zero.get(v, True)
    args = list(node.args)
    if len(args) > 5 and args[5] is None:
        args[5] = pin_scale(int(b.shape(q)[-1]))
    new = b.copy(node, args=tuple(args))
    if _reads_output_only(node) and _known_arguments(node):
        new.target = run_flex  # same arguments, the compiled kernel
    return new


def _reads_output_only(node: torch.fx.Node) -> bool:
    """Only the attention output (item 0) of the flex node is read, not its statistics (the
    logsumexp and max: taken out by ``getitem`` nodes that nothing reads): the compiled kernel
    computes those only when the kernel options ask for them."""
    return all(u.op == "call_function" and u.target is operator.getitem and (u.args[1] == 0 or not u.users)
               for u in node.users)


def _known_arguments(node: torch.fx.Node) -> bool:
    """The op's arguments are laid out as :func:`run_flex` reads them (q, k, v, score_mod, block
    mask tuple ending with its mask_mod, scale, kernel options[, captured tensors x2])."""
    a = node.args
    return 7 <= len(a) <= 9 and isinstance(a[4], (tuple, list)) and isinstance(a[6], dict)


# ----------------------------------------------------------------------------- runtime
COMPILE = True  # False: narrow graphs run flex_attention eagerly (torch's reference implementation)
calls: Counter = Counter()  # flex_attention calls of the narrow graphs: "compiled" and "eager"
_EAGER: set = set()  # (score_mod, mask_mod) keys whose compiling failed: run eagerly from then on


def _flex_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: Callable,
                 block_mask: tuple, scale: float, kernel_options: dict, score_buffers: tuple,
                 mask_buffers: tuple) -> torch.Tensor:
    """The attention output (B, Hq, L, Ev) of the flex op, in the form ``torch.compile`` takes it
    (the form ``torch.nn.attention.flex_attention`` calls it in): the mods close over the tensors
    they capture instead of receiving them as arguments."""
    mask_mod = block_mask[-1]

    def score(s, b, h, m, n):
        return score_mod(s, b, h, m, n, *score_buffers)

    def mask(b, h, m, n):
        return mask_mod(b, h, m, n, *mask_buffers)

    return FLEX(q, k, v, score, tuple(block_mask[:-1]) + (mask,), scale, kernel_options)[0]


RECOMPILE_LIMIT = 64  # compilations of the narrow graphs' flex calls (torch.compile's own limit: 8)


@cache
def _compiled() -> Callable:
    """The process-wide compiled :func:`_flex_output`, one graph. Shapes: static at first, then
    dynamic (``dynamic=None``: batch and sequence lengths that change are made symbolic; head
    count and width stay static, as the fused kernel wants them); ``score_mod`` / ``mask_mod``
    are guarded on their code. Where torch.compile has them (torch >= 2.13), its own recompile
    count and limit, apart from other compiled functions'."""
    kw: dict = {"fullgraph": True, "dynamic": None}
    accepted = inspect.signature(torch.compile).parameters
    if "recompile_limit" in accepted and "isolate_recompiles" in accepted:
        kw.update(recompile_limit=RECOMPILE_LIMIT, isolate_recompiles=True)
    return torch.compile(_flex_output, **kw)


def _mod_key(fn) -> object:
    """What identifies a ``score_mod`` / ``mask_mod`` for compiling: a subgraph by its code."""
    return fn.code if isinstance(fn, torch.fx.GraphModule) else fn


def _compilable(args: tuple, key: tuple) -> bool:
    """Whether :func:`run_flex` may take the compiled path: switched on, not inside another trace
    (export, compile: they must see the op itself), no gradient to record (the eager op decides
    what it supports: on CPU FlexAttention has no backward), not failed before for these mods."""
    if not COMPILE or key in _EAGER or torch.compiler.is_compiling():
        return False
    tensors = [a for a in (*args[:3], *args[7], *args[8]) if isinstance(a, torch.Tensor)]
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def run_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: Callable, block_mask: tuple,
             scale: float, kernel_options: dict, score_buffers: tuple = (), mask_buffers: tuple = ()) -> tuple:
    """``torch.ops.higher_order.flex_attention`` with the same arguments (q: (B, Hq, L, E), k:
    (B, Hkv, S, E), v: (B, Hkv, S, Ev); ``block_mask`` the flattened ``BlockMask`` ending with its
    ``mask_mod``), run by the compiled fused kernel where possible, else by the eager op.

    Returns:
        ``(out, lse, max)`` of the op, out the attention output (B, Hq, L, Ev); from the compiled
        kernel ``(out, None, None)``: the statistics are not read (:func:`_reads_output_only`).
    """
    args = (q, k, v, score_mod, block_mask, scale, kernel_options, score_buffers, mask_buffers)
    key = (_mod_key(score_mod), _mod_key(block_mask[-1]))
    if _compilable(args, key):
        try:
            out = _compiled()(q, k, v, score_mod, tuple(block_mask), scale, dict(kernel_options),
                              tuple(score_buffers), tuple(mask_buffers))  # plain containers (fx's are immutable_*)
        except Exception as e:  # noqa: BLE001  (any compiler failure: the eager op is exact)
            _EAGER.add(key)
            warnings.warn(f"compiling flex_attention failed ({type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0][:200]}): this call and those with the "
                          "same score_mod and mask_mod run torch's eager reference implementation "
                          "(exact, slower)", EcospaWarning, stacklevel=2)
        else:
            calls["compiled"] += 1
            return (out, None, None)
    calls["eager"] += 1
    return FLEX(*args)



if FLEX is not None:
    narrow_rule(FLEX)(narrow_flex)
