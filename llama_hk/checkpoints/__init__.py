"""Reading and writing checkpoints: Hugging Face directories, GGUF files, llama_hk's own format, training
model_dirs and Meta's original release format, each a `formats.Format` (hf.py, gguf.py, native.py, meta.py) found
by `formats.detect`; PEFT LoRA adapters (peft.py) applied to any of them; and GGUF files written for llama.cpp
(gguf_export.py).

Every reader assembles parameters tensor by tensor (leaves.py), on the host, the default device or straight into
their shards over a mesh, so a load holds the parameters plus one tensor.
"""

import os
import pathlib
from typing import Any, NamedTuple

from llama_hk import params
from llama_hk import sharding
from llama_hk.checkpoints import formats
from llama_hk.checkpoints import gguf_export
from llama_hk.checkpoints import peft
from llama_hk.checkpoints.hf import MAX_SHARD_BYTES, export as export_hf
from llama_hk.checkpoints.leaves import Placement
from llama_hk.checkpoints.native import CONFIG_FILE, PARAMS_DIR, TRAINING_CHECKPOINTS_DIR, latest_step, save
from llama_hk.config import LlamaConfig
from llama_hk.errors import UserError
from llama_hk.io_utils import check_output_dir
from llama_hk.ops import lora as lora_lib
from llama_hk.tokenizers.tokenizer import Tokenizer

__all__ = ["CONFIG_FILE", "MAX_SHARD_BYTES", "PARAMS_DIR", "TRAINING_CHECKPOINTS_DIR", "Checkpoint", "convert",
           "detect_kind", "export_hf", "latest_step", "load", "load_config", "save"]


class Checkpoint(NamedTuple):
  config: LlamaConfig
  params: Any  # The Haiku parameter tree (NumPy or jax arrays); with `lora`, the adapter's leaves beside the base's.
  tokenizer: Tokenizer | None
  lora: lora_lib.LoraConfig | None = None  # The adapter applied, for `make_forward(config, lora=...)`.


def detect_kind(path: str | os.PathLike) -> str:
  """"gguf", "hf", "llama_hk", "model_dir" or "meta"; UserError naming the path when it is none of them."""
  return formats.detect(path).name


def load_config(path: str | os.PathLike) -> LlamaConfig:
  """The config of any checkpoint, without reading weights."""
  return formats.detect(path).config(pathlib.Path(path))


def _read(path: pathlib.Path, dtype: str | None, on_device: bool = False, mesh=None):
  """(config, leaves, tokenizer) of any checkpoint: the config says `dtype` (default the stored one) and the leaves
  come one at a time, placed as asked."""
  fmt = formats.detect(path)
  config, tokenizer = fmt.config(path), fmt.tokenizer(path)
  want = config.replace(param_dtype=dtype or config.param_dtype)
  placement = Placement(on_device, None if mesh is None else sharding.param_shardings(want, mesh))
  return want, fmt.leaves(path, config, dtype, placement), tokenizer


def load(path: str | os.PathLike, dtype: str | None = None, on_device: bool = True, mesh=None,
         adapter: str | os.PathLike | None = None, **config_overrides) -> Checkpoint:
  """Loads any checkpoint (parameters in `dtype`, default the stored one), with the PEFT LoRA `adapter` directory
  applied (not merged: its float32 leaves beside the base's, and `lora` set) when given.

  Parameters are assembled on the default device, or sharded over `mesh` by `sharding.param_shardings` (each
  device receiving only its shards), or with on_device=False as NumPy arrays (for export); layer by layer, so
  the peak memory is the parameters plus one tensor. `config_overrides` replace config fields (e.g.
  compute_dtype).
  """
  path = pathlib.Path(path)
  adapter = adapter or peft.model_dir_adapter(path)
  lora, adapter_tree = None, None
  if adapter is not None:  # Read first: a bad adapter fails before the base is loaded.
    lora, adapter_tree = peft.read(adapter, load_config(path), base_source=str(path))
  config, leaves, tokenizer = _read(path, dtype, on_device, mesh)
  tree = params.collect(leaves)
  if lora is not None:
    if on_device:
      shardings = None if mesh is None else sharding.param_shardings(config, mesh, lora=lora)
      adapter_tree = params.map_params(
          lambda row, leaf: sharding.put_global(leaf, shardings and shardings[row.module][row.name]), adapter_tree)
    tree = lora_lib.combine(tree, adapter_tree)
  return Checkpoint(config.replace(**config_overrides), tree, tokenizer, lora)


def convert(source: str | os.PathLike, output: str | os.PathLike, output_format: str = "llama_hk",
            dtype: str | None = None, adapter: str | os.PathLike | None = None, merge_lora: bool = False,
            gguf_type: str = "f32", max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
  """Any checkpoint to llama_hk (streamed: one leaf in memory at a time), to an HF directory or to one GGUF file
  ("gguf", its matrices in `gguf_type`), or the LoRA adapter of `adapter` (or of a LoRA training model_dir) alone
  as a PEFT directory ("peft").

  With `merge_lora`, the adapter is folded into the weights of the llama_hk, HF or GGUF output. `dtype` is a
  param_dtype (int8: quantized tensor by tensor as read, llama_hk output only); an int8 checkpoint is written to HF
  and GGUF from its dequantized weights. `max_shard_bytes` bounds each HF safetensors shard.
  """
  if output_format in ("hf", "gguf") and dtype == "int8":
    raise UserError("--weights=int8 is written as a llama_hk checkpoint only (--output_format=llama_hk)")
  if output_format == "gguf":
    gguf_export.check_type(gguf_type)
    if pathlib.Path(output).exists():
      raise UserError(f"{output}: already exists")
  else:
    check_output_dir(output)  # Before anything is read.
  adapter = adapter or peft.model_dir_adapter(pathlib.Path(source))
  if (merge_lora or output_format == "peft") and adapter is None:
    raise UserError(f"--input={source}: has no LoRA adapter (give --adapter=DIR, or a LoRA training model_dir)")
  if adapter is not None and not merge_lora and output_format != "peft":
    raise UserError(f"--input={source}: a LoRA adapter applies; add --merge_lora, or use --output_format=peft")
  if output_format == "peft":
    ckpt = load(source, dtype=dtype, on_device=False, adapter=adapter)
    _, adapter_tree = lora_lib.split(ckpt.params, ckpt.lora)
    peft.write(output, adapter_tree, ckpt.config, ckpt.lora, peft.base_name(adapter))
  elif merge_lora or output_format in ("hf", "gguf"):
    if output_format != "llama_hk" and dtype is None and load_config(source).param_dtype == "int8":
      dtype = "float32"  # HF and GGUF have no int8 layout of ours: its dequantized weights.
    ckpt = load(source, dtype=dtype, on_device=False, adapter=adapter)
    tree = lora_lib.merged(ckpt.params, ckpt.lora) if merge_lora else ckpt.params
    if output_format == "hf":
      export_hf(output, ckpt.config, tree, ckpt.tokenizer, max_shard_bytes=max_shard_bytes)
    elif output_format == "gguf":
      gguf_export.export(output, ckpt.config, tree, ckpt.tokenizer, gguf_type)
    else:
      save(output, ckpt.config, tree, ckpt.tokenizer)
  else:
    save(output, *_read(pathlib.Path(source), dtype))
