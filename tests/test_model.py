"""llama_hk's model against transformers' LLaMA: per module, and whole random checkpoints loaded from disk.

Every reference is transformers' PyTorch implementation; weights reach our modules through the parameter table
(`llama_hk.params`), so a layout mistake there shows up here too. float32 on CPU, fixed seeds. The attention
kernels and weight layouts against the reference implementations: tests/test_ops.py.
"""

import json

import haiku as hk
import huggingface_hub
import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama as hf_llama

from llama_hk import checkpoints
from llama_hk import params as param_table
from llama_hk.config import from_hf_config
from llama_hk.models import kv_cache, llama, rope
from llama_hk.ops import attention

LOGITS_TOL = 1e-4  # Whole-model logits (issue 2).
MODULE_TOL = 1e-5  # Single modules: outputs of order 1.


def _np(x) -> np.ndarray:
  return np.asarray(x.detach().numpy() if isinstance(x, torch.Tensor) else x)


def _hf_config(**overrides) -> transformers.LlamaConfig:
  fields = dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=6,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=8192, rms_norm_eps=1e-5)
  fields.update(overrides)
  config = transformers.LlamaConfig(**fields)
  config._attn_implementation = "eager"
  return config


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.15) -> None:
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, std)


def _padded_batch(seed: int, vocab: int, length: int):
  """tokens (4, T): a full row, a right-padded row, a left-padded row and a packed row (documents of 20, 25 and 12
  tokens, then padding); their segment ids and positions (per document in the packed row).

  The full row starts at position 200, past every original_max_position_embeddings used here.
  """
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, size=(4, length)).astype(np.int32)
  segments = np.ones((4, length), np.int32)
  segments[1, length - 11:] = 0  # Right padding.
  segments[2, :13] = 0  # Left padding.
  positions = np.zeros((4, length), np.int32)
  positions[0] = 200 + np.arange(length)
  for b in (1, 2):
    real = segments[b] == 1
    positions[b, real] = np.arange(real.sum())
  segments[3], positions[3] = _packed_row((20, 25, 12), length)
  tokens[segments == 0] = 0
  return tokens, segments, positions


def _hf_logits(model, tokens, segments, positions, four_d: bool = True) -> np.ndarray:
  """transformers' logits given the block-diagonal 4-D mask, or (four_d=False) its own mask from 2-D padding."""
  mask = _hf_mask(segments) if four_d else torch.from_numpy(segments).long()
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(tokens).long(), attention_mask=mask,
                 position_ids=torch.from_numpy(positions).long()).logits.numpy()


def _max_diff_real(ours, ref, segments) -> float:
  real = segments.astype(bool)
  return float(np.max(np.abs(np.asarray(ours)[real] - ref[real])))


# Per-module parity.

def test_rmsnorm_matches_transformers():
  torch.manual_seed(0)
  norm = hf_llama.LlamaRMSNorm(64, eps=1e-5)
  with torch.no_grad():
    norm.weight.uniform_(0.5, 1.5)
  x = torch.randn(2, 7, 64) * 3.0 + 0.5
  with torch.no_grad():
    ref = norm(x).numpy()
  config = from_hf_config(_hf_config(hidden_size=64, num_attention_heads=4).to_dict())
  ours = hk.without_apply_rng(hk.transform(lambda x: llama.RMSNorm(config, name="norm")(x)))
  params = {"norm": {"scale": param_table.BY_NAME["norm", "scale"].to_ours(_np(norm.weight), config)}}
  assert jax.tree.structure(params) == jax.tree.structure(ours.init(jax.random.key(0), x.numpy()))
  out = np.asarray(ours.apply(params, x.numpy()))
  diff = np.max(np.abs(out - ref))
  print(f"rmsnorm max abs diff {diff:.2e}")
  assert diff <= MODULE_TOL
  # The weights matter: the same input normalized with unit scale is far off.
  assert np.max(np.abs(np.asarray(ours.apply({"norm": {"scale": np.ones(64, np.float32)}}, x.numpy())) - ref)) > 0.1


ROPE_CASES = {
    "default": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_matches_transformers(case):
  hf_config = _hf_config(**ROPE_CASES[case])
  config = from_hf_config(hf_config.to_dict())
  rotary = hf_llama.LlamaRotaryEmbedding(hf_config)
  inv_freq = rope.rope_frequencies(config)
  np.testing.assert_allclose(inv_freq, rotary.inv_freq.numpy(), rtol=1e-6, atol=0)
  torch.manual_seed(1)
  b, t, n, g, k = 2, 9, 6, 2, 16
  q, key = torch.randn(b, n, t, k), torch.randn(b, g, t, k)
  positions = torch.tensor([[0, 1, 2, 3, 5, 8, 13, 21, 34], [40, 63, 64, 65, 200, 511, 1000, 2047, 4000]])
  cos, sin = rotary(q, positions)
  ref_q, ref_k = hf_llama.apply_rotary_pos_emb(q, key, cos, sin)
  out_q = rope.apply_rope(q.numpy().transpose(0, 2, 1, 3), positions.numpy(), inv_freq)  # (B, T, N, K)
  out_k = rope.apply_rope(key.numpy().transpose(0, 2, 1, 3), positions.numpy(), inv_freq)  # (B, T, G, K)
  diff = max(np.max(np.abs(np.asarray(out_q).transpose(0, 2, 1, 3) - ref_q.numpy())),
             np.max(np.abs(np.asarray(out_k).transpose(0, 2, 1, 3) - ref_k.numpy())))
  print(f"rope[{case}] max abs diff {diff:.2e}")
  assert diff <= MODULE_TOL
  # Rotate-half, not adjacent pairs: swapping to the interleaved layout must break the match.
  interleaved = q.numpy().transpose(0, 2, 1, 3).reshape(b, t, n, 2, k // 2).swapaxes(-1, -2).reshape(b, t, n, k)
  wrong = np.asarray(rope.apply_rope(interleaved, positions.numpy(), inv_freq))
  wrong = wrong.reshape(b, t, n, k // 2, 2).swapaxes(-1, -2).reshape(b, t, n, k).transpose(0, 2, 1, 3)
  assert np.max(np.abs(wrong - ref_q.numpy())) > 0.1


def _hf_mask(segments: np.ndarray) -> torch.Tensor:
  """The additive 4-D mask (B, 1, T, T) transformers takes for packed rows: causal within each document (segment
  id > 0), float32 min across documents, above the diagonal and at padding keys (segment 0)."""
  t = segments.shape[1]
  causal = np.tril(np.ones((t, t), bool))[None]
  same_document = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)  # (B, T, S)
  visible = causal & same_document
  return torch.from_numpy(np.where(visible, 0.0, np.finfo(np.float32).min)[:, None].astype(np.float32))


def _packed_row(lengths: tuple[int, ...], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Segment ids 1, 2, ... for documents of `lengths` then padding (0) to `length`, and per-document positions."""
  segments = np.zeros(length, np.int32)
  positions = np.zeros(length, np.int32)
  start = 0
  for i, n in enumerate(lengths):
    segments[start:start + n] = i + 1
    positions[start:start + n] = np.arange(n)
    start += n
  return segments, positions


def _attention_inputs(seed: int, d: int):
  """x (3, 12, D): a full row, a left-padded row, and a packed row (documents of 5, 4 and 2 tokens, one pad)."""
  torch.manual_seed(seed)
  x = torch.randn(3, 12, d)
  packed_segments, packed_positions = _packed_row((5, 4, 2), 12)
  segments = np.stack([np.ones(12, np.int32), (np.arange(12) >= 4).astype(np.int32), packed_segments])
  positions = np.stack([np.arange(12), np.maximum(np.arange(12) - 4, 0), packed_positions]).astype(np.int32)
  return x, segments, positions


def _one_document(segments: np.ndarray) -> np.ndarray:
  """The same rows with every document joined into one (padding kept): what a mask without segments would see."""
  return (segments > 0).astype(np.int32)  # (B, T)


def _module_params(hf_module: torch.nn.Module, config, prefix: str, scope: dict[str, str]) -> dict:
  """Our params for a standalone module from its torch weights, through the table's per-layer conversions.

  `scope` maps a table module (e.g. "decoder/attention") to the standalone module's name.
  """
  params = {}
  state = {name: _np(t) for name, t in hf_module.state_dict().items()}
  for p in param_table.table(config):
    if p.module not in scope:
      continue
    hf_name = p.hf.format(i=0)
    if not hf_name.startswith(prefix):
      continue
    params.setdefault(scope[p.module], {})[p.name] = p.to_ours(state[hf_name[len(prefix):]], config)
  return params


def test_attention_gqa_matches_transformers():
  """6 query heads over 2 kv heads (3 per group), head_dim 16 != 48 / 6, llama3 RoPE, a left-padded and a packed
  row against transformers' block-diagonal 4-D mask and per-document position_ids."""
  hf_config = _hf_config(**ROPE_CASES["llama3"])
  config = from_hf_config(hf_config.to_dict())
  hf_attention = hf_llama.LlamaAttention(hf_config, layer_idx=0).eval()
  _randomize(hf_attention, seed=2)
  x, segments, positions = _attention_inputs(seed=3, d=48)
  cos, sin = hf_llama.LlamaRotaryEmbedding(hf_config)(x, torch.from_numpy(positions).long())
  with torch.no_grad():
    ref, _ = hf_attention(x, position_embeddings=(cos, sin), attention_mask=_hf_mask(segments))
  ref = ref.numpy()

  def fwd(x, positions, segments):
    mask = attention.attention_mask(segments)
    return llama.Attention(config, name="attention")(x, positions, mask)[0]

  ours = hk.without_apply_rng(hk.transform(fwd))
  params = _module_params(hf_attention, config, "model.layers.0.self_attn.", {"decoder/attention": "attention"})
  init = jax.eval_shape(ours.init, jax.random.key(0), x.numpy(), positions, segments)
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, init)
  apply = jax.jit(ours.apply)
  out = np.asarray(apply(params, x.numpy(), positions, segments))
  diff = _max_diff_real(out, ref, segments)
  print(f"attention (GQA 3/kv head) max abs diff {diff:.2e}")
  assert diff <= MODULE_TOL
  # Attention is far from uniform here: shifting every position by one changes nothing (RoPE is relative),
  # but dropping the causal structure does.
  shifted = np.asarray(apply(params, x.numpy(), positions + 1, segments))
  assert _max_diff_real(shifted, ref, segments) <= MODULE_TOL
  no_mask = hk.without_apply_rng(hk.transform(
      lambda x, p: llama.Attention(config, name="attention")(x, p, np.ones((3, 12, 12), bool))[0]))
  assert _max_diff_real(np.asarray(jax.jit(no_mask.apply)(params, x.numpy(), positions)), ref, segments) > 0.05
  # The packed row's later documents must not see the earlier ones.
  joined = np.asarray(apply(params, x.numpy(), positions, _one_document(segments)))
  assert _max_diff_real(joined[2:], ref[2:], segments[2:]) > 0.05


def test_decoder_block_matches_transformers():
  hf_config = _hf_config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=None)
  config = from_hf_config(hf_config.to_dict())
  layer = hf_llama.LlamaDecoderLayer(hf_config, layer_idx=0).eval()
  _randomize(layer, seed=4)
  x, segments, positions = _attention_inputs(seed=5, d=64)
  cos, sin = hf_llama.LlamaRotaryEmbedding(hf_config)(x, torch.from_numpy(positions).long())
  with torch.no_grad():
    ref = layer(x, attention_mask=_hf_mask(segments), position_embeddings=(cos, sin))
  ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()

  def fwd(x, positions, segments):
    mask = attention.attention_mask(segments)
    return llama.DecoderBlock(config)(x, positions, mask)[0]

  ours = hk.without_apply_rng(hk.transform(fwd))
  scope = {m: m.split("/", 1)[1] for m in {p.module for p in param_table.TABLE} if m.startswith("decoder/")}
  params = _module_params(layer, config, "model.layers.0.", scope)
  init = jax.eval_shape(ours.init, jax.random.key(0), x.numpy(), positions, segments)
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, init)
  out = np.asarray(jax.jit(ours.apply)(params, x.numpy(), positions, segments))
  diff = _max_diff_real(out, ref, segments)
  print(f"decoder block max abs diff {diff:.2e}")
  assert diff <= MODULE_TOL
  # The block changes its input substantially, so the comparison is not dominated by the residual.
  assert _max_diff_real(x.numpy(), ref, segments) > 0.5
  # Documents of the packed row stay apart.
  joined = np.asarray(jax.jit(ours.apply)(params, x.numpy(), positions, _one_document(segments)))
  assert _max_diff_real(joined[2:], ref[2:], segments[2:]) > 0.05


def test_parameter_table_matches_model_tree(tiny_hf_model):
  """params_from_hf builds exactly the tree (names, shapes) that the model's own init creates."""
  for tie in (False, True):
    hf = tiny_hf_model(tie_word_embeddings=tie)
    config = from_hf_config(hf.config.to_dict())
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    params = param_table.params_from_hf(state, config)
    init = jax.eval_shape(llama.make_forward(config).init, jax.random.key(0), np.zeros((1, 4), np.int32))
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, init)
    back = param_table.params_to_hf(params, config)
    assert set(back) == set(state) - ({"lm_head.weight"} if tie else set())
    for name, array in back.items():
      np.testing.assert_array_equal(array, state[name], err_msg=name)


# Whole checkpoints written by transformers, loaded by checkpoints.load.

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}


# Each writer: (transformers model, directory, write_tiny_gguf) -> the path checkpoints.load reads.

def _save_safetensors(model, path, _):
  model.save_pretrained(path)
  return path


def _save_sharded(model, path, _):
  model.save_pretrained(path, max_shard_size="40KB")
  index = json.loads((path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert not (path / "model.safetensors").exists()
  return path


def _save_pytorch_bin(model, path, _):
  # transformers 5 always writes safetensors, so write the legacy layout by hand.
  model.config.save_pretrained(path)
  torch.save({k: v.clone() for k, v in model.state_dict().items()}, path / "pytorch_model.bin")
  return path


def _save_sharded_pytorch_bin(model, path, _):
  """pytorch_model-0000i-of-0000n.bin shards and their index, split by huggingface_hub as transformers 4's
  save_pretrained(safe_serialization=False, max_shard_size=...) split them (transformers 5 writes only safetensors)."""
  model.config.save_pretrained(path)
  state = {k: v.clone() for k, v in model.state_dict().items()}
  split = huggingface_hub.split_torch_state_dict_into_shards(state, filename_pattern="pytorch_model{suffix}.bin",
                                                             max_shard_size="40KB")
  assert split.is_sharded and len(split.filename_to_tensors) > 1
  for filename, names in split.filename_to_tensors.items():
    torch.save({name: state[name] for name in names}, path / filename)
  (path / "pytorch_model.bin.index.json").write_text(
      json.dumps({"metadata": split.metadata, "weight_map": split.tensor_to_filename}))
  return path


def _save_gguf(model, path, write_tiny_gguf):
  """A llama.cpp-layout F32 GGUF (Q/K rows permuted) of the model."""
  write_tiny_gguf(path / "model.gguf", model)
  return path / "model.gguf"


def _save_llama_hk(model, path, _):
  """The model's HF directory converted to a llama_hk checkpoint, as bin/convert does."""
  model.save_pretrained(path / "hf")
  checkpoints.convert(path / "hf", path / "llama_hk")
  assert checkpoints.detect_kind(path / "llama_hk") == "llama_hk"
  return path / "llama_hk"


def _older_layout(rope_scaling: dict, rope_theta: float):
  """config.json with top-level rope_theta / rope_scaling (pre-`rope_parameters` transformers)."""
  def save(model, path, _):
    model.save_pretrained(path)
    hf = json.loads((path / "config.json").read_text())
    del hf["rope_parameters"]
    hf.update(rope_theta=rope_theta, rope_scaling=rope_scaling)
    (path / "config.json").write_text(json.dumps(hf))
    return path
  return save


GGUF_VOCAB = 320  # write_tiny_gguf's byte-level vocabulary needs at least 262 ids.

# id: (config overrides, how to write it, counterfactual that must visibly break the parity or None).
CHECKPOINT_CASES = {
    "mha": (dict(num_attention_heads=4, num_key_value_heads=4), _save_safetensors, None),
    "gqa2": (dict(num_attention_heads=4, num_key_value_heads=2), _save_safetensors, None),
    "gqa3": (dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2), _save_safetensors, None),
    "mqa": (dict(num_attention_heads=4, num_key_value_heads=1), _save_safetensors, None),
    "tied": (dict(tie_word_embeddings=True), _save_safetensors, None),
    "head_dim": (dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24), _save_safetensors, None),
    "llama3_rope": (dict(rope_parameters=LLAMA3_ROPE), _save_safetensors, "no_rope_scaling"),
    "linear_rope": (dict(rope_parameters=LINEAR_ROPE), _save_safetensors, "no_rope_scaling"),
    "norm_weights": (dict(random_norms=True), _save_safetensors, "unit_norms"),
    "sharded": (dict(random_norms=True), _save_sharded, None),
    "pytorch_bin": (dict(random_norms=True, rope_parameters=LINEAR_ROPE), _save_pytorch_bin, None),
    "sharded_pytorch_bin": (dict(random_norms=True, num_key_value_heads=1), _save_sharded_pytorch_bin, None),
    "gguf": (dict(random_norms=True, num_attention_heads=8, num_key_value_heads=2, vocab_size=GGUF_VOCAB), _save_gguf,
             "unit_norms"),
    "gguf_tied_mqa": (dict(random_norms=True, num_key_value_heads=1, tie_word_embeddings=True, vocab_size=GGUF_VOCAB),
                      _save_gguf, None),
    "llama_hk": (dict(random_norms=True, rope_parameters=LLAMA3_ROPE), _save_llama_hk, "no_rope_scaling"),
    "older_layout_llama3": (
        dict(rope_parameters={**LLAMA3_ROPE, "rope_theta": 50000.0}),
        _older_layout({k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}, 50000.0), "no_rope_scaling"),
    "older_layout_linear": (
        dict(rope_parameters={**LINEAR_ROPE, "rope_theta": 20000.0}),
        _older_layout({"type": "linear", "factor": 4.0}, 20000.0), "no_rope_scaling"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_checkpoint_logits_match_transformers(case, tiny_hf_model, write_tiny_gguf, tmp_path):
  overrides, save, counterfactual = CHECKPOINT_CASES[case]
  seed = list(CHECKPOINT_CASES).index(case)
  hf = tiny_hf_model(seed=seed, **overrides)
  ckpt = checkpoints.load(save(hf, tmp_path, write_tiny_gguf))
  assert ckpt.config.num_heads == hf.config.num_attention_heads
  assert ckpt.config.num_kv_heads == hf.config.num_key_value_heads
  assert ckpt.config.head_dim == hf.config.head_dim
  assert ckpt.config.tie_embeddings == hf.config.tie_word_embeddings
  tokens, segments, positions = _padded_batch(seed, hf.config.vocab_size, length=64)
  ref = _hf_logits(hf, tokens, segments, positions)
  # On the padded rows the hand-built 4-D mask is transformers' own padding mask.
  assert _max_diff_real(_hf_logits(hf, tokens[:3], segments[:3], positions[:3], four_d=False), ref[:3],
                        segments[:3]) <= 1e-6
  apply = jax.jit(llama.make_forward(ckpt.config).apply)
  ours, _ = apply(ckpt.params, tokens, positions, segments)
  diff = _max_diff_real(ours, ref, segments)
  packed_diff = _max_diff_real(ours[3:], ref[3:], segments[3:])
  print(f"{case}: max abs logits diff {diff:.2e}, packed row {packed_diff:.2e} (logits up to {np.abs(ref).max():.1f})")
  assert diff <= LOGITS_TOL
  # Padding handled through segment ids: ignoring them lets the left-padded row see its padding.
  unsegmented, _ = apply(ckpt.params, tokens, positions, np.ones_like(segments))
  assert _max_diff_real(np.asarray(unsegmented)[2:3], ref[2:3], segments[2:3]) > 100 * LOGITS_TOL
  # Documents of the packed row kept apart through segment ids: joined into one, the later ones see the first.
  joined, _ = apply(ckpt.params, tokens, positions, _one_document(segments))
  assert _max_diff_real(np.asarray(joined)[3:], ref[3:], segments[3:]) > 100 * LOGITS_TOL
  if counterfactual == "no_rope_scaling":
    assert ckpt.config.rope_scaling != "none"
    plain, _ = llama.make_forward(ckpt.config.replace(rope_scaling="none")).apply(
        ckpt.params, tokens, positions, segments)
    assert _max_diff_real(plain, ref, segments) > 100 * LOGITS_TOL
  elif counterfactual == "unit_norms":
    unit = jax.tree_util.tree_map_with_path(
        lambda path, x: np.ones_like(x) if "norm" in jax.tree_util.keystr(path) else x, ckpt.params)
    plain, _ = apply(unit, tokens, positions, segments)
    assert _max_diff_real(plain, ref, segments) > 100 * LOGITS_TOL


def test_kv_cache_decoding_matches_transformers(tiny_hf_model):
  """Prefill then token-by-token decoding through the KV cache gives transformers' full-sequence logits."""
  hf = tiny_hf_model(seed=20, rope_parameters=LLAMA3_ROPE, random_norms=True)
  config = from_hf_config(hf.config.to_dict())
  params = param_table.params_from_hf({k: v.numpy() for k, v in hf.state_dict().items()}, config)
  rng = np.random.default_rng(20)
  tokens = rng.integers(3, config.vocab_size, size=(2, 24)).astype(np.int32)
  with torch.no_grad():
    ref = hf(torch.from_numpy(tokens).long()).logits.numpy()
  forward = llama.make_forward(config)
  apply = jax.jit(forward.apply)
  cache = kv_cache.init_cache(config, batch=2, length=32)
  prefill, cache = apply(params, tokens[:, :16], cache=cache)
  steps = [np.asarray(prefill)]
  for t in range(16, 24):
    logits, cache = apply(params, tokens[:, t:t + 1], cache=cache)
    steps.append(np.asarray(logits))
  diff = float(np.max(np.abs(np.concatenate(steps, axis=1) - ref)))
  print(f"kv cache decoding max abs logits diff {diff:.2e}")
  assert diff <= LOGITS_TOL
  np.testing.assert_array_equal(np.asarray(cache.end_index), [24, 24])


def test_shared_prefix_branches_match_transformers_on_each_sequence(tiny_hf_model):
  """One row holding a prefix once and three continuations of it (branch ids), then a second document and
  padding: each continuation's logits are transformers' on prefix + that continuation alone, and without branch
  ids (a continuation seeing the ones before it) they are not."""
  hf = tiny_hf_model(seed=21, rope_parameters=LLAMA3_ROPE, random_norms=True)
  config = from_hf_config(hf.config.to_dict())
  params = param_table.params_from_hf({k: v.numpy() for k, v in hf.state_dict().items()}, config)
  rng = np.random.default_rng(21)
  prefix, other = rng.integers(3, config.vocab_size, size=7), rng.integers(3, config.vocab_size, size=5)
  branches = [rng.integers(3, config.vocab_size, size=n) for n in (4, 6, 3)]
  tokens, positions, segments, branch_ids = (np.zeros((1, 32), np.int32) for _ in range(4))
  spans, end = [], len(prefix)
  tokens[0, :end], positions[0, :end], segments[0, :end] = prefix, np.arange(end), 1
  for b, branch in enumerate(branches, 1):
    n = len(branch)
    tokens[0, end:end + n], positions[0, end:end + n] = branch, len(prefix) + np.arange(n)
    segments[0, end:end + n], branch_ids[0, end:end + n] = 1, b
    spans.append(slice(end, end + n))
    end += n
  tokens[0, end:end + 5], positions[0, end:end + 5], segments[0, end:end + 5] = other, np.arange(5), 2
  apply = jax.jit(llama.make_forward(config).apply)
  shared, _ = apply(params, tokens, positions=positions, segment_ids=segments, branch_ids=branch_ids)
  unbranched, _ = apply(params, tokens, positions=positions, segment_ids=segments)
  with torch.no_grad():
    alone = [hf(torch.from_numpy(np.concatenate([prefix, branch])[None]).long()).logits.numpy()[0]
             for branch in [*branches, np.zeros(0, np.int64)]]
    other_ref = hf(torch.from_numpy(other[None]).long()).logits.numpy()[0]
  diffs = [np.max(np.abs(np.asarray(shared[0, span]) - ref[len(prefix):])) for span, ref in zip(spans, alone)]
  diffs.append(np.max(np.abs(np.asarray(shared[0, :len(prefix)]) - alone[-1])))
  diffs.append(np.max(np.abs(np.asarray(shared[0, end:end + 5]) - other_ref)))
  print(f"shared-prefix branches max abs logits diff {max(diffs):.2e}")
  assert max(diffs) <= LOGITS_TOL
  later = np.max(np.abs(np.asarray(unbranched[0, spans[1]]) - alone[1][len(prefix):]))
  assert later > 100 * LOGITS_TOL  # The second continuation saw the first without branch ids.
