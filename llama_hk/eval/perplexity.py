"""Perplexity and bits per byte: of a token stream by the method of Hugging Face's perplexity guide with stride =
window, and of the packed batches of a dataset split.

A token stream is cut into consecutive, non-overlapping windows of `max_seq_len` tokens; every token of a window
but its first is scored given the tokens before it in that window. Windows become batches of the training format
(`llama_hk.data.batch`), so both are scored by the training eval step (`train.step.make_eval_step`: the summed
NLL of `masked_losses` over `loss_mask`) and reported with the one `bits_per_byte`.
"""

import functools
import math
from typing import Iterable, Iterator

import jax
import numpy as np

from llama_hk import platform, sharding
from llama_hk.config import LlamaConfig
from llama_hk.data.batch import empty_batch
from llama_hk.errors import UserError
from llama_hk.ops.lora import LoraConfig
from llama_hk.train.metrics import bits_per_byte
from llama_hk.train.step import make_eval_step


def windows(ids: list[int], max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, segment_ids), each (W, max_seq_len): the ids cut into windows, the last one padded."""
  count = math.ceil(len(ids) / max_seq_len)
  tokens = np.zeros((count * max_seq_len,), np.int32)
  tokens[:len(ids)] = ids
  segments = (np.arange(count * max_seq_len) < len(ids)).astype(np.int32)
  return tokens.reshape(count, max_seq_len), segments.reshape(count, max_seq_len)


def window_batches(ids: list[int], max_seq_len: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """The windows of `ids` as training-format batches of `batch_size` rows; whole empty windows pad the last batch
  (nothing scored there), so every batch has one compiled shape."""
  all_tokens, all_segments = windows(ids, max_seq_len)  # (W, T)
  for start in range(0, len(all_tokens), batch_size):
    tokens, segments = all_tokens[start:start + batch_size], all_segments[start:start + batch_size]
    scored = (segments[:, 1:] != 0) & (segments[:, :-1] != 0)  # (b, T-1): a token and its target both text.
    batch, rows = empty_batch(batch_size, max_seq_len), len(tokens)
    batch["tokens"][:rows] = tokens
    batch["segment_ids"][:rows] = segments
    batch["positions"][:rows] = np.arange(max_seq_len, dtype=np.int32)
    batch["targets"][:rows, :-1] = np.where(scored, tokens[:, 1:], 0)
    batch["loss_mask"][:rows, :-1] = scored
    yield batch


@functools.lru_cache(maxsize=None)
def _eval_step(config: LlamaConfig, lora: LoraConfig | None):
  return jax.jit(make_eval_step(config, lora))


def _local_value(x) -> np.ndarray:
  """A replicated result as NumPy, also when the mesh spans processes."""
  return np.asarray(x.addressable_data(0))


def score(config: LlamaConfig, params, batches: Iterable[dict[str, np.ndarray]], mesh=None,
          lora: LoraConfig | None = None) -> tuple[float, float]:
  """(summed NLL in nats, scored tokens) over host batches, the same in every process; with a mesh, params are
  expected sharded on it and each batch is split over its batch axes. With `lora`, params hold the adapter beside
  the base (ops.lora.combine)."""
  step = _eval_step(config, lora)
  params = platform.inference_params(config, params)
  batch_sharding = None if mesh is None else sharding.batch_sharding(mesh)
  total, count = 0.0, 0.0
  with sharding.axis_rules(mesh):
    for batch in batches:
      nll, scored = step(params, {key: sharding.put_global(value, batch_sharding) for key, value in batch.items()})
      total += float(_local_value(nll))
      count += float(_local_value(scored))
  return total, count


def _figures(total: float, count: float, num_bytes: int | None) -> dict:
  result = {"tokens": int(count), "nll": total / count, "perplexity": math.exp(total / count)}
  if num_bytes is not None:
    result.update(bytes=num_bytes, bits_per_byte=bits_per_byte(total, num_bytes))
  return result


def perplexity(config: LlamaConfig, params, ids: list[int], max_seq_len: int, batch_size: int | None = None,
               num_bytes: int | None = None, source: str = "text", mesh=None, lora: LoraConfig | None = None) -> dict:
  """{"tokens", "nll", "perplexity"} of `ids` under the model, with {"bytes", "bits_per_byte"} given `num_bytes`.

  `batch_size` windows go through each forward pass; None: the smallest batch the mesh splits evenly
  (sharding.batch_multiple), padded with empty windows that cost compute but score nothing.
  """
  if max_seq_len < 2:
    raise UserError(f"--max_seq_len={max_seq_len}: must be at least 2")
  if max_seq_len > config.max_seq_len:
    raise UserError(f"--max_seq_len={max_seq_len}: exceeds the model's max_seq_len {config.max_seq_len}")
  if len(ids) < 2:
    raise UserError(f"{source}: too short to score ({len(ids)} tokens; need at least 2)")
  shards = sharding.batch_multiple(mesh)
  batch_size = shards if batch_size is None else batch_size
  if batch_size % shards:
    raise UserError(f"--batch_size={batch_size}: must be a multiple of the mesh's data x fsdp size {shards}")
  total, count = score(config, params, window_batches(ids, max_seq_len, batch_size), mesh, lora)
  if count == 0:
    raise UserError(f"{source}: no token to score with --max_seq_len={max_seq_len}")
  return _figures(total, count, num_bytes)


def split_perplexity(config: LlamaConfig, params, batches: Iterable[dict[str, np.ndarray]], num_bytes: int,
                     source: str = "split", mesh=None, lora: LoraConfig | None = None) -> dict:
  """The same figures over packed batches of a dataset split (every document once, documents never mixed)."""
  total, count = score(config, params, batches, mesh, lora)
  if count == 0:
    raise UserError(f"{source}: no token to score")
  return _figures(total, count, num_bytes)


def read_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    raise UserError(f"{path}: no such file") from None
  except UnicodeDecodeError as e:
    raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
  except OSError as e:
    raise UserError(f"{path}: cannot read ({e.strerror})") from None
  if not text.strip():
    raise UserError(f"{path}: empty text file")
  return text
