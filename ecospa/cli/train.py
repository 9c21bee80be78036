"""``ecospa train TEXT_FILE``: the demo trainer (dense vs EcoSpa, a char GPT) on your own text."""
from __future__ import annotations

import argparse

from ecospa.cli._common import CliError, add_command
from ecospa.cli.demo import add_training_options, run_training

__all__ = ["add_parser", "run"]

DESCRIPTION = """\
Train the demo's character-level GPT on TEXT_FILE (UTF-8) instead of the embedded tiny-shakespeare
text: twice from the same initial weights and batches, once dense and once with EcoSpa removing
coupled units until --target of its prunable parameters are left, in lockstep. The last 10% of
the text is held out for validation. The vocabulary is the file's characters.

Prints the demo's table and writes demo.json and demo.png to --out; 'ecospa plot OUT/demo.json'
draws the kept widths and the parameters over training. Works offline; needs the demo extra
(tqdm, matplotlib): pip install 'ecospa[demo]'. The text should hold a few thousand characters
at least (the validation part must be longer than a training window)."""

EXAMPLES = """\
ecospa train notes.txt --out runs/notes
ecospa train notes.txt --quick --steps 100 --target 0.3
ecospa plot runs/notes/demo.json"""


def add_parser(sub) -> None:
    p = add_command(sub, "train", help="train a char GPT on a text file, dense and with EcoSpa",
                    description=DESCRIPTION, examples=EXAMPLES)
    p.add_argument("text", metavar="TEXT_FILE", help="a UTF-8 text file to train on")
    add_training_options(p, "runs/train")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    path = Path(args.text)
    if not path.is_file():
        raise CliError(f"no such file: {args.text!r}")
    try:
        n = len(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read {args.text!r} as UTF-8 text: {e}") from None
    if n < 1000:
        raise CliError(f"{args.text!r} holds {n} characters; the trainer needs at least 1000")
    return run_training(args, "train", text=str(path))
