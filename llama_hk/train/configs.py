"""The run's settings in small frozen groups, bound in gin (gin/runs/pretrain.gin): loop, checkpoints, evaluation."""

import dataclasses

from llama_hk.errors import UserError


def _check_positive(group, *names: str) -> None:
  for name in names:
    value = getattr(group, name)
    if value is not None and value <= 0:
      raise UserError(f"{type(group).__name__}.{name}={value}: must be positive")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """The steps: how many, of which batch shape and loss, and how often they are logged."""

  train_steps: int
  batch_size: int  # Global rows a step: all processes together.
  seq_len: int
  log_every: int = 10
  seed: int = 0  # Of the random initialization.
  z_loss_weight: float = 0.0
  grad_accum_steps: int = 1  # Micro-batches a step, for memory.
  peak_flops: float | None = None  # FLOP/s of one device, the MFU denominator; None: the platform's figure.

  def __post_init__(self):
    _check_positive(self, "train_steps", "batch_size", "seq_len", "log_every", "grad_accum_steps", "peak_flops")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """A checkpoint every `every` steps and after the last; the latest `keep` are kept."""

  every: int = 1000
  keep: int = 3

  def __post_init__(self):
    _check_positive(self, "every", "keep")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """An evaluation every `every` steps and after the last (and before the first, from step 0), on at most
  `max_batches` batches of the eval split (None: all of it)."""

  every: int = 1000
  max_batches: int | None = None

  def __post_init__(self):
    _check_positive(self, "every", "max_batches")
