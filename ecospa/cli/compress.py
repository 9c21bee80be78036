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
from ecospa.cli.models import load_model, local_source, quiet_transformers

__all__ = ["add_parser", "run", "compress_and_save", "perplexity"]

DESCRIPTION = """\
Compress a pretrained causal language model in one shot (ecospa.compress: calibration on your
text, the cheapest coupled units removed, consumers refitted by least squares, optional recovery
steps) and save the smaller model with ecospa.save (ecospa.load(OUT) gives it back).

MODEL_DIR is a local transformers folder (save_pretrained: config.json, weights, tokenizer), a GGUF
file or a folder holding one (dequantized on load; its own tokenizer unless --tokenizer), or an
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
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local pretrained folder, GGUF file or ecospa checkpoint")
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
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default MODEL_DIR, or the GGUF file's own)")
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
    """``--out`` must be new, empty or an ecospa checkpoint, and creatable: checked before any work."""
    if out.is_file():
        raise CliError(f"--out {str(out)!r} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / "ecospa.json").is_file():
        raise CliError(f"--out {str(out)!r} is a non-empty folder that is not an ecospa checkpoint")
    try:
        ecospa.check_writable(out)
    except ecospa.CheckpointError as e:
        raise CliError(f"--out: {e}") from None


def _tokenizer(args: argparse.Namespace, folder: Path, gguf_file: str | None):
    """The tokenizer: ``--tokenizer DIR``, else the model's folder, else the GGUF file's own."""
    from transformers import AutoTokenizer

    where = args.tokenizer or str(folder)
    extra = {"gguf_file": gguf_file} if args.tokenizer is None and gguf_file is not None else {}
    try:
        return AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
    except Exception as e:  # noqa: BLE001
        what = f"{folder / gguf_file}" if extra else where
        raise CliError(f"no usable tokenizer in {what!r} (pass --tokenizer DIR): {type(e).__name__}") from None


def _config(folder: Path, gguf_file: str | None):
    """The model's transformers config, read without its weights (None when it cannot be read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), gguf_file=gguf_file, local_files_only=True)
    except Exception:  # noqa: BLE001 - load_model reports what is wrong with the model
        return None


def _dense_params(config) -> int | None:
    """Parameters of the dense model of ``config``, counted on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - not a causal LM config: load_model reports it
        return None
    return sum(p.numel() for p in model.parameters())


def _too_large(target: int, total: int, what: str) -> CliError:
    return CliError(f"--target {target} parameters is larger than the model ({total:,} parameters{what}): nothing "
                    f"would be pruned; ask for at most {total} (or a fraction in (0, 1] of the prunable parameters)")


def _check_target(model, target: float | int):
    """The loaded model's couplings; ``target`` checked against them (too large or below the smallest
    size the couplings allow): the Python API's message, before the perplexity pass."""
    dense = sum(p.numel() for p in model.parameters())
    if isinstance(target, int) and target > dense:
        raise _too_large(target, dense, "")
    cg = ecospa.auto_couple(model)
    exact = [c for c in cg if c.exact]
    if exact:
        try:
            ecospa.PlanConfig(target=target).target_params(exact, model)
        except ecospa.ConfigError as e:
            raise CliError(f"--target: {e}") from None
    return cg


def run(args: argparse.Namespace) -> int:
    model, summary, report = compress_and_save(args)
    _print(summary, report, Path(args.out))
    return 0


def compress_and_save(args: argparse.Namespace):
    """The work of ``run``: returns ``(compressed model, summary dict, CompressReport)``.

    Every argument is checked before the model is loaded (the files, ``--out`` writable, the
    tokenizer, the text long enough for ``--seq``, ``--seq`` within the model's context, a
    ``--target`` count not above the model's size counted from its config), and ``--target``
    against the couplings right after loading, before the perplexity pass."""
    need("tqdm", "rich", why="progress bars and the summary")
    text_path, out = Path(args.text), Path(args.out)
    if not text_path.is_file():
        raise CliError(f"no such text file: {args.text!r}")
    try:
        text = text_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"--text {args.text!r} is not UTF-8 text (byte {e.start}): give a text file") from None
    try:
        _, folder, gguf_file = local_source(args.model_dir)
    except CliError as e:
        raise CliError(f"MODEL_DIR: {e}") from None
    _check_out(out)
    if args.tokenizer is not None and not Path(args.tokenizer).exists():
        raise CliError(f"--tokenizer {args.tokenizer!r}: no such folder")
    quiet_transformers()
    if gguf_file is not None:
        need("gguf", why="GGUF files", install="pip install gguf")
    if args.threads:
        torch.set_num_threads(args.threads)
    seq = args.seq
    config = _config(folder, gguf_file)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and seq > limit:
        raise CliError(f"--seq {seq} is longer than the model's context ({limit} positions)")
    dense_count = _dense_params(config) if config is not None and isinstance(args.target, int) else None
    if dense_count is not None and args.target > dense_count:
        raise _too_large(args.target, dense_count, " counted from its config")
    cut = int(0.8 * len(text))
    tok = _tokenizer(args, folder, gguf_file)
    calib, held = _tokens(tok, text[:cut]), _tokens(tok, text[cut:])
    if len(calib) <= seq:
        raise CliError(f"the calibration text (first 80% of {args.text}) has {len(calib)} tokens; --seq {seq} "
                       "needs more: a longer text or a smaller --seq")
    if len(held) < 2:
        raise CliError(f"the held-out text (last 20% of {args.text}) has {len(held)} tokens; a longer text")
    loaded = load_model(str(args.model_dir))
    model = loaded.model
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    couplings = _check_target(model, args.target)
    g = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, len(calib) - seq + 1, (args.batches, args.batch_size), generator=g)
    batches = [calib[s[:, None] + torch.arange(seq)] for s in starts]  # each (batch_size, seq)
    n_eval = max(1, min(args.eval_windows, len(held) // seq))
    eval_seq = min(seq, len(held))
    windows = held[: n_eval * eval_seq].view(n_eval, eval_seq)
    progress = not args.no_progress
    dense_params = sum(p.numel() for p in model.parameters())
    ppl_before = perplexity(model, windows, progress=progress, desc="perplexity before")
    if progress:  # known now: shown while the rounds run, not only in the final table
        import sys

        print(f"perplexity before: {ppl_before:.2f} ({windows.shape[0]} x {windows.shape[1]} held-out tokens); "
              f"compressing to {args.target} in {args.rounds} rounds", file=sys.stderr, flush=True)
    with progress_bar(progress) as bar:
        model, report = ecospa.compress(model, args.target, batches, recover_steps=args.recover_steps,
                                        rounds=args.rounds, allocation=args.allocation, seed=args.seed,
                                        couplings=couplings, progress=bar)
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
