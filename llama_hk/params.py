"""The parameter table: one row per parameter drives conversion, sharding, weight decay and weight layouts.

Each row names a parameter three ways (ours, Hugging Face's, GGUF's), gives its per-layer shape in glossary
letters, its logical sharding axes (derived from the letters unless given), whether weight decay applies, and
says how its layout relates to Hugging Face's:
  "copy":   the same array (norm scales, the embedding table).
  "linear": a torch `nn.Linear` weight (out, in); ours is its transpose with the in and out axes unflattened,
            e.g. q_proj (D, N, K) <-> (N*K, D).
  "flat":   a torch `nn.Linear` bias (out,); ours has the out axes unflattened, e.g. q_bias (N, K) <-> (N*K,).
A row whose `when` names a config property (e.g. Qwen2's biases, "qkv_bias") is present only where it is true.
GGUF stores tensors in Hugging Face's layout, except that llama.cpp permutes the rows of Q and K from the
rotate-half RoPE layout to the adjacent-pair one; `gguf_heads` names the head count that permutation used.

int8 weights (a config's param_dtype "int8"): every matrix weight and the embedding table is stored as int8 with a
float32 scale per output channel, the row `{name}_scale` beside it (its shape the weight's output letters, the
embedding's V, so it shards as the weight's output axis does); w = q * scale, q = round(w / scale) with
scale = max |w| over the input axes / 127. Every other leaf is float32.
"""

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import jax.numpy as jnp
import numpy as np

from llama_hk.config import LlamaConfig
from llama_hk.errors import UserError

_DIMS = {
    "V": "vocab_size", "D": "d_model", "N": "num_heads", "G": "num_kv_heads", "K": "head_dim", "F": "d_ff",
}
# Logical axis of each shape letter (sharding.DEFAULT_RULES maps these to mesh axes); R is a LoRA adapter's rank.
_AXES = {"V": "vocab", "D": "embed", "N": "heads", "G": "kv_heads", "K": "head_dim", "F": "mlp", "R": "lora_rank"}


@dataclasses.dataclass(frozen=True)
class Param:
  module: str  # Haiku module path.
  name: str  # Haiku parameter name.
  hf: str  # Hugging Face name; "{i}" stands for the layer.
  gguf: str  # GGUF name; "{i}" stands for the layer.
  shape: str  # Our per-layer shape in glossary letters.
  layout: str = "copy"  # "copy", "linear" or "flat".
  n_in: int = 1  # For "linear": how many leading axes of our shape are the input.
  gguf_heads: str | None = None  # For Q and K: the config field llama.cpp's permutation used.
  axes: tuple[str, ...] | None = None  # Logical axes of the per-layer shape; None: from the shape letters.
  decay: bool = True  # Whether AdamW's weight decay applies.
  when: str | None = None  # A LlamaConfig property: the row is present only where it is true; None: always.

  @property
  def stacked(self) -> bool:
    return "{i}" in self.hf

  @property
  def quantizable(self) -> bool:
    """Stored as int8 with a `{name}_scale` row under int8 weights: the matrix weights and the embedding table."""
    return self.is_matmul or (self.module, self.name) == ("embedding", "embeddings")

  @property
  def scale_letters(self) -> str:
    """The per-layer shape of the int8 scale: the output letters (the embedding's rows, V, its head's output)."""
    return self.shape[self.n_in:] if self.layout == "linear" else self.shape[:1]

  @property
  def is_matmul(self) -> bool:
    """A matrix weight of the model: its first `n_in` axes meet the activations in a product (ops.dense); a LoRA
    factor (its shape has R) is not one, and keeps its stored layout in every `WeightLayout`."""
    return self.layout == "linear" and "R" not in self.shape

  def logical_axes(self) -> tuple[str, ...]:
    """Logical axes of the full leaf, the layer axis of stacked leaves first."""
    per_layer = self.axes or tuple(_AXES[letter] for letter in self.shape)
    return (("layers",) if self.stacked else ()) + per_layer

  def full_shape(self, config: LlamaConfig, rank: int | None = None) -> tuple[int, ...]:
    """The leaf's shape: (L, *per-layer shape) for stacked leaves; `rank` is the size of a LoRA row's R."""
    return ((config.num_layers,) if self.stacked else ()) + self.our_shape(config, rank)

  def our_shape(self, config: LlamaConfig, rank: int | None = None) -> tuple[int, ...]:
    return tuple(rank if letter == "R" else getattr(config, _DIMS[letter]) for letter in self.shape)

  def hf_shape(self, config: LlamaConfig, rank: int | None = None) -> tuple[int, ...]:
    shape = self.our_shape(config, rank)
    if self.layout == "linear":
      return (math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in]))
    if self.layout == "flat":
      return (math.prod(shape),)
    return shape

  def to_ours(self, hf_array: np.ndarray, config: LlamaConfig, rank: int | None = None) -> np.ndarray:
    if self.layout == "linear":
      return hf_array.T.reshape(self.our_shape(config, rank))
    return hf_array.reshape(self.our_shape(config, rank))

  def to_hf(self, array: np.ndarray, config: LlamaConfig, rank: int | None = None) -> np.ndarray:
    if self.layout == "linear":
      rows, cols = self.hf_shape(config, rank)
      return np.ascontiguousarray(array.reshape(cols, rows).T)
    return np.asarray(array).reshape(self.hf_shape(config, rank))


TABLE = (
    Param("embedding", "embeddings", "model.embed_tokens.weight", "token_embd.weight", "VD", decay=False),
    Param("decoder/input_norm", "scale", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", "D",
          axes=("norm",), decay=False),
    Param("decoder/attention", "q_proj", "model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight",
          "DNK", "linear", 1, gguf_heads="num_heads"),
    Param("decoder/attention", "k_proj", "model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight",
          "DGK", "linear", 1, gguf_heads="num_kv_heads"),
    Param("decoder/attention", "v_proj", "model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight",
          "DGK", "linear", 1),
    Param("decoder/attention", "q_bias", "model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias", "NK",
          "flat", decay=False, when="qkv_bias"),
    Param("decoder/attention", "k_bias", "model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias", "GK",
          "flat", decay=False, when="qkv_bias"),
    Param("decoder/attention", "v_bias", "model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias", "GK",
          "flat", decay=False, when="qkv_bias"),
    Param("decoder/attention", "out_proj", "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight",
          "NKD", "linear", 2),
    Param("decoder/post_attn_norm", "scale", "model.layers.{i}.post_attention_layernorm.weight",
          "blk.{i}.ffn_norm.weight", "D", axes=("norm",), decay=False),
    Param("decoder/mlp", "gate_proj", "model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight",
          "DF", "linear", 1),
    Param("decoder/mlp", "up_proj", "model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight", "DF", "linear", 1),
    Param("decoder/mlp", "down_proj", "model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight",
          "FD", "linear", 1),
    Param("norm", "scale", "model.norm.weight", "output_norm.weight", "D", axes=("norm",), decay=False),
    Param("lm_head", "w", "lm_head.weight", "output.weight", "DV", "linear", 1),
)



def _lora_rows(base: Param) -> tuple[Param, Param]:
  """A LoRA adapter's two factors of the decoder matrix `base`, named as PEFT names them: A (in axes, R), whose
  PEFT weight is (R, in), then B (R, out axes), PEFT's (out, R); the product x A B has the base's output axes."""
  peft = "base_model.model." + base.hf.removesuffix(".weight")
  in_axes, out_axes = base.logical_axes()[1:1 + base.n_in], base.logical_axes()[1 + base.n_in:]
  return (Param(base.module, f"{base.name}_lora_a", f"{peft}.lora_A.weight", "", base.shape[:base.n_in] + "R",
                "linear", base.n_in, axes=(*in_axes, "lora_rank")),
          Param(base.module, f"{base.name}_lora_b", f"{peft}.lora_B.weight", "", "R" + base.shape[base.n_in:],
                "linear", 1, axes=("lora_rank", *out_axes)))


def _scale_row(base: Param) -> Param:
  """The float32 per-output-channel scale of the int8 weight `base` (named as compressed-tensors names it in HF)."""
  return Param(base.module, f"{base.name}_scale", base.hf.removesuffix("weight") + "weight_scale", "",
               base.scale_letters, decay=False)


SCALES = {(p.module, p.name): _scale_row(p) for p in TABLE if p.quantizable}
WEIGHTS = ("float32", "bfloat16", "int8")  # What --weights offers: a param_dtype.


def target_name(base: Param) -> str:
  """A decoder matrix's LoRA target name, PEFT's module name: q_proj, k_proj, v_proj, o_proj, gate_proj, ..."""
  return base.hf.split(".")[-2]


# Decoder matrix target name -> (base row, A row, B row).
LORA_TARGETS = {target_name(p): (p, *_lora_rows(p)) for p in TABLE if p.is_matmul and p.stacked}
BY_NAME = {(p.module, p.name): p for p in TABLE + tuple(SCALES.values())
           + tuple(r for _, *ab in LORA_TARGETS.values() for r in ab)}


def table(config: LlamaConfig) -> tuple[Param, ...]:
  """The rows present in this config's model (no lm_head with tied embeddings, a `when` row only where its property
  holds; with int8 weights, each quantized row followed by its scale row)."""
  rows = []
  for p in TABLE:
    if not (p.module == "lm_head" and config.tie_embeddings) and (p.when is None or getattr(config, p.when)):
      rows += [p, SCALES[(p.module, p.name)]] if is_int8(config) and p.quantizable else [p]
  return tuple(rows)


def is_int8(config: LlamaConfig) -> bool:
  return config.param_dtype == "int8"


def is_scale(row: Param) -> bool:
  return SCALES.get((row.module, row.name.removesuffix("_scale"))) == row


def leaf_dtype(row: Param, config: LlamaConfig) -> np.dtype:
  """The stored dtype of `row`'s leaf: param_dtype, except under int8 weights (int8 quantized rows, else float32)."""
  if not is_int8(config):
    return np.dtype(config.param_dtype)
  return np.dtype(np.int8 if row.quantizable else np.float32)


def quantize(w, row: Param, lead: int = 0):
  """(q int8, scale float32) of the float weight `w` of `row` (NumPy or jax; `lead` leading layer axes): symmetric,
  per output channel. An all-zero channel gets scale 1."""
  host = isinstance(w, np.ndarray)
  xp = np if host else jnp
  w = w.astype(np.float32, copy=False) if host else w.astype(np.float32)
  n_in = row.n_in if row.layout == "linear" else 0
  if row.layout == "linear":
    axes = tuple(range(lead, lead + n_in))
  else:
    axes = tuple(range(lead + 1, w.ndim))
  amax = xp.max(xp.abs(w), axis=axes, keepdims=True)
  scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
  if host:  # In place: one float32 temporary of the weight's size, not three (an 8B model's embedding is 2 GB).
    scaled = np.divide(w, scale)
    q = np.clip(np.round(scaled, out=scaled), -127, 127, out=scaled).astype(np.int8)
  else:
    q = xp.clip(xp.round(w / scale), -127, 127).astype(np.int8)
  return q, scale.reshape(w.shape[:lead] + tuple(n for k, n in enumerate(w.shape[lead:]) if lead + k not in axes))


def dequantize(q, scale, row: Param, lead: int = 0):
  """The float32 weight q * scale of `row` (NumPy or jax; `lead` leading layer axes), inverse to `quantize`."""
  n_in = row.n_in if row.layout == "linear" else 0
  if row.layout == "linear":
    shape = q.shape[:lead] + (1,) * n_in + q.shape[lead + n_in:]
  else:
    shape = q.shape[:lead + 1] + (1,) * (q.ndim - lead - 1)
  return q.astype(np.float32) * scale.reshape(shape)


def map_params(fn: Callable[[Param, Any], Any], params: Mapping) -> dict:
  """{module: {name: fn(row, leaf)}} over a parameter tree (or any tree of the same two levels)."""
  return {module: {name: fn(BY_NAME[(module, name)], leaf) for name, leaf in leaves.items()}
          for module, leaves in params.items()}


def unpermute_gguf_rows(array: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation (rotate-half -> adjacent pairs) for a (heads*K, D) weight."""
  rows = array.shape[0]
  return array.reshape(heads, rows // heads // 2, 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)


def gguf_permutes_qk(config: LlamaConfig) -> bool:
  """Whether llama.cpp stores this family's Q and K rows permuted: for its `llama` architecture (LLaMA, Mistral),
  not for `qwen2`."""
  return config.family != "qwen2"


def permute_gguf_rows(array: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's Q/K row permutation (rotate-half -> adjacent pairs) of a (heads*K, D) weight, as GGUF stores it."""
  rows = array.shape[0]
  return array.reshape(heads, 2, rows // heads // 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)


def quantized(tree: Mapping) -> dict:
  """The int8 tree of a float tree (NumPy or jax leaves): each quantizable leaf as int8 with its scale leaf after
  it, every other leaf float32."""
  out: dict[str, dict] = {}
  for module, leaves in tree.items():
    for name, leaf in leaves.items():
      row = BY_NAME[(module, name)]
      if row.quantizable:
        out.setdefault(module, {})[name], out[module][f"{name}_scale"] = quantize(leaf, row, int(row.stacked))
      else:
        out.setdefault(module, {})[name] = leaf.astype(np.float32)
  return out


def dequantized(tree: Mapping) -> dict:
  """The float32 tree an int8 tree stands for (each quantized leaf times its scale, scale leaves dropped): the model
  run with param_dtype float32 on it is what the int8 model computes, in exact arithmetic."""
  out: dict[str, dict] = {}
  for module, leaves in tree.items():
    for name, leaf in leaves.items():
      row = BY_NAME[(module, name)]
      if is_scale(row):
        continue
      scale = leaves.get(f"{name}_scale")
      out.setdefault(module, {})[name] = leaf if scale is None else dequantize(leaf, scale, row, int(row.stacked))
  return out


class Leaf(Protocol):
  """A parameter being assembled from a checkpoint's tensors: `set` each layer (None: the whole unstacked leaf),
  then `finish` gives the array. Built as `leaf_type(module, name, shape, dtype)`; checkpoints.leaves has the
  device-side one."""

  def set(self, layer: int | None, value: np.ndarray) -> None: ...

  def finish(self) -> Any: ...


class HostLeaf:
  """A parameter assembled in host memory, layer by layer."""

  def __init__(self, module: str, name: str, shape: tuple[int, ...], dtype):
    del module, name
    self.array = np.empty(shape, dtype)

  def set(self, layer: int | None, value: np.ndarray) -> None:
    if layer is None:
      self.array[...] = value
    else:
      self.array[layer] = value

  def finish(self):
    return self.array


class RowBlocks(Protocol):
  """A tensor a reader can give in blocks of rows (a GGUF's quantized matrix): `iter_params` narrows it to bfloat16
  or int8 block by block; np.asarray(it) is the whole float32 array."""
  shape: tuple[int, ...]

  def row_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 rows) blocks covering the tensor in order."""

  def __array__(self, dtype=None, copy=None) -> np.ndarray: ...


def iter_params(get: Callable[[str], np.ndarray], config: LlamaConfig, naming: str = "hf",
                dtype: str | None = None, source: str = "checkpoint",
                leaf_type: Callable[..., Leaf] = HostLeaf) -> Iterator[tuple[str, str, Any]]:
  """Yields (module, name, leaf) of the Haiku parameter tree, one leaf at a time, from a name -> array lookup.

  `get` returns HF-layout arrays (or RowBlocks, narrowed block by block). Each leaf is a `leaf_type(module, name, shape, dtype)` filled layer by layer
  (HostLeaf: NumPy; checkpoints.leaves.DeviceLeaf: device buffers updated in place), so a consumer that keeps
  nothing (streaming conversion) holds one leaf at a time. `naming` is "hf" or "gguf" (GGUF rows of Q and K are
  unpermuted here). `dtype` (default the config's) "int8" quantizes each tensor as it is read, yielding its scale
  leaf after it. A missing name or a shape that disagrees with the config raises UserError naming `source`.
  """
  config = config.replace(param_dtype=dtype or config.param_dtype)
  for p in table(config):
    if is_scale(p):
      continue
    template = p.hf if naming == "hf" else p.gguf
    leaf = leaf_type(p.module, p.name, p.full_shape(config), leaf_dtype(p, config))
    quantized = is_int8(config) and p.quantizable
    if quantized:
      s = SCALES[(p.module, p.name)]
      scale_leaf = leaf_type(s.module, s.name, s.full_shape(config), np.float32)
    for i in range(config.num_layers) if p.stacked else [None]:
      name = template.format(i=i)
      try:
        array = get(name)
      except KeyError:
        raise UserError(f"{source}: tensor {name} is missing") from None
      if array.shape != p.hf_shape(config):
        raise UserError(f"{source}: tensor {name} has shape {tuple(array.shape)}, the config implies "
                        f"{p.hf_shape(config)}")
      permuted = naming == "gguf" and p.gguf_heads and gguf_permutes_qk(config)
      if hasattr(array, "row_blocks") and not permuted and leaf_dtype(p, config) != np.float32:
        converted, scale = _narrow_by_rows(array, p, config, quantized)
      else:
        if permuted:
          array = unpermute_gguf_rows(np.asarray(array), getattr(config, p.gguf_heads))
        converted = p.to_ours(np.asarray(array), config)
        if quantized:
          converted, scale = quantize(converted, p)
      del array  # The read buffer goes before the device copy is made: one tensor less at the peak.
      if quantized:
        scale_leaf.set(i, scale)
      leaf.set(i, converted.astype(leaf_dtype(p, config), copy=False))
      del converted  # Not kept alive beside the leaf while it is yielded (a transposed one was copied).
    yield p.module, p.name, leaf.finish()
    if quantized:
      yield s.module, s.name, scale_leaf.finish()


def _narrow_by_rows(array: RowBlocks, row: Param, config: LlamaConfig, quantized: bool):
  """An HF-layout tensor read block of rows by block straight into its narrow dtype, never whole in float32, then
  laid out as ours: (array, int8 scale or None). An HF row is an output channel (of a matrix, or the embedding's
  token), so int8 scales are per HF row, as `quantize` gives them in our layout."""
  out = np.empty(array.shape, np.int8 if quantized else leaf_dtype(row, config))
  scales = np.empty(array.shape[:1], np.float32) if quantized else None
  for start, block in array.row_blocks():
    stop = start + len(block)
    if quantized:
      out[start:stop], scales[start:stop] = quantize(block, BY_NAME[("embedding", "embeddings")])  # Per row.
    else:
      out[start:stop] = block
  scale = None if scales is None else scales.reshape(SCALES[(row.module, row.name)].our_shape(config))
  return row.to_ours(out, config), scale


def collect(leaves: Iterable[tuple[str, str, Any]]) -> dict:
  """The parameter tree {module: {name: leaf}} of (module, name, leaf) triples."""
  params: dict[str, dict] = {}
  for module, name, leaf in leaves:
    params.setdefault(module, {})[name] = leaf
  return params


def params_from_tensors(*args, **kwargs) -> dict:
  """The whole parameter tree from `iter_params(*args, **kwargs)`."""
  return collect(iter_params(*args, **kwargs))


def params_from_hf(tensors: Mapping[str, np.ndarray], config: LlamaConfig, dtype: str | None = None) -> dict:
  return params_from_tensors(tensors.__getitem__, config, "hf", dtype)


def hf_tensors(params: Mapping, config: LlamaConfig):
  """(HF name, HF shape, make) for every tensor: `make()` builds its HF-layout array only when called."""
  out = []
  for p in table(config):
    leaf = params[p.module][p.name]
    for i in range(config.num_layers) if p.stacked else [None]:
      part = leaf if i is None else leaf[i]
      out.append((p.hf.format(i=i), p.hf_shape(config), lambda p=p, part=part: p.to_hf(np.asarray(part), config)))
  return out


def params_to_hf(params: Mapping, config: LlamaConfig) -> dict[str, np.ndarray]:
  return {name: make() for name, _, make in hf_tensors(params, config)}
