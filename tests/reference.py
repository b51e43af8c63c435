"""The references tests compare with beyond a plain transformers model call: an HF copy of the SmolLM2 GGUF made by
transformers once per machine (imported by tests/conftest.py and bench/generate.py, so both compare against the same
files), llama.cpp's HF -> GGUF converter, torch.optim.AdamW training of a transformers model, transformers' greedy
generation of one prompt, and our parameters of a transformers model.
"""

import functools
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SMOLLM2_GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP = SHARED / "tools" / "llama.cpp"
CACHE = pathlib.Path(os.environ.get("LLAMA_HK_TEST_CACHE", pathlib.Path.home() / ".cache" / "llama_hk" / "tests"))


def smollm2_hf_dir(gguf: pathlib.Path = SMOLLM2_GGUF, cache: pathlib.Path = CACHE) -> pathlib.Path:
  """An HF-format float32 copy of the GGUF made by transformers' own GGUF loader (independent of llama_hk).

  Cached per machine, keyed by the GGUF's contents (a fresh checkout's copy of the same file, with a new mtime, finds
  it) and the transformers version. It is written to a temporary sibling and renamed into place, so two suites
  started at once both end with the one complete copy.
  """
  import torch
  import transformers

  out = cache / f"smollm2_hf_{_digest(gguf.resolve(), gguf.stat().st_mtime_ns)}_{transformers.__version__}"
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


@functools.lru_cache(maxsize=None)
def _digest(path: pathlib.Path, mtime_ns: int) -> str:
  """The first 16 hex digits of the file's SHA-256 (once per process and version of the file)."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()[:16]


# SmolLM2's own tokenizer.json pre-tokenizer (digits one by one, then GPT-2's byte-level split); transformers' GGUF
# loader, which made the cached HF copy, leaves the digits out, and llama.cpp's converter names a BPE vocabulary by
# what its pre-tokenizer makes of a fixed text.
SMOLLM2_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}


def write_hf_dir(model, tokenizer_dir: pathlib.Path, hf_dir: pathlib.Path) -> pathlib.Path:
  """A transformers model saved with the tokenizer files of `tokenizer_dir` (a BPE tokenizer.json given
  SmolLM2's own pre-tokenizer), as llama.cpp's converter takes it."""
  model.save_pretrained(hf_dir)
  for file in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
    if (tokenizer_dir / file).is_file():
      shutil.copy(tokenizer_dir / file, hf_dir / file)
  if (hf_dir / "tokenizer.json").is_file():
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    (hf_dir / "tokenizer.json").write_text(json.dumps({**tokenizer, "pre_tokenizer": SMOLLM2_PRE}))
  return hf_dir


def llama_cpp_convert(hf_dir: pathlib.Path, out: pathlib.Path, outtype: str) -> pathlib.Path:
  """llama.cpp's convert_hf_to_gguf.py run on the HF directory."""
  env = dict(os.environ, PYTHONPATH=f"{LLAMA_CPP / 'gguf-py'}:{LLAMA_CPP}")
  proc = subprocess.run([sys.executable, str(LLAMA_CPP / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(out),
                         "--outtype", outtype], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


def torch_adamw_steps(model, groups, batches, hyper) -> list[float]:
  """The reference training: torch.optim.AdamW over parameter `groups` (each with its weight_decay), the masked
  mean next-token loss, optax-style global-norm clipping; one step a batch. Returns the losses."""
  import torch

  trained = [p for group in groups for p in group["params"]]
  opt = torch.optim.AdamW(groups, lr=hyper["peak_learning_rate"], betas=(hyper["b1"], hyper["b2"]), eps=hyper["eps"])
  losses = []
  for batch in batches:
    logits = model(input_ids=torch.from_numpy(batch["tokens"]).long()).logits  # Padding at row ends: causal suffices.
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(batch["targets"]).long().flatten(),
                                            reduction="none")
    mask = torch.from_numpy(batch["loss_mask"]).flatten()
    loss = (nll * mask).sum() / mask.sum()
    opt.zero_grad()
    loss.backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in trained))
    # optax's clip: scale by clip / norm when the norm exceeds it (torch's clip_grad_norm_ adds 1e-6 to the norm).
    if norm > hyper["clip_norm"]:
      for p in trained:
        p.grad.mul_(hyper["clip_norm"] / norm)
    opt.step()
    losses.append(float(loss.detach()))
  return losses


def ours_from_hf(hf_model):
  """Our config and parameters for a transformers LlamaForCausalLM (or another family's model)."""
  from llama_hk.config import from_hf_config
  from llama_hk.params import params_from_hf

  config = from_hf_config(hf_model.config.to_dict())
  tensors = {name: t.detach().numpy() for name, t in hf_model.state_dict().items()}
  return config, params_from_hf(tensors, config)


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
  """transformers' greedy continuation of one prompt, up to and including its first EOS (when eos is set)."""
  import torch

  with torch.no_grad():
    out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
  return out[0, len(prompt):].tolist()
