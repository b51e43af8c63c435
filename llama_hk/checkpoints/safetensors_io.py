"""Safetensors read and written tensor by tensor, with bfloat16 and no framework.

The `safetensors` package's NumPy API cannot represent bfloat16 (here it comes from ml_dtypes). Tensors are
read with positioned reads rather than a memory map, so pages of tensors already converted do not stay
resident: that is what keeps conversion's peak memory near the size of its output.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

from llama_hk.errors import UserError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
  """A read-only view of one .safetensors file; `get(name)` reads one tensor."""

  def __init__(self, path: str):
    self.path = path
    try:
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
          raise UserError(f"{path}: truncated safetensors file (header of {header_len} bytes, file of {size})")
        header = json.loads(f.read(header_len))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
      raise UserError(f"{path}: not a safetensors file (unreadable header)") from None
    except OSError as e:
      raise UserError(f"{path}: cannot read ({e.strerror})") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self._entries = header
    self._data_start = 8 + header_len
    data_len = max((e["data_offsets"][1] for e in header.values()), default=0)
    if self._data_start + data_len > size:
      raise UserError(f"{path}: truncated safetensors file ({size} bytes, tensors need {self._data_start + data_len})")

  def keys(self):
    return self._entries.keys()

  def __contains__(self, name):
    return name in self._entries

  def get(self, name: str) -> np.ndarray:
    entry = self._entries[name]
    if entry["dtype"] not in _DTYPES:
      raise UserError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
    begin, end = entry["data_offsets"]
    raw = np.empty((end - begin,), np.uint8)
    with open(self.path, "rb") as f:
      f.seek(self._data_start + begin)
      if f.readinto(memoryview(raw)) != end - begin:
        raise UserError(f"{self.path}: truncated safetensors file (tensor {name})")
    return raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def write(path: str, tensors, metadata: dict[str, str] | None = None) -> None:
  """Writes tensors to `path` holding one of them in memory at a time.

  `tensors`: (name, shape, dtype, make) tuples; `make()` returns the array only when its bytes are written.
  """
  header, offset = {}, 0
  for name, shape, dtype, _ in tensors:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = {"format": "pt", **(metadata or {})}
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # The data section starts 8-byte aligned.
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for name, shape, dtype, make in tensors:
      array = np.ascontiguousarray(make(), dtype=dtype)
      assert array.shape == tuple(shape), (name, array.shape, shape)
      f.write(array.reshape(-1).view(np.uint8).data)  # Bytes: a bfloat16 memoryview is not writable.
