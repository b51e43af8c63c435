"""The training run: the jitted step over the pipeline's batches, with hooks for the NaN guard, the operative
config, logging, evaluation and checkpoints.

A `model_dir` holds
  config.gin            the operative gin config (written by process 0 after the run's first step)
  llama_hk.json         the model config, and the tokenizer files: `checkpoints.load(model_dir)` reads it
  checkpoints/<step>/   the Orbax checkpoints (train/checkpointing.py), the last `CheckpointConfig.keep` kept
  adapters/<step>/      a LoRA run's adapter in PEFT's layout, beside each checkpoint kept
  metrics.jsonl         the training and evaluation records, one object a line (train/metrics.py)
  events.*              the same scalars for TensorBoard
  curves.png            loss, evaluation loss and learning rate against step, redrawn after each evaluation
A run restores the latest checkpoint in its model_dir, so rerunning a killed command continues it, with the
same losses as if it had never stopped.
"""

import pathlib
from typing import Any, Callable, Iterable, Iterator

import jax
from jax.sharding import Mesh

from llama_hk import platform
from llama_hk import sharding
from llama_hk.config import LlamaConfig
from llama_hk.data.batch import BATCH_KEYS
from llama_hk.errors import UserError
from llama_hk.ops.lora import LoraConfig
from llama_hk.train import dry_run as dry_run_lib
from llama_hk.train import hooks as hooks_lib
from llama_hk.train import metrics as metrics_lib
from llama_hk.train import state as state_lib
from llama_hk.train.checkpointing import Checkpointer, write_adapter, write_model_files
from llama_hk.train.configs import CheckpointConfig, EvalConfig, LoopConfig
from llama_hk.train.step import Optimizer, TrainState, make_eval_step, make_train_step


def train(*, model_config: LlamaConfig, mesh: Mesh, optimizer: Optimizer, train_data: Callable[..., Any] | None,
          loop: LoopConfig, checkpoint: CheckpointConfig = CheckpointConfig(),
          eval_data: Callable[..., Iterable[dict]] | None = None, evaluation: EvalConfig = EvalConfig(),
          model_dir: str | None = None, init_checkpoint: str | None = None, tokenizer_dir: str | None = None,
          operative_config: Callable[[], str] | None = None, dry_run: bool = False, lora: LoraConfig | None = None,
          init_adapter: str | None = None) -> dict:
  """Trains `model_config` (or the model of `init_checkpoint`) to `loop.train_steps` steps in `model_dir`.

  Args:
    model_config: the model; with `init_checkpoint`, its runtime fields (dtypes, remat) apply to that model,
      whose other fields must equal these.
    mesh: the device mesh; the state is laid out by `sharding`'s rules on it.
    optimizer: `make_optimizer`'s transform and schedule.
    train_data: `pipeline.make_pipeline`-like: called with tokenizer, seq_len and batch_size, it returns this
      process's iterator of (batch_size / process_count, seq_len) batches, with get_state / set_state.
    loop: steps, batch shape, loss options, logging cadence.
    checkpoint: checkpoint cadence and how many are kept.
    eval_data: `pipeline.eval_batches`-like, called like `train_data`; None: no evaluation.
    evaluation: evaluation cadence and size.
    model_dir: where the run lives (see the module docstring); required except for a dry run.
    init_checkpoint: any checkpoint `checkpoints.load` reads: the run starts from its weights and tokenizer.
    tokenizer_dir: the tokenizer of a run from scratch (made beforehand by bin/train_tokenizer).
    operative_config: returns the text of model_dir/config.gin.
    dry_run: compile the step on abstract state and return the per-device memory report, touching no data or
      files.
    lora: train a LoRA adapter of `init_checkpoint`'s frozen model instead of every parameter.
    init_adapter: with `lora`, a PEFT adapter directory to start the adapter from.

  Returns:
    The last training record and the last evaluation's figures; a dry run's memory report; {"step"} when
    model_dir is already trained to `loop.train_steps`.
  """
  config = state_lib.model_config(model_config, init_checkpoint)
  if loop.seq_len > config.max_seq_len:
    raise UserError(f"seq_len={loop.seq_len} exceeds the model's max_seq_len={config.max_seq_len}")
  if lora is None and init_adapter:
    raise UserError(f"INIT_ADAPTER={init_adapter}: needs a LoRA run (include gin/runs/lora.gin)")
  if lora is not None and not init_checkpoint and not dry_run:
    raise UserError("INIT_CHECKPOINT: not set (a LoRA run fine-tunes the model of a checkpoint)")
  shardings = state_lib.state_shardings(config, optimizer, mesh, lora)
  batch_shardings = {key: sharding.batch_sharding(mesh) for key in BATCH_KEYS}
  step_fn = jax.jit(make_train_step(config, optimizer, loop.z_loss_weight, loop.grad_accum_steps, lora),
                    in_shardings=(shardings, batch_shardings), out_shardings=(shardings, state_lib.replicated(mesh)),
                    donate_argnums=0)
  if dry_run:
    return dry_run_lib.memory_report(config, optimizer, mesh, shardings, step_fn, loop.batch_size, loop.seq_len,
                                     loop.seed, lora)
  if model_dir is None:
    raise UserError("--model_dir is required (except with --dry_run)")
  model_dir = pathlib.Path(model_dir)
  state_lib.check_model_dir(model_dir, config)
  with Checkpointer(model_dir, checkpoint.keep) as checkpointer:
    adapter = None if lora is None else state_lib.init_adapter(init_adapter, config, lora, init_checkpoint)
    tokenizer, init_params = state_lib.starting_point(checkpointer, model_dir, config, init_checkpoint,
                                                      tokenizer_dir, lora)
    write_model_files(model_dir, config, tokenizer)
    data = train_data(tokenizer=tokenizer, seq_len=loop.seq_len, batch_size=loop.batch_size)
    try:
      state, start = state_lib.initial_state(checkpointer, config, optimizer, shardings, init_params, loop.seed,
                                             data, lora, adapter)
      del init_params, adapter  # On the devices now.
      if start >= loop.train_steps:
        if jax.process_index() == 0:
          print(f"{model_dir}: already trained to step {start} (TRAIN_STEPS={loop.train_steps})", flush=True)
        return {"step": start}
      # A run from scratch redoes its step-0 evaluation, so no earlier record is kept.
      with metrics_lib.MetricsWriter(model_dir, keep_through=start if start else -1) as writer:
        stopwatch = metrics_lib.Stopwatch()
        peak_flops = (loop.peak_flops or platform.device_peak_flops()) * jax.device_count()
        log = hooks_lib.LogHook(loop.log_every, loop.train_steps, writer, config, loop.batch_size * loop.seq_len,
                                loop.seq_len, peak_flops, stopwatch)
        hooks = [hooks_lib.NanGuard(loop.train_steps, checkpointer)]
        if operative_config is not None:
          hooks.append(hooks_lib.OperativeConfigHook(model_dir, operative_config, loop.train_steps))
        hooks.append(log)
        evaluate = None
        if eval_data is not None:
          eval_set = lambda: hooks_lib.eval_set(eval_data, tokenizer, loop.seq_len, loop.batch_size,
                                                evaluation.max_batches, mesh)
          evaluate = hooks_lib.EvalHook(evaluation.every, loop.train_steps, writer,
                                        jax.jit(make_eval_step(config, lora)), eval_set, stopwatch)
          hooks.append(evaluate)
          hooks.append(hooks_lib.CurvesHook(evaluation.every, loop.train_steps, model_dir, stopwatch))
        hooks.append(hooks_lib.CheckpointHook(checkpoint.every, loop.train_steps, checkpointer, data))
        if lora is not None:
          base = str(pathlib.Path(init_checkpoint).resolve())
          hooks.append(hooks_lib.AdapterHook(checkpoint.every, loop.train_steps, lambda step, adapter: write_adapter(
              model_dir, step, adapter, config, lora, base, checkpointer)))
        with sharding.axis_rules(mesh):
          run(step_fn, state, (state_lib.global_batch(batch, mesh) for batch in data), hooks, start,
              loop.train_steps)
      last_evaluation = evaluate.records[-1] if evaluate is not None else {}
      return {**log.record, **{k: v for k, v in last_evaluation.items() if k != "step"}}
    finally:
      if hasattr(data, "close"):
        data.close()


def run(step_fn: Callable[[TrainState, dict], tuple[TrainState, dict]], state: TrainState,
        batches: Iterator[dict], hooks: list[hooks_lib.Hook], start: int, stop: int) -> TrainState:
  """Steps `start + 1` to `stop`, one batch each, calling every hook after each step."""
  for hook in hooks:
    hook.begin(start, state)
  for step in range(start + 1, stop + 1):
    state, metrics = step_fn(state, next(batches))
    for hook in hooks:
      hook(step, state, metrics)
  for hook in hooks:
    hook.end(stop, state)
  return state
