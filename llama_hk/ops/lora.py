"""LoRA adapters: their static configuration, PEFT's initialization, the low-rank term the matmul seam adds, and
the adapter tree beside a frozen base.

A LoRA forward is `make_forward(config, lora=LoraConfig(...))`: each targeted decoder matrix W computes
x W + (x A) B * alpha / r, PEFT's formulation, with A and B parameters beside W in its module (the parameter table's
`*_lora_a` and `*_lora_b` rows). Without `lora` the model's computation is unchanged. Adapters are float32 whatever
the base's dtype. With `dropout` p > 0, training drops each input of the adapter's path with probability p and scales
the rest by 1 / (1 - p), as PEFT's `lora_dropout` does (the base path sees x whole), a fresh mask for each target;
the key comes from the forward's `dropout_rng`, and without one (evaluation, generation) nothing is dropped.
"""

import dataclasses
import math
from collections.abc import Mapping

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from llama_hk import params as param_table
from llama_hk.config import LlamaConfig
from llama_hk.errors import UserError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_WEIGHTS = ("float32", "bfloat16", "int8")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Rank, scale and targets of an adapter (PEFT's names: q_proj ... down_proj), and the dtype its frozen base is
  held in; hashable, a static argument of `make_forward`."""

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  base_weights: str = "float32"  # One of BASE_WEIGHTS.

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    if self.rank <= 0:
      raise UserError(f"LORA_RANK={self.rank}: must be positive")
    unknown = [t for t in self.targets if t not in param_table.LORA_TARGETS]
    if unknown or not self.targets:
      raise UserError(f"LORA_TARGETS: {', '.join(unknown) or 'empty'} is not a target module (choose from "
                      f"{', '.join(param_table.LORA_TARGETS)})")
    if not 0.0 <= self.dropout < 1.0:
      raise UserError(f"LORA_DROPOUT={self.dropout}: must be in [0, 1)")
    if self.base_weights not in BASE_WEIGHTS:
      raise UserError(f"LORA_BASE_WEIGHTS={self.base_weights!r} is not one of {BASE_WEIGHTS}")

  @property
  def scaling(self) -> float:
    return self.alpha / self.rank

  @property
  def weight_names(self) -> frozenset[str]:
    """Our parameter names of the targeted matrices (out_proj for o_proj)."""
    return frozenset(param_table.LORA_TARGETS[t][0].name for t in self.targets)

  def targeted(self) -> tuple[tuple[param_table.Param, param_table.Param, param_table.Param], ...]:
    """(base, A, B) parameter-table rows of each target."""
    return tuple(param_table.LORA_TARGETS[t] for t in self.targets)

  def base_config(self, config: LlamaConfig) -> LlamaConfig:
    """The config a LoRA forward runs: the float32-master `config`, with param_dtype int8 for an int8 base (whose
    matrices then read their scales)."""
    return config.replace(param_dtype="int8") if self.base_weights == "int8" else config

  def frozen_base(self, params: Mapping) -> dict:
    """The frozen base held beside the adapter, from float parameters: cast to base_weights, or quantized."""
    if self.base_weights == "int8":
      return param_table.quantized(params)
    return jax.tree.map(lambda p: p.astype(self.base_weights), params)

  def adapter_rows(self) -> tuple[param_table.Param, ...]:
    return tuple(row for _, a, b in self.targeted() for row in (a, b))


def _kaiming_uniform(shape, dtype):
  """PEFT's A: torch's kaiming_uniform_ with a = sqrt(5) on the (r, in) weight, i.e. U(-1/sqrt(in), 1/sqrt(in))."""
  bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
  return jax.random.uniform(hk.next_rng_key(), shape, dtype, -bound, bound)


def low_rank(x: jax.Array, name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...], lora: LoraConfig,
             dtype) -> jax.Array:
  """(x A) B * alpha / r for x (M, in), A and B the current module's parameters `{name}_lora_a`, `{name}_lora_b`."""
  a = hk.get_parameter(f"{name}_lora_a", [*in_shape, lora.rank], jnp.float32, init=_kaiming_uniform)
  b = hk.get_parameter(f"{name}_lora_b", [lora.rank, *out_shape], jnp.float32, init=jnp.zeros)
  key = hk.maybe_next_rng_key() if lora.dropout else None
  if key is not None:
    keep = jax.random.bernoulli(key, 1.0 - lora.dropout, x.shape)  # (M, in)
    x = jnp.where(keep, x / (1.0 - lora.dropout), 0.0).astype(x.dtype)  # (M, in)
  down = jnp.einsum("MI,IR->MR", x, a.reshape(-1, lora.rank).astype(dtype))  # (M, r)
  return jnp.einsum("MR,RO->MO", down, b.reshape(lora.rank, -1).astype(dtype)) * lora.scaling  # (M, out)


def init_adapter(rng: jax.Array, config: LlamaConfig, lora: LoraConfig) -> dict:
  """A fresh adapter as PEFT makes one: A Kaiming-uniform (a = sqrt(5)), B zero, float32."""
  adapter: dict[str, dict] = {}
  for k, (base, a, b) in enumerate(lora.targeted()):
    a_shape = a.full_shape(config, lora.rank)
    bound = 1.0 / math.sqrt(math.prod(base.our_shape(config)[:base.n_in]))
    adapter.setdefault(a.module, {})[a.name] = jax.random.uniform(jax.random.fold_in(rng, k), a_shape, jnp.float32,
                                                                  -bound, bound)
    adapter[b.module][b.name] = jnp.zeros(b.full_shape(config, lora.rank), jnp.float32)
  return adapter


def combine(base: Mapping, adapter: Mapping) -> dict:
  """The parameter tree a LoRA forward reads: the base's leaves with the adapter's beside them in each module."""
  return {module: {**leaves, **adapter.get(module, {})} for module, leaves in base.items()}


def split(params: Mapping, lora: LoraConfig) -> tuple[dict, dict]:
  """(base, adapter) of a tree `combine` made."""
  names = {(row.module, row.name) for row in lora.adapter_rows()}
  base, adapter = {}, {}
  for module, leaves in params.items():
    for name, leaf in leaves.items():
      (adapter if (module, name) in names else base).setdefault(module, {})[name] = leaf
  return base, adapter


def merged(params: Mapping, lora: LoraConfig) -> dict:
  """A plain model's parameters from a combined tree: each target's W + A B * alpha / r, in W's dtype (NumPy for
  NumPy leaves, else jax arrays laid out as W); an int8 W is dequantized, summed and quantized again."""
  base, adapter = split(params, lora)
  out = {module: dict(leaves) for module, leaves in base.items()}
  for row, a, b in lora.targeted():
    w = base[row.module][row.name]
    scale = base[row.module].get(f"{row.name}_scale")
    xp = np if isinstance(w, np.ndarray) else jnp
    layers = w.shape[0]
    a2 = xp.asarray(adapter[a.module][a.name], np.float32).reshape(layers, -1, lora.rank)  # (L, in, r)
    b2 = xp.asarray(adapter[b.module][b.name], np.float32).reshape(layers, lora.rank, -1)  # (L, r, out)
    w32 = w.astype(np.float32) if scale is None else param_table.dequantize(w, scale, row, lead=1)
    total = w32 + (a2 @ b2 * lora.scaling).reshape(w.shape)
    if scale is None:
      total = total.astype(w.dtype)
    else:
      total, new_scale = param_table.quantize(total, row, lead=1)
      out[row.module][f"{row.name}_scale"] = new_scale if xp is np else jax.device_put(new_scale, scale.sharding)
    out[row.module][row.name] = total if xp is np else jax.device_put(total, w.sharding)  # Laid out as W was.
  return out
