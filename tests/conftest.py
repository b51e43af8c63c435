"""Shared fixtures: the read-only material in ../shared, reference copies made from it once per machine, and what
the whole session shares (a converted SmolLM2, one JAX compilation cache for every subprocess, the `slow` marker).
"""

import os
import pathlib

if os.environ.get("PYTEST_XDIST_WORKER"):  # Two workers share the cores; torch's spinning threads would oversubscribe.
  os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax
import pytest

from llama_hk.cli.flags import COMPILATION_CACHE_ENV
import reference

jax.config.update("jax_default_matmul_precision", "highest")

SMOLLM2_GGUF = reference.SMOLLM2_GGUF
SHAKESPEARE = reference.SHARED / "data" / "shakespeare"


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes more than a few seconds or runs a model in a subprocess; the fast "
                          "tier is `pytest -m \"not slow\"`")
  config.addinivalue_line("markers", "network: reads a package index (PyPI); skipped, saying so, where pip reaches "
                          "none")


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory) -> pathlib.Path:
  """One JAX compilation cache for every binary the session runs (each compiles what an earlier one did not).

  A cache already named by the environment variable is kept, so a developer may share one across runs.
  """
  path = pathlib.Path(os.environ.get(COMPILATION_CACHE_ENV) or tmp_path_factory.mktemp("jax_cache"))
  os.environ[COMPILATION_CACHE_ENV] = str(path)
  return path


def _require(path: pathlib.Path) -> pathlib.Path:
  if not path.exists():
    pytest.fail(f"{path} is missing: tests need ../shared beside the checkout")
  return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
  return _require(SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def shakespeare_dir() -> pathlib.Path:
  return _require(SHAKESPEARE)


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf) -> pathlib.Path:
  """An HF-format float32 copy of the GGUF made by transformers' own GGUF loader (independent of llama_hk)."""
  return reference.smollm2_hf_dir(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_llama_hk(smollm2_gguf, tmp_path_factory) -> pathlib.Path:
  """The SmolLM2 GGUF converted to a llama_hk checkpoint (as `bin/convert` does), once per session."""
  from llama_hk import checkpoints

  out = tmp_path_factory.mktemp("smollm2") / "smollm2"
  checkpoints.convert(smollm2_gguf, out)
  return out


@pytest.fixture(scope="session")
def shakespeare_data_dir(shakespeare_dir, tmp_path_factory) -> pathlib.Path:
  """A TFDS data_dir with the `shakespeare` dataset prepared (array_record) from the shared texts."""
  import tensorflow_datasets as tfds
  from llama_hk.data import sources

  tfds.disable_progress_bar()
  data_dir = tmp_path_factory.mktemp("tfds")
  sources.shakespeare("train", str(data_dir), source_dir=str(shakespeare_dir))
  return data_dir


@pytest.fixture(scope="session")
def shakespeare_tokenizer_dir(shakespeare_data_dir, shakespeare_dir, tmp_path_factory) -> pathlib.Path:
  """A small (2000-piece) LLaMA-style tokenizer trained on the first 1.5M characters of the training works."""
  from llama_hk.data import sources
  from llama_hk.tokenizers import train_spm

  train = sources.shakespeare("train", str(shakespeare_data_dir), source_dir=str(shakespeare_dir))
  output = tmp_path_factory.mktemp("tokenizer") / "shakespeare_2000"
  return train_spm.train_tokenizer(train, output, vocab_size=2000, max_input_chars=1_500_000)


# Tiny random LLaMA checkpoints (model parity, conversion and CLI tests).

_FAMILY_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
                   "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def make_tiny_hf_model(seed: int = 0, *, weight_std: float = 0.15, random_norms: bool = False,
                       family: str = "llama", **overrides):
  """A random transformers LlamaForCausalLM (or the `family`'s: MistralForCausalLM, Qwen2ForCausalLM; eager
  attention, float32) with weights drawn under a fixed torch seed.

  Weights use `weight_std` (not HF's 0.02) so that attention is far from uniform and RoPE, masking and head
  grouping change the logits visibly (Qwen2's biases too); `random_norms` draws every RMSNorm weight from U(0.5, 1.5).
  """
  import torch
  import transformers

  fields = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
  fields.update(overrides)
  config_class, model_class = (getattr(transformers, name) for name in _FAMILY_CLASSES[family])
  config = config_class(**fields)
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = model_class(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        if random_norms:
          p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, weight_std)
  return model


@pytest.fixture(scope="session")
def tiny_hf_model():
  """Factory: `tiny_hf_model(seed=0, family="llama", **config fields)` -> a random transformers model of the family
  (LlamaForCausalLM by default)."""
  return make_tiny_hf_model


def gguf_permute(weight, heads: int):
  """llama.cpp's convert_hf_to_gguf.py Q/K row permutation (rotate-half -> adjacent pairs), written independently."""
  return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def _write_tiny_gguf(path, model, raw_types: dict | None = None, *, arch: str = "llama", pre: str | None = None,
                     encode=None) -> None:
  """Writes a transformers LlamaForCausalLM as a llama.cpp-layout GGUF (F32 tensors, a byte-level BPE tokenizer).

  `raw_types` maps GGUF tensor names to a GGMLQuantizationType whose (zero) bytes replace that tensor; `arch` and
  `pre` are the general.architecture and tokenizer.ggml.pre written; `encode(gguf_name, array)` may return
  `(raw uint8 bytes, GGMLQuantizationType)` to store a tensor in that type (None: float32).
  """
  import gguf
  import numpy as np

  c = model.config
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(c.num_hidden_layers)
  writer.add_context_length(c.max_position_embeddings)
  writer.add_embedding_length(c.hidden_size)
  writer.add_feed_forward_length(c.intermediate_size)
  writer.add_head_count(c.num_attention_heads)
  writer.add_head_count_kv(c.num_key_value_heads)
  writer.add_key_length(c.head_dim)
  writer.add_value_length(c.head_dim)
  writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
  writer.add_layer_norm_rms_eps(c.rms_norm_eps)
  writer.add_vocab_size(c.vocab_size)
  # A byte-level BPE vocabulary: three specials, the 256 byte symbols, three merges, then fillers.
  from tokenizers import pre_tokenizers
  merges = ["Ġ t", "h e", "Ġt he"]
  tokens = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) +
            [m.replace(" ", "") for m in merges])
  assert c.vocab_size >= len(tokens), f"vocab_size must be at least {len(tokens)} for a GGUF tokenizer"
  tokens += [f"<extra_{i}>" for i in range(c.vocab_size - len(tokens))]
  writer.add_tokenizer_model("gpt2")
  if pre is not None:
    writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
  writer.add_token_merges(merges)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  raw_types = raw_types or {}
  for name, tensor in model.state_dict().items():
    if name == "lm_head.weight" and c.tie_word_embeddings:
      continue
    short = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
    gguf_name = _GGUF_NAMES[short]
    if name.startswith("model.layers."):
      gguf_name = f"blk.{name.split('.')[2]}.{gguf_name}"
    array = tensor.detach().float().numpy()
    if short == "self_attn.q_proj.weight":
      array = gguf_permute(array, c.num_attention_heads)
    elif short == "self_attn.k_proj.weight":
      array = gguf_permute(array, c.num_key_value_heads)
    if gguf_name in raw_types:
      qtype = raw_types[gguf_name]
      block, type_size = gguf.GGML_QUANT_SIZES[qtype]
      raw = np.zeros((array.shape[0], array.shape[1] // block * type_size), np.uint8)
      writer.add_tensor(gguf_name, raw, raw_dtype=qtype)
    elif encode is not None and (encoded := encode(gguf_name, array)) is not None:
      writer.add_tensor(gguf_name, encoded[0], raw_dtype=encoded[1])
    else:
      writer.add_tensor(gguf_name, np.ascontiguousarray(array))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.fixture(scope="session")
def write_tiny_gguf():
  """`write_tiny_gguf(path, hf_model, raw_types=None)`: the model as a llama.cpp-layout GGUF file."""
  return _write_tiny_gguf
