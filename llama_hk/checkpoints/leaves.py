"""Where a loaded parameter is assembled: host memory, the default device, or its shards over a mesh.

Every format hands its leaves to `params.iter_params` (or restores them) through a `Placement`, whose `leaf`
builds a `Leaf` (the protocol of params.py): a `HostLeaf` (NumPy) or a `DeviceLeaf`, which assembles a stacked
parameter on devices one layer at a time by in-place (donated) updates. With shardings, every device receives only
its own shard of each layer, so the model never sits whole on one device or in one host.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llama_hk import params
from llama_hk import sharding as sharding_lib
from llama_hk.params import HostLeaf, Leaf

__all__ = ["DeviceLeaf", "HostLeaf", "Leaf", "Placement"]


class DeviceLeaf:
  """A parameter assembled on devices, laid out by `sharding` (None: the default device)."""

  def __init__(self, module: str, name: str, shape: tuple[int, ...], dtype, sharding: NamedSharding | None = None):
    self.sharding = sharding
    self.array = None
    self.dtype = np.dtype(dtype)
    stacked = params.BY_NAME[(module, name)].stacked
    # A bfloat16 stack is assembled as its bits: XLA:CPU updates a bfloat16 buffer through a float32 copy of it all.
    self.bits = stacked and self.dtype == jnp.bfloat16
    if stacked:  # (L, ...): a buffer the layers are written into.
      self.array = _zeros(tuple(shape), np.dtype(np.uint16) if self.bits else self.dtype, sharding)()

  def set(self, layer: int | None, value: np.ndarray) -> None:
    if layer is None:
      self.array = sharding_lib.put_global(value, self.sharding)
      return
    layer_sharding = None if self.sharding is None else NamedSharding(
        self.sharding.mesh, PartitionSpec(*self.sharding.spec[1:]))
    value = value.view(np.uint16) if self.bits else value
    self.array = _set_layer(self.sharding)(self.array, sharding_lib.put_global(value, layer_sharding), layer)

  def finish(self) -> jax.Array:
    return sharding_lib.view_as(self.array, self.dtype) if self.bits else self.array


@functools.cache
def _zeros(shape: tuple[int, ...], dtype: np.dtype, sharding):
  """A jitted allocator of zeros laid out by `sharding`: each device allocates only its shard."""
  return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)


@functools.cache
def _set_layer(sharding):
  """buffer.at[layer].set(value), in place: the buffer is donated and the layer index is traced."""
  return jax.jit(lambda buffer, value, layer: buffer.at[layer].set(value), donate_argnums=0,
                 out_shardings=sharding)


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where loaded parameters go: NumPy arrays (on_device=False, e.g. for export), the default device, or sharded by
  `shardings` (a tree like the params of NamedShardings, from sharding.param_shardings)."""
  on_device: bool = True
  shardings: Any = None

  def leaf(self, module: str, name: str, shape: tuple[int, ...], dtype) -> Leaf:
    if not self.on_device:
      return HostLeaf(module, name, shape, dtype)
    return DeviceLeaf(module, name, shape, dtype, None if self.shardings is None else self.shardings[module][name])
