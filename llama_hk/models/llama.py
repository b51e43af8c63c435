"""The LLaMA decoder in Haiku: RMSNorm, grouped-query attention with RoPE, a SwiGLU MLP, pre-norm blocks.

Shape glossary:
  B batch, T query time, S key time (the cache length, or T without a cache), D d_model,
  N query heads, G key-value heads, H query heads per key-value head (N // G), K head dim,
  F d_ff, V vocab, L layers.

Parameter tree (every leaf under `decoder` has a leading L axis; the layers run in a `scan`, so compile time
does not grow with depth unless `unroll_layers`; the decode-only `per_layer` layout holds layer i's under
`decoder_{i}` instead):
  embedding/embeddings                                    (V, D)
  decoder/input_norm/scale                                (L, D)
  decoder/attention/{q_proj, k_proj, v_proj, out_proj}    (L, D, N, K), (L, D, G, K), (L, D, G, K), (L, N, K, D)
  decoder/attention/{q_bias, k_bias, v_bias}              (L, N, K), (L, G, K), (L, G, K), only with qkv_bias
  decoder/post_attn_norm/scale                            (L, D)
  decoder/mlp/{gate_proj, up_proj, down_proj}             (L, D, F), (L, D, F), (L, F, D)
  norm/scale                                              (D,)
  lm_head/w                                               (D, V), absent with tied embeddings
With a LoRA adapter (`make_forward(config, lora=...)`), each targeted matrix has `{name}_lora_a` (L, in..., r) and
`{name}_lora_b` (L, r, out...) beside it (ops.lora). These are the stored layout's shapes;
`make_forward(config, layout=...)` reads the matrix weights in another layout (`ops.dense.WeightLayout`) under the
same names.

Every product of weights and activations goes through `ops.dense.dense`, every attention through
`ops.attention.attend` (`config.attention_impl` without a cache, the cached kernels with one), under the one mask
`ops.attention.attention_mask` (or its structure, `ops.attention.Mask`, for the fused kernels), which carries
Mistral's sliding window; Qwen2's q/k/v biases are added in `Attention._project`.

Numerics: parameters are stored in `param_dtype` (int8: the matrix weights and embedding int8 with float32 scales,
the rest float32; ops.dense) and cast to `compute_dtype` where used; RMSNorm statistics,
attention logits and softmax, and the output logits are float32 whatever the compute dtype.
"""

import haiku as hk
import jax
import jax.numpy as jnp

from llama_hk import platform, sharding
from llama_hk.config import LlamaConfig
from llama_hk.models import kv_cache, rope
from llama_hk.ops import attention, dense
from llama_hk.ops.lora import LoraConfig

_INIT = hk.initializers.TruncatedNormal(0.02)  # Hugging Face's `initializer_range` for LLaMA.
_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class _Module(hk.Module):
  """A module of this model: its config, the layout of its weights, its LoRA adapter (or None), and `dense` bound
  to them."""

  def __init__(self, config: LlamaConfig, layout: dense.WeightLayout = dense.WeightLayout(),
               lora: LoraConfig | None = None, name: str | None = None):
    super().__init__(name=name)
    self.config, self.layout, self.lora = config, layout, lora

  @hk.transparent  # Its weight belongs to the scope it is called in (the module, or `lm_head` in Llama).
  def dense(self, x: jax.Array, spec: str, name: str, **kwargs) -> jax.Array:
    c = self.config
    sizes = {"V": c.vocab_size, "D": c.d_model, "N": c.num_heads, "G": c.num_kv_heads, "K": c.head_dim, "F": c.d_ff}
    return dense.dense(x, spec, name, sizes=sizes, dtype=c.compute_dtype, param_dtype=c.param_dtype, init=_INIT,
                       layout=self.layout, lora=self.lora, **kwargs)


class RMSNorm(_Module):
  """x / rms(x) * scale, the statistics in float32."""

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = hk.get_parameter("scale", [x.shape[-1]], self.config.float_param_dtype, init=jnp.ones)  # (D,)
    x32 = x.astype(jnp.float32)  # (B, T, D)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.norm_eps)  # (B, T, D)
    return (scale.astype(jnp.float32) * normed.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


class Attention(_Module):
  """Grouped-query attention: G key-value heads shared by H = N / G query heads each (MHA: G = N; MQA: G = 1)."""

  def __call__(self, x, positions, mask, cache: kv_cache.LayerCache | None = None, cache_end=None):
    """x (B, T, D), positions (B, T), mask (B, T, S) or an ops.attention.Mask; with a cache, each row's cache_end
    (B,).

    Returns (B, T, D) and the cache for the next layer (or None).
    """
    c = self.config
    q = self._project(x, "BTD,DNK->BTNK", "q")  # (B, T, N, K)
    key = self._project(x, "BTD,DGK->BTGK", "k")  # (B, T, G, K)
    value = self._project(x, "BTD,DGK->BTGK", "v")  # (B, T, G, K)
    inv_freq = rope.rope_frequencies(c)
    q = rope.apply_rope(q, positions, inv_freq)  # (B, T, N, K)
    key = rope.apply_rope(key, positions, inv_freq)  # (B, T, G, K)
    b, t = x.shape[:2]
    q = q.reshape(b, t, c.num_kv_heads, c.heads_per_kv_head, c.head_dim)  # (B, T, G, H, K)
    if cache is None:
      out = attention.attend(q, key, value, mask, c.attention_impl)  # (B, T, G, H, K)
    else:
      cache, key, value = cache.write(key, value, cache_end)  # (B, G, S, K) x 2: this layer's cache
      out = attention.attend(q, key, value, mask, "cached")  # (B, T, G, H, K)
    out = out.reshape(b, t, c.num_heads, c.head_dim)  # (B, T, N, K)
    return self.dense(out, "BTNK,NKD->BTD", "out_proj"), cache

  def _project(self, x: jax.Array, spec: str, name: str) -> jax.Array:
    """The projection `{name}_proj` of x (B, T, D), plus the bias `{name}_bias` under qkv_bias (Qwen2)."""
    out = self.dense(x, spec, f"{name}_proj")  # (B, T, heads, K)
    if not self.config.qkv_bias:
      return out
    bias = hk.get_parameter(f"{name}_bias", out.shape[2:], self.config.float_param_dtype, init=jnp.zeros)  # (heads, K)
    return out + bias.astype(out.dtype)


class MLP(_Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = self.dense(x, "BTD,DF->BTF", "gate_proj")  # (B, T, F)
    up = self.dense(x, "BTD,DF->BTF", "up_proj")  # (B, T, F)
    hidden = sharding.constrain(jax.nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))  # (B, T, F)
    return self.dense(hidden, "BTF,FD->BTD", "down_proj")  # (B, T, D)


class DecoderBlock(_Module):
  """Pre-norm residual block: attention then MLP. Transparent, so its parameters sit under `decoder/`."""

  @hk.transparent
  def __call__(self, x, positions, mask, cache: kv_cache.LayerCache | None = None, cache_end=None):
    c, layout, lora = self.config, self.layout, self.lora
    attn_out, cache = Attention(c, layout, lora, name="attention")(
        RMSNorm(c, name="input_norm")(x), positions, mask, cache, cache_end)
    x = x + attn_out  # (B, T, D)
    x = x + MLP(c, layout, lora, name="mlp")(RMSNorm(c, name="post_attn_norm")(x))  # (B, T, D)
    return sharding.constrain(x, ("act_batch", "act_length", "act_embed")), cache


class Llama(_Module):
  """Tokens to float32 logits, optionally reading and extending a KV cache: `hidden`, then `logits`."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._embedding = None  # (table, scale), once read.

  @hk.transparent
  def __call__(self, tokens, positions=None, segment_ids=None, cache: kv_cache.KVCache | None = None,
               logits_at=None, branch_ids=None):
    """tokens, positions, segment_ids: (B, T) int32. Returns logits (B, T, V) and the extended cache (or None)
    (`hidden` says what each argument means)."""
    x, cache = self.hidden(tokens, positions, segment_ids, cache, logits_at, branch_ids)  # (B, T, D)
    return self.logits(x), cache

  @hk.transparent
  def hidden(self, tokens, positions=None, segment_ids=None, cache: kv_cache.KVCache | None = None,
             logits_at=None, branch_ids=None):
    """tokens, positions, segment_ids: (B, T) int32. Returns the final norm's output (B, T, D), the input of
    `logits`, and the extended cache (or None).

    segment_ids: packed documents carry 1, 2, ...; padding carries 0. With a cache, the row's padding must
    come last: its cache end advances by the row's non-padding tokens only.
    logits_at: (B,) or (B, S) int32, or None: return only the outputs (B, 1, D) or (B, S, D) at these time indices
    of each row (a prefill needs just its last prompt position's logits, a scorer its scored positions', and the
    full (B, T, V) would cost T times the head's work).
    branch_ids: (B, T) int32 or None, without a cache: a segment's prefix carries 0, each continuation of it its own
    id (1, 2, ...), which sees the prefix and itself only (`ops.attention.attention_mask`); positions are the
    caller's, each continuation's starting where the prefix ends.
    """
    c = self.config
    b, t = tokens.shape
    cache_end = None if cache is None else cache.end_index  # (B,)
    if positions is None:
      base = jnp.zeros((b,), jnp.int32) if cache is None else cache_end
      positions = base[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # (B, T)
    unsegmented = segment_ids is None and branch_ids is None
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)  # (B, T)
    embeddings, scale = self._embedding_table()  # (V, D), (V,) or None
    x = dense.widen(jnp.take(embeddings, tokens, axis=0), c.compute_dtype)  # (B, T, D)
    if scale is not None:
      x = x * jnp.take(scale, tokens, axis=0)[..., None].astype(c.compute_dtype)  # (B, T, D)
    x = sharding.constrain(x, ("act_batch", "act_length", "act_embed"))
    if cache is None:  # (B, T, S) booleans, or the Mask the fused kernels read.
      mask = attention.self_attention_mask(c.attention_impl, segment_ids, c.sliding_window, branch_ids, unsegmented)
    else:
      mask = attention.attention_mask(segment_ids, cache_end, cache.k.shape[3], c.sliding_window)  # (B, T, S)

    def block(x, layer_cache):
      return DecoderBlock(c, self.layout, self.lora)(x, positions, mask, layer_cache, cache_end)

    policy = _REMAT_POLICIES[c.remat_policy]
    if policy is not None and cache is None:  # Training's trade of compute for memory; a cached pass decodes.
      block = hk.remat(block, policy=policy)
    layers = None if cache is None else kv_cache.LayerCache(cache.k, cache.v, jnp.int32(0))
    if self.layout.per_layer:  # Each layer's weights their own arrays (ops.dense.WeightLayout), run unrolled.
      for i in range(c.num_layers):
        with hk.name_scope(dense.layer_module(dense.DECODER, i)):
          x, layers = block(x, layers)  # (B, T, D)
    else:
      unroll = c.num_layers if c.unroll_layers else 1
      x, layers = hk.layer_stack(c.num_layers, unroll=unroll, name=dense.DECODER)(block)(x, layers)  # (B, T, D)
    if cache is not None:
      cache = kv_cache.KVCache(layers.k, layers.v, cache_end + jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32))
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at.reshape(b, -1, 1), axis=1)  # (B, S, D), S = 1 for a (B,) index
    return RMSNorm(c, name="norm")(x), cache  # (B, T, D)

  @hk.transparent
  def logits(self, x, vocab_block: tuple[jax.Array, int] | None = None):
    """The LM head: `hidden`'s output (B, T, D) -> float32 logits (B, T, V); with vocab_block = (start, W), those of
    token ids start ... start + W - 1 only (B, T, W)."""
    if self.config.tie_embeddings:
      embeddings, scale = self._embedding_table()  # (V, D), (V,) or None
      return self.dense(x, "BTD,VD->BTV", "embeddings", weight=embeddings, weight_scale=scale, columns=vocab_block,
                        preferred_element_type=jnp.float32)  # (B, T, V)
    with hk.name_scope("lm_head"):
      return self.dense(x, "BTD,DV->BTV", "w", columns=vocab_block, preferred_element_type=jnp.float32)  # (B, T, V)

  @hk.transparent
  def _embedding_table(self):
    """The embedding table (V, D) and, with int8 weights, each row's float32 scale (V,) (else None), read once
    (a second `embedding` scope would be named `embedding_1`)."""
    c = self.config
    if self._embedding is None:
      with hk.name_scope("embedding"):
        embeddings = hk.get_parameter("embeddings", [c.vocab_size, c.d_model], c.param_dtype, init=_INIT)  # (V, D)
        scale = None
        if c.param_dtype == "int8":
          scale = hk.get_parameter("embeddings_scale", [c.vocab_size], jnp.float32, init=jnp.ones)  # (V,)
      self._embedding = embeddings, scale
    return self._embedding


def make_forward(config: LlamaConfig, *, layout: dense.WeightLayout = dense.WeightLayout(),
                 lora: LoraConfig | None = None) -> hk.Transformed:
  """The transformed model: `init(rng, tokens)` and
  `apply(params, tokens, positions=None, segment_ids=None, cache=None, logits_at=None, branch_ids=None) ->
  (logits, cache)`, its matrix weights read in `layout` (params made by `ops.dense.to_layout(params, layout)`);
  with `lora`, params hold the adapter's leaves beside the base's (`ops.lora.combine`), and an adapter with dropout
  takes `apply(..., dropout_rng=key)` (None: no dropout)."""
  return transform_model(config, lambda model, *args, **kwargs: model(*args, **kwargs), layout=layout, lora=lora)


def transform_model(config: LlamaConfig, fn, *, layout: dense.WeightLayout = dense.WeightLayout(),
                    lora: LoraConfig | None = None) -> hk.Transformed:
  """`fn(model, *args, **kwargs)` transformed as `make_forward` is, `model` the `Llama` whose parameters it reads:
  for work that needs the model's pieces rather than its logits (a scorer that consumes the head's output block
  by block, `eval.harness`)."""
  platform.check_attention_impl(config.attention_impl)
  transformed = hk.transform(lambda *args, **kwargs: fn(Llama(config, layout, lora), *args, **kwargs))
  if lora is None or not lora.dropout:
    return hk.without_apply_rng(transformed)
  return hk.Transformed(transformed.init, lambda params, *args, dropout_rng=None, **kwargs: transformed.apply(
      params, dropout_rng, *args, **kwargs))
