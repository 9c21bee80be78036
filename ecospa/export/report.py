"""What ``ecospa.export`` wrote (:class:`ExportReport`) and why it could not (:class:`ExportError`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ecospa.errors import CheckpointError

__all__ = ["ExportReport", "ExportError"]


class ExportError(CheckpointError):
    """A pruned model cannot be written as a standard checkpoint (not a transformers model, a
    config transformers cannot rebuild, an exported model that does not reproduce the pruned one,
    a GGUF architecture the writer does not know)."""


@dataclass(frozen=True)
class ExportReport:
    """What :func:`ecospa.export` wrote.

    Attributes:
        path: the checkpoint folder (``config.json``, ``model.safetensors``, tokenizer files).
        params: parameters of the exported model.
        pruned_params: parameters of the pruned model it came from.
        dense_params: parameters of the dense model (the pruned model's record).
        config_changes: ``{config field: (dense value, exported value)}``.
        padded: ``{"<parameter pattern> dim d": description}`` for every pruned dim exported
            larger than some layer keeps (those layers carry zero units or heads), with the
            config fields that set its size.
        hint: how to avoid the padding (empty when there is none).
        rel_err: relative error of the exported model's logits against the pruned model's on the
            check inputs (``||a - b|| / ||b||``).
        gguf: the GGUF file written, if asked for.
    """

    path: Path
    params: int
    pruned_params: int
    dense_params: int
    config_changes: Mapping[str, tuple] = field(default_factory=dict)
    padded: Mapping[str, str] = field(default_factory=dict)
    hint: str = ""
    rel_err: float = 0.0
    gguf: Path | None = None

    @property
    def overhead(self) -> float:
        """Padding overhead: exported parameters over the pruned model's, minus 1 (0.0: exactly
        as small)."""
        return self.params / self.pruned_params - 1.0 if self.pruned_params else 0.0

    def summary(self) -> str:
        """One line for a log or the CLI."""
        changes = ", ".join(f"{k} {a}->{b}" for k, (a, b) in sorted(self.config_changes.items())) or "none"
        pad = (f"; padded by {self.overhead:.2%} ({len(self.padded)} kinds of dims)"
               if self.params > self.pruned_params else "; no padding")
        return (f"exported {self.params:,} parameters (pruned model {self.pruned_params:,}, dense "
                f"{self.dense_params:,}) to {self.path}; config: {changes}{pad}")
