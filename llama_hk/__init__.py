"""llama_hk: LLaMA in JAX and dm-haiku. The public API, grouped by concern.

Names resolve on first use (PEP 562), so `import llama_hk.config` does not pull in Orbax, grain or torch: a
binary imports only what it runs.
"""

import importlib

_EXPORTS = {
    # The model.
    "LlamaConfig": "llama_hk.config",
    "make_forward": "llama_hk.models",
    "KVCache": "llama_hk.models",
    "init_cache": "llama_hk.models",
    "WeightLayout": "llama_hk.ops",
    "to_layout": "llama_hk.ops",
    # Parameters and checkpoints.
    "TABLE": "llama_hk.params",
    "load": "llama_hk.checkpoints",
    "load_config": "llama_hk.checkpoints",
    "convert": "llama_hk.checkpoints",
    "Tokenizer": "llama_hk.tokenizers",
    # Sharding.
    "make_mesh": "llama_hk.sharding",
    # Inference.
    "Generator": "llama_hk.inference",
    "Sampling": "llama_hk.inference",
    "Chat": "llama_hk.inference",
    # Training and evaluation.
    "train": "llama_hk.train",
    "make_train_step": "llama_hk.train",
    "TrainState": "llama_hk.train",
    "evaluate_text": "llama_hk.eval",
    "evaluate_split": "llama_hk.eval",
    # Errors.
    "UserError": "llama_hk.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'llama_hk' has no attribute {name!r}")
  return getattr(importlib.import_module(_EXPORTS[name]), name)
