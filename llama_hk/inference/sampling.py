"""Drawing the next token from logits: greedy, or temperature with top-k and top-p filtering.

Shape glossary: B batch, V vocab, C candidate tokens (V, or top_k).
"""

import dataclasses

import jax
import jax.numpy as jnp

from llama_hk.errors import UserError


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How each next token is drawn.

  temperature 0 is greedy (argmax). Otherwise, as transformers orders it: logits / temperature, keep the top_k
  most likely (0: all), then keep the most likely tokens whose probabilities sum to at least top_p (1: all),
  renormalize and draw. Hashable: it is a static argument of the compiled functions. (Top-p keeps every token
  tied with the last one kept, where a sort would keep some of them in an arbitrary order.)
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:  # Also catches NaN.
      raise UserError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p={self.top_p}: must be in (0, 1]")
    if self.top_k < 0:
      raise UserError(f"top_k={self.top_k}: must be >= 0 (0 keeps every token)")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def argmax(logits: jax.Array) -> jax.Array:
  """First index of the maximum, (B, V) -> (B,) int32, as two plain reductions: XLA:CPU runs jnp.argmax's variadic
  (value, index) reduction several times slower."""
  best = jnp.max(logits, axis=-1, keepdims=True)  # (B, 1)
  index = jnp.arange(logits.shape[-1], dtype=jnp.int32)  # (V,)
  return jnp.min(jnp.where(logits == best, index, logits.shape[-1]), axis=-1)  # (B,)


def top_p_threshold(probs: jax.Array, top_p: float) -> jax.Array:
  """The smallest probability kept by nucleus filtering, (B, C) -> (B, 1).

  That is p_m, where p_1 >= p_2 >= ... sorted and m is the first index whose cumulative sum reaches top_p. A
  bisection over the bit patterns of non-negative float32 (ordered like the floats) finds it exactly in 31
  masked sums, instead of a sort of the vocabulary, which XLA:CPU does about a hundred times slower.
  """
  bits = jax.lax.bitcast_convert_type(probs, jnp.int32)  # (B, C), non-negative floats order as their bits
  low = jnp.zeros(probs.shape[:-1] + (1,), jnp.int32)  # (B, 1): mass(p >= low) >= top_p always holds.
  high = jnp.max(bits, axis=-1, keepdims=True) + 1  # (B, 1): mass(p >= high) = 0 < top_p.

  def halve(_, bounds):
    low, high = bounds
    mid = low + (high - low) // 2  # (B, 1)
    enough = jnp.sum(jnp.where(bits >= mid, probs, 0), axis=-1, keepdims=True) >= top_p  # (B, 1)
    return jnp.where(enough, mid, low), jnp.where(enough, high, mid)

  low, _ = jax.lax.fori_loop(0, 31, halve, (low, high))
  return jax.lax.bitcast_convert_type(low, jnp.float32)  # (B, 1)


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """Next tokens (B,) int32 from float32 logits (B, V)."""
  if sampling.greedy:
    return argmax(logits)
  logits = logits / sampling.temperature  # (B, V)
  candidates = None
  if 0 < sampling.top_k < logits.shape[-1]:
    logits, candidates = jax.lax.top_k(logits, sampling.top_k)  # (B, C), (B, C)
  probs = jax.nn.softmax(logits, axis=-1)  # (B, C)
  if sampling.top_p < 1:
    probs = jnp.where(probs >= top_p_threshold(probs, sampling.top_p), probs, 0)  # (B, C)
  # Inverse CDF with one uniform per row (Gumbel-max would draw B * V of them, slow on CPU for a large vocab).
  cdf = jnp.cumsum(probs, axis=-1)  # (B, C)
  u = jax.random.uniform(key, cdf.shape[:-1] + (1,)) * cdf[:, -1:]  # (B, 1)
  index = jnp.arange(probs.shape[-1], dtype=jnp.int32)  # (C,)
  last_kept = jnp.max(jnp.where(probs > 0, index, 0), axis=-1)  # (B,): where rounding at u ~ 1 must stop.
  choice = jnp.minimum(jnp.sum(cdf <= u, axis=-1, dtype=jnp.int32), last_kept)  # (B,)
  if candidates is None:
    return choice
  return jnp.take_along_axis(candidates, choice[:, None], axis=-1)[:, 0]  # (B,)
