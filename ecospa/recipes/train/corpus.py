"""A character-level corpus with a deterministic train/validation split and fixed batch orders.

The split is positional: the first ``1 - val_fraction`` of the text is the training text, the rest
the validation text, so no validation character is ever inside a training window. Training
batches are drawn from the training text only, from a seeded generator, ahead of time: every run
given the same seed sees the same windows in the same order. Validation uses non-overlapping
windows of the validation text (no randomness at all).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ecospa import ConfigError

__all__ = ["CharCorpus"]


@dataclass(frozen=True)
class CharCorpus:
    """Character-level text, encoded and split.

    Attributes:
        chars: the vocabulary, sorted (index = token id).
        train: ``(n_train,)`` long token ids of the training text.
        val: ``(n_val,)`` long token ids of the held-out validation text.
    """

    chars: str
    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def from_text(cls, text: str, val_fraction: float = 0.1) -> "CharCorpus":
        """Encode ``text`` and split it: the last ``val_fraction`` of it is the validation text.

        Raises:
            ConfigError: ``val_fraction`` outside (0, 1), or a text too short to split.
        """
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"val_fraction should be in (0, 1), got {val_fraction!r}")
        if len(text) < 100:
            raise ConfigError(f"text of {len(text)} characters is too short to split (need >= 100)")
        chars = "".join(sorted(set(text)))
        lut = {c: i for i, c in enumerate(chars)}
        data = torch.tensor([lut[c] for c in text], dtype=torch.long)
        n_train = int(round((1.0 - val_fraction) * len(data)))
        return cls(chars, data[:n_train], data[n_train:])

    @classmethod
    def tinyshakespeare(cls, val_fraction: float = 0.1) -> "CharCorpus":
        """The tiny-shakespeare text shipped with ecospa (about 1.1 MB, 65 characters)."""
        from ecospa.recipes.data import load_tinyshakespeare

        return cls.from_text(load_tinyshakespeare(), val_fraction)

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """``(len(text),)`` long token ids.

        Raises:
            ConfigError: a character outside the vocabulary.
        """
        lut = {c: i for i, c in enumerate(self.chars)}
        bad = sorted({c for c in text if c not in lut})
        if bad:
            raise ConfigError(f"characters {bad!r} are not in the vocabulary")
        return torch.tensor([lut[c] for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        """Text of a 1-D tensor of token ids."""
        return "".join(self.chars[i] for i in ids.tolist())

    def train_starts(self, steps: int, batch_size: int, block_size: int, seed: int) -> torch.Tensor:
        """``(steps, batch_size)`` start positions of the training windows, from ``seed``.

        Each window holds ``block_size + 1`` tokens (inputs and shifted targets) and lies wholly
        inside the training text.
        """
        hi = len(self.train) - block_size - 1
        if hi < 1:
            raise ConfigError(f"block_size {block_size} is too long for {len(self.train)} training tokens")
        g = torch.Generator().manual_seed(int(seed))
        return torch.randint(hi, (steps, batch_size), generator=g)

    def val_starts(self, block_size: int, max_windows: int | None = None) -> torch.Tensor:
        """Start positions of non-overlapping validation windows of ``block_size + 1`` tokens.

        All of them when ``max_windows`` is None, else ``max_windows`` of them evenly spread
        over the validation text. Deterministic.
        """
        n = (len(self.val) - 1) // block_size
        if n < 1:
            raise ConfigError(f"block_size {block_size} is too long for {len(self.val)} validation tokens")
        starts = torch.arange(n) * block_size
        if max_windows is not None and max_windows < n:
            if max_windows < 1:
                raise ConfigError(f"max_windows should be positive, got {max_windows!r}")
            starts = starts[torch.linspace(0, n - 1, max_windows).round().long()]
        return starts

    @staticmethod
    def windows(split: torch.Tensor, starts: torch.Tensor, block_size: int) -> torch.Tensor:
        """``(len(starts), block_size + 1)`` windows of ``split`` beginning at ``starts``."""
        return split[starts[:, None] + torch.arange(block_size + 1)]
