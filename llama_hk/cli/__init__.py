"""What every binary shares: flags, one-line errors, multi-host setup, the compilation cache, gin, dry-run reports.

A binary is `cli.run(main)`: `--gin.X=Y` becomes a gin binding, and bad input (a flag, a gin file or binding, a
llama_hk.errors.UserError) ends it with one `error: ...` line on stderr and exit status 1.
"""

import json
import os
import sys

from absl import app
from absl import flags as absl_flags
from absl import logging

from llama_hk.cli.flags import COMPILATION_CACHE_ENV, FLAGS
from llama_hk.cli.gin_config import check_required, gin_macro, gin_model_config, gin_roots, parse_gin
from llama_hk.errors import UserError, first_line

__all__ = ["COMPILATION_CACHE_ENV", "FLAGS", "check_required", "dry_run_config", "gin_macro", "gin_model_config",
           "gin_roots", "is_main_process", "parse_gin", "print_memory_report", "run", "setup_jax"]


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


def is_main_process() -> bool:
  """Only process 0 prints results and writes outputs."""
  import jax
  return jax.process_index() == 0


def dry_run_config(checkpoint: str | None):
  """The model a --dry_run lays out: --checkpoint's config (no weights read), else the gin macro MODEL_CONFIG."""
  from llama_hk import checkpoints
  config = checkpoints.load_config(checkpoint) if checkpoint else gin_macro("MODEL_CONFIG")
  if config is None:
    raise UserError("--dry_run needs --checkpoint or a --gin_file defining MODEL_CONFIG")
  return config


# The per-device byte counts a dry-run report may hold, in the order the summary lists them.
_PER_DEVICE_LABELS = (
    ("params_bytes", "parameters"), ("param_bytes_per_device", "parameters"),
    ("base_bytes", "frozen base parameters (LoRA)"), ("opt_state_bytes", "optimizer state"),
    ("state_bytes", "train state in all"), ("kv_cache_bytes_per_device", "KV cache"),
    ("temp_bytes", "compiled temporaries"), ("argument_bytes", "step arguments"), ("output_bytes", "step outputs"),
    ("alias_bytes", "donated (outputs reusing arguments)"))


def print_memory_report(report: dict) -> None:
  """The one --dry_run printer: `report` as one JSON line on stdout (for scripts), and a readable per-device
  summary on stderr; process 0 only. `report` holds at least "devices" and "mesh"."""
  if not is_main_process():
    return
  compiled = f", step compiled in {report['compile_s']} s" if "compile_s" in report else ""
  lines = [f"dry run: {report['devices']} devices, mesh {report['mesh']}{compiled}", "per-device memory:"]
  lines += [f"  {label:38s} {report[key] / 2**30:10.3f} GiB" for key, label in _PER_DEVICE_LABELS if key in report]
  print("\n".join(lines), file=sys.stderr, flush=True)
  print(json.dumps(report), flush=True)


def _expand_gin_shorthand(argv: list[str]) -> list[str]:
  """t5x's `--gin.X=Y` becomes `--gin_bindings=X = Y`."""
  return [f"--gin_bindings={a[len('--gin.'):].split('=', 1)[0]} = {a.split('=', 1)[1]}"
          if a.startswith("--gin.") and "=" in a else a for a in argv]


def _fail(message: str) -> None:
  logging.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a bad or missing flag reported like any other bad input."""
  try:
    return FLAGS(argv)
  except absl_flags.Error as e:
    _fail(first_line(e, limit=None))


def run(main) -> None:
  """absl's app.run of `main()`, with bad input (arguments that are not flags among it) reported as one
  `error: ...` line on stderr and exit status 1."""
  sys.argv = _expand_gin_shorthand(sys.argv)

  def guarded(argv):
    if not FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # Library INFO chatter (XLA, Orbax) hides the results.
    try:
      if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
      return main()
    except UserError as e:  # gin appends "In call to configurable ..." lines; the first line says it all.
      _fail(first_line(e, limit=None))

  app.run(guarded, flags_parser=_parse_flags)
