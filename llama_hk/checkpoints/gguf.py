"""GGUF files (llama.cpp): the config from the metadata (and rope_freqs.weight), tensors dequantized to float32, and
the tokenizer the metadata describes (rebuilt by tokenizers.from_gguf).

Tensors keep llama.cpp's layout: HF's, except the Q and K rows that `params.iter_params` unpermutes (naming "gguf").
A file is parsed once for its config, tokenizer and tensors (the last one opened stays memory-mapped). Tensor bytes
are read from the file, not through the mapping, so that pages of tensors already loaded do not stay in this
process's resident memory beside the loaded copy.
"""

import functools
import pathlib
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from llama_hk import params
from llama_hk.checkpoints.leaves import Placement
from llama_hk.config import LlamaConfig
from llama_hk.errors import UserError, first_line
from llama_hk.tokenizers import from_gguf
from llama_hk.tokenizers.tokenizer import Tokenizer

MAGIC = b"GGUF"
# The tensor types read (the quantized ones dequantized by gguf-py's gguf.quants); any other is refused by name.
# GGUF architecture -> family. llama.cpp writes Mistral as `llama`, without its sliding window.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
DEQUANTIZE_CHUNK = 1 << 22
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


class _Parsed(NamedTuple):
  reader: Any  # gguf.GGUFReader, memory-mapping the file.
  metadata: dict[str, Any]  # Every key-value field's contents.


class GgufFile:
  """A .gguf file; its parameters load as float32 unless asked otherwise."""
  name = "gguf"

  def detect(self, path: pathlib.Path) -> bool:
    if not path.is_file():
      return False
    with open(path, "rb") as f:
      return f.read(4) == MAGIC

  def config(self, path: pathlib.Path) -> LlamaConfig:
    reader, meta = _parse(path)
    source = str(path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
      raise UserError(f"{source}: GGUF architecture is {arch!r}, supported: {', '.join(ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    try:
      d_model = int(meta[f"{arch}.embedding_length"])
      num_heads = int(meta[f"{arch}.attention.head_count"])
      vocab = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
      scaling = meta.get(f"{arch}.rope.scaling.type", "none")
      return LlamaConfig(
          vocab_size=int(vocab),
          d_model=d_model,
          num_layers=int(meta[f"{arch}.block_count"]),
          num_heads=num_heads,
          num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", num_heads)),
          head_dim=int(meta.get(f"{arch}.attention.key_length", d_model // num_heads)),
          d_ff=int(meta[f"{arch}.feed_forward_length"]),
          norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
          rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
          rope_scaling="none" if scaling in ("none", None) else scaling,
          rope_scaling_factor=float(meta.get(f"{arch}.rope.scaling.factor", 1.0)),
          tie_embeddings="output.weight" not in names,
          max_seq_len=int(meta.get(f"{arch}.context_length", 2048)),
          param_dtype="float32",
          family=ARCHITECTURES[arch],
          rope_freq_factors=(tuple(self.tensors(path)("rope_freqs.weight").reshape(-1).tolist())
                             if "rope_freqs.weight" in names else None),
      )
    except KeyError as e:
      raise UserError(f"{source}: GGUF metadata lacks {e}") from None

  def tokenizer(self, path: pathlib.Path) -> Tokenizer:
    return from_gguf.tokenizer_from_gguf(_parse(path).metadata, str(path))

  def tensors(self, path: pathlib.Path) -> Callable[[str], np.ndarray]:
    """GGUF name -> array: F32/F16 as stored, BF16 and the quantized types dequantized (to float32), a matrix of
    those in blocks of rows (params.RowBlocks)."""
    import gguf
    tensors = {t.name: t for t in _parse(path).reader.tensors}

    def get(name: str) -> np.ndarray:
      t = tensors[name]
      kind = t.tensor_type.name
      if kind not in TENSOR_TYPES:
        raise UserError(f"{path}: tensor {name} has unsupported GGUF type {kind} "
                        f"(supported: {', '.join(TENSOR_TYPES)})")
      if kind in ("F32", "F16"):
        return _read_rows(path, t).reshape(tuple(int(n) for n in reversed(t.shape)))
      if t.data.ndim == 1:
        return gguf.quants.dequantize(_read_rows(path, t), t.tensor_type)
      return _QuantizedRows(path, t)

    return get

  def leaves(self, path: pathlib.Path, config: LlamaConfig, dtype: str | None,
             placement: Placement) -> Iterator[tuple[str, str, object]]:
    return params.iter_params(self.tensors(path), config, "gguf", dtype, str(path), placement.leaf)


class _QuantizedRows:
  """A quantized matrix dequantized in blocks of about DEQUANTIZE_CHUNK values (params.RowBlocks): gguf-py's
  temporaries stay small, and a narrow load never holds the matrix whole in float32."""

  def __init__(self, path: pathlib.Path, tensor):
    self.path = path
    self.tensor = tensor
    self.shape = tuple(int(n) for n in reversed(tensor.shape))  # (rows, cols)

  def row_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
    import gguf
    step = max(1, DEQUANTIZE_CHUNK // self.shape[-1])
    for start in range(0, self.shape[0], step):
      yield start, gguf.quants.dequantize(_read_rows(self.path, self.tensor, start, start + step),
                                          self.tensor.tensor_type)

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    out = np.empty(self.shape, np.float32)
    for start, block in self.row_blocks():
      out[start:start + len(block)] = block
    return out if dtype is None else out.astype(dtype)


def _read_rows(path: pathlib.Path, tensor, start: int = 0, stop: int | None = None) -> np.ndarray:
  """Rows [start, stop) of a tensor's stored array (`tensor.data`'s dtype and shape), read into fresh memory: the
  mapping's view gives only the layout, its pages are never touched."""
  view = tensor.data
  stop = len(view) if stop is None else min(stop, len(view))
  row_bytes = view.strides[0]
  out = np.fromfile(path, dtype=np.uint8, count=(stop - start) * row_bytes,
                    offset=tensor.data_offset + start * row_bytes)
  if out.size != (stop - start) * row_bytes:
    raise UserError(f"{path}: truncated or corrupt GGUF file (tensor {tensor.name} is cut short)")
  return out.view(view.dtype).reshape((stop - start,) + view.shape[1:])


def _parse(path: pathlib.Path) -> _Parsed:
  stat = path.stat()
  return _parse_file(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _parse_file(path: str, mtime_ns: int, size: int) -> _Parsed:
  """One parse shared by the config, tokenizer and tensors (parsing a real vocabulary is slow), keyed by the file's
  mtime and size so that a rewritten file is parsed again."""
  del mtime_ns, size
  import gguf
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # A file cut short or corrupt fails the reader's views (ValueError/struct error/IndexError).
    raise UserError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {first_line(e)})") from None
  return _Parsed(reader, {name: field.contents() for name, field in reader.fields.items()})
