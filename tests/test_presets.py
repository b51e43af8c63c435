"""The gin presets define the published model sizes, and README's parameter table is the code's own count."""

import pathlib
import subprocess
import sys

import pytest

from llama_hk import cli
from llama_hk.config import num_params

REPO = pathlib.Path(__file__).resolve().parents[1]

KNOWN = {  # Published parameter counts.
    "7b": 6_738_415_616,
    "llama2_7b": 6_738_415_616,
    "llama2_13b": 13_015_864_320,
    "llama2_70b": 68_976_648_192,
    "llama3_8b": 8_030_261_248,
    "llama3_1_8b": 8_030_261_248,
    "mistral_7b": 7_241_732_096,
    "qwen2_5_0_5b": 494_032_768,
    "smollm2_135m": 134_515_008,
}


def preset(name):
  return cli.gin_model_config([str(REPO / "gin" / "models" / f"{name}.gin")])


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_known_parameter_counts(name):
  assert num_params(preset(name)) == KNOWN[name]


def test_llama_7b_without_lm_head_is_the_seed_figure():
  assert num_params(preset("7b"), with_lm_head=False) == 6_607_343_616


def test_llama2_70b_uses_grouped_query_attention():
  config = preset("llama2_70b")
  assert (config.num_heads, config.num_kv_heads, config.head_dim) == (64, 8, 128)


def test_readme_parameter_table_is_generated_from_the_presets():
  table = subprocess.run([sys.executable, str(REPO / "bin" / "param_table")], check=True, capture_output=True,
                         text=True).stdout.strip()
  assert len(table.splitlines()) == 2 + len(list((REPO / "gin" / "models").glob("[!_]*.gin")))
  assert table in (REPO / "README.md").read_text()


@pytest.mark.parametrize("name, base", [("llama2_7b", "7b"), ("llama2_13b", "13b")])
def test_llama2_presets_are_their_llama1_base_with_a_longer_context(name, base):
  assert preset(name) == preset(base).replace(norm_eps=1e-5, max_seq_len=4096)


def test_family_presets_carry_their_family_settings():
  assert preset("llama3_1_8b") == preset("llama3_8b").replace(
      max_seq_len=131072, rope_scaling="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
      rope_high_freq_factor=4.0, rope_original_max_len=8192)
  mistral, qwen2 = preset("mistral_7b"), preset("qwen2_5_0_5b")
  assert (mistral.family, mistral.sliding_window, mistral.qkv_bias) == ("mistral", 4096, False)
  assert (qwen2.family, qwen2.sliding_window, qwen2.qkv_bias, qwen2.tie_embeddings) == ("qwen2", None, True, True)


def test_the_tiny_preset_is_the_model_the_quickstart_trains():
  quickstart = cli.gin_model_config([str(REPO / "gin" / "tiny.gin")], ["DATA_DIR = None", "TOKENIZER_DIR = None"])
  assert quickstart == preset("tiny")


def test_gin_override_reaches_the_config():
  config = cli.gin_model_config([str(REPO / "gin" / "models" / "tiny.gin")],
                                ["config.LlamaConfig.compute_dtype = 'bfloat16'", "VOCAB_SIZE = 512"])
  assert (config.compute_dtype, config.vocab_size) == ("bfloat16", 512)
