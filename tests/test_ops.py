"""The ops seams and the platform policy: every attention implementation and weight layout against the reference.

Attention: values and gradients of each implementation equal the reference's, with grouped-query heads, packed
segments that cross the split-causal kernel's blocks, padding, and a KV cache's mask. Dense: the seam computes the
einsum its spec names, and parameters moved to another WeightLayout give the stored layout's logits.
"""

import dataclasses
import types

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_hk import config as config_lib
from llama_hk import params as param_table
from llama_hk import platform
from llama_hk.config import LlamaConfig
from llama_hk.errors import UserError
from llama_hk.models import kv_cache, llama
from llama_hk.ops import attention, dense

B, G, H, K = 2, 2, 3, 16


def _qkv(rng, t, s, heads_first=False):
  q = rng.standard_normal((B, t, G, H, K)).astype(np.float32) * 2
  kv_shape = (B, G, s, K) if heads_first else (B, s, G, K)
  return q, *(rng.standard_normal(kv_shape).astype(np.float32) * 2 for _ in range(2))


def _assert_same_values_and_grads(ours, reference, args, values_atol=1e-5, grads_atol=1e-4):
  """ours(*args) equals reference(*args), and so do the gradients of a random projection of the outputs."""
  out = jax.jit(ours)(*args)
  np.testing.assert_allclose(out, jax.jit(reference)(*args), atol=values_atol, rtol=0)
  cotangent = np.random.default_rng(0).standard_normal(out.shape).astype(np.float32)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * cotangent), argnums=(0, 1, 2)))(*args)
  expected = jax.jit(jax.grad(lambda *a: jnp.sum(reference(*a) * cotangent), argnums=(0, 1, 2)))(*args)
  for ours_grad, reference_grad in zip(grads, expected):
    np.testing.assert_allclose(ours_grad, reference_grad, atol=grads_atol, rtol=0)


def _packed_segments(t):
  segments = np.ones((B, t), np.int32)
  segments[0, 40:] = 2  # The second document starts in the first half and runs into the second.
  segments[1, t - 20:] = 0  # Padding.
  return segments


def test_reference_is_masked_softmax_attention():
  rng = np.random.default_rng(10)
  q, key, value = _qkv(rng, 9, 9)
  mask = attention.attention_mask(_packed_segments(9))
  logits = np.einsum("btghk,bsgk->bghts", q, key) / np.sqrt(K)
  logits = np.where(np.asarray(mask)[:, None, None], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  expected = np.einsum("bghts,bsgk->btghk", probs / probs.sum(-1, keepdims=True), value)
  np.testing.assert_allclose(attention.attend(q, key, value, mask, "reference"), expected, atol=1e-5, rtol=0)


# Causal query blocks computed apart from SPLIT_MIN_LENGTH (128) on: 128 in 4 blocks, 130 in 2 (the packed
# segments cross the blocks' edges); 129 (odd): one block.
@pytest.mark.parametrize("t", [128, *(pytest.param(t, marks=pytest.mark.slow) for t in (130, 129))])
def test_split_causal_equals_reference(t):
  q, key, value = _qkv(np.random.default_rng(11), t, t)
  mask = attention.attention_mask(_packed_segments(t))
  _assert_same_values_and_grads(lambda *a: attention.attend(*a, mask, "split_causal"),
                                lambda *a: attention.attend(*a, mask, "reference"), (q, key, value))


@pytest.mark.slow
def test_jax_dot_product_attention_equals_reference():
  """The "cudnn" implementation's call, run by XLA (the one any backend has)."""
  q, key, value = _qkv(np.random.default_rng(12), 130, 130)
  mask = attention.attention_mask(_packed_segments(130))
  _assert_same_values_and_grads(lambda *a: attention.attend(*a, mask, "jax"),
                                lambda *a: attention.attend(*a, mask, "reference"), (q, key, value))


@pytest.mark.parametrize("t", [7, 1], ids=["prefill", "decode"])
def test_cached_attention_equals_reference(t):
  """Queries at each row's cache end (rows at different ends) over a cache of 24 slots, heads first."""
  s = 24
  q, key, value = _qkv(np.random.default_rng(13), t, s, heads_first=True)
  cache_end = np.array([0, 11], np.int32)
  mask = attention.attention_mask(np.ones((B, t), np.int32), cache_end, s)
  assert not np.asarray(mask)[1, 0, 12:].any() and np.asarray(mask)[1, 0, :12].all()
  seq_first = lambda x: jnp.swapaxes(x, 1, 2)  # (B, G, S, K) -> (B, S, G, K)
  _assert_same_values_and_grads(lambda *a: attention.attend(*a, mask, "cached"),
                                lambda q, k, v: attention.attend(q, seq_first(k), seq_first(v), mask, "reference"),
                                (q, key, value))


def _documents(t):
  """Row 0: three packed documents, then padding; row 1: two documents, the second running to the end."""
  segments = np.zeros((B, t), np.int32)
  segments[0, :5], segments[0, 5:11], segments[0, 11:t - 3] = 1, 2, 3
  segments[1, :t // 2], segments[1, t // 2:] = 1, 2
  return segments


def _numpy_mask(segments, window):
  """Which keys each query sees, written independently of attention_mask: the same segment, not ahead, and with a
  window, fewer than `window` positions back."""
  t = segments.shape[1]
  queries, keys = np.arange(t)[:, None], np.arange(t)[None, :]
  seen = (queries >= keys) & ((queries - keys < window) if window else True)
  return seen[None] & (segments[:, :, None] == segments[:, None, :])


@pytest.mark.parametrize("window", [None, 4])
def test_reference_honours_segments_padding_and_window(window):
  q, key, value = _qkv(np.random.default_rng(18), 24, 24)
  segments = _documents(24)
  mask = attention.Mask(segments, window=window)
  np.testing.assert_array_equal(mask.dense(), _numpy_mask(segments, window))
  logits = np.einsum("btghk,bsgk->bghts", q, key) / np.sqrt(K)
  logits = np.where(_numpy_mask(segments, window)[:, None, None], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  expected = np.einsum("bghts,bsgk->btghk", probs / probs.sum(-1, keepdims=True), value)
  np.testing.assert_allclose(attention.attend(q, key, value, mask, "reference"), expected, atol=1e-5, rtol=0)


# Each implementation as the model runs it (a Mask; "jax" makes the arguments "cudnn" passes, run by XLA), against
# the reference under the Mask's dense booleans. T = 128 lets split_causal split; splash pads 24 to its block of 128.
# Without a window (slow tier): test_unsegmented_mask_is_causal and test_split_causal_equals_reference run it fast.
@pytest.mark.parametrize("window", [4, pytest.param(None, marks=pytest.mark.slow)])
@pytest.mark.parametrize("impl, t", [("split_causal", 128), ("jax", 24), ("splash_interpret", 24)])
def test_every_implementation_honours_segments_padding_and_window(impl, t, window):
  """Values and gradients equal the reference's with packed rows, padding and a window; the same implementation
  told the rows are single documents (as MaxText's cuDNN path took them) gives other values, so a kernel that
  dropped the segment ids would fail here."""
  q, key, value = _qkv(np.random.default_rng(19), t, t)
  segments = _documents(t)
  mask = attention.Mask(segments, window=window)
  _assert_same_values_and_grads(lambda *a: attention.attend(*a, mask, impl),
                                lambda *a: attention.attend(*a, mask.dense(), "reference"), (q, key, value),
                                grads_atol=2e-5)  # Measured: values <= 2.4e-6, gradients (up to 14) <= 8.6e-6.
  ignoring = attention.Mask(np.ones_like(segments), window=window, unsegmented=True)
  wrong = jax.jit(lambda *a: attention.attend(*a, ignoring, impl))(q, key, value)
  expected = attention.attend(q, key, value, mask.dense(), "reference")
  real = segments != 0
  assert np.abs(np.asarray(wrong) - np.asarray(expected))[real].max() > 0.1


# 128: splash without padding, so with no segment ids at all, under its CausalMask.
@pytest.mark.parametrize("impl, t", [("jax", 24), ("splash_interpret", 128)])
def test_unsegmented_mask_is_causal(impl, t):
  """Rows of one document (no segment ids sent): causal attention."""
  q, key, value = _qkv(np.random.default_rng(20), t, t)
  mask = attention.Mask(np.ones((B, t), np.int32), unsegmented=True)
  _assert_same_values_and_grads(lambda *a: attention.attend(*a, mask, impl),
                                lambda *a: attention.attend(*a, mask.dense(), "reference"), (q, key, value),
                                grads_atol=2e-5)


@pytest.mark.parametrize("impl", ["jax", "splash_interpret"])
def test_model_with_a_fused_kernel_equals_reference(impl):
  """The model passes the fused kernels its Mask: packed rows with a Mistral window, and rows without segment ids,
  give the reference implementation's logits."""
  config = _config(family="mistral", sliding_window=4)
  params = _random_params(config, seed=6)
  tokens = np.random.default_rng(21).integers(0, config.vocab_size, (B, 24)).astype(np.int32)
  segments = _documents(24)
  positions = np.stack([np.concatenate([np.arange(5), np.arange(6), np.arange(13)]),
                        np.concatenate([np.arange(12), np.arange(12)])]).astype(np.int32)  # Each document from 0.
  ours = jax.jit(llama.make_forward(config.replace(attention_impl=impl)).apply)
  reference = jax.jit(llama.make_forward(config.replace(attention_impl="reference")).apply)
  real = segments != 0
  np.testing.assert_allclose(np.asarray(ours(params, tokens, positions, segments)[0])[real],
                             np.asarray(reference(params, tokens, positions, segments)[0])[real], atol=1e-4, rtol=0)
  np.testing.assert_allclose(ours(params, tokens)[0], reference(params, tokens)[0], atol=1e-4, rtol=0)


def test_every_config_choice_is_an_implementation():
  assert set(config_lib.ATTENTION_IMPLS) <= set(attention.IMPLS)
  with pytest.raises(UserError, match="attention_impl='flash' is not one of"):
    _config(attention_impl="flash")


def test_cudnn_on_cpu_is_a_one_line_error():
  with pytest.raises(UserError, match=r"^LlamaConfig.attention_impl='cudnn' needs a GPU, and this backend is cpu"):
    llama.make_forward(_config(attention_impl="cudnn", compute_dtype="bfloat16"))
  with pytest.raises(UserError, match=r"^LlamaConfig.attention_impl='cudnn' needs compute_dtype 'bfloat16' or "
                     r"'float16', not 'float32'$"):
    _config(attention_impl="cudnn")
  platform.check_attention_impl("split_causal")


def test_splash_outside_tpu_is_a_one_line_error():
  with pytest.raises(UserError, match=r"^LlamaConfig.attention_impl='splash' needs a TPU, and this backend is cpu "
                     r"\(use 'split_causal', or 'splash_interpret' .*\)$"):
    llama.make_forward(_config(attention_impl="splash"))
  platform.check_attention_impl("splash_interpret")
  q, key, value = _qkv(np.random.default_rng(22), 8, 8)
  with pytest.raises(ValueError, match="splash attention reads a Mask without branch_ids"):
    attention.attend(q, key, value, attention.Mask(np.ones((B, 8), np.int32), np.ones((B, 8), np.int32)),
                     "splash_interpret")


def test_dense_computes_its_einsum():
  """The seam's 2-D product is the einsum of its spec: a multi-axis contraction, and a given (out, in) weight."""
  rng = np.random.default_rng(14)
  x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)  # (B, T, N, K)
  table = rng.standard_normal((7, 4 * 5)).astype(np.float32)  # (V, D) with D = N * K

  def f(x):
    out = dense.dense(x, "BTNK,NKD->BTD", "w", sizes={"D": 6}, dtype="float32", param_dtype="float32",
                      init=hk.initializers.RandomNormal())
    head = dense.dense(x.reshape(2, 3, 20), "BTD,VD->BTV", "table", sizes={}, dtype="float32",
                       param_dtype="float32", weight=table)
    return out, head

  transformed = hk.without_apply_rng(hk.transform(f))
  params = transformed.init(jax.random.key(0), x)
  out, head = transformed.apply(params, x)
  np.testing.assert_allclose(out, np.einsum("btnk,nkd->btd", x, params["~"]["w"]), atol=1e-5, rtol=0)
  np.testing.assert_allclose(head, np.einsum("btd,vd->btv", x.reshape(2, 3, 20), table), atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="not a product over x's trailing axes"):
    hk.transform(lambda x: dense.dense(x, "BTNK,KND->BTD", "w", sizes={"D": 6}, dtype="float32",
                                       param_dtype="float32")).init(jax.random.key(0), x)


@pytest.mark.parametrize("layout", [dense.WeightLayout(), dense.WeightLayout(out_in=True), platform.CPU_MATVEC_LAYOUT,
                                    platform.CPU_BATCH_LAYOUT])
def test_narrow_weight_too_big_to_convert_goes_in_column_blocks(monkeypatch, layout):
  """A bfloat16 weight whose float32 copy passes CONVERT_BLOCK_BYTES is multiplied in blocks of output columns:
  the product, the gradient and an int8 given (out, in) table's scaled product are the unblocked ones."""
  rng = np.random.default_rng(17)
  x = rng.standard_normal((3, 16)).astype(np.float32)  # (M, D)
  table = rng.integers(-127, 128, (24, 16)).astype(np.int8)  # (V, D)
  scale = rng.uniform(0.5, 1.5, 24).astype(np.float32)  # (V,)

  def f(x):
    y = dense.dense(x, "MD,DO->MO", "out_proj", sizes={"O": 12}, dtype="float32", param_dtype="bfloat16",
                    init=hk.initializers.RandomNormal(), layout=layout)
    head = dense.dense(x, "MD,VD->MV", "table", sizes={}, dtype="float32", param_dtype="float32",
                       weight=table, weight_scale=scale)
    return y, head

  transformed = hk.without_apply_rng(hk.transform(f))
  params = transformed.init(jax.random.key(0), x)
  cotangents = rng.standard_normal((3, 12)).astype(np.float32), rng.standard_normal((3, 24)).astype(np.float32)
  loss = lambda params, x: sum(jnp.sum(y * c) for y, c in zip(transformed.apply(params, x), cotangents))  # noqa: E731
  whole = transformed.apply(params, x), jax.grad(loss, argnums=1)(params, x)
  monkeypatch.setattr(dense, "CONVERT_BLOCK_BYTES", 4 * 16 * 4)  # Four float32 columns of D = 16 per block.
  assert dense._column_blocks(12, 16 * 4) == 3 and dense._column_blocks(24, 16 * 4) == 6
  assert dense._column_blocks(13, 16 * 4) == 1 and dense._column_blocks(2, 16 * 4) == 1  # 13: no divisor fits.
  jaxpr = str(jax.make_jaxpr(transformed.apply)(params, x))
  assert jaxpr.count("scan") == 2, jaxpr
  blocked = transformed.apply(params, x), jax.grad(loss, argnums=1)(params, x)
  w = np.asarray(params["~"]["out_proj"], np.float32)
  w = w.T if layout.out_in else w  # (D, O)
  np.testing.assert_allclose(whole[0][0], x @ w, atol=1e-5, rtol=0)
  np.testing.assert_allclose(whole[0][1], (x @ table.T.astype(np.float32)) * scale, atol=1e-3, rtol=0)
  for expected, got in zip(jax.tree.leaves(whole), jax.tree.leaves(blocked)):
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)  # int8 products reach |y| ~ 300.


def _config(**overrides) -> LlamaConfig:
  fields = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48)
  return LlamaConfig(**{**fields, **overrides})


LAYOUTS = {"out_in": dense.WeightLayout(out_in=True), "cpu_matvec": platform.CPU_MATVEC_LAYOUT,
           "cpu_batch": platform.CPU_BATCH_LAYOUT, "out_in_per_layer": dense.WeightLayout(out_in=True, per_layer=True)}


def _random_params(config: LlamaConfig, seed: int) -> dict:
  """Random parameters in the model's tree (its own init compiles slowly)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(llama.make_forward(config).init, jax.random.key(0), np.zeros((1, 2), np.int32))
  return param_table.map_params(lambda row, leaf: (rng.standard_normal(leaf.shape) * 0.2).astype(np.float32), shapes)


def test_to_layout_keeps_names_and_flattens_matrices_out_in():
  params = _random_params(_config(), seed=1)
  moved = dense.to_layout(params, platform.CPU_MATVEC_LAYOUT)
  assert jax.tree.structure(moved) == jax.tree.structure(params)  # The same leaf names.
  for module, name, shape in [("decoder/attention", "q_proj", (2, 4 * 8, 32)), ("decoder/attention", "out_proj",
                                                                                 (2, 32, 4 * 8)),
                              ("lm_head", "w", (61, 32)), ("embedding", "embeddings", (61, 32))]:
    assert moved[module][name].shape == shape, (module, name)  # ([L,] out, in); the embedding table as it was.
  np.testing.assert_array_equal(moved["decoder/attention"]["out_proj"][1],
                                params["decoder/attention"]["out_proj"][1].reshape(32, 32).T)
  assert moved["decoder/input_norm"]["scale"] is params["decoder/input_norm"]["scale"]
  assert dense.to_layout(params, dense.WeightLayout()) is params


def test_bfloat16_weights_read_as_bits_give_their_logits_without_float32_stacks():
  """platform.inference_params on CPU: bfloat16 matrices and embedding table as uint16 views of the same buffers,
  the logits exactly the bfloat16 weights', and no float32 copy of a whole (L, ...) stack in the compiled forward
  (which XLA:CPU makes from bfloat16 stacks)."""
  config = _config(param_dtype="bfloat16", tie_embeddings=True)
  tokens = np.random.default_rng(16).integers(0, config.vocab_size, (2, 9)).astype(np.int32)
  params = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.bfloat16), _random_params(config, seed=4))
  bits = platform.inference_params(config, params)
  gate, table = bits["decoder/mlp"]["gate_proj"], bits["embedding"]["embeddings"]
  assert gate.dtype == table.dtype == jnp.uint16 and bits["decoder/input_norm"]["scale"].dtype == jnp.bfloat16
  assert gate.unsafe_buffer_pointer() == params["decoder/mlp"]["gate_proj"].unsafe_buffer_pointer()
  forward = jax.jit(llama.make_forward(config).apply)
  np.testing.assert_array_equal(forward(bits, tokens)[0], forward(params, tokens)[0])
  stack = "f32[2,32,48]"  # gate_proj's (L, D, F) in float32.
  assert stack in forward.lower(params, tokens).compile().as_text()
  assert stack not in forward.lower(bits, tokens).compile().as_text()
  assert platform.inference_params(config.replace(compute_dtype="bfloat16"), params) is params


@pytest.mark.slow
@pytest.mark.parametrize("name, tied", [("cpu_matvec", False), ("out_in", True), ("cpu_batch", True),
                                        ("cpu_batch", False), ("out_in_per_layer", False)])
def test_weight_layouts_give_the_stored_layouts_logits(name, tied):
  """to_layout's parameters through make_forward(layout=...): the same logits, full forward and decode steps."""
  config, layout = _config(tie_embeddings=tied), LAYOUTS[name]
  tokens = np.random.default_rng(15).integers(0, config.vocab_size, (2, 9)).astype(np.int32)
  params = _random_params(config, seed=2)
  moved = dense.to_layout(params, layout)
  if layout.per_layer:  # Layer 1's own arrays: its slices of the stacks, as the other layout fields leave them.
    stacked = dense.to_layout(params, dataclasses.replace(layout, per_layer=False))
    assert not any(module.startswith("decoder/") for module in moved)
    for module in ("decoder/attention", "decoder/mlp", "decoder/input_norm"):
      for name, leaf in stacked[module].items():
        np.testing.assert_array_equal(moved[dense.layer_module(module, 1)][name], leaf[1])
  stored, laid_out = jax.jit(llama.make_forward(config).apply), jax.jit(llama.make_forward(config, layout=layout).apply)
  # weights_first: every product (7 a layer, and the head) between its two barriers.
  barriers = 2 * (7 * config.num_layers + 1) if layout.weights_first else 0
  assert str(jax.make_jaxpr(laid_out)(moved, tokens)).count("optimization_barrier") == barriers
  np.testing.assert_allclose(laid_out(moved, tokens)[0], stored(params, tokens)[0], atol=1e-5, rtol=0)
  cache = kv_cache.init_cache(config, 2, 12)
  filled = np.random.default_rng(16).standard_normal(cache.k.shape).astype(np.float32)
  cache = kv_cache.KVCache(filled, -filled, np.array([3, 8], np.int32))  # As if prefilled: a decode step.
  expected, expected_cache = stored(params, tokens[:, 8:], cache=cache)
  logits, new_cache = laid_out(moved, tokens[:, 8:], cache=cache)
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
  np.testing.assert_allclose(new_cache.k, expected_cache.k, atol=1e-5, rtol=0)


def test_decode_plan_rules_on_cpu():
  f32, bf16 = _config(), _config(param_dtype="bfloat16")
  assert platform.decode_plan(f32, batch=1) == platform.DecodePlan(platform.CPU_MATVEC_LAYOUT, 1)
  assert platform.decode_plan(bf16, batch=1) == platform.DecodePlan(platform.CPU_MATVEC_LAYOUT, 32)
  assert platform.decode_plan(f32, batch=2) == platform.DecodePlan(platform.CPU_BATCH_LAYOUT, 1)
  assert platform.decode_plan(f32, batch=2, mesh=object()) == platform.DecodePlan(dense.WeightLayout(), 1)
  assert platform.decode_plan(bf16, batch=8) == platform.DecodePlan(dense.WeightLayout(), 32)
  assert platform.decode_plan(bf16, batch=1, mesh=object()).layout == dense.WeightLayout()
  assert platform.decode_plan(_config(compute_dtype="bfloat16"), batch=4).chunk_steps == 32
  hash(platform.CPU_MATVEC_LAYOUT)  # A jit static argument.


def test_device_peak_flops():
  assert platform.device_peak_flops(types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")) == 989e12
  assert platform.measure_matmul_peak(size=64, seconds=0.01) > 0


def test_narrow_head_in_a_loop_is_converted_inside_its_product(monkeypatch):
  """XLA:CPU hoists the conversion of a weight that a loop does not slice (the head's table in the decode loop) out
  of the loop, a float32 copy of the whole written each call and read each step; in column blocks
  (CONVERT_BLOCK_BYTES) each block is converted inside the product, and the values stay the same."""
  rng = np.random.default_rng(5)
  table = jnp.asarray(rng.integers(-127, 128, (64, 32)), jnp.int8)  # (V, D)
  scale = jnp.asarray(rng.uniform(1e-3, 1e-2, (64,)), jnp.float32)  # (V,)
  x = jnp.asarray(rng.standard_normal((1, 1, 32)), jnp.float32)  # (B, T, D)

  def loop():  # A new function each call, so that each traces under the block size of its time.
    def steps(x, table, scale):
      def step(_, x):
        logits = dense.dense(x, "BTD,VD->BTV", "embeddings", sizes={}, dtype="float32", param_dtype="int8",
                             weight=table, weight_scale=scale)  # (B, T, V)
        return x + jnp.tanh(logits[..., :32])
      return jax.lax.fori_loop(0, 4, step, x)
    return jax.jit(steps)

  whole_table = "f32[64,32]"
  whole = loop().lower(x, table, scale).compile()
  assert whole_table in whole.as_text()
  monkeypatch.setattr(dense, "CONVERT_BLOCK_BYTES", 16 * 32 * 4)  # Blocks of 16 float32 columns of D = 32: 4.
  assert dense._column_blocks(64, 32 * 4) == 4
  blocked = loop().lower(x, table, scale).compile()
  assert whole_table not in blocked.as_text()
  np.testing.assert_allclose(blocked(x, table, scale), whole(x, table, scale), rtol=1e-6, atol=1e-6)
