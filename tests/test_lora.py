"""LoRA against transformers + peft: training steps (torch.optim.AdamW on the adapter), adapters written here loaded
by `PeftModel.from_pretrained`, adapters trained by peft applied here, and merged exports, in float32."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from llama_hk import checkpoints
from llama_hk import config as config_lib
from llama_hk import sharding
from llama_hk import train
from llama_hk.checkpoints import peft as peft_format
from llama_hk.errors import UserError
from llama_hk.models import make_forward
from llama_hk.ops import lora as lora_lib
from llama_hk.params import params_from_hf
from llama_hk.train import state as state_lib
import reference

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # PEFT's default: q, v.
RANK, ALPHA = 4, 8
# eps well above the float32 rounding of the second step's small A gradients, which Adam would otherwise amplify.
HYPER = dict(peak_learning_rate=1e-2, b1=0.9, b2=0.95, eps=1e-4, weight_decay=0.1, clip_norm=0.5)


def _batches(vocab: int, count: int, seed: int, batch: int = 2, length: int = 10) -> list[dict[str, np.ndarray]]:
  """Rows of one document each, the last token of each row unscored."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    tokens = rng.integers(3, vocab, (batch, length + 1)).astype(np.int32)
    loss_mask = np.ones((batch, length), np.float32)
    loss_mask[:, -1] = 0.0
    out.append({"tokens": tokens[:, :-1], "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
                "segment_ids": np.ones((batch, length), np.int32), "targets": tokens[:, 1:] * (loss_mask > 0),
                "loss_mask": loss_mask})
  return out


def _peft_steps(model, batches) -> list[float]:
  """PEFT's training: AdamW (a fresh one) on the adapter's parameters only."""
  trained = [p for p in model.parameters() if p.requires_grad]
  return reference.torch_adamw_steps(model, [{"params": trained, "weight_decay": HYPER["weight_decay"]}], batches,
                                     HYPER)


def _peft_adapter(model) -> dict[str, np.ndarray]:
  """The adapter's tensors under the names PEFT saves them with."""
  return {name.replace(".default", ""): p.detach().numpy().copy()
          for name, p in model.named_parameters() if "lora_" in name}


@pytest.fixture(scope="module")
def base(tiny_hf_model, tmp_path_factory):
  """(config, base params, HF directory): a random GQA model with tied embeddings, saved by transformers."""
  hf = tiny_hf_model(seed=3, weight_std=0.05, tie_word_embeddings=True)
  config = config_lib.from_hf_config(hf.config.to_dict())
  params = params_from_hf({k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}, config)
  hf_dir = tmp_path_factory.mktemp("lora_base") / "hf"
  hf.save_pretrained(hf_dir)
  return config, params, hf_dir


def _hf(hf_dir):
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
  return model.eval()


def _peft_model(hf_dir, seed: int = 0, dropout: float = 0.0):
  torch.manual_seed(seed)
  return peft.get_peft_model(_hf(hf_dir), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout,
                                                          target_modules=TARGETS, task_type="CAUSAL_LM"))


def _our_logits(config, params, tokens, lora=None) -> np.ndarray:
  logits, _ = jax.jit(make_forward(config, lora=lora).apply)(params, tokens)
  return np.asarray(logits)


def _torch_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(np.asarray(tokens)).long()).logits.numpy()


@pytest.mark.slow
def test_two_steps_equal_peft_then_from_trained_adapter(base):
  config, base, hf_dir = base
  model = _peft_model(hf_dir)
  model.train()
  lora = lora_lib.LoraConfig(rank=RANK, alpha=ALPHA)
  optimizer = train.make_optimizer(total_steps=4, schedule="constant", **HYPER)
  step = jax.jit(train.make_train_step(config, optimizer, lora=lora))
  for start, seed in (("fresh (B zero)", 0), ("peft-trained (B non-zero)", 1)):
    tensors = _peft_adapter(model)
    if seed:
      assert max(np.abs(v).max() for k, v in tensors.items() if "lora_B" in k) > 1e-3, "B should be trained"
    adapter = peft_format.adapter_from_tensors(tensors.__getitem__, config, lora, "peft")
    state = train.init_state(config, optimizer, params=base, lora=lora, adapter=adapter)
    batches = _batches(config.vocab_size, 2, seed)
    ours = []
    for batch in batches:
      state, metrics = step(state, batch)
      ours.append(float(metrics["loss"]))
    theirs = _peft_steps(model, batches)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6, err_msg=start)
    updated = {name: make() for name, _, _, make in peft_format.tensors(jax.device_get(state.params), config, lora)}
    expected = _peft_adapter(model)
    assert set(updated) == set(expected)
    for name, value in expected.items():
      np.testing.assert_allclose(updated[name], value, atol=1e-5, rtol=0, err_msg=f"{start}: {name}")
    # The base is frozen: unchanged, and the optimizer holds moments of the adapter's 14 leaves only.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.base), base)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert len(moments) == 2 * 2 * len(TARGETS)


@pytest.mark.slow
def test_our_adapter_loads_in_peft_and_merges(base, tmp_path):
  config, params, hf_dir = base
  lora = lora_lib.LoraConfig(rank=RANK, alpha=ALPHA, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
  adapter = lora_lib.init_adapter(jax.random.PRNGKey(5), config, lora)
  rng = np.random.default_rng(5)
  adapter = {m: {n: np.asarray(v) if n.endswith("_a") else rng.normal(0, 0.05, v.shape).astype(np.float32)
                 for n, v in leaves.items()} for m, leaves in adapter.items()}
  peft_format.write(tmp_path / "adapter", adapter, config, lora, str(hf_dir))
  tokens = rng.integers(0, config.vocab_size, (2, 9)).astype(np.int32)
  ours = _our_logits(config, lora_lib.combine(params, adapter), tokens, lora)
  assert np.abs(ours - _our_logits(config, params, tokens)).max() > 1e-2, "the adapter should change the logits"
  theirs = _torch_logits(peft.PeftModel.from_pretrained(_hf(hf_dir), tmp_path / "adapter").eval(), tokens)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

  checkpoints.convert(hf_dir, tmp_path / "merged", "hf", adapter=tmp_path / "adapter", merge_lora=True)
  np.testing.assert_allclose(_torch_logits(_hf(tmp_path / "merged"), tokens), ours, atol=1e-4, rtol=0)
  checkpoints.convert(hf_dir, tmp_path / "again", "peft", adapter=tmp_path / "adapter")
  _, again = lora_lib.split(checkpoints.load(hf_dir, adapter=tmp_path / "again", on_device=False).params, lora)
  jax.tree.map(np.testing.assert_array_equal, again, adapter)


@pytest.mark.slow
def test_peft_trained_adapter_applies_here(base, tmp_path):
  config, _, hf_dir = base
  model = _peft_model(hf_dir, seed=1, dropout=0.1)  # Trained with dropout; evaluated (here and there) without.
  model.train()
  _peft_steps(model, _batches(config.vocab_size, 3, seed=2))
  model.eval()
  model.save_pretrained(tmp_path / "peft")
  tokens = np.random.default_rng(6).integers(0, config.vocab_size, (2, 11)).astype(np.int32)
  ckpt = checkpoints.load(hf_dir, adapter=tmp_path / "peft")
  assert ckpt.lora == lora_lib.LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.1)
  np.testing.assert_allclose(_our_logits(ckpt.config, ckpt.params, tokens, ckpt.lora), _torch_logits(model, tokens),
                             atol=1e-4, rtol=0)


def test_dropout_drops_the_adapter_inputs_as_peft_does():
  """With A = B = I and alpha = r, the low-rank term is the adapter path's input: PEFT's inverted dropout of x."""
  p = 0.25
  lora = lora_lib.LoraConfig(rank=4, alpha=4.0, dropout=p)
  term = hk.transform(lambda x: lora_lib.low_rank(x, "w", (4,), (4,), lora, jnp.float32))
  identity = {"~": {"w_lora_a": jnp.eye(4), "w_lora_b": jnp.eye(4)}}
  x = np.random.default_rng(0).uniform(1.0, 2.0, (8192, 4)).astype(np.float32)
  dropped = np.asarray(term.apply(identity, jax.random.PRNGKey(1), x))
  kept = dropped != 0
  np.testing.assert_allclose(dropped[kept], x[kept] / (1 - p), rtol=1e-6)
  assert abs((1 - kept.mean()) - p) < 0.01, kept.mean()
  np.testing.assert_array_equal(term.apply(identity, jax.random.PRNGKey(1), x), dropped)  # A key fixes the mask.
  assert (np.asarray(term.apply(identity, jax.random.PRNGKey(2), x) != 0) != kept).any()
  np.testing.assert_array_equal(term.apply(identity, None, x), x)  # No key (inference): nothing dropped.


@pytest.mark.slow
def test_dropout_masks_follow_the_step_key(base):
  config, params, _ = base
  plain, dropping = lora_lib.LoraConfig(rank=RANK, alpha=ALPHA), lora_lib.LoraConfig(rank=RANK, alpha=ALPHA,
                                                                                     dropout=0.5)
  optimizer = train.make_optimizer(total_steps=4, schedule="constant", **HYPER)
  batch = _batches(config.vocab_size, 1, seed=4)[0]
  state = train.init_state(config, optimizer, params=params, lora=plain)
  trained = {}
  for lora in (plain, dropping):
    step = jax.jit(train.make_train_step(config, optimizer, lora=lora))
    once, _ = step(state, batch)
    again, _ = step(state, batch)
    jax.tree.map(np.testing.assert_array_equal, once.params, again.params)  # The step's key fixes the masks.
    trained[lora.dropout] = once
  b = [np.asarray(trained[d].params["decoder/attention"]["q_proj_lora_b"]) for d in (0.0, 0.5)]
  assert np.abs(b[1] - b[0]).max() > 1e-4, "dropout should change the first step's gradient of B"


@pytest.mark.slow
def test_state_bytes_of_smollm2_lora_bf16_base_are_a_fifth_of_full_fine_tuning(smollm2_gguf):
  config = checkpoints.load_config(smollm2_gguf).replace(param_dtype="float32")
  mesh = sharding.make_mesh()
  optimizer = train.make_optimizer(total_steps=10)

  def state_bytes(lora):
    shardings = state_lib.state_shardings(config, optimizer, mesh, lora)
    state = state_lib.abstract_state(config, optimizer, shardings, 0, lora)
    return sharding.per_device_bytes(state, shardings), state

  full, _ = state_bytes(None)
  lora = lora_lib.LoraConfig(rank=8, base_weights="bfloat16")
  lora_bytes, state = state_bytes(lora)
  assert full == pytest.approx(3 * 4 * config_lib.num_params(config), rel=1e-3)  # Masters and two moments.
  adapter = sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))
  assert lora_bytes == pytest.approx(2 * config_lib.num_params(config) + 3 * 4 * adapter, rel=1e-3)
  assert lora_bytes <= 0.2 * full, (lora_bytes, full)
  print(f"SmolLM2 train state: full fine-tuning {full / 2**20:.1f} MiB, LoRA r=8 on a bfloat16 base "
        f"{lora_bytes / 2**20:.1f} MiB ({lora_bytes / full:.3f}x), on a float32 base "
        f"{(lora_bytes + 2 * config_lib.num_params(config)) / 2**20:.1f} MiB")


def test_bad_input_one_line_errors(base, tmp_path):
  config, params, hf_dir = base
  with pytest.raises(UserError, match=r"^LORA_TARGETS: qkv_proj is not a target module \(choose from q_proj, "):
    lora_lib.LoraConfig(targets=("q_proj", "qkv_proj"))
  with pytest.raises(UserError, match="^LORA_RANK=0: must be positive$"):
    lora_lib.LoraConfig(rank=0)
  lora = lora_lib.LoraConfig(rank=RANK, alpha=ALPHA)
  other = config.replace(d_model=32, head_dim=8)
  adapter = {row.module: {} for row in lora.adapter_rows()}
  for row in lora.adapter_rows():
    adapter[row.module][row.name] = np.zeros(row.full_shape(other, RANK), np.float32)
  peft_format.write(tmp_path / "other", adapter, other, lora, "x")
  with pytest.raises(UserError, match=f"^{tmp_path}/other/adapter_model.safetensors: tensor .*q_proj.lora_A.weight "
                                      f"has shape \\(4, 32\\), the base model implies \\(4, 64\\) \\({hf_dir} is the "
                                      "base\\)$"):
    checkpoints.load(hf_dir, adapter=tmp_path / "other")
  with pytest.raises(UserError, match=f"^--input={hf_dir}: has no LoRA adapter"):
    checkpoints.convert(hf_dir, tmp_path / "merged", "hf", merge_lora=True)
  with pytest.raises(UserError, match=f"^{tmp_path}/other/adapter_model.safetensors: tensor"):
    checkpoints.convert(hf_dir, tmp_path / "merged", "hf", adapter=tmp_path / "other", merge_lora=True)
  assert not (tmp_path / "merged").exists()
