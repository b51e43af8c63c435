"""bin/eval over a TFDS split: packed batches score every document once, as transformers does document by document."""

import json
import math
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import torch

from llama_hk.data import pipeline, sources
from llama_hk.tokenizer import Tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
SEQ_LEN = 128


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

  # Reference: each document alone (BOS, text, EOS), cut into the pipeline's overlapping chunks, through torch.
  documents = list(sources.shakespeare("validation", str(shakespeare_data_dir), source_dir=str(shakespeare_dir)))
  total, count = 0.0, 0
  with torch.no_grad():
    for document in documents:
      ids = pipeline.tokenize_document(document, tokenizer)
      for chunk in pipeline.split_document(ids, SEQ_LEN):
        if len(chunk) < 2:
          continue
        logits = model(torch.tensor(chunk[None], dtype=torch.long)).logits[0, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:], dtype=torch.long), reduction="sum")
        total += float(nll)
        count += len(chunk) - 1
  num_bytes = sum(len(d.encode("utf-8")) for d in documents)
  assert ours["tokens"] == count
  assert ours["bytes"] == num_bytes
  assert abs(ours["nll"] - total / count) <= 1e-5 * (total / count), (ours, total / count)
  assert abs(ours["bits_per_byte"] - total / math.log(2) / num_bytes) <= 1e-5 * ours["bits_per_byte"]
  assert np.isclose(ours["perplexity"], math.exp(total / count), rtol=1e-5)
