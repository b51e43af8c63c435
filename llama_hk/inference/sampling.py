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


def _bisect_bits(bits: jax.Array, weights: jax.Array, target) -> jax.Array:
  """The largest bit pattern m with sum(weights where bits >= m) >= target, (B, C) -> (B, 1) int32.

  A bisection over the bit patterns of non-negative float32 (ordered like the floats) finds it exactly in 31
  masked sums, instead of a sort of the vocabulary, which XLA:CPU does about a hundred times slower.
  """
  low = jnp.zeros(bits.shape[:-1] + (1,), jnp.int32)  # (B, 1): mass(p >= low) >= target always holds.
  high = jnp.max(bits, axis=-1, keepdims=True) + 1  # (B, 1): mass(p >= high) = 0 < target.

  def halve(_, bounds):
    low, high = bounds
    mid = low + (high - low) // 2  # (B, 1)
    enough = jnp.sum(jnp.where(bits >= mid, weights, 0), axis=-1, keepdims=True) >= target  # (B, 1)
    return jnp.where(enough, mid, low), jnp.where(enough, high, mid)

  low, _ = jax.lax.fori_loop(0, 31, halve, (low, high))
  return low


def top_p_threshold(probs: jax.Array, top_p) -> jax.Array:
  """The smallest probability kept by nucleus filtering, (B, C) -> (B, 1); top_p a float or (B, 1).

  That is p_m, where p_1 >= p_2 >= ... sorted and m is the first index whose cumulative sum reaches top_p.
  """
  bits = jax.lax.bitcast_convert_type(probs, jnp.int32)  # (B, C), non-negative floats order as their bits
  return jax.lax.bitcast_convert_type(_bisect_bits(bits, probs, top_p), jnp.float32)  # (B, 1)


def top_k_threshold(probs: jax.Array, top_k: jax.Array) -> jax.Array:
  """The k-th largest probability of each row, (B, C) and (B, 1) int32 -> (B, 1): top-k filtering with a k per
  row (lax.top_k's k is static). Tokens tied with the k-th are all kept."""
  bits = jax.lax.bitcast_convert_type(probs, jnp.int32)  # (B, C)
  return jax.lax.bitcast_convert_type(_bisect_bits(bits, jnp.ones_like(probs), top_k), jnp.float32)  # (B, 1)


def scaled_logits(logits: jax.Array, temperature: jax.Array) -> jax.Array:
  """Logits (B, V) over each row's temperature (B,); a greedy row (0) keeps its logits as they are."""
  return logits / jnp.where(temperature > 0, temperature, 1)[:, None]  # (B, V)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
  """Next tokens (B,) int32 from float32 logits (B, V), each row with its own key and Sampling fields (B,).

  The same order as `sample` (temperature, top-k, top-p over the renormalized top-k, inverse CDF), with rows of
  temperature 0 taking the argmax, so that a row's token depends only on its own logits, key and fields.
  """
  probs = jax.nn.softmax(scaled_logits(logits, temperature), axis=-1)  # (B, V)
  kth = top_k_threshold(probs, top_k[:, None])  # (B, 1)
  probs = jnp.where((top_k[:, None] <= 0) | (probs >= kth), probs, 0)  # (B, V)
  probs = probs / jnp.sum(probs, axis=-1, keepdims=True)  # (B, V)
  kept = top_p_threshold(probs, top_p[:, None])  # (B, 1)
  probs = jnp.where((top_p[:, None] >= 1) | (probs >= kept), probs, 0)  # (B, V)
  choice = _draw(probs, jax.vmap(jax.random.uniform)(keys)[:, None])  # (B,)
  return jnp.where(temperature > 0, choice, argmax(logits))  # (B,)


def _draw(probs: jax.Array, uniform: jax.Array) -> jax.Array:
  """Indices (B,) drawn from unnormalized probs (B, C) by inverse CDF with one uniform (B, 1) per row (Gumbel-max
  would draw B * C of them, slow on CPU for a large vocab)."""
  cdf = jnp.cumsum(probs, axis=-1)  # (B, C)
  u = uniform * cdf[:, -1:]  # (B, 1)
  index = jnp.arange(probs.shape[-1], dtype=jnp.int32)  # (C,)
  last_kept = jnp.max(jnp.where(probs > 0, index, 0), axis=-1)  # (B,): where rounding at u ~ 1 must stop.
  return jnp.minimum(jnp.sum(cdf <= u, axis=-1, dtype=jnp.int32), last_kept)  # (B,)


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
  choice = _draw(probs, jax.random.uniform(key, probs.shape[:-1] + (1,)))  # (B,)
  if candidates is None:
    return choice
  return jnp.take_along_axis(candidates, choice[:, None], axis=-1)[:, 0]  # (B,)
