"""CharCorpus: the positional split, the fixed batch orders, and the embedded text."""
from __future__ import annotations

import pytest
import torch

from ecospa import ConfigError
from ecospa.recipes.data import load_tinyshakespeare
from ecospa.recipes.train import CharCorpus

TEXT = "".join(chr(ord("a") + (i * 7) % 13) for i in range(1000))


def test_split_is_positional_and_decodes_back():
    c = CharCorpus.from_text(TEXT, val_fraction=0.2)
    assert (len(c.train), len(c.val)) == (800, 200)
    assert c.decode(c.train) == TEXT[:800] and c.decode(c.val) == TEXT[800:]
    assert c.vocab_size == 13 and c.chars == "".join(sorted(set(TEXT)))
    assert torch.equal(c.encode(TEXT[:50]), c.train[:50])


def test_errors_name_the_bad_value():
    with pytest.raises(ConfigError, match="1.5"):
        CharCorpus.from_text(TEXT, val_fraction=1.5)
    with pytest.raises(ConfigError, match="'Z'"):
        CharCorpus.from_text(TEXT).encode("abZ")
    with pytest.raises(ConfigError, match="too short"):
        CharCorpus.from_text("abc")


def test_training_windows_are_seeded_and_inside_the_training_text():
    c = CharCorpus.from_text(TEXT)
    a, b = c.train_starts(5, 4, 16, seed=3), c.train_starts(5, 4, 16, seed=3)
    assert a.shape == (5, 4) and torch.equal(a, b)
    assert not torch.equal(a, c.train_starts(5, 4, 16, seed=4))
    assert int(a.max()) + 16 + 1 <= len(c.train)
    w = CharCorpus.windows(c.train, a[0], 16)
    assert w.shape == (4, 17) and torch.equal(w[0], c.train[a[0, 0]:a[0, 0] + 17])


def test_validation_windows_do_not_overlap_and_stay_inside():
    c = CharCorpus.from_text(TEXT)
    s = c.val_starts(8)
    assert torch.equal(s, torch.arange(len(s)) * 8) and int(s[-1]) + 9 <= len(c.val)
    few = c.val_starts(8, max_windows=3)
    assert len(few) == 3 and few[0] == 0 and few[-1] == s[-1]


def test_embedded_text_is_tinyshakespeare():
    text = load_tinyshakespeare()
    assert len(text) == 1_115_394 and text.startswith("First Citizen:")
    assert CharCorpus.tinyshakespeare().vocab_size == 65
