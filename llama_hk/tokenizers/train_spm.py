"""Trains a LLaMA-style sentencepiece BPE tokenizer on the documents of a split.

The trainer options are LLaMA's (byte fallback, digits split, identity normalization, whitespace kept, a dummy
prefix, `<unk>`/`<s>`/`</s>` at ids 0/1/2, no pad), so the result loads wherever a LLaMA-1/2 `tokenizer.model`
does. The trainer is fed lines from an iterator (no text file is written); the input is bounded by `max_input_chars`
and sentencepiece samples at most `max_sentences` of those lines.

The output directory holds `tokenizer.model` and `tokenizer_config.json`, written to a temporary directory beside
it and renamed into place, so it is never half-written. `transformers.AutoTokenizer.from_pretrained(dir)` loads it
as a LlamaTokenizer and `llama_hk.tokenizer.Tokenizer.from_dir(dir)` as sentencepiece; both give sentencepiece's
ids. One known difference: transformers 5 does not add the dummy prefix to text that already starts with a space,
where sentencepiece (and LLaMA) does.
"""

import io
import json
import os
import pathlib
from typing import Iterable, Iterator

import sentencepiece as spm

from llama_hk import io_utils
from llama_hk.errors import UserError, first_line

LLAMA_TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
    allow_whitespace_only_pieces=True,
    character_coverage=0.99995,
    max_sentencepiece_length=16,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
)
# Longest line, in bytes, that the trainer takes whole (LLaMA's value); longer lines are cut to fit.
MAX_SENTENCE_BYTES = 4192

TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    # legacy: the dummy prefix is added to every piece of text, as sentencepiece's own encode does.
    "legacy": True,
    "clean_up_tokenization_spaces": False,
}


def training_sentences(documents: Iterable[str], max_input_chars: int) -> Iterator[str]:
  """The non-empty lines of the documents, long ones cut to the trainer's limit, until max_input_chars are given."""
  max_chars = MAX_SENTENCE_BYTES // 4  # UTF-8 takes at most 4 bytes a character.
  given = 0
  for document in documents:
    for line in document.split("\n"):
      for start in range(0, len(line), max_chars):
        piece = line[start:start + max_chars]
        if given + len(piece) > max_input_chars:
          return
        given += len(piece)
        yield piece


def train_sentencepiece(documents: Iterable[str], vocab_size: int, max_sentences: int = 5_000_000,
                        max_input_chars: int = 1_000_000_000, num_threads: int | None = None) -> bytes:
  """A serialized LLaMA-style BPE sentencepiece model trained on the documents' lines."""
  if vocab_size <= 3 + 256:
    raise UserError(f"vocab_size={vocab_size} must exceed 259 (3 special and 256 byte-fallback pieces)")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_sentences(documents, max_input_chars), model_writer=model,
        vocab_size=vocab_size, input_sentence_size=max_sentences, shuffle_input_sentence=True,
        max_sentence_length=MAX_SENTENCE_BYTES, num_threads=num_threads or os.cpu_count(), minloglevel=1,
        **LLAMA_TRAINER_OPTIONS)
  except RuntimeError as e:
    raise UserError(f"vocab_size={vocab_size}: sentencepiece training failed: {first_line(e)}") from None
  return model.getvalue()


def _absent(output: str | os.PathLike) -> pathlib.Path:
  """The output path, which must not exist: a rename would silently replace an empty directory."""
  output = pathlib.Path(output)
  if output.exists():
    raise UserError(f"--output={output}: already exists; remove it or choose another directory")
  return output


def write_tokenizer_dir(model: bytes, output: str | os.PathLike) -> pathlib.Path:
  """Writes tokenizer.model and tokenizer_config.json into a temporary directory and renames it to `output`."""
  output = _absent(output)
  with io_utils.atomic_dir(output) as staging:
    (staging / "tokenizer.model").write_bytes(model)
    (staging / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
  return output


def train_tokenizer(documents: Iterable[str], output: str | os.PathLike, vocab_size: int,
                    max_sentences: int = 5_000_000, max_input_chars: int = 1_000_000_000) -> pathlib.Path:
  """Trains on the documents and writes the tokenizer directory; returns its path."""
  output = _absent(output)  # Fail before training, not after.
  model = train_sentencepiece(documents, vocab_size, max_sentences, max_input_chars)
  return write_tokenizer_dir(model, output)
