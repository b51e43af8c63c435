"""Serving throughput of bin/serve against `transformers serve --continuous-batching`, one after the other, on the
same HF copy of SmolLM2-135M (float32, CPU), through the official openai client.

The load is fixed: request i has a prompt of consecutive words of King Lear (about 16, 48 or 96 tokens, by i mod 3)
and max_tokens by i mod 4 from the --mix: `chat` 32, 64, 128, 64 (the default: replies of a chat or completion
client run to tens or hundreds of tokens) or `short` 8, 16, 24, 16 (the first mix: prefills are about half the
work); greedy, streamed; --concurrency streams at a time (asyncio). Each load
is preceded by a warm-up round of the same requests at the same concurrency, then runs --repeats times, the best
run counting for each server (every run's figure is printed, and README's Serving section gives them). The
warm-up is the whole load because our server compiles each shape it meets once (prompt bucket x prefill rows,
batch bucket x steps per call), and which ones a load meets depends on how its requests arrive and finish: a
warm-up of only the mix's every kind left the first measured run compiling. Reported per server
and concurrency: output tokens/s (completion tokens over the wall time), requests/s, p50 and p95 time to first
token, and each stream's decode rate (tokens after the first over the time from first to last); then our /
transformers' ratios, and bin/generate's batch-1 decode tokens/s beside our one-stream decode rate.
transformers' server takes the same requests, or the first --transformers_requests of them (a bound on the run's
time: fewer requests fill its batch less). Loopback only; every wait bounded.

  python bench/serve.py [--mix=chat|short] [--requests=32] [--transformers_requests=N] [--concurrency=1,4,16]
                        [--max_seq_len=256] [--repeats=2]
"""

import argparse
import asyncio
import json
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import openai

REPO = pathlib.Path(__file__).resolve().parents[1]
PLAYS = REPO.parent / "shared" / "data" / "shakespeare"
PROMPT_WORDS = (12, 36, 72)  # About 16, 48 and 96 tokens.
MIXES = {"chat": (32, 64, 128, 64), "short": (8, 16, 24, 16)}  # max_tokens by request index mod 4.
STARTUP_S = 600
REQUEST_S = 900

sys.path.insert(0, str(REPO / "tests"))
from reference import smollm2_hf_dir  # The tests' float32 HF copy of the GGUF, made the same way when missing.
sys.path.insert(0, str(REPO / "bench"))
from machine import cpu_model, describe  # noqa: E402


def mix(count: int, name: str = "chat") -> list[tuple[str, int]]:
  """The fixed load: (prompt, max_tokens) for each request, from consecutive words of a play."""
  words = (PLAYS / "lear.txt").read_text().split()
  outputs = MIXES[name]
  load, at = [], 1000
  for i in range(count):
    n = PROMPT_WORDS[i % len(PROMPT_WORDS)]
    load.append((" ".join(words[at:at + n]), outputs[i % len(outputs)]))
    at += n
  return load


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen) -> None:
  deadline = time.monotonic() + STARTUP_S
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f"the server exited with {process.returncode}")
    try:
      with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
        if r.status == 200:
          return
    except OSError:
      pass
    time.sleep(1)
  raise RuntimeError(f"{url} not healthy after {STARTUP_S} s")


async def one(client, model: str, prompt: str, max_tokens: int) -> dict:
  started = time.perf_counter()
  times, usage = [], None
  stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
  async for chunk in stream:
    if chunk.choices and chunk.choices[0].text:
      times.append(time.perf_counter())
    if getattr(chunk, "usage", None):
      usage = chunk.usage
  tokens = usage.completion_tokens if usage else len(times)
  return {"ttft": times[0] - started if times else float("nan"), "tokens": tokens,
          "decode": (tokens - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None}


async def load(url: str, model: str, requests: list[tuple[str, int]], concurrency: int, repeats: int) -> dict:
  """The requests at `concurrency` streams, after a warm-up round, `repeats` times: the best run's figures, and
  every run's output tokens/s."""
  client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=REQUEST_S)
  gate = asyncio.Semaphore(concurrency)

  async def gated(prompt, n):
    async with gate:
      return await one(client, model, prompt, n)

  try:
    # Warm-up: the whole load once (the module docstring says why); transformers' server gets the same.
    await asyncio.gather(*(gated(p, n) for p, n in requests))
    runs = []
    for _ in range(repeats):
      started = time.perf_counter()
      results = await asyncio.wait_for(asyncio.gather(*(gated(p, n) for p, n in requests)), REQUEST_S)
      runs.append((results, time.perf_counter() - started))
  finally:
    await client.close()
  rates = [sum(r["tokens"] for r in results) / wall for results, wall in runs]
  results, wall = runs[int(np.argmax(rates))]
  ttft = np.array([r["ttft"] for r in results])
  decode = [r["decode"] for r in results if r["decode"]]
  return {"requests": len(results), "output_tokens_per_s": max(rates), "runs_output_tokens_per_s": rates,
          "requests_per_s": len(results) / wall, "ttft_p50_s": float(np.percentile(ttft, 50)),
          "ttft_p95_s": float(np.percentile(ttft, 95)), "stream_decode_tokens_per_s": float(np.mean(decode))}


def run_server(command: list[str], url: str, model: str, requests, levels, repeats: int) -> dict:
  process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
  try:
    wait_healthy(url, process)
    results = {}
    for c in levels:
      results[c] = asyncio.run(load(url, model, requests, c, repeats))
      print(f"{command[1]} concurrency {c}: {json.dumps(results[c])}", flush=True)
    return results
  finally:
    process.send_signal(signal.SIGTERM)
    try:
      process.wait(timeout=15)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait(timeout=15)


def generate_decode(hf_dir: pathlib.Path, prompt: str) -> float:
  """bin/generate's batch-1 decode tokens/s (its stderr statistics line)."""
  run = subprocess.run([sys.executable, str(REPO / "bin" / "generate"), f"--checkpoint={hf_dir}", f"--prompt={prompt}",
                        "--max_new_tokens=64", "--temperature=0"], capture_output=True, text=True, timeout=600,
                       cwd=REPO)
  return float(re.search(r"decode: ([0-9.]+) tokens/s", run.stderr).group(1))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mix", choices=sorted(MIXES), default="chat")
  parser.add_argument("--requests", type=int, default=32)
  parser.add_argument("--transformers_requests", type=int, help="default: --requests")
  parser.add_argument("--concurrency", default="1,4,16")
  parser.add_argument("--max_seq_len", type=int, default=256, help="bin/serve's context: the longest prompt and reply")
  parser.add_argument("--repeats", type=int, default=2, help="measured runs of each load (the best counts)")
  parser.add_argument("--output_json")
  args = parser.parse_args()
  levels = [int(c) for c in args.concurrency.split(",")]
  hf_dir = smollm2_hf_dir()
  requests = mix(args.requests, args.mix)
  port = free_port()
  ours = run_server([sys.executable, str(REPO / "bin" / "serve"), f"--checkpoint={hf_dir}", f"--port={port}",
                     f"--max_batch={max(levels)}", f"--max_seq_len={args.max_seq_len}", "--model_name=smollm2",
                     f"--max_queue={args.requests}"], f"http://127.0.0.1:{port}", "smollm2", requests, levels,
                    args.repeats)
  port = free_port()
  theirs = run_server(["transformers", "serve", "--continuous-batching", "--device=cpu", "--dtype=float32",
                       f"--port={port}", "--host=127.0.0.1", str(hf_dir)], f"http://127.0.0.1:{port}", str(hf_dir),
                      requests[:args.transformers_requests or args.requests], levels, args.repeats)
  reference = generate_decode(hf_dir, requests[1][0])
  print(f"{describe()}; mix {args.mix} {MIXES[args.mix]}, {args.requests} requests")
  report = {"cpu": cpu_model(), "mix": args.mix, "llama_hk": ours, "transformers": theirs,
            "bin_generate_batch1_decode_tokens_per_s": reference}
  for c in levels:
    a, b = ours[c], theirs[c]
    print(f"concurrency {c:2d}: llama_hk {a['output_tokens_per_s']:7.1f} tok/s {a['requests_per_s']:6.2f} req/s "
          f"TTFT p50 {a['ttft_p50_s']:.3f} s p95 {a['ttft_p95_s']:.3f} s | transformers "
          f"{b['output_tokens_per_s']:7.1f} tok/s {b['requests_per_s']:6.2f} req/s TTFT p50 {b['ttft_p50_s']:.3f} s "
          f"p95 {b['ttft_p95_s']:.3f} s | ratio {a['output_tokens_per_s'] / b['output_tokens_per_s']:.2f}x tok/s")
  one_stream = ours[levels[0]]["stream_decode_tokens_per_s"]
  print(f"one stream decode: {one_stream:.1f} tokens/s; bin/generate batch-1 decode: {reference:.1f} tokens/s "
        f"({one_stream / reference:.2f}x)")
  if args.output_json:
    pathlib.Path(args.output_json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
