"""What a run measures: the metrics file and TensorBoard events, FLOPs and MFU, bits per byte, the pace.

`metrics.jsonl` (process 0) holds one object a line: {"step", "loss", "learning_rate", "grad_norm",
"tokens_per_s", "mfu"} and {"step", "eval_loss", "eval_bits_per_byte", "eval_perplexity"}; `events.*` hold the
same scalars for TensorBoard.
"""

import contextlib
import json
import math
import pathlib
import sys
import time

import jax
import numpy as np

from llama_hk import io_utils
from llama_hk.config import LlamaConfig, num_params

METRICS_FILE = "metrics.jsonl"


def _tensorboard_x():
  """tensorboardX, imported with torch hidden unless already loaded: it imports torch (~3 s) only to accept torch
  tensors, and the run writes Python floats."""
  if "torch" in sys.modules:
    import tensorboardX
    return tensorboardX
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX catches.
  try:
    import tensorboardX
  finally:
    del sys.modules["torch"]
  return tensorboardX


class MetricsWriter:
  """metrics.jsonl and TensorBoard events in a model_dir, written by process 0 only."""

  def __init__(self, model_dir: pathlib.Path, keep_through: int):
    """Records of steps up to `keep_through` (the restored checkpoint's) are kept; later ones are redone."""
    self.active = jax.process_index() == 0
    if not self.active:
      return
    self.path = model_dir / METRICS_FILE
    self._truncate_after(keep_through)
    self.file = open(self.path, "a")
    self.tensorboard = _tensorboard_x().SummaryWriter(str(model_dir), purge_step=keep_through + 1)

  def _truncate_after(self, step: int) -> None:
    """Drops lines of steps after the restored checkpoint (a killed run logged them; they are redone)."""
    if not self.path.exists():
      return
    kept = []
    for line in self.path.read_text().splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # A line cut short by a kill.
      if record.get("step", math.inf) <= step:
        kept.append(line)
    io_utils.write_text_atomic(self.path, "".join(f"{line}\n" for line in kept))

  def write(self, record: dict) -> None:
    if not self.active:
      return
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    for key, value in record.items():
      if key != "step" and value is not None:
        self.tensorboard.add_scalar(key, value, record["step"])
    self.tensorboard.flush()

  def close(self) -> None:
    if self.active:
      self.file.close()
      self.tensorboard.close()

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3 x forward): 6 per matmul weight, plus attention's scores.

  The embedding lookup is no matmul; the output head is. Attention: QK^T and PV are 2 * 2 * T * N * K
  forward FLOPs per token and layer, counting the full causal square as most kernels compute it.
  """
  matmul_weights = num_params(config, with_lm_head=True) - config.vocab_size * config.d_model
  attention = 4 * seq_len * config.num_heads * config.head_dim * config.num_layers
  return 6.0 * matmul_weights + 3.0 * attention


def mfu(config: LlamaConfig, seq_len: int, tokens_per_s: float, peak_flops: float) -> float:
  """Model FLOPs utilization: the FLOP/s the tokens took (by `flops_per_token`) over the devices' peak, summed."""
  return tokens_per_s * flops_per_token(config, seq_len) / peak_flops


def bits_per_byte(nll_nats: float, num_bytes: int) -> float:
  """Summed NLL in nats over the UTF-8 bytes of the text scored: comparable across tokenizers."""
  return nll_nats / math.log(2) / num_bytes if num_bytes else float("nan")


def bytes_of_scored_text(batch: dict[str, np.ndarray], tokenizer) -> int:
  """UTF-8 bytes of the text a packed batch's targets spell, by decoding each segment.

  A segment scores tokens[1:]; its text is decode(segment) less decode(first token) (special tokens decode to
  nothing, and a leading dummy-prefix space is dropped from both alike).
  """
  total = 0
  for tokens, segments, mask in zip(batch["tokens"], batch["segment_ids"], batch["loss_mask"]):
    for segment in np.unique(segments[segments != 0]):
      ids = tokens[segments == segment]
      if not mask[segments == segment].any():
        continue
      whole = tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8")
      first = tokenizer.decode(ids[:1], skip_special_tokens=True).encode("utf-8")
      total += len(whole) - len(first)
  return total


class Stopwatch:
  """Seconds that leave out what `paused()` covers, so that evaluation time is not counted as training time."""

  def __init__(self):
    self._paused = 0.0

  def __call__(self) -> float:
    return time.perf_counter() - self._paused

  @contextlib.contextmanager
  def paused(self):
    start = time.perf_counter()
    try:
      yield
    finally:
      self._paused += time.perf_counter() - start


def format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"
