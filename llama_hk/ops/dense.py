"""The matmul seam: the one place where weights meet activations, in a weight layout the caller states.

LoRA adapters, int8 weights and other storage layouts hook in here; the model's call sites stay einsums in the
shape glossary's letters.

int8 weights (param_dtype int8, params.py) are dequantized in the dot: the int8 weight is converted to the compute
dtype inside the product's fusion, and the per-output-channel scale multiplies the product's columns afterwards,
(x q) * s = x (q * s) exactly in real arithmetic. XLA:CPU writes the converted weight out before its matrix
library call, and hoists the conversion of a weight that a loop does not slice (the LM head's table in the decode
loop) out of the loop: a float32 copy written each call and read each step. So a narrow weight whose compute-dtype
copy would pass CONVERT_BLOCK_BYTES (SmolLM2's tied head: 113 MB in float32; an 8B model's: 2 GiB) is multiplied
in blocks of output columns, converted one block at a time inside the product.

bfloat16 weights may come as their bits (uint16, `as_bits`): XLA:CPU computes no bfloat16 slicing or gathering
itself and converts the whole operand to float32 first (an (L, ...) stack sliced in the layer scan: 30 GiB for an
8B model), where uint16 is sliced as it lies; `widen` gives the exact float32 value of each sliced block.
"""

import dataclasses
import math
from collections.abc import Mapping

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from llama_hk import params as param_table
from llama_hk import sharding
from llama_hk.ops import lora as lora_lib

CONVERT_BLOCK_BYTES = 16 << 20  # The largest compute-dtype copy of a narrow weight that one product makes.


@dataclasses.dataclass(frozen=True)
class WeightLayout:
  """How a parameter tree stores its matrix weights: a static, hashable argument of `make_forward`.

  The default is the stored layout: each weight has the parameter table's shape, input axes first (q_proj is
  (D, N, K)). With `out_in`, each is one flat (out, in) matrix instead, a (L, out, in) stack in the decoder, under
  the same leaf name (`to_layout` makes it). That layout is for matrix-vector products on XLA:CPU: there a weight
  contracted over its minor axes compiles to a loop that streams it straight out of the stacked (L, ...) array,
  the layer scan's slice fused in, where the stored layout calls the matrix library on a copy of the slice (every
  weight read, written and read again per token). Flat, because a contracted axis split in two would cost that
  loop an integer division per element. `out_in` weights are taken as the (in, out) transpose, which XLA streams,
  except those named in `library_matvec`, contracted as they lie: XLA then copies the layer's slice out and calls
  the library's matrix-vector routine (`platform.decode_plan` says where that wins). With `weights_first`, every
  (out, in) weight is the left operand instead: (out, in) times the rows transposed, (in, M), and the (out, M)
  product transposed back; for a few rows XLA:CPU's matrix library runs that order faster than (M, in) times
  (in, out), provided both transposes are made as copies (folded into the product's layouts, they are slower).
  """
  out_in: bool = False
  library_matvec: frozenset[str] = frozenset()  # Leaf names of `out_in` weights taken as they lie.
  weights_first: bool = False  # `out_in` weights (and a given (out, in) weight) as the left operand.
  # Each layer's leaves as arrays of their own, under `decoder_{i}/...` (`layer_module`), and the layers unrolled
  # rather than scanned: for decoding several rows on XLA:CPU, which copies a layer's slice of an (L, ...) stack
  # out before each matrix library call (every weight written and read again per step); a whole array it reads
  # as it lies. The price: one compile per layer's code (the scan compiles one body), so decoding only.
  per_layer: bool = False


DECODER = "decoder"  # The layer stack's module name (models.llama); its leaves have a leading L axis.


def layer_module(module: str, layer: int) -> str:
  """The module name of layer `layer`'s slice of the decoder module `module` ("decoder/mlp") in a `per_layer`
  tree ("decoder_3/mlp")."""
  return f"{DECODER}_{layer}{module[len(DECODER):]}"


def to_layout(params: Mapping, layout: WeightLayout) -> Mapping:
  """The stored-layout `params` in `layout`: with `out_in`, matrix weights (the table's `is_matmul` rows)
  rearranged, their `n_in` leading axes flattened last as (out, in), under the same names; with `per_layer`,
  every decoder leaf (a LoRA adapter's too) split into its layers' arrays. Every other leaf is shared."""
  if layout.out_in:
    def arrange(row: param_table.Param, leaf):
      if not row.is_matmul:
        return leaf
      lead = 1 if row.stacked else 0  # The layer axis stays first.
      n_in = math.prod(leaf.shape[lead:lead + row.n_in])
      return jnp.swapaxes(leaf.reshape(*leaf.shape[:lead], n_in, -1), -1, -2)  # ([L,] out, in)

    params = param_table.map_params(arrange, params)
  if layout.per_layer:
    split = {}
    for module, leaves in params.items():
      if module != DECODER and not module.startswith(DECODER + "/"):
        split[module] = leaves
        continue
      for i in range(next(iter(leaves.values())).shape[0]):
        split[layer_module(module, i)] = {name: leaf[i] for name, leaf in leaves.items()}
    params = split
  return params


def dense(x: jax.Array, spec: str, name: str, *, sizes: Mapping[str, int], dtype, param_dtype,
          init: hk.initializers.Initializer | None = None, layout: WeightLayout = WeightLayout(),
          weight: jax.Array | None = None, weight_scale: jax.Array | None = None,
          lora: lora_lib.LoraConfig | None = None, columns: tuple[jax.Array, int] | None = None,
          **einsum_kwargs) -> jax.Array:
  """x times the weight `name` as the einsum `spec` says, e.g. "BTD,DNK->BTNK".

  The weight is a parameter of the current Haiku module (made here, in `layout`) unless given. `spec` names its
  axes as the parameter table does, the input axes (those x shares) first; a given weight may have them last,
  (out, in), as the tied head's embedding table "VD". Whatever the letters, the product is one 2-D matrix product
  over the flattened axes ("MI,IO->MO"): contracting several axes, XLA may match the activations' layout by
  transposing the weight (a copy of it per call), and with (B, T) kept as two row axes, XLA:CPU lays out the
  backward pass's products with transposing copies.

  Args:
    x: activations (..., *input axes): x's trailing axes are contracted, its leading ones lead the output.
    spec: "{x axes},{weight axes}->{output axes}" in glossary letters.
    name: the weight's parameter name (and its key in `layout.library_matvec`).
    sizes: glossary letter -> size, for the weight's output axes.
    dtype: the compute dtype the weight is cast to.
    param_dtype: the dtype a new weight is stored in; int8: with a float32 scale `{name}_scale` per output channel.
    init: a new weight's initializer.
    layout: how the weight is stored.
    weight: an existing 2-D weight to use instead of the parameter `name`.
    weight_scale: the per-output-channel scale of an int8 `weight`.
    lora: an adapter whose low-rank term is added where it targets `name` (ops.lora); None: none.
    columns: (start, size): the product with the output columns start ... start + size - 1 only, of a weight with
      one output axis (a block of the LM head's vocabulary); start may be traced, size is static.
    **einsum_kwargs: for jnp.einsum, e.g. preferred_element_type.
  """
  operands, out_axes = spec.split("->")
  x_axes, w_axes = operands.split(",")
  in_axes = "".join(a for a in w_axes if a in x_axes)
  w_out_axes = "".join(a for a in w_axes if a not in x_axes)
  lead = x.shape[:x.ndim - len(in_axes)]
  if (not x_axes.endswith(in_axes) or out_axes != x_axes[:len(lead)] + w_out_axes
      or w_axes not in (in_axes + w_out_axes, w_out_axes + in_axes)):
    raise ValueError(f"dense {name}: {spec!r} is not a product over x's trailing axes")
  in_shape = x.shape[len(lead):]
  n_in = math.prod(in_shape)
  x = x.reshape(math.prod(lead), n_in)  # (M, in)
  scale = weight_scale
  if weight is not None:
    out_in = w_axes != in_axes + w_out_axes
    w = weight  # (out, in) or (in, out), as given
    out_shape = weight.shape[:1] if out_in else weight.shape[1:]
  else:
    out_in = layout.out_in
    out_shape = tuple(sizes[a] for a in w_out_axes)
    n_out = math.prod(out_shape)
    if out_in:
      w = hk.get_parameter(name, [n_out, n_in], param_dtype, init=init)  # (out, in)
    else:
      w = hk.get_parameter(name, [*in_shape, *out_shape], param_dtype, init=init)
      w = w.reshape(n_in, n_out)  # (in, out)
    if jnp.dtype(param_dtype) == jnp.int8:
      scale = hk.get_parameter(f"{name}_scale", list(out_shape), jnp.float32, init=jnp.ones)
  if columns is not None:
    if len(out_shape) != 1 or (lora is not None and name in lora.weight_names):
      raise ValueError(f"dense {name}: columns need one output axis and no adapter")
    start, size = columns
    w = jax.lax.dynamic_slice_in_dim(w, start, size, axis=0 if out_in else 1)  # (size, in) or (in, size)
    scale = None if scale is None else jax.lax.dynamic_slice_in_dim(scale, start, size)  # (size,)
    out_shape = (size,)
  order = "weights_first" if layout.weights_first else "as_lies" if name in layout.library_matvec else "streamed"
  y = _product(x, w, dtype, out_in, order, einsum_kwargs)  # (M, out)
  if scale is not None:
    y = y * scale.reshape(-1).astype(y.dtype)  # (M, out)
  if lora is not None and weight is None and name in lora.weight_names:
    y = y + lora_lib.low_rank(x, name, in_shape, out_shape, lora, dtype)  # (M, out)
  return y.reshape(*lead, *out_shape)


def _product(x: jax.Array, w: jax.Array, dtype, out_in: bool, order: str, einsum_kwargs) -> jax.Array:
  """x (M, in) times w, stored (out, in) if out_in else (in, out), cast to `dtype`: (M, out). An `out_in` weight
  is contracted in `order` (WeightLayout): "streamed" as its transpose (which XLA streams), "as_lies" as the right
  operand, "weights_first" as the left one, the product transposed. A narrow weight too big to convert whole
  goes in blocks of output columns (a scan whose body is rematerialized, so its gradient keeps no converted
  block either)."""
  out_axis = 0 if out_in else 1
  n_out = w.shape[out_axis]
  blocks = _column_blocks(n_out, w.shape[1 - out_axis] * jnp.dtype(dtype).itemsize) if w.dtype != dtype else 1

  def product(w_block):  # (out', in) or (in, out') -> (M, out')
    w_block = widen(w_block, dtype)
    if not out_in:
      return jnp.einsum("MI,IO->MO", x, w_block, **einsum_kwargs)
    if order == "weights_first":  # Barriers keep XLA from folding the transposes into the product's layouts.
      x_t = jax.lax.optimization_barrier(x.T)  # (in, M)
      return jax.lax.optimization_barrier(jnp.einsum("OI,IM->OM", w_block, x_t, **einsum_kwargs)).T
    if order == "as_lies":
      return jnp.einsum("MI,OI->MO", x, w_block, **einsum_kwargs)
    return jnp.einsum("MI,IO->MO", x, w_block.T, **einsum_kwargs)

  if blocks == 1:
    return product(w)
  width = n_out // blocks

  @jax.checkpoint
  def block(_, i):
    return None, product(jax.lax.dynamic_slice_in_dim(w, i * width, width, axis=out_axis))  # (M, out')

  _, ys = jax.lax.scan(block, None, jnp.arange(blocks))  # (blocks, M, out')
  return jnp.moveaxis(ys, 0, 1).reshape(x.shape[0], n_out)  # (M, out)


def _column_blocks(n_out: int, column_bytes: int) -> int:
  """The fewest blocks, dividing n_out evenly, whose converted copy is at most CONVERT_BLOCK_BYTES (1 when the
  whole fits, or when no divisor of n_out would)."""
  least = -(-n_out * column_bytes // CONVERT_BLOCK_BYTES)
  if least <= 1:
    return 1
  return next((b for b in range(least, n_out // 2 + 1) if n_out % b == 0), 1)


def widen(w: jax.Array, dtype) -> jax.Array:
  """w in the compute dtype; a uint16 w holds bfloat16 bits (as_bits), which are float32's upper half."""
  if w.dtype == jnp.uint16:
    return jax.lax.bitcast_convert_type(w.astype(jnp.uint32) << 16, jnp.float32).astype(dtype)
  return w.astype(dtype)


def as_bits(params: Mapping) -> Mapping:
  """`params` with each bfloat16 matrix weight and embedding table as its uint16 bits, for inference (nothing
  differentiates through bits), viewed in place (sharding.view_as); leaves outside the parameter table (a
  LoRA adapter's) stay as they are."""
  def bits(row: param_table.Param, leaf):
    if not (row.is_matmul or row.name == "embeddings") or leaf.dtype != jnp.bfloat16:
      return leaf
    return sharding.view_as(leaf, np.uint16)
  return {module: {name: bits(param_table.BY_NAME[(module, name)], leaf) if (module, name) in param_table.BY_NAME
                   else leaf for name, leaf in leaves.items()} for module, leaves in params.items()}
