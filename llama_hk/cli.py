"""What every binary shares: one-line errors, multi-host setup, the compilation cache, gin parsing."""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from llama_hk.errors import UserError

flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for jax.distributed (multi-host runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.DEFINE_string("compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "llama_hk", "jax"),
                    "JAX persistent compilation cache; empty to disable.")

FLAGS = flags.FLAGS


def setup_jax() -> None:
  """Turns on the persistent compilation cache and, when asked, JAX's multi-host runtime."""
  import jax
  if FLAGS.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if FLAGS.coordinator_address or FLAGS.num_processes:
    if jax.default_backend() == "cpu" or os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)


def is_main_process() -> bool:
  import jax
  return jax.process_index() == 0


def run(main) -> None:
  """absl's app.run, with bad input reported as one line on stderr and exit status 1."""

  def guarded(argv):
    try:
      return main(argv)
    except UserError as e:
      logging.flush()
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)

  app.run(guarded)
