"""The reference material made from ../shared once per machine: an HF copy of the SmolLM2 GGUF made by transformers.

Imported by tests/conftest.py and bench/generate.py, so both compare against the same files.
"""

import os
import pathlib
import shutil
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SMOLLM2_GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = pathlib.Path(os.environ.get("LLAMA_HK_TEST_CACHE", pathlib.Path.home() / ".cache" / "llama_hk" / "tests"))


def smollm2_hf_dir(gguf: pathlib.Path = SMOLLM2_GGUF, cache: pathlib.Path = CACHE) -> pathlib.Path:
  """An HF-format float32 copy of the GGUF made by transformers' own GGUF loader (independent of llama_hk).

  Cached per machine, keyed by the GGUF's size and mtime and the transformers version. It is written to a temporary
  sibling and renamed into place, so two suites started at once both end with the one complete copy.
  """
  import torch
  import transformers

  stat = gguf.stat()
  out = cache / f"smollm2_hf_{stat.st_size}_{int(stat.st_mtime)}_{transformers.__version__}"
  if (out / "model.safetensors").exists():
    return out
  kwargs = dict(gguf_file=gguf.name)
  model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
  tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
  # transformers refuses to save a model it loaded from GGUF; a plain copy of its weights saves normally.
  config = model.config
  if hasattr(config, "quantization_config"):
    del config.quantization_config
  plain = transformers.LlamaForCausalLM(config)
  plain.load_state_dict(model.state_dict())
  cache.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp", dir=cache))
  tmp.chmod(0o755)  # mkdtemp's 0o700 would keep the cache from other users.
  plain.save_pretrained(tmp)
  tokenizer.save_pretrained(tmp)
  try:
    os.rename(tmp, out)
  except OSError:  # Another process renamed its copy first: keep that one.
    shutil.rmtree(tmp)
    if not (out / "model.safetensors").exists():
      raise
  return out
