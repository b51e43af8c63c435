"""PEFT LoRA adapter directories: `adapter_config.json` and `adapter_model.safetensors` in PEFT's names and
layouts, which `peft.PeftModel.from_pretrained` loads and which `peft`'s `save_pretrained` writes.

Tensor names are the parameter table's LoRA rows (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`,
(r, in); `...lora_B.weight`, (out, r)); the adapter tree is ours (ops.lora).
"""

import json
import os
import pathlib

import numpy as np

from llama_hk import io_utils
from llama_hk.checkpoints import safetensors_io
from llama_hk.config import LlamaConfig
from llama_hk.errors import UserError
from llama_hk.ops.lora import DEFAULT_TARGETS, LoraConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


ADAPTERS_DIR = "adapters"  # Of a LoRA training model_dir: adapters/<step>/, one PEFT directory per checkpoint.


def is_adapter_dir(path: str | os.PathLike) -> bool:
  return (pathlib.Path(path) / CONFIG_FILE).is_file()


def model_dir_adapter(path: pathlib.Path) -> pathlib.Path | None:
  """The latest adapter of a LoRA training model_dir (adapters/<step>/), or None for any other path."""
  steps = [int(p.name) for p in (path / ADAPTERS_DIR).glob("*") if p.name.isdigit() and is_adapter_dir(p)]
  return path / ADAPTERS_DIR / str(max(steps)) if steps else None


def base_name(path: str | os.PathLike) -> str:
  """The adapter's `base_model_name_or_path` ("" when unset)."""
  return json.loads((pathlib.Path(path) / CONFIG_FILE).read_text()).get("base_model_name_or_path") or ""


def read_config(path: str | os.PathLike) -> LoraConfig:
  """The LoraConfig of a PEFT adapter directory; UserError naming the file for what this library cannot apply."""
  file = pathlib.Path(path) / CONFIG_FILE
  try:
    fields = json.loads(file.read_text())
  except OSError as e:
    raise UserError(f"{path}: not a PEFT adapter directory ({CONFIG_FILE}: {e.strerror})") from None
  except json.JSONDecodeError as e:
    raise UserError(f"{file}: invalid JSON ({e.msg} at line {e.lineno})") from None
  if fields.get("peft_type") != "LORA":
    raise UserError(f"{file}: peft_type is {fields.get('peft_type')!r}, only 'LORA' is supported")
  for name, plain in (("use_rslora", False), ("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
    if fields.get(name, plain) != plain:
      raise UserError(f"{file}: {name}={fields[name]!r} is not supported (only {plain!r})")
  targets = fields.get("target_modules")
  if not isinstance(targets, list):
    raise UserError(f"{file}: target_modules must be a list of module names, got {targets!r}")
  order = {name: k for k, name in enumerate(DEFAULT_TARGETS)}
  try:
    return LoraConfig(rank=int(fields["r"]), alpha=float(fields["lora_alpha"]),
                      dropout=float(fields.get("lora_dropout", 0.0)),
                      targets=tuple(sorted(targets, key=lambda t: order.get(t, len(order)))))
  except KeyError as e:
    raise UserError(f"{file}: missing field {e}") from None
  except UserError as e:
    raise UserError(f"{file}: {e}") from None


def adapter_from_tensors(get, config: LlamaConfig, lora: LoraConfig, source: str) -> dict:
  """Our adapter tree (float32 NumPy) from a PEFT name -> (r, in) / (out, r) array lookup; a missing tensor or a
  shape that disagrees with the base's config raises UserError naming `source`."""
  adapter: dict[str, dict] = {}
  for row in lora.adapter_rows():
    leaf = np.empty(row.full_shape(config, lora.rank), np.float32)
    for i in range(config.num_layers):
      name = row.hf.format(i=i)
      try:
        array = get(name)
      except KeyError:
        raise UserError(f"{source}: tensor {name} is missing") from None
      if tuple(array.shape) != row.hf_shape(config, lora.rank):
        raise UserError(f"{source}: tensor {name} has shape {tuple(array.shape)}, the base model implies "
                        f"{row.hf_shape(config, lora.rank)}")
      leaf[i] = row.to_ours(np.asarray(array, np.float32), config, lora.rank)
    adapter.setdefault(row.module, {})[row.name] = leaf
  return adapter


def read(path: str | os.PathLike, config: LlamaConfig, base_source: str = "the base") -> tuple[LoraConfig, dict]:
  """(LoraConfig, adapter tree) of a PEFT adapter directory for a base of `config` (`base_source` names it in
  the error when the adapter was made for another model)."""
  path = pathlib.Path(path)
  lora = read_config(path)
  file = safetensors_io.SafetensorsFile(str(path / WEIGHTS_FILE)) if (path / WEIGHTS_FILE).is_file() else None
  if file is None:
    raise UserError(f"{path}: no {WEIGHTS_FILE}")
  names = set(file.keys())
  stacked = max((int(n.split(".")[4]) for n in names if n.startswith("base_model.model.model.layers.")), default=-1)
  if stacked + 1 != config.num_layers:
    raise UserError(f"{path}: an adapter for a base of {stacked + 1} layers, {base_source} has {config.num_layers}")

  def get(name):
    if name not in names:
      raise KeyError(name)
    return file.get(name)

  try:
    return lora, adapter_from_tensors(get, config, lora, str(path / WEIGHTS_FILE))
  except UserError as e:
    raise UserError(f"{e} ({base_source} is the base)") from None


def adapter_config(lora: LoraConfig, base_name: str) -> dict:
  """PEFT's adapter_config.json fields for `lora`."""
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
          "lora_dropout": lora.dropout, "target_modules": list(lora.targets), "base_model_name_or_path": base_name,
          "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
          "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}


def tensors(adapter, config: LlamaConfig, lora: LoraConfig) -> list:
  """(PEFT name, shape, dtype, make) of every adapter tensor, each made (float32, PEFT layout) only when called."""
  out = []
  for row in lora.adapter_rows():
    leaf = adapter[row.module][row.name]
    for i in range(config.num_layers):
      out.append((row.hf.format(i=i), row.hf_shape(config, lora.rank), np.dtype(np.float32),
                  lambda row=row, part=leaf[i]: row.to_hf(np.asarray(part, np.float32), config, lora.rank)))
  return out


def write(path: str | os.PathLike, adapter, config: LlamaConfig, lora: LoraConfig, base_name: str) -> None:
  """Writes the adapter as a PEFT directory at `path`, atomically."""
  with io_utils.atomic_dir(path) as tmp:
    (tmp / CONFIG_FILE).write_text(json.dumps(adapter_config(lora, base_name), indent=2) + "\n")
    safetensors_io.write(str(tmp / WEIGHTS_FILE), tensors(adapter, config, lora))
