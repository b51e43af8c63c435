"""Where a run starts and how its state lies on the mesh: the model config, tokenizer and initial TrainState
(from scratch, from an init checkpoint's params, or restored from model_dir), their shardings, global batches."""

import json
import math
import pathlib

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_hk import checkpoints
from llama_hk import sharding
from llama_hk.config import LlamaConfig
from llama_hk.data.batch import BATCH_KEYS
from llama_hk.errors import UserError
from llama_hk.tokenizers.tokenizer import Tokenizer
from llama_hk.train.checkpointing import Checkpointer
from llama_hk.train.step import Optimizer, TrainState, init_state

# How a model runs rather than what it is: these may change between runs of one model_dir.
RUNTIME_FIELDS = ("compute_dtype", "remat_policy", "param_dtype", "attention_impl")


def model_config(config: LlamaConfig, init_checkpoint: str | None) -> LlamaConfig:
  """The gin model config, or the init checkpoint's with the gin config's runtime fields; float32 masters."""
  if init_checkpoint:
    loaded = checkpoints.load_config(init_checkpoint)
    differences = _differences(loaded, config)
    if differences:
      raise UserError(f"INIT_CHECKPOINT={init_checkpoint}: its model differs from MODEL_CONFIG in "
                      + ", ".join(f"{k} ({a} there, {b} here)" for k, (a, b) in differences.items()))
    config = loaded.replace(**{k: getattr(config, k) for k in RUNTIME_FIELDS})
  return config.replace(param_dtype="float32")


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


def check_model_dir(model_dir: pathlib.Path, config: LlamaConfig) -> None:
  """A model_dir holding another model's checkpoints is refused rather than silently overwritten."""
  existing = model_dir / checkpoints.CONFIG_FILE
  if not existing.is_file():
    return
  differences = _differences(LlamaConfig.from_json(existing.read_text(), str(existing)), config)
  if differences:
    diff = ", ".join(f"{k}={a} there, {b} here" for k, (a, b) in differences.items())
    raise UserError(f"{model_dir}: holds a checkpoint of another model config ({diff}); use a new --model_dir")


def starting_point(checkpointer: Checkpointer, model_dir: pathlib.Path, config: LlamaConfig,
                   init_checkpoint: str | None, tokenizer_dir: str | None) -> tuple[Tokenizer, dict | None]:
  """(tokenizer, initial params or None): model_dir's own when resuming, else the init checkpoint's, else
  TOKENIZER_DIR's tokenizer and a random init."""
  init_params = None
  if checkpointer.latest_step() is not None:
    tokenizer = Tokenizer.from_dir(model_dir)
  elif init_checkpoint:
    loaded = checkpoints.load(init_checkpoint, dtype="float32", on_device=False)
    if loaded.tokenizer is None:
      raise UserError(f"INIT_CHECKPOINT={init_checkpoint}: carries no tokenizer")
    tokenizer, init_params = loaded.tokenizer, loaded.params
  else:
    tokenizer = _scratch_tokenizer(tokenizer_dir)
  if tokenizer.vocab_size > config.vocab_size:
    raise UserError(f"{tokenizer.source}: tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                    f"vocab_size={config.vocab_size}")
  return tokenizer, init_params


def _scratch_tokenizer(tokenizer_dir: str | None) -> Tokenizer:
  """The tokenizer of a run from scratch: TOKENIZER_DIR's, which bin/train_tokenizer makes beforehand."""
  if not tokenizer_dir:
    raise UserError("TOKENIZER_DIR: not set (a run from scratch needs a tokenizer directory)")
  path = pathlib.Path(tokenizer_dir).expanduser()
  if not any((path / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
    raise UserError(f"TOKENIZER_DIR={tokenizer_dir}: has no tokenizer; make one first with bin/train_tokenizer "
                    "and the same --gin_file")
  return Tokenizer.from_dir(path)


def replicated(mesh: Mesh) -> NamedSharding:
  """Counters and the step's scalar metrics: one copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def state_shardings(config: LlamaConfig, optimizer: Optimizer, mesh: Mesh) -> TrainState:
  """TrainState of NamedShardings: params by the mesh rules, AdamW moments like their params, counters replicated."""
  params = sharding.param_shardings(config, mesh)
  abstract = jax.eval_shape(lambda: init_state(config, optimizer))
  opt_state = optax.tree_map_params(optimizer.transform, lambda _, s: s, abstract.opt_state, params,
                                    transform_non_params=lambda _: replicated(mesh))
  return TrainState(step=replicated(mesh), params=params, opt_state=opt_state, rng=replicated(mesh))


def abstract_state(config: LlamaConfig, optimizer: Optimizer, shardings: TrainState, seed: int) -> TrainState:
  """The state's shapes and dtypes laid out by `shardings`, computed without allocating it."""
  abstract = jax.eval_shape(lambda: init_state(config, optimizer, seed))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def initial_state(checkpointer: Checkpointer, config: LlamaConfig, optimizer: Optimizer, shardings: TrainState,
                  init_params, seed: int, data) -> tuple[TrainState, int]:
  """(state, step): the latest checkpoint in model_dir (and the pipeline's state), else `init_params` or a fresh
  init from `seed`, at step 0."""
  step = checkpointer.latest_step()
  if step is not None:
    return checkpointer.restore(step, abstract_state(config, optimizer, shardings, seed), data), step
  params = None
  if init_params is not None:
    params = jax.tree.map(sharding.put_global, init_params, shardings.params)
  init = jax.jit(lambda p: init_state(config, optimizer, seed, p), out_shardings=shardings)
  return init(params), 0


def global_batch(batch: dict, mesh: Mesh) -> dict:
  """Each process's rows become its part of one global (batch_size, seq_len) array per key."""
  out = sharding.batch_sharding(mesh)
  return {key: jax.make_array_from_process_local_data(out, np.asarray(batch[key])) for key in BATCH_KEYS}
