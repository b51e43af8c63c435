"""Meta's original release format: `params.json`, model-parallel shards `consolidated.NN.pth` and `tokenizer.model`.

Each shard holds a slice of every matrix (the embedding table and the row-parallel `wo`/`w2` split by columns,
the other matrices by rows; norms whole in each), read with `weights_only=True` and memory-mapped, and joined
tensor by tensor as they are read. Meta's Q/K rows are in the adjacent-pair RoPE layout that GGUF also uses, so
the tensors go through `params.iter_params` under their GGUF names, which undoes that permutation.
"""

import json
import pathlib
from typing import Any, Callable, Iterator

import numpy as np

from llama_hk import params
from llama_hk.checkpoints.hf import TorchLookup
from llama_hk.checkpoints.leaves import Placement
from llama_hk.config import LlamaConfig
from llama_hk.errors import UserError
from llama_hk.tokenizers.tokenizer import Tokenizer

PARAMS_FILE = "params.json"
SHARDS = "consolidated.*.pth"
# GGUF name (the parameter table's) -> Meta's name, and the axis its model-parallel slices are joined on.
_NAMES = {
    "token_embd.weight": ("tok_embeddings.weight", 1),
    "blk.{i}.attn_norm.weight": ("layers.{i}.attention_norm.weight", None),
    "blk.{i}.attn_q.weight": ("layers.{i}.attention.wq.weight", 0),
    "blk.{i}.attn_k.weight": ("layers.{i}.attention.wk.weight", 0),
    "blk.{i}.attn_v.weight": ("layers.{i}.attention.wv.weight", 0),
    "blk.{i}.attn_output.weight": ("layers.{i}.attention.wo.weight", 1),
    "blk.{i}.ffn_norm.weight": ("layers.{i}.ffn_norm.weight", None),
    "blk.{i}.ffn_gate.weight": ("layers.{i}.feed_forward.w1.weight", 0),
    "blk.{i}.ffn_up.weight": ("layers.{i}.feed_forward.w3.weight", 0),
    "blk.{i}.ffn_down.weight": ("layers.{i}.feed_forward.w2.weight", 1),
    "output_norm.weight": ("norm.weight", None),
    "output.weight": ("output.weight", 0),
}
# Llama 3.1's `use_scaled_rope`: the constants of Meta's reference `apply_scaling`.
_LLAMA3_ROPE = dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                    rope_high_freq_factor=4.0, rope_original_max_len=8192)


class MetaDir:
  """A directory in Meta's original layout (LLaMA 1/2/3 downloads from Meta)."""
  name = "meta"

  def detect(self, path: pathlib.Path) -> bool:
    return path.is_dir() and any(path.glob(SHARDS)) and not (path / "config.json").exists()

  def config(self, path: pathlib.Path) -> LlamaConfig:
    source = path / PARAMS_FILE
    if not source.is_file():
      raise UserError(f"{path}: has {SHARDS} files but no {PARAMS_FILE}")
    try:
      meta = json.loads(source.read_text())
      shards = _shards(path)
      vocab, d_model = shards[0]["tok_embeddings.weight"].shape[0], meta["dim"]
      d_ff = shards[0]["layers.0.feed_forward.w1.weight"].shape[0] * len(shards)
      num_heads = meta["n_heads"]
      theta = float(meta.get("rope_theta", 10000.0))
      return LlamaConfig(
          vocab_size=vocab, d_model=d_model, num_layers=meta["n_layers"], num_heads=num_heads,
          num_kv_heads=meta.get("n_kv_heads") or num_heads, head_dim=d_model // num_heads, d_ff=d_ff,
          norm_eps=float(meta["norm_eps"]), rope_theta=theta, tie_embeddings=False,
          max_seq_len=_context(meta, theta), param_dtype="float32",
          **(_LLAMA3_ROPE if meta.get("use_scaled_rope") else {}))
    except json.JSONDecodeError as e:
      raise UserError(f"{source}: not JSON ({e.msg}, line {e.lineno})") from None
    except KeyError as e:
      raise UserError(f"{source}: lacks {e}") from None

  def tokenizer(self, path: pathlib.Path) -> Tokenizer | None:
    model = path / "tokenizer.model"
    if not model.is_file():
      return None
    data = model.read_bytes()
    if data[:1].isalnum() and b" " in data[:200]:  # tiktoken's "base64 rank" lines, not a sentencepiece proto.
      raise UserError(f"{model}: a tiktoken (Llama 3) tokenizer, which is not read yet; convert the directory "
                      "with transformers' convert_llama_weights_to_hf.py")
    return Tokenizer({"tokenizer.model": data}, source=str(model))

  def tensors(self, path: pathlib.Path) -> Callable[[str], np.ndarray]:
    """GGUF name -> the whole tensor, its slices read from every shard and joined."""
    shards = _shards(path)

    def get(name: str) -> np.ndarray:
      template = name
      layer = None
      if name.startswith("blk."):
        layer = name.split(".")[1]
        template = name.replace(f"blk.{layer}.", "blk.{i}.", 1)
      meta_name, axis = _NAMES[template]
      meta_name = meta_name.format(i=layer)
      slices = [np.asarray(shard[meta_name], np.float32) for shard in shards]
      return slices[0] if axis is None or len(slices) == 1 else np.concatenate(slices, axis=axis)

    return get

  def leaves(self, path: pathlib.Path, config: LlamaConfig, dtype: str | None,
             placement: Placement) -> Iterator[tuple[str, str, Any]]:
    return params.iter_params(self.tensors(path), config, "gguf", dtype, str(path), placement.leaf)


def _shards(path: pathlib.Path) -> list[TorchLookup]:
  return [TorchLookup(p) for p in sorted(path.glob(SHARDS))]


def _context(meta: dict, theta: float) -> int:
  """The context length params.json does not give: Llama 3.1 (scaled RoPE) 131072, Llama 3 8192, else as llama.cpp
  guesses it (CodeLlama's theta 1e6: 16384; LLaMA 2's norm_eps 1e-5: 4096; LLaMA 1: 2048)."""
  if "max_seq_len" in meta:
    return int(meta["max_seq_len"])
  if meta.get("use_scaled_rope"):
    return 131072
  if theta == 500000.0:
    return 8192
  if theta == 1000000.0:
    return 16384
  return 4096 if float(meta["norm_eps"]) == 1e-5 else 2048
