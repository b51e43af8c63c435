#!/usr/bin/env python3
"""Train-step throughput, llama_hk against transformers + torch.optim.AdamW, on the model of gin/bench/train_34m.gin.

  python bench/train.py [--steps=5] [--gin_file=gin/bench/train_34m.gin]

Both sides run the same config (float32, AdamW with the same hyper-parameters and decay mask, a full step:
forward, backward, update) on the same random tokens in one process, one after the other. Prints tokens/s of each,
their ratio, and MFU of each against a float32 matmul peak measured in this run (JAX, 2048^2).
"""

import time

from absl import flags
import jax
import numpy as np

from llama_hk import config as config_lib
from llama_hk import platform
from llama_hk import train
from llama_hk.params import params_to_hf
import step_timing  # bench/step_timing.py, beside this script.

flags.DEFINE_integer("steps", 5, "Timed steps per side (after two warm-up steps).")
FLAGS = flags.FLAGS
HYPER = dict(peak_learning_rate=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)


def bench_jax(config, batch, params) -> float:
  optimizer = train.make_optimizer(total_steps=100, schedule="constant", clip_norm=None, **HYPER)
  step = jax.jit(train.make_train_step(config, optimizer), donate_argnums=0)
  state = train.init_state(config, optimizer, params=params)
  return step_timing.seconds_per_step(step, state, batch, FLAGS.steps)


def bench_torch(config, batch, state_dict) -> float:
  import torch
  import transformers
  hf_config = transformers.LlamaConfig(**{k: v for k, v in config_lib.to_hf_config(config).items()
                                          if k not in ("architectures", "dtype")})
  model = transformers.LlamaForCausalLM(hf_config).float().train()
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()})
  no_decay = lambda name: name.endswith("norm.weight") or "embed_tokens" in name
  groups = [{"params": [p for n, p in model.named_parameters() if not no_decay(n)],
             "weight_decay": HYPER["weight_decay"]},
            {"params": [p for n, p in model.named_parameters() if no_decay(n)], "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=HYPER["peak_learning_rate"], betas=(HYPER["b1"], HYPER["b2"]), eps=HYPER["eps"])
  tokens = torch.from_numpy(batch["tokens"]).long()
  targets = torch.from_numpy(batch["targets"]).long()

  def step():
    logits = model(tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  for _ in range(2):
    step()
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    step()
  return (time.perf_counter() - start) / FLAGS.steps


def main(argv):
  del argv
  config, batch, params = step_timing.bench_model()
  batch_size, seq_len = batch["tokens"].shape
  state_dict = params_to_hf(params, config)
  peak = platform.measure_matmul_peak(size=2048, seconds=2.0)
  flops_per_step = train.flops_per_token(config, seq_len) * batch_size * seq_len
  jax_seconds = bench_jax(config, batch, params)
  torch_seconds = bench_torch(config, batch, state_dict)
  tokens_per_step = batch_size * seq_len
  print(f"model: {config_lib.num_params(config):,} parameters, batch {batch_size} x {seq_len}, float32, "
        f"{jax.devices()[0].device_kind}; matmul peak {peak / 1e9:.1f} GFLOP/s")
  for name, seconds in (("llama_hk (JAX)", jax_seconds), ("transformers (torch)", torch_seconds)):
    print(f"{name:22s} {tokens_per_step / seconds:9.0f} tokens/s  {seconds * 1e3:8.1f} ms/step  "
          f"MFU {flops_per_step / seconds / peak:.1%}")
  print(f"ratio llama_hk / transformers: {torch_seconds / jax_seconds:.2f}x")


if __name__ == "__main__":
  step_timing.run(main)
