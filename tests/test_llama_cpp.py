"""llama.cpp itself (llama-cpp-python, built from source) as the reference: K-quant files made by llama.cpp's own
quantizer read as transformers' GGUF loader reads them, and the GGUF files `bin/convert` writes load, tokenize and
score in llama.cpp as in llama_hk."""

import ctypes
import sys

import numpy as np
import pytest

from llama_hk import checkpoints
from llama_hk.models import make_forward

import harness
from reference import llama_cpp_convert, write_hf_dir

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the test extra) is not installed")

pytestmark = pytest.mark.slow
# llama.cpp's K-quants work on rows of 256 values (other rows fall back to Q5_0/F16), so d_model and d_ff are
# multiples of 256.
FIELDS = dict(vocab_size=2000, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
              random_norms=True, weight_std=0.05)
QUANTIZED = {"q4_k_m": (llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "Q4_K"), "q6_k": (llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K, "Q6_K")}


def quantize(source, out, ftype: int):
  """llama.cpp's llama_model_quantize of a GGUF file."""
  params = llama_cpp.llama_model_quantize_default_params()
  params.ftype = ftype
  params.nthread = 1
  assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) == 0
  return out


@pytest.fixture(scope="module")
def model_files(tiny_hf_model, shakespeare_tokenizer_dir, smollm2_hf_dir, tmp_path_factory):
  """A random GQA checkpoint (sentencepiece vocabulary), llama.cpp's f32 GGUF of it and that file quantized by
  llama.cpp, and our f32 and q8_0 exports: name -> path, plus "hf" -> the HF directory; and a tied one with
  SmolLM2's BPE vocabulary, quantized the same ("bpe_" names)."""
  root = tmp_path_factory.mktemp("llama_cpp")
  hf_dir = write_hf_dir(tiny_hf_model(seed=4, **FIELDS), shakespeare_tokenizer_dir, root / "hf")
  bpe_dir = write_hf_dir(tiny_hf_model(seed=5, **{**FIELDS, "vocab_size": 49152}, tie_word_embeddings=True,
                                       bos_token_id=1, eos_token_id=2), smollm2_hf_dir, root / "bpe_hf")
  files = {"hf": hf_dir}
  for prefix, source in (("", hf_dir), ("bpe_", bpe_dir)):
    files[f"{prefix}f32"] = llama_cpp_convert(source, root / f"{prefix}f32.gguf", "f32")
    for name, (ftype, _) in QUANTIZED.items():
      files[prefix + name] = quantize(files[f"{prefix}f32"], root / f"{prefix}{name}.gguf", ftype)
  children = [([sys.executable, harness.REPO / "bin" / "convert", f"--input={hf_dir}", "--output_format=gguf",
                f"--gguf_type={t}", f"--output={root / f'ours_{t}.gguf'}"], {}) for t in ("f32", "q8_0")]
  for proc in harness.run_children(children, timeout=300):
    assert proc.returncode == 0, proc.stderr[-3000:]
  files.update({f"ours_{t}": root / f"ours_{t}.gguf" for t in ("f32", "q8_0")})
  return files


def _text_ids(shakespeare_dir, tokenizer) -> list[int]:
  return tokenizer.encode((shakespeare_dir / "julius_caesar.txt").read_text()[:6000])[:384]


@pytest.mark.parametrize("name", list(QUANTIZED))
@pytest.mark.parametrize("prefix", ["", "bpe_"])
def test_llama_cpp_quantized_files_give_transformers_gguf_logits(model_files, prefix, name, shakespeare_dir):
  """Q4_K_M (Q4_K with Q6_K rows) and Q6_K files from llama.cpp's quantizer, of the sentencepiece and the tied
  SmolLM2-BPE model: our logits equal transformers' GGUF loader's on the same file."""
  import gguf
  import torch
  import transformers

  path = model_files[prefix + name]
  types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
  assert QUANTIZED[name][1] in types, types
  ckpt = checkpoints.load(path)
  ids = np.array([_text_ids(shakespeare_dir, ckpt.tokenizer)[:128]])
  ours, _ = make_forward(ckpt.config).apply(ckpt.params, ids)  # (1, T, V)
  reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                dtype=torch.float32).eval()
  with torch.no_grad():
    expected = reference(torch.from_numpy(ids)).logits.numpy()
  print(f"{prefix}{name}: largest logit difference {np.abs(np.asarray(ours) - expected).max():.2e}")
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=0)


def _perplexities(path, ids) -> tuple[float, float, float]:
  """(ours, llama.cpp's) perplexity of ids[1:] given the tokens before, and the largest logit difference."""
  ckpt = checkpoints.load(path)
  ours, _ = make_forward(ckpt.config).apply(ckpt.params, np.array([ids]))  # (1, T, V)
  ours = np.asarray(ours[0], np.float64)
  llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids), n_batch=len(ids), n_threads=1, logits_all=True,
                        verbose=False, type_k=0, type_v=0)  # 0: GGML_TYPE_F32, a float32 KV cache.
  try:
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)], np.float64)  # (T, V)
  finally:
    llm.close()

  def perplexity(logits):
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    return float(np.exp(-np.mean(logp[np.arange(len(ids) - 1), ids[1:]])))
  return perplexity(ours), perplexity(theirs), float(np.abs(ours - theirs).max())


@pytest.mark.parametrize("gguf_type", ["f32", "q8_0"])
def test_our_exports_score_in_llama_cpp_as_here(model_files, gguf_type, shakespeare_dir):
  """llama.cpp loads our export, tokenizes a play as our tokenizer does, and its perplexity is ours within 1%."""
  path = model_files[f"ours_{gguf_type}"]
  tokenizer = checkpoints.load(model_files["hf"]).tokenizer
  text = (shakespeare_dir / "julius_caesar.txt").read_text()[:6000]
  ids = _text_ids(shakespeare_dir, tokenizer)
  llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
  try:
    assert llm.tokenize(text.encode(), add_bos=True)[:len(ids)] == ids
  finally:
    llm.close()
  ours, theirs, diff = _perplexities(path, ids)
  print(f"{gguf_type}: perplexity ours {ours:.4f}, llama.cpp {theirs:.4f}; largest logit difference {diff:.2e}")
  assert abs(theirs - ours) <= 0.01 * ours, (ours, theirs)
  if gguf_type == "f32":
    assert diff <= 1e-3, diff
