"""Where a run starts and how its state lies on the mesh: the model config, tokenizer and initial TrainState
(from scratch, from an init checkpoint's params, or restored from model_dir; with LoRA, the init checkpoint is the
frozen base and INIT_ADAPTER may give the adapter), their shardings, global batches."""

import json
import math
import pathlib

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_hk import checkpoints
from llama_hk import sharding
from llama_hk.checkpoints import peft
from llama_hk.config import LlamaConfig
from llama_hk.data.batch import BATCH_KEYS
from llama_hk.errors import UserError
from llama_hk.ops.lora import LoraConfig
from llama_hk.tokenizers.tokenizer import Tokenizer
from llama_hk.train.checkpointing import Checkpointer
from llama_hk.train.step import Optimizer, TrainState, init_state

# How a model runs rather than what it is: these may change between runs of one model_dir.
RUNTIME_FIELDS = ("compute_dtype", "remat_policy", "param_dtype", "attention_impl", "unroll_layers")


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
                   init_checkpoint: str | None, tokenizer_dir: str | None,
                   lora: LoraConfig | None = None) -> tuple[Tokenizer, dict | None]:
  """(tokenizer, initial params or None): model_dir's own when resuming, else the init checkpoint's, else
  TOKENIZER_DIR's tokenizer and a random init. With LoRA the init checkpoint's params are the base, read on a
  resume too (checkpoints hold what changes)."""
  init_params = None
  if checkpointer.latest_step() is not None:
    tokenizer = Tokenizer.from_dir(model_dir)
    if lora is not None:
      init_params = checkpoints.load(init_checkpoint, dtype="float32", on_device=False).params
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


def init_adapter(path: str | None, config: LlamaConfig, lora: LoraConfig, init_checkpoint: str) -> dict | None:
  """INIT_ADAPTER's adapter tree (None without one); its rank, alpha and targets must be the run's."""
  if not path:
    return None
  theirs, adapter = peft.read(path, config, base_source=f"INIT_CHECKPOINT={init_checkpoint}")
  if (theirs.rank, theirs.alpha, set(theirs.targets)) != (lora.rank, lora.alpha, set(lora.targets)):
    raise UserError(f"INIT_ADAPTER={path}: r={theirs.rank}, lora_alpha={theirs.alpha}, targets "
                    f"{','.join(theirs.targets)} there; LORA_RANK={lora.rank}, LORA_ALPHA={lora.alpha}, "
                    f"LORA_TARGETS {','.join(lora.targets)} here")
  return adapter


def state_shardings(config: LlamaConfig, optimizer: Optimizer, mesh: Mesh, lora: LoraConfig | None = None
                    ) -> TrainState:
  """TrainState of NamedShardings: params (and a LoRA run's adapter) by the mesh rules, AdamW moments like their
  params, counters replicated."""
  params = sharding.param_shardings(config, mesh, lora=lora)
  abstract = jax.eval_shape(lambda: init_state(config, optimizer, lora=lora))
  opt_state = optax.tree_map_params(optimizer.transform, lambda _, s: s, abstract.opt_state, params,
                                    transform_non_params=lambda _: replicated(mesh))
  base = None if lora is None else sharding.param_shardings(lora.base_config(config), mesh)
  return TrainState(step=replicated(mesh), params=params, opt_state=opt_state, rng=replicated(mesh), base=base)


def abstract_state(config: LlamaConfig, optimizer: Optimizer, shardings: TrainState, seed: int,
                   lora: LoraConfig | None = None) -> TrainState:
  """The state's shapes and dtypes laid out by `shardings`, computed without allocating it."""
  abstract = jax.eval_shape(lambda: init_state(config, optimizer, seed, lora=lora))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def initial_state(checkpointer: Checkpointer, config: LlamaConfig, optimizer: Optimizer, shardings: TrainState,
                  init_params, seed: int, data, lora: LoraConfig | None = None,
                  adapter=None) -> tuple[TrainState, int]:
  """(state, step): the latest checkpoint in model_dir (and the pipeline's state), else `init_params` or a fresh
  init from `seed`, at step 0. With `lora`, `init_params` are the base and `adapter` (or a fresh one) is trained."""
  step = checkpointer.latest_step()
  params = None
  if init_params is not None:
    # A LoRA base arrives in float32 and is cast (or quantized) into shardings.base by init_state.
    target = shardings.params if lora is None else sharding.param_shardings(config, shardings.step.mesh)
    params = jax.tree.map(sharding.put_global, init_params, target)
  if step is not None:
    state = checkpointer.restore(step, abstract_state(config, optimizer, shardings, seed, lora), data)
    if lora is not None:
      base = jax.jit(lora.frozen_base, out_shardings=shardings.base)
      state = state._replace(base=base(params))
    return state, step
  if adapter is not None:
    adapter = jax.tree.map(sharding.put_global, adapter, shardings.params)
  init = jax.jit(lambda p, a: init_state(config, optimizer, seed, p, lora, a), out_shardings=shardings)
  return init(params, adapter), 0


def global_batch(batch: dict, mesh: Mesh) -> dict:
  """Each process's rows become its part of one global (batch_size, seq_len) array per key."""
  out = sharding.batch_sharding(mesh)
  return {key: jax.make_array_from_process_local_data(out, np.asarray(batch[key])) for key in BATCH_KEYS}
