"""The KV cache: every layer's keys and values, written in place at each row's end by each forward pass."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llama_hk.config import LlamaConfig


class KVCache(NamedTuple):
  """Keys and values of every layer and how far each row has filled them.

  Heads come before slots so that attention reads each layer's (B, G, S, K) block without a transpose.
  """
  k: jax.Array  # (L, B, G, S, K)
  v: jax.Array  # (L, B, G, S, K)
  end_index: jax.Array  # (B,) int32: slots filled so far in each row.


class LayerCache(NamedTuple):
  """The cache as the layer scan carries it: the whole buffers, updated in place, and the layer now running.

  Passing per-layer slices in and out as scanned inputs and outputs instead would copy the entire cache at every
  decode step.
  """
  k: jax.Array  # (L, B, G, S, K)
  v: jax.Array  # (L, B, G, S, K)
  layer: jax.Array  # () int32

  def write(self, key: jax.Array, value: jax.Array, end_index: jax.Array):
    """Stores this layer's new keys and values (B, T, G, K) at each row's end_index (B,), this layer's slots only.

    Returns the cache for the next layer and this layer's keys and values (B, G, S, K), the new ones included.
    """
    b, t = key.shape[:2]
    rows = jnp.arange(b)[:, None]  # (B, 1)
    slots = end_index[:, None] + jnp.arange(t)[None, :]  # (B, T)
    k = self.k.at[self.layer, rows, :, slots].set(key.astype(self.k.dtype), mode="drop")  # (L, B, G, S, K)
    v = self.v.at[self.layer, rows, :, slots].set(value.astype(self.v.dtype), mode="drop")  # (L, B, G, S, K)
    return LayerCache(k, v, self.layer + 1), k[self.layer], v[self.layer]


def init_cache(config: LlamaConfig, batch: int, length: int) -> KVCache:
  """An empty cache of `length` slots per row, in the compute dtype."""
  shape = (config.num_layers, batch, config.num_kv_heads, length, config.head_dim)  # (L, B, G, S, K)
  # Two buffers, not one shared: a caller may donate both.
  return KVCache(k=jnp.zeros(shape, config.compute_dtype), v=jnp.zeros(shape, config.compute_dtype),
                 end_index=jnp.zeros((batch,), jnp.int32))


def pad_cache(cache: KVCache, length: int) -> KVCache:
  """The cache with empty slots appended up to `length`: a prefill can run on a cache just long enough for the
  prompt (attention then reads T slots, not S) and hand its cache to decode steps with room to grow."""
  pad = [(0, 0), (0, 0), (0, 0), (0, length - cache.k.shape[3]), (0, 0)]
  return cache._replace(k=jnp.pad(cache.k, pad), v=jnp.pad(cache.v, pad))  # (L, B, G, S, K) x 2
