"""The training loop: state on a mesh, the jitted step, Orbax checkpoints, evaluation and metrics.

A `model_dir` holds
  config.gin            the operative gin config (written by process 0 once every configurable has run)
  llama_hk.json         the model config, and the tokenizer files: `checkpoints.load(model_dir)` reads it
  checkpoints/<step>/   Orbax items `params`, `opt_state`, `train` (step, rng) and `data` (each process's
                        pipeline state); written asynchronously and atomically, the last K kept
  metrics.jsonl         {"step","loss","learning_rate","grad_norm","tokens_per_s","mfu"} and
                        {"step","eval_loss","eval_bits_per_byte","eval_perplexity"}, one object a line (process 0);
                        a run from step 0 evaluates before its first step too, so the first and last evaluations
                        show what training changed
  events.*              the same scalars for TensorBoard
A run restores the latest checkpoint in its model_dir, so rerunning a killed command continues it, with the
same losses as if it had never stopped.
"""

import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import tensorboardX
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_hk import checkpoints
from llama_hk import io_utils
from llama_hk import sharding
from llama_hk import training
from llama_hk.config import LlamaConfig
from llama_hk.errors import UserError
from llama_hk.tokenizer import Tokenizer

METRICS_FILE = "metrics.jsonl"
CONFIG_GIN = "config.gin"
ITEMS = ("params", "opt_state", "train", "data")
RUNTIME_FIELDS = ("compute_dtype", "remat_policy", "param_dtype")  # May change between runs of one model_dir.


def train(model_dir: str | None, model_config: LlamaConfig, mesh: Mesh, optimizer: training.Optimizer,
          train_data: Callable[..., Any], batch_size: int, seq_len: int, train_steps: int,
          eval_data: Callable[..., Iterable[dict]] | None = None, checkpoint_every: int = 1000,
          eval_every: int = 1000, keep_checkpoints: int = 3, log_every: int = 10, init_checkpoint: str | None = None,
          tokenizer_dir: str | None = None, tokenizer_documents: Iterable[str] | None = None,
          z_loss_weight: float = 0.0, grad_accum_steps: int = 1, seed: int = 0, eval_max_batches: int | None = None,
          peak_flops: float | None = None, operative_config: Callable[[], str] | None = None,
          dry_run: bool = False) -> dict | None:
  """Trains `model_config` (or the model of `init_checkpoint`) for `train_steps` steps in `model_dir`.

  train_data: `make_pipeline`-like: called with tokenizer, seq_len, batch_size, returns a per-process iterator of
    (batch_size / process_count, seq_len) batches with get_state/set_state. eval_data: `eval_batches`-like.
  tokenizer: the init checkpoint's; else the one in `tokenizer_dir`, trained there first on
    `tokenizer_documents` (vocab_size of the model) when it has none.
  operative_config: returns the text of model_dir/config.gin, called after the first step.
  dry_run: compile the step on abstract state and return the per-device memory report, touching no data or files.
  """
  for name, value in (("train_steps", train_steps), ("checkpoint_every", checkpoint_every),
                      ("eval_every", eval_every), ("log_every", log_every), ("batch_size", batch_size)):
    if value <= 0:
      raise UserError(f"{name}={value}: must be positive")
  config = _model_config(model_config, init_checkpoint)
  if seq_len > config.max_seq_len:
    raise UserError(f"seq_len={seq_len} exceeds the model's max_seq_len={config.max_seq_len}")
  shardings = state_shardings(config, optimizer, mesh)
  batch_shardings = {key: sharding.batch_sharding(mesh) for key in training.BATCH_KEYS}
  step_fn = jax.jit(training.make_train_step(config, optimizer, z_loss_weight, grad_accum_steps),
                    in_shardings=(shardings, batch_shardings), out_shardings=(shardings, _replicated(mesh)),
                    donate_argnums=0)
  if dry_run:
    return memory_report(config, optimizer, mesh, shardings, step_fn, batch_size, seq_len, seed)

  if model_dir is None:
    raise UserError("--model_dir is required (except with --dry_run)")
  model_dir = pathlib.Path(model_dir)
  _check_model_dir(model_dir, config)
  manager = _checkpoint_manager(model_dir, keep_checkpoints)
  try:
    tokenizer, init_params = _starting_point(manager, model_dir, config, init_checkpoint, tokenizer_dir,
                                             tokenizer_documents)
    if jax.process_index() == 0:
      _write_model_files(model_dir, config, tokenizer)
    data = train_data(tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size)
    try:
      state, start = _initial_state(manager, config, optimizer, shardings, init_params, seed, data)
      with sharding.axis_rules(mesh):
        return _loop(model_dir, manager, config, mesh, state, start, step_fn, data, tokenizer, eval_data,
                     batch_size, seq_len, train_steps, checkpoint_every, eval_every, log_every, eval_max_batches,
                     peak_flops, operative_config)
    finally:
      if hasattr(data, "close"):
        data.close()
  finally:
    manager.close()


def _starting_point(manager, model_dir, config, init_checkpoint, tokenizer_dir, tokenizer_documents):
  """(tokenizer, initial params or None): model_dir's own when resuming, else the init checkpoint's, else scratch."""
  init_params = None
  if manager.latest_step() is not None:
    tokenizer = Tokenizer.from_dir(model_dir)
  elif init_checkpoint:
    loaded = checkpoints.load(init_checkpoint, dtype="float32", on_device=False)
    if loaded.tokenizer is None:
      raise UserError(f"INIT_CHECKPOINT={init_checkpoint}: carries no tokenizer")
    tokenizer, init_params = loaded.tokenizer, loaded.params
  else:
    tokenizer = _scratch_tokenizer(tokenizer_dir, tokenizer_documents, config)
  if tokenizer.vocab_size > config.vocab_size:
    raise UserError(f"{tokenizer.source}: tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                    f"vocab_size={config.vocab_size}")
  return tokenizer, init_params


def _replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def state_shardings(config: LlamaConfig, optimizer: training.Optimizer, mesh: Mesh) -> training.TrainState:
  """TrainState of NamedShardings: params by the mesh rules, AdamW moments like their params, counters replicated."""
  import optax
  params = sharding.param_shardings(config, mesh)
  abstract = jax.eval_shape(lambda: training.init_state(config, optimizer))
  opt_state = optax.tree_map_params(optimizer.transform, lambda _, s: s, abstract.opt_state, params,
                                    transform_non_params=lambda _: _replicated(mesh))
  return training.TrainState(step=_replicated(mesh), params=params, opt_state=opt_state, rng=_replicated(mesh))


def _model_config(model_config: LlamaConfig, init_checkpoint: str | None) -> LlamaConfig:
  """The gin model config, or the init checkpoint's with the gin config's runtime fields; float32 masters."""
  if init_checkpoint:
    loaded = checkpoints.load_config(init_checkpoint)
    differences = _differences(loaded, model_config)
    if differences:
      raise UserError(f"INIT_CHECKPOINT={init_checkpoint}: its model differs from MODEL_CONFIG in "
                      + ", ".join(f"{k} ({a} there, {b} here)" for k, (a, b) in differences.items()))
    model_config = loaded.replace(**{k: getattr(model_config, k) for k in RUNTIME_FIELDS})
  return model_config.replace(param_dtype="float32")


def _differences(theirs: LlamaConfig, ours: LlamaConfig) -> dict:
  """Fields (other than runtime ones) that differ: {field: (theirs, ours)}; floats compared to float32 precision,
  since GGUF stores them in float32."""
  differences = {}
  for field in json.loads(ours.to_json()):
    a, b = getattr(theirs, field), getattr(ours, field)
    same = math.isclose(a, b, rel_tol=1e-6) if isinstance(a, float) and isinstance(b, float) else a == b
    if field not in RUNTIME_FIELDS and not same:
      differences[field] = (a, b)
  return differences


def _check_model_dir(model_dir: pathlib.Path, config: LlamaConfig) -> None:
  """A model_dir holding another model's checkpoints is refused rather than silently overwritten."""
  existing = model_dir / checkpoints.CONFIG_FILE
  if not existing.is_file():
    return
  differences = _differences(LlamaConfig.from_json(existing.read_text(), str(existing)), config)
  if differences:
    diff = ", ".join(f"{k}={a} there, {b} here" for k, (a, b) in differences.items())
    raise UserError(f"{model_dir}: holds a checkpoint of another model config ({diff}); use a new --model_dir")


def _scratch_tokenizer(tokenizer_dir, documents, config: LlamaConfig) -> Tokenizer:
  """The tokenizer of a run from scratch: TOKENIZER_DIR's, trained there first when it has none."""
  if not tokenizer_dir:
    raise UserError("TOKENIZER_DIR: not set (a run from scratch needs a tokenizer directory)")
  path = pathlib.Path(tokenizer_dir).expanduser()
  has_tokenizer = path.is_dir() and any((path / name).is_file() for name in ("tokenizer.model", "tokenizer.json"))
  if not has_tokenizer:
    if documents is None:
      raise UserError(f"TOKENIZER_DIR={tokenizer_dir}: has no tokenizer (train one with bin/train_tokenizer)")
    if jax.process_index() == 0:
      from llama_hk.data import tokenizer_training
      print(f"Training a {config.vocab_size}-piece tokenizer into {path} ...", flush=True)
      tokenizer_training.train_tokenizer(documents, path, vocab_size=config.vocab_size,
                                         max_input_chars=100_000_000)
    multihost_utils.sync_global_devices("tokenizer trained")
  return Tokenizer.from_dir(path)


def _write_model_files(model_dir: pathlib.Path, config: LlamaConfig, tokenizer: Tokenizer) -> None:
  """llama_hk.json and the tokenizer files, so that checkpoints.load(model_dir) reads the latest checkpoint."""
  model_dir.mkdir(parents=True, exist_ok=True)
  io_utils.write_text_atomic(model_dir / checkpoints.CONFIG_FILE, config.to_json())
  for name, data in tokenizer.files.items():
    tmp = model_dir / f".{name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, model_dir / name)


def _checkpoint_manager(model_dir: pathlib.Path, keep: int):
  import grain
  import orbax.checkpoint as ocp
  # Directories are created in the caller's thread, so that a failure to create one raises there (Orbax's
  # background thread only logs it, and waiting on that save then never ends).
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True,
      async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
  handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
              "train": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
  try:
    return ocp.CheckpointManager((model_dir / checkpoints.TRAINING_CHECKPOINTS_DIR).resolve(), options=options,
                                 item_names=ITEMS, item_handlers=handlers)
  except OSError as e:
    raise UserError(f"{model_dir}: cannot create the checkpoint directory ({e.strerror})") from None


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


def _initial_state(manager, config, optimizer, shardings, init_params, seed, data):
  """The latest checkpoint in model_dir (and the pipeline's state), else a fresh init or `init_params`: (state, step).
  """
  import grain
  import orbax.checkpoint as ocp
  step = manager.latest_step()
  if step is not None:
    abstract = jax.eval_shape(lambda: training.init_state(config, optimizer, seed))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(target.params), opt_state=ocp.args.StandardRestore(target.opt_state),
          train=ocp.args.StandardRestore({"step": target.step, "rng": target.rng}),
          data=grain.checkpoint.CheckpointRestore(_PipelineState())))
    except Exception as e:  # Orbax raises many types for unreadable or mismatched checkpoints.
      raise UserError(f"{manager.directory}/{step}: cannot restore ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    data.set_state(json.loads(restored.data.state))
    state = training.TrainState(restored.train["step"], restored.params, restored.opt_state, restored.train["rng"])
    return state, step
  params = None
  if init_params is not None:
    params = jax.tree.map(lambda array, s: jax.make_array_from_callback(array.shape, s, lambda i: array[i]),
                          init_params, shardings.params)
  init = jax.jit(lambda p: training.init_state(config, optimizer, seed, p), out_shardings=shardings)
  return init(params), 0


def _global_batch(batch: dict, mesh: Mesh) -> dict:
  """Each process's rows become its part of one global (batch_size, seq_len) array per key."""
  out = sharding.batch_sharding(mesh)
  return {key: jax.make_array_from_process_local_data(out, np.asarray(batch[key])) for key in training.BATCH_KEYS}


class _MetricsWriter:
  """metrics.jsonl and TensorBoard events, on process 0 only."""

  def __init__(self, model_dir: pathlib.Path, keep_through: int):
    """Records of steps up to `keep_through` (the restored checkpoint's) are kept; later ones are redone."""
    self.active = jax.process_index() == 0
    if not self.active:
      return
    self.path = model_dir / METRICS_FILE
    self._truncate_after(keep_through)
    self.file = open(self.path, "a")
    self.tensorboard = tensorboardX.SummaryWriter(str(model_dir), purge_step=keep_through + 1)

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


def _eval_set(eval_data, tokenizer, seq_len, batch_size, max_batches, mesh):
  """This process's eval batches, padded with empty batches to the same count on every process, and the UTF-8
  bytes of the text they score, summed over processes."""
  batches = []
  for batch in eval_data(tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size):
    if max_batches is not None and len(batches) >= max_batches:
      break
    batches.append(batch)
  num_bytes = sum(training.bytes_of_scored_text(batch, tokenizer) for batch in batches)
  counts = multihost_utils.process_allgather(np.array([len(batches), num_bytes], np.int64))
  counts = np.asarray(counts).reshape(-1, 2)
  rows = batch_size // jax.process_count()
  empty = {key: np.zeros((rows, seq_len), np.float32 if key == "loss_mask" else np.int32)
           for key in training.BATCH_KEYS}
  batches += [empty] * (int(counts[:, 0].max()) - len(batches))
  return [_global_batch(batch, mesh) for batch in batches], int(counts[:, 1].sum())


def _evaluate(eval_fn, params, eval_set) -> tuple[float, float]:
  batches, num_bytes = eval_set
  nll, tokens = 0.0, 0.0
  for batch in batches:
    batch_nll, batch_tokens = eval_fn(params, batch)
    nll += float(batch_nll)
    tokens += float(batch_tokens)
  return nll / max(tokens, 1.0), training.bits_per_byte(nll, num_bytes)


def _save(manager, state, data, step: int) -> None:
  import grain
  import orbax.checkpoint as ocp
  pipeline_state = _PipelineState(json.dumps(data.get_state()).encode())
  try:
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state),
        train=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
        data=grain.checkpoint.CheckpointSave(pipeline_state)))
  except Exception as e:  # Orbax raises many types for a failed write.
    _checkpoint_failed(manager, step, e)


def _wait_for_checkpoints(manager, step: int) -> None:
  try:
    manager.wait_until_finished()
  except Exception as e:
    _checkpoint_failed(manager, step, e)


def _checkpoint_failed(manager, step: int, error: Exception):
  steps = [s for s in manager.all_steps() if s != step]
  kept = f"the last good checkpoint is step {max(steps)}" if steps else "no earlier checkpoint exists"
  reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
  raise UserError(f"{manager.directory}: writing the checkpoint of step {step} failed ({reason}); {kept}") from None


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"


def _loop(model_dir, manager, config, mesh, state, start, step_fn, data, tokenizer, eval_data, batch_size,
          seq_len, train_steps, checkpoint_every, eval_every, log_every, eval_max_batches, peak_flops,
          operative_config) -> dict:
  is_main = jax.process_index() == 0
  if start >= train_steps:
    if is_main:
      print(f"{model_dir}: already trained to step {start} (TRAIN_STEPS={train_steps})", flush=True)
    return {"step": start}
  writer = _MetricsWriter(model_dir, start if start else -1)  # A run from scratch redoes its step-0 evaluation.
  eval_fn = jax.jit(training.make_eval_step(config))
  eval_set = None
  evaluations = []

  def evaluate(step, params):
    nonlocal eval_set
    if eval_set is None:
      eval_set = _eval_set(eval_data, tokenizer, seq_len, batch_size, eval_max_batches, mesh)
    eval_loss, eval_bpb = _evaluate(eval_fn, params, eval_set)
    record = {"step": step, "eval_loss": eval_loss, "eval_bits_per_byte": eval_bpb,
              "eval_perplexity": float(np.exp(eval_loss))}
    writer.write(record)
    evaluations.append(record)
    if is_main:
      print(f"step {step}  eval_loss {eval_loss:.4f}  eval_bits_per_byte {eval_bpb:.4f}  "
            f"eval_perplexity {record['eval_perplexity']:.3f}", flush=True)

  peak = (peak_flops or training.device_peak_flops()) * jax.device_count()
  flops_per_step = training.flops_per_token(config, seq_len) * batch_size * seq_len
  summary = {}
  try:
    if eval_data is not None and start == 0:
      evaluate(0, state.params)  # The starting point: the before of a before-and-after.
    step, interval_start, interval_steps, run_start = start, time.perf_counter(), 0, time.perf_counter()
    while step < train_steps:
      state, metrics = step_fn(state, _global_batch(next(data), mesh))
      step += 1
      interval_steps += 1
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        _wait_for_checkpoints(manager, step)
        last = manager.latest_step()
        raise UserError(f"step {step}: loss is {loss}; stopped. "
                        + (f"The last good checkpoint, step {last}, is kept in {manager.directory}" if last is not None
                           else "No checkpoint was written yet"))
      if step == start + 1 and operative_config is not None and is_main:
        io_utils.write_text_atomic(model_dir / CONFIG_GIN, operative_config())
      if step % log_every == 0 or step == train_steps:
        elapsed = time.perf_counter() - interval_start
        steps_per_s = interval_steps / elapsed
        record = {"step": step, "loss": loss, "learning_rate": float(metrics["learning_rate"]),
                  "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": steps_per_s * batch_size * seq_len,
                  "mfu": steps_per_s * flops_per_step / peak}
        writer.write(record)
        summary.update(record)
        if is_main:
          seconds_per_step = ((time.perf_counter() - run_start) / (step - start - 1) if step > start + 1
                              else elapsed / interval_steps)
          left = (train_steps - step) * seconds_per_step
          print(f"step {step}/{train_steps}  loss {loss:.4f}  lr {record['learning_rate']:.2e}  "
                f"{steps_per_s:.2f} steps/s  {record['tokens_per_s']:.0f} tokens/s  time left "
                f"{_format_seconds(left)}", flush=True)
        interval_start, interval_steps = time.perf_counter(), 0
      if step == start + 1:  # Compiled now: later throughput and the time left exclude compilation.
        interval_start, interval_steps, run_start = time.perf_counter(), 0, time.perf_counter()
      if eval_data is not None and (step % eval_every == 0 or step == train_steps):
        evaluate(step, state.params)
        interval_start = time.perf_counter()  # Evaluation time is not training throughput.
      if step % checkpoint_every == 0 or step == train_steps:
        _save(manager, state, data, step)
    _wait_for_checkpoints(manager, step)
    if evaluations:
      summary.update({k: v for k, v in evaluations[-1].items() if k != "step"})
    if is_main and len(evaluations) > 1:
      first, last = evaluations[0], evaluations[-1]
      print(f"validation perplexity {first['eval_perplexity']:.3f} at step {first['step']} -> "
            f"{last['eval_perplexity']:.3f} at step {last['step']} (bits per byte {first['eval_bits_per_byte']:.4f} "
            f"-> {last['eval_bits_per_byte']:.4f})", flush=True)
    return summary
  finally:
    writer.close()


def _leaf_bytes_per_device(abstract, shardings) -> int:
  """Bytes the largest shard of each leaf takes on one device, summed."""
  total = 0
  for leaf, leaf_sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    total += math.prod(leaf_sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  return total


def memory_report(config, optimizer, mesh, shardings, step_fn, batch_size, seq_len, seed) -> dict:
  """Compiles the step ahead of time on abstract, mesh-laid-out state and reports bytes per device."""
  abstract = jax.eval_shape(lambda: training.init_state(config, optimizer, seed))
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  batch = {key: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32 if key == "loss_mask" else jnp.int32,
                                     sharding=sharding.batch_sharding(mesh)) for key in training.BATCH_KEYS}
  start = time.perf_counter()
  with sharding.axis_rules(mesh):
    compiled = step_fn.lower(state, batch).compile()
  report = {"devices": jax.device_count(), "mesh": dict(mesh.shape), "compile_s": round(time.perf_counter() - start, 1),
            "params_bytes": _leaf_bytes_per_device(abstract.params, shardings.params),
            "opt_state_bytes": _leaf_bytes_per_device(abstract.opt_state, shardings.opt_state)}
  analysis = compiled.memory_analysis()
  if analysis is not None:
    report.update(temp_bytes=int(analysis.temp_size_in_bytes), argument_bytes=int(analysis.argument_size_in_bytes),
                  output_bytes=int(analysis.output_size_in_bytes), alias_bytes=int(analysis.alias_size_in_bytes))
  return report


def print_memory_report(report: dict, out=sys.stdout) -> None:
  gib = 2.0 ** 30
  print(f"dry run: {report['devices']} devices, mesh {report['mesh']}, step compiled in {report['compile_s']} s",
        file=out)
  print("per-device memory:", file=out)
  for key, label in (("params_bytes", "parameters"), ("opt_state_bytes", "optimizer state"),
                     ("temp_bytes", "compiled temporaries"), ("argument_bytes", "step arguments"),
                     ("output_bytes", "step outputs"), ("alias_bytes", "donated (outputs reusing arguments)")):
    if key in report:
      print(f"  {label:38s} {report[key] / gib:10.3f} GiB", file=out)
  print(json.dumps(report), file=out, flush=True)
