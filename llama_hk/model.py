"""The LLaMA decoder in Haiku.

Shape glossary:
  B batch, T query time, S key time (the cache length, or T without a cache), D d_model,
  N query heads, G key-value heads, H query heads per key-value head (N // G), K head dim,
  F d_ff, V vocab, L layers, M rows (B x T flattened).

RoPE uses Hugging Face's rotate-half layout: frequency i rotates the pair (i, i + K/2) of a head, not the
adjacent pair (2i, 2i + 1) of Meta's original code. llama.cpp's GGUF files store Q and K rows permuted to the
adjacent layout; `llama_hk.convert` undoes that on import.

Parameter tree (every leaf under `decoder` has a leading L axis; the layers run in a `scan`, so compile time
does not grow with depth):
  embedding/embeddings                                    (V, D)
  decoder/input_norm/scale                                (L, D)
  decoder/attention/{q_proj, k_proj, v_proj, out_proj}    (L, D, N, K), (L, D, G, K), (L, D, G, K), (L, N, K, D)
  decoder/post_attn_norm/scale                            (L, D)
  decoder/mlp/{gate_proj, up_proj, down_proj}             (L, D, F), (L, D, F), (L, F, D)
  norm/scale                                              (D,)
  lm_head/w                                               (D, V), absent with tied embeddings
`transpose_weights` gives each matrix weight as a flat (out, in) matrix (a layout for batch-1 decoding on CPU).

Numerics: parameters are stored in `param_dtype` and cast to `compute_dtype` where used; RMSNorm statistics,
attention logits and softmax, and the output logits are float32 whatever the compute dtype.
"""

import contextvars
import math
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from llama_hk.config import LlamaConfig
from llama_hk import sharding

_INIT_STDDEV = 0.02  # Hugging Face's `initializer_range` for LLaMA.
_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class KVCache(NamedTuple):
  """Keys and values of every layer, written at `end_index` (per row) by each forward pass.

  Heads come before slots so that attention reads each layer's (B, G, S, K) block without a transpose.
  """
  k: jax.Array  # (L, B, G, S, K)
  v: jax.Array  # (L, B, G, S, K)
  end_index: jax.Array  # (B,) int32: slots filled so far in each row.


def init_cache(config: LlamaConfig, batch: int, length: int) -> KVCache:
  shape = (config.num_layers, batch, config.num_kv_heads, length, config.head_dim)  # (L, B, G, S, K)
  # Two buffers, not one shared: a caller may donate both.
  return KVCache(k=jnp.zeros(shape, config.compute_dtype), v=jnp.zeros(shape, config.compute_dtype),
                 end_index=jnp.zeros((batch,), jnp.int32))


def pad_cache(cache: KVCache, length: int) -> KVCache:
  """The cache with empty slots appended up to `length`: a prefill can run on a cache just long enough for the
  prompt (attention then reads T slots, not S) and hand its cache to decode steps with room to grow."""
  pad = [(0, 0), (0, 0), (0, 0), (0, length - cache.k.shape[3]), (0, 0)]
  return cache._replace(k=jnp.pad(cache.k, pad), v=jnp.pad(cache.v, pad))  # (L, B, G, S, K) x 2


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies (K/2,), computed in float32 as transformers does, with linear or llama3 scaling."""
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
  return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates x (B, T, heads, K) by its positions (B, T) in the rotate-half layout."""
  angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # (B, T, K/2)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # (B, T, 1, K)
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)  # (B, T, 1, K)
  x1, x2 = jnp.split(x, 2, axis=-1)  # (B, T, heads, K/2) each
  rotated = jnp.concatenate([-x2, x1], axis=-1)  # (B, T, heads, K)
  return x * cos + rotated * sin  # (B, T, heads, K)


def _param(name, shape, config: LlamaConfig, init=None):
  init = init or hk.initializers.TruncatedNormal(_INIT_STDDEV)
  return hk.get_parameter(name, shape, config.param_dtype, init=init).astype(config.compute_dtype)


# Matrix weights by (module, name): how many leading axes a matmul contracts.
_MATMUL_WEIGHTS = {("decoder/attention", "q_proj"): 1, ("decoder/attention", "k_proj"): 1,
                   ("decoder/attention", "v_proj"): 1, ("decoder/attention", "out_proj"): 2,
                   ("decoder/mlp", "gate_proj"): 1, ("decoder/mlp", "up_proj"): 1, ("decoder/mlp", "down_proj"): 1,
                   ("lm_head", "w"): 1}
_TRANSPOSED = "_transposed"  # The name suffix of a weight stored by `transpose_weights`.
_weights_transposed = contextvars.ContextVar("weights_transposed", default=False)


def transpose_weights(params) -> dict:
  """The parameters with each matrix weight stored as one (out, in) matrix, its contracted axes flattened last
  (a (L, out, in) stack in the decoder), renamed `{name}_transposed`; `make_forward`'s `apply` takes either form
  and computes the same function.

  For batch-1 decoding on XLA:CPU. There a matrix-vector product whose weight is contracted over its minor axes
  compiles to a loop that streams the weight straight out of the stacked (L, ...) array, the layer scan's slice
  fused in. In the stored layout it is a matrix-library call, which needs the slice copied out of the stack
  first: every weight is read, written and read again per token. (Flat matrices: a contracted axis split in two
  would cost that loop an integer division per element.) Matrix-matrix products (prefills, batches) are faster
  in the stored layout.
  """
  out = {}
  for module, leaves in params.items():
    out[module] = {}
    for name, value in leaves.items():
      contracted = _MATMUL_WEIGHTS.get((module, name))
      if contracted is None:
        out[module][name] = value
        continue
      stacked = 1 if module.startswith("decoder/") else 0  # The layer axis stays first.
      n_in = math.prod(value.shape[stacked:stacked + contracted])
      matrix = value.reshape(*value.shape[:stacked], n_in, -1)  # ([L,] in, out)
      out[module][name + _TRANSPOSED] = jnp.swapaxes(matrix, -1, -2)  # ([L,] out, in)
  return out


def _dense(x, name, in_shape, out_shape, config: LlamaConfig, library_call: bool = False, **einsum_kwargs):
  """x (..., *in_shape) times the weight `name` (*in_shape, *out_shape): (..., *out_shape).

  One 2-D matrix product over the flattened axes: contracting several axes, XLA may match the activations' layout
  by transposing the weight (a copy of it per call); and with (B, T) kept as two row axes, XLA:CPU lays out the
  backward pass's products with transposing copies that cost a train step a quarter of its time. From
  `transpose_weights`' parameters the weight is stored as an (out, in) matrix. Taken as an (in, out) transpose,
  XLA:CPU streams it in a loop split over the threads (see `transpose_weights`); with `library_call`, taken as
  is, XLA copies the layer's slice out and calls its matrix-vector routine instead (see Attention).
  """
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  lead = x.shape[:x.ndim - len(in_shape)]
  x = x.reshape(math.prod(lead), n_in)  # (M, in)
  if _weights_transposed.get():
    w = _param(name + _TRANSPOSED, [n_out, n_in], config)  # (out, in)
    if library_call:
      y = jnp.einsum("MI,OI->MO", x, w, **einsum_kwargs)  # (M, out)
    else:
      y = jnp.einsum("MI,IO->MO", x, w.T, **einsum_kwargs)  # (M, out)
  else:
    w = _param(name, [*in_shape, *out_shape], config).reshape(n_in, n_out)  # (in, out)
    y = jnp.einsum("MI,IO->MO", x, w, **einsum_kwargs)  # (M, out)
  return y.reshape(*lead, *out_shape)


class RMSNorm(hk.Module):
  """x / rms(x) * scale, the statistics in float32."""

  def __init__(self, config: LlamaConfig, name: str | None = None):
    super().__init__(name=name)
    self.config = config

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = hk.get_parameter("scale", [x.shape[-1]], self.config.param_dtype, init=jnp.ones)  # (D,)
    x32 = x.astype(jnp.float32)  # (B, T, D)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.norm_eps)  # (B, T, D)
    return (scale.astype(jnp.float32) * normed.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


def attention_mask(positions_q, segment_ids, cache_end=None, cache_len=None):
  """Which keys each query sees: (B, T, S) booleans.

  Without a cache: causal within a segment (packed documents and padding, segment 0, never mix).
  With a cache: slots up to the query's own slot, since a cached row is one contiguous sequence.
  """
  if cache_end is None:
    t = segment_ids.shape[1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]  # (T, S)
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, S)
    return causal[None] & same_segment
  query_slots = cache_end[:, None] + jnp.arange(positions_q.shape[1])[None, :]  # (B, T)
  return jnp.arange(cache_len)[None, None, :] <= query_slots[:, :, None]  # (B, T, S)


def _causal_self_attention(q, key, value, mask):
  """Attention without a cache (training, evaluation): q (B, T, G, H, K), key and value (B, T, G, K), mask
  (B, T, T) causal. Returns (B, T, G, H, K).

  The queries of the sequence's first half see only its first half of keys, so the halves are computed apart and
  the masked quarter of the T x T logits never is. The softmax's division moves after the product with the values,
  to (T, K) numbers instead of (T, S). Together, on 2 CPU cores, the attention's forward and backward in 8 layers
  (B 8, T 256, 8 heads) take 291 ms instead of 474.
  """
  t = q.shape[1]
  if t % 2 or t < 128:
    return _attend_unnormalized(q, key, value, mask)
  half = t // 2
  first = _attend_unnormalized(q[:, :half], key[:, :half], value[:, :half], mask[:, :half, :half])
  second = _attend_unnormalized(q[:, half:], key, value, mask[:, half:])
  return jnp.concatenate([first, second], axis=1)  # (B, T, G, H, K)


def _attend_unnormalized(q, key, value, mask):
  """q (B, T, G, H, K), key and value (B, S, G, K), mask (B, T, S): (B, T, G, H, K), normalized last."""
  k = q.shape[-1]
  q = q.transpose(0, 2, 3, 1, 4)  # (B, G, H, T, K)
  key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)  # (B, G, S, K) x 2
  logits = jnp.einsum("BGHTK,BGSK->BGHTS", q, key, preferred_element_type=jnp.float32) * (k ** -0.5)
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)  # (B, G, H, T, S)
  # Shifting by the row maximum changes no value or gradient, so the shift needs none of its own.
  weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))  # (B, G, H, T, S)
  out = jnp.einsum("BGHTS,BGSK->BGHTK", weights.astype(value.dtype), value)  # (B, G, H, T, K)
  out = out / jnp.sum(weights, axis=-1, keepdims=True)  # (B, G, H, T, K)
  return out.astype(value.dtype).transpose(0, 3, 1, 2, 4)  # (B, T, G, H, K)


def _cached_attention(q, key, value, mask):
  """q (B, T, G, H, K) against a layer's cache: key and value (B, G, S, K), mask (B, T, S). Returns
  (B, T, G, H, K)."""
  t, k = q.shape[1], q.shape[-1]
  if t > 1:
    # q first: the logits come out (B, G, H, T, S), where jnp.einsum's order (keys first) has XLA transpose all
    # T x S of them for the mask and softmax (a seventh of a 512-token prefill). A decode step keeps that order,
    # in which the keys are read as they lie (q first would transpose the cached keys each layer).
    logits = jax.lax.dot_general(q.transpose(0, 2, 3, 1, 4), key, (((4,), (3,)), ((0, 1), (0, 1))),
                                 preferred_element_type=jnp.float32)  # (B, G, H, T, S)
  else:
    logits = jnp.einsum("BTGHK,BGSK->BGHTS", q, key, preferred_element_type=jnp.float32)  # (B, G, H, 1, S)
  logits = logits * (k ** -0.5)
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)  # (B, G, H, T, S)
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)  # (B, G, H, T, S)
  # probs first: the product comes out (B, G, H, T, K), which in a decode step (T = 1) is (B, T, N, K) already.
  # (jnp.einsum puts `value` first, which transposes the cached values each layer, and then the out-projection
  # reads its input permuted.)
  out = jax.lax.dot_general(probs, value, (((4,), (2,)), ((0, 1), (0, 1))))  # (B, G, H, T, K)
  return out.transpose(0, 3, 1, 2, 4)  # (B, T, G, H, K)


class Attention(hk.Module):
  """Grouped-query attention: G key-value heads shared by H = N / G query heads each (MHA: G = N; MQA: G = 1)."""

  def __init__(self, config: LlamaConfig, name: str | None = None):
    super().__init__(name=name)
    self.config = config

  def __call__(self, x, positions, mask, cache_kv=None, cache_end=None):
    """x (B, T, D); mask (B, T, S); cache_kv: (k (L, B, G, S, K), v (L, B, G, S, K), this layer's index) or None."""
    c = self.config
    d, n, g, k = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
    q = _dense(x, "q_proj", [d], [n, k], c)  # (B, T, N, K)
    key = _dense(x, "k_proj", [d], [g, k], c)  # (B, T, G, K)
    value = _dense(x, "v_proj", [d], [g, k], c)  # (B, T, G, K)
    inv_freq = rope_frequencies(c)
    q = apply_rope(q, positions, inv_freq)  # (B, T, N, K)
    key = apply_rope(key, positions, inv_freq)  # (B, T, G, K)
    b, t = x.shape[:2]
    q = q.reshape(b, t, g, n // g, k)  # (B, T, G, H, K)
    if cache_kv is None:
      out = _causal_self_attention(q, key, value, mask).reshape(b, t, n, k)  # (B, T, N, K)
    else:
      cache_k, cache_v, layer = cache_kv
      rows = jnp.arange(b)[:, None]  # (B, 1)
      slots = cache_end[:, None] + jnp.arange(t)[None, :]  # (B, T)
      # In place, this layer's new slots only.
      cache_k = cache_k.at[layer, rows, :, slots].set(key.astype(cache_k.dtype), mode="drop")  # (L, B, G, S, K)
      cache_v = cache_v.at[layer, rows, :, slots].set(value.astype(cache_v.dtype), mode="drop")  # (L, B, G, S, K)
      cache_kv = (cache_k, cache_v, layer + 1)
      out = _cached_attention(q, cache_k[layer], cache_v[layer], mask).reshape(b, t, n, k)  # (B, T, N, K)
    # A library call in a batch-1 decode on XLA:CPU: after the attention above, a run of small single-threaded
    # steps, the streaming loop split over the threads waits for an idle one to wake up (measured on 2 cores:
    # 23 ms a step with the loop, 19 ms with a copy of the slice and the library call).
    out = _dense(out, "out_proj", [n, k], [d], c, library_call=True)  # (B, T, D)
    return out, cache_kv


class MLP(hk.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: LlamaConfig, name: str | None = None):
    super().__init__(name=name)
    self.config = config

  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    gate = _dense(x, "gate_proj", [c.d_model], [c.d_ff], c)  # (B, T, F)
    up = _dense(x, "up_proj", [c.d_model], [c.d_ff], c)  # (B, T, F)
    hidden = sharding.constrain(jax.nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))  # (B, T, F)
    return _dense(hidden, "down_proj", [c.d_ff], [c.d_model], c)  # (B, T, D)


class DecoderBlock(hk.Module):
  """Pre-norm residual block: attention then MLP. Transparent, so its parameters sit under `decoder/`."""

  def __init__(self, config: LlamaConfig, name: str | None = None):
    super().__init__(name=name)
    self.config = config

  @hk.transparent
  def __call__(self, x, positions, mask, cache_kv=None, cache_end=None):
    attn_out, cache_kv = Attention(self.config, name="attention")(
        RMSNorm(self.config, name="input_norm")(x), positions, mask, cache_kv, cache_end)
    x = x + attn_out  # (B, T, D)
    x = x + MLP(self.config, name="mlp")(RMSNorm(self.config, name="post_attn_norm")(x))  # (B, T, D)
    return sharding.constrain(x, ("act_batch", "act_length", "act_embed")), cache_kv


def make_forward(config: LlamaConfig) -> hk.Transformed:
  """The transformed model: `init(rng, tokens)`, `apply(params, tokens, positions, segment_ids, cache)`.

  `apply` also takes the parameters of `transpose_weights` (any `*_transposed` name selects that form).
  """
  transformed = hk.without_apply_rng(hk.transform(lambda *args, **kwargs: Llama(config)(*args, **kwargs)))

  def apply(params, *args, **kwargs):
    transposed = any(name.endswith(_TRANSPOSED) for leaves in params.values() for name in leaves)
    token = _weights_transposed.set(transposed)
    try:
      return transformed.apply(params, *args, **kwargs)
    finally:
      _weights_transposed.reset(token)

  return hk.Transformed(transformed.init, apply)


class Llama(hk.Module):
  """Tokens to float32 logits, optionally reading and extending a KV cache."""

  def __init__(self, config: LlamaConfig):
    super().__init__(name=None)
    self.config = config

  @hk.transparent
  def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None, logits_at=None):
    """tokens, positions, segment_ids: (B, T) int32. Returns logits (B, T, V) and the extended cache (or None).

    segment_ids: packed documents carry 1, 2, ...; padding carries 0. With a cache, the row's padding must
    come last: its cache end advances by the row's non-padding tokens only.
    logits_at: (B,) int32, or None: return only the logits (B, 1, V) at this time index of each row (a prefill
    needs just its last prompt position's, and the full (B, T, V) would cost T times the head's work).
    """
    c = self.config
    b, t = tokens.shape
    if positions is None:
      base = jnp.zeros((b,), jnp.int32) if cache is None else cache.end_index
      positions = base[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # (B, T)
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)  # (B, T)
    with hk.name_scope("embedding"):
      embeddings = hk.get_parameter("embeddings", [c.vocab_size, c.d_model], c.param_dtype,
                                    init=hk.initializers.TruncatedNormal(_INIT_STDDEV))  # (V, D)
    x = jnp.take(embeddings, tokens, axis=0).astype(c.compute_dtype)  # (B, T, D)
    x = sharding.constrain(x, ("act_batch", "act_length", "act_embed"))
    cache_end = None if cache is None else cache.end_index
    mask = attention_mask(positions, segment_ids, cache_end, None if cache is None else cache.k.shape[3])

    def block(x):
      return DecoderBlock(c)(x, positions, mask)[0]

    def cached_block(carry):
      x, cache_kv = DecoderBlock(c)(carry[0], positions, mask, carry[1:], cache_end)
      return (x, *cache_kv)

    policy = _REMAT_POLICIES[c.remat_policy]
    if policy is not None:
      block = hk.remat(block, policy=policy)
    if cache is None:
      x = hk.layer_stack(c.num_layers, name="decoder")(block)(x)  # (B, T, D)
      new_cache = None
    else:
      # The whole cache rides in the scan's carry, updated in place: passing per-layer slices in and out as
      # scanned inputs and outputs would copy the entire cache at every decode step.
      x, k, v, _ = hk.layer_stack(c.num_layers, name="decoder")(cached_block)(
          (x, cache.k, cache.v, jnp.int32(0)))  # (B, T, D), (L, B, G, S, K) x 2
      new_cache = KVCache(k=k, v=v, end_index=cache.end_index + jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32))
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)  # (B, 1, D)
    x = RMSNorm(c, name="norm")(x)  # (B, T, D)
    if c.tie_embeddings:
      # As the transpose of (V, D), which XLA:CPU streams in a batch-1 decode (see `transpose_weights`).
      rows = x.reshape(-1, c.d_model)  # (M, D): one row axis, as in `_dense`
      logits = jnp.einsum("MD,DV->MV", rows, embeddings.astype(c.compute_dtype).T,
                          preferred_element_type=jnp.float32).reshape(*x.shape[:2], -1)  # (B, T, V)
    else:
      with hk.name_scope("lm_head"):
        logits = _dense(x, "w", [c.d_model], [c.vocab_size], c, preferred_element_type=jnp.float32)  # (B, T, V)
    return logits, new_cache
