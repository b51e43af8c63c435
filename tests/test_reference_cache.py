"""The reference copies tests cache per machine survive two suites started at once: both writers end with the one
complete copy, and no temporary directory is left behind (on a tiny random GGUF: the same code path as SmolLM2's)."""

import os
import subprocess
import sys

import pytest
from safetensors.numpy import load_file

import reference

_WRITE = """
import pathlib, sys
sys.path.insert(0, {tests!r})
import reference
print(reference.smollm2_hf_dir(pathlib.Path({gguf!r}), cache=pathlib.Path({cache!r})))
"""


@pytest.mark.slow
def test_two_concurrent_writers_end_with_one_complete_copy(tiny_hf_model, write_tiny_gguf, tmp_path):
  gguf = tmp_path / "tiny.gguf"
  write_tiny_gguf(gguf, tiny_hf_model(vocab_size=300))
  alone = reference.smollm2_hf_dir(gguf, cache=tmp_path / "alone")
  cache = tmp_path / "cache"
  script = _WRITE.format(tests=os.path.dirname(reference.__file__), gguf=str(gguf), cache=str(cache))
  env = dict(os.environ, OMP_NUM_THREADS="1")
  writers = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
  try:
    outputs = [w.communicate(timeout=300) for w in writers]
  finally:
    for w in writers:
      w.kill()
      w.wait()
  assert [w.returncode for w in writers] == [0, 0], [err[-2000:] for _, err in outputs]
  paths = {out.strip() for out, _ in outputs}
  assert len(paths) == 1, paths
  (path,) = paths
  assert sorted(p.name for p in cache.iterdir()) == [os.path.basename(path)] == [alone.name]
  assert sorted(os.listdir(path)) == sorted(os.listdir(alone))
  written, single = load_file(os.path.join(path, "model.safetensors")), load_file(alone / "model.safetensors")
  assert written.keys() == single.keys() and len(single) > 10
  for name, value in single.items():
    assert (written[name] == value).all(), name
