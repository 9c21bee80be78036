"""``ecospa compress MODEL_DIR --text FILE --target 0.7 --out DIR``: one-shot compression of a
local pretrained causal LM with calibration text, perplexity before/after, saved with ecospa.save."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import ecospa
from ecospa.cli._common import CliError, add_command, need, nonnegative_int, positive_int, progress_bar, target
from ecospa.cli.models import load_model

__all__ = ["add_parser", "run", "compress_and_save", "perplexity"]

DESCRIPTION = """\
Compress a pretrained causal language model in one shot (ecospa.compress: calibration on your
text, the cheapest coupled units removed, consumers refitted by least squares, optional recovery
steps) and save the smaller model with ecospa.save (ecospa.load(OUT) gives it back).

MODEL_DIR is a local transformers folder (save_pretrained: config.json, weights, tokenizer) or an
ecospa checkpoint. --text is a UTF-8 file: its first 80% gives the calibration windows (--batches
batches of --batch-size windows of --seq tokens, from seeded random positions), its last 20% is
held out to measure perplexity before and after (--eval-windows windows, non-overlapping).
OUT gets the checkpoint, the tokenizer and compress.json (the report and the perplexities).
Nothing is downloaded. Needs transformers and the cli extra (tqdm, rich)."""

EXAMPLES = """\
ecospa compress ./SmolLM2-135M --text corpus.txt --target 0.7 --out ./smollm2-70
ecospa compress ./my-llama --text wiki.txt --target 0.5 --recover-steps 200 --seq 512 --batches 64 --out small
python -c "import ecospa; m = ecospa.load('small'); print(sum(p.numel() for p in m.parameters()))\""""


def add_parser(sub) -> None:
    p = add_command(sub, "compress", help="compress a pretrained causal LM one-shot with calibration text",
                    description=DESCRIPTION, examples=EXAMPLES)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local pretrained folder or ecospa checkpoint")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 calibration and evaluation text")
    p.add_argument("--target", required=True, type=target,
                   help="fraction of the prunable parameters to keep, in (0, 1]; or a parameter count")
    p.add_argument("--out", required=True, metavar="DIR", help="where to save the compressed model")
    p.add_argument("--recover-steps", type=nonnegative_int, default=0,
                   help="recovery fine-tuning steps after pruning (distillation from the dense model; default 0)")
    p.add_argument("--seq", type=positive_int, default=256, help="tokens per window (default 256)")
    p.add_argument("--batches", type=positive_int, default=32, help="calibration batches (default 32)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="windows per calibration batch (default 1)")
    p.add_argument("--eval-windows", type=positive_int, default=16,
                   help="held-out windows for perplexity (default 16)")
    p.add_argument("--rounds", type=positive_int, default=4, help="calibration rounds (default 4)")
    p.add_argument("--allocation", choices=("global", "uniform", "planner"), default="global",
                   help="how the removal is spread over couplings (default global)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default MODEL_DIR)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and the recovery (default 0)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _tokens(tok, text: str) -> torch.Tensor:
    ids = tok(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, *, progress: bool = False, desc: str = "perplexity") -> float:
    """``exp`` of the mean next-token loss over ``windows`` ``(n, T)``, one window at a time."""
    from tqdm import tqdm

    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for w in tqdm(windows, desc=desc, unit="window", disable=not progress, leave=False):
            logits = model(w[None]).logits[0, :-1].float()  # (T-1, V)
            total += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
            count += w.numel() - 1
    finally:
        model.train(was)
    return math.exp(total / max(1, count))


def _check_out(out: Path) -> None:
    if out.is_file():
        raise CliError(f"--out {str(out)!r} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / "ecospa.json").is_file():
        raise CliError(f"--out {str(out)!r} is a non-empty folder that is not an ecospa checkpoint")


def run(args: argparse.Namespace) -> int:
    model, summary, report = compress_and_save(args)
    _print(summary, report, Path(args.out))
    return 0


def compress_and_save(args: argparse.Namespace):
    """The work of ``run``: returns ``(compressed model, summary dict, CompressReport)``."""
    need("tqdm", "rich", why="progress bars and the summary")
    text_path, model_dir, out = Path(args.text), Path(args.model_dir), Path(args.out)
    if not text_path.is_file():
        raise CliError(f"no such text file: {args.text!r}")
    if not model_dir.is_dir():
        raise CliError(f"MODEL_DIR {args.model_dir!r} is not a folder (a save_pretrained folder or an ecospa "
                       "checkpoint)")
    _check_out(out)
    if args.threads:
        torch.set_num_threads(args.threads)
    text = text_path.read_text(encoding="utf-8")
    cut = int(0.8 * len(text))
    loaded = load_model(str(model_dir))
    model = loaded.model.float()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(args.tokenizer or str(model_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise CliError(f"no usable tokenizer in {args.tokenizer or args.model_dir!r} (pass --tokenizer DIR): "
                       f"{type(e).__name__}") from None
    calib, held = _tokens(tok, text[:cut]), _tokens(tok, text[cut:])
    seq = args.seq
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and seq > limit:
        raise CliError(f"--seq {seq} is longer than the model's context ({limit} positions)")
    if len(calib) <= seq:
        raise CliError(f"the calibration text (first 80% of {args.text}) has {len(calib)} tokens; --seq {seq} "
                       "needs more: a longer text or a smaller --seq")
    if len(held) < 2:
        raise CliError(f"the held-out text (last 20% of {args.text}) has {len(held)} tokens; a longer text")
    g = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, len(calib) - seq + 1, (args.batches, args.batch_size), generator=g)
    batches = [calib[s[:, None] + torch.arange(seq)] for s in starts]  # each (batch_size, seq)
    n_eval = max(1, min(args.eval_windows, len(held) // seq))
    eval_seq = min(seq, len(held))
    windows = held[: n_eval * eval_seq].view(n_eval, eval_seq)
    progress = not args.no_progress
    dense_params = sum(p.numel() for p in model.parameters())
    ppl_before = perplexity(model, windows, progress=progress, desc="perplexity before")
    with progress_bar(progress) as bar:
        model, report = ecospa.compress(model, args.target, batches, recover_steps=args.recover_steps,
                                        rounds=args.rounds, allocation=args.allocation, seed=args.seed,
                                        progress=bar)
    ppl_after = perplexity(model, windows, progress=progress, desc="perplexity after")
    model.eval()
    ecospa.save(model, out)
    tok.save_pretrained(str(out))
    summary = {"model": loaded.label, "text": str(text_path), "seq": seq, "calibration_batches": len(batches),
               "eval_windows": int(windows.shape[0]), "eval_tokens_per_window": int(windows.shape[1]),
               "params_before": dense_params, "params_after": report.params_after,
               "target_params": report.target_params, "ppl_before": ppl_before, "ppl_after": ppl_after,
               "report": report.to_dict()}
    (out / "compress.json").write_text(json.dumps(summary, indent=1))
    return model, summary, report


def _print(s: dict, report, out: Path) -> None:
    from rich.table import Table

    from ecospa.cli._common import console

    t = Table(title=f"compress {s['model']}", title_justify="left")
    for col in ("", "params", f"perplexity ({s['eval_windows']} x {s['eval_tokens_per_window']} held-out tokens)"):
        t.add_column(col, justify="right" if col else "left")
    t.add_row("before", f"{s['params_before']:,}", f"{s['ppl_before']:.2f}")
    t.add_row("after", f"{s['params_after']:,}", f"{s['ppl_after']:.2f}")
    t.add_row("after/before", f"{s['params_after'] / s['params_before']:.3f}x",
              f"{s['ppl_after'] / s['ppl_before']:.3f}x")
    con = console()
    con.print(t)
    con.print(f"target {s['target_params']:,} params ({report.kept_fraction:.3f} of the prunable kept), "
              f"{len(report.rounds)} rounds, {report.seconds:.1f} s")
    con.print(f"wrote {out} (ecospa.load({str(out)!r}) loads it) and {out / 'compress.json'}")
