"""The lm-evaluation-harness model `llama_hk` against the harness's own `hf` backend on the same weights, on the
tests' tasks (tests/eval_tasks.py: multiple choice, rolling perplexity, free generation, over local JSONL)."""

import json
import pathlib
import shutil
import sys

import pytest
from eval_tasks import GEN, MC_TEST, ROLLING, TASKS, assert_same_response, write_tasks
from harness import REPO, devices, run_children, run_group

MAX_LENGTH = 32  # The tiny model's positions: few-shot contexts, rolling texts and prompts are cut to fit.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> pathlib.Path:
  return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def manager(tasks_dir):
  from llama_hk.eval import harness
  return harness.task_manager(str(tasks_dir), include_defaults=False)


@pytest.fixture(scope="module")
def tiny_dir(tiny_hf_model, smollm2_hf_dir, tmp_path_factory) -> pathlib.Path:
  """A random GQA model (4 query, 2 key-value heads, 32 positions) of SmolLM2's vocabulary, with its tokenizer."""
  directory = tmp_path_factory.mktemp("tiny_harness")
  model = tiny_hf_model(seed=13, vocab_size=49152, max_position_embeddings=MAX_LENGTH, weight_std=0.1)
  model.save_pretrained(directory)
  for name in TOKENIZER_FILES:
    shutil.copy(smollm2_hf_dir / name, directory / name)
  return directory


def hf_lm(model_dir):
  """The harness's `hf` backend on the HF directory (batch size 1: no padding to move its numbers), its
  log-softmax in float64: in float32 it moves SmolLM2's rolling log-likelihood of ROLLING[0] (-288.97) by 6e-4
  from a float64 model's (ours is 1.1e-4 from it; eval_tasks.assert_same_response)."""
  import torch
  import transformers
  from lm_eval.models.huggingface import HFLM

  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu", softmax_dtype="float64")


def hf_results(lm, manager, tasks=TASKS, **kwargs) -> dict:
  import lm_eval

  return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, log_samples=True,
                                 bootstrap_iters=0, **kwargs)


def ours_results(model_dir, manager, mesh=None, **kwargs) -> dict:
  from llama_hk import checkpoints
  from llama_hk.eval import harness

  ckpt = checkpoints.load(model_dir, mesh=mesh)
  lm = harness.LlamaHkLM(ckpt.config, ckpt.params, ckpt.tokenizer, mesh=mesh, batch_size=4)
  return harness.evaluate(lm, list(TASKS), manager, log_samples=True, **kwargs)


def as_json(results: dict) -> dict:
  """Results as --output_json holds them (tuples become lists)."""
  from llama_hk.eval import harness
  return json.loads(harness.results_json(results))


def assert_same_results(ours: dict, theirs: dict, tasks=TASKS) -> None:
  """Every request's response as the hf backend's (eval_tasks.assert_same_response: log-likelihoods within 1e-4, a
  rolling document's sum over all its tokens within 1e-4 or 1e-6 relative; is_greedy and generated text equal),
  acc/acc_norm/exact_match equal, perplexities within 1e-4 relative."""
  ours, theirs = as_json(ours), as_json(theirs)
  assert ours["results"].keys() == theirs["results"].keys() == set(tasks)
  for task in tasks:
    mine, reference = ours["samples"][task], theirs["samples"][task]
    assert [s["doc_id"] for s in mine] == [s["doc_id"] for s in reference] and mine, task
    worst = 0.0
    for a, b in zip(mine, reference):
      assert a["arguments"] == b["arguments"], task
      for (x,), (y,) in zip(a["resps"], b["resps"], strict=True):
        assert_same_response(task, a["doc_id"], x, y)
        if task != "hk_gen":  # hk_mc: (log-likelihood, is_greedy); hk_rolling: the sum.
          x, y = (x[0], y[0]) if task == "hk_mc" else (x, y)
          worst = max(worst, abs(x - y))
    if task != "hk_gen":
      print(f"{task}: worst log-likelihood diff from the hf backend {worst:.2e}")
    metrics, expected = ours["results"][task], theirs["results"][task]
    for name in ("acc,none", "acc_norm,none", "exact_match,none"):
      if name in expected:
        assert metrics[name] == expected[name], (task, name)
    for name in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
      if name in expected:
        assert metrics[name] == pytest.approx(expected[name], rel=1e-4), (task, name)


def bin_eval(*args, device_count: int = 1):
  """bin/eval's command line on `device_count` simulated CPU devices, and its environment (harness.Command)."""
  return [sys.executable, REPO / "bin" / "eval", *args], {**devices(device_count), "JAX_DEFAULT_MATMUL_PRECISION":
                                                           "highest"}


def run_bin_eval(*args, device_count: int = 1):
  [result] = run_children([bin_eval(*args, device_count=device_count)], timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def task_flags(tasks_dir, output_json, *extra) -> list[str]:
  return [f"--tasks={','.join(TASKS)}", f"--include_path={tasks_dir}", "--noinclude_defaults", "--log_samples",
          f"--output_json={output_json}", *extra]


@pytest.fixture(scope="module")
def tiny_reference(tiny_dir, manager) -> dict:
  """The hf backend's results on the tiny model, two-shot."""
  return hf_results(hf_lm(tiny_dir), manager, num_fewshot=2)


@pytest.fixture(scope="module")
def smollm2_hf_lm(smollm2_hf_dir):
  """The hf backend on SmolLM2's HF copy, loaded once for the module's runs."""
  return hf_lm(smollm2_hf_dir)


def test_unknown_task_says_how_to_list_tasks(tasks_dir, tmp_path):
  from llama_hk import eval as evaluation
  from llama_hk.errors import UserError

  with pytest.raises(UserError, match=r"^--tasks: not found: hk_nope \(list task names with `lm-eval ls tasks "
                     r"--include_path DIR`\)$"):
    evaluation.evaluate_tasks(tmp_path / "no_checkpoint", ["hk_mc", "hk_nope"], str(tasks_dir), False)


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
@pytest.mark.parametrize("blocks", ["vocab 48", "vocab 32", "positions"])
def test_scorer_head_blocks_equal_transformers_log_softmax(tiny_hf_model, tie_word_embeddings, blocks):
  """The scorer's LM head in blocks gives transformers' float64 log-softmax of each target and its argmax flag, at
  scored positions given out of order: one device's blocks of token ids (V = 160: 4 blocks of 48, the last
  overlapping the third, or 5 of 32) and a mesh's blocks of positions (2 rows x 128 scored: 2 blocks of 128)."""
  import jax
  import numpy as np
  import torch

  from llama_hk import params as param_table
  from llama_hk import sharding
  from llama_hk.config import from_hf_config
  from llama_hk.eval import harness

  hf = tiny_hf_model(seed=31, tie_word_embeddings=tie_word_embeddings)
  config = from_hf_config(hf.config.to_dict())
  params = param_table.params_from_hf({k: v.numpy() for k, v in hf.state_dict().items()}, config)
  rng = np.random.default_rng(31)
  tokens = rng.integers(3, config.vocab_size, size=(2, 128)).astype(np.int32)
  positions = np.tile(np.arange(128, dtype=np.int32), (2, 1))
  ones, zeros = np.ones_like(tokens), np.zeros_like(tokens)
  scored = np.stack([rng.permutation(128) for _ in range(2)]).astype(np.int32)  # (2, 128)
  targets = rng.integers(0, config.vocab_size, size=(2, 128)).astype(np.int32)
  with torch.no_grad():
    logp = torch.log_softmax(hf(torch.from_numpy(tokens).long()).logits.double(), dim=-1).numpy()  # (2, 128, V)
  rows = np.arange(2)[:, None]
  targets[0, :8] = logp[0, scored[0, :8]].argmax(-1)  # So that both flags occur.
  mesh = sharding.make_mesh(devices=jax.devices()[:1]) if blocks == "positions" else None
  vocab_block = int(blocks.split()[-1]) if mesh is None else harness.VOCAB_BLOCK
  with sharding.axis_rules(mesh):
    logprob, greedy = harness._scorer(config, None, mesh, vocab_block, head_block=128)(
        params, tokens, positions, ones, zeros, scored, targets)
  expected = logp[rows, scored, targets]  # (2, 128)
  diff = np.max(np.abs(np.asarray(logprob) - expected))
  print(f"blocked scorer max abs log-probability diff {diff:.2e}")
  assert diff <= 1e-4
  np.testing.assert_array_equal(np.asarray(greedy), logp[rows, scored].argmax(-1) == targets)
  assert np.asarray(greedy)[0, :8].all() and not np.asarray(greedy).all()


@pytest.mark.slow
def test_tiny_model_equals_hf_backend(tiny_dir, manager, tiny_reference):
  """A random GQA model whose 32-position window cuts the rolling texts, the few-shot contexts and the prompts
  from the left."""
  from llama_hk.tokenizers.tokenizer import Tokenizer

  tokenizer = Tokenizer.from_dir(tiny_dir)
  ours = ours_results(tiny_dir, manager, num_fewshot=2)
  assert_same_results(ours, tiny_reference)
  assert ours["n-shot"]["hk_mc"] == 2 and len(ours["samples"]["hk_mc"]) == len(MC_TEST)
  contexts = [s["arguments"][0][0] for s in ours["samples"]["hk_mc"]]
  assert max(len(tokenizer.encode(c)) for c in contexts) > MAX_LENGTH  # Truncation was exercised...
  assert len(tokenizer.encode(ROLLING[0]["text"])) > 2 * MAX_LENGTH  # ... and several rolling windows.
  generated = [s["resps"][0][0] for s in ours["samples"]["hk_gen"]]
  assert len(generated) == len(GEN) and any(generated), generated


@pytest.mark.slow
def test_bin_eval_smollm2_equals_hf_backend(smollm2_llama_hk, smollm2_hf_lm, tasks_dir, manager, tmp_path):
  """bin/eval --tasks on the converted SmolLM2 against the hf backend on its HF copy, with --limit and
  --num_fewshot as the harness's own arguments; the table on stdout, the results dictionary in --output_json."""
  output = tmp_path / "results.json"
  result = run_bin_eval(f"--checkpoint={smollm2_llama_hk}", *task_flags(tasks_dir, output, "--limit=3",
                                                                       "--num_fewshot=1"))
  ours = json.loads(output.read_text())
  assert {"results", "versions", "n-shot", "configs", "samples"} <= ours.keys()
  assert all(len(ours["samples"][task]) == 3 for task in TASKS) and ours["n-shot"]["hk_mc"] == 1
  assert all(f"|{task}" in result.stdout.replace(" ", "") for task in TASKS), result.stdout
  assert "acc_norm" in result.stdout and "bits_per_byte" in result.stdout
  theirs = hf_results(smollm2_hf_lm, manager, num_fewshot=1, limit=3)
  assert_same_results(ours, theirs)
  assert any(s["resps"][0][0] for s in ours["samples"]["hk_gen"])  # SmolLM2 says something.


@pytest.mark.slow
def test_bin_eval_fsdp_on_eight_devices_equals_hf_backend(tiny_dir, tasks_dir, tiny_reference, tmp_path):
  output = tmp_path / "fsdp.json"
  run_bin_eval(f"--checkpoint={tiny_dir}", "--gin_file=gin/sharding/fsdp.gin", "--num_fewshot=2", "--batch_size=4",
               *task_flags(tasks_dir, output), device_count=8)
  assert_same_results(json.loads(output.read_text()), tiny_reference)


@pytest.mark.slow
def test_bin_eval_two_processes_equal_hf_backend_and_print_once(tiny_dir, tasks_dir, tiny_reference, tmp_path):
  """2 processes x 4 devices, FSDP over all 8: every process runs every request, process 0 alone prints and
  writes."""
  def commands(port):
    return [bin_eval(f"--checkpoint={tiny_dir}", "--gin_file=gin/sharding/fsdp.gin", "--num_fewshot=2",
                     *task_flags(tasks_dir, tmp_path / f"multi{i}.json"), f"--coordinator_address=127.0.0.1:{port}",
                     "--num_processes=2", f"--process_id={i}", device_count=4) for i in range(2)]

  results = run_group(commands, timeout=600)
  for result in results:
    assert result.returncode == 0, result.stderr[-3000:]
  assert "hk_mc" in results[0].stdout and results[1].stdout == "", [r.stdout for r in results]
  assert not (tmp_path / "multi1.json").exists()
  assert_same_results(json.loads((tmp_path / "multi0.json").read_text()), tiny_reference)


@pytest.mark.slow
def test_chat_template_smollm2_equals_hf_backend(smollm2_llama_hk, smollm2_hf_lm, tasks_dir, manager):
  """--apply_chat_template (evaluate_tasks, as bin/eval calls it): requests rendered with SmolLM2's chat
  template, scored and generated as the hf backend does with apply_chat_template=True."""
  from llama_hk import eval as evaluation

  tasks, kwargs = ("hk_mc", "hk_gen"), dict(limit=2, apply_chat_template=True)
  ours = evaluation.evaluate_tasks(smollm2_llama_hk, list(tasks), str(tasks_dir), False, log_samples=True,
                                   **kwargs)
  assert_same_results(ours, hf_results(smollm2_hf_lm, manager, tasks, **kwargs), tasks)
  contexts = [s["arguments"][0][0] for task in tasks for s in ours["samples"][task]]
  assert all(c.startswith("<|im_start|>") and c.endswith("<|im_start|>assistant\n") for c in contexts), contexts


@pytest.mark.slow
def test_sampled_generation_follows_the_seed(tiny_dir):
  """`--model_args`-style construction; sampling (do_sample, temperature) is reproducible for a seed and differs
  across seeds, while greedy requests ignore the seed."""
  from lm_eval.api.instance import Instance
  from llama_hk.eval import harness

  lm = harness.LlamaHkLM.create_from_arg_string(f"checkpoint={tiny_dir},seed=1,max_gen_toks=6", {"batch_size": 2})
  assert lm.batch_size == 2 and lm.max_gen_toks == 6 and lm.max_length == MAX_LENGTH and lm.seed == 1

  def generate(seed, **kwargs):
    lm.seed = seed
    requests = [Instance("generate_until", {}, (g["prompt"], {"until": ["\n\n"], **kwargs}), i)
                for i, g in enumerate(GEN)]
    return lm.generate_until(requests, disable_tqdm=True)

  sampled = dict(do_sample=True, temperature=1.0)
  first, again, other = generate(1, **sampled), generate(1, **sampled), generate(2, **sampled)
  assert first == again and first != other and all(first), (first, other)
  assert generate(1, do_sample=False) == generate(2, do_sample=False)
