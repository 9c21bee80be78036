"""``ecospa plot RUN_OR_MODEL``: kept width per layer and head, and parameters over training.

Reads a run log (the demo.json that ``ecospa demo`` / ``ecospa train`` write, a folder holding
one, an EcoSpa plan JSON ``{"version", "steps"}``, or a JSON list of pruning events) or a saved
pruned model (an ``ecospa.save`` folder: ``ecospa.load`` + the removal record). The drawing is in
:mod:`ecospa.cli.plot_draw`.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import ecospa
from ecospa.cli._common import CliError, add_command, need

__all__ = ["add_parser", "run", "Widths", "from_json", "from_checkpoint"]

DESCRIPTION = """\
Draw what pruning kept. From a run log (demo.json of 'ecospa demo' / 'ecospa train', a folder
holding one, an EcoSpa plan JSON such as sp.plan.to_json(), or a JSON list of pruning events) or
from a saved pruned model (a folder written by ecospa.save; for a plain module pass the code that
builds the dense model with --model module:factory):

  NAME.widths.png   heatmaps of the kept width per layer and head, query/key (qk) and value/output
                    (vo) side by side, and the FFN/GLU widths per layer (bars: kept of dense)
  NAME.params.png   parameters over training (run logs only)

Writes PNGs into --out (default: the run's folder, or the checkpoint's parent) and prints their
paths. Needs the cli extra (matplotlib)."""

EXAMPLES = """\
ecospa demo --quick --out runs/q && ecospa plot runs/q/demo.json
ecospa plot runs/q                          # the folder holding demo.json
ecospa plot plan.json --out plots           # an EcoSpa plan: open('plan.json','w').write(sp.plan.to_json())
ecospa plot ./smollm2-70                     # a model saved by ecospa compress / ecospa.save
ecospa plot ./ckpt --model my_models.py:build_model"""


@dataclass
class Widths:
    """What to draw: ``{coupling: (dense width or None, kept width)}`` in order, and parameter
    traces ``{run label: [(step, params), ...]}`` (empty for a saved model)."""

    name: str
    widths: dict[str, tuple[int | None, int]]
    traces: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    events: dict[str, list[int]] = field(default_factory=dict)  # run label -> pruning steps


def add_parser(sub) -> None:
    p = add_command(sub, "plot", help="heatmaps of kept widths and parameters over training",
                    description=DESCRIPTION, examples=EXAMPLES)
    p.add_argument("source", metavar="RUN_OR_MODEL", help="demo.json, a run folder, a plan/events JSON, or a "
                   "saved pruned model folder")
    p.add_argument("--out", metavar="DIR", help="folder for the PNGs (default: next to the input)")
    p.add_argument("--model", dest="factory", metavar="MODULE:FACTORY",
                   help="for a checkpoint of a plain module: the code that builds the dense model")


def _removed_counts(removals: Any) -> dict[str, int]:
    if not isinstance(removals, dict):
        return {}
    return {str(k): (int(v) if isinstance(v, int) else len(v)) for k, v in removals.items()}


def _from_events(name: str, events: list, widths: dict[str, int] | None = None) -> Widths:
    """Events or plan steps: ``{"step", "removals"|"removed", "params_before", "params_after", "widths"?}``."""
    dense: dict[str, int] = dict(widths or {})
    gone: dict[str, int] = {}
    trace: list[tuple[int, int]] = []
    steps: list[int] = []
    for i, e in enumerate(events):
        if not isinstance(e, dict) or "step" not in e:
            raise CliError(f"{name}: event {i} is not an object with a 'step'")
        for n, w in (e.get("widths") or {}).items():
            dense.setdefault(n, int(w) + gone.get(n, 0))
        for n, k in _removed_counts(e.get("removals", e.get("removed"))).items():
            gone[n] = gone.get(n, 0) + k
        steps.append(int(e["step"]))
        if e.get("params_before") is not None and e.get("params_after") is not None:
            if not trace:
                trace.append((0, int(e["params_before"])))
            trace.append((int(e["step"]), int(e["params_after"])))
    # couplings whose width is never given (events without "widths") cannot be drawn as widths
    out = {n: (d, d - gone.get(n, 0)) for n, d in dense.items()}
    return Widths(name, out, {"ecospa": trace} if trace else {}, {"ecospa": steps})


def from_json(path: Path) -> Widths:
    """A demo.json, a plan JSON or a list of events."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CliError(f"{path} is not a readable JSON file: {e}") from None
    name = path.stem
    if isinstance(data, dict) and isinstance(data.get("runs"), list):  # demo.json
        traces, events, widths = {}, {}, {}
        for r in data["runs"]:
            label = str(r.get("name", f"run{len(traces)}"))
            if r.get("param_trace"):
                traces[label] = [(int(s), int(p)) for s, p in r["param_trace"]]
                if isinstance(r.get("steps"), int) and r["steps"] > traces[label][-1][0]:
                    traces[label].append((r["steps"], traces[label][-1][1]))
            hook = r.get("hook") or {}
            if hook.get("kept_widths"):
                gone: dict[str, int] = {}
                for e in hook.get("events", []):
                    for n, k in _removed_counts(e.get("removed", e.get("removals"))).items():
                        gone[n] = gone.get(n, 0) + k
                widths = {n: (int(k) + gone.get(n, 0), int(k)) for n, k in hook["kept_widths"].items()}
                events[label] = [int(e["step"]) for e in hook.get("events", [])]
        if not widths:
            raise CliError(f"{path}: no run with EcoSpa kept widths (runs[].hook.kept_widths)")
        return Widths(name, widths, traces, events)
    if isinstance(data, dict) and "steps" in data and "version" in data:  # a Plan
        plan = ecospa.Plan.from_dict(data)  # checks the schema
        return _from_events(name, [{"step": s.step, "removals": s.removals, "widths": s.widths,
                                    "params_before": s.params_before, "params_after": s.params_after}
                                   for s in plan.steps])
    if isinstance(data, dict) and isinstance(data.get("events"), list):
        return _from_events(name, data["events"], data.get("dense_widths"))
    if isinstance(data, list):
        return _from_events(name, data)
    raise CliError(f"{path}: not a run log (demo.json), a plan ({{'version', 'steps'}}) or a list of events")


def from_checkpoint(folder: Path, factory: str | None) -> Widths:
    """Dense couplings of a freshly built dense model, kept widths from the loaded model's record."""
    from ecospa.cli.models import load_model

    if factory is not None:
        dense = load_model(factory)
    elif (folder / "config.json").is_file():
        dense = load_model(str(folder / "config.json"))
    else:
        raise CliError(f"{folder} is an ecospa checkpoint of a plain module: pass the code that builds the dense "
                       "model with --model module:factory")
    model = dense.model
    cg = ecospa.auto_couple(model, dense.example_inputs)
    ecospa.load(folder, model, example_inputs=dense.example_inputs)
    records = ecospa.param_records(model)
    widths: dict[str, tuple[int | None, int]] = {}
    for c in cg:
        alive = np.ones(c.width, dtype=bool)
        for t in c.tables:
            rec = records.get(t.param)
            if rec is None or t.dim not in rec.kept:
                continue
            kept = np.isin(np.asarray(t.index), rec.kept[t.dim])
            np.logical_and.at(alive, np.asarray(t.unit), kept)
        widths[c.name] = (int(c.width), int(alive.sum()))
    return Widths(folder.name, widths)


def run(args: argparse.Namespace) -> int:
    need("matplotlib", why="the plots")
    src = Path(args.source)
    if not src.exists():
        raise CliError(f"no such file or directory: {args.source!r}")
    if src.is_dir() and (src / "ecospa.json").is_file():
        data, default_out = from_checkpoint(src, args.factory), src.resolve().parent
    elif src.is_dir():
        logs = [src / "demo.json"] if (src / "demo.json").is_file() else sorted(src.glob("*.json"))
        if len(logs) != 1:
            raise CliError(f"{src} is neither an ecospa checkpoint nor a run folder with one demo.json")
        data, default_out = from_json(logs[0]), src
    else:
        data, default_out = from_json(src), src.resolve().parent
    from ecospa.cli.plot_draw import draw_params, draw_widths

    out = Path(args.out) if args.out else default_out
    if not data.widths and not data.traces:
        raise CliError(f"{args.source}: nothing to draw (no widths, no parameter counts)")
    written = [draw_widths(data, out / f"{data.name}.widths.png")] if data.widths else []
    if data.traces:
        written.append(draw_params(data, out / f"{data.name}.params.png"))
    known = [(d, k) for d, k in data.widths.values() if d]
    if known:
        kept = sum(k for _, k in known) / max(1, sum(d for d, _ in known))
        print(f"{len(data.widths)} couplings; {kept:.1%} of their units kept")
    for p in written:
        print(f"wrote {p}")
    return 0
