"""Small data sets shipped inside the package (for examples, tests and the demo)."""
from __future__ import annotations

from pathlib import Path

__all__ = ["load_tinyshakespeare"]

_HERE = Path(__file__).resolve().parent


def load_tinyshakespeare() -> str:
    """The tiny-shakespeare corpus (about 1.1 MB of text, 65 distinct characters).

    Raises:
        FileNotFoundError: the package was installed without its data files.
    """
    path = _HERE / "tinyshakespeare.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall ecospa with its package data")
    return path.read_text(encoding="utf-8")
