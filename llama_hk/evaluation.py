"""Perplexity and bits per byte, by the method of Hugging Face's perplexity guide with stride = window.

The token stream is cut into consecutive, non-overlapping windows of `max_seq_len` tokens; every token of a
window but its first is scored given the tokens before it in that window.
"""

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from llama_hk import model as model_lib
from llama_hk import sharding
from llama_hk.config import LlamaConfig
from llama_hk.errors import UserError


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood in float32: logits (B, T, V), targets (B, T) -> (B, T)."""
  logits = logits.astype(jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # (B, T)
  return jax.nn.logsumexp(logits, axis=-1) - target_logits  # (B, T)


@functools.partial(jax.jit, static_argnums=0)
def _window_nll(config: LlamaConfig, params, tokens, segment_ids):
  """Summed NLL and scored-token count of a batch of windows (B, T); segment 0 marks padding."""
  logits, _ = model_lib.make_forward(config).apply(params, tokens, segment_ids=segment_ids)  # (B, T, V)
  nll = token_nll(logits[:, :-1], tokens[:, 1:])  # (B, T-1)
  scored = (segment_ids[:, 1:] != 0) & (segment_ids[:, :-1] != 0)  # (B, T-1)
  return jnp.sum(jnp.where(scored, nll, 0.0)), jnp.sum(scored)


@functools.partial(jax.jit, static_argnums=0)
def _packed_nll(config: LlamaConfig, params, batch):
  """Summed NLL and count over `loss_mask` of a packed batch (tokens, positions, segment_ids, targets)."""
  logits, _ = model_lib.make_forward(config).apply(params, batch["tokens"], positions=batch["positions"],
                                                   segment_ids=batch["segment_ids"])  # (B, T, V)
  nll = token_nll(logits, batch["targets"])  # (B, T)
  return jnp.sum(nll * batch["loss_mask"]), jnp.sum(batch["loss_mask"])


def _put_batch(array: np.ndarray, mesh):
  """Host batch -> device array split over the mesh's batch axes (each process supplies its addressable part)."""
  if mesh is None:
    return array
  return jax.make_array_from_callback(array.shape, sharding.batch_sharding(mesh), lambda index: array[index])


def _local_value(x) -> np.ndarray:
  """A replicated result as NumPy, also when the mesh spans processes."""
  return np.asarray(x.addressable_data(0))


def windows(ids: list[int], max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, segment_ids), each (W, max_seq_len): the ids cut into windows, the last one padded."""
  count = math.ceil(len(ids) / max_seq_len)
  tokens = np.zeros((count * max_seq_len,), np.int32)
  tokens[:len(ids)] = ids
  segments = (np.arange(count * max_seq_len) < len(ids)).astype(np.int32)
  return tokens.reshape(count, max_seq_len), segments.reshape(count, max_seq_len)


def perplexity(config: LlamaConfig, params, ids: list[int], max_seq_len: int, batch_size: int = 1,
               num_bytes: int | None = None, source: str = "text", mesh=None) -> dict:
  """{"tokens", "nll", "perplexity", "bytes", "bits_per_byte"} of `ids` under the model.

  With a mesh, params are expected sharded on it and each batch is split over its data-parallel axes.
  """
  if max_seq_len < 2:
    raise UserError(f"--max_seq_len={max_seq_len}: must be at least 2")
  if max_seq_len > config.max_seq_len:
    raise UserError(f"--max_seq_len={max_seq_len}: exceeds the model's max_seq_len {config.max_seq_len}")
  if len(ids) < 2:
    raise UserError(f"{source}: too short to score ({len(ids)} tokens; need at least 2)")
  if mesh is not None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
      raise UserError(f"--batch_size={batch_size}: must be a multiple of the mesh's data x fsdp size {shards}")
  tokens, segments = windows(ids, max_seq_len)
  padding = -len(tokens) % batch_size  # Whole empty windows keep one compiled shape.
  tokens = np.concatenate([tokens, np.zeros((padding, max_seq_len), np.int32)])
  segments = np.concatenate([segments, np.zeros((padding, max_seq_len), np.int32)])
  total, count = 0.0, 0
  with sharding.axis_rules(mesh) if mesh is not None else contextlib.nullcontext():
    for start in range(0, len(tokens), batch_size):
      nll, scored = _window_nll(config, params, _put_batch(tokens[start:start + batch_size], mesh),
                                _put_batch(segments[start:start + batch_size], mesh))
      total += float(_local_value(nll))
      count += int(_local_value(scored))
  if count == 0:
    raise UserError(f"{source}: no token to score with --max_seq_len={max_seq_len}")
  result = {"tokens": count, "nll": total / count, "perplexity": math.exp(total / count)}
  if num_bytes is not None:
    result.update(bytes=num_bytes, bits_per_byte=total / math.log(2) / num_bytes)
  return result


def split_perplexity(config: LlamaConfig, params, batches, num_bytes: int, source: str = "split",
                     mesh=None) -> dict:
  """The same figures over packed batches of a dataset split (every document once, documents never mixed)."""
  total, count = 0.0, 0.0
  with sharding.axis_rules(mesh) if mesh is not None else contextlib.nullcontext():
    for batch in batches:
      nll, scored = _packed_nll(config, params, {k: _put_batch(v, mesh) for k, v in batch.items()})
      total += float(_local_value(nll))
      count += float(_local_value(scored))
  if count == 0:
    raise UserError(f"{source}: no token to score")
  return {"tokens": int(count), "nll": total / count, "perplexity": math.exp(total / count), "bytes": num_bytes,
          "bits_per_byte": total / math.log(2) / num_bytes}


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
