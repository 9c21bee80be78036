"""``ecospa demo``: dense vs EcoSpa on a small character GPT, offline, in a few minutes on CPU.

Both runs start from the same initial weights (same seed), see the same training batches in the
same order for the same number of steps, and are trained *in lockstep* (one step of each, in
alternating order) so that their wall clocks are comparable on a busy machine. The EcoSpa run
removes coupled units (Eq. 6 + Eq. 9, Algorithm 1) until half of its prunable parameters are gone
(``--target``). Validation text (the last 10% of tiny-shakespeare) is never trained on; the final
validation loss is computed over all of it.

Outputs (in ``--out``, default ``runs/demo/``): ``demo.json`` (every number, the curves, the
pruning events, the host) and ``demo.png`` (validation loss vs step and vs wall clock, parameter
count vs step). A table is printed.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import ecospa
from ecospa import ConfigError
from ecospa.recipes import missing_requirements
from ecospa.recipes.nanogpt import GPT, GPTConfig
from ecospa.recipes.train import CharCorpus, Run, TrainConfig, ecospa_hook, throughput, train_interleaved
from ecospa.recipes.train.plot import plot_curves

__all__ = ["DemoConfig", "run_demo", "format_table"]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo; :meth:`preset` gives the default and the ``--quick`` ones."""

    steps: int = 400
    seed: int = 0
    target: float = 0.5
    out: str = "runs/demo"
    threads: int = 1
    every: int | None = None  # None: steps // 40
    start: int | None = None  # None: 5% of steps
    end: float | None = 0.4  # fraction of the steps by which EcoSpa reaches the target (cubic schedule); None: Algorithm 1's pace
    top_k: float = 0.3
    theta: float = 0.9
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    batch_size: int = 32
    lr: float = 3e-3
    eval_every: int = 50
    eval_windows: int = 192
    final_eval_windows: int | None = None  # None: the whole validation text
    throughput_rounds: int = 7
    generate_tokens: int = 48
    progress: bool = True
    quick: bool = False
    text: str | None = None  # a UTF-8 text file to train on instead of tiny-shakespeare (``ecospa train``)

    @classmethod
    def preset(cls, quick: bool = False, **overrides: Any) -> "DemoConfig":
        """The default settings, or the tiny ``quick`` ones (about 20 s), with ``overrides``
        (None values are ignored)."""
        base: dict[str, Any] = {}
        if quick:
            base = dict(steps=60, n_layer=2, n_head=2, n_embd=48, block_size=32, batch_size=16,
                        eval_every=20, eval_windows=32, final_eval_windows=256, throughput_rounds=3,
                        generate_tokens=16, quick=True)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def __post_init__(self) -> None:
        for name in ("steps", "threads", "n_layer", "n_head", "n_embd", "block_size", "batch_size",
                     "eval_every", "eval_windows", "throughput_rounds", "generate_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} should be a positive int, got {v!r}")
        t = self.target
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < float(t) < 1.0:
            raise ConfigError(f"target should be a fraction of the prunable parameters in (0, 1), got {t!r}")
        if self.seed < 0:
            raise ConfigError(f"seed should be a non-negative int, got {self.seed!r}")
        if self.every is not None and self.every < 1:
            raise ConfigError(f"every should be a positive int, got {self.every!r}")
        if self.end is not None and (isinstance(self.end, bool) or not isinstance(self.end, (int, float))
                                     or not 0.0 < float(self.end) <= 1.0):
            raise ConfigError(f"end should be a fraction of the steps in (0, 1], got {self.end!r}")
        if self.start is not None and not 0 <= self.start < self.steps:
            raise ConfigError(f"start should be in [0, steps={self.steps}), got {self.start!r}")

    @property
    def prune_every(self) -> int:
        """Steps between pruning rounds."""
        return self.every if self.every is not None else max(1, self.steps // 40)

    @property
    def prune_start(self) -> int:
        """First step at which EcoSpa may prune."""
        return self.start if self.start is not None else int(round(0.05 * self.steps))


def _host() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "ecospa": ecospa.__version__, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "loadavg": list(load) if load else None, "device": "cpu"}


def _mib(b: float) -> str:
    return f"{b / 2 ** 20:.2f} MiB"


def format_table(result: dict[str, Any]) -> str:
    """The printed table: one row per run and one of EcoSpa / dense ratios."""
    runs = result["runs"]
    head = ["run", "val loss", "val ppl", "params", "train wall clock", "peak state", "mean state", "final state",
            "fwd tokens/s", "gen tokens/s"]
    rows = []
    for r in runs:
        rows.append([r["name"], f"{r['val_loss']:.4f}", f"{r['val_ppl']:.2f}", f"{r['params']:,}",
                     f"{r['train_seconds']:.1f} s", _mib(r["peak_state_bytes"]), _mib(r["mean_state_bytes"]),
                     _mib(r["final_state_bytes"]),
                     f"{r['forward_tokens_per_s']:,.0f}", f"{r['generate_tokens_per_s']:,.0f}"])
    d, e = runs[0], runs[1]
    rows.append(["ecospa/dense", f"{e['val_loss'] / d['val_loss']:.3f}x", f"{e['val_ppl'] / d['val_ppl']:.3f}x",
                 f"{e['params'] / d['params']:.3f}x", f"{e['train_seconds'] / d['train_seconds']:.3f}x",
                 f"{e['peak_state_bytes'] / d['peak_state_bytes']:.3f}x",
                 f"{e['mean_state_bytes'] / d['mean_state_bytes']:.3f}x",
                 f"{e['final_state_bytes'] / d['final_state_bytes']:.3f}x",
                 f"{e['forward_tokens_per_s'] / d['forward_tokens_per_s']:.2f}x",
                 f"{e['generate_tokens_per_s'] / d['generate_tokens_per_s']:.2f}x"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    return "\n".join(lines)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Train dense and EcoSpa, measure, write ``demo.json`` and ``demo.png``; return the results.

    Raises:
        ConfigError: an invalid setting (for example a target EcoSpa cannot reach).
        ImportError: the demo extra (tqdm, matplotlib) is not installed.
    """
    missing = missing_requirements()
    if missing:
        raise ImportError(f"the demo needs {', '.join(missing)}: pip install 'ecospa[demo]'")
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if cfg.text is None:
        corpus, corpus_name = CharCorpus.tinyshakespeare(), "tinyshakespeare (embedded)"
    else:
        try:
            text = Path(cfg.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the text file {cfg.text!r}: {e}") from None
        corpus, corpus_name = CharCorpus.from_text(text), str(cfg.text)
    gcfg = GPTConfig(block_size=cfg.block_size, vocab_size=corpus.vocab_size, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_embd=cfg.n_embd)
    tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, block_size=cfg.block_size, lr=cfg.lr,
                       warmup=max(1, cfg.steps // 20), eval_every=min(cfg.eval_every, cfg.steps),
                       eval_windows=cfg.eval_windows, final_eval_windows=cfg.final_eval_windows,
                       seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    dense_model = GPT(gcfg)
    torch.manual_seed(cfg.seed)
    sparse_model = GPT(gcfg)  # the same initial weights
    example = (torch.zeros(1, cfg.block_size, dtype=torch.long),)
    schedule = {} if cfg.end is None else {"end": float(cfg.end), "total_steps": cfg.steps}
    hook = ecospa_hook(cfg.target, example, every=cfg.prune_every, start=cfg.prune_start,
                       top_k=cfg.top_k, theta=cfg.theta, seed=cfg.seed, **schedule)
    runs = [Run("dense", dense_model, tcfg), Run("ecospa", sparse_model, tcfg, hook)]
    sp = runs[1].hook.sp
    if cfg.progress:
        print(f"model: {sp.dense_params:,} params, {len(sp.couplings)} exact couplings; EcoSpa target "
              f"{sp.target_params:,} params (keeps {cfg.target:.0%} of the prunable ones), pruning every "
              f"{cfg.prune_every} steps from step {cfg.prune_start}")
    train_interleaved(runs, corpus, tcfg, progress=cfg.progress, desc="dense + ecospa")

    speed = throughput({r.name: r.model for r in runs}, corpus, cfg.block_size, rounds=cfg.throughput_rounds,
                       new_tokens=cfg.generate_tokens, seed=cfg.seed)
    summaries = [{**r.summary(), **speed[r.name]} for r in runs]
    prompt = CharCorpus.windows(corpus.val, corpus.val_starts(16, 1), 16)[:, :-1]  # (1, 16)
    sample = sparse_model.generate(prompt, 120, temperature=0.8,
                                   generator=torch.Generator().manual_seed(cfg.seed))[0]
    result: dict[str, Any] = {
        "what": "dense vs EcoSpa, same seed, data order and steps, trained in lockstep",
        "config": asdict(cfg),
        "model": asdict(gcfg),
        "train": asdict(tcfg),
        "data": {"corpus": corpus_name, "train_chars": len(corpus.train),
                 "val_chars": len(corpus.val), "split": "first 90% train, last 10% validation"},
        "measures": {
            "val_loss": "mean next-char cross-entropy (nats) over non-overlapping windows of the "
                        "validation text" + (" (all of it)" if cfg.final_eval_windows is None
                                             else f" ({cfg.final_eval_windows} windows)"),
            "train_seconds": "sum of per-step wall clock (forward, backward, optimizer, pruning) plus "
                             "coupling discovery; evaluation excluded",
            "state_bytes": "weights + gradients + AdamW state, from tensor sizes; peak over steps, mean over "
                           "steps, and final",
            "tokens_per_s": "median over interleaved rounds; forward: batch of 8 x block_size in eval "
                            f"mode; generate: 4 prompts x {cfg.generate_tokens} new tokens",
        },
        "runs": summaries,
        "ecospa_sample": corpus.decode(sample),
        "host": _host(),
    }
    result["table"] = format_table(result)
    result["total_seconds"] = time.perf_counter() - t_start
    plot_curves([{**s, "label": s["name"]} for s in summaries], out / "demo.png",
                title=f"{'tinyshakespeare' if cfg.text is None else Path(cfg.text).name} char GPT, "
                      f"{cfg.steps} steps, seed {cfg.seed}")
    (out / "demo.json").write_text(json.dumps(result, indent=1, default=_json_default))
    return result


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if torch.is_tensor(o):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
