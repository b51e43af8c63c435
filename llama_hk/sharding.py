"""Logical axis names for activations and parameters, mapped to mesh axes by rules (t5x / MaxText style).

The model names its activations' axes ("batch", "length", "embed", ...) through `constrain`; outside an
`axis_rules` context that is a no-op, so single-device code pays nothing.
"""

import contextlib
import threading

import jax
from jax.sharding import NamedSharding, PartitionSpec

_state = threading.local()


@contextlib.contextmanager
def axis_rules(mesh: jax.sharding.Mesh, rules: dict[str, str | tuple[str, ...] | None]):
  """Within this context, `constrain` lays activations out on `mesh` by `rules` (logical -> mesh axes)."""
  previous = getattr(_state, "active", None)
  _state.active = (mesh, dict(rules))
  try:
    yield
  finally:
    _state.active = previous


def logical_to_spec(logical_axes, rules) -> PartitionSpec:
  return PartitionSpec(*(rules.get(name) if name is not None else None for name in logical_axes))


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
  active = getattr(_state, "active", None)
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, rules)))
