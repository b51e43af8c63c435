"""Peak resident memory of bin/convert against the checkpoint's size on disk (target: at most 1.5x).

Writes a synthetic float32 HF checkpoint of about --gigabytes (streamed, so this script stays small), then runs
bin/convert in child processes: HF -> llama_hk and llama_hk -> HF, printing each peak RSS and its ratio.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from llama_hk import params
from llama_hk.checkpoints import safetensors_io
from llama_hk.config import LlamaConfig, num_params, to_hf_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def synthetic_config(gigabytes: float) -> LlamaConfig:
  one = LlamaConfig(vocab_size=32000, d_model=2048, num_layers=1, num_heads=16, num_kv_heads=16, d_ff=5504)
  per_layer = num_params(one.replace(num_layers=2)) - num_params(one)
  fixed = num_params(one) - per_layer
  return one.replace(num_layers=max(1, round((gigabytes * 2**30 / 4 - fixed) / per_layer)))


def write_checkpoint(path: pathlib.Path, config: LlamaConfig) -> int:
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(to_hf_config(config)))
  rng = np.random.default_rng(0)
  tensors = []
  for p in params.table(config):
    for i in range(config.num_layers) if p.stacked else [None]:
      name = p.hf.format(i=i)
      shape = p.hf_shape(config)
      tensors.append((name, shape, np.float32, lambda shape=shape: rng.standard_normal(shape, np.float32) * 0.02))
  safetensors_io.write(str(path / "model.safetensors"), tensors)
  return (path / "model.safetensors").stat().st_size


def peak_rss_of(args: list[str]) -> tuple[int, float]:
  """Peak RSS in bytes (ru_maxrss of the child) and wall seconds of one bin/convert run."""
  code = ("import resource, runpy, sys; sys.argv = sys.argv[1:]\n"
          "try:\n  runpy.run_path(sys.argv[0], run_name='__main__')\n"
          "finally:\n  print('PEAK_RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)")
  start = time.time()
  result = subprocess.run([sys.executable, "-c", code, str(REPO / "bin" / "convert"), *args], capture_output=True,
                          text=True)
  elapsed = time.time() - start
  if result.returncode:
    sys.exit(f"bin/convert failed: {result.stderr[-2000:]}")
  peak = int(next(line.split()[1] for line in result.stderr.splitlines() if line.startswith("PEAK_RSS")))
  return peak, elapsed


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--gigabytes", type=float, default=2.2)
  args = parser.parse_args()
  config = synthetic_config(args.gigabytes)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    size = write_checkpoint(tmp / "hf", config)
    print(f"synthetic checkpoint: {config.num_layers} layers, {num_params(config):,} parameters, "
          f"{size / 2**30:.2f} GiB on disk")
    for label, argv, disk in (
        ("HF -> llama_hk", ["--input", str(tmp / "hf"), "--output", str(tmp / "own")], size),
        ("llama_hk -> HF", ["--input", str(tmp / "own"), "--output", str(tmp / "hf2"), "--output_format=hf"], size),
    ):
      peak, seconds = peak_rss_of(argv)
      print(f"{label}: peak RSS {peak / 2**30:.2f} GiB = {peak / disk:.2f}x the checkpoint ({seconds:.1f} s); "
            f"target <= 1.5x")


if __name__ == "__main__":
  main()
