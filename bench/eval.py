"""lm-evaluation-harness wall time of the `llama_hk` model against the harness's own `hf` backend, side by side, on
SmolLM2-135M (float32) and one multiple-choice task of at least 200 log-likelihood requests.

Target (from issue 13): ours >= 2x faster. The task is written here over local JSONL (no hub): each document is
the start of a line of Shakespeare, its choices that line's true ending and three endings of other lines. Both
backends get the same --batch_size (rows a forward pass: the hf backend's hold a request each, ours as many as fit
in 128 tokens, a document's context once for its choices) and run the same `simple_evaluate`; ours is timed cold
(compiles included, a fresh compilation cache), then both warm, best of --rounds runs taken in turn; the time
inside each backend's `loglikelihood` is given too (the rest of a run, the harness's own, is the same for both).
Their accuracies and every request's log-likelihood are compared too, so the figures are of the same work. Prints
the CPU model and the load average before and after: a run beside other jobs is contaminated (torch's threads
suffer most).

  python bench/eval.py [--docs=60] [--batch_size=8] [--rounds=2] [--output_json=FILE]
"""

import argparse
import json
import os
import pathlib
import random
import sys
import tempfile
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = pathlib.Path(__file__).resolve().parents[1]
PLAYS = REPO.parent / "shared" / "data" / "shakespeare"
CHOICES = 4

sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
from reference import smollm2_hf_dir  # noqa: E402  The tests' float32 HF copy of the GGUF.
from machine import cpu_model  # noqa: E402


def write_task(directory: pathlib.Path, docs: int) -> None:
  """bench_mc: `docs` documents of CHOICES choices each, from lines of the plays (fixed seed)."""
  lines = [line.strip() for play in sorted(PLAYS.glob("*.txt")) for line in play.read_text().splitlines()]
  lines = [line for line in lines if len(line.split()) >= 8]
  rng = random.Random(0)
  picked = rng.sample(lines, docs * CHOICES)
  rows = []
  for i in range(docs):
    group = [line.split() for line in picked[i * CHOICES:(i + 1) * CHOICES]]
    endings = [" " + " ".join(words[len(words) // 2:]) for words in group]
    order = list(range(CHOICES))
    rng.shuffle(order)
    rows.append({"context": " ".join(group[0][:len(group[0]) // 2]), "choices": [endings[j] for j in order],
                 "label": order.index(0)})
  data = directory / "bench_mc.jsonl"
  data.write_text("".join(json.dumps(row) + "\n" for row in rows))
  (directory / "bench_mc.yaml").write_text(
      f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files: {{test: \"{data}\"}}\n"
      "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_choice: choices\n"
      "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")


def timed(fn):
  start = time.perf_counter()
  result = fn()
  return result, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--docs", type=int, default=60, help="documents (x 4 requests)")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=2, help="warm runs of each backend, alternating; best kept")
  parser.add_argument("--output_json")
  args = parser.parse_args()

  import jax
  jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="bench_eval_jax_cache"))
  import torch
  import transformers
  from lm_eval.models.huggingface import HFLM

  from llama_hk import checkpoints
  from llama_hk.eval import harness

  hf_dir = smollm2_hf_dir()
  tasks_dir = pathlib.Path(tempfile.mkdtemp(prefix="bench_eval_tasks"))
  write_task(tasks_dir, args.docs)
  manager = harness.task_manager(str(tasks_dir), include_defaults=False)

  ckpt = checkpoints.load(hf_dir)
  ours = harness.LlamaHkLM(ckpt.config, ckpt.params, ckpt.tokenizer, batch_size=args.batch_size)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  theirs = HFLM(pretrained=model, tokenizer=transformers.AutoTokenizer.from_pretrained(hf_dir),
                batch_size=args.batch_size, device="cpu")

  scoring = {}  # Each backend's seconds in `loglikelihood` during its last run: the model's share of the wall time.

  def timed_loglikelihood(lm):
    inner = lm.loglikelihood

    def loglikelihood(*args, **kwargs):
      result, scoring[lm] = timed(lambda: inner(*args, **kwargs))
      return result
    lm.loglikelihood = loglikelihood

  timed_loglikelihood(ours)
  timed_loglikelihood(theirs)

  def run(lm):
    return harness.evaluate(lm, ["bench_mc"], manager, log_samples=True)

  load_before = os.getloadavg()
  ours_result, ours_cold = timed(lambda: run(ours))
  hf_result = run(theirs)  # Warm-up.
  ours_times, hf_times, ours_scoring, hf_scoring = [], [], [], []
  for _ in range(args.rounds):  # Alternating, so that a change of the machine's load skews both alike.
    ours_times.append(timed(lambda: run(ours))[1])
    ours_scoring.append(scoring[ours])
    hf_times.append(timed(lambda: run(theirs))[1])
    hf_scoring.append(scoring[theirs])
  ours_warm, hf_warm = min(ours_times), min(hf_times)
  load_after = os.getloadavg()

  pairs = [(a["resps"], b["resps"]) for a, b in zip(ours_result["samples"]["bench_mc"],
                                                     hf_result["samples"]["bench_mc"])]
  diffs = [abs(x[0][0] - y[0][0]) for a, b in pairs for x, y in zip(a, b)]
  figures = {
      "cpu": cpu_model(), "load_average": [round(load_before[0], 2), round(load_after[0], 2)],
      "requests": len(diffs), "batch_size": args.batch_size, "cpu_threads": torch.get_num_threads(),
      "ours_cold_s": round(ours_cold, 2), "ours_warm_s": round(ours_warm, 2), "hf_warm_s": round(hf_warm, 2),
      "speedup_warm": round(hf_warm / ours_warm, 2), "speedup_cold": round(hf_warm / ours_cold, 2),
      "ours_rounds_s": [round(t, 2) for t in ours_times], "hf_rounds_s": [round(t, 2) for t in hf_times],
      "ours_loglikelihood_s": round(min(ours_scoring), 2), "hf_loglikelihood_s": round(min(hf_scoring), 2),
      "speedup_loglikelihood": round(min(hf_scoring) / min(ours_scoring), 2),
      "acc": [ours_result["results"]["bench_mc"]["acc,none"], hf_result["results"]["bench_mc"]["acc,none"]],
      "acc_norm": [ours_result["results"]["bench_mc"]["acc_norm,none"],
                   hf_result["results"]["bench_mc"]["acc_norm,none"]],
      "max_abs_loglikelihood_diff": max(diffs),
  }
  print(json.dumps(figures))
  if args.output_json:
    pathlib.Path(args.output_json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
  main()
