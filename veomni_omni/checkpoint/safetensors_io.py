"""safetensors on disk: header reading that names the broken file, and a streaming shard writer.

The format is an 8-byte little-endian header length, a JSON header (`key -> dtype, shape,
data_offsets`, plus `__metadata__`), then the tensors' bytes back to back. Reading the headers
ourselves gives shapes and dtypes of every shard without touching tensor data, and lets a
truncated shard be reported by name before any rank starts loading. Writing the header first and
then each tensor as it is produced keeps one tensor in memory at a time instead of a whole shard
(`safetensors.torch.save_file` needs the whole dict).
"""

from __future__ import annotations

import json
import os
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: the message names the file or the keys."""


@dataclass(frozen=True)
class TensorEntry:
    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


def tensor_nbytes(shape, dtype: torch.dtype) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel * dtype.itemsize


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors one safetensors file describes, after checking the file holds all their bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        header_len = int.from_bytes(prefix, "little")
        if 8 + header_len > size:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {header_len} bytes, file of {size})")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as err:
            raise CheckpointError(f"{path}: unreadable safetensors header ({err})") from err
    header.pop("__metadata__", None)
    entries, data_end = {}, 0
    for key, info in header.items():
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {key} has dtype {info['dtype']}, which this loader does not read")
        entries[key] = TensorEntry(key, path, DTYPES[info["dtype"]], tuple(info["shape"]))
        data_end = max(data_end, info["data_offsets"][1])
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: its header describes {data_end} bytes of tensor data, "
            f"the file holds {size - 8 - header_len}"
        )
    return entries


def read_checkpoint(directory) -> dict[str, TensorEntry]:
    """Every tensor of a HF safetensors checkpoint directory (sharded with an index, or one file)."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err})") from err
        headers = {}
        for name in sorted(set(weight_map.values())):
            shard = directory / name
            if not shard.is_file():
                raise CheckpointError(f"{shard}: listed in {INDEX_NAME} but missing")
            headers[name] = read_header(shard)
        entries = {}
        for key, name in weight_map.items():
            if key not in headers[name]:
                raise CheckpointError(f"{directory / name}: {INDEX_NAME} places {key} in this file, which lacks it")
            entries[key] = headers[name][key]
        return entries
    single = directory / SINGLE_NAME
    if single.is_file():
        return read_header(single)
    raise CheckpointError(f"{directory}: no safetensors checkpoint ({INDEX_NAME} or {SINGLE_NAME})")


class ShardWriter:
    """Writes one safetensors file whose tensors (key, dtype, shape, in order) are known up front."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        if sys.byteorder != "little":  # safetensors stores little-endian; we write memory as is
            raise RuntimeError("writing safetensors needs a little-endian host")
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, dtype, shape in entries:
            end = offset + tensor_nbytes(shape, dtype)
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
        self.path = path
        self._pending = deque(entries)
        self._file = open(path, "wb")
        self._file.write(len(blob).to_bytes(8, "little"))
        self._file.write(blob)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        expected = self._pending.popleft()
        got = (key, tensor.dtype, tuple(tensor.shape))
        if got != expected:
            raise RuntimeError(f"{self.path}: expected to write {expected}, got {got}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(data.numpy().data)

    @property
    def done(self) -> bool:
        return not self._pending

    def close(self) -> None:
        if self._pending:
            raise RuntimeError(f"{self.path}: closed with {len(self._pending)} tensors unwritten")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
