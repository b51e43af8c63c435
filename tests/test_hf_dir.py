"""Hugging Face directories as README promises them: a pytorch_model.bin is unpickled with weights_only (a pickle
carrying code is refused, naming the file, and its code never runs), and the export split into safetensors shards
with an index that transformers loads back to the same logits."""

import json

import numpy as np
import pytest
import torch

from llama_hk import checkpoints
from llama_hk.config import from_hf_config
from llama_hk.errors import UserError
from llama_hk.params import params_from_hf


class _WritesMarker:
  """Unpickling this calls open(marker, "w"): the file appears only if the loader runs the pickle's code."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return open, (self.marker, "w")


def _state_dict(model) -> dict[str, torch.Tensor]:
  return {name: t.detach().clone() for name, t in model.state_dict().items()}


def test_pytorch_bin_with_code_is_refused_naming_the_file(tiny_hf_model, tmp_path):
  model = tiny_hf_model(seed=60)
  clean, unsafe = tmp_path / "clean", tmp_path / "unsafe"
  for path, extra in ((clean, {}), (unsafe, {"extra": _WritesMarker(tmp_path / "marker")})):
    path.mkdir()
    model.config.to_json_file(path / "config.json")
    torch.save({**_state_dict(model), **extra}, path / "pytorch_model.bin")
  with pytest.raises(UserError) as error:
    checkpoints.load(unsafe, on_device=False)
  message = str(error.value)
  assert "\n" not in message and message.startswith(f"{unsafe / 'pytorch_model.bin'}: unreadable PyTorch"), message
  assert not (tmp_path / "marker").exists()  # The pickle's open() never ran.
  # The control: the same tensors without the object load as transformers holds them.
  config = from_hf_config(model.config.to_dict())
  expected = params_from_hf({n: t.numpy() for n, t in model.state_dict().items()}, config)
  loaded = checkpoints.load(clean, on_device=False).params
  for module, leaves in expected.items():
    for name, leaf in leaves.items():
      np.testing.assert_array_equal(loaded[module][name], leaf, err_msg=f"{module}/{name}")


def test_sharded_export_has_an_index_transformers_loads(tiny_hf_model, tmp_path):
  import transformers

  model = tiny_hf_model(seed=61)
  config = from_hf_config(model.config.to_dict())
  tensors = {n: t.detach().numpy() for n, t in model.state_dict().items()}
  max_shard_bytes = 60_000  # Embedding and head (40,960 bytes each) alone; the 2 layers' 14 tensors in a few.
  checkpoints.export_hf(tmp_path / "hf", config, params_from_hf(tensors, config), None,
                        max_shard_bytes=max_shard_bytes)
  index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) >= 4 and not (tmp_path / "hf" / "model.safetensors").exists(), shards
  assert sorted(index["weight_map"]) == sorted(tensors)
  assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
  assert sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors")) == shards
  for shard in shards:  # Shard sizes: tensor bytes plus a small header.
    held = sum(tensors[n].nbytes for n, s in index["weight_map"].items() if s == shard)
    assert held <= max_shard_bytes, (shard, held)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
  tokens = torch.tensor(np.random.default_rng(0).integers(0, config.vocab_size, (2, 24)))
  with torch.no_grad():
    np.testing.assert_allclose(loaded(tokens).logits.numpy(), model(tokens).logits.numpy(), rtol=0, atol=1e-5)
