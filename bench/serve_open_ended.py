"""The serving engine on requests that ask for the rest of the context against the same requests asking for what
they read, in one process, on SmolLM2-135M (float32, CPU).

A chat client that omits max_tokens asks for the rest of the context (protocol.parse), and most replies end long
before it: the engine's cache must not cost such a request more than one that states its length. The load is
bench/serve.py's `chat` mix (prompts of about 16, 48 or 96 tokens, 32 / 64 / 128 / 64 tokens read), --concurrency
streams at a time, straight into `serving.Engine` (no HTTP: a stream's SSE chunks carry up to 8 tokens, so a client
cannot stop at an exact token count, and here each sequence is cancelled as soon as it has given the mix's count).
`given` requests ask for that count, `open` ones for --max_seq_len - 128 tokens. The two kinds alternate, each
first run once as a warm-up (the engine compiles every shape it meets once); the best of --repeats counts.
Reported: output tokens/s of each kind and their ratio. The engine's own tree is measured (no peer): run it on two
trees (PYTHONPATH=TREE) to compare them.

  python bench/serve_open_ended.py [--requests=32] [--concurrency=16] [--max_seq_len=8192] [--repeats=2]
"""

import argparse
import pathlib
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from machine import describe  # noqa: E402
from serve import mix, smollm2_hf_dir  # noqa: E402

RUN_S = 900  # The longest wait for one run.


def run(engine, requests, concurrency: int, ask: int | None) -> float:
  """Output tokens/s of the requests ((prompt ids, tokens to read)), `concurrency` at a time, each asking for `ask`
  tokens (None: for the tokens it reads) and cancelled once it has given them."""
  from llama_hk.serving.engine import Request

  gate, lock, finished = threading.Semaphore(concurrency), threading.Lock(), threading.Event()
  counts, left = [0] * len(requests), [len(requests)]

  def emit_for(i: int, jobs: list):
    def emit(_, out):
      with lock:
        want = requests[i][1]
        if counts[i] >= want:
          return
        counts[i] = min(counts[i] + len(out.ids), want)
        if counts[i] >= want or out.finish_reason:
          if not out.finish_reason:
            jobs[0].cancel()
          gate.release()
          left[0] -= 1
          if not left[0]:
            finished.set()
    return emit

  started = time.perf_counter()
  for i, (prompt, read) in enumerate(requests):
    gate.acquire()
    jobs = []
    jobs.extend(engine.submit([Request(prompt, ask or read)], emit_for(i, jobs)))
  if not finished.wait(RUN_S):
    raise RuntimeError(f"the load did not finish in {RUN_S} s")
  return sum(counts) / (time.perf_counter() - started)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--requests", type=int, default=32)
  parser.add_argument("--concurrency", type=int, default=16)
  parser.add_argument("--max_seq_len", type=int, default=8192)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  from llama_hk import checkpoints
  from llama_hk.inference.generator import Generator
  from llama_hk.serving.engine import Engine

  ckpt = checkpoints.load(str(smollm2_hf_dir()))
  engine = Engine(Generator(ckpt.config, ckpt.params, ckpt.tokenizer, max_batch=args.concurrency),
                  args.max_seq_len, max_queue=args.requests)
  requests = [(tuple(ckpt.tokenizer.encode(text)), read) for text, read in mix(args.requests, "chat")]
  kinds = {"given": None, "open": args.max_seq_len - 128}
  engine.start()
  try:
    rates = {kind: [] for kind in kinds}
    for kind, ask in kinds.items():
      run(engine, requests, args.concurrency, ask)  # Warm-up.
    for _ in range(args.repeats):
      for kind, ask in kinds.items():
        rates[kind].append(run(engine, requests, args.concurrency, ask))
  finally:
    engine.stop()
  print(f"{describe()}; {args.requests} requests of the chat mix, {args.concurrency} at a time, context "
        f"{args.max_seq_len}")
  for kind, ask in kinds.items():
    print(f"{kind:5s} (max_tokens {'as read' if ask is None else ask}): {max(rates[kind]):7.1f} output tokens/s "
          f"(runs {', '.join(f'{r:.1f}' for r in rates[kind])})")
  print(f"open / given: {max(rates['open']) / max(rates['given']):.2f}x")


if __name__ == "__main__":
  main()
