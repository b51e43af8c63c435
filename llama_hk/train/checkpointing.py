"""A model_dir's checkpoints: the Orbax manager of `checkpoints/<step>/`, saves, restores and their failures.

Each step directory holds the Orbax items `params`, `opt_state`, `train` (step, rng) and `data` (each process's
pipeline state), written asynchronously and atomically; the last `keep` are kept. Beside them, `llama_hk.json` and
the tokenizer files make the model_dir a checkpoint that `checkpoints.load(model_dir)` reads. A LoRA run's `params`
are its adapter's, also written as a PEFT directory `adapters/<step>/` whose `base_model_name_or_path` is the
frozen base (the init checkpoint), which no checkpoint copies.
"""

import json
import pathlib
import shutil

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from llama_hk import checkpoints
from llama_hk import io_utils
from llama_hk.checkpoints import peft
from llama_hk.config import LlamaConfig
from llama_hk.errors import UserError, first_line
from llama_hk.ops.lora import LoraConfig
from llama_hk.tokenizers.tokenizer import Tokenizer
from llama_hk.train.step import TrainState

ITEMS = ("params", "opt_state", "train", "data")


class _PipelineState:
  """A pipeline state captured when a save is requested (the iterator runs on while the save is written)."""

  def __init__(self, state: bytes | None = None):
    self.state = state

  def get_state(self) -> bytes:
    return self.state

  def set_state(self, state: bytes) -> None:
    self.state = state

  def start_prefetch(self) -> None:
    """grain's handler calls this on restore; the real iterator is set from `state` afterwards."""


class Checkpointer:
  """Saves and restores TrainStates with their pipeline state; failures are one-line UserErrors."""

  def __init__(self, model_dir: pathlib.Path, keep: int):
    # Directories are created in the caller's thread, so that a failure to create one raises there (Orbax's
    # background thread only logs it, and waiting on that save then never ends).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                "train": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
    try:
      self.manager = ocp.CheckpointManager((model_dir / checkpoints.TRAINING_CHECKPOINTS_DIR).resolve(),
                                           options=options, item_names=ITEMS, item_handlers=handlers)
    except OSError as e:
      raise UserError(f"{model_dir}: cannot create the checkpoint directory ({e.strerror})") from None
    self.directory = self.manager.directory

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, step: int, target: TrainState, data) -> TrainState:
    """The state of `step`, laid out like `target` (ShapeDtypeStructs with shardings); sets `data`'s state."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(target.params), opt_state=ocp.args.StandardRestore(target.opt_state),
          train=ocp.args.StandardRestore({"step": target.step, "rng": target.rng}),
          data=grain.checkpoint.CheckpointRestore(_PipelineState())))
    except Exception as e:  # Orbax raises many types for unreadable or mismatched checkpoints.
      raise UserError(f"{self.directory}/{step}: cannot restore ({type(e).__name__}: {first_line(e)})") from None
    data.set_state(json.loads(restored.data.state))
    return TrainState(restored.train["step"], restored.params, restored.opt_state, restored.train["rng"])

  def save(self, step: int, state: TrainState, data) -> None:
    """Starts writing `state` and `data`'s current state as checkpoint `step` (asynchronously)."""
    pipeline_state = _PipelineState(json.dumps(data.get_state()).encode())
    try:
      self.manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state),
          train=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
          data=grain.checkpoint.CheckpointSave(pipeline_state)))
    except Exception as e:  # Orbax raises many types for a failed write.
      self._failed(step, e)

  def wait(self, step: int) -> None:
    """Blocks until every save has been written; `step` is the one a failure names."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self._failed(step, e)

  def _failed(self, step: int, error: Exception):
    steps = [s for s in self.manager.all_steps() if s != step]
    kept = f"the last good checkpoint is step {max(steps)}" if steps else "no earlier checkpoint exists"
    reason = first_line(error) or type(error).__name__
    raise UserError(f"{self.directory}: writing the checkpoint of step {step} failed ({reason}); {kept}") from None

  def close(self) -> None:
    self.manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_model_files(model_dir: pathlib.Path, config: LlamaConfig, tokenizer: Tokenizer) -> None:
  """llama_hk.json and the tokenizer files (process 0), so that checkpoints.load(model_dir) reads the latest
  checkpoint."""
  if jax.process_index() != 0:
    return
  io_utils.write_text_atomic(model_dir / checkpoints.CONFIG_FILE, config.to_json())
  for name, data in tokenizer.files.items():
    with io_utils.atomic_file(model_dir / name) as tmp:
      tmp.write_bytes(data)


def write_adapter(model_dir: pathlib.Path, step: int, adapter, config: LlamaConfig, lora: LoraConfig,
                  base: str, checkpointer: Checkpointer) -> None:
  """adapters/<step>/ in PEFT's layout (gathered from every process, written by process 0); adapters of steps
  whose checkpoint is no longer kept are removed."""
  adapter = multihost_utils.process_allgather(adapter, tiled=True)
  if jax.process_index() != 0:
    return
  adapters = model_dir / peft.ADAPTERS_DIR
  target = adapters / str(step)
  if target.exists():  # A rerun after a kill at this step writes it again.
    shutil.rmtree(target)
  peft.write(target, adapter, config, lora, base)
  kept = set(checkpointer.manager.all_steps()) | {step}
  for old in adapters.iterdir():
    if old.name.isdigit() and int(old.name) not in kept:
      shutil.rmtree(old)
