"""The public API re-exported from `llama_hk`, and that importing the package stays light."""

import subprocess
import sys

import llama_hk


def test_every_exported_name_resolves_to_its_module_object():
  from llama_hk.inference import generator
  from llama_hk.models import llama
  assert llama_hk.make_forward is llama.make_forward
  assert llama_hk.Generator is generator.Generator
  for name in llama_hk.__all__:
    assert getattr(llama_hk, name) is not None, name


def test_importing_the_config_does_not_import_orbax_grain_or_torch():
  code = "import sys, llama_hk.config; print(sorted(m for m in ('orbax', 'grain', 'torch') if m in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
  assert out == "[]"
