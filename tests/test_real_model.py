"""The real model (SmolLM2-135M-Instruct, GGUF and its transformers float32 copy) against transformers, on real text.

One transformers forward and one llama_hk forward per import are shared by the tests of this module. Every test
reads the 135M-parameter model, so all are in the slow tier; the fast tier checks the same paths on tiny models.
"""

import functools
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from llama_hk import checkpoints
from llama_hk.models import llama
from llama_hk.tokenizers.tokenizer import Tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
LOGITS_TOL = 1e-3
KL_TOL = 1e-3
PERPLEXITY_RTOL = 1e-4
PLAY = "julius_caesar.txt"
PERPLEXITY_CHARS = 8_000  # ~2500 tokens: 5 windows of 512, so bin/eval runs a full batch of 4 and a partial one.

NON_ASCII = ("Ça va? Größe, naïve café — «citation» ‘quoted’ … 東京タワー, Привет мир, مرحبا, 🎭🗡️ ok\n"
             "\ttabs\tand  double  spaces,\r\nCRLF lines and trailing space \n\n")
CHAT = [
    {"role": "system", "content": "You are a helpful assistant who knows Shakespeare."},
    {"role": "user", "content": "Who killed Caesar? Réponds en français, s'il te plaît."},
    {"role": "assistant", "content": "Brutus, Cassius et les autres conjurés — aux Ides de mars."},
    {"role": "user", "content": "Et tu, Brute? 🗡️"},
]


@pytest.fixture(scope="module")
def play_text(shakespeare_dir) -> str:
  """About 400 tokens of dialogue from the start of the play."""
  text = (shakespeare_dir / PLAY).read_text()
  start = text.index("ACT I.")
  return text[start:start + 1300]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_hf_dir):
  return transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)


@pytest.fixture(scope="module")
def hf_model(smollm2_hf_dir):
  return transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def real_ids(hf_tokenizer, play_text) -> np.ndarray:
  ids = np.asarray(hf_tokenizer(play_text).input_ids, np.int32)
  assert 256 <= len(ids) <= 512, len(ids)
  return ids


@pytest.fixture(scope="module")
def hf_logits(hf_model, real_ids) -> np.ndarray:
  with torch.inference_mode():
    return hf_model(torch.from_numpy(real_ids[None]).long()).logits[0].numpy()  # (T, V)


@functools.lru_cache(maxsize=None)
def _apply(config):
  return jax.jit(llama.make_forward(config).apply)


def _our_logits(ckpt, ids: np.ndarray) -> np.ndarray:
  logits, _ = _apply(ckpt.config)(ckpt.params, ids[None])
  return np.asarray(logits[0])  # (T, V)


@pytest.fixture(scope="module")
def ours_hf(smollm2_hf_dir):
  return checkpoints.load(smollm2_hf_dir)


@pytest.fixture(scope="module")
def ours_gguf(smollm2_gguf):
  return checkpoints.load(smollm2_gguf)


@pytest.fixture(scope="module")
def ours_hf_logits(ours_hf, real_ids) -> np.ndarray:
  return _our_logits(ours_hf, real_ids)


def _check_tokenizer(ours: Tokenizer, reference, play_text: str) -> None:
  ours_chat = ours.apply_chat_template(CHAT, add_generation_prompt=True)
  ref_chat = reference.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
  assert ours_chat == ref_chat
  assert "<|im_start|>" in ours_chat
  for name, text in {"play": play_text, "non_ascii": NON_ASCII, "chat": ours_chat}.items():
    expected = reference(text).input_ids
    got = ours.encode(text)
    assert got == expected, name
    assert ours.decode(got) == reference.decode(expected), name
  # The special tokens of the template are single ids, not spelled out.
  assert ours.encode("<|im_start|>user") == reference("<|im_start|>user").input_ids
  assert len(ours.encode("<|im_start|>")) == 1
  assert (ours.bos_id, ours.eos_id) == (reference.bos_token_id, reference.eos_token_id)


@pytest.mark.slow
def test_tokenizer_of_hf_copy_matches_transformers(smollm2_hf_dir, hf_tokenizer, play_text):
  _check_tokenizer(Tokenizer.from_dir(smollm2_hf_dir), hf_tokenizer, play_text)


@pytest.mark.slow
def test_tokenizer_rebuilt_from_gguf_matches_transformers(smollm2_gguf, ours_gguf, play_text):
  reference = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
  _check_tokenizer(ours_gguf.tokenizer, reference, play_text)


@pytest.mark.slow
def test_hf_copy_logits_match_transformers(ours_hf_logits, hf_logits):
  diff = float(np.max(np.abs(ours_hf_logits - hf_logits)))
  print(f"HF copy: max abs logits diff {diff:.2e} over {hf_logits.shape[0]} tokens "
        f"(logits up to {np.abs(hf_logits).max():.1f})")
  assert diff <= LOGITS_TOL
  # Same predictions, as a sanity check that the text is modelled at all.
  assert np.mean(ours_hf_logits.argmax(-1) == hf_logits.argmax(-1)) > 0.99


@pytest.mark.slow
def test_gguf_logits_match_transformers(ours_gguf, ours_hf, real_ids, hf_logits):
  assert ours_gguf.config == ours_hf.config
  # Dequantized GGUF weights equal transformers' own dequantization (Q/K rows un-permuted).
  for module, leaves in ours_hf.params.items():
    for name, leaf in leaves.items():
      np.testing.assert_array_equal(np.asarray(ours_gguf.params[module][name]), np.asarray(leaf),
                                    err_msg=f"{module}/{name}")
  logits = _our_logits(ours_gguf, real_ids)
  diff = float(np.max(np.abs(logits - hf_logits)))
  print(f"GGUF: max abs logits diff {diff:.2e}")
  assert diff <= LOGITS_TOL


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.mark.slow
def test_bfloat16_stays_close_to_float32(ours_hf, ours_hf_logits, real_ids):
  """bfloat16 parameters and activations: mean per-token KL(p_f32 || p_bf16) on real text."""
  config = ours_hf.config.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), ours_hf.params)
  assert all(leaf.dtype == ml_dtypes.bfloat16 for leaf in jax.tree.leaves(params))
  logits = _our_logits(checkpoints.Checkpoint(config, params, None), real_ids)
  assert logits.dtype == np.float32  # Logits stay float32 whatever the compute dtype.
  p32, p16 = _log_softmax(ours_hf_logits), _log_softmax(logits)
  kl = float(np.mean(np.sum(np.exp(p32) * (p32 - p16), axis=-1)))
  print(f"bfloat16: mean per-token KL(f32 || bf16) {kl:.2e}, top-1 agreement "
        f"{np.mean(logits.argmax(-1) == ours_hf_logits.argmax(-1)):.3f}")
  assert kl <= KL_TOL
  assert np.max(np.abs(logits - ours_hf_logits)) > 0  # bfloat16 really ran.


def _hf_perplexity(model, ids: list[int], window: int, batch: int = 4) -> tuple[float, int]:
  """Hugging Face's perplexity guide with stride = window: non-overlapping windows, every token but the first
  of each window scored; the mean NLL over scored tokens."""
  windows = [ids[i:i + window] for i in range(0, len(ids), window)]
  full = [w for w in windows if len(w) == window]
  groups = [full[i:i + batch] for i in range(0, len(full), batch)] + [[w] for w in windows if len(w) < window]
  total, count = 0.0, 0
  with torch.inference_mode():
    for group in groups:
      input_ids = torch.tensor(group)
      logits = model(input_ids).logits.float()
      nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                              input_ids[:, 1:].reshape(-1), reduction="sum")
      total += float(nll)
      count += input_ids[:, 1:].numel()
  return math.exp(total / count), count


@pytest.mark.slow
def test_eval_perplexity_matches_transformers(smollm2_hf_dir, shakespeare_dir, hf_model, hf_tokenizer, tmp_path):
  text = (shakespeare_dir / PLAY).read_text()[:PERPLEXITY_CHARS]
  text_file = tmp_path / "slice.txt"
  text_file.write_text(text)
  result_file = tmp_path / "result.json"
  window = 512
  proc = subprocess.run(
      [sys.executable, str(REPO / "bin" / "eval"), f"--checkpoint={smollm2_hf_dir}", f"--text_file={text_file}",
       f"--max_seq_len={window}", "--batch_size=4", f"--output_json={result_file}"],
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  ours = json.loads(result_file.read_text())
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == ours
  ids = hf_tokenizer(text).input_ids
  reference, count = _hf_perplexity(hf_model, ids, window)
  rel = abs(ours["perplexity"] - reference) / reference
  print(f"perplexity: ours {ours['perplexity']:.6f}, transformers {reference:.6f}, relative diff {rel:.2e} "
        f"({count} scored tokens)")
  assert ours["tokens"] == count
  assert ours["bytes"] == len(text.encode("utf-8"))
  assert rel <= PERPLEXITY_RTOL
  np.testing.assert_allclose(ours["bits_per_byte"], math.log2(reference) * count / len(text.encode()), rtol=1e-4)
