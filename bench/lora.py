#!/usr/bin/env python3
"""LoRA train-step time beside full fine-tuning's, on the model of gin/bench/train_34m.gin (or any --gin_file).

  python bench/lora.py [--steps=5] [--rank=8] [--base_weights=float32|bfloat16] [--gin_file=gin/bench/train_34m.gin]

Both run in one process, one after the other, on the same random tokens and base: full fine-tuning (gradients and
AdamW moments of every parameter) and LoRA of the seven projections (the base frozen). Prints ms/step, tokens/s and
train-state bytes of each, and their ratios.
"""


from absl import flags
import jax

from llama_hk import config as config_lib
from llama_hk import sharding
from llama_hk import train
from llama_hk.ops.lora import LoraConfig
import step_timing  # bench/step_timing.py, beside this script.

flags.DEFINE_integer("steps", 5, "Timed steps per side (after two warm-up steps).")
flags.DEFINE_integer("rank", 8, "LoRA rank.")
flags.DEFINE_enum("base_weights", "float32", ["float32", "bfloat16"], "The frozen base's dtype.")
FLAGS = flags.FLAGS


def bench(config, batch, params, lora) -> tuple[float, int]:
  """(seconds a step, train-state bytes)."""
  optimizer = train.make_optimizer(total_steps=100, schedule="constant")
  step = jax.jit(train.make_train_step(config, optimizer, lora=lora), donate_argnums=0)
  state = jax.device_put(train.init_state(config, optimizer, params=params, lora=lora))
  state_bytes = sharding.per_device_bytes(state, jax.tree.map(lambda x: x.sharding, state))
  return step_timing.seconds_per_step(step, state, batch, FLAGS.steps), state_bytes


def main(argv):
  del argv
  config, batch, params = step_timing.bench_model()
  batch_size, seq_len = batch["tokens"].shape
  lora = LoraConfig(rank=FLAGS.rank, base_weights=FLAGS.base_weights)
  full_seconds, full_bytes = bench(config, batch, params, None)
  lora_seconds, lora_bytes = bench(config, batch, params, lora)
  print(f"model: {config_lib.num_params(config):,} parameters, batch {batch_size} x {seq_len}, float32 compute, "
        f"{jax.devices()[0].device_kind}; LoRA rank {lora.rank} of {len(lora.targets)} projections, "
        f"{lora.base_weights} base")
  for name, seconds, state_bytes in (("full fine-tuning", full_seconds, full_bytes),
                                     ("LoRA", lora_seconds, lora_bytes)):
    print(f"{name:18s} {seconds * 1e3:8.1f} ms/step  {batch_size * seq_len / seconds:8.0f} tokens/s  "
          f"train state {state_bytes / 2**20:8.1f} MiB")
  print(f"LoRA / full: step time {lora_seconds / full_seconds:.2f}x, train state {lora_bytes / full_bytes:.3f}x")


if __name__ == "__main__":
  step_timing.run(main)
