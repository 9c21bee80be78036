"""The safetensors file format, read and written with torch alone (no pickle, no extra package).

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON (padded
with spaces) mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(plus an optional ``"__metadata__"`` object of strings), then the raw little-endian bytes of the
tensors, back to back, offsets relative to the end of the header. Files written here are read by
the ``safetensors`` package and the other way round (``tests/checkpoint/test_tensorfile.py``).

The reader treats the file as untrusted input: every header field is checked (types, known
dtype, sizes that match the shape, offsets that tile the data exactly, a header and a file of the
announced size) before a byte of tensor data is read, and any violation is a
:class:`~ecospa.errors.CheckpointError` naming the file and the tensor.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from typing import BinaryIO, Mapping

import torch

from ecospa.errors import CheckpointError

__all__ = ["DTYPES", "write_tensors", "read_tensors", "read_header"]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {k: torch.empty(0, dtype=v).element_size() for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors package's limit too
_DAMAGED = "the file is damaged or was not written by ecospa.save; save the checkpoint again"


def _check_host() -> None:
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise CheckpointError("safetensors files are little-endian; this host is big-endian")


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 CPU tensor (a view when already contiguous on CPU)."""
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8)


def write_tensors(f: BinaryIO, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str] | None = None) -> int:
    """Write ``tensors`` to the open binary file ``f`` in the safetensors format.

    Tensors are laid out by decreasing element size (then name), so every tensor starts at an
    offset aligned to its element size. Returns the number of bytes written.

    Raises:
        CheckpointError: a name that is not a string, or a dtype the format does not have.
    """
    _check_host()
    items = []
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise CheckpointError(f"cannot save a tensor named {name!r}: names are strings, "
                                  "and '__metadata__' is reserved")
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"cannot save {name!r}: a {type(t).__name__}, not a tensor")
        if t.dtype not in _NAMES:
            raise CheckpointError(f"cannot save {name!r}: dtype {t.dtype} has no safetensors code "
                                  f"(supported: {sorted(map(str, _NAMES))}); convert it first")
        items.append((name, t))
    items.sort(key=lambda nt: (-nt[1].element_size(), nt[0]))
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, t in items:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for _, t in items:
        if t.numel():
            f.write(memoryview(_bytes_of(t).numpy()))
    return 8 + len(text) + offset


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(f: BinaryIO, size: int, where: str) -> tuple[int, dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]]:
    """Parse and check the header of a safetensors file of ``size`` bytes.

    Returns:
        ``(data start, {name: (dtype, shape, begin, end)})``, offsets relative to the data start.

    Raises:
        CheckpointError: anything malformed, naming ``where`` (the file) and the tensor.
    """
    _check_host()
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{where}: {size} bytes, too short for a safetensors file; {_DAMAGED}")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"{where}: the header announces {n} bytes but the file has {size}; "
                              f"it is truncated or not a safetensors file; {_DAMAGED}")
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: the header is not valid JSON ({e}); {_DAMAGED}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: the header is a JSON {type(header).__name__}, not an object; {_DAMAGED}")
    data_len = size - 8 - n
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{where}: '__metadata__' must map strings to strings; {_DAMAGED}")
    entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
    for name, e in header.items():
        bad = f"{where}: tensor {name!r}"
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{bad}: expected exactly dtype, shape, data_offsets; {_DAMAGED}")
        dtype = DTYPES.get(e["dtype"]) if isinstance(e["dtype"], str) else None
        if dtype is None:
            raise CheckpointError(f"{bad}: unknown dtype {e['dtype']!r} (known: {sorted(DTYPES)}); {_DAMAGED}")
        shape, offs = e["shape"], e["data_offsets"]
        if not (isinstance(shape, list) and all(_is_int(k) and k >= 0 for k in shape)):
            raise CheckpointError(f"{bad}: shape {shape!r} is not a list of non-negative ints; {_DAMAGED}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(k) for k in offs)
                and 0 <= offs[0] <= offs[1] <= data_len):
            raise CheckpointError(f"{bad}: data_offsets {offs!r} outside the {data_len} data bytes; {_DAMAGED}")
        numel = 1
        for k in shape:
            numel *= k
        nbytes = numel * _ITEMSIZE[e["dtype"]]
        if offs[1] - offs[0] != nbytes:
            raise CheckpointError(f"{bad}: shape {shape} of {e['dtype']} needs {nbytes} bytes, the "
                                  f"offsets give {offs[1] - offs[0]}; {_DAMAGED}")
        entries[name] = (dtype, tuple(shape), offs[0], offs[1])
    pos = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != pos:
            raise CheckpointError(f"{where}: tensor {name!r} starts at byte {begin}, expected {pos} "
                                  f"(tensors must tile the data without gaps or overlaps); {_DAMAGED}")
        pos = end
    if pos != data_len:
        raise CheckpointError(f"{where}: the tensors cover {pos} bytes of data, the file holds "
                              f"{data_len}; it is truncated or has trailing bytes; {_DAMAGED}")
    return 8 + n, entries


def read_tensors(f: BinaryIO, where: str) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file open as ``f`` (CPU tensors that own their memory).

    Raises:
        CheckpointError: a malformed header or a file of the wrong size (see :func:`read_header`).
    """
    size = os.fstat(f.fileno()).st_size
    start, entries = read_header(f, size, where)
    out: dict[str, torch.Tensor] = {}
    for name, (dtype, shape, begin, end) in entries.items():
        buf = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            f.seek(start + begin)
            got = f.readinto(memoryview(buf.numpy()))
            if got != end - begin:
                raise CheckpointError(f"{where}: tensor {name!r} is cut short (read {got} of "
                                      f"{end - begin} bytes); {_DAMAGED}")
        out[name] = buf.view(dtype).reshape(shape)
    return out
