"""What every ``ecospa`` command shares: the one-line error, the optional packages, argument
types, progress bars and the rich console.

Nothing here imports an optional package at import time: ``ecospa --help`` works with none of
them installed, and a command that needs one stops with exit 2 naming it (:func:`need`).
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["CliError", "CLI_EXTRA", "need", "positive_int", "nonnegative_int", "fraction", "target", "console",
           "progress_bar", "Parser", "add_command"]

CLI_EXTRA = "pip install 'ecospa[cli]'"


class CliError(Exception):
    """Bad input or a missing package: ``main`` prints ``ecospa CMD: error: MESSAGE`` and exits 2."""


def need(*modules: str, why: str = "", install: str = CLI_EXTRA) -> None:
    """Import ``modules`` or raise :class:`CliError` naming the missing ones and how to install them."""
    from ecospa.recipes import missing_requirements

    missing = missing_requirements(modules)
    if missing:
        what = f" ({why})" if why else ""
        raise CliError(f"this command needs {', '.join(missing)}{what}, which is not installed: {install}")


def _number(text: str, cast, ok, expected: str):
    """``cast(text)`` if it converts and ``ok`` holds, else an argparse error naming ``text``."""
    try:
        v = cast(text)
    except ValueError:
        v = None
    if v is None or not ok(v):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return v


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def fraction(text: str) -> float:
    return _number(text, float, lambda v: 0.0 < v < 1.0, "a number in (0, 1)")


def target(text: str) -> float | int:
    """A fraction of the prunable parameters in (0, 1], or a parameter count (an integer > 1)."""
    v = _number(text, float, lambda v: 0.0 < v <= 1.0 or (v > 1.0 and v.is_integer()),
                "a fraction in (0, 1] or a parameter count")
    return v if v <= 1.0 else int(v)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``ecospa CMD: error: ... (see --help)``.

    Abbreviations are off (``allow_abbrev=False``, for the command and every subcommand): a prefix
    such as ``--graph`` for ``--graphml`` is an unknown argument, not a silent choice of one.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def add_command(sub, name: str, *, help: str, description: str, examples: str) -> Parser:
    """A subcommand whose ``--help`` ends with its examples."""
    return sub.add_parser(name, help=help, description=description,
                          epilog="examples:\n" + "\n".join(f"  {line}" for line in examples.strip().splitlines()),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def console(stderr: bool = False) -> Any:
    """A rich console (``need("rich")`` first); plain when the output is not a terminal."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 160)


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Any]:
    """``update(stage, done, total)``: one tqdm bar per stage (on stderr), closed at the end."""
    bars: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if not enabled:
            return
        from tqdm import tqdm

        bar = bars.get(stage)
        if bar is None or bar.total != total or done < bar.n:
            if bar is not None:
                bar.close()
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="step", dynamic_ncols=True, leave=False)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        for bar in bars.values():
            bar.close()
