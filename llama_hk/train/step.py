"""The training step: loss, optimizer and one pure update `train_step(state, batch) -> (state, metrics)`.

Numerics: master weights, gradients and optimizer moments are float32 (`param_dtype`); the model casts them to
`compute_dtype` where it uses them (bfloat16 compute keeps float32 masters). Rematerialization follows
`config.remat_policy`, applied inside the model's layer scan.

The loss is the mean next-token cross-entropy over the tokens the packing `loss_mask` marks, plus an optional
z-loss (PaLM's `z_loss_weight * logsumexp(logits)^2`, same mask and mean) that keeps the softmax normalizer near
zero. With gradient accumulation the batch is split into micro-batches run in a `scan`; each micro-batch's loss is
normalized by the whole batch's token count, so the summed gradient is exactly that of the whole batch.

The optimizer is optax AdamW (decoupled weight decay, PyTorch's formulation) with decay masked off norm scales and
embeddings, after global-norm clipping, on a linear-warmup-then-cosine (or constant) learning rate.
"""

from typing import Any, Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from llama_hk.config import LlamaConfig
from llama_hk.data.batch import BATCH_KEYS
from llama_hk.errors import UserError
from llama_hk.models import make_forward
from llama_hk.ops import lora as lora_lib
from llama_hk.params import map_params

class TrainState(NamedTuple):
  """Everything a step reads; a pytree, so it is jitted, sharded and donated whole. All but `base` is what a step
  changes and a checkpoint holds."""
  step: jax.Array  # int32 scalar: updates applied so far.
  params: Any  # The trained parameters, float32 masters: the Haiku parameter tree, or with LoRA the adapter's.
  opt_state: Any  # optax state: AdamW moments shaped like params, and counters.
  rng: jax.Array  # uint32 key data: LoRA dropout's masks come from it folded with the step (a resume redraws them).
  base: Any = None  # With LoRA: the frozen base parameters (no gradient, no optimizer state); else None.


def model_params(state: TrainState):
  """The parameter tree the model reads: `params`, or with a frozen base the adapter beside it."""
  return state.params if state.base is None else lora_lib.combine(state.base, state.params)


class Optimizer(NamedTuple):
  transform: optax.GradientTransformation
  learning_rate: optax.Schedule  # Step -> the rate the update of that step uses (the `learning_rate` metric).


def weight_decay_mask(params) -> Any:
  """True where weight decay applies (the parameter table's `decay`): the matrices, not norm scales or embeddings,
  as LLaMA/GPT recipes do."""
  return map_params(lambda row, _: row.decay, params)


def learning_rate_schedule(peak_learning_rate: float, total_steps: int, warmup_steps: int = 0,
                           schedule: str = "cosine", final_fraction: float = 0.1) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine decay to `final_fraction * peak` at `total_steps` (or constant)."""
  if schedule == "constant":
    if not warmup_steps:
      return optax.constant_schedule(peak_learning_rate)
    return optax.join_schedules([optax.linear_schedule(0.0, peak_learning_rate, warmup_steps),
                                 optax.constant_schedule(peak_learning_rate)], [warmup_steps])
  if schedule != "cosine":
    raise UserError(f"learning rate schedule {schedule!r}: must be 'cosine' or 'constant'")
  if not 0 <= warmup_steps < total_steps:
    raise UserError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps})")
  return optax.warmup_cosine_decay_schedule(0.0, peak_learning_rate, warmup_steps, total_steps,
                                            end_value=final_fraction * peak_learning_rate)


def make_optimizer(total_steps: int, peak_learning_rate: float = 3e-4, warmup_steps: int = 0,
                   schedule: str = "cosine", final_fraction: float = 0.1, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8, weight_decay: float = 0.1, clip_norm: float | None = 1.0) -> Optimizer:
  """AdamW with masked decay after global-norm clipping (None: no clipping), on the schedule above."""
  learning_rate = learning_rate_schedule(peak_learning_rate, total_steps, warmup_steps, schedule, final_fraction)
  adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask)
  transform = adamw if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
  return Optimizer(transform, learning_rate)


def init_state(config: LlamaConfig, optimizer: Optimizer, seed: int = 0, params=None,
               lora: lora_lib.LoraConfig | None = None, adapter=None) -> TrainState:
  """A fresh state: `params` (e.g. a loaded checkpoint's) or a random initialization from `seed`; with `lora`,
  those are the frozen base (in `lora.base_weights`) and `adapter` (or a fresh PEFT-style one) is trained."""
  rng = jax.random.PRNGKey(seed)
  if params is None:
    params = make_forward(config).init(rng, jnp.zeros((1, 2), jnp.int32))
  base = None
  if lora is not None:
    base = lora.frozen_base(params)
    params = lora_lib.init_adapter(jax.random.fold_in(rng, 1), config, lora) if adapter is None else adapter
  params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.transform.init(params),
                    rng=rng, base=base)


def masked_losses(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array):
  """Summed cross-entropy and summed z-loss term (logsumexp^2) over the masked tokens: logits (B, T, V)."""
  logits = logits.astype(jnp.float32)
  log_normalizer = jax.nn.logsumexp(logits, axis=-1)  # (B, T)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # (B, T)
  nll = log_normalizer - target_logits  # (B, T)
  return jnp.sum(nll * loss_mask), jnp.sum(jnp.square(log_normalizer) * loss_mask)


def _micro_batches(batch: dict, count: int) -> dict:
  """(B, T) -> (count, B / count, T), micro-batch i taking rows i, i + count, ...

  Reshaping to (B / count, count) first keeps the batch axis's data-parallel split intact (no resharding).
  """
  def split(x):
    b = x.shape[0]
    if b % count:
      raise UserError(f"batch size {b} is not a multiple of grad_accum_steps={count}")
    return jnp.swapaxes(x.reshape(b // count, count, *x.shape[1:]), 0, 1)
  return {key: split(batch[key]) for key in BATCH_KEYS}


def _forward(config: LlamaConfig, lora: lora_lib.LoraConfig | None) -> hk.Transformed:
  """The model the state's parameters run: with LoRA, the adapter over its base (int8 base: int8 matrices)."""
  return make_forward(config if lora is None else lora.base_config(config), lora=lora)


def make_train_step(config: LlamaConfig, optimizer: Optimizer, z_loss_weight: float = 0.0,
                    grad_accum_steps: int = 1, lora: lora_lib.LoraConfig | None = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The pure step: batch (B, T) arrays -> the updated state and {"loss", "z_loss", "learning_rate", "grad_norm"}.

  With `lora`, the gradient is the adapter's only; the base passes through unchanged.
  """
  forward = _forward(config, lora)

  def step(state: TrainState, batch: dict):
    total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

    def objective(params, micro, micro_index=0):
      kwargs = {}
      if lora is not None:
        params = lora_lib.combine(state.base, params)
        if lora.dropout:
          kwargs["dropout_rng"] = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), micro_index)
      logits, _ = forward.apply(params, micro["tokens"], micro["positions"], micro["segment_ids"],
                                **kwargs)  # (b, T, V)
      nll_sum, z_sum = masked_losses(logits, micro["targets"], micro["loss_mask"])
      loss = nll_sum / total_tokens
      return loss + z_loss_weight * z_sum / total_tokens, (loss, z_sum / total_tokens)

    grad_fn = jax.grad(objective, has_aux=True)
    if grad_accum_steps == 1:
      grads, (loss, z_loss) = grad_fn(state.params, batch)
    else:
      def accumulate(carry, indexed):
        grads, (loss, z_loss) = grad_fn(state.params, *indexed)
        return jax.tree.map(jnp.add, carry, (grads, loss, z_loss)), None
      zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), jnp.zeros(()))
      indices = jnp.arange(grad_accum_steps) if lora is not None and lora.dropout else None  # Dropout's key only.
      (grads, loss, z_loss), _ = jax.lax.scan(accumulate, zeros, (_micro_batches(batch, grad_accum_steps), indices))
    updates, opt_state = optimizer.transform.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "z_loss": z_loss, "learning_rate": optimizer.learning_rate(state.step),
               "grad_norm": optax.tree.norm(grads)}
    return TrainState(state.step + 1, params, opt_state, state.rng, state.base), metrics

  return step


def make_eval_step(config: LlamaConfig, lora: lora_lib.LoraConfig | None = None
                   ) -> Callable[[Any, dict], tuple[jax.Array, jax.Array]]:
  """params, batch -> (summed NLL in nats, scored tokens) over the batch's masked tokens; with `lora`, params are
  `ops.lora.combine(base, adapter)`."""
  forward = _forward(config, lora)

  def step(params, batch):
    logits, _ = forward.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"])
    nll_sum, _ = masked_losses(logits, batch["targets"], batch["loss_mask"])
    return nll_sum, jnp.sum(batch["loss_mask"])

  return step
