"""The version of ecospa (written into every checkpoint's manifest)."""

__version__ = "0.1.0"
