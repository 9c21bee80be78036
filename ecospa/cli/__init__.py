"""The ``ecospa`` command line.

    ecospa inspect gpt2                       # the couplings of a model, and whether they run narrow
    ecospa compress ./my-lm --text t.txt --target 0.7 --out small   # one-shot compression
    ecospa export small small-hf              # a standard transformers checkpoint (and GGUF)
    ecospa train notes.txt                    # the demo trainer on your text
    ecospa plot runs/demo/demo.json           # kept widths per layer and head, params over training
    ecospa demo                               # dense vs EcoSpa on a char GPT, about 3-5 minutes on CPU
    ecospa --version

One file per command (``inspect_model``, ``compress``, ``train``, ``plot``, ``demo``); shared
pieces in ``_common``. Only ecospa's public API is used. The optional packages (the ``cli``
extra: rich, tqdm, matplotlib, networkx) are imported by the commands that need them; when one
is missing the command exits with status 2 and one line naming it. Bad input (an unknown model,
a missing file, a bad target, a library error, a file that cannot be written) also exits 2 with
one line on stderr. Nothing is ever downloaded.
"""
from __future__ import annotations

import sys
from typing import Sequence

import ecospa
from ecospa.cli import compress, demo, export, inspect_model, plot, train
from ecospa.cli._common import CliError, Parser

__all__ = ["main", "build_parser", "CliError"]

COMMANDS = {"inspect": inspect_model, "compress": compress, "export": export, "train": train, "plot": plot,
            "demo": demo}

EPILOG = """\
examples:
  ecospa inspect llama --graphml llama.graphml
  ecospa compress ./my-lm --text corpus.txt --target 0.7 --out ./my-lm-70
  ecospa train notes.txt --out runs/notes && ecospa plot runs/notes/demo.json
  ecospa demo --quick

Run 'ecospa COMMAND --help' for a command's options and examples. Library usage: README.md;
this command: docs/cli.md. Optional packages: pip install 'ecospa[cli]'."""


def build_parser() -> Parser:
    """The argument parser (subcommands: inspect, compress, train, plot, demo)."""
    import argparse

    ap = Parser(prog="ecospa", description="Coupled structured sparsity (EcoSpa) for PyTorch transformers: find "
                "the coupled weights of a model, compress it, train it sparse, plot what was kept.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"ecospa {ecospa.__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for mod in COMMANDS.values():
        mod.add_parser(sub)
    ap.commands = sub.choices  # name -> its parser
    return ap


def _refuse_unknown(ap: Parser, args, extra: list[str]) -> None:
    """Unrecognized arguments: the command's one-line error, naming the close options (abbreviations
    are off, so ``--graph`` is refused and ``--graphml`` suggested)."""
    import difflib

    parser = ap.commands.get(args.command, ap) if args.command else ap
    known = [o for a in parser._actions for o in a.option_strings]
    hints = []
    for word in extra:
        flag = word.split("=", 1)[0]
        if flag.startswith("-"):
            close = [o for o in known if o.startswith(flag)] or difflib.get_close_matches(flag, known, n=2)
            hints += [o for o in close if o not in hints]
    hint = f"; did you mean {' or '.join(hints)}?" if hints else ""
    parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ecospa`` command; returns the exit status."""
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if extra:
        _refuse_unknown(ap, args, extra)
    if args.command is None:
        ap.print_help()
        return 0
    try:
        return COMMANDS[args.command].run(args)
    except BrokenPipeError:  # stdout closed early (``ecospa inspect gpt2 --json | head``): not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CliError, ecospa.EcospaError, OSError) as e:
        print(f"ecospa {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ecospa {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    """A CliError folded onto one line; the first line of a library error (its details follow it);
    an OSError as Python words it (``[Errno 13] Permission denied: 'out'``)."""
    if isinstance(e, CliError):
        return " ".join(str(e).split())
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__

if __name__ == "__main__":
    sys.exit(main())
