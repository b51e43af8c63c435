"""Meta's original format against llama.cpp's convert_legacy_llama.py and transformers' GGUF loader.

The test writes a random GQA model in Meta's layout itself (interleaved Q/K rows, two model-parallel shards,
params.json, a trained sentencepiece tokenizer.model) from a transformers model; llama.cpp's legacy converter makes a
GGUF of that directory, and transformers loads the GGUF: our direct read must give its logits.
"""

import json
import sys

import numpy as np
import pytest

import harness
from conftest import gguf_permute

LLAMA_CPP = harness.REPO.parent / "shared" / "tools" / "llama.cpp"
VOCAB = 512
SHARDS = 2

pytestmark = pytest.mark.slow


def _meta_state_dicts(model) -> list[dict]:
  """The model's tensors under Meta's names, in Meta's Q/K row order, split into SHARDS model-parallel slices."""
  import torch

  c, sd = model.config, model.state_dict()
  whole = {"tok_embeddings.weight": (sd["model.embed_tokens.weight"], 1), "norm.weight": (sd["model.norm.weight"], None),
           "output.weight": (sd["lm_head.weight"], 0)}
  for i in range(c.num_hidden_layers):
    hf = lambda name: sd[f"model.layers.{i}.{name}"]  # noqa: E731
    whole.update({
        f"layers.{i}.attention_norm.weight": (hf("input_layernorm.weight"), None),
        f"layers.{i}.ffn_norm.weight": (hf("post_attention_layernorm.weight"), None),
        f"layers.{i}.attention.wq.weight": (gguf_permute(hf("self_attn.q_proj.weight"), c.num_attention_heads), 0),
        f"layers.{i}.attention.wk.weight": (gguf_permute(hf("self_attn.k_proj.weight"), c.num_key_value_heads), 0),
        f"layers.{i}.attention.wv.weight": (hf("self_attn.v_proj.weight"), 0),
        f"layers.{i}.attention.wo.weight": (hf("self_attn.o_proj.weight"), 1),
        f"layers.{i}.feed_forward.w1.weight": (hf("mlp.gate_proj.weight"), 0),
        f"layers.{i}.feed_forward.w3.weight": (hf("mlp.up_proj.weight"), 0),
        f"layers.{i}.feed_forward.w2.weight": (hf("mlp.down_proj.weight"), 1),
    })
  return [{name: (t.clone() if axis is None else torch.chunk(t, SHARDS, dim=axis)[k].clone()).contiguous()
           for name, (t, axis) in whole.items()} for k in range(SHARDS)]


@pytest.fixture(scope="module")
def meta_dir(tiny_hf_model, shakespeare_dir, tmp_path_factory):
  """(Meta directory, the transformers model it was written from)."""
  import torch
  from llama_hk.tokenizers import train_spm

  root = tmp_path_factory.mktemp("meta")
  lines = [line for line in (shakespeare_dir / "othello.txt").read_text().splitlines() if line.strip()]
  train_spm.train_tokenizer(lines, root / "tokenizer", vocab_size=VOCAB)
  model = tiny_hf_model(seed=8, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, rms_norm_eps=1e-5, random_norms=True)
  directory = root / "llama-tiny"
  directory.mkdir()
  for k, state in enumerate(_meta_state_dicts(model)):
    torch.save(state, directory / f"consolidated.{k:02d}.pth")
  (directory / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                                     "vocab_size": VOCAB, "multiple_of": 32, "norm_eps": 1e-5}))
  (directory / "tokenizer.model").write_bytes((root / "tokenizer" / "tokenizer.model").read_bytes())
  return directory, model


def test_meta_directory_gives_llama_cpp_legacy_converters_logits(meta_dir, shakespeare_dir, tmp_path):
  """Our reader's logits equal transformers' on llama.cpp's GGUF of the directory <= 1e-4 (and the original's),
  and the tokenizer gives the GGUF tokenizer's ids after LLaMA's BOS."""
  import jax
  import torch
  import transformers
  from llama_hk import checkpoints
  from llama_hk.models import make_forward

  directory, original = meta_dir
  gguf_file = tmp_path / "tiny.gguf"
  [converted] = harness.run_children([([sys.executable, LLAMA_CPP / "convert_legacy_llama.py", directory,
                                        "--outfile", gguf_file, "--outtype", "f32"],
                                       {"PYTHONPATH": str(LLAMA_CPP / "gguf-py")})], timeout=300)
  assert converted.returncode == 0, converted.stderr[-3000:]
  reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name,
                                                                dtype=torch.float32).eval()
  reference_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_file.name)

  assert checkpoints.detect_kind(directory) == "meta"
  ckpt = checkpoints.load(directory)
  text = (shakespeare_dir / "othello.txt").read_text()[:1500]
  ids = ckpt.tokenizer.encode(text)  # LLaMA's sentencepiece convention: BOS first.
  assert ids[0] == 1 and ids[1:] == reference_tokenizer(text, add_special_tokens=False)["input_ids"]
  assert len(ids) > 128
  tokens = np.array([ids[:128]])
  ours, _ = jax.jit(make_forward(ckpt.config).apply)(ckpt.params, tokens)
  with torch.no_grad():
    expected = reference(torch.from_numpy(tokens)).logits.numpy()
    original_logits = original(torch.from_numpy(tokens)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(ours), original_logits, atol=1e-4, rtol=0)
  assert ckpt.config.d_ff == 128 and ckpt.config.num_kv_heads == 2 and ckpt.config.max_seq_len == 4096


def test_meta_directory_without_params_json_is_a_one_line_error(meta_dir, tmp_path):
  directory = tmp_path / "broken"
  directory.mkdir()
  (directory / "consolidated.00.pth").write_bytes((meta_dir[0] / "consolidated.00.pth").read_bytes())
  output = tmp_path / "out"
  [result] = harness.run_children([([sys.executable, "bin/convert", f"--input={directory}", f"--output={output}"],
                                     None)], timeout=120)
  harness.assert_one_line_error(result, f"error: {directory}: has consolidated.*.pth files but no params.json",
                                outputs=[output])
