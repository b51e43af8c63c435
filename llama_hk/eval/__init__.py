"""Evaluation: perplexity and bits per byte of a checkpoint on a text file or a dataset split (what bin/eval runs).

The figures themselves are computed by the `perplexity` module; these entry points load the checkpoint (sharded
over `mesh` when given) and its tokenizer, and read the text or the split.
"""

import os
from typing import Callable, Iterable

from llama_hk import checkpoints
from llama_hk.errors import UserError
from llama_hk.eval import perplexity

__all__ = ["evaluate_split", "evaluate_text", "perplexity"]


def _load(checkpoint: str | os.PathLike, compute_dtype: str, mesh, adapter, weights) -> checkpoints.Checkpoint:
  ckpt = checkpoints.load(checkpoint, dtype=weights, mesh=mesh, adapter=adapter, compute_dtype=compute_dtype)
  if ckpt.tokenizer is None:
    raise UserError(f"{checkpoint}: the checkpoint carries no tokenizer")
  return ckpt


def evaluate_text(checkpoint: str | os.PathLike, text_file: str, max_seq_len: int, batch_size: int | None = None,
                  compute_dtype: str = "float32", mesh=None, adapter: str | None = None,
                  weights: str | None = None) -> dict:
  """{"tokens", "nll", "perplexity", "bytes", "bits_per_byte"} of a UTF-8 text file, in windows of `max_seq_len`
  tokens, `batch_size` windows a forward pass (None: the smallest batch the mesh splits evenly); `adapter`, a PEFT
  LoRA directory, is applied to the checkpoint's model; `weights` (float32, bfloat16, int8; None: as stored) is how
  the weights are held."""
  text = perplexity.read_text(text_file)  # Bad text fails before the checkpoint is read.
  ckpt = _load(checkpoint, compute_dtype, mesh, adapter, weights)
  return perplexity.perplexity(ckpt.config, ckpt.params, ckpt.tokenizer.encode(text), max_seq_len, batch_size,
                               num_bytes=len(text.encode("utf-8")), source=text_file, mesh=mesh, lora=ckpt.lora)


def evaluate_split(checkpoint: str | os.PathLike, source: Iterable[str], eval_data: Callable[..., Iterable[dict]],
                   name: str = "split", compute_dtype: str = "float32", mesh=None, adapter: str | None = None,
                   weights: str | None = None) -> dict:
  """The same figures over every document of `source` (a data.sources.TextSource) once, packed by `eval_data`
  (`pipeline.eval_batches`, its other arguments bound), every process reading the whole split; bytes are the
  documents' UTF-8 bytes."""
  ckpt = _load(checkpoint, compute_dtype, mesh, adapter, weights)
  num_bytes = sum(len(document.encode("utf-8")) for document in source)
  batches = eval_data(source=source, tokenizer=ckpt.tokenizer, process_index=0, process_count=1)
  return perplexity.split_perplexity(ckpt.config, ckpt.params, batches, num_bytes, source=name, mesh=mesh,
                                     lora=ckpt.lora)
