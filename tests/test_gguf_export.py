"""GGUF export against llama.cpp's own converter and transformers' GGUF loader.

A random GQA model with SmolLM2's BPE tokenizer, saved by transformers, goes HF -> llama_hk -> GGUF through
`bin/convert`; llama.cpp's convert_hf_to_gguf.py (../shared/tools/llama.cpp) converts the same HF directory. The two
files must hold the same metadata and tensors, and transformers must load ours as the original model.
"""

import json
import pathlib
import shutil
import sys

import numpy as np
import pytest

import harness

LLAMA_CPP = harness.REPO.parent / "shared" / "tools" / "llama.cpp"
TYPES = ("f32", "f16", "bf16", "q8_0")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_dir(tiny_hf_model, smollm2_hf_dir, tmp_path_factory) -> pathlib.Path:
  """A random model (4/2 heads, untied head) with SmolLM2's tokenizer and chat template; d_model and d_ff are
  multiples of Q8_0's 32-value blocks."""
  directory = tmp_path_factory.mktemp("export") / "tiny"
  model = tiny_hf_model(seed=5, vocab_size=49152, hidden_size=64, intermediate_size=128, weight_std=0.1)
  model.save_pretrained(directory)
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(smollm2_hf_dir / name, directory / name)
  return directory


@pytest.fixture(scope="module")
def exports(hf_dir, tmp_path_factory) -> dict:
  """{type: (our GGUF, llama.cpp's GGUF)}: ours from a llama_hk conversion of hf_dir (f32 through bin/convert, the
  others by the library call it makes), llama.cpp's from hf_dir; the converter runs go side by side. Both are
  named as llama.cpp names the directory's model (general.name "Tiny")."""
  from llama_hk import checkpoints

  out = tmp_path_factory.mktemp("gguf")
  checkpoints.convert(hf_dir, out / "llama_hk")
  files = {t: (out / "ours" / t / "Tiny.gguf", out / "llama_cpp" / t / "Tiny.gguf") for t in TYPES}
  for ours, theirs in files.values():
    ours.parent.mkdir(parents=True)
    theirs.parent.mkdir(parents=True)
  reference = {"PYTHONPATH": f"{LLAMA_CPP / 'gguf-py'}:{LLAMA_CPP}"}
  results = harness.run_children(
      [([sys.executable, "bin/convert", f"--input={out / 'llama_hk'}", f"--output={files['f32'][0]}",
         "--output_format=gguf", "--gguf_type=f32"], None)]
      + [([sys.executable, LLAMA_CPP / "convert_hf_to_gguf.py", hf_dir, "--outfile", theirs, "--outtype", t], reference)
         for t, (_, theirs) in files.items()], timeout=300)
  for r in results:
    assert r.returncode == 0, r.stderr[-2000:]
  for t in TYPES[1:]:
    checkpoints.convert(out / "llama_hk", files[t][0], "gguf", gguf_type=t)
  return files


def _read(path) -> tuple[dict, dict]:
  """({metadata key: value}, {tensor name: (shape, type name, data)}) in the file's order, by llama.cpp's gguf-py."""
  sys.path.insert(0, str(LLAMA_CPP / "gguf-py"))
  try:
    import gguf
    reader = gguf.GGUFReader(path)
  finally:
    sys.path.remove(str(LLAMA_CPP / "gguf-py"))
  metadata = {k: f.contents() for k, f in reader.fields.items()}
  return metadata, {t.name: (t.shape.tolist(), t.tensor_type.name, np.array(t.data)) for t in reader.tensors}


def test_export_equals_llama_cpp_converter(exports):
  """Every type's file is byte for byte the one llama.cpp's converter writes for the same model (metadata keys
  and values, tokenizer and its pre-tokenizer name, tensor order, types, Q/K rows, alignment); llama.cpp's
  gguf-py reader lists in ours what the converter writes."""
  for gguf_type, (ours, theirs) in exports.items():
    assert ours.read_bytes() == theirs.read_bytes(), gguf_type
  metadata, tensors = _read(exports["q8_0"][0])
  assert [metadata[k] for k in ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                                "general.file_type")] == ["llama", "gpt2", "smollm", 7]
  assert tensors["blk.0.attn_q.weight"][1] == "Q8_0" and tensors["blk.0.attn_norm.weight"][1] == "F32"
  assert len(tensors) == 21


@pytest.fixture(scope="module")
def sentencepiece_dir(shakespeare_dir, tmp_path_factory):
  """A 500-piece sentencepiece tokenizer (tokenizer.model, tokenizer_config.json) trained on Othello."""
  from llama_hk.tokenizers import train_spm

  lines = [line for line in (shakespeare_dir / "othello.txt").read_text().splitlines() if line.strip()]
  return train_spm.train_tokenizer(lines, tmp_path_factory.mktemp("spm") / "tokenizer", vocab_size=500)


def _with_tokenizer(model, tokenizer_dir, directory):
  model.save_pretrained(directory)
  for path in tokenizer_dir.iterdir():
    shutil.copy(path, directory / path.name)
  return directory


def test_qwen2_exports_as_qwen2_and_loads_in_transformers(tiny_hf_model, sentencepiece_dir, tmp_path):
  """A Qwen2 model (q/k/v biases, HF's Q/K rows) exports as architecture qwen2; transformers' GGUF loader builds a
  Qwen2ForCausalLM from it, and our GGUF reader a qwen2 model, each with the original's logits <= 1e-4."""
  import jax
  import torch
  import transformers
  from llama_hk import checkpoints
  from llama_hk.models import make_forward

  model = tiny_hf_model(seed=3, family="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
                        pad_token_id=None)
  hf_dir = _with_tokenizer(model, sentencepiece_dir, tmp_path / "Tiny")
  checkpoints.convert(hf_dir, tmp_path / "out" / "Tiny.gguf", "gguf")
  assert _read(tmp_path / "out" / "Tiny.gguf")[0]["general.architecture"] == "qwen2"
  loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="Tiny.gguf",
                                                             dtype=torch.float32)
  tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    expected = model(tokens).logits.numpy()
    np.testing.assert_allclose(loaded(tokens).logits.numpy(), expected, atol=1e-4, rtol=0)
  assert type(loaded).__name__ == "Qwen2ForCausalLM"
  ckpt = checkpoints.load(tmp_path / "out" / "Tiny.gguf")  # Our reader: the qwen2 architecture, its rows as stored.
  assert ckpt.config.family == "qwen2"
  logits, _ = jax.jit(make_forward(ckpt.config).apply)(ckpt.params, tokens.numpy())
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


def test_sentencepiece_llama3_export_equals_llama_cpp_converter(tiny_hf_model, sentencepiece_dir, tmp_path):
  """A model with a sentencepiece tokenizer.model (trained here) and llama3 RoPE scaling: our q8_0 export holds
  the converter's metadata (the `llama` vocabulary with its scores and unused padding pieces) and tensors, bit for
  bit but for the RoPE factors (<= 1e-6 relative)."""
  from llama_hk import checkpoints

  model = tiny_hf_model(seed=4, vocab_size=512, hidden_size=64, intermediate_size=128, pad_token_id=None,
                        max_position_embeddings=16384, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192})
  hf_dir = _with_tokenizer(model, sentencepiece_dir, tmp_path / "Tiny")
  ours, theirs = tmp_path / "ours" / "Tiny.gguf", tmp_path / "Tiny.gguf"
  checkpoints.convert(hf_dir, ours, "gguf", gguf_type="q8_0")
  [reference] = harness.run_children([([sys.executable, LLAMA_CPP / "convert_hf_to_gguf.py", hf_dir, "--outfile",
                                        theirs, "--outtype", "q8_0"],
                                       {"PYTHONPATH": f"{LLAMA_CPP / 'gguf-py'}:{LLAMA_CPP}"})], timeout=300)
  assert reference.returncode == 0, reference.stderr[-2000:]
  (ours_metadata, ours_tensors), (metadata, tensors) = _read(ours), _read(theirs)
  assert ours_metadata == metadata and metadata["tokenizer.ggml.model"] == "llama"
  assert [(n, t[:2]) for n, t in ours_tensors.items()] == [(n, t[:2]) for n, t in tensors.items()]
  assert [n for n in tensors if not np.array_equal(ours_tensors[n][2], tensors[n][2])] == ["rope_freqs.weight"]
  # The factors from our float32 frequencies, against the converter's torch arithmetic: the last bit may differ.
  np.testing.assert_allclose(ours_tensors["rope_freqs.weight"][2], tensors["rope_freqs.weight"][2], rtol=1e-6)
  assert tensors["rope_freqs.weight"][2].max() == 8.0 and tensors["rope_freqs.weight"][2].min() == 1.0

  # llama.cpp's file read back: its factors as rope_freq_factors, exported to HF as the llama3 scaling they encode.
  config = checkpoints.load_config(theirs)
  assert config.rope_freq_factors is not None and config.rope_scaling == "none"
  checkpoints.convert(theirs, tmp_path / "hf", "hf")
  exported = json.loads((tmp_path / "hf" / "config.json").read_text())["rope_parameters"]
  assert exported == {**json.loads((hf_dir / "config.json").read_text())["rope_parameters"], "rope_type": "llama3"}


def test_rope_factors_without_a_llama3_form_refuse_hf_export(tmp_path):
  from llama_hk import checkpoints, config as config_lib, params
  from llama_hk.errors import UserError

  config = config_lib.LlamaConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=32,
                                  rope_freq_factors=(1.0, 3.0, 2.0, 5.0))
  tree = params.map_params(lambda row, _: np.zeros(row.full_shape(config), np.float32),
                           {p.module: {p.name: None} for p in params.table(config)})
  with pytest.raises(UserError, match="do not follow llama3 scaling"):
    checkpoints.export_hf(tmp_path / "hf", config, tree, None)
  assert not (tmp_path / "hf").exists()


def test_transformers_loads_the_f32_export_as_the_original(exports, hf_dir, shakespeare_dir):
  """transformers' GGUF loader on our f32 file: logits equal the HF original's <= 1e-4, and its tokenizer gives
  the original tokenizer's ids on a play's opening."""
  import torch
  import transformers

  path = exports["f32"][0]
  text = (shakespeare_dir / "julius_caesar.txt").read_text()[:3000]
  original = transformers.AutoTokenizer.from_pretrained(hf_dir)
  loaded = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  ids = original(text)["input_ids"]
  assert loaded(text)["input_ids"] == ids and len(ids) > 500
  tokens = torch.tensor([ids[:256]])
  with torch.no_grad():
    expected = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(tokens).logits
    got = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32)(tokens).logits
  np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4, rtol=0)


def test_q8_0_export_perplexity_within_one_percent_of_f32(exports, hf_dir, shakespeare_dir):
  """Our reader on the q8_0 and f32 exports: perplexity on a play's opening within 1% (and not equal: the matrices
  were quantized)."""
  import jax
  from llama_hk import checkpoints
  from llama_hk.models import make_forward

  def perplexity(path):
    ckpt = checkpoints.load(path)
    ids = np.array([ckpt.tokenizer.encode((shakespeare_dir / "othello.txt").read_text()[:2000])[:256]])
    logits, _ = jax.jit(make_forward(ckpt.config).apply)(ckpt.params, ids)
    logp = jax.nn.log_softmax(logits[0, :-1].astype(np.float64), axis=-1)
    return float(np.exp(-np.mean(np.take_along_axis(np.asarray(logp), ids[0, 1:, None], axis=-1))))

  f32, q8 = perplexity(exports["f32"][0]), perplexity(exports["q8_0"][0])
  assert f32 != q8 and abs(q8 - f32) <= 0.01 * f32, (f32, q8)


@pytest.mark.parametrize("flags, message", [
    (["--gguf_type=q4_k"], "--gguf_type=q4_k: not written (one of f32, f16, bf16, q8_0)"),
    (["--weights=int8"], "--weights=int8 is written as a llama_hk checkpoint only"),
])
def test_bad_export_flags_are_one_line_errors(hf_dir, tmp_path, flags, message):
  output = tmp_path / "out.gguf"
  [result] = harness.run_children([([sys.executable, "bin/convert", f"--input={hf_dir}", f"--output={output}",
                                     "--output_format=gguf", *flags], None)], timeout=120)
  harness.assert_one_line_error(result, message, outputs=[output])
  assert list(tmp_path.iterdir()) == []


def test_export_refuses_an_existing_file(hf_dir, tmp_path):
  from llama_hk import checkpoints
  from llama_hk.errors import UserError

  output = tmp_path / "out.gguf"
  output.write_text("keep me")
  with pytest.raises(UserError, match="already exists"):
    checkpoints.convert(hf_dir, output, "gguf")
  assert output.read_text() == "keep me"

