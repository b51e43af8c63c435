"""bench/device.sh --smoke: the device bench's every path (attention parity, train step, decode) runs on CPU with
tiny shapes, and prints each figure, finite; the real run needs a GPU (README)."""

import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
FIGURES = ["attention jax vs reference, causal, outputs max abs diff",
           "attention jax vs reference, window 32, grads max abs diff",
           "attention jax vs reference, packed+padding, outputs max abs diff",
           "attention jax vs reference, packed+padding, grads max abs diff",
           "train tokens/s", "train MFU", "decode tiny batch 1", "decode tiny batch 4"]


@pytest.mark.slow
def test_device_smoke_prints_every_figure():
  proc = subprocess.run(["bash", str(REPO / "bench" / "device.sh"), "--smoke", "--steps=1", "--new_tokens=4"],
                        capture_output=True, text=True, timeout=300, cwd=REPO,
                        env={**os.environ, "PYTHON": sys.executable})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.match(r"device: cpu \(cpu\), jax \d", proc.stdout), proc.stdout
  figures = dict(re.findall(r"^([^:\n]+): (\S+)", proc.stdout, re.MULTILINE))
  for name in FIGURES:
    assert name in figures, (name, proc.stdout)
    assert math.isfinite(float(figures[name])), (name, proc.stdout)
  assert float(figures["train tokens/s"]) > 0 and float(figures["decode tiny batch 4"]) > 0
  # XLA's attention computes what the reference does (bfloat16 outputs within a few of their last bits), and the
  # packed rows' outputs are far from those of a kernel that dropped the segment ids.
  assert float(figures["attention jax vs reference, packed+padding, outputs max abs diff"]) < 0.05
  assert float(figures["attention jax, packed+padding against ignoring the segments, outputs max abs diff"]) > 0.1
