"""A GGUF file's vocabulary as a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json).

Two kinds of vocabulary (`tokenizer.ggml.model`): byte-level BPE (`gpt2`), split before merging as llama.cpp does
for the file's `tokenizer.ggml.pre`, and sentencepiece (`llama`), rebuilt as a BPE with byte fallback whose merges
follow the pieces' scores. Control tokens become special tokens and user-defined ones added tokens, as in llama.cpp
and transformers' GGUF loader.
"""

import json
from typing import Any, Mapping

from llama_hk.errors import UserError
from llama_hk.tokenizers.tokenizer import Tokenizer

_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # llama.cpp's token types.
_SPACE = "\u2581"  # Sentencepiece's word boundary.

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp) by `tokenizer.ggml.pre`, applied in turn: each splits the pieces
# the previous one left, keeping both what matches and what lies between.
PRE_TOKENIZER_SPLITS = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "llama-bpe": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
                  r"|\s+",),
    "qwen2": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "smollm": (r"\p{N}", _GPT2),
}


def tokenizer_from_gguf(metadata: Mapping[str, Any], source: str) -> Tokenizer:
  """The tokenizer that a GGUF file's key-value metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`) describes."""
  import tokenizers

  kind = metadata.get("tokenizer.ggml.model")
  tokens = metadata["tokenizer.ggml.tokens"]
  types = metadata.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens))
  if kind == "gpt2":
    tok, is_spelled = _byte_level_bpe(metadata, tokens, source)
  elif kind == "llama":
    tok, is_spelled = _sentencepiece_bpe(metadata, tokens, types), lambda token: True
  else:
    raise UserError(f"{source}: GGUF tokenizer type {kind!r} is not supported (only 'gpt2' and 'llama')")
  control = [t for t, token_type in zip(tokens, types) if token_type == _CONTROL and is_spelled(t)]
  tok.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True) for t in control])
  user_defined = [t for t, token_type in zip(tokens, types) if token_type == _USER_DEFINED]
  tok.add_tokens([tokenizers.AddedToken(t, normalized=False, special=False) for t in user_defined])

  def token(key):
    i = metadata.get(f"tokenizer.ggml.{key}")
    return tokens[int(i)] if i is not None else None

  tokenizer_config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
      "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id"),
      # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
      "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")),
      "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
      "clean_up_tokenization_spaces": False,
  }
  if "tokenizer.chat_template" in metadata:
    tokenizer_config["chat_template"] = metadata["tokenizer.chat_template"]
  files = {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": json.dumps(tokenizer_config).encode()}
  return Tokenizer(files, source=source)


def _byte_level_bpe(metadata: Mapping[str, Any], tokens: list[str], source: str):
  """GPT-2 byte-level BPE, and which tokens are spelled in its byte alphabet (only those can be control tokens)."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors

  merges = metadata.get("tokenizer.ggml.merges", [])
  vocab = {token: i for i, token in enumerate(tokens)}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                                        continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
  pre = metadata.get("tokenizer.ggml.pre")
  if pre is None:  # Files without `pre`: GPT-2's own split, inside ByteLevel.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  elif pre in PRE_TOKENIZER_SPLITS:
    splits = [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                   use_regex=False)])
  else:
    raise UserError(f"{source}: GGUF pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported "
                    f"(supported: {', '.join(PRE_TOKENIZER_SPLITS)})")
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  alphabet = set(pre_tokenizers.ByteLevel.alphabet())
  return tok, lambda token: set(token) <= alphabet


def _sentencepiece_bpe(metadata: Mapping[str, Any], tokens: list[str], types: list[int]):
  """A sentencepiece vocabulary as BPE with byte fallback (`<0xNN>` pieces): sentencepiece's BPE merges the
  adjacent pair whose union scores highest, so each such pair becomes a merge ranked by that score."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers

  scores = metadata.get("tokenizer.ggml.scores", [-float(i) for i in range(len(tokens))])
  vocab = {token: i for i, token in enumerate(tokens)}
  normal = {token for token, token_type in zip(tokens, types) if token_type == _NORMAL}
  ranked = []
  for token in normal:
    for cut in range(1, len(token)):
      left, right = token[:cut], token[cut:]
      if left in normal and right in normal:
        ranked.append((-float(scores[vocab[token]]), vocab[left], vocab[right], left, right))
  merges = [(left, right) for *_, left, right in sorted(ranked)]
  unk = metadata.get("tokenizer.ggml.unknown_token_id")
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[int(unk)] if unk is not None
                                        else None, fuse_unk=True, byte_fallback=True))
  prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="first" if prefix else "never",
                                               split=False)
  steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
  tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
  return tok
