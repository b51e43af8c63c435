"""GGUF export: a model as one llama.cpp GGUF file, with llama.cpp's metadata keys, Q/K row order and tokenizer.

What `convert_hf_to_gguf.py` writes for a LLaMA, written here from a parameter tree: the `llama.*` hyperparameters,
`general.file_type`, the tokenizer (`gpt2` byte-level BPE from tokenizer.json, or a sentencepiece `llama`
vocabulary from tokenizer.model) with the `tokenizer.ggml.pre` name llama.cpp gives that BPE pre-tokenizer, the
chat template, and llama3 RoPE scaling as the per-frequency factors `rope_freqs.weight`. Tensors are made one at a
time as they are written (HF layout, Q and K rows permuted as llama.cpp stores them); the file is written under a
temporary name and renamed.
"""

import hashlib
import json
import os
import pathlib

import numpy as np

from llama_hk import io_utils
from llama_hk import params
from llama_hk.config import LlamaConfig
from llama_hk.errors import UserError
from llama_hk.models import rope
from llama_hk.tokenizers.tokenizer import Tokenizer

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # --gguf_type: what the matrices are written as (1-D tensors: F32).

# llama.cpp names a BPE pre-tokenizer by hashing the ids its tokenizer gives this text (convert_hf_to_gguf.py's
# get_vocab_base_pre); these are its hashes for the pre-tokenizers of the LLaMA family that llama.cpp implements.
_PRE_TOKENIZER_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 "
    "33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding-0.6B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # gpt2
}
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED = 1, 2, 3, 4, 5  # llama.cpp's token types.


def architecture(config: LlamaConfig) -> str:
  """The GGUF architecture llama.cpp's converter writes: `qwen2` for Qwen2, else `llama` (Mistral too, its window
  dropped, as llama.cpp writes it)."""
  return "qwen2" if config.family == "qwen2" else "llama"


def check_type(gguf_type: str) -> None:
  if gguf_type not in GGUF_TYPES:
    raise UserError(f"--gguf_type={gguf_type}: not written (one of {', '.join(GGUF_TYPES)})")


def export(path: str | os.PathLike, config: LlamaConfig, tree, tokenizer: Tokenizer | None,
           gguf_type: str = "f32") -> None:
  """Writes `tree` (float parameters of `config`) and `tokenizer` as the GGUF file `path`, atomically."""
  import gguf

  check_type(gguf_type)
  if tokenizer is None:
    raise UserError("GGUF export needs a tokenizer, and the checkpoint has none")
  if config.rope_scaling not in ("none", "linear", "llama3"):
    raise UserError(f"rope_scaling {config.rope_scaling!r} has no GGUF form")
  path = pathlib.Path(path)
  tensors = _tensors(tree, config)
  with io_utils.atomic_file(path) as tmp:
    writer = gguf.GGUFWriter(str(tmp), architecture(config))
    _write_model_metadata(writer, config, path.stem, gguf_type, sum(int(np.prod(s)) for _, s, _ in tensors))
    _write_tokenizer(writer, tokenizer, config.vocab_size)
    encoded = []
    for name, shape, make in tensors:
      qtype = _tensor_type(name, shape, gguf_type)
      block, type_size = gguf.GGML_QUANT_SIZES[qtype]
      nbytes = int(np.prod(shape)) // block * type_size
      raw_shape = (*shape[:-1], shape[-1] // block * type_size)
      writer.add_tensor_info(name, raw_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
      encoded.append((make, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for make, qtype in encoded:
      writer.write_tensor_data(gguf.quants.quantize(np.asarray(make(), np.float32), qtype).view(np.uint8))
    writer.close()


def _tensors(tree, config: LlamaConfig) -> list[tuple[str, tuple[int, ...], object]]:
  """(GGUF name, HF-layout shape, make) of every tensor, `make()` building its float32 array when called.

  In the converter's order: the RoPE factors, then the tensors by HF name (the order of a safetensors file)."""
  gguf_names = {p.hf: p for p in params.table(config)}
  out = []
  factors = _rope_factors(config)
  if factors is not None:
    out.append(("rope_freqs.weight", factors.shape, lambda: factors))
  for hf_name, shape, make in sorted(params.hf_tensors(tree, config), key=lambda t: t[0]):
    row, layer = _row_of(hf_name, gguf_names)
    if row.gguf_heads and params.gguf_permutes_qk(config):
      make = (lambda make=make, heads=getattr(config, row.gguf_heads): params.permute_gguf_rows(make(), heads))
    out.append((row.gguf.format(i=layer), tuple(shape), make))
  return out


def _rope_factors(config: LlamaConfig) -> np.ndarray | None:
  """rope_freqs.weight (K/2,): the factors a GGUF gave, as they came, or those of llama3 scaling; None without."""
  if config.rope_freq_factors is not None:
    return np.asarray(config.rope_freq_factors, np.float32)
  if config.rope_scaling == "llama3":
    unscaled = rope.rope_frequencies(config.replace(rope_scaling="none"))
    return (unscaled / rope.rope_frequencies(config)).astype(np.float32)
  return None


def _row_of(hf_name: str, rows: dict) -> tuple[params.Param, int | None]:
  """The table row of an HF tensor name, and its layer."""
  parts = hf_name.split(".")
  if hf_name.startswith("model.layers."):
    return rows[".".join(parts[:2] + ["{i}"] + parts[3:])], int(parts[2])
  return rows[hf_name], None


def _tensor_type(name: str, shape, gguf_type: str):
  """llama.cpp's choice: 1-D tensors (norms, RoPE factors) stay F32, matrices take the file's type."""
  import gguf

  if len(shape) == 1:
    return gguf.GGMLQuantizationType.F32
  return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]


def _write_model_metadata(writer, config: LlamaConfig, name: str, gguf_type: str, parameters: int) -> None:
  import gguf

  writer.add_type(gguf.GGUFType.MODEL)
  writer.add_name(name)
  writer.add_size_label(gguf.size_label(parameters, 0, 0, 0))
  writer.add_block_count(config.num_layers)
  writer.add_context_length(config.max_seq_len)
  writer.add_embedding_length(config.d_model)
  writer.add_feed_forward_length(config.d_ff)
  writer.add_head_count(config.num_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_layer_norm_rms_eps(config.norm_eps)
  writer.add_key_length(config.head_dim)
  writer.add_value_length(config.head_dim)
  writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                        "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
  writer.add_vocab_size(config.vocab_size)
  writer.add_rope_dimension_count(config.head_dim)
  if config.rope_scaling == "linear":
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(config.rope_scaling_factor)
  writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(writer, tokenizer: Tokenizer, vocab_size: int) -> None:
  """The vocabulary, then the special ids and flags as llama.cpp's converter writes them: the unknown token only
  for a tokenizer.json vocabulary, add_eos_token when the tokenizer config says it or it is on."""
  sentencepiece = "tokenizer.model" in tokenizer.files
  if sentencepiece:
    _write_sentencepiece(writer, tokenizer, vocab_size)
  else:
    _write_bpe(writer, tokenizer, vocab_size)
  for add, value in ((writer.add_bos_token_id, tokenizer.bos_id), (writer.add_eos_token_id, tokenizer.eos_id),
                     (writer.add_unk_token_id, None if sentencepiece else tokenizer.unk_id),
                     (writer.add_pad_token_id, tokenizer.pad_id)):
    if value is not None:
      add(value)
  if tokenizer.chat_template:
    writer.add_chat_template(tokenizer.chat_template)
  writer.add_add_bos_token(tokenizer.add_bos)
  if tokenizer.add_eos or "add_eos_token" in tokenizer.config:
    writer.add_add_eos_token(tokenizer.add_eos)


def _write_bpe(writer, tokenizer: Tokenizer, vocab_size: int) -> None:
  """A byte-level BPE tokenizer.json as llama.cpp's `gpt2` vocabulary: tokens by id (holes as [PADn], unused),
  added special tokens as control, other added tokens as user-defined, the merges, and the pre-tokenizer's name."""
  spec = json.loads(tokenizer.files["tokenizer.json"])
  model = spec["model"]
  if model.get("type") != "BPE" or spec.get("decoder", {}).get("type") != "ByteLevel":
    raise UserError(f"{tokenizer.source}: only byte-level BPE tokenizer.json vocabularies export to GGUF")
  by_id = {i: t for t, i in model["vocab"].items()}
  added = {t["id"]: t for t in spec.get("added_tokens", [])}
  tokens, types = [], []
  for i in range(vocab_size):
    if i in added:
      tokens.append(added[i]["content"])
      types.append(_CONTROL if added[i]["special"] else _USER_DEFINED)
    elif i in by_id:
      tokens.append(by_id[i])
      types.append(_NORMAL)
    else:
      tokens.append(f"[PAD{i}]")
      types.append(_UNUSED)
  digest = hashlib.sha256(str(tokenizer.encode(_PRE_TOKENIZER_TEXT)).encode()).hexdigest()
  if digest not in _PRE_TOKENIZERS:
    raise UserError(f"{tokenizer.source}: its BPE pre-tokenizer is none that llama.cpp names for this family "
                    f"({', '.join(sorted(set(_PRE_TOKENIZERS.values())))}), so tokenizer.ggml.pre cannot be written")
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(_PRE_TOKENIZERS[digest])
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)


def _write_sentencepiece(writer, tokenizer: Tokenizer, vocab_size: int) -> None:
  """A sentencepiece tokenizer.model as llama.cpp's `llama` vocabulary: pieces, scores and types (sentencepiece's
  numbering is llama.cpp's), padded to the model's vocabulary with unused [PADn] pieces."""
  from sentencepiece import sentencepiece_model_pb2

  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(tokenizer.files["tokenizer.model"])
  tokens = [p.piece for p in proto.pieces]
  scores = [p.score for p in proto.pieces]
  types = [int(p.type) for p in proto.pieces]
  for i in range(len(tokens), vocab_size):
    tokens.append(f"[PAD{i}]")
    scores.append(-10000.0)
    types.append(_UNUSED)
  writer.add_tokenizer_model("llama")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(tokens[:vocab_size])
  writer.add_token_scores(scores[:vocab_size])
  writer.add_token_types(types[:vocab_size])
  if not proto.normalizer_spec.add_dummy_prefix:  # llama.cpp's default for a `llama` vocabulary is a prefix.
    writer.add_add_space_prefix(False)
