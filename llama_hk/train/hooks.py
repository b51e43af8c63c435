"""What the loop does between steps, one hook each: the NaN guard, the operative config, logging, evaluation, its
curves and checkpoints.

A hook is called after every step with (step, state, metrics) and acts on the steps `due` selects: every `every`
steps and after the run's last. `begin` runs before the first step of this run (at the restored step, or 0) and
`end` after its last. Hooks run in list order, so the NaN guard comes before anything that would log or save a
diverged state. Only process 0 prints.
"""

import math
import pathlib
import time
from typing import Callable, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from llama_hk import io_utils
from llama_hk.config import LlamaConfig
from llama_hk.data.batch import empty_batch
from llama_hk.errors import UserError
from llama_hk.tokenizers.tokenizer import Tokenizer
from llama_hk.train import curves
from llama_hk.train import metrics as metrics_lib
from llama_hk.train.checkpointing import Checkpointer
from llama_hk.train.state import global_batch
from llama_hk.train.step import TrainState, model_params

CONFIG_GIN = "config.gin"


def _print(text: str) -> None:
  if jax.process_index() == 0:
    print(text, flush=True)


class Hook:
  """Acts after every `every`-th step and after the last (`last_step`)."""

  def __init__(self, every: int, last_step: int):
    self.every, self.last_step = every, last_step

  def due(self, step: int) -> bool:
    return step % self.every == 0 or step == self.last_step

  def begin(self, step: int, state: TrainState) -> None:
    """Before the run's first step; `step` is where it starts."""

  def __call__(self, step: int, state: TrainState, metrics: dict) -> None:
    if self.due(step):
      self.act(step, state, metrics)

  def act(self, step: int, state: TrainState, metrics: dict) -> None:
    """The hook's work at a due step."""

  def end(self, step: int, state: TrainState) -> None:
    """After the run's last step."""


class NanGuard(Hook):
  """Stops the run at a non-finite loss, before it is logged or saved, naming the last good checkpoint."""

  def __init__(self, last_step: int, checkpointer: Checkpointer | None = None, every: int = 1):
    super().__init__(every, last_step)
    self.checkpointer = checkpointer

  def act(self, step, state, metrics):
    loss = float(metrics["loss"])
    if math.isfinite(loss):
      return
    last = None
    if self.checkpointer is not None:
      self.checkpointer.wait(step)
      last = self.checkpointer.latest_step()
    raise UserError(f"step {step}: loss is {loss}; stopped. "
                    + (f"The last good checkpoint, step {last}, is kept in {self.checkpointer.directory}"
                       if last is not None else "No checkpoint was written yet"))


class OperativeConfigHook(Hook):
  """Writes model_dir/config.gin (process 0) after the run's first step, once every configurable has run."""

  def __init__(self, model_dir: pathlib.Path, operative_config: Callable[[], str], last_step: int):
    super().__init__(1, last_step)
    self.path, self.operative_config, self.first = model_dir / CONFIG_GIN, operative_config, None

  def begin(self, step, state):
    self.first = step + 1

  def due(self, step):
    return step == self.first

  def act(self, step, state, metrics):
    if jax.process_index() == 0:
      io_utils.write_text_atomic(self.path, self.operative_config())


class LogHook(Hook):
  """Writes {"step", "loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu"} and prints them with the pace
  and the time left.

  Throughput counts the steps since the last record over the `stopwatch`'s time (which evaluation pauses); the
  run's first step, which compiles, gets a record of its own and is left out of later ones. `peak_flops` is the
  devices' summed peak, the MFU denominator.
  """

  def __init__(self, every: int, last_step: int, writer: metrics_lib.MetricsWriter, config: LlamaConfig,
               tokens_per_step: int, seq_len: int, peak_flops: float, stopwatch: metrics_lib.Stopwatch):
    super().__init__(every, last_step)
    self.writer, self.config, self.tokens_per_step, self.seq_len = writer, config, tokens_per_step, seq_len
    self.peak_flops, self.stopwatch = peak_flops, stopwatch
    self.record = {}

  def begin(self, step, state):
    self.start = step
    self._restart()

  def _restart(self) -> None:
    self.interval_start, self.interval_steps, self.run_start = self.stopwatch(), 0, time.perf_counter()

  def __call__(self, step, state, metrics):
    self.interval_steps += 1
    super().__call__(step, state, metrics)
    if step == self.start + 1:  # Compiled now: later throughput and the time left exclude compilation.
      self._restart()

  def act(self, step, state, metrics):
    elapsed = self.stopwatch() - self.interval_start
    steps_per_s = self.interval_steps / elapsed
    tokens_per_s = steps_per_s * self.tokens_per_step
    self.record = {"step": step, "loss": float(metrics["loss"]), "learning_rate": float(metrics["learning_rate"]),
                   "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": tokens_per_s,
                   "mfu": metrics_lib.mfu(self.config, self.seq_len, tokens_per_s, self.peak_flops)}
    self.writer.write(self.record)
    done = step - self.start - 1  # Steps since the first, compiled, one.
    seconds_per_step = (time.perf_counter() - self.run_start) / done if done else elapsed / self.interval_steps
    _print(f"step {step}/{self.last_step}  loss {self.record['loss']:.4f}  lr {self.record['learning_rate']:.2e}  "
           f"{steps_per_s:.2f} steps/s  {tokens_per_s:.0f} tokens/s  time left "
           f"{metrics_lib.format_seconds((self.last_step - step) * seconds_per_step)}")
    self.interval_start, self.interval_steps = self.stopwatch(), 0


class EvalHook(Hook):
  """Evaluates the params on the eval set: {"step", "eval_loss", "eval_bits_per_byte", "eval_perplexity"}.

  A run from step 0 evaluates before its first step too, so the first and last evaluations show what training
  changed; `end` prints that before-and-after. The eval set is read once, on first use.
  """

  def __init__(self, every: int, last_step: int, writer: metrics_lib.MetricsWriter,
               eval_fn: Callable, batches: Callable[[], tuple[list[dict], int]], stopwatch: metrics_lib.Stopwatch):
    """`eval_fn(params, batch)` -> (summed NLL, tokens); `batches()` -> (global batches, UTF-8 bytes they score)."""
    super().__init__(every, last_step)
    self.writer, self.eval_fn, self.batches, self.stopwatch = writer, eval_fn, batches, stopwatch
    self.eval_set = None
    self.records = []

  def begin(self, step, state):
    if step == 0:
      self.evaluate(0, model_params(state))  # The starting point: the before of a before-and-after.

  def act(self, step, state, metrics):
    self.evaluate(step, model_params(state))

  def evaluate(self, step: int, params) -> dict:
    with self.stopwatch.paused():  # Evaluation time is not training throughput.
      return self._evaluate(step, params)

  def _evaluate(self, step: int, params) -> dict:
    if self.eval_set is None:
      self.eval_set = self.batches()
    batches, num_bytes = self.eval_set
    nll, tokens = 0.0, 0.0
    for batch in batches:
      batch_nll, batch_tokens = self.eval_fn(params, batch)
      nll += float(batch_nll)
      tokens += float(batch_tokens)
    loss = nll / max(tokens, 1.0)
    record = {"step": step, "eval_loss": loss, "eval_bits_per_byte": metrics_lib.bits_per_byte(nll, num_bytes),
              "eval_perplexity": float(np.exp(loss))}
    self.writer.write(record)
    self.records.append(record)
    _print(f"step {step}  eval_loss {loss:.4f}  eval_bits_per_byte {record['eval_bits_per_byte']:.4f}  "
           f"eval_perplexity {record['eval_perplexity']:.3f}")
    return record

  def end(self, step, state):
    if len(self.records) > 1:
      first, last = self.records[0], self.records[-1]
      _print(f"validation perplexity {first['eval_perplexity']:.3f} at step {first['step']} -> "
             f"{last['eval_perplexity']:.3f} at step {last['step']} (bits per byte "
             f"{first['eval_bits_per_byte']:.4f} -> {last['eval_bits_per_byte']:.4f})")


class CurvesHook(Hook):
  """Draws model_dir/curves.png from its metrics.jsonl after each evaluation (process 0), the drawing left out of
  the training throughput."""

  def __init__(self, every: int, last_step: int, model_dir: pathlib.Path, stopwatch: metrics_lib.Stopwatch):
    super().__init__(every, last_step)
    self.model_dir, self.stopwatch = model_dir, stopwatch

  def act(self, step, state, metrics):
    if jax.process_index() == 0:
      with self.stopwatch.paused():
        curves.plot([self.model_dir], self.model_dir / curves.CURVES_FILE, [self.model_dir.name])


def eval_set(eval_data: Callable[..., Iterable[dict]], tokenizer: Tokenizer, seq_len: int, batch_size: int,
             max_batches: int | None, mesh: Mesh) -> tuple[list[dict], int]:
  """This process's eval batches as global arrays, padded with empty batches to the same count on every process,
  and the UTF-8 bytes of the text they score, summed over processes."""
  batches = []
  for batch in eval_data(tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size):
    if max_batches is not None and len(batches) >= max_batches:
      break
    batches.append(batch)
  num_bytes = sum(metrics_lib.bytes_of_scored_text(batch, tokenizer) for batch in batches)
  counts = multihost_utils.process_allgather(np.array([len(batches), num_bytes], np.int64))
  counts = np.asarray(counts).reshape(-1, 2)
  batches += [empty_batch(batch_size // jax.process_count(), seq_len)] * (int(counts[:, 0].max()) - len(batches))
  return [global_batch(batch, mesh) for batch in batches], int(counts[:, 1].sum())


class CheckpointHook(Hook):
  """Saves the state and the pipeline's position; `end` waits until every save is written."""

  def __init__(self, every: int, last_step: int, checkpointer: Checkpointer, data):
    super().__init__(every, last_step)
    self.checkpointer, self.data = checkpointer, data

  def act(self, step, state, metrics):
    self.checkpointer.save(step, state, self.data)

  def end(self, step, state):
    self.checkpointer.wait(step)


class AdapterHook(Hook):
  """Writes a LoRA run's adapter as a PEFT directory, model_dir/adapters/<step>/, beside each checkpoint (process
  0), keeping those of the checkpoints kept; `write(step, adapter)` does the writing."""

  def __init__(self, every: int, last_step: int, write: Callable[[int, object], None]):
    super().__init__(every, last_step)
    self.write = write

  def act(self, step, state, metrics):
    self.write(step, state.params)
