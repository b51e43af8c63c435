#!/usr/bin/env python3
"""One side of a before/after comparison of two trees: llama_hk's train step and SmolLM2 decode, no peers.

Run once per tree and round, the tree first on PYTHONPATH, alternating trees round by round (bench/before_after.sh),
so that a change of the machine's load skews both alike. The train step is bench/train.py's JAX side (the 34M model
of gin/bench/train_34m.gin, 8 x 256 tokens, AdamW, best of 5 steps), its layers in a scan, as every tree runs them
(LlamaConfig.unroll_layers is newer than some); decode and prefill are bench/generate.py's own
`measure` of the tree under test (float32, best of 5). It reads only what both trees have (llama_hk.training or
llama_hk.train), so a tree from before the architecture split runs it too.

  PYTHONPATH=TREE python bench/before_after.py train|decode OUT.json
"""

import json
import pathlib
import sys
import time

import jax
import numpy as np

import llama_hk
from llama_hk.config import LlamaConfig

TREE = pathlib.Path(llama_hk.__file__).resolve().parents[1]


def train_tokens_per_s() -> float:
  try:
    from llama_hk import train as training
  except ImportError:  # Before the split.
    from llama_hk import training
  config = LlamaConfig(vocab_size=8192, d_model=512, num_layers=8, num_heads=8, num_kv_heads=8, d_ff=1408,
                       max_seq_len=256)
  tokens = np.random.default_rng(0).integers(0, 8192, (8, 257)).astype(np.int32)
  ones = np.ones((8, 256), np.int32)
  batch = dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], positions=np.cumsum(ones, axis=1) - 1,
               segment_ids=ones, loss_mask=ones.astype(np.float32))
  optimizer = training.make_optimizer(total_steps=100, schedule="constant", clip_norm=None, peak_learning_rate=3e-4,
                                      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
  step = jax.jit(training.make_train_step(config, optimizer), donate_argnums=0)
  state = training.init_state(config, optimizer)
  times = []
  for i in range(7):  # Two warm-up steps, five timed.
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return 8 * 256 / min(times[2:])


def decode_rates() -> dict[str, float]:
  sys.path.insert(0, str(TREE / "bench"))
  import generate  # The tree's own bench/generate.py.
  try:
    from llama_hk.tokenizers.tokenizer import Tokenizer
  except ImportError:  # Before the split.
    from llama_hk.tokenizer import Tokenizer
  hf_dir = generate.smollm2_hf_dir()
  tokenizer = Tokenizer.from_dir(hf_dir)
  prompt, long_prompt = tokenizer.encode(generate.PROMPT), generate.long_prompt_ids(tokenizer.encode, 512)
  runners = {"llama_hk": (generate.llama_hk_runner(hf_dir), (1, 8), True)}
  return generate.measure(runners, prompt, long_prompt, 64, 5)["llama_hk"]


def main():
  mode, out = sys.argv[1:3]
  result = {"train_tokens_per_s": train_tokens_per_s()} if mode == "train" else decode_rates()
  result["tree"] = str(TREE)
  print(json.dumps(result))
  pathlib.Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
  main()
