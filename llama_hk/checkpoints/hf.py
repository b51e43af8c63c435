"""Hugging Face directories: config.json with safetensors (single or sharded) or pytorch_model*.bin weights; and
the export that transformers loads back.

Tensors are read one at a time (safetensors by positioned reads, torch files memory-mapped), so loading holds the
parameters plus one tensor.
"""

import json
import os
import pathlib
from typing import Callable, Iterator

import numpy as np

from llama_hk import io_utils
from llama_hk import params
from llama_hk.checkpoints import safetensors_io
from llama_hk.checkpoints.leaves import Placement
from llama_hk.config import LlamaConfig, load_hf_config, to_hf_config
from llama_hk.errors import UserError, first_line
from llama_hk.models import rope
from llama_hk.tokenizers.tokenizer import Tokenizer

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
MAX_SHARD_BYTES = 5 * 2**30


class HfDir:
  """A Hugging Face model directory."""
  name = "hf"

  def detect(self, path: pathlib.Path) -> bool:
    return (path / "config.json").is_file()

  def config(self, path: pathlib.Path) -> LlamaConfig:
    return load_hf_config(str(path / "config.json"))

  def tokenizer(self, path: pathlib.Path) -> Tokenizer | None:
    return Tokenizer.in_dir(path)

  def tensors(self, path: pathlib.Path) -> Callable[[str], np.ndarray]:
    """HF name -> array for the directory's weights: single or sharded safetensors, or pytorch_model*.bin."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
      if (path / single).is_file():
        return _open_weight_file(path / single).__getitem__
      if (path / index_name).is_file():
        try:
          weight_map = json.loads((path / index_name).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
          raise UserError(f"{path / index_name}: not a weight index (no weight_map)") from None
        opened = {name: _open_weight_file(path / name) for name in sorted(set(weight_map.values()))}
        return lambda name: opened[weight_map[name]][name]
    raise UserError(f"{path}: no weights (none of {', '.join(WEIGHT_FILES)})")

  def leaves(self, path: pathlib.Path, config: LlamaConfig, dtype: str | None,
             placement: Placement) -> Iterator[tuple[str, str, object]]:
    return params.iter_params(self.tensors(path), config, "hf", dtype, str(path), placement.leaf)


class _SafetensorsLookup:
  def __init__(self, path: pathlib.Path):
    self.file = safetensors_io.SafetensorsFile(str(path))

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self.file:
      raise KeyError(name)
    return self.file.get(name)


class TorchLookup:
  """A pytorch_model*.bin state dict, unpickled safely (weights_only) and memory-mapped; bfloat16 viewed as
  ml_dtypes.bfloat16 (NumPy has none)."""

  def __init__(self, path: pathlib.Path):
    try:
      import torch
    except ImportError:
      raise UserError(f"{path}: reading pytorch_model*.bin needs torch (pip install torch), or convert to "
                      "safetensors") from None
    self._torch = torch
    try:
      self._state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe pickles.
      raise UserError(f"{path}: unreadable PyTorch checkpoint ({type(e).__name__}: {first_line(e)})") from None

  def __getitem__(self, name: str) -> np.ndarray:
    tensor = self._state[name]
    if tensor.dtype == self._torch.bfloat16:
      import ml_dtypes
      return tensor.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _open_weight_file(path: pathlib.Path):
  if not path.is_file():
    raise UserError(f"{path}: missing weight file")
  return _SafetensorsLookup(path) if path.suffix == ".safetensors" else TorchLookup(path)


def export(path: str | os.PathLike, config: LlamaConfig, tree, tokenizer: Tokenizer | None,
           dtype: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
  """Writes a Hugging Face directory (config.json, safetensors, tokenizer files) loadable by transformers,
  atomically; safetensors shards of at most `max_shard_bytes` (a larger tensor alone in its shard) with
  model.safetensors.index.json when there are several, each tensor made only as it is written. Per-frequency RoPE
  factors are written as the llama3 scaling they encode (rope.as_llama3), or refused."""
  hf_config = to_hf_config(rope.as_llama3(config), dtype=np.dtype(dtype or config.param_dtype).name)
  dtype = np.dtype(dtype or config.param_dtype)
  tensors = [(name, shape, dtype, make) for name, shape, make in params.hf_tensors(tree, config)]
  shards, current, size = [], [], 0
  for entry in tensors:
    nbytes = int(np.prod(entry[1])) * dtype.itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(entry)
    size += nbytes
  shards.append(current)
  with io_utils.atomic_dir(path) as tmp:
    if tokenizer is not None:
      tokenizer.save(tmp)
      hf_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    if len(shards) == 1:
      safetensors_io.write(str(tmp / "model.safetensors"), shards[0])
      return
    weight_map = {}
    for k, shard in enumerate(shards):
      name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      safetensors_io.write(str(tmp / name), shard)
      weight_map.update({entry[0]: name for entry in shard})
    total = sum(int(np.prod(e[1])) * dtype.itemsize for e in tensors)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
