"""Tensors through safetensors files: round trips of every dtype, and untrusted files refused."""
from __future__ import annotations

import io
import json
import struct

import pytest
import torch

from ecospa.checkpoint.tensorfile import read_tensors, write_tensors
from ecospa.errors import CheckpointError

st = pytest.importorskip("safetensors.torch")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _tensors() -> dict[str, torch.Tensor]:
    out = {f"t_{code}": (torch.arange(6) % 2).to(dtype).reshape(2, 3) for code, dtype in DTYPES.items()}
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 4)
    out["strided"] = torch.randn(4, 6)[:, ::2]
    return out


def _roundtrip_bytes(tensors) -> bytes:
    buf = io.BytesIO()
    write_tensors(buf, tensors, {"format": "pt"})
    return buf.getvalue()


def test_both_ways_with_the_safetensors_package(tmp_path):
    tensors = {k: v for k, v in _tensors().items() if k not in ("t_C64",)}
    path = tmp_path / "a.safetensors"
    with open(path, "wb") as f:
        write_tensors(f, tensors, {"format": "pt"})
    theirs = st.load_file(path)
    assert theirs.keys() == tensors.keys()
    for k, v in tensors.items():
        assert theirs[k].dtype == v.dtype and theirs[k].shape == v.shape and torch.equal(_bits(theirs[k]), _bits(v))
    st.save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "b.safetensors")
    with open(tmp_path / "b.safetensors", "rb") as f:
        ours = read_tensors(f, "b")
    for k, v in tensors.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape and torch.equal(_bits(ours[k]), _bits(v))


def _file(data: bytes, tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    return open(path, "rb")


def _with_header(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


BAD = {
    "empty file": b"",
    "huge header length": struct.pack("<Q", 2 ** 60) + b"{}",
    "header not json": struct.pack("<Q", 4) + b"\x80abc",
    "header a list": _with_header([]),  # type: ignore[arg-type]
    "unknown dtype": _with_header({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)),
    "negative shape": _with_header({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)),
    "size mismatch": _with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4)),
    "offsets past the end": _with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4)),
    "overlap": _with_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                             "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    "trailing bytes": _with_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8)),
    "bool as int": _with_header({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4)),
    "duplicate key": struct.pack("<Q", 80) + b'{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},'
                                              b'"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'.ljust(80),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_files_are_refused(case, tmp_path):
    with _file(BAD[case], tmp_path) as f, pytest.raises(CheckpointError, match="x"):
        read_tensors(f, "x")


def test_truncated_anywhere(tmp_path):
    data = _roundtrip_bytes({"a": torch.randn(3, 5), "b": torch.arange(7)})
    for cut in (1, 7, 9, len(data) // 2, len(data) - 1):
        with _file(data[:cut], tmp_path) as f, pytest.raises(CheckpointError):
            read_tensors(f, "x")
    with _file(data, tmp_path) as f:
        back = read_tensors(f, "x")
    assert back["b"].tolist() == list(range(7))
