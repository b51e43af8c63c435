"""GGUF import against independent references: files written by llama.cpp's own converter from random HF checkpoints
give transformers' GGUF loader's logits (the HF original's where the file has rope_freqs) and AutoTokenizer's ids;
quantized tensors dequantize as gguf-py does; bad files are one-line errors."""

import re
import pathlib
import subprocess
import sys

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from llama_hk import checkpoints
from llama_hk.checkpoints import gguf as gguf_format
from llama_hk.models import make_forward

import harness
from reference import llama_cpp_convert, write_hf_dir

REPO = pathlib.Path(__file__).resolve().parents[1]
TEXTS = ["KING HENRY.\nOnce more unto the breach, dear friends, once more;",
         "  Or close the wall up with our English dead!",
         "In 1599, 42 actors — ¿qué? café 東京 don't they'll", "\n\nWhat's\tthis?  Éte\u0301 123456789 x"]
TOKENS = np.random.default_rng(0).integers(3, 1000, size=(2, 48))  # (B, T), ids below every vocabulary's size.



def our_logits(path: pathlib.Path) -> np.ndarray:
  ckpt = checkpoints.load(path)
  logits, _ = make_forward(ckpt.config).apply(ckpt.params, jnp.asarray(TOKENS))  # (B, T, V)
  return np.asarray(logits)


def hf_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(TOKENS)).logits.numpy()  # (B, T, V)


def transformers_gguf_logits(path: pathlib.Path) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
  return hf_logits(model.eval())


OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # Every --outtype of llama.cpp's converter; its quantizer: test_llama_cpp.py.


@pytest.fixture(scope="module")
def converted(tiny_hf_model, shakespeare_tokenizer_dir, smollm2_hf_dir, tmp_path_factory):
  """Random HF checkpoints and llama.cpp's GGUF files of them: name -> (HF dir, HF model, {outtype: gguf path})."""
  root = tmp_path_factory.mktemp("gguf_import")
  spm = tiny_hf_model(seed=1, vocab_size=2000, num_attention_heads=4, num_key_value_heads=2, random_norms=True)
  llama3 = tiny_hf_model(seed=2, vocab_size=2000, hidden_size=128, num_attention_heads=4, num_key_value_heads=1,
                         rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=64))
  bpe = tiny_hf_model(seed=3, vocab_size=49152, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
  plan = {"spm": (spm, shakespeare_tokenizer_dir, OUTTYPES),
          "llama3": (llama3, shakespeare_tokenizer_dir, ("f32",)),
          "smollm": (bpe, smollm2_hf_dir, OUTTYPES)}
  out = {}
  for name, (model, tokenizer_dir, outtypes) in plan.items():
    hf_dir = write_hf_dir(model, tokenizer_dir, root / name)
    out[name] = (hf_dir, model, {t: llama_cpp_convert(hf_dir, root / f"{name}_{t}.gguf", t) for t in outtypes})
  return out


@pytest.mark.slow
@pytest.mark.parametrize("outtype", OUTTYPES)
@pytest.mark.parametrize("name", ["spm", "smollm"])
def test_llama_cpp_files_give_transformers_gguf_logits(converted, name, outtype):
  """GQA, untied (spm) and tied (smollm) checkpoints in each outtype: our logits are transformers' GGUF loader's on
  the same file."""
  _, model, files = converted[name]
  ours, reference = our_logits(files[outtype]), transformers_gguf_logits(files[outtype])
  assert np.abs(ours - reference).max() <= 1e-4
  if outtype == "f32":  # And the file is the model: the HF original's logits too.
    assert np.abs(ours - hf_logits(model)).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm", "spm"])  # smollm first: its file is still parsed from the test above.
def test_tokenizer_ids_equal_autotokenizer_on_the_original(converted, shakespeare_dir, name):
  """Sentencepiece (byte fallback, dummy prefix, BOS) and SmolLM2's BPE (pre = smollm) vocabularies rebuilt from the
  file encode Shakespeare as AutoTokenizer on the HF original does."""
  hf_dir, _, files = converted[name]
  path = next(iter(files.values()))
  tok = gguf_format.GgufFile().tokenizer(path)
  reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
  play = sorted(pathlib.Path(shakespeare_dir).rglob("*"))
  texts = TEXTS + [p.read_text(errors="ignore")[:3000] for p in play if p.is_file() and p.suffix in (".txt", "")][:2]
  for text in texts:
    assert tok.encode(text) == reference(text).input_ids, text
    assert tok.decode(tok.encode(text, add_bos=False)) == reference.decode(reference(text, add_special_tokens=False)
                                                                              .input_ids)
  if name == "spm":  # Byte fallback pieces are used for the characters outside the 2000 pieces.
    assert any(tok.token_bytes(i).startswith(b"\xe6") for i in tok.encode("東京"))


@pytest.mark.slow
def test_rope_freqs_apply_as_llama3_scaling(converted):
  """llama.cpp writes llama3 RoPE scaling as rope_freqs.weight, which transformers' GGUF loader ignores: the factors
  land in LlamaConfig.rope_freq_factors and the logits are the HF original's (llama3 rope, f32)."""
  _, model, files = converted["llama3"]
  ckpt = checkpoints.load(files["f32"])
  factors = np.asarray(ckpt.config.rope_freq_factors)
  assert ckpt.config.rope_scaling == "none" and factors.shape == (16,) and factors[0] == 1 and factors[-1] == 8
  ours, original = our_logits(files["f32"]), hf_logits(model)
  assert np.abs(ours - original).max() <= 1e-4
  # Without the factors the logits are visibly off: the test sees the rope.
  plain = make_forward(ckpt.config.replace(rope_freq_factors=None)).apply(ckpt.params, jnp.asarray(TOKENS))[0]
  assert np.abs(np.asarray(plain) - original).max() > 1e-2


# K-quants and the legacy block types, written with gguf-py (llama.cpp's quantizer is not used): gguf.quants quantizes
# the legacy types; K-type blocks are random bytes with finite fp16 scales. Each type's fp16 scale offsets in its block
# and their size, chosen so that weights stay around 0.05.
K_SCALES = {"Q2_K": ((80, 82), 4e-3), "Q3_K": ((108,), 1.25e-3), "Q4_K": ((0, 2), 2e-4), "Q5_K": ((0, 2), 1e-4),
            "Q6_K": ((208,), 5e-5)}
LAYER_TYPES = [("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1"),
               ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "Q4_1")]
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def quantized(array: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, object]:
  """`array` (or random K-type blocks of its shape) as raw GGUF bytes (rows, bytes per row) of type `kind`."""
  qtype = gguf.GGMLQuantizationType[kind]
  if kind not in K_SCALES:
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  blocks = rng.integers(0, 256, size=(array.size // block, size), dtype=np.uint8)
  offsets, scale = K_SCALES[kind]
  for offset in offsets:
    blocks[:, offset:offset + 2] = (rng.uniform(0.5, 1.5, (len(blocks), 1)) * scale).astype(np.float16).view(np.uint8)
  return blocks.reshape(array.shape[0], -1), qtype


def write_quantized(path, model, write_tiny_gguf, types: dict[str, str]) -> None:
  rng = np.random.default_rng(7)
  write_tiny_gguf(path, model, encode=lambda name, array: quantized(array, types[name], rng) if name in types else None)


@pytest.fixture(scope="module")
def kquant_model(tiny_hf_model):
  return tiny_hf_model(seed=4, weight_std=0.06, vocab_size=1024, hidden_size=256, intermediate_size=256,
                       num_attention_heads=4, num_key_value_heads=2)


def test_every_tensor_type_dequantizes_as_gguf_py(kquant_model, write_tiny_gguf, tmp_path):
  """F16, BF16 and all eleven block types load bitwise as gguf-py's gguf.quants.dequantize gives them, in the
  tensor's (rows, columns) shape, and as transformers' own dequantizer does for the block types it reads (all but
  Q5_0/Q5_1)."""
  from transformers.integrations.gguf import dequant
  kinds = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
  names = [f"blk.{i}.{m}.weight" for i in range(2) for m in MATRICES]
  types = dict(zip(names, kinds))
  path = tmp_path / "all_types.gguf"
  write_quantized(path, kquant_model, write_tiny_gguf, types)
  get = gguf_format.GgufFile().tensors(path)
  for t in gguf.GGUFReader(path).tensors:
    if t.name in types:
      assert t.tensor_type.name == types[t.name]
      expected = gguf.quants.dequantize(t.data, t.tensor_type)
      got = np.asarray(get(t.name))
      assert got.shape == tuple(int(n) for n in reversed(t.shape)) and np.isfinite(got).all(), t.name
      np.testing.assert_array_equal(got.astype(np.float32), expected.astype(np.float32), err_msg=t.name)
      if t.tensor_type in dequant.GGML_NAME:
        independent = dequant.dequantize(torch.from_numpy(np.asarray(t.data).reshape(-1).copy()), int(t.tensor_type))
        np.testing.assert_array_equal(got.reshape(-1), independent.numpy(), err_msg=t.name)
      assert 0.005 < np.std(got) < 1, (t.name, np.std(got))


def test_k_quant_model_gives_transformers_gguf_logits(kquant_model, write_tiny_gguf, tmp_path):
  """A model whose fourteen matrices are Q2_K..Q6_K, Q4_0, Q4_1 and Q8_0: logits equal transformers' GGUF loader's
  (its own dequantization) on the same file."""
  types = {f"blk.{i}.{m}.weight": kind for i, kinds in enumerate(LAYER_TYPES) for m, kind in zip(MATRICES, kinds)}
  path = tmp_path / "kquant.gguf"
  write_quantized(path, kquant_model, write_tiny_gguf, types)
  ours, reference = our_logits(path), transformers_gguf_logits(path)
  assert np.abs(reference).max() > 1 and np.abs(ours - reference).max() <= 1e-4


def test_narrow_loads_of_quantized_matrices_go_block_by_block(kquant_model, write_tiny_gguf, tmp_path, monkeypatch):
  """--weights=int8 and bfloat16 of a K-quant file, its matrices dequantized a few rows at a time (blocks of 512
  values here): bitwise the narrowing of the whole float32 load (params.quantized, astype bfloat16)."""
  import ml_dtypes
  from llama_hk import params

  types = {f"blk.{i}.{m}.weight": kind for i, kinds in enumerate(LAYER_TYPES) for m, kind in zip(MATRICES, kinds)}
  path = tmp_path / "kquant.gguf"
  write_quantized(path, kquant_model, write_tiny_gguf, types)
  full = checkpoints.load(path, on_device=False).params
  monkeypatch.setattr(gguf_format, "DEQUANTIZE_CHUNK", 512)
  int8, bf16 = (checkpoints.load(path, dtype=d, on_device=False).params for d in ("int8", "bfloat16"))
  for tree, expected in ((int8, params.quantized(full)),
                         (bf16, {m: {n: a.astype(ml_dtypes.bfloat16) for n, a in leaves.items()}
                                 for m, leaves in full.items()})):
    assert tree.keys() == expected.keys()
    for module in tree:
      for name, leaf in tree[module].items():
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected[module][name]), err_msg=f"{module}/{name}")
  on_device = checkpoints.load(path, dtype="bfloat16").params  # Stacks assembled on the device as their bits.
  for module in bf16:
    for name, leaf in bf16[module].items():
      assert on_device[module][name].dtype == ml_dtypes.bfloat16, (module, name)
      np.testing.assert_array_equal(np.asarray(on_device[module][name]), leaf, err_msg=f"{module}/{name}")


def test_bfloat16_stack_is_assembled_on_device_without_a_float32_copy():
  """XLA:CPU updates a layer of a bfloat16 buffer through a float32 copy of the whole (L, ...) stack; DeviceLeaf
  writes the layers into a uint16 buffer of the same bits, whose update has no float32 at all."""
  import ml_dtypes
  from llama_hk.checkpoints import leaves

  leaf = leaves.DeviceLeaf("decoder/mlp", "gate_proj", (4, 64, 96), ml_dtypes.bfloat16)
  layer = np.zeros((64, 96), leaf.array.dtype)
  assert "f32" not in leaves._set_layer(None).lower(leaf.array, layer, 0).compile().as_text()
  assert "f32" in leaves._set_layer(None).lower(leaf.array.astype(ml_dtypes.bfloat16), layer.astype(
      ml_dtypes.bfloat16), 0).compile().as_text()  # What the bits avoid, on this backend.


SPLIT_TEXT = "Hello's WORLD'LL 12345 x+=1;\n\n  ça  va?\r\n"


def pre_tokenizer(tok):
  """The pre-tokenizer of the tokenizer.json that the import rebuilt."""
  import tokenizers
  return tokenizers.Tokenizer.from_str(tok.files["tokenizer.json"].decode()).pre_tokenizer


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_bpe_pre_tokenizers_split_as_transformers_gguf(pre, tiny_hf_model, write_tiny_gguf, tmp_path):
  """tokenizer.ggml.pre = llama-bpe / qwen2: the text splits into transformers' GGUF tokenizer's pieces and ids."""
  path = tmp_path / f"{pre}.gguf"
  write_tiny_gguf(path, tiny_hf_model(vocab_size=288), pre=pre)
  ours = gguf_format.GgufFile().tokenizer(path)
  reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
  pieces = pre_tokenizer(ours).pre_tokenize_str(SPLIT_TEXT)
  assert pieces == reference.backend_tokenizer.pre_tokenizer.pre_tokenize_str(SPLIT_TEXT)
  assert ("Ġ12345" in [p for p, _ in pieces]) is False  # Digits split off (three or one at a time).
  assert ours.encode(SPLIT_TEXT) == reference(SPLIT_TEXT).input_ids


def test_default_and_absent_pre_tokenizers(tiny_hf_model, write_tiny_gguf, tmp_path):
  """pre = default runs llama.cpp's four default regexes in turn (punctuation runs, GPT-2's split, digit runs, then
  digit triples); a file without `pre` keeps GPT-2's byte-level split."""
  pieces = {}
  for pre in ("default", None):
    path = tmp_path / f"{pre}.gguf"
    write_tiny_gguf(path, tiny_hf_model(vocab_size=288), pre=pre)
    tok = gguf_format.GgufFile().tokenizer(path)
    pieces[pre] = [p for p, _ in pre_tokenizer(tok).pre_tokenize_str("x+=12345 it's")]
  assert pieces["default"] == ["x", "+=", "123", "45", "Ġit", "'", "s"]
  assert pieces[None] == ["x", "+=", "12345", "Ġit", "'s"]


@pytest.fixture(scope="module")
def bad_files(tiny_hf_model, write_tiny_gguf, tmp_path_factory) -> dict[str, pathlib.Path]:
  root = tmp_path_factory.mktemp("bad_gguf")
  model = tiny_hf_model(vocab_size=288)
  paths = {name: root / f"{name}.gguf" for name in ("arch", "pre", "type", "good", "truncated")}
  write_tiny_gguf(paths["arch"], model, arch="qwen3")
  write_tiny_gguf(paths["pre"], model, pre="no-such-pre")
  write_tiny_gguf(paths["type"], model, {"blk.0.ffn_up.weight": gguf.GGMLQuantizationType.IQ4_NL})
  write_tiny_gguf(paths["good"], model)
  paths["truncated"].write_bytes(paths["good"].read_bytes()[:-1000])
  return paths


BAD_GGUF = {
    "arch": r"GGUF architecture is 'qwen3', supported: llama, qwen2",
    "pre": r"GGUF pre-tokenizer tokenizer\.ggml\.pre='no-such-pre' is not supported",
    "type": r"tensor blk\.0\.ffn_up\.weight has unsupported GGUF type IQ4_NL",  # gguf-py could dequantize it.
    "truncated": r"truncated or corrupt GGUF file",
}


@pytest.mark.parametrize("case", list(BAD_GGUF))
def test_bad_gguf_is_a_one_line_error_and_writes_nothing(case, bad_files, tmp_path):
  message = harness.raises_one_line_error(BAD_GGUF[case], checkpoints.convert, bad_files[case], tmp_path / "converted")
  assert str(bad_files[case]) in message
  assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_bin_convert_rejects_truncated_gguf(bad_files, tmp_path):
  """The binary too: exit 1, one `error:` line naming the file, no output directory."""
  proc = subprocess.run([sys.executable, str(REPO / "bin" / "convert"), f"--input={bad_files['truncated']}",
                         f"--output={tmp_path / 'converted'}"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and proc.stdout == "", proc.stderr
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad_files["truncated"]) in lines[0], proc.stderr
  assert re.search(BAD_GGUF["truncated"], lines[0]) and list(tmp_path.iterdir()) == []
