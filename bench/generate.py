"""Generation speed of llama_hk against transformers' `generate`, side by side, on SmolLM2-135M (float32).

Targets (issues 3 and 11): batch-1 decode >= 80% of the memory roofline and >= 2.5x transformers, batch-8
decode >= 1.5x, a 512-token prefill >= 1.0x, time to first token of a fresh bin/generate process <= 10 s with a
cold compilation cache and <= 3 s warm; and bfloat16 weights' decode speed beside float32's. The first line
printed names the machine (bench/machine.py): a figure holds for that CPU only.

Both sides are measured the same way, best of --repeats after a warm-up, every case timed once per round so
that the shared machine's load changes skew all alike: decode tokens/s = batch * (N - 1) / (time(N new tokens) -
time(1 new token)), EOS disabled so every row runs N tokens; prefill tokens/s = 512 / time(one new token after a
512-token prompt). The roofline is the weights' bytes read once per decode step at the
memory bandwidth that a streaming sum measures here.

  python bench/generate.py [--checkpoint=HF_DIR] [--new_tokens=64] [--repeats=5] [--output_json=FILE]
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPT = "The history of the Roman Empire spans many centuries, and its influence on law, language and"
LONG_TEXT = REPO.parent / "shared" / "data" / "shakespeare"

sys.path.insert(0, str(REPO / "tests"))
from reference import smollm2_hf_dir  # The tests' float32 HF copy of the GGUF, made the same way when missing.
sys.path.insert(0, str(REPO / "bench"))
from machine import describe  # noqa: E402


def best_time(fn, repeats: int) -> float:
  fn()  # Warm-up: compiles, caches.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def long_prompt_ids(tokenizer_encode, length: int) -> list[int]:
  text = "".join(p.read_text() for p in sorted(LONG_TEXT.glob("*.txt"))[:1])
  return tokenizer_encode(text[:20 * length])[:length]


def transformers_runner(hf_dir):
  """run(ids, batch, n): transformers' greedy generate of exactly n tokens for `batch` copies of the prompt."""
  import torch
  import transformers
  torch.set_num_threads(os.cpu_count())
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

  def run(ids, batch, n):
    tokens = torch.tensor([ids] * batch)
    with torch.no_grad():
      model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=n, min_new_tokens=n,
                     do_sample=False, pad_token_id=0)

  return run


def llama_hk_runner(hf_dir, dtype=None, compute_dtype="float32", chunk_steps=None):
  """run(ids, batch, n): our greedy generate of exactly n tokens (no tokenizer, so no EOS)."""
  from llama_hk import checkpoints
  from llama_hk import inference
  ckpt = checkpoints.load(hf_dir, dtype=dtype, compute_dtype=compute_dtype)
  generator = inference.Generator(ckpt.config, ckpt.params, None, chunk_steps=chunk_steps)
  return lambda ids, batch, n: generator.generate([ids] * batch, n)


def measure(runners: dict, prompt, long_prompt, new_tokens, repeats) -> dict:
  """Rates for every runner, timed round-robin (each repeat times every case once) so that a change in the
  machine's load skews all systems alike; the best of the repeats counts."""
  cases = {}
  for name, (run, batches, prefill) in runners.items():
    for batch in batches:
      cases[name, f"b{batch}", new_tokens] = lambda run=run, batch=batch: run(prompt, batch, new_tokens)
      cases[name, f"b{batch}", 1] = lambda run=run, batch=batch: run(prompt, batch, 1)
    if prefill:
      cases[name, "prefill", 1] = lambda run=run: run(long_prompt, 1, 1)
  for case in cases.values():
    case()  # Warm-up: compiles, caches.
  best = {key: float("inf") for key in cases}
  for _ in range(repeats):
    for key, case in cases.items():
      start = time.perf_counter()
      case()
      best[key] = min(best[key], time.perf_counter() - start)
  rates = {}
  for name, (_, batches, prefill) in runners.items():
    rates[name] = {f"decode_b{b}": b * (new_tokens - 1) / (best[name, f"b{b}", new_tokens] - best[name, f"b{b}", 1])
                   for b in batches}
    if prefill:
      rates[name]["prefill_512"] = len(long_prompt) / best[name, "prefill", 1]
  return rates


def memory_bandwidth_gbs() -> float:
  """A streaming read (jitted sum of 1 GiB of float32), best of 5."""
  import jax
  import jax.numpy as jnp
  data = jnp.ones((2**28,), jnp.float32)
  total = jax.jit(jnp.sum)
  seconds = best_time(lambda: total(data).block_until_ready(), 5)
  return data.nbytes / seconds / 1e9


def time_to_first_token(hf_dir, cache_dir) -> float:
  """Seconds from spawning bin/generate to the first byte of its streamed completion."""
  command = [sys.executable, str(REPO / "bin" / "generate"), f"--checkpoint={hf_dir}", f"--prompt={PROMPT}",
             "--max_new_tokens=4", f"--compilation_cache_dir={cache_dir}"]
  start = time.perf_counter()
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  first = process.stdout.read(1)
  elapsed = time.perf_counter() - start
  _, stderr = process.communicate()
  if process.returncode != 0 or not first:
    raise RuntimeError(f"bin/generate failed: {stderr.decode()}")
  return elapsed


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", help="HF directory of SmolLM2-135M (default: a float32 copy of the GGUF)")
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--output_json")
  args = parser.parse_args()

  load_before = os.getloadavg()
  hf_dir = pathlib.Path(args.checkpoint) if args.checkpoint else smollm2_hf_dir()
  with tempfile.TemporaryDirectory() as cache_dir:
    cold = time_to_first_token(hf_dir, cache_dir)
    warm = time_to_first_token(hf_dir, cache_dir)

  from llama_hk import checkpoints
  from llama_hk.config import num_params
  from llama_hk.tokenizers.tokenizer import Tokenizer
  tokenizer = Tokenizer.from_dir(hf_dir)
  config = checkpoints.load_config(hf_dir)
  prompt = tokenizer.encode(PROMPT)
  long_prompt = long_prompt_ids(tokenizer.encode, 512)
  n, r = args.new_tokens, args.repeats

  rates = measure({
      "transformers": (transformers_runner(hf_dir), (1, 8), True),
      "llama_hk": (llama_hk_runner(hf_dir), (1, 8), True),
      "llama_hk_16_steps_per_call": (llama_hk_runner(hf_dir, chunk_steps=16), (1,), False),
      "llama_hk_bf16_weights": (llama_hk_runner(hf_dir, dtype="bfloat16"), (1, 8), False),
      "llama_hk_bf16_compute": (llama_hk_runner(hf_dir, dtype="bfloat16", compute_dtype="bfloat16"), (1, 8), False),
  }, prompt, long_prompt, n, r)
  hf, ours, chunked = rates["transformers"], rates["llama_hk"], rates["llama_hk_16_steps_per_call"]
  bf16, bf16_compute = rates["llama_hk_bf16_weights"], rates["llama_hk_bf16_compute"]
  bandwidth = memory_bandwidth_gbs()
  weight_bytes = num_params(config) * 4
  roofline_b1 = bandwidth * 1e9 / weight_bytes
  load_after = os.getloadavg()

  rows = [
      ("decode, batch 1 (tokens/s)", hf["decode_b1"], ours["decode_b1"], 2.5),
      ("decode, batch 8 (tokens/s)", hf["decode_b8"], ours["decode_b8"], 1.5),
      ("prefill, 512 tokens (tokens/s)", hf["prefill_512"], ours["prefill_512"], 1.0),
  ]
  print(describe())
  print(f"SmolLM2-135M float32, {n} new tokens, best of {r}; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
  print(f"{'':34s}{'transformers':>13s}{'llama_hk':>10s}{'ratio':>8s}{'target':>8s}")
  for name, theirs, mine, target in rows:
    print(f"{name:34s}{theirs:13.1f}{mine:10.1f}{mine / theirs:7.2f}x{target:7.1f}x")
  print(f"memory bandwidth {bandwidth:.1f} GB/s, float32 weights {weight_bytes / 1e6:.0f} MB: decode roofline "
        f"{roofline_b1:.1f} tokens/s at batch 1 ({ours['decode_b1'] / roofline_b1:.0%} reached, target 80%), "
        f"{8 * roofline_b1:.0f} at batch 8 ({ours['decode_b8'] / (8 * roofline_b1):.0%})")
  print(f"decode steps per jitted call: 16 give {chunked['decode_b1']:.1f} tokens/s at batch 1, "
        f"1 (the default, streaming each token) gives {ours['decode_b1']:.1f}")
  print(f"bfloat16 weights, float32 compute: decode {bf16['decode_b1']:.1f} tokens/s at batch 1, "
        f"{bf16['decode_b8']:.1f} at batch 8 (float32: {ours['decode_b1']:.1f}, {ours['decode_b8']:.1f})")
  print(f"bfloat16 weights and compute: decode {bf16_compute['decode_b1']:.1f} tokens/s at batch 1, "
        f"{bf16_compute['decode_b8']:.1f} at batch 8")
  print(f"time to first token, fresh bin/generate process: {cold:.2f} s cold compilation cache (target 10), "
        f"{warm:.2f} s warm (target 3)")
  if args.output_json:
    result = {**rates, "bandwidth_gbs": bandwidth, "time_to_first_token_s": {"cold": cold, "warm": warm},
              "load_average": [load_before, load_after]}
    pathlib.Path(args.output_json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
