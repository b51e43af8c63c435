"""The training loop's parts in process (hook cadence, the NaN guard, metrics, checkpoint round trip, a dry run),
then bin/train end to end on a very small model: checkpoints and exact resume after SIGKILL, sharded equals one
device, two processes equal one, --dry_run of the 7B run on 8 simulated devices without data, and bad input answered
with one `error:` line. And the real SmolLM2 fine-tuned for a few steps: validation loss before and after."""

import contextlib
import itertools
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from llama_hk import checkpoints
from llama_hk import eval as evaluation
from llama_hk import inference
from llama_hk import config as config_lib
from llama_hk import sharding
from llama_hk import train
from llama_hk.errors import UserError
from llama_hk.train import loop
from llama_hk.train import metrics as metrics_lib
from llama_hk.train import state as state_lib
from harness import (EIGHT_DEVICES, assert_one_line_error, devices, kill_after_checkpoint, metrics, run_children,
                     run_group, run_train, train_command, train_losses)

SMALL_MODEL = {"config.LlamaConfig.d_model": 32, "config.LlamaConfig.num_layers": 2,
               "config.LlamaConfig.num_heads": 4, "config.LlamaConfig.num_kv_heads": 2,
               "config.LlamaConfig.d_ff": 64}


@pytest.fixture(scope="module")
def data_args(shakespeare_data_dir, shakespeare_tokenizer_dir, shakespeare_dir) -> list[str]:
  """tiny.gin on the prepared test data and tokenizer, with a very small model and short rows. Two document shards
  fix the batches (and the capped eval's) whichever process count reads them, so runs on other meshes and process
  counts compare with `trained`."""
  bindings = {"DATA_DIR": repr(str(shakespeare_data_dir)), "TOKENIZER_DIR": repr(str(shakespeare_tokenizer_dir)),
              "SHAKESPEARE_SOURCE_DIR": repr(str(shakespeare_dir)), "NUM_SHARDS": 2, "SEQ_LEN": 32, "BATCH_SIZE": 4,
              "WARMUP_STEPS": 1, "LOG_EVERY": 1, "EVAL_EVERY": 1000, "EVAL_MAX_BATCHES": 2, **SMALL_MODEL}
  return ["--gin_file=gin/tiny.gin"] + [f"--gin.{key}={value}" for key, value in bindings.items()]


TINY = config_lib.LlamaConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32,
                              max_seq_len=16)


class _Checkpoints:
  """A stand-in Checkpointer: records saves; `latest_step` is the last one."""

  def __init__(self, directory="ckpt"):
    self.directory, self.saved, self.waits = directory, [], 0

  def save(self, step, state, data):
    self.saved.append(step)

  def wait(self, step):
    self.waits += 1

  def latest_step(self):
    return self.saved[-1] if self.saved else None


def _fake_steps(losses):
  """A step function giving `losses` in turn, and batches that are never looked at."""
  values = iter(losses)
  step_fn = lambda state, batch: (state, {"loss": next(values), "learning_rate": 0.1, "grad_norm": 1.0})
  return step_fn, itertools.repeat({})


def test_hooks_act_every_n_steps_and_after_the_last(tmp_path):
  state = train.TrainState(step=0, params={"w": 1.0}, opt_state=None, rng=None)
  checkpointer, evaluated = _Checkpoints(), []
  writer = train.MetricsWriter(tmp_path, keep_through=-1)
  eval_hook = train.EvalHook(3, 7, writer, lambda params, batch: (evaluated.append(batch) or 2.0, 1.0),
                             lambda: (["batch"], 10), metrics_lib.Stopwatch())
  log_hook = train.LogHook(2, 7, writer, TINY, tokens_per_step=64, seq_len=16, peak_flops=1e12,
                           stopwatch=metrics_lib.Stopwatch())
  hooks = [train.NanGuard(7, checkpointer), log_hook, eval_hook, train.CheckpointHook(3, 7, checkpointer, None)]
  step_fn, batches = _fake_steps([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.25])
  loop.run(step_fn, state, batches, hooks, start=0, stop=7)
  writer.close()
  assert checkpointer.saved == [3, 6, 7] and checkpointer.waits == 1
  assert [r["step"] for r in eval_hook.records] == [0, 3, 6, 7]  # Before the first step too, from step 0.
  assert eval_hook.records[0]["eval_bits_per_byte"] == pytest.approx(train.bits_per_byte(2.0, 10))
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines if "loss" in r] == [2, 4, 6, 7] and log_hook.record["loss"] == 0.25
  assert set(log_hook.record) == {"step", "loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu"}

  restored = train.EvalHook(3, 7, writer, lambda params, batch: (2.0, 1.0), lambda: ([], 0), metrics_lib.Stopwatch())
  restored.begin(4, state)  # A resumed run does not evaluate its starting point again.
  assert restored.records == [] and not restored.due(4) and restored.due(7)


def test_nan_guard_stops_with_one_line_naming_the_last_checkpoint():
  state = train.TrainState(step=0, params={}, opt_state=None, rng=None)
  checkpointer = _Checkpoints("/runs/x/checkpoints")
  hooks = [train.NanGuard(5, checkpointer), train.CheckpointHook(1, 5, checkpointer, None)]
  step_fn, batches = _fake_steps([3.0, 2.0, float("nan"), 1.0, 1.0])
  with pytest.raises(UserError) as raised:
    loop.run(step_fn, state, batches, hooks, start=0, stop=5)
  assert str(raised.value) == ("step 3: loss is nan; stopped. The last good checkpoint, step 2, is kept in "
                               "/runs/x/checkpoints")
  assert checkpointer.saved == [1, 2] and checkpointer.waits == 1  # The diverged state is not saved.
  step_fn, batches = _fake_steps([float("inf")])
  with pytest.raises(UserError, match="^step 1: loss is inf; stopped. No checkpoint was written yet$"):
    loop.run(step_fn, state, batches, [train.NanGuard(5)], start=0, stop=5)


def test_config_groups_refuse_non_positive_values():
  with pytest.raises(UserError, match="^LoopConfig.train_steps=0: must be positive$"):
    train.LoopConfig(train_steps=0, batch_size=4, seq_len=8)
  with pytest.raises(UserError, match="^CheckpointConfig.every=-1: must be positive$"):
    train.CheckpointConfig(every=-1)
  assert train.EvalConfig(max_batches=None).every == 1000


def test_metrics_writer_keeps_records_through_the_restored_step(tmp_path):
  lines = [json.dumps({"step": step, "loss": 1.0}) for step in range(1, 6)] + ['{"step": 6, "lo']
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  with train.MetricsWriter(tmp_path, keep_through=3) as writer:
    writer.write({"step": 4, "loss": 0.5})
  assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
      {"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0}, {"step": 3, "loss": 1.0}, {"step": 4, "loss": 0.5}]
  # 6 FLOPs per matmul weight (no embedding lookup) and the attention scores, per token.
  matmuls = config_lib.num_params(TINY, with_lm_head=True) - TINY.vocab_size * TINY.d_model
  assert train.flops_per_token(TINY, 16) == 6 * matmuls + 3 * 4 * 16 * 2 * 8 * 1
  assert train.bits_per_byte(8 * np.log(2), 4) == pytest.approx(2.0) and np.isnan(train.bits_per_byte(1.0, 0))


class _Pipeline:
  """A stand-in pipeline iterator: its state is the number of batches read."""

  def __init__(self):
    self.read = 0

  def get_state(self):
    return {"read": self.read}

  def set_state(self, state):
    self.read = state["read"]


def test_checkpoint_round_trip_restores_state_and_pipeline(tmp_path):
  mesh = sharding.make_mesh()
  optimizer = train.make_optimizer(total_steps=10)
  shardings = state_lib.state_shardings(TINY, optimizer, mesh)
  # Params as an init checkpoint gives them (host arrays), which also skips compiling the model's init.
  rng = np.random.default_rng(0)
  init_params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                             state_lib.abstract_state(TINY, optimizer, shardings, 0).params)
  pipeline = _Pipeline()
  with train.Checkpointer(tmp_path, keep=2) as checkpointer:
    state, start = state_lib.initial_state(checkpointer, TINY, optimizer, shardings, init_params, 0, pipeline)
    assert start == 0
    jax.tree.map(np.testing.assert_array_equal, state.params, init_params)
    pipeline.read = 7
    checkpointer.save(3, state, pipeline)
    checkpointer.wait(3)
  resumed = _Pipeline()
  with train.Checkpointer(tmp_path, keep=2) as checkpointer:
    restored, start = state_lib.initial_state(checkpointer, TINY, optimizer, shardings, None, 0, resumed)
  assert start == 3 and resumed.read == 7
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert restored.params["lm_head"]["w"].sharding == shardings.params["lm_head"]["w"]


def test_dry_run_reports_per_device_bytes():
  mesh = sharding.make_mesh()
  optimizer = train.make_optimizer(total_steps=10)
  shardings = state_lib.state_shardings(TINY, optimizer, mesh)
  step_fn = jax.jit(train.make_train_step(TINY, optimizer), in_shardings=(shardings, None), donate_argnums=0)
  report = train.memory_report(TINY, optimizer, mesh, shardings, step_fn, batch_size=2, seq_len=8, seed=0)
  params_bytes = 4 * config_lib.num_params(TINY)
  assert (report["devices"], report["params_bytes"]) == (1, params_bytes)
  assert report["opt_state_bytes"] == pytest.approx(2 * params_bytes, abs=64)  # AdamW moments, and counters.


def test_run_from_scratch_needs_a_trained_tokenizer(tmp_path):
  with train.Checkpointer(tmp_path / "run", keep=1) as checkpointer:
    with pytest.raises(UserError, match=f"^TOKENIZER_DIR={tmp_path}: has no tokenizer; make one first with "
                                        "bin/train_tokenizer"):
      state_lib.starting_point(checkpointer, tmp_path / "run", TINY, None, str(tmp_path))
    with pytest.raises(UserError, match="^TOKENIZER_DIR: not set"):
      state_lib.starting_point(checkpointer, tmp_path / "run", TINY, None, None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_args) -> tuple[pathlib.Path, subprocess.CompletedProcess]:
  """A 4-step bin/train run checkpointing every step and keeping the last 2: its model_dir and its result."""
  model_dir = tmp_path_factory.mktemp("trained")
  result = run_train(model_dir, data_args, TRAIN_STEPS=4, CHECKPOINT_EVERY=1, KEEP_CHECKPOINTS=2, EVAL_EVERY=4)
  assert result.returncode == 0, result.stderr[-3000:]
  return model_dir, result


def tensorboard_scalars(model_dir: pathlib.Path) -> dict:
  """(tag, step) -> value from a run's TensorBoard events, read back through TFRecord framing (length, its crc,
  event, its crc)."""
  from tensorboardX.proto import event_pb2
  scalars = {}
  for path in model_dir.glob("events.out.tfevents.*"):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      scalars.update({(value.tag, event.step): value.simple_value for value in event.summary.value})
      offset += 12 + length + 4
  return scalars


@pytest.mark.slow
def test_run_writes_model_dir_and_evaluates(trained):
  tmp_path, result = trained
  assert "steps/s" in result.stdout and "time left" in result.stdout
  records = metrics(tmp_path)
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
  assert set(records[1]) == {"step", "loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu"}
  before, after = [r for r in records if "eval_loss" in r]  # Before the first step and after the last.
  assert records[0] == before and before["step"] == 0 and after["step"] == 4
  for record in (before, after):
    assert 0 < record["eval_bits_per_byte"] < 20
    assert record["eval_perplexity"] == pytest.approx(np.exp(record["eval_loss"]), rel=1e-9)
  assert after["eval_loss"] < before["eval_loss"]
  assert (f"validation perplexity {before['eval_perplexity']:.3f} at step 0 -> {after['eval_perplexity']:.3f} at "
          "step 4") in result.stdout
  operative = (tmp_path / "config.gin").read_text()
  assert "configs.LoopConfig.train_steps = %TRAIN_STEPS" in operative and "loop.train.loop = @configs.LoopConfig()" \
      in operative
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "4"]  # 4 written, the last 2 kept.
  loaded = checkpoints.load(tmp_path)
  assert loaded.config.d_model == 32 and loaded.tokenizer is not None
  assert tensorboard_scalars(tmp_path) == {(key, r["step"]): pytest.approx(value, rel=1e-6) for r in records
                                           for key, value in r.items() if key != "step" and value is not None}
  assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # Drawn after the evaluation.


@pytest.mark.slow
def test_binaries_read_the_model_dir(trained, shakespeare_dir, tmp_path):
  """bin/convert (to HF, forced into several shards), bin/eval and bin/generate given the model_dir read its latest
  checkpoint: the export holds its parameters exactly, and eval and generate agree with the library on the export."""
  model_dir, _ = trained
  text = tmp_path / "text.txt"
  text.write_text((shakespeare_dir / "twelfth_night.txt").read_text()[:3000])
  hf_dir, eval_json, generate_json = tmp_path / "hf", tmp_path / "eval.json", tmp_path / "generate.json"
  binary = lambda name, *args: ([sys.executable, f"bin/{name}", *args], None)
  runs = run_children([
      binary("convert", f"--input={model_dir}", f"--output={hf_dir}", "--output_format=hf", "--max_shard_bytes=100000"),
      binary("eval", f"--checkpoint={model_dir}", f"--text_file={text}", "--max_seq_len=32",
             f"--output_json={eval_json}"),
      binary("generate", f"--checkpoint={model_dir}", "--prompt=ROMEO:", "--max_new_tokens=8",
             f"--output_json={generate_json}")], timeout=300)
  for run in runs:
    assert run.returncode == 0, run.stderr[-3000:]
  stored = checkpoints.load(model_dir, on_device=False)
  assert len(set(json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"].values())) >= 3
  exported = checkpoints.load(hf_dir, on_device=False)
  jax.tree.map(np.testing.assert_array_equal, exported.params, stored.params)
  expected = evaluation.evaluate_text(hf_dir, str(text), max_seq_len=32)
  result = json.loads(eval_json.read_text())
  assert result["tokens"] == expected["tokens"] > 32
  assert result["nll"] == pytest.approx(expected["nll"], rel=1e-6)
  generator = inference.Generator(exported.config, exported.params, exported.tokenizer)
  [completion], _ = generator.generate([inference.prompt_ids(exported.tokenizer, "ROMEO:")], max_new_tokens=8)
  [row] = json.loads(generate_json.read_text())["results"]
  assert row["ids"] == completion.ids and row["completion"] == completion.text


@pytest.mark.slow
def test_killed_run_resumes_with_identical_losses(tmp_path, data_args):
  steps = dict(TRAIN_STEPS=40, CHECKPOINT_EVERY=5)
  whole = tmp_path / "whole"
  assert run_train(whole, data_args, **steps).returncode == 0
  killed = tmp_path / "killed"
  kill_after_checkpoint(train_command(killed, data_args, **steps), killed, step=10)
  resumed = run_train(killed, data_args, **steps)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert [step for step, *_ in train_losses(killed)] == list(range(1, 41))
  assert train_losses(killed) == train_losses(whole)
  without_timing = lambda path: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")}
                                 for r in metrics(path)]
  assert without_timing(killed) == without_timing(whole)


TRAINED_STEPS = dict(TRAIN_STEPS=4, CHECKPOINT_EVERY=4, EVAL_EVERY=4)  # `trained`'s schedule, checkpointed once.


@pytest.mark.slow
def test_sharded_equals_one_device(tmp_path, data_args, trained):
  sharded = run_train(tmp_path / "sharded", data_args + ["--gin_file=gin/sharding/data_fsdp_tensor.gin"],
                      env=EIGHT_DEVICES, **TRAINED_STEPS)
  assert sharded.returncode == 0, sharded.stderr[-3000:]
  one, eight = np.array(train_losses(trained[0])), np.array(train_losses(tmp_path / "sharded"))
  np.testing.assert_allclose(eight[:, 1:3], one[:, 1:3], rtol=1e-5)


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, data_args, trained):
  # FSDP splits every parameter across the processes; data_args's two document shards give them `trained`'s batches.
  args = data_args + ["--gin_file=gin/sharding/fsdp.gin"]

  def commands(port):
    two = args + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    return [(train_command(tmp_path / "two", two + [f"--process_id={i}"], **TRAINED_STEPS), devices(2))
            for i in range(2)]

  results = run_group(commands, timeout=300)
  for result in results:
    assert result.returncode == 0, result.stderr[-3000:]
  outputs = [(r.stdout, r.stderr) for r in results]
  assert "steps/s" in outputs[0][0] and "step" not in outputs[1][0]  # Only process 0 reports.
  single, multi = metrics(trained[0]), metrics(tmp_path / "two")
  assert [sorted(r) for r in multi] == [sorted(r) for r in single]  # One line each: process 1 writes none.
  for a, b in zip(multi, single):
    for key in ("loss", "grad_norm", "eval_loss", "eval_bits_per_byte"):
      if key in b:
        assert a[key] == pytest.approx(b[key], rel=1e-5), (key, multi, single)
  assert checkpoints.latest_step(tmp_path / "two") == 4


LORA_7B = dict(TRAIN_STEPS=1000, INIT_CHECKPOINT=None, LORA_BASE_WEIGHTS="'bfloat16'")  # No base read: a dry run.


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora_bfloat16_base"])
def test_dry_run_7b_on_eight_devices_reports_memory(tmp_path, lora):
  # DATA_DIR and TOKENIZER_DIR, required to train, are left unset: a dry run reads neither.
  args, bindings = ["--gin_file=gin/7b.gin", "--dry_run"], dict(BATCH_SIZE=8)
  if lora:
    args, bindings = args + ["--gin_file=gin/runs/lora.gin"], {**bindings, **LORA_7B}
  result = run_train(tmp_path / "unused", args, env=EIGHT_DEVICES, **bindings)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "per-device memory" in result.stderr  # The summary; stdout ends with the report as JSON.
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["devices"] == 8 and report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  params = 6_738_415_616
  if not lora:
    assert report["params_bytes"] == pytest.approx(params * 4 / 8, rel=1e-3)  # float32, sharded 8 ways.
  else:
    assert report["base_bytes"] == pytest.approx(params * 2 / 8, rel=1e-3)  # bfloat16, sharded 8 ways.
    # Rank 8 on the seven projections of 32 layers, float32. An axis of d_model splits 8 ways (fsdp); heads, d_ff
    # and the rank do not. A: (D, r) of q, k, v, gate, up split; (N*K, r) of o and (F, r) of down whole.
    # B: (r, D) of o and down split; those of q, k, v (N*K = D wide), gate and up (F) whole.
    d, f, r = 4096, 11008, 8
    per_layer = (5 * d * r / 8 + (d + f) * r) + (2 * d * r / 8 + (3 * d + 2 * f) * r)
    assert report["params_bytes"] == 4 * 32 * per_layer
    assert report["state_bytes"] <= 0.2 * (3 * 4 * params / 8)  # Full fine-tuning: masters and two moments.
  assert report["opt_state_bytes"] == pytest.approx(2 * report["params_bytes"], rel=1e-3)
  assert not (tmp_path / "unused").exists()


@pytest.mark.slow
def test_dry_run_prepares_no_data_and_reads_no_tokenizer(tmp_path):
  # The training split is prepared (or fetched) on first use, and TOKENIZER_DIR names nothing yet.
  result = run_train(tmp_path / "unused", ["--gin_file=gin/tiny.gin", "--dry_run"],
                     DATA_DIR=repr(str(tmp_path / "data")), TOKENIZER_DIR=repr(str(tmp_path / "tokenizer")))
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.strip().splitlines()[-1])["params_bytes"] > 0
  assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_bad_gin_input(tmp_path, data_args):
  assert_one_line_error(run_train(tmp_path, data_args, NO_SUCH_MACRO_USER=1, **{"loop.train.no_such": 1}),
                        "gin:", "no_such")
  assert_one_line_error(run_train(tmp_path, ["--gin_file=gin/7b.gin"]), "required macro", "DATA_DIR")
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_model_dir_of_another_model(tmp_path, data_args):
  assert run_train(tmp_path, data_args, TRAIN_STEPS=2, CHECKPOINT_EVERY=2).returncode == 0
  other = run_train(tmp_path, data_args, TRAIN_STEPS=3, **{"config.LlamaConfig.d_model": 64})
  assert_one_line_error(other, str(tmp_path), "another model config", "d_model=32 there, 64 here")


@pytest.mark.slow
def test_nan_loss_stops_keeping_last_checkpoint(tmp_path, data_args):
  result = run_train(tmp_path, data_args, TRAIN_STEPS=6, CHECKPOINT_EVERY=1, LEARNING_RATE=1e30, CLIP_NORM=None)
  assert_one_line_error(result, "step 3: loss is nan", "last good checkpoint, step 2")
  assert checkpoints.latest_step(tmp_path) == 2


@contextlib.contextmanager
def read_only(directory: pathlib.Path):
  """No new entries in `directory`: chmod for users, the immutable attribute for root (whom modes do not stop)."""
  if os.geteuid() != 0:
    directory.chmod(0o555)
    undo = lambda: directory.chmod(0o755)
  elif subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0:
    undo = lambda: subprocess.run(["chattr", "-i", str(directory)], check=True)
  else:
    pytest.skip("running as root where `chattr +i` is unavailable: cannot make a directory read-only")
  try:
    yield
  finally:
    undo()


@pytest.mark.slow
def test_failed_checkpoint_write_keeps_previous(tmp_path, data_args):
  assert run_train(tmp_path, data_args, TRAIN_STEPS=2, CHECKPOINT_EVERY=2).returncode == 0
  with read_only(tmp_path / "checkpoints"):
    result = run_train(tmp_path, data_args, TRAIN_STEPS=4, CHECKPOINT_EVERY=2)
  assert_one_line_error(result, "checkpoint of step 4 failed", "the last good checkpoint is step 2")
  assert checkpoints.latest_step(tmp_path) == 2
  assert checkpoints.load(tmp_path).config.d_model == 32
