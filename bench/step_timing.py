"""What the train-step benches share: the random batch both sides of a comparison see, and the step timer."""

import sys
import time

from absl import app
import gin
import jax
import numpy as np

from llama_hk import cli
from llama_hk import train

DEFAULT_GIN_FILE = "gin/bench/train_34m.gin"


def run(main) -> None:
  """absl's app.run, with DEFAULT_GIN_FILE unless a --gin_file is given."""
  if not any(a.startswith("--gin_file") for a in sys.argv[1:]):
    sys.argv.append(f"--gin_file={DEFAULT_GIN_FILE}")
  app.run(main)


def bench_model():
  """(config, batch, params): the --gin_file's MODEL_CONFIG, a random batch of its BATCH_SIZE x SEQ_LEN, and
  freshly initialised float32 parameters."""
  config = cli.gin_model_config(cli.FLAGS.gin_file, cli.FLAGS.gin_bindings)
  batch = random_batch(config.vocab_size, gin.query_parameter("%BATCH_SIZE"), gin.query_parameter("%SEQ_LEN"))
  params = jax.device_get(train.init_state(config, train.make_optimizer(total_steps=10)).params)
  return config, batch, params


def random_batch(vocab_size: int, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
  """A training batch of uniform random tokens (seed 0), one document a row."""
  tokens = np.random.default_rng(0).integers(0, vocab_size, (batch_size, seq_len + 1)).astype(np.int32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1)),
          "segment_ids": np.ones((batch_size, seq_len), np.int32),
          "loss_mask": np.ones((batch_size, seq_len), np.float32)}


def seconds_per_step(step, state, batch, steps: int) -> float:
  """Mean seconds of `steps` calls of the jitted `(state, batch) -> (state, metrics)`, after two warm-up calls."""
  state, _ = timed_steps(step, state, batch, 2)
  return timed_steps(step, state, batch, steps)[1]


def timed_steps(step, state, batch, steps: int):
  """(the state after `steps` calls of the jitted `(state, batch) -> (state, metrics)`, their mean seconds)."""
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  return state, (time.perf_counter() - start) / steps
