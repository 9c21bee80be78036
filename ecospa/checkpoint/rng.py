"""Random number generator states, for a resumed run that draws what an uninterrupted one draws.

``ecospa.save(..., rng=True)`` stores the states of the generators a training loop uses: torch's
CPU generator (dropout, ``torch.randn``...), every CUDA device's when CUDA is initialised,
Python's ``random`` and NumPy's global ``np.random`` (data shuffling). ``ecospa.load(...,
rng=True)`` puts them back, last, after everything else is restored. Generators a program
creates itself (``torch.Generator()``, a ``DataLoader``'s) are its own to save: pass their
``get_state()`` in ``extra=``.
"""
from __future__ import annotations

import random
import warnings
from typing import Any, Mapping

import numpy as np
import torch

from ecospa.checkpoint.tree import decode, encode, is_int
from ecospa.errors import CheckpointError

__all__ = ["rng_to_json", "check_rng", "restore_rng"]


def rng_to_json(tensors: dict[str, torch.Tensor]) -> dict:
    """The ``rng`` section (torch CPU/CUDA states as tensors, Python and NumPy states as JSON)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return encode({
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }, "rng", tensors)


def _fail(where: str, part: str) -> CheckpointError:
    return CheckpointError(f"{where}: rng.{part} is malformed; the checkpoint is damaged: save it again "
                           "(or load without rng=True)")


def check_rng(section: Any, tensors: Mapping[str, torch.Tensor], where: str) -> dict:
    """Decode and check the ``rng`` section; nothing is changed.

    Raises:
        CheckpointError: no RNG state saved, or a malformed one.
    """
    if section is None:
        raise CheckpointError(f"{where}: the checkpoint holds no RNG state (saved without rng=True); "
                              "load without rng=True")
    s = decode(section, tensors, f"{where}: rng")
    t = s.get("torch") if isinstance(s, dict) else None
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.shape == torch.get_rng_state().shape):
        raise _fail(where, "torch")
    cuda = s.get("cuda")
    if cuda is not None and not (isinstance(cuda, list) and all(
            isinstance(c, torch.Tensor) and c.dtype == torch.uint8 and c.dim() == 1 for c in cuda)):
        raise _fail(where, "cuda")
    py = s.get("python")
    if not (isinstance(py, dict) and is_int(py.get("version")) and isinstance(py.get("internal"), list)
            and len(py["internal"]) == 625 and all(is_int(x) and 0 <= x < 2 ** 32 for x in py["internal"])
            and (py.get("gauss") is None or isinstance(py.get("gauss"), float))):
        raise _fail(where, "python")
    npy = s.get("numpy")
    if not (isinstance(npy, dict) and npy.get("kind") == "MT19937" and isinstance(npy.get("keys"), list)
            and len(npy["keys"]) == 624 and all(is_int(x) and 0 <= x < 2 ** 32 for x in npy["keys"])
            and is_int(npy.get("pos")) and 0 <= npy["pos"] <= 624 and is_int(npy.get("has_gauss"))
            and isinstance(npy.get("cached_gaussian"), float)):
        raise _fail(where, "numpy")
    return s


def restore_rng(s: Mapping) -> None:
    """Put back the generator states :func:`check_rng` returned."""
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(s["cuda"]):
            torch.cuda.set_rng_state_all(s["cuda"])
        else:
            warnings.warn(f"the checkpoint holds the RNG states of {len(s['cuda'])} CUDA devices; this "
                          "process sees a different number, their states were not restored", stacklevel=3)
    py = s["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    n = s["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
