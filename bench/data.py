"""Tokens per second delivered by the full input pipeline (TFDS shakespeare -> grain -> packed batches), beside the
tokens per second that the train step of a gin config consumes on this machine.

  python bench/data.py [--gin_file=gin/tiny.gin] [--batches=200] [--train_steps=10]

Prepares the shakespeare dataset and trains a tokenizer of the model's vocab_size (unless --tokenizer_dir is given)
in a temporary directory, then times --batches pipeline batches after one warm-up batch, and --train_steps jitted
train steps (llama_hk.train, AdamW, after two warm-up steps) on pipeline batches. Batch shape: the gin file's
BATCH_SIZE x SEQ_LEN unless given. Prints both rates of row tokens (B * T a batch) and their ratio: how many times
over the pipeline could feed the step. Also the rate of tokens that carry a loss and of tokenization alone.
"""

import argparse
import pathlib
import tempfile
import time

import gin
import jax
import numpy as np
import tensorflow_datasets as tfds

from llama_hk import cli
from llama_hk.data import pipeline
from llama_hk.data import sources
from llama_hk.tokenizers import train_spm
from llama_hk.tokenizers.tokenizer import Tokenizer
from llama_hk.train import init_state, make_optimizer, make_train_step

REPO = pathlib.Path(__file__).resolve().parents[1]


def train_step_seconds(config, batches: list[dict], steps: int) -> float:
  """Seconds per jitted train step of `config` on `batches` (cycled), after two warm-up steps."""
  optimizer = make_optimizer(total_steps=steps + 2)
  step = jax.jit(make_train_step(config, optimizer), donate_argnums=0)
  state = init_state(config, optimizer)
  for batch in batches[:2]:
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = step(state, batches[i % len(batches)])
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", default="gin/tiny.gin", help="The training config: model, SEQ_LEN, BATCH_SIZE.")
  parser.add_argument("--shakespeare_dir", default=str(REPO.parent / "shared" / "data" / "shakespeare"))
  parser.add_argument("--tokenizer_dir", default=None, help="Default: train one of the model's vocab_size first.")
  parser.add_argument("--seq_len", type=int, default=None, help="Default: the gin file's SEQ_LEN.")
  parser.add_argument("--batch_size", type=int, default=None, help="Default: the gin file's BATCH_SIZE.")
  parser.add_argument("--batches", type=int, default=200)
  parser.add_argument("--train_steps", type=int, default=10)
  parser.add_argument("--read_threads", type=int, default=1)
  args = parser.parse_args()

  config = cli.gin_model_config([args.gin_file]).replace(param_dtype="float32")
  seq_len = args.seq_len or gin.query_parameter("%SEQ_LEN")
  batch_size = args.batch_size or gin.query_parameter("%BATCH_SIZE")

  tfds.disable_progress_bar()
  with tempfile.TemporaryDirectory() as tmp:
    train = sources.shakespeare("train", str(pathlib.Path(tmp) / "tfds"), source_dir=args.shakespeare_dir)
    tokenizer_dir = args.tokenizer_dir or train_spm.train_tokenizer(
        train, pathlib.Path(tmp) / "tokenizer", vocab_size=config.vocab_size)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)

    texts = list(train)
    start = time.perf_counter()
    tokenized = sum(len(tokenizer.encode(text)) for text in texts)
    encode_rate = tokenized / (time.perf_counter() - start)

    iterator = pipeline.make_pipeline(train, tokenizer, seq_len, batch_size, seed=0, process_index=0,
                                      process_count=1, read_threads=args.read_threads)
    next(iterator)  # Warm-up: threads start, the first packing bins fill.
    start = time.perf_counter()
    batches = [next(iterator) for _ in range(args.batches)]
    elapsed = time.perf_counter() - start
    iterator.close()  # Stops the prefetch thread before the interpreter exits.

  loss_tokens = sum(int(np.sum(batch["loss_mask"])) for batch in batches)
  row_tokens = args.batches * batch_size * seq_len
  pipeline_rate = row_tokens / elapsed
  step_seconds = train_step_seconds(config, batches, args.train_steps)
  train_rate = batch_size * seq_len / step_seconds
  print(f"pipeline: {pipeline_rate:,.0f} tokens/s in rows ({args.batches} batches of {batch_size}x{seq_len} in "
        f"{elapsed:.2f}s, read_threads={args.read_threads}), {loss_tokens / elapsed:,.0f} loss tokens/s "
        f"({1 - loss_tokens / row_tokens:.1%} padding or untrained)")
  print(f"train step ({args.gin_file}, {jax.devices()[0].device_kind} x{jax.device_count()}): {train_rate:,.0f} "
        f"tokens/s ({step_seconds * 1e3:.1f} ms/step over {args.train_steps} steps)")
  print(f"pipeline / train step: {pipeline_rate / train_rate:.1f}x")
  print(f"tokenization alone: {encode_rate:,.0f} tokens/s ({tokenized:,} tokens, {len(texts)} works)")


if __name__ == "__main__":
  main()
