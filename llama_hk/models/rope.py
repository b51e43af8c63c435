"""Rotary position embeddings (RoPE) in Hugging Face's rotate-half layout, with linear, llama3 or per-frequency
(a GGUF's rope_freqs) scaling.

Frequency i rotates the pair (i, i + K/2) of a head, not the adjacent pair (2i, 2i + 1) of Meta's original code.
llama.cpp's GGUF files store Q and K rows permuted to the adjacent layout; the GGUF import undoes that.
"""

import jax
import jax.numpy as jnp
import numpy as np

from llama_hk.config import LlamaConfig
from llama_hk.errors import UserError


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies (K/2,), computed in float32 as transformers does, with the config's scaling."""
  k = config.head_dim
  inv_freq = (1.0 / (np.float32(config.rope_theta) ** (np.arange(0, k, 2, dtype=np.float32) / np.float32(k))))
  inv_freq = inv_freq.astype(np.float32)  # (K/2,)
  if config.rope_scaling == "linear":
    inv_freq = inv_freq / np.float32(config.rope_scaling_factor)
  elif config.rope_scaling == "llama3":
    factor = np.float32(config.rope_scaling_factor)
    low, high = np.float32(config.rope_low_freq_factor), np.float32(config.rope_high_freq_factor)
    old_len = np.float32(config.rope_original_max_len)
    wavelen = np.float32(2 * np.pi) / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    inv_freq = np.where(is_medium, smoothed, scaled).astype(np.float32)
  if config.rope_freq_factors is not None:  # llama.cpp divides each frequency by its factor.
    inv_freq = (inv_freq / np.asarray(config.rope_freq_factors, np.float32)).astype(np.float32)  # (K/2,)
  return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates x (B, T, heads, K) by its positions (B, T) in the rotate-half layout."""
  angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # (B, T, K/2)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # (B, T, 1, K)
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)  # (B, T, 1, K)
  x1, x2 = jnp.split(x, 2, axis=-1)  # (B, T, heads, K/2) each
  rotated = jnp.concatenate([-x2, x1], axis=-1)  # (B, T, heads, K)
  return x * cos + rotated * sin  # (B, T, heads, K)


def as_llama3(config: LlamaConfig) -> LlamaConfig:
  """A config with per-frequency factors (a GGUF's rope_freqs) as the llama3 scaling they encode, for formats that
  have no per-frequency form (HF's config.json): Meta's constants (low 1, high 4, the original context 8192) and
  the largest factor, when those give the same frequencies (within 1e-6); else UserError."""
  if config.rope_freq_factors is None:
    return config
  llama3 = config.replace(rope_freq_factors=None, rope_scaling="llama3", rope_scaling_factor=max(config.rope_freq_factors),
                          rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192)
  if config.rope_scaling != "none" or not np.allclose(rope_frequencies(llama3), rope_frequencies(config), rtol=1e-6,
                                                       atol=0):
    raise UserError("the model's per-frequency RoPE factors (rope_freqs) do not follow llama3 scaling with Meta's "
                    "constants, and HF config.json has no other form for them")
  return llama3
