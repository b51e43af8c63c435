"""llama_hk's own checkpoint directory, and a training `model_dir` read as one.

A llama_hk checkpoint is self-contained:
  llama_hk.json          the LlamaConfig
  params/                an Orbax checkpoint of the parameter tree (restorable straight into a sharded layout)
  tokenizer files        tokenizer.model and/or tokenizer.json, tokenizer_config.json, ...
A training `model_dir` has the same config and tokenizer files with `checkpoints/<step>/params` inside; reading it
takes the latest finished step.
"""

import os
import pathlib
from typing import Iterable, Iterator

import jax
import numpy as np

from llama_hk import io_utils
from llama_hk import params
from llama_hk import sharding
from llama_hk.checkpoints.leaves import Placement
from llama_hk.config import LlamaConfig
from llama_hk.errors import UserError, first_line
from llama_hk.tokenizers.tokenizer import Tokenizer

CONFIG_FILE = "llama_hk.json"
PARAMS_DIR = "params"
TRAINING_CHECKPOINTS_DIR = "checkpoints"
_PARTIAL_SAVE_ITEM = "state"  # Where Orbax's partial (leaf by leaf) save puts the tree inside params/.
_CONCURRENT_GB = 0.25


class _OrbaxFormat:
  """What both directory kinds share: the config file, the tokenizer files and an Orbax parameter tree, which
  each kind finds with its `params_dir(path)`."""
  name: str

  def config(self, path: pathlib.Path) -> LlamaConfig:
    return LlamaConfig.from_json((path / CONFIG_FILE).read_text(), str(path / CONFIG_FILE))

  def tokenizer(self, path: pathlib.Path) -> Tokenizer | None:
    return Tokenizer.in_dir(path)

  def leaves(self, path: pathlib.Path, config: LlamaConfig, dtype: str | None,
             placement: Placement) -> Iterator[tuple[str, str, object]]:
    """Restores the Orbax tree; with shardings, straight into the sharded layout (Orbax reads only each shard).
    dtype None keeps the stored one; int8 from float weights (or float from int8) is converted on the host."""
    import orbax.checkpoint as ocp
    params_dir = self.params_dir(path)
    want = config.replace(param_dtype=dtype or config.param_dtype)
    requantize = params.is_int8(config) != params.is_int8(want)
    target = None
    if placement.shardings is not None and not requantize:
      target = params.map_params(
          lambda p, s: jax.ShapeDtypeStruct(p.full_shape(want), params.leaf_dtype(p, want), sharding=s),
          placement.shardings)
    try:
      handler = ocp.StandardCheckpointHandler(restore_concurrent_gb=_concurrent_gb(config))
      tree = ocp.Checkpointer(handler).restore(params_dir.resolve(), args=ocp.args.StandardRestore(target))
    except Exception as e:  # Orbax raises several types for missing or corrupt checkpoints.
      raise UserError(f"{params_dir}: unreadable Orbax checkpoint ({type(e).__name__}: {first_line(e)})") from None
    _check_tree(tree, config, str(params_dir))
    for p in params.table(want):
      if requantize and params.is_scale(p):
        continue  # Made, or consumed, with its weight.
      value = tree[p.module].pop(p.name)  # Dropped from the restored tree as it is yielded: one copy at a time.
      lead = 1 if p.stacked else 0
      if requantize and p.quantizable and params.is_int8(want):
        value, scale = params.quantize(np.asarray(value), p, lead)
        scale_row = params.SCALES[(p.module, p.name)]
        yield p.module, p.name, _place(value, placement, target, p)
        yield scale_row.module, scale_row.name, _place(scale, placement, target, scale_row)
        continue
      if requantize and p.quantizable:
        value = params.dequantize(np.asarray(value), np.asarray(tree[p.module].pop(f"{p.name}_scale")), p, lead)
      if value.dtype != params.leaf_dtype(p, want):
        value = value.astype(params.leaf_dtype(p, want))
      yield p.module, p.name, _place(value, placement, target, p)


def _place(value, placement: Placement, target, row: params.Param):
  """A restored (and converted) leaf where `placement` wants it; a sharded restore (`target`) is there already."""
  if not placement.on_device:
    return np.asarray(value)
  if target is None:  # Restored as stored (NumPy for a converted checkpoint): to the default device or its shards.
    return sharding.put_global(value, placement.shardings and placement.shardings[row.module][row.name])
  return value


class OwnDir(_OrbaxFormat):
  """llama_hk's checkpoint directory: llama_hk.json and params/."""
  name = "llama_hk"

  def detect(self, path: pathlib.Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()

  def params_dir(self, path: pathlib.Path) -> pathlib.Path:
    return path / PARAMS_DIR / _PARTIAL_SAVE_ITEM


class TrainingDir(_OrbaxFormat):
  """A training model_dir: llama_hk.json and checkpoints/<step>/params; the latest finished step is read."""
  name = "model_dir"

  def detect(self, path: pathlib.Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / TRAINING_CHECKPOINTS_DIR).is_dir()

  def params_dir(self, path: pathlib.Path) -> pathlib.Path:
    step = latest_step(path)
    if step is None:
      raise UserError(f"{path}: training directory with no finished checkpoint")
    return path / TRAINING_CHECKPOINTS_DIR / str(step) / PARAMS_DIR


def latest_step(model_dir: str | os.PathLike) -> int | None:
  """The latest step of a training model_dir whose parameters were written in full, or None."""
  steps = [int(p.name) for p in (pathlib.Path(model_dir) / TRAINING_CHECKPOINTS_DIR).iterdir()
           if p.name.isdigit() and (p / PARAMS_DIR).is_dir()]
  return max(steps, default=None)


def _check_tree(tree, config: LlamaConfig, source: str) -> None:
  for p in params.table(config):
    leaf = tree.get(p.module, {}).get(p.name)
    expected = p.full_shape(config)
    if leaf is None:
      raise UserError(f"{source}: parameter {p.module}/{p.name} is missing")
    if tuple(leaf.shape) != expected:
      raise UserError(f"{source}: parameter {p.module}/{p.name} has shape {tuple(leaf.shape)}, the config "
                      f"implies {expected}")


def _concurrent_gb(config: LlamaConfig) -> float:
  """Orbax's in-flight budget: small, so it does not copy every array at once, but fitting the largest one."""
  largest = max(np.prod(p.full_shape(config)) for p in params.table(config))
  return max(_CONCURRENT_GB, float(largest) * 4 / 1e9 * 1.01)  # 4 bytes: float32, the widest dtype stored.


def save(path: str | os.PathLike, config: LlamaConfig, tree, tokenizer: Tokenizer | None) -> None:
  """Writes a llama_hk checkpoint directory, atomically.

  `tree` is the parameter tree or an iterable of (module, name, leaf): Orbax's partial save writes one leaf at a
  time, so a streamed conversion never holds more than one leaf.
  """
  from orbax.checkpoint.experimental.v1 import partial
  leaves: Iterable = ((m, n, v) for m, t in tree.items() for n, v in t.items()) if isinstance(tree, dict) else tree
  with io_utils.atomic_dir(path) as tmp:
    (tmp / CONFIG_FILE).write_text(config.to_json())
    if tokenizer is not None:
      tokenizer.save(tmp)
    target = (tmp / PARAMS_DIR).resolve()
    for module, name, leaf in leaves:
      partial.save(target, {module: {name: leaf}})
      del leaf
    partial.finalize(target)
