"""Reading and writing checkpoints: Hugging Face directories, GGUF files, llama_hk's own format and training
model_dirs, each a `formats.Format` (hf.py, gguf.py, native.py) found by `formats.detect`.

Every reader assembles parameters tensor by tensor (leaves.py), on the host, the default device or straight into
their shards over a mesh, so a load holds the parameters plus one tensor.
"""

import os
import pathlib
from typing import Any, NamedTuple

from llama_hk import params
from llama_hk import sharding
from llama_hk.checkpoints import formats
from llama_hk.checkpoints.hf import export as export_hf
from llama_hk.checkpoints.leaves import Placement
from llama_hk.checkpoints.native import CONFIG_FILE, PARAMS_DIR, TRAINING_CHECKPOINTS_DIR, latest_step, save
from llama_hk.config import LlamaConfig
from llama_hk.io_utils import check_output_dir
from llama_hk.tokenizers.tokenizer import Tokenizer

__all__ = ["CONFIG_FILE", "PARAMS_DIR", "TRAINING_CHECKPOINTS_DIR", "Checkpoint", "convert", "detect_kind",
           "export_hf", "latest_step", "load", "load_config", "save"]


class Checkpoint(NamedTuple):
  config: LlamaConfig
  params: Any  # The Haiku parameter tree (NumPy or jax arrays).
  tokenizer: Tokenizer | None


def detect_kind(path: str | os.PathLike) -> str:
  """"gguf", "hf", "llama_hk" or "model_dir"; UserError naming the path when it is none of them."""
  return formats.detect(path).name


def load_config(path: str | os.PathLike) -> LlamaConfig:
  """The config of any checkpoint, without reading weights."""
  return formats.detect(path).config(pathlib.Path(path))


def _read(path: pathlib.Path, dtype: str | None, on_device: bool = False, mesh=None):
  """(config, leaves, tokenizer) of any checkpoint: the config says `dtype` (default the stored one) and the leaves
  come one at a time, placed as asked."""
  fmt = formats.detect(path)
  config, tokenizer = fmt.config(path), fmt.tokenizer(path)
  placement = Placement(on_device, None if mesh is None else sharding.param_shardings(config, mesh))
  leaves = fmt.leaves(path, config, dtype, placement)
  return config.replace(param_dtype=dtype or config.param_dtype), leaves, tokenizer


def load(path: str | os.PathLike, dtype: str | None = None, on_device: bool = True, mesh=None,
         **config_overrides) -> Checkpoint:
  """Loads any checkpoint (parameters in `dtype`, default the stored one).

  Parameters are assembled on the default device, or sharded over `mesh` by `sharding.param_shardings` (each
  device receiving only its shards), or with on_device=False as NumPy arrays (for export); layer by layer, so
  the peak memory is the parameters plus one tensor. `config_overrides` replace config fields (e.g.
  compute_dtype).
  """
  config, leaves, tokenizer = _read(pathlib.Path(path), dtype, on_device, mesh)
  return Checkpoint(config.replace(**config_overrides), params.collect(leaves), tokenizer)


def convert(source: str | os.PathLike, output: str | os.PathLike, output_format: str = "llama_hk",
            dtype: str | None = None) -> None:
  """Any checkpoint to llama_hk (streamed: one leaf in memory at a time) or to an HF directory."""
  check_output_dir(output)  # Before anything is read.
  if output_format == "hf":
    ckpt = load(source, dtype=dtype, on_device=False)
    export_hf(output, ckpt.config, ckpt.params, ckpt.tokenizer)
  else:
    save(output, *_read(pathlib.Path(source), dtype))
