"""Reading and writing checkpoints: Hugging Face directories, GGUF files, and llama_hk's own format.

llama_hk's format is a self-contained directory:
  llama_hk.json          the LlamaConfig
  params/                an Orbax checkpoint of the parameter tree (restorable straight into a sharded layout)
  tokenizer files        tokenizer.model and/or tokenizer.json, tokenizer_config.json, ...
A training `model_dir` has the same config and tokenizer files with `checkpoints/<step>/params` inside; loading
it takes the latest step. Every reader streams tensor by tensor through `param_names.params_from_tensors`.
"""

import contextlib
import functools
import json
import os
import pathlib
import shutil
from typing import Any, NamedTuple

import numpy as np

from llama_hk import param_names
from llama_hk import safetensors_io
from llama_hk.config import LlamaConfig, load_hf_config, to_hf_config
from llama_hk.errors import UserError
from llama_hk.tokenizer import Tokenizer

CONFIG_FILE = "llama_hk.json"
PARAMS_DIR = "params"
TRAINING_CHECKPOINTS_DIR = "checkpoints"
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")
_MAX_SHARD_BYTES = 5 * 2**30
_CONCURRENT_GB = 0.25
_PARTIAL_SAVE_ITEM = "state"  # Where Orbax's partial (leaf by leaf) save puts the tree inside params/.


class Checkpoint(NamedTuple):
  config: LlamaConfig
  params: Any  # The Haiku parameter tree (NumPy or jax arrays).
  tokenizer: Tokenizer | None


def detect_kind(path: str | os.PathLike) -> str:
  """"gguf", "hf", "llama_hk" or "model_dir"; UserError naming the path when it is none of them."""
  path = pathlib.Path(path)
  if not path.exists():
    raise UserError(f"{path}: no such file or directory")
  if path.is_file():
    with open(path, "rb") as f:
      if f.read(4) == b"GGUF":
        return "gguf"
    raise UserError(f"{path}: not a checkpoint (a file, but not GGUF)")
  if (path / CONFIG_FILE).is_file():
    if (path / PARAMS_DIR).is_dir():
      return "llama_hk"
    if (path / TRAINING_CHECKPOINTS_DIR).is_dir():
      return "model_dir"
    raise UserError(f"{path}: has {CONFIG_FILE} but neither {PARAMS_DIR}/ nor {TRAINING_CHECKPOINTS_DIR}/")
  if (path / "config.json").is_file():
    return "hf"
  raise UserError(f"{path}: not a checkpoint (no config.json, {CONFIG_FILE} or GGUF file)")


def load_config(path: str | os.PathLike) -> LlamaConfig:
  """The config of any checkpoint kind, without reading weights."""
  path = pathlib.Path(path)
  kind = detect_kind(path)
  if kind == "hf":
    return load_hf_config(str(path / "config.json"))
  if kind == "gguf":
    return _gguf_config(_open_gguf(path), str(path))
  return LlamaConfig.from_json((path / CONFIG_FILE).read_text(), str(path / CONFIG_FILE))


def device_leaf_type(shardings=None):
  """Leaves assembled on devices one layer at a time, by in-place (donated) updates.

  With `shardings` (a tree like the params of NamedShardings), every device receives only its own shard of each
  layer: the model never sits whole on one device.
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  class DeviceLeaf:
    def __init__(self, module: str, name: str, shape: tuple[int, ...], dtype):
      self.sharding = None if shardings is None else shardings[module][name]
      self.stacked = module.startswith("decoder/")
      self.array = None
      if self.stacked:
        self.array = jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=self.sharding)()

    def _put(self, value: np.ndarray, sharding):
      if sharding is None:
        return jax.device_put(value)
      return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    def set(self, layer: int | None, value: np.ndarray) -> None:
      if layer is None:
        self.array = self._put(value, self.sharding)
        return
      layer_sharding = None if self.sharding is None else NamedSharding(
          self.sharding.mesh, PartitionSpec(*self.sharding.spec[1:]))
      self.array = _set_layer(self.sharding)(self.array, self._put(value, layer_sharding), layer)

    def finish(self):
      return self.array

  return DeviceLeaf


@functools.cache
def _set_layer(sharding):
  """buffer.at[layer].set(value), in place: the buffer is donated and the layer index is traced."""
  import jax
  return jax.jit(lambda buffer, value, layer: buffer.at[layer].set(value), donate_argnums=0,
                 out_shardings=sharding)


def load(path: str | os.PathLike, dtype: str | None = None, on_device: bool = True, mesh=None,
         **config_overrides) -> Checkpoint:
  """Loads any checkpoint kind (parameters in `dtype`, default the stored one).

  Parameters are assembled on the default device, or sharded over `mesh` by `sharding.param_shardings` (each
  device receiving only its shards), or with on_device=False as NumPy arrays (for export); layer by layer, so
  the peak memory is the parameters plus one tensor. `config_overrides` replace config fields (e.g.
  compute_dtype).
  """
  path = pathlib.Path(path)
  kind = detect_kind(path)
  shardings = None
  if mesh is not None:
    from llama_hk import sharding
    shardings = sharding.param_shardings(load_config(path), mesh)
  leaf_type = device_leaf_type(shardings) if on_device else param_names.HostLeaf
  if kind == "hf":
    config, params, tokenizer = _load_hf(path, dtype, leaf_type)
  elif kind == "gguf":
    config, params, tokenizer = _load_gguf(path, dtype, leaf_type)
  else:
    config, params, tokenizer = _load_own(path, kind, dtype, on_device, shardings)
  if dtype:
    config = config.replace(param_dtype=dtype)
  return Checkpoint(config.replace(**config_overrides), params, tokenizer)


def _tokenizer_from(path: pathlib.Path) -> Tokenizer | None:
  names = {p.name for p in path.iterdir()}
  return Tokenizer.from_dir(path) if {"tokenizer.model", "tokenizer.json"} & names else None


# Hugging Face directories.

def _hf_tensor_lookup(path: pathlib.Path):
  """name -> array for the directory's weights: single or sharded safetensors, or pytorch_model*.bin."""
  for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                             ("pytorch_model.bin.index.json", "pytorch_model.bin")):
    if (path / single).is_file():
      files = {None: path / single}
      weight_map = None
      break
    if (path / index_name).is_file():
      try:
        weight_map = json.loads((path / index_name).read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError):
        raise UserError(f"{path / index_name}: not a weight index (no weight_map)") from None
      files = {name: path / name for name in sorted(set(weight_map.values()))}
      break
  else:
    raise UserError(f"{path}: no weights (none of {', '.join(_HF_WEIGHT_FILES)})")
  opened = {key: _open_weight_file(file) for key, file in files.items()}

  def get(name: str) -> np.ndarray:
    shard = opened[None] if weight_map is None else opened[weight_map[name]]
    return shard[name]

  return get


class _SafetensorsLookup:
  def __init__(self, path):
    self.file = safetensors_io.SafetensorsFile(str(path))

  def __getitem__(self, name):
    if name not in self.file:
      raise KeyError(name)
    return self.file.get(name)


def _open_weight_file(path: pathlib.Path):
  if not path.is_file():
    raise UserError(f"{path}: missing weight file")
  if path.suffix == ".safetensors":
    return _SafetensorsLookup(path)
  return _torch_state_dict(path)


def _torch_state_dict(path: pathlib.Path) -> dict[str, np.ndarray]:
  """A pytorch_model*.bin state dict, unpickled safely (weights_only) and memory-mapped."""
  try:
    import torch
  except ImportError:
    raise UserError(f"{path}: reading pytorch_model*.bin needs torch (pip install torch), or convert to safetensors") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except Exception as e:  # torch raises many types for corrupt or unsafe pickles.
    raise UserError(f"{path}: unreadable PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None

  class Lookup(dict):
    def __getitem__(self, name):
      tensor = state[name]
      if tensor.dtype == torch.bfloat16:
        import ml_dtypes
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
      return tensor.numpy()

  return Lookup()


def _load_hf(path: pathlib.Path, dtype: str | None, leaf_type):
  config, leaves, tokenizer = _stream_hf(path, dtype, leaf_type)
  return config, _collect(leaves), tokenizer


def _stream_hf(path: pathlib.Path, dtype: str | None, leaf_type):
  config = load_hf_config(str(path / "config.json"))
  leaves = param_names.iter_params(_hf_tensor_lookup(path), config, "hf", dtype, str(path), leaf_type)
  return config, leaves, _tokenizer_from(path)


def _collect(leaves) -> dict:
  params: dict[str, dict] = {}
  for module, name, leaf in leaves:
    params.setdefault(module, {})[name] = leaf
  return params


# GGUF files.

def _open_gguf(path: pathlib.Path):
  import gguf
  try:
    return gguf.GGUFReader(str(path))
  except Exception as e:  # The reader raises ValueError/struct errors/IndexError on corrupt files.
    raise UserError(f"{path}: unreadable GGUF file ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def _gguf_fields(reader) -> dict[str, Any]:
  return {name: field.contents() for name, field in reader.fields.items()
          if name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                          "tokenizer.ggml.scores")}


def _gguf_config(reader, source: str) -> LlamaConfig:
  meta = _gguf_fields(reader)
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise UserError(f"{source}: GGUF architecture is {arch!r}, only 'llama' is supported")
  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise UserError(f"{source}: per-frequency RoPE factors (rope_freqs.weight) are not supported")
  try:
    d_model = int(meta["llama.embedding_length"])
    num_heads = int(meta["llama.attention.head_count"])
    vocab = meta.get("llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    scaling = meta.get("llama.rope.scaling.type", "none")
    return LlamaConfig(
        vocab_size=int(vocab),
        d_model=d_model,
        num_layers=int(meta["llama.block_count"]),
        num_heads=num_heads,
        num_kv_heads=int(meta.get("llama.attention.head_count_kv", num_heads)),
        head_dim=int(meta.get("llama.attention.key_length", d_model // num_heads)),
        d_ff=int(meta["llama.feed_forward_length"]),
        norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rope_scaling="none" if scaling in ("none", None) else scaling,
        rope_scaling_factor=float(meta.get("llama.rope.scaling.factor", 1.0)),
        tie_embeddings="output.weight" not in names,
        max_seq_len=int(meta.get("llama.context_length", 2048)),
    )
  except KeyError as e:
    raise UserError(f"{source}: GGUF metadata lacks {e}") from None


def _gguf_tensor_lookup(reader, source: str):
  import gguf
  tensors = {t.name: t for t in reader.tensors}

  def get(name: str) -> np.ndarray:
    t = tensors[name]
    try:
      if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(t.data).reshape(tuple(int(n) for n in reversed(t.shape)))
      if t.tensor_type.name.startswith("I"):
        raise NotImplementedError
      return gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
      raise UserError(f"{source}: tensor {name} has unsupported GGUF type {t.tensor_type.name}") from None

  return get


def _load_gguf(path: pathlib.Path, dtype: str | None, leaf_type):
  config, leaves, tokenizer = _stream_gguf(path, dtype, leaf_type)
  return config, _collect(leaves), tokenizer


def _stream_gguf(path: pathlib.Path, dtype: str | None, leaf_type):
  reader = _open_gguf(path)
  config = _gguf_config(reader, str(path))
  tokenizer = gguf_tokenizer(reader, str(path))
  leaves = param_names.iter_params(_gguf_tensor_lookup(reader, str(path)), config, "gguf", dtype or "float32",
                                   str(path), leaf_type)
  return config.replace(param_dtype=dtype or "float32"), leaves, tokenizer


def gguf_tokenizer(reader, source: str) -> Tokenizer:
  """Rebuilds a byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json) from GGUF metadata.

  Built as transformers' GGUF loader builds it (GPT-2 byte-level BPE, control tokens special), so that both
  give the same ids for the same file.
  """
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors

  meta = _gguf_fields(reader)
  kind = meta.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise UserError(f"{source}: GGUF tokenizer type {kind!r} is not supported (only byte-level BPE, 'gpt2')")
  tokens = reader.fields["tokenizer.ggml.tokens"].contents()
  merges = reader.fields["tokenizer.ggml.merges"].contents() if "tokenizer.ggml.merges" in reader.fields else []
  types = (reader.fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in reader.fields
           else [1] * len(tokens))
  vocab = {token: i for i, token in enumerate(tokens)}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                                        continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  alphabet = set(pre_tokenizers.ByteLevel.alphabet())
  control = [t for t, kind in zip(tokens, types) if kind == 3 and set(t) <= alphabet]
  tok.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True) for t in control])
  user_defined = [t for t, kind in zip(tokens, types) if kind == 4]
  tok.add_tokens([tokenizers.AddedToken(t, normalized=False, special=False) for t in user_defined])

  def token(key):
    i = meta.get(f"tokenizer.ggml.{key}")
    return tokens[int(i)] if i is not None else None

  tokenizer_config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
      "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id"),
      "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
      "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
      "clean_up_tokenization_spaces": False,
  }
  if "tokenizer.chat_template" in meta:
    tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
  files = {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": json.dumps(tokenizer_config).encode()}
  return Tokenizer(files, source=source)


# llama_hk's own format.

def latest_step(model_dir: pathlib.Path) -> int | None:
  steps = [int(p.name) for p in (model_dir / TRAINING_CHECKPOINTS_DIR).iterdir() if p.name.isdigit()
           and (p / PARAMS_DIR).is_dir()]
  return max(steps, default=None)


def _load_own(path: pathlib.Path, kind: str, dtype: str | None, on_device: bool, shardings):
  """Restores the Orbax params; with shardings, straight into the sharded layout (Orbax reads only each shard)."""
  import jax
  import orbax.checkpoint as ocp
  config = LlamaConfig.from_json((path / CONFIG_FILE).read_text(), str(path / CONFIG_FILE))
  params_dir = path / PARAMS_DIR / _PARTIAL_SAVE_ITEM
  if kind == "model_dir":
    step = latest_step(path)
    if step is None:
      raise UserError(f"{path}: training directory with no finished checkpoint")
    params_dir = path / TRAINING_CHECKPOINTS_DIR / str(step) / PARAMS_DIR
  target = None
  if shardings is not None:
    target = {p.module: {} for p in param_names.table(config)}
    for p in param_names.table(config):
      shape = ((config.num_layers,) if p.stacked else ()) + p.our_shape(config)
      target[p.module][p.name] = jax.ShapeDtypeStruct(shape, np.dtype(dtype or config.param_dtype),
                                                      sharding=shardings[p.module][p.name])
  try:
    handler = ocp.StandardCheckpointHandler(restore_concurrent_gb=_concurrent_gb(config))
    params = ocp.Checkpointer(handler).restore(params_dir.resolve(), args=ocp.args.StandardRestore(target))
  except Exception as e:  # Orbax raises several types for missing or corrupt checkpoints.
    message = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    raise UserError(f"{params_dir}: unreadable Orbax checkpoint ({type(e).__name__}: {message})") from None
  _check_tree(params, config, str(params_dir))
  for leaves in params.values():
    for name, value in leaves.items():
      if not on_device:
        leaves[name] = np.asarray(value, dtype=dtype or value.dtype)
      elif dtype and value.dtype != np.dtype(dtype):
        leaves[name] = value.astype(dtype)
  return config, params, _tokenizer_from(path)


def _check_tree(params, config: LlamaConfig, source: str) -> None:
  for p in param_names.table(config):
    leaf = params.get(p.module, {}).get(p.name)
    expected = ((config.num_layers,) if p.stacked else ()) + p.our_shape(config)
    if leaf is None:
      raise UserError(f"{source}: parameter {p.module}/{p.name} is missing")
    if tuple(leaf.shape) != expected:
      raise UserError(f"{source}: parameter {p.module}/{p.name} has shape {tuple(leaf.shape)}, the config "
                      f"implies {expected}")


def _concurrent_gb(config: LlamaConfig) -> float:
  """Orbax's in-flight budget: small, so it does not copy every array at once, but fitting the largest one."""
  largest = max(np.prod(p.our_shape(config)) * (config.num_layers if p.stacked else 1)
                for p in param_names.table(config))
  return max(_CONCURRENT_GB, float(largest) * 4 / 1e9 * 1.01)  # 4 bytes: float32, the widest dtype stored.


def check_output_dir(path: str | os.PathLike) -> None:
  """Fails early (before any reading) when `path` would not be a fresh output directory."""
  path = pathlib.Path(path)
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise UserError(f"{path}: already exists and is not an empty directory")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
  """Yields a temporary sibling of `path` and renames it to `path` only if the block succeeds."""
  path = pathlib.Path(path)
  check_output_dir(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    yield tmp
    if path.exists():
      path.rmdir()
    tmp.rename(path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def save(path: str | os.PathLike, config: LlamaConfig, params, tokenizer: Tokenizer | None) -> None:
  """Writes a llama_hk checkpoint directory, atomically.

  `params` is the parameter tree or an iterable of (module, name, leaf): Orbax's partial save writes one leaf
  at a time, so a streamed conversion never holds more than one leaf.
  """
  from orbax.checkpoint.experimental.v1 import partial
  leaves = ((m, n, v) for m, tree in params.items() for n, v in tree.items()) if isinstance(params, dict) else params
  with atomic_directory(path) as tmp:
    (tmp / CONFIG_FILE).write_text(config.to_json())
    if tokenizer is not None:
      tokenizer.save(tmp)
    target = (tmp / PARAMS_DIR).resolve()
    for module, name, leaf in leaves:
      partial.save(target, {module: {name: leaf}})
      del leaf
    partial.finalize(target)


def convert(source: str | os.PathLike, output: str | os.PathLike, output_format: str = "llama_hk",
            dtype: str | None = None) -> None:
  """Any checkpoint kind to llama_hk or HF, streaming tensor by tensor where the source allows."""
  check_output_dir(output)
  source = pathlib.Path(source)
  kind = detect_kind(source)
  if output_format == "hf":
    ckpt = load(source, dtype=dtype, on_device=False)
    export_hf(output, ckpt.config, ckpt.params, ckpt.tokenizer)
  elif kind in ("hf", "gguf"):
    stream = _stream_hf if kind == "hf" else _stream_gguf
    config, leaves, tokenizer = stream(source, dtype, param_names.HostLeaf)
    save(output, config.replace(param_dtype=dtype) if dtype else config, leaves, tokenizer)
  else:
    ckpt = load(source, dtype=dtype)
    save(output, ckpt.config, ckpt.params, ckpt.tokenizer)


def export_hf(path: str | os.PathLike, config: LlamaConfig, params, tokenizer: Tokenizer | None,
              dtype: str | None = None) -> None:
  """Writes a Hugging Face directory (config.json, safetensors, tokenizer files) loadable by transformers."""
  dtype = np.dtype(dtype or config.param_dtype)
  tensors = [(name, shape, dtype, make) for name, shape, make in param_names.hf_tensors(params, config)]
  shards, current, size = [], [], 0
  for entry in tensors:
    nbytes = int(np.prod(entry[1])) * dtype.itemsize
    if current and size + nbytes > _MAX_SHARD_BYTES:
      shards.append(current)
      current, size = [], 0
    current.append(entry)
    size += nbytes
  shards.append(current)
  with atomic_directory(path) as tmp:
    hf_config = to_hf_config(config, dtype=dtype.name)
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
