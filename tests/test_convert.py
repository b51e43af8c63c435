"""Checkpoints: every format loads the same parameters wherever they are placed; bin/convert: HF -> llama_hk -> HF
is lossless and transformers loads the result; GGUF imports exactly."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.torch
import torch
import transformers

from llama_hk import checkpoints
from llama_hk import params
from llama_hk import sharding
from llama_hk.checkpoints import formats
from llama_hk.config import from_hf_config
from llama_hk.errors import UserError

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


@pytest.mark.slow
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


@pytest.mark.slow
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
  for module, tree in params.params_from_hf(state, expected).items():
    for name, leaf in tree.items():
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


def _assert_same_params(got, expected, label: str) -> None:
  assert sorted((m, n) for m, tree in got.items() for n in tree) == sorted(
      (m, n) for m, tree in expected.items() for n in tree), label
  for module, tree in expected.items():
    for name, leaf in tree.items():
      np.testing.assert_array_equal(np.asarray(got[module][name]), leaf, err_msg=f"{label}: {module}/{name}")


def test_every_format_loads_the_same_parameters_wherever_placed(tiny_hf_model, write_tiny_gguf, tiny_tokenizer,
                                                                 tmp_path):
  """HF safetensors, HF pytorch_model.bin, GGUF, llama_hk and a training model_dir are each detected as their
  kind and load the HF model's exact parameters: as NumPy, on the device, and sharded over a mesh."""
  hf = tiny_hf_model(seed=34, random_norms=True, vocab_size=VOCAB)
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  config = from_hf_config(hf.config.to_dict())
  expected = params.params_from_hf(state, config)
  hf.save_pretrained(tmp_path / "hf")
  tiny_tokenizer.save_pretrained(tmp_path / "hf")
  (tmp_path / "hf_bin").mkdir()
  (tmp_path / "hf_bin" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
  torch.save(hf.state_dict(), tmp_path / "hf_bin" / "pytorch_model.bin")
  write_tiny_gguf(tmp_path / "tiny.gguf", hf)
  checkpoints.save(tmp_path / "own", config, expected, None)
  model_dir = tmp_path / "model_dir"
  (model_dir / checkpoints.TRAINING_CHECKPOINTS_DIR / "7").mkdir(parents=True)
  (model_dir / checkpoints.CONFIG_FILE).write_text(config.to_json())
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save((model_dir / checkpoints.TRAINING_CHECKPOINTS_DIR / "7" / checkpoints.PARAMS_DIR).resolve(),
                      expected)
  assert checkpoints.latest_step(model_dir) == 7

  kinds = {"hf": "hf", "hf_bin": "hf", "tiny.gguf": "gguf", "own": "llama_hk", "model_dir": "model_dir"}
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  for name, kind in kinds.items():
    path = tmp_path / name
    assert checkpoints.detect_kind(path) == kind == formats.detect(path).name, name
    assert checkpoints.load_config(path).d_model == config.d_model, name
    for placement, kwargs in {"host": dict(on_device=False), "device": {}, "mesh": dict(mesh=mesh)}.items():
      ckpt = checkpoints.load(path, **kwargs)
      _assert_same_params(ckpt.params, expected, f"{name} on {placement}")
      leaf = ckpt.params["decoder/mlp"]["up_proj"]
      assert isinstance(leaf, np.ndarray) == (placement == "host"), (name, placement, type(leaf))
      if placement == "mesh":
        assert leaf.sharding == sharding.param_shardings(config, mesh)["decoder/mlp"]["up_proj"], name
  assert checkpoints.load(tmp_path / "hf").tokenizer.encode(SAMPLE) == tiny_tokenizer(SAMPLE).input_ids
  assert checkpoints.load(tmp_path / "own").tokenizer is None
  assert checkpoints.load(tmp_path / "own", dtype="bfloat16").params["norm"]["scale"].dtype == jax.numpy.bfloat16


def test_convert_and_export_in_process_leave_only_the_output(tiny_hf_model, write_tiny_gguf, tmp_path):
  """checkpoints.convert streams GGUF into llama_hk, export_hf writes what the HF reader reads back; an output
  that exists and is not empty is refused before anything is read."""
  hf = tiny_hf_model(seed=35, vocab_size=VOCAB, tie_word_embeddings=True)
  write_tiny_gguf(tmp_path / "tiny.gguf", hf)
  checkpoints.convert(tmp_path / "tiny.gguf", tmp_path / "own", dtype="bfloat16")
  own = checkpoints.load(tmp_path / "own", on_device=False)
  assert own.config.param_dtype == "bfloat16" and own.config.tie_embeddings and own.tokenizer is not None
  checkpoints.convert(tmp_path / "own", tmp_path / "exported", output_format="hf")
  exported = checkpoints.load(tmp_path / "exported", on_device=False)
  _assert_same_params(exported.params, own.params, "exported")
  assert exported.tokenizer.encode("the hen") == own.tokenizer.encode("the hen")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "own", "tiny.gguf"]  # No temporaries left.
  with pytest.raises(UserError, match="own: already exists and is not an empty directory"):
    checkpoints.convert(tmp_path / "tiny.gguf", tmp_path / "own")
