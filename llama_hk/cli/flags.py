"""The flags every binary shares, defined when a binary imports llama_hk.cli (the library never does)."""

import os

from absl import flags

from llama_hk.params import WEIGHTS

# Tests point every subprocess at one per-run cache through this variable.
COMPILATION_CACHE_ENV = "LLAMA_HK_COMPILATION_CACHE_DIR"

flags.DEFINE_multi_string("gin_file", [], "gin files, applied in order: relative to the working directory, else to "
                          "the installed llama_hk (so `gin/tiny.gin` works anywhere).")
flags.DEFINE_multi_string("gin_bindings", [], "gin bindings applied after the files; `--gin.X=Y` is shorthand.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for jax.distributed (multi-host runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.DEFINE_string("compilation_cache_dir",
                    os.environ.get(COMPILATION_CACHE_ENV,
                                   os.path.join(os.path.expanduser("~"), ".cache", "llama_hk", "jax")),
                    f"JAX persistent compilation cache; empty to disable. Default: ${COMPILATION_CACHE_ENV}, else "
                    "~/.cache/llama_hk/jax.")

FLAGS = flags.FLAGS


def define_adapter_flag() -> None:
  """--adapter, for the binaries that apply a LoRA adapter to a checkpoint (bin/eval, bin/generate, bin/convert,
  bin/serve)."""
  flags.DEFINE_string("adapter", None, "A PEFT LoRA adapter directory (ours or one `peft` wrote) applied to the "
                      "checkpoint's model; a LoRA training model_dir applies its latest adapter by itself.")


def define_weights_flag() -> None:
  """--weights, the one precision vocabulary of the binaries that load a checkpoint (bin/convert, bin/eval,
  bin/generate, bin/serve); the --dtype it replaced fails with a line that names it."""
  flags.DEFINE_enum("weights", None, list(WEIGHTS), "How the weights are held: float32, bfloat16, or int8 (int8 "
                    "matrices and embedding with a float32 scale per output channel); default: as stored.")
  flags.DEFINE_string("dtype", None, "Replaced by --weights.")
  flags.register_validator("dtype", lambda value: value is None,
                           message=f"--dtype is replaced by --weights={'|'.join(WEIGHTS)}")
