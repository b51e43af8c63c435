"""Shared fixtures: the read-only material in ../shared and reference copies made from it once per machine."""

import os
import pathlib

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SMOLLM2_GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE = SHARED / "data" / "shakespeare"
CACHE = pathlib.Path(os.environ.get("LLAMA_HK_TEST_CACHE", pathlib.Path.home() / ".cache" / "llama_hk" / "tests"))


def _require(path: pathlib.Path) -> pathlib.Path:
  if not path.exists():
    pytest.fail(f"{path} is missing: tests need ../shared beside the checkout")
  return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
  return _require(SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def shakespeare_dir() -> pathlib.Path:
  return _require(SHAKESPEARE)


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf) -> pathlib.Path:
  """An HF-format float32 copy of the GGUF made by transformers' own GGUF loader (independent of llama_hk).

  Cached per machine, keyed by the GGUF's size and mtime and the transformers version.
  """
  import torch
  import transformers

  stat = smollm2_gguf.stat()
  out = CACHE / f"smollm2_hf_{stat.st_size}_{int(stat.st_mtime)}_{transformers.__version__}"
  if (out / "model.safetensors").exists():
    return out
  kwargs = dict(gguf_file=smollm2_gguf.name)
  model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kwargs)
  tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kwargs)
  # transformers refuses to save a model it loaded from GGUF; a plain copy of its weights saves normally.
  config = model.config
  if hasattr(config, "quantization_config"):
    del config.quantization_config
  plain = transformers.LlamaForCausalLM(config)
  plain.load_state_dict(model.state_dict())
  tmp = out.with_name(out.name + f".tmp{os.getpid()}")
  plain.save_pretrained(tmp)
  tokenizer.save_pretrained(tmp)
  tmp.rename(out)
  return out


@pytest.fixture(scope="session")
def shakespeare_data_dir(shakespeare_dir, tmp_path_factory) -> pathlib.Path:
  """A TFDS data_dir with the `shakespeare` dataset prepared (array_record) from the shared texts."""
  import tensorflow_datasets as tfds
  from llama_hk.data import sources

  tfds.disable_progress_bar()
  data_dir = tmp_path_factory.mktemp("tfds")
  sources.shakespeare("train", str(data_dir), source_dir=str(shakespeare_dir))
  return data_dir


@pytest.fixture(scope="session")
def shakespeare_tokenizer_dir(shakespeare_data_dir, shakespeare_dir, tmp_path_factory) -> pathlib.Path:
  """A small (2000-piece) LLaMA-style tokenizer trained on the first 1.5M characters of the training works."""
  from llama_hk.data import sources, tokenizer_training

  train = sources.shakespeare("train", str(shakespeare_data_dir), source_dir=str(shakespeare_dir))
  output = tmp_path_factory.mktemp("tokenizer") / "shakespeare_2000"
  return tokenizer_training.train_tokenizer(train, output, vocab_size=2000, max_input_chars=1_500_000)
