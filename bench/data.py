"""Tokens per second delivered by the full input pipeline (TFDS shakespeare -> grain -> packed batches).

Prepares the shakespeare dataset and trains a tokenizer (unless --tokenizer_dir is given) in a temporary directory,
then times --batches batches after one warm-up batch. Prints the rate of row tokens (B * T a batch), of tokens that
carry a loss, and of raw tokenization alone for reference, all on this machine's cores.
"""

import argparse
import pathlib
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds

from llama_hk.data import pipeline
from llama_hk.data import sources
from llama_hk.data import tokenizer_training
from llama_hk.tokenizer import Tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--shakespeare_dir", default=str(REPO.parent / "shared" / "data" / "shakespeare"))
  parser.add_argument("--tokenizer_dir", default=None, help="Default: train an 8000-piece tokenizer first.")
  parser.add_argument("--seq_len", type=int, default=2048)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--batches", type=int, default=100)
  parser.add_argument("--read_threads", type=int, default=1)
  args = parser.parse_args()

  tfds.disable_progress_bar()
  with tempfile.TemporaryDirectory() as tmp:
    train = sources.shakespeare("train", str(pathlib.Path(tmp) / "tfds"), source_dir=args.shakespeare_dir)
    tokenizer_dir = args.tokenizer_dir or tokenizer_training.train_tokenizer(
        train, pathlib.Path(tmp) / "tokenizer", vocab_size=8000)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)

    texts = list(train)
    start = time.perf_counter()
    tokenized = sum(len(tokenizer.encode(text)) for text in texts)
    encode_rate = tokenized / (time.perf_counter() - start)

    iterator = pipeline.make_pipeline(train, tokenizer, args.seq_len, args.batch_size, seed=0, process_index=0,
                                      process_count=1, read_threads=args.read_threads)
    next(iterator)  # Warm-up: threads start, the first packing bins fill.
    start = time.perf_counter()
    loss_tokens = 0
    for _ in range(args.batches):
      loss_tokens += int(np.sum(next(iterator)["loss_mask"]))
    elapsed = time.perf_counter() - start
    iterator.close()  # Stops the prefetch thread before the interpreter exits.

  row_tokens = args.batches * args.batch_size * args.seq_len
  print(f"pipeline: {row_tokens / elapsed:,.0f} tokens/s in rows ({args.batches} batches of "
        f"{args.batch_size}x{args.seq_len} in {elapsed:.2f}s), {loss_tokens / elapsed:,.0f} loss tokens/s "
        f"({1 - loss_tokens / row_tokens:.1%} padding or untrained)")
  print(f"tokenization alone: {encode_rate:,.0f} tokens/s ({tokenized:,} tokens, {len(texts)} works)")


if __name__ == "__main__":
  main()
