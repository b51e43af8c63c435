#!/usr/bin/env python3
"""Train-step throughput, llama_hk against transformers + torch.optim.AdamW, on the model of gin/bench/train_34m.gin.

  python bench/train.py [--rounds=5] [--steps=5] [--gin_file=gin/bench/train_34m.gin]

Both sides run the same config (float32, AdamW with the same hyper-parameters and decay mask, a full step:
forward, backward, update) on the same random tokens in one process. Each side is built and warmed up once; then
every round times --steps steps of ours, then of torch, then of ours with bfloat16 compute, and a float32 matmul
peak (JAX, 2048^2), so that the shared machine's load changes skew all alike. Prints every round, then the medians:
tokens/s of each, the median of the rounds' ratios, MFU of each against the median peak, and the machine.

Each side's turn in a round starts with one untimed step, so that the rounds time steady training, which a real
run is: both sides allocate their temporaries afresh at every step, and on a virtual machine the first step after
a pause of a few seconds (the other sides' turns) touches memory the host has taken back meanwhile, which costs
that step seconds (README, performance) that steps run back to back do not pay.

The process runs as bin/train does, with glibc's huge-page tunable (llama_hk/huge_pages.py), torch included; run
with GLIBC_TUNABLES=glibc.malloc.hugetlb=0 to see both sides without it.

Targets (issue 11): ratio >= 1.0x, our float32 MFU >= 80% of the peak measured in the same run.
"""

import os
import resource
import statistics
import time

from llama_hk import huge_pages

huge_pages.reexec()  # As bin/train runs (both sides of the comparison get it): before JAX or torch allocate.

from absl import flags
import jax
import numpy as np

from llama_hk import config as config_lib
from llama_hk import platform
from llama_hk import train
from llama_hk.params import params_to_hf
import machine  # bench/machine.py, beside this script.
import step_timing  # bench/step_timing.py, beside this script.

flags.DEFINE_integer("rounds", 5, "Interleaved rounds; the medians over them count.")
flags.DEFINE_integer("steps", 5, "Timed steps per side and round (after two warm-up steps once per side, and one "
                     "untimed step per side and round).")
FLAGS = flags.FLAGS
HYPER = dict(peak_learning_rate=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
# A pause before each measurement, so that the last side's worker threads (torch's OpenMP team, XLA's pool) have
# stopped spinning and sleep when the next side starts.
PAUSE_SECONDS = 1.0


def jax_runner(config, batch, params):
  """run(steps) -> seconds per step of our jitted, donated train step; built and warmed up here."""
  optimizer = train.make_optimizer(total_steps=100, schedule="constant", clip_norm=None, **HYPER)
  step = jax.jit(train.make_train_step(config, optimizer), donate_argnums=0)
  state, _ = step_timing.timed_steps(step, train.init_state(config, optimizer, params=params), batch, 2)  # Warm-up.

  def run(steps):
    nonlocal state
    state, seconds = step_timing.timed_steps(step, state, batch, steps)
    return seconds

  return run


def torch_runner(config, batch, state_dict):
  """run(steps) -> seconds per step of transformers' model with torch.optim.AdamW; built and warmed up here."""
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

  def run(steps):
    start = time.perf_counter()
    for _ in range(steps):
      step()
    return (time.perf_counter() - start) / steps

  run(2)
  return run


def page_faults() -> int:
  """This process's minor page faults so far (fresh memory touched: XLA's per-call temporaries among them)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv):
  del argv
  config, batch, params = step_timing.bench_model()
  batch_size, seq_len = batch["tokens"].shape
  tokens_per_step = batch_size * seq_len
  runners = {
      "llama_hk": jax_runner(config, batch, params),
      "transformers": torch_runner(config, batch, params_to_hf(params, config)),
      "llama_hk_bf16": jax_runner(config.replace(compute_dtype="bfloat16"), batch, params),
  }
  import torch
  print(machine.describe())
  print(f"model: {config_lib.num_params(config):,} parameters, batch {batch_size} x {seq_len}, AdamW; "
        f"{FLAGS.rounds} rounds of {FLAGS.steps} steps per side; torch threads {torch.get_num_threads()}; "
        f"transparent huge pages: {huge_pages.thp_mode()}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
  rates = {name: [] for name in runners}
  faults = {name: [] for name in runners}
  peaks = []
  for r in range(FLAGS.rounds):
    for name, run in runners.items():
      time.sleep(PAUSE_SECONDS)
      run(1)  # Untimed: see the module docstring.
      before = page_faults()
      rates[name].append(tokens_per_step / run(FLAGS.steps))
      faults[name].append((page_faults() - before) / FLAGS.steps)
    peaks.append(platform.measure_matmul_peak(size=2048, seconds=1.0))
    mfu = lambda name: train.mfu(config, seq_len, rates[name][-1], peaks[-1])
    print(f"round {r + 1}: llama_hk {rates['llama_hk'][-1]:6.0f} tokens/s (MFU {mfu('llama_hk'):.1%}), "
          f"transformers {rates['transformers'][-1]:6.0f} ({mfu('transformers'):.1%}), "
          f"ratio {rates['llama_hk'][-1] / rates['transformers'][-1]:.2f}x; bfloat16 compute "
          f"{rates['llama_hk_bf16'][-1]:6.0f}; peak {peaks[-1] / 1e9:.1f} GFLOP/s; page faults per step "
          f"{faults['llama_hk'][-1]:,.0f} / {faults['transformers'][-1]:,.0f}", flush=True)
  peak = statistics.median(peaks)
  print(f"medians of {FLAGS.rounds} rounds; float32 matmul peak {peak / 1e9:.1f} GFLOP/s "
        f"(rounds {min(peaks) / 1e9:.1f}-{max(peaks) / 1e9:.1f})")
  labels = {"llama_hk": "llama_hk (JAX) float32", "transformers": "transformers (torch) float32",
            "llama_hk_bf16": "llama_hk bfloat16 compute"}
  for name, label in labels.items():
    rate = statistics.median(rates[name])
    print(f"{label:30s} {rate:7.0f} tokens/s  {tokens_per_step / rate * 1e3:7.1f} ms/step  "
          f"MFU {train.mfu(config, seq_len, rate, peak):.1%} (of the float32 peak)  "
          f"page faults/step {statistics.median(faults[name]):,.0f}")
  ratios = [ours / theirs for ours, theirs in zip(rates["llama_hk"], rates["transformers"])]
  print(f"ratio llama_hk / transformers: {statistics.median(ratios):.2f}x (median; rounds "
        f"{' '.join(f'{x:.2f}' for x in ratios)}); target >= 1.0x, MFU >= 80%")


if __name__ == "__main__":
  step_timing.run(main)
