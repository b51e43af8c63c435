"""Sharded inference and generation equal one device; meshes that do not fit fail with one line; multi-host runs
agree and print once.

Runs in subprocesses with simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N), since the
device count is fixed once JAX starts.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from llama_hk import sharding
from llama_hk.config import LlamaConfig, num_params
from llama_hk.errors import UserError
import harness
from harness import REPO, devices, run_group, sharded_logit_diffs



def test_sharding_helpers_on_one_device():
  """What needs no second device: mesh errors, the batch multiple, put_global, axis_rules(None), byte counts."""
  mesh = sharding.make_mesh()
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  with pytest.raises(UserError, match=r"mesh \(data=1, fsdp=2, tensor=1\) needs 2 devices, 1 are available"):
    sharding.make_mesh(fsdp=2)
  with pytest.raises(UserError, match="at most one axis may be -1"):
    sharding.make_mesh(data=-1, fsdp=-1)
  assert sharding.batch_multiple(None) == sharding.batch_multiple(mesh) == 1
  host = np.arange(12, dtype=np.float32).reshape(3, 4)
  for target in (None, sharding.batch_sharding(mesh)):
    placed = sharding.put_global(host, target)
    np.testing.assert_array_equal(np.asarray(placed), host)
    assert target is None or placed.sharding == target
  x = jnp.ones((2, 3))
  with sharding.axis_rules(None):
    assert sharding.constrain(x, ("act_batch", None)) is x  # No rules: activations are left alone.
  config = LlamaConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48)
  assert sharding.per_device_param_bytes(config, mesh) == num_params(config) * 4
  abstract = {"a": jax.ShapeDtypeStruct((4, 6), jnp.bfloat16), "b": jax.ShapeDtypeStruct((3,), jnp.float32)}
  replicated = NamedSharding(mesh, PartitionSpec())
  assert sharding.per_device_bytes(abstract, {"a": replicated, "b": replicated}) == 4 * 6 * 2 + 3 * 4


def run(args, device_count=8):
  return harness.run_python(args, device_count)


@pytest.mark.slow
def test_real_model_sharded_logits_equal_one_device(smollm2_llama_hk):
  # SmolLM2: 9 query / 3 key-value heads, d_model 576: FSDP over 8 devices, and rows over 2 with the heads over 3
  # (the random model below covers the other mesh shapes).
  diffs = sharded_logit_diffs(smollm2_llama_hk, {"fsdp": [1, 8, 1], "data_tensor": [2, 1, 3]})
  # Equal up to float32 rounding, relative to the logits' scale. Tensor parallelism reorders the sums over heads and
  # the MLP hidden. FSDP does not, but a device's smaller batch changes the CPU matmul's blocking of its sums, which
  # 30 layers amplify: Intel Xeon gave <= 1e-5 absolute, AMD EPYC 3.5e-4 on logits of 35.6 (9.7e-6 relative), so
  # FSDP alone gets 2e-5.
  for name, relative in (("fsdp", 2e-5), ("data_tensor", 1e-5)):
    assert diffs[name]["max_abs"] <= relative * diffs[name]["max_logit"], (name, diffs)
  assert diffs["fsdp"]["devices"] == 8 and diffs["data_tensor"]["devices"] == 6


@pytest.mark.slow
def test_random_gqa_model_sharded_logits_equal_one_device(tiny_hf_model, tmp_path):
  model = tiny_hf_model(seed=3, num_attention_heads=8, num_key_value_heads=4, hidden_size=64, intermediate_size=128)
  model.save_pretrained(tmp_path / "hf")
  diffs = sharded_logit_diffs(tmp_path / "hf", {"fsdp": [1, 8, 1], "tensor": [1, 1, 4], "all": [2, 2, 2]})
  for name, diff in diffs.items():
    assert diff["max_abs"] <= 1e-5 * max(1.0, diff["max_logit"]), (name, diffs)


def sharded_generations(checkpoint, meshes, max_new_tokens=16):
  return harness.run_on_meshes("sharded_generate.py", checkpoint, meshes, max_new_tokens)


@pytest.mark.slow
def test_real_model_sharded_generate_equals_one_device(smollm2_llama_hk):
  # Three prompts of 5, 14 and 5 tokens in a batch of 4 rows; 16 greedy tokens each.
  runs = sharded_generations(smollm2_llama_hk, {"tensor": [1, 1, 3], "data_fsdp": [2, 4, 1]})
  one = runs.pop("one")
  assert len(set(one["prompt_lengths"])) > 1 and [len(ids) for ids in one["ids"]] == [16] * 3, one
  assert one["cache_shape"] == [30, 4, 3, 32, 64] and one["decode_calls"] == 15, one
  for name, r in runs.items():
    assert r["ids"] == one["ids"], (name, r["ids"], one["ids"])
  # The KV cache (L, B, G, S, K): rows replicated where data x fsdp does not divide 4 rows, else split over data;
  # heads split over tensor.
  assert runs["tensor"]["cache_shard_shapes"] == [[30, 4, 1, 32, 64]] and runs["tensor"]["param_shards"] == 3
  assert runs["data_fsdp"]["cache_shard_shapes"] == [[30, 2, 3, 32, 64]] and runs["data_fsdp"]["param_shards"] == 4


@pytest.mark.slow
def test_random_gqa_model_sharded_generate_equals_one_device(tiny_hf_model, tmp_path):
  model = tiny_hf_model(seed=5, num_attention_heads=8, num_key_value_heads=4, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=3)
  model.save_pretrained(tmp_path / "hf")
  runs = sharded_generations(tmp_path / "hf", {"single": [1, 1, 1], "fsdp": [1, 8, 1], "tensor": [1, 1, 4],
                                               "data_fsdp_tensor": [2, 2, 2]}, max_new_tokens=20)
  one = runs.pop("one")
  assert [len(ids) for ids in one["ids"]] == [20] * 3 and len(set(one["ids"][0])) > 1, one
  for name, r in runs.items():
    assert r["ids"] == one["ids"], (name, r["ids"], one["ids"])
  shard = {name: r["cache_shard_shapes"] for name, r in runs.items()}
  assert shard == {"single": [[3, 4, 4, 64, 8]], "fsdp": [[3, 4, 4, 64, 8]], "tensor": [[3, 4, 1, 64, 8]],
                   "data_fsdp_tensor": [[3, 1, 2, 64, 8]]}, shard


@pytest.mark.slow
@pytest.mark.parametrize("binary", ["eval", "generate"])
def test_head_count_the_tensor_axis_does_not_divide_is_one_line(smollm2_llama_hk, binary):
  args = ([f"--text_file={REPO / 'README.md'}", "--batch_size=8"] if binary == "eval" else ["--prompt=Hello"])
  result = run([REPO / "bin" / binary, f"--checkpoint={smollm2_llama_hk}", "--gin_file=gin/sharding/tensor.gin",
                *args])
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("error: mesh axis 'tensor' has 8 devices, which does not divide heads=9"), lines[-1]


@pytest.mark.slow
@pytest.mark.parametrize("sharding_gin", ["fsdp", "tensor"])
@pytest.mark.parametrize("binary", ["eval", "generate"])
def test_dry_run_7b_reports_per_device_bytes(binary, sharding_gin):
  result = run([REPO / "bin" / binary, "--dry_run", "--gin_file=gin/models/7b.gin",
                f"--gin_file=gin/sharding/{sharding_gin}.gin"])
  assert result.returncode == 0, result.stderr[-2000:]
  [line] = result.stdout.strip().splitlines()
  report = json.loads(line)
  expected = 6_738_415_616 * 4 / 8
  assert report["devices"] == 8
  assert abs(report["param_bytes_per_device"] - expected) <= 0.01 * expected, report
  if binary == "generate":
    # 8 rows x 2048 slots x 32 layers x 32 kv heads x 128 x (keys, values) x float32, over 8 devices: the rows
    # split over fsdp, or the heads over tensor.
    assert report["kv_cache_rows"] == 8 and report["kv_cache_slots"] == 2048, report
    assert report["kv_cache_bytes_per_device"] == 8 * 2048 * 32 * 32 * 128 * 2 * 4 // 8, report
    assert report["kv_cache_batch_axes"] == (["fsdp"] if sharding_gin == "fsdp" else []), report


@pytest.mark.slow
def test_eval_without_batch_size_fits_the_mesh(tiny_hf_model, write_tiny_gguf, shakespeare_dir, tmp_path):
  """No --batch_size on 8 devices (FSDP): the smallest batch the mesh splits, 8 windows, scoring as one device."""
  checkpoint = tmp_path / "tiny.gguf"
  write_tiny_gguf(checkpoint, tiny_hf_model(seed=11, vocab_size=288, weight_std=0.05))
  text = tmp_path / "text.txt"
  text.write_text((shakespeare_dir / "lovers_complaint.txt").read_text()[:3000])
  args = [REPO / "bin" / "eval", f"--checkpoint={checkpoint}", f"--text_file={text}", "--max_seq_len=64"]
  one, eight = run(args, device_count=1), run([*args, "--gin_file=gin/sharding/fsdp.gin"], device_count=8)
  for result in (one, eight):
    assert result.returncode == 0, result.stderr[-3000:]
  one, eight = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (one, eight))
  assert eight["tokens"] == one["tokens"] > 8 * 63, (one, eight)  # More windows than one batch of 8.
  assert abs(eight["nll"] - one["nll"]) <= 1e-5 * one["nll"], (one, eight)


@pytest.mark.slow
def test_two_processes_eval_like_one(smollm2_llama_hk, shakespeare_dir, tmp_path):
  """README's two-process command (no --batch_size): 2 processes x 4 devices score as 1 x 8, printing once and
  writing --output_json from process 0 alone (each process is given its own path)."""
  text = tmp_path / "text.txt"
  text.write_text((shakespeare_dir / "sonnets.txt" if (shakespeare_dir / "sonnets.txt").exists()
                   else shakespeare_dir / "lovers_complaint.txt").read_text()[:6000])
  args = [REPO / "bin" / "eval", f"--checkpoint={smollm2_llama_hk}", f"--text_file={text}", "--max_seq_len=128",
          "--gin_file=gin/sharding/fsdp.gin"]
  single = run(args)
  assert single.returncode == 0, single.stderr[-2000:]
  env = {**devices(4), "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
  results = run_group(lambda port: [([sys.executable, *args, f"--coordinator_address=127.0.0.1:{port}",
                                      "--num_processes=2", f"--process_id={i}",
                                      f"--output_json={tmp_path / f'multi{i}.json'}"], env) for i in range(2)],
                      timeout=600)
  for result in results:
    assert result.returncode == 0, result.stderr[-3000:]
  outputs = [(r.stdout, r.stderr) for r in results]
  printed = [line for out, _ in outputs for line in out.strip().splitlines() if line.startswith("{")]
  assert len(printed) == 1, outputs  # Only process 0 prints.
  multi, one = json.loads(printed[0]), json.loads(single.stdout.strip().splitlines()[-1])
  assert json.loads((tmp_path / "multi0.json").read_text()) == multi and not (tmp_path / "multi1.json").exists()
  assert multi["tokens"] == one["tokens"]
  assert abs(multi["nll"] - one["nll"]) <= 1e-6 * one["nll"]


@pytest.mark.slow
def test_two_processes_generate_like_one_and_print_once(tiny_hf_model, write_tiny_gguf, tmp_path):
  checkpoint = tmp_path / "tiny.gguf"
  write_tiny_gguf(checkpoint, tiny_hf_model(seed=7, vocab_size=288, num_attention_heads=8, num_key_value_heads=4,
                                            max_position_embeddings=64))
  # data 2 x fsdp 2 x tensor 2 over both processes' devices; the 2 rows split over data.
  args = [REPO / "bin" / "generate", f"--checkpoint={checkpoint}", "--prompt=the hen", "--prompt=a", "--seed=3",
          "--max_new_tokens=16", "--gin_file=gin/sharding/data_fsdp_tensor.gin"]
  single = run([*args, f"--output_json={tmp_path / 'one.json'}"])
  assert single.returncode == 0, single.stderr[-2000:]
  expected = single.stdout
  assert len(expected) > 20 and expected.count("\n\n") >= 2, expected  # Two completions, each with a blank line.
  env = {**devices(4), "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
  results = run_group(lambda port: [([sys.executable, *args, f"--output_json={tmp_path / f'multi{i}.json'}",
                                      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                      f"--process_id={i}"], env) for i in range(2)], timeout=600)
  for result in results:
    assert result.returncode == 0, result.stderr[-3000:]
  outputs = [(r.stdout, r.stderr) for r in results]
  printed = [out for out, _ in outputs]  # Nothing else on stdout: Gloo's logs go to stderr.
  assert "".join(printed).count(expected) == 1, printed
  assert printed == [expected, ""], printed  # Process 0 prints the completions, process 1 nothing.
  assert sum("decode:" in err for _, err in outputs) == 1  # The statistics line, once.
  assert json.loads((tmp_path / "multi0.json").read_text())["results"] == json.loads(
      (tmp_path / "one.json").read_text())["results"]
  assert not (tmp_path / "multi1.json").exists()
