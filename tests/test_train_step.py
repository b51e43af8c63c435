"""The train step against PyTorch: transformers LlamaForCausalLM + torch.optim.AdamW with the same hyper-parameters,
decay mask and clipping give the same losses and parameters (float32, highest matmul precision).

Also: gradient accumulation equals the whole batch, bfloat16 compute and remat run and agree roughly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llama_hk import config as config_lib
from llama_hk import train
from llama_hk.params import params_from_hf, params_to_hf
import reference

HYPER = dict(peak_learning_rate=1e-3, b1=0.9, b2=0.95, eps=1e-6, weight_decay=0.1, clip_norm=0.5)
STEPS = 3


def _batches(vocab: int, count: int, batch: int = 2, length: int = 12) -> list[dict[str, np.ndarray]]:
  """Rows of one document each, the second padded at its end (segment 0, loss mask 0)."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(count):
    tokens = rng.integers(3, vocab, (batch, length + 1)).astype(np.int32)
    segment_ids = np.ones((batch, length), np.int32)
    segment_ids[1, -4:] = 0
    loss_mask = (segment_ids == 1).astype(np.float32)
    loss_mask[1, -5] = 0.0  # The last real token has no target.
    out.append({"tokens": tokens[:, :-1], "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
                "segment_ids": segment_ids, "targets": tokens[:, 1:] * (loss_mask > 0), "loss_mask": loss_mask})
  return out


def _torch_run(model, batches) -> list[float]:
  decay = [p for n, p in model.named_parameters() if not (n.endswith("norm.weight") or "embed_tokens" in n)]
  no_decay = [p for n, p in model.named_parameters() if n.endswith("norm.weight") or "embed_tokens" in n]
  return reference.torch_adamw_steps(model, [{"params": decay, "weight_decay": HYPER["weight_decay"]},
                                             {"params": no_decay, "weight_decay": 0.0}], batches, HYPER)


@pytest.mark.slow
@pytest.mark.parametrize("tie,unroll_layers", [(False, False), (True, False), (False, True)])
def test_steps_equal_pytorch(tiny_hf_model, tie, unroll_layers):
  hf = tiny_hf_model(seed=3, weight_std=0.05, tie_word_embeddings=tie)
  hf.train()
  config = config_lib.from_hf_config(hf.config.to_dict()).replace(unroll_layers=unroll_layers)
  state_dict = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
  params = params_from_hf(state_dict, config)
  optimizer = train.make_optimizer(total_steps=STEPS, schedule="constant", **HYPER)
  state = train.init_state(config, optimizer, params=params)
  step = jax.jit(train.make_train_step(config, optimizer))
  batches = _batches(config.vocab_size, STEPS)
  # The layers as XLA runs them: a loop (forward and backward), or straight-line code when unrolled.
  assert ("while(" in step.lower(state, batches[0]).compile().as_text()) == (not unroll_layers)
  ours = []
  for batch in batches:
    state, metrics = step(state, batch)
    ours.append(float(metrics["loss"]))
    assert float(metrics["learning_rate"]) == pytest.approx(HYPER["peak_learning_rate"])
  theirs = _torch_run(hf, batches)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
  updated = params_to_hf(jax.device_get(state.params), config)
  for name, value in hf.state_dict().items():
    if tie and name == "lm_head.weight":
      continue
    np.testing.assert_allclose(updated[name], value.detach().numpy(), atol=1e-5, rtol=0, err_msg=name)


def test_decay_mask_skips_norms_and_embeddings():
  config = config_lib.LlamaConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32)
  state = jax.eval_shape(lambda: train.init_state(config, train.make_optimizer(total_steps=10)))
  mask = train.weight_decay_mask(state.params)
  assert not mask["embedding"]["embeddings"] and not mask["norm"]["scale"]
  assert not mask["decoder/input_norm"]["scale"] and mask["decoder/attention"]["q_proj"] and mask["lm_head"]["w"]


def test_schedule_warmup_then_cosine():
  schedule = train.learning_rate_schedule(1.0, total_steps=110, warmup_steps=10, final_fraction=0.1)
  assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0) and float(schedule(60)) == pytest.approx(0.55)
  assert float(schedule(110)) == pytest.approx(0.1)


@pytest.mark.slow
def test_accumulation_equals_whole_batch_and_bf16_remat_run():
  config = config_lib.LlamaConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64)
  optimizer = train.make_optimizer(total_steps=10, warmup_steps=2)
  batch = _batches(config.vocab_size, 1, batch=4)[0]
  whole, whole_metrics = jax.jit(train.make_train_step(config, optimizer, z_loss_weight=1e-4))(
      train.init_state(config, optimizer), batch)
  accumulated, accumulated_metrics = jax.jit(train.make_train_step(config, optimizer, 1e-4, grad_accum_steps=2))(
      train.init_state(config, optimizer), batch)
  for key in ("loss", "z_loss", "grad_norm"):
    np.testing.assert_allclose(accumulated_metrics[key], whole_metrics[key], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), accumulated.params, whole.params)

  low = config.replace(compute_dtype="bfloat16", remat_policy="full")
  state, metrics = jax.jit(train.make_train_step(low, optimizer))(train.init_state(low, optimizer), batch)
  assert state.params["decoder/mlp"]["up_proj"].dtype == jnp.float32
  np.testing.assert_allclose(metrics["loss"], whole_metrics["loss"], rtol=2e-2)


def test_masked_losses_follow_their_formulas_on_fixed_logits():
  """Summed cross-entropy and summed z-loss term logsumexp(logits)^2 over the masked tokens, against NumPy."""
  rng = np.random.default_rng(1)
  logits = (rng.standard_normal((2, 5, 11)) * 3 + 4).astype(np.float32)  # (B, T, V); logsumexp far from 0.
  targets = rng.integers(0, 11, (2, 5)).astype(np.int32)  # (B, T)
  mask = (rng.random((2, 5)) < 0.6).astype(np.float32)  # (B, T)
  shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
  log_z = np.log(np.exp(shifted).sum(-1)) + logits.max(-1)  # (B, T)
  nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]  # (B, T)
  nll_sum, z_sum = train.masked_losses(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(float(nll_sum), (nll * mask).sum(), rtol=1e-6)
  np.testing.assert_allclose(float(z_sum), (log_z ** 2 * mask).sum(), rtol=1e-6)


@pytest.mark.slow
def test_z_loss_value_and_gradient_equal_pytorch(tiny_hf_model):
  """The step's z_loss metric is the masked mean of logsumexp(logits)^2, and z_loss_weight adds it to the objective:
  its gradient norm is that of torch's cross-entropy + weight * z-loss."""
  hf = tiny_hf_model(seed=4, weight_std=0.05)
  config = config_lib.from_hf_config(hf.config.to_dict())
  params = params_from_hf({k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}, config)
  optimizer = train.make_optimizer(total_steps=1, schedule="constant", **HYPER)
  [batch] = _batches(config.vocab_size, 1)
  weight = 0.2
  _, metrics = jax.jit(train.make_train_step(config, optimizer, z_loss_weight=weight))(
      train.init_state(config, optimizer, params=params), batch)

  def torch_grad_norm(z_weight):
    hf.zero_grad()
    logits = hf(input_ids=torch.from_numpy(batch["tokens"]).long()).logits  # (B, T, V)
    mask = torch.from_numpy(batch["loss_mask"])  # (B, T)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.from_numpy(batch["targets"]).long(),
                                            reduction="none")  # (B, T)
    z_loss = (torch.logsumexp(logits, -1) ** 2 * mask).sum() / mask.sum()
    ((nll * mask).sum() / mask.sum() + z_weight * z_loss).backward()
    return float(torch.sqrt(sum((p.grad ** 2).sum() for p in hf.parameters()))), float(z_loss.detach())

  (grad_norm, z_loss), (unweighted_norm, _) = torch_grad_norm(weight), torch_grad_norm(0.0)
  np.testing.assert_allclose(float(metrics["z_loss"]), z_loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["grad_norm"]), grad_norm, rtol=1e-5)
  assert abs(unweighted_norm - grad_norm) > 1e-3 * grad_norm  # The weighted term is visible at this bound.
