"""A dry run: the train step compiled ahead of time on abstract, mesh-laid-out state, and its per-device memory.

Nothing is allocated and no data, tokenizer or file is touched, so a 7B run can be sized on a laptop's simulated
devices. The report's byte counts are per device: parameters and optimizer state from their shardings, the rest
from XLA's memory analysis of the compiled step (when the backend gives one).
"""

import time

import jax
from jax.sharding import Mesh

from llama_hk import sharding
from llama_hk.config import LlamaConfig
from llama_hk.data import batch as batch_lib
from llama_hk.ops.lora import LoraConfig
from llama_hk.train.state import abstract_state
from llama_hk.train.step import Optimizer, TrainState


def memory_report(config: LlamaConfig, optimizer: Optimizer, mesh: Mesh, shardings: TrainState, step_fn,
                  batch_size: int, seq_len: int, seed: int, lora: LoraConfig | None = None) -> dict:
  """{"devices", "mesh", "compile_s", "params_bytes", "opt_state_bytes", "state_bytes"} (with LoRA, params are the
  adapter's and "base_bytes" is the frozen base's) and, where XLA reports them, {"temp_bytes", "argument_bytes",
  "output_bytes", "alias_bytes"}: bytes per device of the jitted `step_fn`."""
  state = abstract_state(config, optimizer, shardings, seed, lora)
  rows = sharding.batch_sharding(mesh)
  batch = {key: jax.ShapeDtypeStruct((batch_size, seq_len), batch_lib.dtype(key), sharding=rows)
           for key in batch_lib.BATCH_KEYS}
  start = time.perf_counter()
  with sharding.axis_rules(mesh):
    compiled = step_fn.lower(state, batch).compile()
  report = {"devices": jax.device_count(), "mesh": dict(mesh.shape),
            "compile_s": round(time.perf_counter() - start, 1),
            "params_bytes": sharding.per_device_bytes(state.params, shardings.params),
            "opt_state_bytes": sharding.per_device_bytes(state.opt_state, shardings.opt_state)}
  if lora is not None:
    report["base_bytes"] = sharding.per_device_bytes(state.base, shardings.base)
  report["state_bytes"] = sharding.per_device_bytes(state, shardings)
  analysis = compiled.memory_analysis()
  if analysis is not None:
    report.update(temp_bytes=int(analysis.temp_size_in_bytes), argument_bytes=int(analysis.argument_size_in_bytes),
                  output_bytes=int(analysis.output_size_in_bytes), alias_bytes=int(analysis.alias_size_in_bytes))
  return report
