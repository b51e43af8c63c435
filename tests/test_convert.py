"""bin/convert: HF -> llama_hk -> HF is lossless and transformers loads the result; GGUF imports exactly."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from llama_hk import checkpoints
from llama_hk import param_names
from llama_hk.config import from_hf_config

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 320  # Model vocabulary; the tokenizer below uses the first 300 ids.
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
SAMPLE = "CASSIUS.\nThe fault, dear Brutus, is not in our stars — ¿qué? 東京 </s> <s>\n"


def convert(*args: str) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, str(REPO / "bin" / "convert"), *args], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  return proc


@pytest.fixture(scope="module")
def tiny_tokenizer(shakespeare_dir):
  """A 300-piece byte-level BPE tokenizer (BOS added, a chat template) as transformers saves one."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([(shakespeare_dir / "julius_caesar.txt").read_text()[:30_000]], trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                 unk_token="<unk>")
  wrapped.chat_template = CHAT_TEMPLATE
  return wrapped


def _weights(path: pathlib.Path) -> dict[str, torch.Tensor]:
  files = sorted(path.glob("*.safetensors"))
  assert files, path
  out = {}
  for f in files:
    out.update(safetensors.torch.load_file(f))
  return out


# float32: untied, llama3 RoPE, GQA; bfloat16: tied, linear RoPE, MQA, head_dim != d_model / heads.
ROUND_TRIP_CASES = {
    "float32": dict(random_norms=True, num_key_value_heads=2,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64}),
    "bfloat16": dict(random_norms=True, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
}


@pytest.mark.parametrize("dtype", list(ROUND_TRIP_CASES))
def test_hf_round_trip_is_lossless(dtype, tiny_hf_model, tiny_tokenizer, tmp_path):
  source, ours, exported = tmp_path / "source", tmp_path / "llama_hk", tmp_path / "exported"
  hf = tiny_hf_model(seed=30, vocab_size=VOCAB, **ROUND_TRIP_CASES[dtype]).to(getattr(torch, dtype))
  hf.save_pretrained(source)
  tiny_tokenizer.save_pretrained(source)
  convert(f"--input={source}", f"--output={ours}")
  assert (ours / checkpoints.CONFIG_FILE).is_file() and (ours / checkpoints.PARAMS_DIR).is_dir()
  assert checkpoints.load_config(ours).param_dtype == dtype
  convert(f"--input={ours}", f"--output={exported}", "--output_format=hf")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "llama_hk", "source"]  # No temporaries left.

  # Identical tensors, names and dtypes.
  before, after = _weights(source), _weights(exported)
  assert sorted(after) == sorted(before)
  for name, tensor in before.items():
    assert after[name].dtype == tensor.dtype == getattr(torch, dtype), name
    assert torch.equal(after[name], tensor), name

  # transformers loads the export as the same model and the same tokenizer.
  reference = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
  loaded = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
  assert loaded.dtype == reference.dtype == getattr(torch, dtype)
  for field in ("num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
                "rope_parameters", "rms_norm_eps", "max_position_embeddings", "vocab_size"):
    assert getattr(loaded.config, field) == getattr(reference.config, field), field
  tokens = torch.from_numpy(np.random.default_rng(31).integers(0, VOCAB, size=(2, 96)))
  with torch.no_grad():
    expected, got = reference(tokens).logits, loaded(tokens).logits
  assert torch.equal(got, expected)
  ref_tok = transformers.AutoTokenizer.from_pretrained(source)
  tok = transformers.AutoTokenizer.from_pretrained(exported)
  assert tok(SAMPLE).input_ids == ref_tok(SAMPLE).input_ids
  assert tok(SAMPLE).input_ids[0] == tok.bos_token_id == 1
  assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
  chat = [{"role": "user", "content": "Et tu, Brute?"}]
  assert (tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) ==
          ref_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
  assert json.loads((exported / "config.json").read_text())["bos_token_id"] == 1


def test_gguf_import_matches_hf(tiny_hf_model, write_tiny_gguf, tmp_path):
  """A GGUF written the llama.cpp way (Q/K rows permuted, GQA) imports to exactly the HF model's parameters,
  and bin/convert exports it back to the HF tensors."""
  hf = tiny_hf_model(seed=32, random_norms=True, num_attention_heads=8, num_key_value_heads=2, vocab_size=VOCAB)
  gguf_path = tmp_path / "tiny.gguf"
  write_tiny_gguf(gguf_path, hf)
  ckpt = checkpoints.load(gguf_path)
  expected = from_hf_config(hf.config.to_dict())
  # GGUF keeps the epsilon as float32.
  assert ckpt.config == expected.replace(max_seq_len=ckpt.config.max_seq_len, norm_eps=float(np.float32(1e-5)))
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  for module, leaves in param_names.params_from_hf(state, expected).items():
    for name, leaf in leaves.items():
      np.testing.assert_array_equal(np.asarray(ckpt.params[module][name]), leaf, err_msg=f"{module}/{name}")
  exported = tmp_path / "exported"
  convert(f"--input={gguf_path}", f"--output={exported}", "--output_format=hf")
  after = _weights(exported)
  assert sorted(after) == sorted(state)
  for name, tensor in state.items():
    assert torch.equal(after[name], torch.from_numpy(tensor)), name
  # Its tokenizer, rebuilt from the GGUF metadata, encodes as transformers' own GGUF tokenizer does.
  text = "<|im_start|>user\nÉté à Rome, the theatre<|im_end|>"
  reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_path.name)
  tok = transformers.AutoTokenizer.from_pretrained(exported)
  ids = tok(text).input_ids
  assert ids == reference(text).input_ids
  assert ids[0] == 1 and ids[-1] == 2 and ids.count(tok.convert_tokens_to_ids("Ġthe")) == 2
