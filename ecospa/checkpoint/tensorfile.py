"""Tensors in and out of safetensors files, through the ``safetensors`` package.

Files from users are untrusted input: the package parses the header and checks every tensor's
dtype, shape and byte range against the file before anything is returned (no pickle, no code
runs). Whatever it refuses, and any file it cannot parse, becomes a
:class:`~ecospa.errors.CheckpointError` naming the file.
"""
from __future__ import annotations

from typing import BinaryIO, Mapping

import torch

from ecospa.errors import CheckpointError

__all__ = ["write_tensors", "read_tensors"]

_DAMAGED = "the file is damaged or was not written by ecospa.save; save the checkpoint again"


def write_tensors(f: BinaryIO, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str] | None = None) -> int:
    """Write ``tensors`` (CPU copies, contiguous) to the open binary file ``f`` in the safetensors
    format; returns the number of bytes written.

    Raises:
        CheckpointError: a tensor the format cannot hold (its dtype) or a name that is not a string.
    """
    from safetensors.torch import save

    bad = [k for k in tensors if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"tensor names must be strings, got {bad[:3]!r}")
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        data = save(cpu, metadata=dict(metadata) if metadata else None)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot write these tensors as safetensors: {type(e).__name__}: {e}") from None
    f.write(data)
    return len(data)


def read_tensors(f: BinaryIO, where: str) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file open as ``f`` (CPU tensors owning their memory).

    Raises:
        CheckpointError: the file is not a valid safetensors file; the message names ``where``.
    """
    from safetensors.torch import load

    data = f.read()
    try:
        out = load(data)
    except Exception as e:  # any parse failure of untrusted input
        raise CheckpointError(f"{where}: not a valid safetensors file ({type(e).__name__}: {e}); "
                              f"{_DAMAGED}") from None
    return {k: v.clone() for k, v in out.items()}
