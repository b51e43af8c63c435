"""bin/train with gin/runs/lora.gin end to end on a small random 8/4-head base, with dropout: PEFT adapters beside each
checkpoint, a SIGKILLed run resumed with identical losses (the same dropout masks), fsdp x tensor on 8 simulated
devices and 2 processes x 2 devices equal to one process, the model_dir read back as base + adapter and exported by
bin/convert."""

import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from llama_hk import checkpoints
from llama_hk.checkpoints import safetensors_io
from llama_hk import config as config_lib
from llama_hk.models import make_forward
from llama_hk.tokenizers.tokenizer import Tokenizer
from harness import (EIGHT_DEVICES, devices, kill_after_checkpoint, metrics, run_children, run_group, run_train,
                     train_command, train_losses)

MODEL = {"config.LlamaConfig.d_model": 64, "config.LlamaConfig.num_layers": 2, "config.LlamaConfig.num_heads": 8,
         "config.LlamaConfig.num_kv_heads": 4, "config.LlamaConfig.d_ff": 128}
STEPS = dict(TRAIN_STEPS=6, CHECKPOINT_EVERY=3)


@pytest.fixture(scope="module")
def lora_args(shakespeare_data_dir, shakespeare_tokenizer_dir, shakespeare_dir, tmp_path_factory) -> list[str]:
  """A random base checkpoint of the small model with the test tokenizer, and the LoRA run's flags on it (two
  document shards: the same batches for any process count)."""
  config = config_lib.LlamaConfig(vocab_size=2048, d_model=64, num_layers=2, num_heads=8, num_kv_heads=4, d_ff=128,
                                  max_seq_len=512)
  params = make_forward(config).init(jax.random.PRNGKey(0), np.zeros((1, 2), np.int32))
  base = tmp_path_factory.mktemp("lora_run") / "base"
  checkpoints.save(base, config, jax.device_get(params), Tokenizer.from_dir(shakespeare_tokenizer_dir))
  bindings = {"DATA_DIR": repr(str(shakespeare_data_dir)), "SHAKESPEARE_SOURCE_DIR": repr(str(shakespeare_dir)),
              "INIT_CHECKPOINT": repr(str(base)), "TOKENIZER_DIR": None, "NUM_SHARDS": 2, "SEQ_LEN": 32,
              "BATCH_SIZE": 4, "WARMUP_STEPS": 1, "LEARNING_RATE": 1e-2, "LOG_EVERY": 1, "EVAL_EVERY": 1000, "EVAL_MAX_BATCHES": 2,
              "LORA_RANK": 4, "LORA_DROPOUT": 0.1, **MODEL}
  return (["--gin_file=gin/tiny.gin", "--gin_file=gin/runs/lora.gin"]
          + [f"--gin.{key}={value}" for key, value in bindings.items()])


@pytest.fixture(scope="module")
def whole_run(lora_args, tmp_path_factory) -> pathlib.Path:
  """The LoRA run of STEPS on one device, uninterrupted."""
  whole = tmp_path_factory.mktemp("lora_whole") / "run"
  result = run_train(whole, lora_args, **STEPS)
  assert result.returncode == 0, result.stderr[-3000:]
  return whole


@pytest.mark.slow
def test_lora_run_writes_adapters_and_resumes_after_sigkill(tmp_path, lora_args, whole_run):
  whole = whole_run
  assert sorted(p.name for p in (whole / "adapters").iterdir()) == ["3", "6"]
  fields = json.loads((whole / "adapters" / "6" / "adapter_config.json").read_text())
  assert (fields["peft_type"], fields["task_type"], fields["r"], fields["lora_alpha"], fields["lora_dropout"]) == (
      "LORA", "CAUSAL_LM", 4, 16, 0.1)
  assert len(fields["target_modules"]) == 7 and pathlib.Path(fields["base_model_name_or_path"]).is_dir()
  records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
  before, after = [r for r in records if "eval_loss" in r]
  assert after["eval_loss"] < before["eval_loss"]
  loaded = checkpoints.load(whole, on_device=False)
  assert loaded.lora is not None and loaded.lora.rank == 4
  # The checkpoint holds the adapter and its moments only: no copy of the base.
  saved = sum(f.stat().st_size for f in (whole / "checkpoints" / "6").rglob("*") if f.is_file())
  assert saved < 4 * config_lib.num_params(loaded.config) / 2

  killed = tmp_path / "killed"
  kill_after_checkpoint(train_command(killed, lora_args, **STEPS), killed, step=3)
  resumed = run_train(killed, lora_args, **STEPS)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert train_losses(killed) == train_losses(whole)

  out = tmp_path / "peft"
  [converted] = run_children([([sys.executable, "bin/convert", f"--input={whole}", f"--output={out}",
                                 "--output_format=peft"], None)], timeout=120)
  assert converted.returncode == 0, converted.stderr[-2000:]
  assert (out / "adapter_model.safetensors").read_bytes() == (
      whole / "adapters" / "6" / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
def test_lora_sharded_fsdp_tensor_equals_one_device(tmp_path, lora_args, whole_run):
  mesh = ["--gin_file=gin/sharding/data_fsdp_tensor.gin", "--gin.sharding.make_mesh.data=1",
          "--gin.sharding.make_mesh.tensor=2"]
  sharded = run_train(tmp_path / "sharded", lora_args + mesh, env=EIGHT_DEVICES, **STEPS)
  assert sharded.returncode == 0, sharded.stderr[-3000:]
  one, eight = np.array(train_losses(whole_run)), np.array(train_losses(tmp_path / "sharded"))
  np.testing.assert_allclose(eight[:, 1:3], one[:, 1:3], rtol=1e-5)


@pytest.mark.slow
def test_lora_two_processes_train_like_one(tmp_path, lora_args, whole_run):
  two = lora_args + ["--gin_file=gin/sharding/fsdp.gin", "--num_processes=2"]

  def commands(port):
    return [(train_command(tmp_path / "two", two + [f"--coordinator_address=127.0.0.1:{port}", f"--process_id={i}"],
                           **STEPS), devices(2)) for i in range(2)]

  for result in run_group(commands, timeout=300):
    assert result.returncode == 0, result.stderr[-3000:]
  single, multi = metrics(whole_run), metrics(tmp_path / "two")
  assert len(multi) == len(single)
  for a, b in zip(multi, single):
    for key in ("loss", "grad_norm", "eval_loss"):
      if key in b:
        assert a[key] == pytest.approx(b[key], rel=1e-5), (key, multi, single)
  # Process 0 writes the adapter gathered from both processes: the one process's, up to reduction order.
  written = [safetensors_io.SafetensorsFile(str(run / "adapters" / "3" / "adapter_model.safetensors"))
             for run in (whole_run, tmp_path / "two")]
  assert set(written[0].keys()) == set(written[1].keys())
  for name in written[0].keys():
    np.testing.assert_allclose(written[1].get(name), written[0].get(name), atol=1e-5, err_msg=name)
