"""The decode loop: padded batches, the prefill and decode-chunk functions (jitted) and the host loop that feeds them.

Static shapes, one compile per bucket: the batch is padded to a power of two, the prompt to a power of two (then
a multiple of 512), and the cache to the bucket of prompt + max_new_tokens, not to the model's max_seq_len,
since every decode step reads the whole cache. JAX's persistent compilation cache (turned on by the binaries)
keeps those compiles across runs.

Prompts of different lengths are right-padded with segment id 0 in the prefill, so each row's cache stays
contiguous, its positions count from 0 and its decode steps write at the row's own end. The prefill runs on a
cache of just the prompt's length, padded to the full length afterwards, and computes the head's logits at each
row's last prompt token only.

A decode chunk is a jitted function that runs up to `chunk_steps` steps in a `lax.while_loop` and donates its
state (the cache above all). `decode_chunks` dispatches the next call before it reads the last call's tokens, so
the device does not wait while the host streams tokens, detokenizes and checks stop strings.

With a `sharding.DecodeLayout`, the rows lie over the data-parallel axes that divide the batch and the cache's
heads over `tensor`; sampled tokens come back replicated, so that every process of a multi-host run reads the
same ones and takes the same steps.

Shape glossary: B batch, T prompt time, S cache length, V vocab, P stop-id slots.
"""

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llama_hk import sharding
from llama_hk.config import LlamaConfig
from llama_hk.inference.sampling import Sampling, sample
from llama_hk.models import KVCache, init_cache, make_forward, pad_cache
from llama_hk.ops.dense import WeightLayout

MIN_BUCKET = 16  # The shortest padded prompt or cache.
LINEAR_BUCKETS_FROM = 512  # Beyond this, buckets grow in steps of 512 rather than doubling.
MIN_STOP_SLOTS = 8  # Stop ids are padded (with -1) to a power of two at least this long: one compile serves them.
NO_TOKEN = -1  # A decode chunk's output for a row that was already done.


class DecodeState(NamedTuple):
  """What the decode loop carries from one jitted call to the next (donated to each)."""
  cache: KVCache
  tokens: jax.Array  # (B,) int32: each row's last sampled token, the next step's input.
  done: jax.Array  # (B,) bool: the row sampled a stop id (or is batch padding).
  step: jax.Array  # () int32: tokens sampled so far in every row.
  key: jax.Array  # Sampling key; the k-th token of every row is drawn with fold_in(key, k).


def _power_of_two(n: int) -> int:
  """The smallest power of two >= n (1 for n <= 1)."""
  return 1 << (max(n, 1) - 1).bit_length()


def batch_bucket(rows: int) -> int:
  """The rows a batch of `rows` prompts is padded to: a power of two."""
  return _power_of_two(rows)


def bucket(n: int) -> int:
  """The padded length for n tokens: a power of two from 16 up to 512, then a multiple of 512."""
  if n <= LINEAR_BUCKETS_FROM:
    return max(MIN_BUCKET, _power_of_two(n))
  return -(-n // LINEAR_BUCKETS_FROM) * LINEAR_BUCKETS_FROM


def cache_shape(rows: int, tokens: int) -> tuple[int, int]:
  """The KV cache's (batch rows, slots) for `rows` prompts whose longest, with its new tokens, has `tokens`.

  `cache_shape(max_batch, config.max_seq_len)` is the largest any call can allocate (what a dry run reports).
  """
  return batch_bucket(rows), bucket(tokens)


def padded_stop_ids(stop_ids: Sequence[int]) -> np.ndarray:
  """Stop ids (P,) int32, padded with -1 to a power of two of at least MIN_STOP_SLOTS: one compile serves them."""
  stops = np.full((_power_of_two(max(len(stop_ids), MIN_STOP_SLOTS)),), -1, np.int32)  # (P,)
  stops[:len(stop_ids)] = stop_ids
  return stops


@dataclasses.dataclass(frozen=True)
class PaddedBatch:
  """A group of prompts as the prefill takes them: right-padded to the buckets, batch padding of length 0."""
  tokens: np.ndarray  # (B, T) int32
  lengths: np.ndarray  # (B,) int32: 0 marks batch padding.
  stop_ids: np.ndarray  # (P,) int32, padded with -1.
  cache_len: int  # S

  @classmethod
  def build(cls, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int]) -> "PaddedBatch":
    longest = max(len(p) for p in prompts)
    batch, cache_len = cache_shape(len(prompts), longest + max_new_tokens)
    tokens = np.zeros((batch, bucket(longest)), np.int32)  # (B, T), right-padded
    lengths = np.zeros((batch,), np.int32)  # (B,)
    for i, prompt in enumerate(prompts):
      tokens[i, :len(prompt)] = prompt
      lengths[i] = len(prompt)
    return cls(tokens, lengths, padded_stop_ids(stop_ids), cache_len)

  @property
  def batch(self) -> int:
    return self.tokens.shape[0]


def prefill_logits(params, tokens, lengths, config: LlamaConfig, cache_len: int,
                   layout: sharding.DecodeLayout | None = None):
  """Runs the prompts (B, T), right-padded, into a fresh cache, returned with cache_len slots.

  Returns each row's logits (B, V) at its last prompt token (lengths - 1) and the cache, whose end_index is then
  each row's length: padding takes segment id 0, so it neither moves the end nor is attended to. The pass runs
  on a cache of T slots, grown afterwards: attention over all cache_len slots would cost cache_len / T times more.
  """
  b, t = tokens.shape
  segment_ids = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.int32)  # (B, T)
  last = jnp.maximum(lengths - 1, 0)  # (B,)
  with _axis_rules(layout):
    logits, cache = make_forward(config).apply(params, tokens, segment_ids=segment_ids,
                                               cache=init_cache(config, b, t), logits_at=last)  # (B, 1, V)
  return logits[:, 0], pad_cache(cache, cache_len)


def step_logits(params, tokens, cache: KVCache, config: LlamaConfig, weight_layout: WeightLayout = WeightLayout(),
                layout: sharding.DecodeLayout | None = None):
  """One decode step: each row's token (B,) at the row's cache end, from params stored in `weight_layout`.

  Returns logits (B, V) and the cache.
  """
  with _axis_rules(layout):
    logits, cache = make_forward(config, layout=weight_layout).apply(params, tokens[:, None], cache=cache)  # (B, 1, V)
  return logits[:, 0], cache


def _axis_rules(layout: sharding.DecodeLayout | None):
  """The model's activation constraints for `layout` (none without one)."""
  return sharding.axis_rules(layout.mesh, layout.rules()) if layout else sharding.axis_rules(None)


def _pin(tree, layout: sharding.DecodeLayout | None):
  """Outputs laid out as `layout` says: one layout in and out of every call, so that a donated state is reused in
  place and nothing compiles twice, and sampled tokens replicated, readable by every process."""
  if layout is None:
    return tree
  cache, replicated = layout.cache_sharding(), layout.sharding()

  def place(x):
    if isinstance(x, KVCache):
      return KVCache(jax.lax.with_sharding_constraint(x.k, cache), jax.lax.with_sharding_constraint(x.v, cache),
                     jax.lax.with_sharding_constraint(x.end_index, replicated))
    return jax.lax.with_sharding_constraint(x, replicated)

  return jax.tree.map(place, tree, is_leaf=lambda x: isinstance(x, KVCache))


@functools.partial(jax.jit, static_argnames=("config", "sampling", "cache_len", "layout"))
def prefill(params, tokens, lengths, stop_ids, key, *, config: LlamaConfig, sampling: Sampling, cache_len: int,
            layout: sharding.DecodeLayout | None = None) -> DecodeState:
  """The prompts into a fresh cache (params in the stored layout); samples each row's first token."""
  logits, cache = prefill_logits(params, tokens, lengths, config, cache_len, layout)  # (B, V)
  first = sample(logits, jax.random.fold_in(key, 0), sampling)  # (B,)
  done = jnp.isin(first, stop_ids) | (lengths == 0)  # (B,)
  return _pin(DecodeState(cache, first, done, jnp.int32(1), key), layout)


@functools.partial(jax.jit, static_argnames=("config", "sampling", "chunk_steps", "weight_layout", "layout"),
                   donate_argnames=("state",))
def decode_chunk(params, state: DecodeState, stop_ids, max_steps, *, config: LlamaConfig, sampling: Sampling,
                 chunk_steps: int, weight_layout: WeightLayout = WeightLayout(),
                 layout: sharding.DecodeLayout | None = None):
  """Up to chunk_steps decode steps, fewer once every row is done or max_steps tokens are out.

  Returns the new state, the tokens (B, chunk_steps) (NO_TOKEN for rows already done) and how many steps ran.
  """
  def should_continue(carry):
    i, s, _ = carry
    return (i < chunk_steps) & (s.step < max_steps) & ~jnp.all(s.done)

  def step(carry):
    i, s, out = carry
    logits, cache = step_logits(params, s.tokens, s.cache, config, weight_layout, layout)  # (B, V)
    tokens = sample(logits, jax.random.fold_in(s.key, s.step), sampling)  # (B,)
    out = out.at[:, i].set(jnp.where(s.done, NO_TOKEN, tokens))  # (B, chunk_steps)
    return i + 1, DecodeState(cache, tokens, s.done | jnp.isin(tokens, stop_ids), s.step + 1, s.key), out

  out = jnp.full((state.tokens.shape[0], chunk_steps), NO_TOKEN, jnp.int32)  # (B, chunk_steps)
  steps, state, out = jax.lax.while_loop(should_continue, step, (jnp.int32(0), state, out))
  return _pin((state, out, steps), layout)


class Chunk(NamedTuple):
  """Tokens that reached the host, and when."""
  tokens: np.ndarray  # (B, n) int32, NO_TOKEN where a row had none.
  received_at: float  # time.perf_counter() once they were read.


def decode_chunks(state: DecodeState, decode: Callable[[DecodeState], tuple], max_new_tokens: int,
                  chunk_steps: int) -> Iterator[Chunk]:
  """The prefill's first tokens (n = 1), then each decode call's, until max_new_tokens or every row is done.

  `decode(state) -> (state, tokens, steps)` is `decode_chunk` with its other arguments bound. The next call is
  dispatched before this one's tokens are read (and before they are yielded), so the device keeps working while
  the consumer handles them; a consumer that stops early (every row ended on the host) drops the call in flight.
  """
  first = np.asarray(state.tokens)  # Waits for the prefill only; read before `state` is donated.
  first_at = time.perf_counter()
  pending = decode(state) if max_new_tokens > 1 else None
  yield Chunk(first[:, None], first_at)
  steps = 1
  while pending is not None:
    state, out, ran = pending
    pending = decode(state) if steps + chunk_steps < max_new_tokens else None
    ran = int(ran)
    if ran == 0:
      return
    yield Chunk(np.asarray(out)[:, :ran], time.perf_counter())
    steps += ran
