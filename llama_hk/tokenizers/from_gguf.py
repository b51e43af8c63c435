"""A GGUF file's vocabulary as a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json).

Built as transformers' GGUF loader builds it (GPT-2 byte-level BPE, control tokens special), so that both give the
same ids for the same file.
"""

import json
from typing import Any, Mapping

from llama_hk.errors import UserError
from llama_hk.tokenizers.tokenizer import Tokenizer

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types.


def tokenizer_from_gguf(metadata: Mapping[str, Any], source: str) -> Tokenizer:
  """The tokenizer that a GGUF file's key-value metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`) describes."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors

  kind = metadata.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise UserError(f"{source}: GGUF tokenizer type {kind!r} is not supported (only byte-level BPE, 'gpt2')")
  tokens = metadata["tokenizer.ggml.tokens"]
  merges = metadata.get("tokenizer.ggml.merges", [])
  types = metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))
  vocab = {token: i for i, token in enumerate(tokens)}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                                        continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  alphabet = set(pre_tokenizers.ByteLevel.alphabet())
  control = [t for t, kind in zip(tokens, types) if kind == _CONTROL and set(t) <= alphabet]
  tok.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True) for t in control])
  user_defined = [t for t, kind in zip(tokens, types) if kind == _USER_DEFINED]
  tok.add_tokens([tokenizers.AddedToken(t, normalized=False, special=False) for t in user_defined])

  def token(key):
    i = metadata.get(f"tokenizer.ggml.{key}")
    return tokens[int(i)] if i is not None else None

  tokenizer_config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
      "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id"),
      "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
      "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
      "clean_up_tokenization_spaces": False,
  }
  if "tokenizer.chat_template" in metadata:
    tokenizer_config["chat_template"] = metadata["tokenizer.chat_template"]
  files = {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": json.dumps(tokenizer_config).encode()}
  return Tokenizer(files, source=source)
