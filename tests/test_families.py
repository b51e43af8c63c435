"""Families: random Mistral (a sliding window shorter than the test sequences) and Qwen2 (q/k/v biases, tied
embeddings) checkpoints give transformers' logits with padding and packing in every attention implementation, its
greedy ids through the KV cache past the window, and round-trip through HF bitwise; their configs read as
transformers reads them, and what is not supported fails in one line."""

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from jax.sharding import PartitionSpec

from llama_hk import checkpoints
from llama_hk import inference
from llama_hk import params as param_table
from llama_hk import sharding
from llama_hk.config import LlamaConfig, from_hf_config, num_params, to_hf_config
from llama_hk.models import make_forward
from llama_hk.train.step import weight_decay_mask

import harness
from reference import hf_greedy, ours_from_hf

TOL = 1e-4
WINDOW = 16  # Mistral's window here: shorter than every test sequence that crosses it.
FAMILIES = {
    "mistral": dict(seed=50, family="mistral", sliding_window=WINDOW, random_norms=True),
    "qwen2": dict(seed=51, family="qwen2", num_key_value_heads=1, tie_word_embeddings=True, random_norms=True),
}
HF_CLASSES = {"mistral": transformers.MistralForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tiny_hf_model):
  """(family name, the transformers model, our config and params)."""
  hf = tiny_hf_model(**FAMILIES[request.param])
  assert type(hf) is HF_CLASSES[request.param]
  return (request.param, hf, *ours_from_hf(hf))


def _hf_logits(hf, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  with torch.no_grad():
    attention_mask = None if mask is None else torch.from_numpy(mask).long()
    return hf(torch.from_numpy(tokens).long(), attention_mask=attention_mask).logits.numpy()


def test_config_and_parameter_tree(family):
  """The family's config fields, and the table's tree (names, shapes) is the model's own init's."""
  name, hf, config, params = family
  assert (config.family, config.qkv_bias) == (name, name == "qwen2")
  assert config.sliding_window == (WINDOW if name == "mistral" else None) == hf.config.sliding_window
  init = jax.eval_shape(make_forward(config).init, jax.random.key(0), np.zeros((1, 4), np.int32))
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, init)
  assert ("q_bias" in params["decoder/attention"]) == config.qkv_bias
  assert num_params(config) == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("impl", ["split_causal", "reference", "jax"])
def test_logits_match_transformers_padded_and_packed(family, impl):
  """128-token rows (split_causal attends in 4 query blocks at this length): a right-padded row and a full one against
  transformers' padded batch, a row packing two documents against transformers on each alone."""
  name, hf, config, params = family
  rng = np.random.default_rng(52)
  t, padded_len, (len_a, len_b) = 128, 100, (70, 58)
  docs = [rng.integers(3, config.vocab_size, size=n) for n in (padded_len, t, len_a, len_b)]
  hf_mask = np.zeros((2, t), np.int32)
  hf_mask[0, :padded_len], hf_mask[1] = 1, 1
  batch = np.zeros((2, t), np.int64)
  batch[0, :padded_len], batch[1] = docs[0], docs[1]
  expected_batch = _hf_logits(hf, batch, hf_mask)  # (2, T, V)
  expected_packed = np.concatenate([_hf_logits(hf, docs[2][None]), _hf_logits(hf, docs[3][None])], axis=1)

  tokens = np.concatenate([batch, np.concatenate(docs[2:])[None]]).astype(np.int32)  # (3, T)
  segments = np.concatenate([hf_mask, np.repeat([[1, 2]], [len_a, len_b], axis=1)]).astype(np.int32)  # (3, T)
  positions = np.zeros((3, t), np.int32)
  positions[:2] = np.arange(t)
  positions[2] = np.concatenate([np.arange(len_a), np.arange(len_b)])
  forward = jax.jit(lambda params, config: make_forward(config).apply(params, tokens, positions, segments)[0],
                    static_argnums=1)
  ours = np.asarray(forward(params, config.replace(attention_impl=impl)))  # (3, T, V)
  diff = max(np.abs(ours[0, :padded_len] - expected_batch[0, :padded_len]).max(),
             np.abs(ours[1] - expected_batch[1]).max(), np.abs(ours[2] - expected_packed[0]).max())
  print(f"{name} {impl}: max abs logit diff {diff:.2e}")
  assert diff <= TOL
  if impl != "split_causal":
    return
  # What makes the family differ from LLaMA changes these logits: without it they are far from transformers'.
  if name == "mistral":
    without = np.asarray(forward(params, config.replace(sliding_window=None)))
  else:
    attention = {k: v * 0 if k.endswith("_bias") else v for k, v in params["decoder/attention"].items()}
    without = np.asarray(forward({**params, "decoder/attention": attention}, config))
  assert np.abs(without[1] - expected_batch[1]).max() > 0.05


@pytest.mark.slow
def test_greedy_generation_past_the_window_matches_transformers(family):
  """Batched prompts (one longer than the window), 32 cached greedy tokens each: transformers' ids one by one."""
  _, hf, config, params = family
  rng = np.random.default_rng(53)
  prompts = [rng.integers(3, config.vocab_size, size=n).tolist() for n in (WINDOW + 5, 6, 1)]
  completions, _ = inference.Generator(config, params).generate(prompts, max_new_tokens=32)
  for prompt, completion in zip(prompts, completions):
    assert len(completion.ids) == 32
    assert completion.ids == hf_greedy(hf, prompt, 32, eos=None)


def test_hf_round_trip_is_bitwise(family, tmp_path):
  """HF -> llama_hk -> HF: the same tensors bit for bit, under the family's own model_type and architecture."""
  name, hf, config, _ = family
  source, ours, exported = tmp_path / "source", tmp_path / "llama_hk", tmp_path / "exported"
  hf.save_pretrained(source)
  checkpoints.convert(source, ours)
  assert checkpoints.load_config(ours) == config
  checkpoints.convert(ours, exported, output_format="hf")
  before = safetensors.numpy.load_file(source / "model.safetensors")
  after = safetensors.numpy.load_file(exported / "model.safetensors")
  assert sorted(after) == sorted(before) and ("model.layers.0.self_attn.q_proj.bias" in before) == config.qkv_bias
  for tensor_name, array in before.items():
    assert after[tensor_name].dtype == array.dtype and np.array_equal(after[tensor_name], array), tensor_name
  written = json.loads((exported / "config.json").read_text())
  assert (written["model_type"], written["architectures"]) == (name, [HF_CLASSES[name].__name__])
  loaded = transformers.AutoModelForCausalLM.from_pretrained(exported)
  assert type(loaded) is HF_CLASSES[name]
  assert loaded.config.sliding_window == hf.config.sliding_window
  assert loaded.config.tie_word_embeddings == hf.config.tie_word_embeddings


def test_qwen2_biases_follow_the_table(tiny_hf_model):
  """Biases: no weight decay, sharded as their projection's output axes, float32 beside int8 weights, and the int8
  model computes what its dequantized float32 weights do."""
  hf = tiny_hf_model(**FAMILIES["qwen2"])
  config, params = ours_from_hf(hf)
  decay = weight_decay_mask(params)["decoder/attention"]
  assert not any(decay[f"{p}_bias"] for p in "qkv") and all(decay[f"{p}_proj"] for p in "qkv")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  attn = sharding.param_specs(config, mesh)["decoder/attention"]  # The default rules.
  expected = PartitionSpec(None, "tensor", None)  # (L, heads, K): the projection's (L, D, heads, K) without D.
  assert attn["q_bias"] == expected == PartitionSpec(attn["q_proj"][0], *attn["q_proj"][2:])
  assert attn["k_bias"] == attn["v_bias"] == expected == PartitionSpec(attn["k_proj"][0], *attn["k_proj"][2:])
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  int8_config = config.replace(param_dtype="int8")
  int8 = param_table.params_from_hf(state, config, dtype="int8")
  assert int8["decoder/attention"]["q_proj"].dtype == np.int8 and "q_bias_scale" not in int8["decoder/attention"]
  assert int8["decoder/attention"]["q_bias"].dtype == np.float32
  np.testing.assert_array_equal(int8["decoder/attention"]["k_bias"], params["decoder/attention"]["k_bias"])
  tokens = np.random.default_rng(54).integers(0, config.vocab_size, size=(1, 24)).astype(np.int32)
  got = make_forward(int8_config).apply(int8, tokens)[0]
  want = make_forward(config).apply(param_table.dequantized(int8), tokens)[0]
  assert np.abs(np.asarray(got) - np.asarray(want)).max() <= TOL


@pytest.mark.parametrize("field, expected", [("absent", 4096), (None, None), (8, 8)], ids=["absent", "null", "8"])
def test_mistral_sliding_window_reads_as_transformers_does(field, expected):
  hf = {"model_type": "mistral", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
  if field != "absent":
    hf["sliding_window"] = field
  config = from_hf_config(hf)
  assert config.sliding_window == transformers.MistralConfig(**hf).sliding_window == expected
  assert transformers.MistralConfig(**to_hf_config(config)).sliding_window == expected


def test_window_none_adds_nothing_to_the_llama_program():
  """A Mistral config without a window traces to exactly the LLaMA jaxpr (the window adds ops only when set)."""
  llama = LlamaConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32)
  tokens = np.zeros((1, 8), np.int32)
  params = jax.eval_shape(make_forward(llama).init, jax.random.key(0), tokens)

  def jaxpr(config):
    return str(jax.make_jaxpr(lambda p: make_forward(config).apply(p, tokens))(params))

  assert jaxpr(llama.replace(family="mistral")) == jaxpr(llama)
  assert jaxpr(llama.replace(family="mistral", sliding_window=4)) != jaxpr(llama)


def test_unsupported_configs_fail_in_one_line(tmp_path):
  """Qwen2's use_sliding_window and unknown model_types: one-line errors naming the field or what is supported;
  through convert, nothing written."""
  bad = tmp_path / "qwen2_window"
  bad.mkdir()
  qwen2 = transformers.Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1).to_dict()
  (bad / "config.json").write_text(json.dumps(qwen2 | {"use_sliding_window": True, "sliding_window": 8}))
  pattern = r"^\S+config\.json: use_sliding_window is true; Qwen2's sliding window is not supported$"
  harness.raises_one_line_error(pattern, checkpoints.convert, bad, tmp_path / "out")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen2_window"]
  for model_type in ("gpt2", "phi3", "gemma2"):
    harness.raises_one_line_error(rf"^config\.json: model_type is '{model_type}', supported: llama, mistral, qwen2$",
                    from_hf_config, qwen2 | {"model_type": model_type})
  harness.raises_one_line_error(r"^LlamaConfig\.sliding_window=8 needs family 'mistral', not 'llama'$", LlamaConfig,
                  vocab_size=32, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32, sliding_window=8)
