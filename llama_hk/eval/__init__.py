"""Evaluation: perplexity and bits per byte of a checkpoint on a text file or a dataset split, and
lm-evaluation-harness tasks (what bin/eval runs).

The figures themselves are computed by the `perplexity` module, the harness's requests by the `harness` module
(imported only for tasks: the harness is an extra); these entry points load the checkpoint (sharded over `mesh`
when given) and its tokenizer, and read the text, the split or the tasks.
"""

import os
from typing import Callable, Iterable

from llama_hk import checkpoints
from llama_hk.errors import UserError
from llama_hk.eval import perplexity

__all__ = ["evaluate_split", "evaluate_tasks", "evaluate_text", "perplexity"]


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


def evaluate_tasks(checkpoint: str | os.PathLike, tasks: list[str], include_path: str | None = None,
                   include_defaults: bool = True, num_fewshot: int | None = None, limit: float | None = None,
                   batch_size: int | None = None, apply_chat_template: bool = False, log_samples: bool = False,
                   compute_dtype: str = "float32", mesh=None, adapter: str | None = None,
                   weights: str | None = None) -> dict:
  """The harness's results dictionary for `tasks` on the checkpoint (model `llama_hk`, `harness.LlamaHkLM`).

  Args:
    checkpoint: Any checkpoint `checkpoints.load` reads.
    tasks: Task (or group, or tag) names.
    include_path: A directory of task YAML files besides the harness's own.
    include_defaults: False: only the tasks under include_path (the harness's thousands go unindexed).
    num_fewshot: Examples before each request (None: each task's own setting).
    limit: At most this many documents per task (below 1: this fraction of them).
    batch_size: Rows per forward pass, short requests packed several to a row (None: harness.DEFAULT_BATCH_SIZE).
    apply_chat_template: Render requests with the tokenizer's chat template.
    log_samples: Keep each document's requests and responses under "samples".
    compute_dtype: Activation dtype.
    mesh: Shard the model and its batches over this mesh (None: one device).
    adapter: A PEFT LoRA directory applied to the checkpoint's model.
  """
  from llama_hk.eval import harness

  manager = harness.task_manager(include_path, include_defaults)
  harness.check_tasks(manager, tasks)  # Before the checkpoint is read.
  ckpt = _load(checkpoint, compute_dtype, mesh, adapter, weights)
  lm = harness.LlamaHkLM(ckpt.config, ckpt.params, ckpt.tokenizer, mesh=mesh, lora=ckpt.lora, batch_size=batch_size)
  return harness.evaluate(lm, tasks, manager, num_fewshot, limit, apply_chat_template, log_samples)
