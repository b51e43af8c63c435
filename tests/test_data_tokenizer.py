"""Tokenizer training: LLaMA's sentencepiece options, transformers and llama_hk.tokenizer agree, exact round trips."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from llama_hk.data import builders
from llama_hk.tokenizers import train_spm as tokenizer_training
from llama_hk.errors import UserError
from llama_hk.tokenizers.tokenizer import Tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
NON_ASCII = "Ça va? Grüße, naïve café — 東京タワー 🙂\tΕλληνικά\n\n  Ünïcödé…"


def test_llama_trainer_options(shakespeare_tokenizer_dir):
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString((shakespeare_tokenizer_dir / "tokenizer.model").read_bytes())
  trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
  assert trainer.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
  assert trainer.byte_fallback and trainer.split_digits and trainer.allow_whitespace_only_pieces
  assert normalizer.name == "identity" and normalizer.add_dummy_prefix and not normalizer.remove_extra_whitespaces
  assert [piece.piece for piece in proto.pieces[:3]] == ["<unk>", "<s>", "</s>"]
  assert (trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id) == (0, 1, 2, -1)
  assert len(proto.pieces) == 2000
  text_pieces = [p.piece for p in proto.pieces if p.type == sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL]
  assert all(sum(c.isdigit() for c in piece) <= 1 for piece in text_pieces)  # split_digits.
  assert sum(p.type == sentencepiece_model_pb2.ModelProto.SentencePiece.BYTE for p in proto.pieces) == 256


def test_transformers_and_llama_hk_give_sentencepiece_ids_on_held_out_plays(shakespeare_tokenizer_dir,
                                                                            shakespeare_dir):
  import transformers

  hf = transformers.AutoTokenizer.from_pretrained(shakespeare_tokenizer_dir)
  assert type(hf).__name__ in ("LlamaTokenizer", "LlamaTokenizerFast")
  ours = Tokenizer.from_dir(shakespeare_tokenizer_dir)
  sp = spm.SentencePieceProcessor(model_file=str(shakespeare_tokenizer_dir / "tokenizer.model"))
  assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (1, 2, None, 2000)
  texts = [(shakespeare_dir / f"{work}.txt").read_text() for work in builders.VALIDATION_WORKS]
  texts += [NON_ASCII, "Digits 0123456789, tabs\tand\r\nCRLF.", "x"]
  for text in texts:
    expected = [1] + sp.encode(text)
    assert hf(text).input_ids == expected
    assert ours.encode(text) == expected
    assert ours.encode(text, add_bos=False, add_eos=True) == expected[1:] + [2]


def test_decode_inverts_encode_exactly(shakespeare_tokenizer_dir, shakespeare_dir):
  ours = Tokenizer.from_dir(shakespeare_tokenizer_dir)
  texts = [path.read_text() for path in sorted(shakespeare_dir.glob("*.txt"))]
  assert len(texts) == 38
  for text in texts + [NON_ASCII, " leading and trailing spaces  ", "\n\nnewlines first", ""]:
    assert ours.decode(ours.encode(text, add_bos=False)) == text
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == text


def test_training_sentences_are_bounded_lines():
  documents = ["first line\n\nsecond " + "x" * 3000, "third"]
  sentences = list(tokenizer_training.training_sentences(documents, max_input_chars=10_000))
  assert sentences == ["first line", "second " + "x" * 1041, "x" * 1048, "x" * 911, "third"]
  assert list(tokenizer_training.training_sentences(documents, max_input_chars=15)) == ["first line"]


def test_bad_vocab_size_and_existing_output_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="vocab_size=100 must exceed 259"):
    tokenizer_training.train_tokenizer(["some text"], tmp_path / "out", vocab_size=100)
  with pytest.raises(UserError, match="vocab_size=5000: sentencepiece training failed"):
    tokenizer_training.train_tokenizer(["a tiny corpus"], tmp_path / "out", vocab_size=5000)
  with pytest.raises(UserError, match=f"--output={tmp_path}: already exists"):
    tokenizer_training.train_tokenizer(["some text"], tmp_path, vocab_size=300)
  assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.slow
def test_bin_train_tokenizer(shakespeare_data_dir, shakespeare_dir, tmp_path):
  output = tmp_path / "tokenizer"
  command = [sys.executable, str(REPO / "bin" / "train_tokenizer"), "--gin_file=gin/data/shakespeare.gin",
             f"--gin_bindings=DATA_DIR='{shakespeare_data_dir}'",
             f"--gin_bindings=SHAKESPEARE_SOURCE_DIR='{shakespeare_dir}'",
             "--gin_bindings=train_tokenizer.max_input_chars = 300_000", f"--output={output}", "--vocab_size=600"]
  subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
  assert sorted(os.listdir(tmp_path)) == ["tokenizer"]
  assert sorted(os.listdir(output)) == ["tokenizer.model", "tokenizer_config.json"]
  config = json.loads((output / "tokenizer_config.json").read_text())
  assert config["add_bos_token"] is True and config["add_eos_token"] is False
  assert Tokenizer.from_dir(output).vocab_size == 600
  again = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  assert again.returncode == 1
  assert again.stderr.strip().splitlines()[-1] == f"error: --output={output}: already exists; remove it or choose " \
                                                  "another directory"
