"""Evaluation: text windows score as Hugging Face's perplexity recipe does, whatever the batch size; bin/eval over a
TFDS split: packed batches score every document once, as transformers does document by document."""

import json
import math
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from llama_hk import params
from llama_hk.config import from_hf_config
from llama_hk.data import sources
from llama_hk.eval import perplexity as perplexity_lib
from llama_hk.tokenizers.tokenizer import Tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
SEQ_LEN = 128


def test_window_perplexity_equals_transformers_at_any_batch_size(tiny_hf_model):
  """100 tokens in windows of 32 (the last one 4 tokens, padded): each window's tokens but its first are scored, as
  the recipe scores each window alone; batches of 3 or the default (1), and the packed path, give the same figures."""
  model = tiny_hf_model(seed=9, weight_std=0.05)
  config = from_hf_config(model.config.to_dict())
  tree = params.params_from_hf({k: v.numpy() for k, v in model.state_dict().items()}, config)
  ids = np.random.default_rng(10).integers(0, config.vocab_size, size=100).tolist()
  total, count = 0.0, 0
  with torch.no_grad():
    for start in range(0, len(ids), 32):
      window = torch.tensor([ids[start:start + 32]], dtype=torch.long)
      logits = model(window).logits[0, :-1].double()
      total += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
      count += window.shape[1] - 1
  assert count == 100 - 4
  for batch_size in (None, 3):
    ours = perplexity_lib.perplexity(config, tree, ids, 32, batch_size, num_bytes=250)
    assert ours["tokens"] == count, (batch_size, ours)
    assert abs(ours["nll"] - total / count) <= 1e-5 * (total / count), (batch_size, ours, total / count)
    assert abs(ours["bits_per_byte"] - total / math.log(2) / 250) <= 1e-5 * ours["bits_per_byte"], ours
    assert np.isclose(ours["perplexity"], math.exp(total / count), rtol=1e-5)
  packed = perplexity_lib.split_perplexity(config, tree, perplexity_lib.window_batches(ids, 32, 3), num_bytes=250)
  assert packed["tokens"] == count and abs(packed["nll"] - total / count) <= 1e-5 * (total / count), packed


@pytest.mark.slow
def test_split_perplexity_equals_transformers_document_by_document(
    tiny_hf_model, shakespeare_data_dir, shakespeare_dir, shakespeare_tokenizer_dir, tmp_path):
  tokenizer = Tokenizer.from_dir(shakespeare_tokenizer_dir)
  model = tiny_hf_model(seed=7, vocab_size=tokenizer.vocab_size, weight_std=0.05)
  model.save_pretrained(tmp_path / "model")
  for name in tokenizer.files:
    shutil.copy(shakespeare_tokenizer_dir / name, tmp_path / "model" / name)

  result = subprocess.run(
      [sys.executable, REPO / "bin" / "eval", f"--checkpoint={tmp_path / 'model'}", "--split=validation",
       "--gin_file=gin/data/shakespeare.gin", f"--gin.DATA_DIR='{shakespeare_data_dir}'",
       f"--gin.SHAKESPEARE_SOURCE_DIR='{shakespeare_dir}'", f"--gin.SEQ_LEN={SEQ_LEN}", "--gin.BATCH_SIZE=16",
       f"--output_json={tmp_path / 'out.json'}"],
      capture_output=True, text=True, cwd=REPO, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  ours = json.loads((tmp_path / "out.json").read_text())

  # Reference: each document alone, tokenized by transformers (BOS, text, then EOS appended) and cut here into chunks
  # of SEQ_LEN overlapping by one token (so every next-token pair is scored once), through torch.
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
  documents = list(sources.shakespeare("validation", str(shakespeare_data_dir), source_dir=str(shakespeare_dir)))
  total, count, pairs = 0.0, 0, 0
  with torch.no_grad():
    for document in documents:
      ids = hf_tokenizer(document).input_ids + [hf_tokenizer.eos_token_id]
      pairs += len(ids) - 1
      assert ids[0] == hf_tokenizer.bos_token_id == 1
      for start in range(0, len(ids) - 1, SEQ_LEN - 1):
        chunk = ids[start:start + SEQ_LEN]
        logits = model(torch.tensor([chunk], dtype=torch.long)).logits[0, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:], dtype=torch.long), reduction="sum")
        total += float(nll)
        count += len(chunk) - 1
  assert count == pairs  # The chunks score every (token, next token) pair once.
  num_bytes = sum(len(d.encode("utf-8")) for d in documents)
  print(f"split nll {ours['nll']:.6f} vs {total / count:.6f}: {abs(ours['nll'] / (total / count) - 1):.1e} relative")
  assert ours["tokens"] == count
  assert ours["bytes"] == num_bytes
  assert abs(ours["nll"] - total / count) <= 1e-5 * (total / count), (ours, total / count)
  assert abs(ours["bits_per_byte"] - total / math.log(2) / num_bytes) <= 1e-5 * ours["bits_per_byte"]
  assert np.isclose(ours["perplexity"], math.exp(total / count), rtol=1e-5)
