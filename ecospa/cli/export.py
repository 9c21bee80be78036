"""``ecospa export CHECKPOINT OUT``: a pruned model as a standard transformers checkpoint (and GGUF).

Reads an ecospa checkpoint (``ecospa.save``, ``ecospa compress --out``), writes ``OUT`` with
``config.json`` (the pruned sizes) + ``model.safetensors`` (+ the tokenizer when the checkpoint
holds one, + ``model.gguf`` with ``--gguf``), loadable by ``AutoModelForCausalLM.from_pretrained``
without ecospa. Prints what was written and any padding (``--json``: the report as JSON).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import ecospa
from ecospa.cli._common import CliError, add_command, need

__all__ = ["add_parser", "run"]

DESCRIPTION = ("Write a pruned model (an ecospa checkpoint) as a standard transformers checkpoint whose config "
               "states the pruned sizes, loadable without ecospa; optionally a GGUF file too (Llama, Mistral, "
               "Qwen2). ecospa.save keeps a model to go on training; export hands it to serving and the hub.")
EXAMPLES = """\
ecospa export ./my-lm-70 ./my-lm-70-hf
ecospa export ./my-lm-70 ./my-lm-70-hf --gguf f16
ecospa export ./my-lm-70 ./my-lm-70-hf --json"""


def add_parser(sub) -> None:
    p = add_command(sub, "export", help="a pruned model as a standard transformers checkpoint (and GGUF)",
                    description=DESCRIPTION, examples=EXAMPLES)
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="an ecospa checkpoint folder (ecospa.save, ecospa compress)")
    p.add_argument("out", metavar="OUT", help="the folder to write (config.json, model.safetensors, tokenizer)")
    p.add_argument("--gguf", nargs="?", const="f32", choices=("f32", "f16"), default=None,
                   help="also write OUT/model.gguf (Llama-family models), f32 by default")
    p.add_argument("--json", action="store_true", help="print the export report as JSON")


def _tokenizer(folder: Path):
    """The checkpoint's tokenizer, or None when it holds none."""
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any tokenizer class may fail in its own way
        raise CliError(f"{folder} holds tokenizer files that transformers cannot read ({type(e).__name__}); "
                       "export with ecospa.export(model, out) and save the tokenizer yourself") from None


def run(args: argparse.Namespace) -> int:
    need("transformers", why="exporting", install="pip install transformers")
    if args.gguf:
        need("gguf", why="GGUF files", install="pip install gguf")
    folder = Path(args.checkpoint)
    if not (folder / "ecospa.json").is_file():
        raise CliError(f"{folder} is not an ecospa checkpoint (no ecospa.json): export reads what ecospa.save or "
                       "'ecospa compress --out' wrote")
    out = Path(args.out)
    if out.resolve() == folder.resolve():
        raise CliError("OUT must be another folder than CHECKPOINT (the checkpoint keeps training state)")
    model = ecospa.load(folder)
    report = ecospa.export(model, out, _tokenizer(folder), gguf=args.gguf or False)
    if args.json:
        d = {"path": str(report.path), "params": report.params, "pruned_params": report.pruned_params,
             "dense_params": report.dense_params, "overhead": report.overhead,
             "config_changes": {k: list(v) for k, v in report.config_changes.items()},
             "padded": dict(report.padded), "hint": report.hint, "rel_err": report.rel_err,
             "gguf": str(report.gguf) if report.gguf else None}
        print(json.dumps(d, indent=1))
    else:
        print(report.summary())
        for k, v in report.padded.items():
            print(f"  padded {k}: {v}")
        if report.hint:
            print(f"  to export without padding: {report.hint}")
        if report.gguf:
            print(f"  GGUF: {report.gguf}")
    return 0
