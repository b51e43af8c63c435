"""What a model's parameters take on each device of a mesh, from shapes alone (the dry runs' common figures)."""

import numpy as np
from jax.sharding import Mesh

from llama_hk import params
from llama_hk import sharding
from llama_hk.config import LlamaConfig, num_params


def param_memory_report(config: LlamaConfig, mesh: Mesh) -> dict:
  """{"mesh", "devices", "parameters", "param_bytes_total", "param_bytes_per_device", "param_gib_per_device"}:
  the parameters in `config.param_dtype` laid out on `mesh` (nothing allocated)."""
  per_device = sharding.per_device_param_bytes(config, mesh)
  return {"mesh": dict(mesh.shape), "devices": mesh.size, "parameters": num_params(config),
          "param_bytes_total": sum(int(np.prod(p.full_shape(config))) * params.leaf_dtype(p, config).itemsize
                                   for p in params.table(config)),
          "param_bytes_per_device": per_device, "param_gib_per_device": round(per_device / 2**30, 3)}
