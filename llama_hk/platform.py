"""Platform policy: the one module in llama_hk that asks which backend and device it runs on.

It chooses what depends on the platform (the decoding weight layout and chunk size, the MFU peak) and refuses
attention implementations the backend lacks, so that the model, the ops and the Generator stay backend-agnostic.
"""

import dataclasses
import os
import time

import jax
import jax.numpy as jnp

from llama_hk.config import LlamaConfig, num_params
from llama_hk.errors import UserError
from llama_hk.ops.dense import WeightLayout, as_bits

# Batch-1 decoding on XLA:CPU: matrix-vector products that stream (out, in) weights (see WeightLayout). The
# out-projection alone is a library call: it follows the attention's run of small single-threaded steps, after
# which a streaming loop split over the threads waits for an idle one to wake up.
CPU_MATVEC_LAYOUT = WeightLayout(out_in=True, library_matvec=frozenset({"out_proj"}))
# Decoding several rows on XLA:CPU: matrix-matrix products, each layer's weights an array of its own (see
# WeightLayout.per_layer), so the matrix library reads them where they lie, each (out, in) weight the left operand.
CPU_BATCH_LAYOUT = WeightLayout(out_in=True, per_layer=True, weights_first=True)

# Dense bfloat16 peaks (FLOP/s per device) of known accelerators, for MFU.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
              "NVIDIA A100": 312e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12}


@dataclasses.dataclass(frozen=True)
class DecodePlan:
  """How decode steps run: the weight layout of their parameters and the steps per jitted call."""
  layout: WeightLayout
  chunk_steps: int


def decode_plan(config: LlamaConfig, batch: int, mesh=None) -> DecodePlan:
  """The decode steps' plan for `batch` rows on this backend (`mesh`: a sharding mesh, or None).

  On CPU without a mesh, a batch of one decodes from `CPU_MATVEC_LAYOUT` and larger batches of float32 weights
  and compute from `CPU_BATCH_LAYOUT` (copies of the weights, made with `ops.dense.to_layout`; prefills stay in the
  stored layout), each when the copies so far take at most half the host's memory (a 7-8B model's would not fit
  beside its own weights). Narrow weights stay stacked beyond batch 1: a weight that the decode loop does not
  slice has its float32 conversion hoisted out of the loop by XLA:CPU (ops.dense), so per-layer narrow weights
  would be read as float32 copies at every step. chunk_steps is 1 (every token streams as soon as it exists)
  except for 16-bit parameters or compute on CPU: XLA:CPU computes in float32 and casts every weight at the start
  of each call, which a call of one step would pay per token, so 32.
  """
  cpu = jax.default_backend() == "cpu"
  narrow = config.param_dtype != "float32" or config.compute_dtype != "float32"

  def fits(copies: int) -> bool:  # The stored weights and the layouts' copies, within half the host's memory.
    return copies * num_params(config) * jnp.dtype(config.param_dtype).itemsize <= host_memory_bytes() // 2

  layout = WeightLayout()
  if cpu and mesh is None:
    if batch == 1 and fits(2):  # Stored + batch-1 copy.
      layout = CPU_MATVEC_LAYOUT
    elif batch > 1 and not narrow and fits(3):  # Stored + batch-1 copy + the batches' copy.
      layout = CPU_BATCH_LAYOUT
  return DecodePlan(layout=layout, chunk_steps=32 if cpu and narrow else 1)


def inference_params(config: LlamaConfig, params):
  """params as inference (decoding, scoring) reads them on this backend: on XLA:CPU with float32 compute, bfloat16
  weights as their bits (ops.dense.as_bits, in place), which XLA:CPU slices without a float32 copy of the whole."""
  if jax.default_backend() == "cpu" and config.compute_dtype == "float32":
    return as_bits(params)
  return params


def host_memory_bytes() -> int:
  """The host's physical memory."""
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_attention_impl(impl: str) -> None:
  """Raises UserError if this backend cannot run the attention implementation `impl` (LlamaConfig.attention_impl)."""
  if impl == "cudnn" and jax.default_backend() != "gpu":
    raise UserError(f"LlamaConfig.attention_impl='cudnn' needs a GPU, and this backend is {jax.default_backend()} "
                    f"(use 'split_causal')")
  if impl == "splash" and jax.default_backend() != "tpu":
    raise UserError(f"LlamaConfig.attention_impl='splash' needs a TPU, and this backend is {jax.default_backend()} "
                    f"(use 'split_causal', or 'splash_interpret' to run the kernel in Pallas's interpreter)")


def measure_matmul_peak(size: int = 1024, dtype=jnp.float32, seconds: float = 0.5) -> float:
  """FLOP/s of one device on a square float32 matmul: the MFU denominator where no peak is tabulated (CPUs)."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x: x @ a)
  x = matmul(a).block_until_ready()
  runs, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    x = matmul(x)
    runs += 1
  x.block_until_ready()
  return 2.0 * size ** 3 * runs / (time.perf_counter() - start)


def device_peak_flops(device=None) -> float:
  """The tabulated peak of the device kind, else a measured float32 matmul peak."""
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in PEAK_FLOPS.items():
    if kind.startswith(name):
      return peak
  return measure_matmul_peak()
