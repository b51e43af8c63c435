"""Attention behind one entry point, `attend`, whose implementation is a static name: the plain reference and the
faster kernels, each tested against it (tests/test_ops.py).

Shapes: q (B, T, G, H, K): T queries in G key-value groups of H heads. The mask says which keys each query sees:
(B, T, S) booleans, True where a query sees a key, or, for self-attention without a cache, a `Mask`: the same
mask as its structure (segment ids, causality, window), which the fused kernels need instead of booleans. Keys and
values are (B, S, G, K) as projected, except for "cached", which reads a layer of the KV cache where they lie,
heads first: (B, G, S, K). Every implementation returns (B, T, G, H, K), computes the logits and the softmax in
float32, and scales the logits by 1 / sqrt(K).

Implementations (IMPLS); each honours segment ids (packing, padding), a sliding window and branches, except where
said:
  reference         softmax(q k^T / sqrt(K), masked) v, as written.
  split_causal      training and evaluation without a cache: causal query blocks apart, the softmax normalized last.
  cached            prefill and decode steps over a KV cache, operand orders chosen for the cache's layout.
  jax               jax.nn.dot_product_attention's XLA implementation, with the arguments "cudnn" passes.
  cudnn             jax.nn.dot_product_attention's cuDNN kernel: GPU only (`platform.check_attention_impl`),
                    bfloat16 or float16 only (LlamaConfig).
  splash            TPU splash attention (Pallas): TPU only; no branches.
  splash_interpret  splash attention in Pallas's interpreter, on any backend (tests).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

# The split-causal kernel cuts sequences at least this long into SPLIT_BLOCKS query blocks (or 2, or none where
# the length divides by neither); shorter ones attend in one block, where the blocks would save too little to pay
# for the extra products.
SPLIT_MIN_LENGTH = 128
SPLIT_BLOCKS = 4


def attention_mask(segment_ids: jax.Array, cache_end: jax.Array | None = None, cache_len: int | None = None,
                   window: int | None = None, branch_ids: jax.Array | None = None) -> jax.Array:
  """Which keys each query sees: (B, T, S) booleans, from segment_ids (B, T).

  Without a cache: causal within a segment (packed documents and padding, segment 0, never mix). branch_ids (B,
  T), without a cache only, lets a segment hold one prefix and several continuations of it: a query of branch j >
  0 sees the segment's branch-0 keys and its own branch's, never another branch's (a scorer's choices after one
  shared context).
  With a cache (cache_end (B,), cache_len S): slots up to the query's own slot, since a cached row is one
  contiguous sequence.
  A sliding `window` (Mistral's, as transformers means it) keeps only the `window` most recent of those keys, the
  query's own included; None adds nothing to the mask.
  """
  t = segment_ids.shape[1]
  if cache_end is None:
    queries, keys = jnp.arange(t)[:, None], jnp.arange(t)[None, :]  # (T, 1), (1, S)
    causal = queries >= keys  # (T, S)
    if window is not None:
      causal &= keys > queries - window  # (T, S)
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, S)
    if branch_ids is not None:
      same_segment &= (branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :])  # (B, T, S)
    return causal[None] & same_segment
  query_slots = cache_end[:, None] + jnp.arange(t)[None, :]  # (B, T)
  slots = jnp.arange(cache_len)[None, None, :]  # (1, 1, S)
  mask = slots <= query_slots[:, :, None]  # (B, T, S)
  if window is not None:
    mask &= slots > query_slots[:, :, None] - window  # (B, T, S)
  return mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
  """Self-attention's mask without a cache, as its structure: causal within each row's segments, within an optional
  window, with optional branches (`attention_mask` says what each means).

  The fused kernels (READS_STRUCTURE) build their masks from the structure, as cuDNN and splash need; every other
  kernel reads `dense()`. unsegmented (static) says every row is one document without padding (segment_ids all 1),
  so that the fused kernels read no segment ids.
  """
  segment_ids: jax.Array  # (B, T)
  branch_ids: jax.Array | None = None  # (B, T)
  window: int | None = dataclasses.field(default=None, metadata={"static": True})
  unsegmented: bool = dataclasses.field(default=False, metadata={"static": True})

  def dense(self) -> jax.Array:
    """The (B, T, S) booleans."""
    return attention_mask(self.segment_ids, window=self.window, branch_ids=self.branch_ids)


def self_attention_mask(impl: str, segment_ids: jax.Array, window: int | None = None,
                        branch_ids: jax.Array | None = None, unsegmented: bool = False) -> "jax.Array | Mask":
  """What `attend(..., impl)` reads without a cache: the Mask for the fused kernels, its dense booleans for the others
  (built here once, outside the layers' loop)."""
  mask = Mask(segment_ids, branch_ids, window, unsegmented)
  return mask if impl in READS_STRUCTURE else mask.dense()


def _reference(q, key, value, mask):
  """The definition: q (B, T, G, H, K), key and value (B, S, G, K)."""
  logits = jnp.einsum("BTGHK,BSGK->BGHTS", q, key, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)  # (B, G, H, T, S)
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)  # (B, G, H, T, S)
  return jnp.einsum("BGHTS,BSGK->BTGHK", probs, value)  # (B, T, G, H, K)


def _split_causal(q, key, value, mask):
  """Self-attention of a causal mask (B, T, T): q (B, T, G, H, K), key and value (B, T, G, K).

  The queries are cut into SPLIT_BLOCKS blocks (2 where T is not a multiple of 4), each over the keys up to its
  own end only, so that the masked upper triangle of blocks is never computed (4 blocks: 10/16 of the T x T
  logits). The operands are put heads first and q scaled once, outside the blocks.
  """
  b, t, g, h, k = q.shape
  blocks = next((n for n in (SPLIT_BLOCKS, 2) if t % n == 0), 1) if t >= SPLIT_MIN_LENGTH else 1
  q = (q * jnp.asarray(k ** -0.5, q.dtype)).transpose(0, 2, 3, 1, 4)  # (B, G, H, T, K)
  key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)  # (B, G, S, K) x 2
  size = t // blocks
  out = jnp.concatenate([
      _attend_unnormalized(q[:, :, :, i * size:(i + 1) * size], key[:, :, :(i + 1) * size],
                           value[:, :, :(i + 1) * size], mask[:, i * size:(i + 1) * size, :(i + 1) * size])
      for i in range(blocks)], axis=3)  # (B, G, H, T, K)
  return out.transpose(0, 3, 1, 2, 4)  # (B, T, G, H, K)


@jax.custom_vjp
def _attend_unnormalized(q, key, value, mask):
  """Heads first: q (B, G, H, T, K), already scaled by 1 / sqrt(K), key and value (B, G, S, K), mask (B, T, S):
  (B, G, H, T, K).

  The softmax's division moves after the product with the values, to (T, K) numbers instead of (T, S). The
  gradient is written out (`_attend_unnormalized_bwd`) rather than derived: autodiff would pass back through the
  division, the exponential and the mask one (T, S) array at a time.
  """
  return _attend_unnormalized_fwd(q, key, value, mask)[0]


def _attend_unnormalized_fwd(q, key, value, mask):
  """The output and what the gradient reads: the operands, the unnormalized weights, their row sums, the output."""
  logits = jnp.einsum("BGHTK,BGSK->BGHTS", q, key, preferred_element_type=jnp.float32)  # (B, G, H, T, S)
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)  # (B, G, H, T, S)
  weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # (B, G, H, T, S)
  sums = jnp.sum(weights, axis=-1, keepdims=True)  # (B, G, H, T, 1)
  out = jnp.einsum("BGHTS,BGSK->BGHTK", weights.astype(value.dtype), value,
                   preferred_element_type=jnp.float32) / sums  # (B, G, H, T, K)
  return out.astype(value.dtype), (q, key, value, weights, sums, out)


def _attend_unnormalized_bwd(residuals, d_out):
  """Softmax attention's gradient with P = weights / sums, out = P v: dv = P^T d_out, dP = d_out v^T,
  dlogits = P (dP - rowsum(d_out * out)), dq = dlogits k, dk = dlogits^T q; d_out is divided by the sums first,
  which puts every division on (T, K) numbers. Masked logits have zero weight, hence zero gradient."""
  q, key, value, weights, sums, out = residuals
  d_scaled = d_out.astype(jnp.float32) / sums  # (B, G, H, T, K)
  d_value = jnp.einsum("BGHTS,BGHTK->BGSK", weights.astype(value.dtype), d_scaled.astype(value.dtype),
                       preferred_element_type=jnp.float32)  # (B, G, S, K)
  d_weights = jnp.einsum("BGHTK,BGSK->BGHTS", d_scaled.astype(value.dtype), value,
                         preferred_element_type=jnp.float32)  # (B, G, H, T, S)
  d_logits = weights * (d_weights - jnp.sum(d_scaled * out, axis=-1, keepdims=True))  # (B, G, H, T, S)
  d_logits = d_logits.astype(q.dtype)
  d_q = jnp.einsum("BGHTS,BGSK->BGHTK", d_logits, key, preferred_element_type=jnp.float32)  # (B, G, H, T, K)
  d_key = jnp.einsum("BGHTS,BGHTK->BGSK", d_logits, q, preferred_element_type=jnp.float32)  # (B, G, S, K)
  return d_q.astype(q.dtype), d_key.astype(key.dtype), d_value.astype(value.dtype), None


_attend_unnormalized.defvjp(_attend_unnormalized_fwd, _attend_unnormalized_bwd)


def _cached(q, key, value, mask):
  """q (B, T, G, H, K) against a layer's cache: key and value (B, G, S, K), mask (B, T, S).

  The operand orders follow the cache's heads-first layout. A prefill (T > 1) puts q first, so that the logits
  come out (B, G, H, T, S), the order the mask and softmax run in; jnp.einsum's order (keys first) would have XLA
  transpose all T x S logits. A decode step (T = 1) keeps the keys first, read as they lie: with q first, XLA
  would transpose each layer's cached keys instead. Both take the probabilities first in the product with the
  values, so that it comes out (B, G, H, T, K), which in a decode step is (B, T, N, K) already; jnp.einsum puts
  the values first, which transposes each layer's cached values, and then the out-projection reads its input
  permuted.
  """
  t, k = q.shape[1], q.shape[-1]
  if t > 1:
    logits = jax.lax.dot_general(q.transpose(0, 2, 3, 1, 4), key, (((4,), (3,)), ((0, 1), (0, 1))),
                                 preferred_element_type=jnp.float32)  # (B, G, H, T, S)
  else:
    logits = jnp.einsum("BTGHK,BGSK->BGHTS", q, key, preferred_element_type=jnp.float32)  # (B, G, H, 1, S)
  logits = logits * (k ** -0.5)
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)  # (B, G, H, T, S)
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)  # (B, G, H, T, S)
  out = jax.lax.dot_general(probs, value, (((4,), (2,)), ((0, 1), (0, 1))))  # (B, G, H, T, K)
  return out.transpose(0, 3, 1, 2, 4)  # (B, T, G, H, K)


def _dot_product_attention(q, key, value, mask, implementation: str):
  """jax.nn.dot_product_attention over (B, T, N, K) queries: its GQA groups query heads as ours do.

  A Mask's causality and window go as the flags cuDNN fuses (`is_causal`, `local_window_size`). Its segment ids and
  branches go as the dense boolean mask, which cuDNN reads as an additive bias (slower than the flags): jax.nn's
  call takes no segment ids (jax 0.10 keeps cuDNN's packed-segment offsets in a private module), and its
  `query_seq_lengths`/`key_value_seq_lengths` express only padding after a row's one document, which segment ids do
  not promise (a packed row's padding would need both). An unsegmented Mask (rows of one document, no padding)
  sends no mask at all: cuDNN's flash kernel alone.
  """
  b, t, g, h, k = q.shape
  if isinstance(mask, Mask):
    window = None if mask.window is None else (mask.window - 1, 0)  # Keys back from the query, and none ahead.
    masking = {"is_causal": True, "local_window_size": window}
    if not mask.unsegmented:
      masking["mask"] = mask.dense()[:, None]  # (B, 1, T, S)
  else:
    masking = {"mask": mask[:, None]}  # (B, 1, T, S)
  out = jax.nn.dot_product_attention(q.reshape(b, t, g * h, k), key, value, implementation=implementation,
                                     **masking)  # (B, T, N, K)
  return out.reshape(b, t, g, h, k)  # (B, T, G, H, K)


# Splash attention's tile: its blocks of queries and keys are multiples of 128.
SPLASH_BLOCK = 128


def _splash(q, key, value, mask, interpret: bool):
  """TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention) of a Mask, batched by vmap.

  Causality and the window are its static CausalMask or LocalMask, the segment ids its SegmentIds (padding, segment
  0, sees padding, as in `attention_mask`); branches it cannot express. Sequences are padded to a multiple of
  SPLASH_BLOCK with keys of a segment id (-1) no real query has. q is scaled by 1 / sqrt(K) before the product, in
  its own dtype (the kernel takes no scale). `interpret` runs the kernel in Pallas's interpreter (any backend: the
  tests' way to run it without a TPU).
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # Pallas's TPU kernels: only when chosen.
  if not isinstance(mask, Mask) or mask.branch_ids is not None:
    raise ValueError("splash attention reads a Mask without branch_ids (segment ids, window), not dense booleans")
  b, t, g, h, k = q.shape
  pad = -t % SPLASH_BLOCK
  padded = t + pad
  q = jnp.pad(q * jnp.asarray(k ** -0.5, q.dtype), ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))  # (B, T', G, H, K)
  q = q.reshape(b, padded, g * h, k).transpose(0, 2, 1, 3)  # (B, N, T', K)
  key, value = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
                for x in (key, value))  # (B, G, T', K) x 2
  segments = None
  if not mask.unsegmented or pad:
    segments = jnp.pad(mask.segment_ids, ((0, 0), (0, pad)), constant_values=-1)  # (B, T')
  shape = (padded, padded)
  head_mask = (splash.CausalMask(shape) if mask.window is None
               else splash.LocalMask(shape, window_size=(mask.window - 1, 0), offset=0))
  block = max(size for size in (512, 256, 128) if padded % size == 0)
  kernel = splash.make_splash_mha(
      splash.MultiHeadMask([head_mask] * (g * h)), head_shards=1, q_seq_shards=1, interpret=interpret,
      block_sizes=splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                    block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                    block_kv_dq=block))
  if segments is None:
    out = jax.vmap(kernel)(q, key, value)  # (B, N, T', K)
  else:
    out = jax.vmap(kernel)(q, key, value, splash.SegmentIds(q=segments, kv=segments))  # (B, N, T', K)
  return out.transpose(0, 2, 1, 3)[:, :t].reshape(b, t, g, h, k)  # (B, T, G, H, K)


IMPLS = {
    "reference": _reference,
    "split_causal": _split_causal,
    "cached": _cached,
    "jax": functools.partial(_dot_product_attention, implementation="xla"),
    "cudnn": functools.partial(_dot_product_attention, implementation="cudnn"),
    "splash": functools.partial(_splash, interpret=False),
    "splash_interpret": functools.partial(_splash, interpret=True),
}
# The implementations that read a Mask's structure; attend gives the others its dense booleans.
READS_STRUCTURE = frozenset({"jax", "cudnn", "splash", "splash_interpret"})


def attend(q: jax.Array, key: jax.Array, value: jax.Array, mask: "jax.Array | Mask",
           impl: str = "reference") -> jax.Array:
  """Attention of q (B, T, G, H, K) over key and value under mask, (B, T, S) booleans or a Mask, by the
  implementation `impl` (see the module docstring for the layouts): (B, T, G, H, K)."""
  if isinstance(mask, Mask) and impl not in READS_STRUCTURE:
    mask = mask.dense()  # (B, T, S)
  return IMPLS[impl](q, key, value, mask)
