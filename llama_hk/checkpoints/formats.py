"""The checkpoint formats behind one interface, and which of them a path holds.

A new format (an adapter directory, a quantized variant) is one class with these four methods, added to FORMATS.
"""

import os
import pathlib
from typing import Any, Iterator, Protocol

from llama_hk.checkpoints import gguf, hf, meta, native, peft
from llama_hk.checkpoints.leaves import Placement
from llama_hk.config import LlamaConfig
from llama_hk.errors import UserError
from llama_hk.tokenizers.tokenizer import Tokenizer


class Format(Protocol):
  name: str  # What detect_kind answers: "gguf", "llama_hk", "model_dir", "hf".

  def detect(self, path: pathlib.Path) -> bool:
    """Whether `path` (which exists) is in this format."""

  def config(self, path: pathlib.Path) -> LlamaConfig:
    """The model config, without reading weights; param_dtype is the dtype the parameters load in by default."""

  def tokenizer(self, path: pathlib.Path) -> Tokenizer | None:
    """The tokenizer the checkpoint carries, if any."""

  def leaves(self, path: pathlib.Path, config: LlamaConfig, dtype: str | None,
             placement: Placement) -> Iterator[tuple[str, str, Any]]:
    """(module, name, leaf) of the parameter tree in `dtype` (None: as stored), one leaf at a time where the
    format allows (HF and GGUF read tensor by tensor, via params.iter_params on a name -> array lookup)."""


class LoraTrainingDir(native.TrainingDir):
  """A LoRA run's model_dir: its config and tokenizer, and the weights of the frozen base its latest adapter names
  (`checkpoints.load` applies that adapter; peft.model_dir_adapter finds it)."""
  name = "model_dir"

  def detect(self, path: pathlib.Path) -> bool:
    return super().detect(path) and peft.model_dir_adapter(path) is not None

  def leaves(self, path: pathlib.Path, config: LlamaConfig, dtype: str | None,
             placement: Placement) -> Iterator[tuple[str, str, Any]]:
    base = peft.base_name(peft.model_dir_adapter(path))
    if not base or not pathlib.Path(base).exists():
      raise UserError(f"{path}: the base of its LoRA adapter, {base!r}, is not there")
    return detect(base).leaves(pathlib.Path(base), config, dtype, placement)


FORMATS: tuple[Format, ...] = (gguf.GgufFile(), native.OwnDir(), LoraTrainingDir(), native.TrainingDir(), hf.HfDir(),
                               meta.MetaDir())


def detect(path: str | os.PathLike) -> Format:
  """The format of `path`; UserError naming the path when it is none of them."""
  path = pathlib.Path(path)
  if not path.exists():
    raise UserError(f"{path}: no such file or directory")
  for candidate in FORMATS:
    if candidate.detect(path):
      return candidate
  if path.is_file():
    raise UserError(f"{path}: not a checkpoint (a file, but not GGUF)")
  if (path / native.CONFIG_FILE).is_file():
    raise UserError(f"{path}: has {native.CONFIG_FILE} but neither {native.PARAMS_DIR}/ nor "
                    f"{native.TRAINING_CHECKPOINTS_DIR}/")
  raise UserError(f"{path}: not a checkpoint (no config.json, {native.CONFIG_FILE}, {meta.SHARDS} or GGUF file)")
