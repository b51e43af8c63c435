"""Decode speed of SmolLM2-135M with float32, bfloat16 and int8 weights (--weights), batch 1 and 8, in one run.

Timed as bench/generate.py times llama_hk (its `measure`: round-robin, best of --repeats, decode tokens/s =
batch * (N - 1) / (time(N new tokens) - time(1 new token))); compute is float32 in every case. Prints the CPU
model and each rate's ratio to float32's.

  python bench/weights.py [--checkpoint=HF_DIR] [--new_tokens=64] [--repeats=3] [--output_json=FILE]
"""

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from generate import PROMPT, llama_hk_runner, measure, smollm2_hf_dir  # noqa: E402
from machine import cpu_model, describe  # noqa: E402

WEIGHTS = ("float32", "bfloat16", "int8")



def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", help="HF directory of SmolLM2-135M (default: a float32 copy of the GGUF)")
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--output_json")
  args = parser.parse_args()
  hf_dir = pathlib.Path(args.checkpoint) if args.checkpoint else smollm2_hf_dir()

  from llama_hk.tokenizers.tokenizer import Tokenizer
  prompt = Tokenizer.from_dir(hf_dir).encode(PROMPT)
  load_before = os.getloadavg()
  rates = measure({w: (llama_hk_runner(hf_dir, dtype=w), (1, 8), False) for w in WEIGHTS}, prompt, None,
                  args.new_tokens, args.repeats)
  load_after = os.getloadavg()
  print(describe())
  print(f"SmolLM2-135M decode by --weights, float32 compute; "
        f"{args.new_tokens} new tokens, best of {args.repeats}; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after")
  print(f"{'weights':10s}{'batch 1':>10s}{'vs f32':>8s}{'batch 8':>10s}{'vs f32':>8s}  (tokens/s)")
  base = rates["float32"]
  for w in WEIGHTS:
    r = rates[w]
    print(f"{w:10s}{r['decode_b1']:10.1f}{r['decode_b1'] / base['decode_b1']:7.2f}x"
          f"{r['decode_b8']:10.1f}{r['decode_b8'] / base['decode_b8']:7.2f}x")
  if args.output_json:
    pathlib.Path(args.output_json).write_text(json.dumps({"cpu": cpu_model(), "rates": rates,
                                                          "load_average": [load_before, load_after]}, indent=2))


if __name__ == "__main__":
  main()
