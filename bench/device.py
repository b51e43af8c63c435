#!/usr/bin/env python3
"""One accelerator's figures: the bfloat16 train-step MFU of the ~1B config, decode tokens/s, fused against XLA
attention. bench/device.sh runs it (after installing the wheels it carries); --smoke runs tiny shapes on CPU.

  python bench/device.py [--smoke] [--steps=5] [--new_tokens=128]

Every weight is random (SmolLM2-135M's shapes and gin/bench/device_1b.gin's ~1B LLaMA), so nothing is read but
this checkout. Prints the device, the JAX version, and one `name: value unit` line per figure:
  - attention parity: max abs difference of the outputs and of the q/k/v gradients of cuDNN's attention against
    XLA's (jax.nn.dot_product_attention, the arguments ops.attention builds for both) in bfloat16, for causal rows,
    causal rows in a window, and packed rows with padding (cuDNN's dense-mask path, where MaxText's cuDNN path
    ignored the segments), each with cuDNN's forward+backward time, and how far the packed rows' outputs lie from
    those of a kernel that dropped the segments;
  - train: tokens/s and MFU of the ~1B config's full step (forward, backward, AdamW) on rows of one document each
    (segment_ids None: the fused kernel's causal mask alone), against the device's tabulated dense bfloat16 peak
    (platform.PEAK_FLOPS) with the causal square counted whole (train.flops_per_token); a step that runs out of
    memory is retried with remat_policy='full', and the line says so;
  - decode: steady tokens/s of llama_hk.inference.Generator (bfloat16 weights) for both models at batch 1 and 64.
--smoke: the tiny preset for both models, short rows, batch 1 and 4, XLA's attention against the float32-logit
reference (CPU has no cuDNN); its figures only show that every path runs.
"""

import functools
import sys
import time

from absl import flags
import gin
import jax
import jax.numpy as jnp
import numpy as np

from llama_hk import cli
from llama_hk import platform
from llama_hk import train
from llama_hk.config import LlamaConfig, num_params
from llama_hk.inference import Generator
from llama_hk.models import make_forward
from llama_hk.ops import attention
import step_timing  # bench/step_timing.py, beside this script.

flags.DEFINE_bool("smoke", False, "Tiny shapes on any backend (XLA attention), in seconds: the suite's check.")
flags.DEFINE_integer("steps", 5, "Timed train steps (after two warm-up steps).")
flags.DEFINE_integer("new_tokens", 128, "Tokens decoded per row.")
FLAGS = flags.FLAGS

TRAIN_GIN = "gin/bench/device_1b.gin"
SMOLLM2_GIN = "gin/models/smollm2_135m.gin"
TINY_GIN = "gin/models/tiny.gin"
PROMPT_TOKENS = 16
TIMED_CALLS = 10  # Of each attention, after its first.


def figure(name: str, value: float, unit: str = "", note: str = "") -> None:
  """One figure on a line of its own: `name: value unit  (note)`."""
  print(f"{name}: {value:.4g} {unit}".rstrip() + (f"  ({note})" if note else ""), flush=True)


def attention_parity(fused: str, baseline: str, shape: tuple[int, ...], window: int) -> None:
  """Max abs differences of `fused` against `baseline` attention in bfloat16: outputs, and q/k/v gradients of a
  random projection of them, under three masks."""
  b, t, g, h, k = shape
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], shape, jnp.bfloat16)  # (B, T, G, H, K)
  key, value = (jax.random.normal(r, (b, t, g, k), jnp.bfloat16) for r in keys[1:3])  # (B, T, G, K) x 2
  cotangent = jax.random.normal(keys[3], shape, jnp.float32)  # (B, T, G, H, K)
  packed = np.zeros((b, t), np.int32)  # Three documents, then padding.
  packed[:, :t // 4], packed[:, t // 4:t // 2], packed[:, t // 2:t - t // 8] = 1, 2, 3
  ones = np.ones((b, t), np.int32)
  masks = {"causal": attention.Mask(ones, unsegmented=True),
           f"window {window}": attention.Mask(ones, window=window, unsegmented=True),
           "packed+padding": attention.Mask(packed)}

  @functools.partial(jax.jit, static_argnums=0)
  def run(impl, mask):
    def loss(q, key, value):
      return jnp.sum(attention.attend(q, key, value, mask, impl).astype(jnp.float32) * cotangent)
    return attention.attend(q, key, value, mask, impl), jax.grad(loss, argnums=(0, 1, 2))(q, key, value)

  largest = lambda x: float(jnp.max(jnp.abs(x.astype(jnp.float32))))  # noqa: E731
  fused_outputs = {}
  for name, mask in masks.items():
    (out_f, grads_f), (out_b, grads_b) = run(fused, mask), run(baseline, mask)
    fused_outputs[name] = out_f
    label = f"attention {fused} vs {baseline}, {name}"
    figure(f"{label}, outputs max abs diff", largest(out_f - out_b), note=f"max |output| {largest(out_b):.3g}")
    figure(f"{label}, grads max abs diff", max(largest(x - y) for x, y in zip(grads_f, grads_b)),
           note=f"max |grad| {max(largest(y) for y in grads_b):.3g}")
    start = time.perf_counter()
    for _ in range(TIMED_CALLS):
      out = run(fused, mask)
    jax.block_until_ready(out)
    figure(f"attention {fused} forward+backward, {name}", (time.perf_counter() - start) / TIMED_CALLS * 1e3, "ms",
           f"{b} x {t}, {g * h} query heads over {g}, head dim {k}"
           + ("; segment ids as the dense mask" if not mask.unsegmented else ""))
  # The causal rows' outputs are what a kernel that dropped the segment ids would give the packed rows: far off.
  dropped = jnp.where(packed[:, :, None, None, None] != 0, fused_outputs["packed+padding"] - fused_outputs["causal"], 0)
  figure(f"attention {fused}, packed+padding against ignoring the segments, outputs max abs diff", largest(dropped))


def train_step(config: LlamaConfig, batch_size: int, seq_len: int, peak: float) -> None:
  """Tokens/s and MFU of the full train step on random one-document rows; remat 'full' if the step runs out of
  memory without it."""
  optimizer = train.make_optimizer(total_steps=100, schedule="constant", clip_norm=None)
  batch = {**step_timing.random_batch(config.vocab_size, batch_size, seq_len), "segment_ids": None}
  note = ""
  try:
    seconds = _seconds_per_step(config, optimizer, batch)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e) or config.remat_policy == "full":
      raise
    note = f"remat_policy {config.remat_policy!r} ran out of memory; "
    config = config.replace(remat_policy="full")
    seconds = _seconds_per_step(config, optimizer, batch)
  tokens_per_s = batch_size * seq_len / seconds
  note += (f"{num_params(config) / 1e6:,.0f}M parameters, batch {batch_size} x {seq_len}, compute "
           f"{config.compute_dtype}, attention {config.attention_impl}, remat {config.remat_policy}")
  figure("train tokens/s", tokens_per_s, "tokens/s", note)
  figure("train step", seconds * 1e3, "ms")
  figure("train MFU", 100 * train.mfu(config, seq_len, tokens_per_s, peak), "%", f"of {peak / 1e12:.4g} TFLOP/s")


def _seconds_per_step(config: LlamaConfig, optimizer, batch) -> float:
  state = train.init_state(config, optimizer)
  step = jax.jit(train.make_train_step(config, optimizer), donate_argnums=0)
  return step_timing.seconds_per_step(step, state, batch, FLAGS.steps)


def decode(name: str, config: LlamaConfig, batch: int) -> None:
  """Steady decode tokens/s of random bfloat16 weights at `batch` rows (Generator's own plan)."""
  config = config.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
  prompt = np.zeros((1, 2), np.int32)
  params = jax.jit(make_forward(config).init)(jax.random.key(1), prompt)
  generator = Generator(config, params, max_batch=batch)
  prompts = np.random.default_rng(2).integers(0, config.vocab_size, (batch, PROMPT_TOKENS)).tolist()
  _, stats = generator.generate(prompts, FLAGS.new_tokens, use_eos=False)
  plan, _ = generator.decode_plan(batch)
  figure(f"decode {name} batch {batch}", stats.decode_tokens_per_s, "tokens/s",
         f"{FLAGS.new_tokens} new tokens a row, {plan.chunk_steps} steps per call, time to first token "
         f"{stats.time_to_first_token_s:.2f} s with its compile")


def main():
  started = time.perf_counter()
  cli.setup_jax()
  device = jax.devices()[0]
  peak = platform.device_peak_flops(device)
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, python "
        f"{sys.version.split()[0]}", flush=True)
  if FLAGS.smoke:
    tiny = cli.gin_model_config([TINY_GIN])
    train_config, decode_configs = tiny.replace(compute_dtype="bfloat16", attention_impl="jax"), {"tiny": tiny}
    batch_size, seq_len, batches = 2, 64, (1, 4)
    attention_parity("jax", "reference", (1, 128, 2, 2, 16), window=32)
  else:
    train_config = cli.gin_model_config([TRAIN_GIN])
    batch_size, seq_len = gin.query_parameter("%BATCH_SIZE"), gin.query_parameter("%SEQ_LEN")
    decode_configs = {"smollm2_135m": cli.gin_model_config([SMOLLM2_GIN]), "1b": train_config}
    batches = (1, 64)
    attention_parity("cudnn", "jax", (2, 2048, 4, 8, 64), window=256)
  train_step(train_config, batch_size, seq_len, peak)
  for name, config in decode_configs.items():
    for batch in batches:
      decode(name, config, batch)
  figure("total time", time.perf_counter() - started, "s")


if __name__ == "__main__":
  cli.run(main)
