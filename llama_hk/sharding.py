"""Device meshes, logical axis names, and the rules that map them to mesh axes (t5x / MaxText style).

The mesh has three named axes:
  data    pure data parallelism: parameters replicated, the batch split;
  fsdp    the batch split and parameters (and optimizer state) sharded along their `embed` axis (ZeRO-3);
  tensor  Megatron-style tensor parallelism: heads, kv heads, the MLP hidden and the vocabulary split.
Parameters name their axes in the parameter table (`params.TABLE`); activations name theirs through `constrain`,
which is a no-op outside an `axis_rules` context (and `axis_rules(None)` is none), so single-device code pays
nothing. Host arrays that every process holds become global arrays through `put_global`.
"""

import contextlib
import dataclasses
import math
import threading

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_hk import params
from llama_hk.config import LlamaConfig
from llama_hk.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Activation axes are prefixed `act_`.
DEFAULT_RULES = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "head_dim": None,
    "lora_rank": None,
    "act_batch": ("data", "fsdp"),
    "act_length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}

_state = threading.local()


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = [data, fsdp, tensor]
  if shape.count(-1) > 1:
    raise UserError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}): at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise UserError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}): {len(devices)} devices are not a "
                      f"multiple of {known}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise UserError(f"mesh (data={shape[0]}, fsdp={shape[1]}, tensor={shape[2]}) needs {math.prod(shape)} devices, "
                    f"{len(devices)} are available")
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, AssertionError, NotImplementedError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_to_spec(logical_axes, rules) -> PartitionSpec:
  return PartitionSpec(*(rules.get(name) if name is not None else None for name in logical_axes))


def _axis_size(mesh: Mesh, mesh_axes) -> int:
  if mesh_axes is None:
    return 1
  names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
  return math.prod(mesh.shape[name] for name in names)


def param_specs(config: LlamaConfig, mesh: Mesh, rules=None, lora=None) -> dict:
  """PartitionSpecs of the parameter tree (with `lora`, an ops.lora.LoraConfig: of its adapter tree), checking that
  every sharded dimension divides its mesh axes."""
  rules = DEFAULT_RULES if rules is None else rules
  specs: dict[str, dict[str, PartitionSpec]] = {}
  for p in params.table(config) if lora is None else lora.adapter_rows():
    axes = p.logical_axes()
    shape = p.full_shape(config, None if lora is None else lora.rank)
    for logical, size in zip(axes, shape):
      devices = _axis_size(mesh, rules.get(logical))
      if size % devices:
        raise UserError(f"mesh axis {rules.get(logical)!r} has {devices} devices, which does not divide "
                        f"{logical}={size} of {p.module}/{p.name}; choose a mesh whose {rules.get(logical)} size "
                        f"divides {size}")
    specs.setdefault(p.module, {})[p.name] = logical_to_spec(axes, rules)
  return specs


def param_shardings(config: LlamaConfig, mesh: Mesh, rules=None, lora=None) -> dict:
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(config, mesh, rules, lora),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, rules=None) -> NamedSharding:
  """(B, T) inputs: the batch split over the data-parallel axes."""
  rules = DEFAULT_RULES if rules is None else rules
  return NamedSharding(mesh, logical_to_spec(("act_batch", "act_length"), rules))


def batch_multiple(mesh: Mesh | None, rules=None) -> int:
  """The devices a batch is split over (data x fsdp by default; 1 without a mesh): a batch must be a multiple of
  it, and it is the smallest batch that leaves no device idle."""
  if mesh is None:
    return 1
  return _axis_size(mesh, (DEFAULT_RULES if rules is None else rules).get("act_batch"))


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
  """Where a batched decode keeps its arrays: rows split over `batch_axes`, the KV cache's heads over tensor, and
  the rest (sampled tokens, flags, keys) replicated so that every process can read them. Hashable: a static jit
  argument."""
  mesh: Mesh
  batch_axes: tuple[str, ...] = ()

  @classmethod
  def for_batch(cls, mesh: Mesh, batch: int) -> "DecodeLayout":
    """Rows split over data x fsdp, else over whichever of the two divides `batch`, else replicated."""
    for axes in (("data", "fsdp"), ("data",), ("fsdp",)):
      if batch % _axis_size(mesh, axes) == 0:
        return cls(mesh, tuple(a for a in axes if mesh.shape[a] > 1))
    return cls(mesh)

  def rules(self) -> dict:
    return dict(DEFAULT_RULES, act_batch=self.batch_axes or None)

  def sharding(self, *logical_axes: str) -> NamedSharding:
    return NamedSharding(self.mesh, logical_to_spec(logical_axes, self.rules()))

  def cache_sharding(self) -> NamedSharding:
    """The KV cache (L, B, G, S, K); param_specs has checked that tensor divides G."""
    return self.sharding("layers", "act_batch", "kv_heads", "act_length", "head_dim")

  def cache_bytes_per_device(self, config: LlamaConfig, batch: int, length: int) -> int:
    """Bytes of keys and values on each device for a cache of `batch` rows and `length` slots."""
    shape = (config.num_layers, batch, config.num_kv_heads, length, config.head_dim)  # (L, B, G, S, K)
    return 2 * math.prod(self.cache_sharding().shard_shape(shape)) * np.dtype(config.compute_dtype).itemsize

  def put(self, array: np.ndarray, *logical_axes: str) -> jax.Array:
    """A host array, the same in every process, as a global array laid out by `logical_axes`."""
    return put_global(array, self.sharding(*logical_axes))


def put_global(array: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
  """A host array, the same in every process, as a global array laid out by `sharding`; each device receives only
  its own shard (across processes too, where `jax.device_put` would need the whole array addressable). None: the
  default device."""
  if sharding is None:
    return jax.device_put(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def view_as(array, dtype) -> jax.Array:
  """The same buffers read as another dtype of the same width (bfloat16 <-> uint16), shard by shard, not copied
  (on CPU devices, whose buffers NumPy views in place). NumPy arrays are viewed as NumPy."""
  if isinstance(array, np.ndarray):
    return array.view(dtype)
  shards = [jax.device_put(np.asarray(shard.data).view(dtype), shard.device) for shard in array.addressable_shards]
  return jax.make_array_from_single_device_arrays(array.shape, array.sharding, shards)


@contextlib.contextmanager
def axis_rules(mesh: Mesh | None, rules=None):
  """Within this context, `constrain` lays activations out on `mesh` by `rules` (logical -> mesh axes); with no
  mesh, nothing changes (single-device code)."""
  if mesh is None:
    yield
    return
  previous = getattr(_state, "active", None)
  _state.active = (mesh, dict(DEFAULT_RULES if rules is None else rules))
  try:
    yield
  finally:
    _state.active = previous


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
  active = getattr(_state, "active", None)
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, rules)))


def per_device_bytes(abstract_tree, shardings) -> int:
  """Bytes on the most loaded device of a tree of arrays (or ShapeDtypeStructs) laid out by a matching tree of
  shardings, from shapes alone (nothing allocated)."""
  per_device: dict = {}
  for leaf, leaf_sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings), strict=True):
    shape, itemsize = tuple(leaf.shape), np.dtype(leaf.dtype).itemsize
    for device, index in leaf_sharding.devices_indices_map(shape).items():
      elements = math.prod(len(range(*s.indices(n))) for s, n in zip(index, shape))
      per_device[device] = per_device.get(device, 0) + elements * itemsize
  return max(per_device.values(), default=0)


def per_device_param_bytes(config: LlamaConfig, mesh: Mesh, rules=None) -> int:
  """Bytes of parameters on the most loaded device, from shapes and shardings alone (nothing allocated)."""
  shardings = param_shardings(config, mesh, rules)
  abstract = {p.module: {} for p in params.table(config)}
  for p in params.table(config):
    abstract[p.module][p.name] = jax.ShapeDtypeStruct(p.full_shape(config), params.leaf_dtype(p, config))
  return per_device_bytes(abstract, shardings)
