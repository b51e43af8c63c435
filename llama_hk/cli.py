"""What every binary shares: one-line errors, multi-host setup, the compilation cache, gin parsing."""

import json
import os
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
import gin

from llama_hk.errors import UserError

flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for jax.distributed (multi-host runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.DEFINE_multi_string("gin_file", [], "gin files, applied in order.")
flags.DEFINE_multi_string("gin_bindings", [], "gin bindings applied after the files; `--gin.X=Y` is shorthand.")
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
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # Only CPU devices use it.
    _native_stdout_to_stderr()
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)


def _native_stdout_to_stderr() -> None:
  """Keeps stdout for what the binary prints: Gloo logs its peer connections with C++'s std::cout, from its own
  threads, which would land inside streamed completions. File descriptor 1 now goes to stderr, and Python's
  sys.stdout writes to the original stdout."""
  sys.stdout.flush()
  stdout_fd = os.dup(1)
  os.dup2(2, 1)
  sys.stdout = os.fdopen(stdout_fd, "w", encoding=sys.stdout.encoding, errors=sys.stdout.errors)


def dry_run_config(checkpoint: str | None):
  """The model a --dry_run lays out: --checkpoint's config (no weights read), else the gin macro MODEL_CONFIG."""
  from llama_hk import checkpoints
  config = checkpoints.load_config(checkpoint) if checkpoint else gin_macro("MODEL_CONFIG")
  if config is None:
    raise UserError("--dry_run needs --checkpoint or a --gin_file defining MODEL_CONFIG")
  return config


def print_memory_report(config, mesh, extra: dict | None = None) -> None:
  """The --dry_run report: parameters per device on `mesh` (and a binary's `extra` figures), from shapes alone
  (nothing is allocated)."""
  import jax
  from llama_hk import sharding
  from llama_hk.config import num_params
  import numpy as np
  per_device = sharding.per_device_param_bytes(config, mesh)
  total = num_params(config) * np.dtype(config.param_dtype).itemsize
  report = {"mesh": dict(mesh.shape), "devices": mesh.size, "parameters": num_params(config),
            "param_bytes_total": total, "param_bytes_per_device": per_device,
            "param_gib_per_device": round(per_device / 2**30, 3), **(extra or {})}
  if jax.process_index() == 0:
    print(json.dumps(report))


def is_main_process() -> bool:
  import jax
  return jax.process_index() == 0


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_gin() -> None:
  """Parses --gin_file then --gin_bindings; include paths resolve against the repo root too."""
  if (REPO_ROOT / "gin").is_dir():
    gin.add_config_file_search_path(str(REPO_ROOT))
  try:
    gin.parse_config_files_and_bindings(FLAGS.gin_file, FLAGS.gin_bindings, finalize_config=False)
  except (ValueError, IOError, SyntaxError) as e:
    raise UserError(f"gin: {str(e).splitlines()[0]}") from None


def gin_model_config(gin_files: list[str], bindings: list[str] = ()):
  """The MODEL_CONFIG macro that a stack of gin files (plus bindings) defines."""
  gin.clear_config()
  if (REPO_ROOT / "gin").is_dir():
    gin.add_config_file_search_path(str(REPO_ROOT))
  gin.parse_config_files_and_bindings(gin_files, list(bindings))
  return gin_macro("MODEL_CONFIG")


def gin_macro(name: str, default=None):
  """The value of the gin macro `name` in the parsed config (calling an `@fn()` reference), or `default`."""
  try:
    value = gin.query_parameter(f"%{name}")
  except ValueError:
    return default
  if isinstance(value, gin.config.ConfigurableReference):
    return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
  return value


def _expand_gin_shorthand(argv: list[str]) -> list[str]:
  """t5x's `--gin.X=Y` becomes `--gin_bindings=X = Y`."""
  return [f"--gin_bindings={a[len('--gin.'):].split('=', 1)[0]} = {a.split('=', 1)[1]}"
          if a.startswith("--gin.") and "=" in a else a for a in argv]


def run(main) -> None:
  """absl's app.run, with bad input reported as one line on stderr and exit status 1."""
  sys.argv = _expand_gin_shorthand(sys.argv)

  def guarded(argv):
    if not FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # Library INFO chatter (XLA, Orbax) hides the results.
    try:
      return main(argv)
    except UserError as e:
      logging.flush()
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)

  app.run(guarded)
