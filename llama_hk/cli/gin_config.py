"""gin for the binaries: where gin files resolve, parsing the flags' files and bindings, macros, required bindings.

Only gin's public API: `gin.query_parameter`, `gin.get_bindings` and `gin.config.iterate_references`.
"""

import functools
import importlib.util
import inspect
import logging
import pathlib

import gin

from llama_hk.cli.flags import FLAGS
from llama_hk.errors import UserError, first_line

# A macro defined as `X = %gin.REQUIRED` reads back, unevaluated, as a reference to this constant.
_REQUIRED_SELECTOR = "gin.REQUIRED/gin.constant"
# What parsing raises for a file that is missing (OSError), malformed (SyntaxError) or names unknown things.
_GIN_ERRORS = (ValueError, OSError, SyntaxError)


def gin_roots() -> list[pathlib.Path]:
  """Directories holding a `gin/` tree, in the order that `gin/...` paths resolve after the working directory: the
  copy installed with the package (setup.py installs gin/ as llama_hk/gin), then the checkout (editable installs)."""
  spec = importlib.util.find_spec("llama_hk.gin")
  installed = [pathlib.Path(p).parent for p in spec.submodule_search_locations] if spec else []
  roots = []
  for root in [*installed, pathlib.Path(__file__).resolve().parents[2]]:
    if (root / "gin").is_dir() and root not in roots:
      roots.append(root)
  return roots


def _not_a_gin_probe(record: logging.LogRecord) -> bool:
  """gin logs an ERROR for every search prefix that lacks a file, even when the next prefix has it."""
  return not (record.levelno == logging.ERROR and record.getMessage().startswith("Path not found: "))


@functools.cache
def _add_search_paths() -> None:
  """gin tries each relative path as given (the working directory) first, then under each added prefix."""
  for root in gin_roots():
    gin.add_config_file_search_path(str(root))
  logging.getLogger().addFilter(_not_a_gin_probe)


def parse_gin() -> None:
  """Parses --gin_file then --gin_bindings (bad files or bindings become a one-line UserError)."""
  _add_search_paths()
  try:
    gin.parse_config_files_and_bindings(FLAGS.gin_file, FLAGS.gin_bindings, finalize_config=False)
  except _GIN_ERRORS as e:
    raise UserError(f"gin: {first_line(e)}") from None


def gin_model_config(gin_files: list[str], bindings: list[str] = ()):
  """The MODEL_CONFIG macro that a stack of gin files (plus bindings) defines, in a fresh gin config."""
  _add_search_paths()
  gin.clear_config()
  gin.parse_config_files_and_bindings(gin_files, list(bindings))
  return gin_macro("MODEL_CONFIG")


def gin_macro(name: str, default=None):
  """The value of the gin macro `name` (an `@fn()` reference called), or `default` when the config defines none.

  A macro that is, or reaches, an unset required macro is a one-line UserError naming it, not a call with
  gin.REQUIRED for a value."""
  binding = gin.get_bindings(f"{name}/gin.macro", resolve_references=False)
  if not binding:
    return default
  _report_unset([name] if _is_required(binding) else _unset_macros(binding))
  return gin.get_bindings(f"{name}/gin.macro")["value"]


def _is_required(macro_binding: dict) -> bool:
  """Whether a macro's bindings leave it undefined or %gin.REQUIRED."""
  return not macro_binding or getattr(macro_binding["value"], "scoped_selector", None) == _REQUIRED_SELECTOR


def _unset_macros(bindings: dict) -> list[str]:
  """Macros undefined or left %gin.REQUIRED that `bindings` reach through %macros and @references (called or not)."""
  unset, seen, pending = set(), set(), [bindings]
  while pending:
    for reference in gin.config.iterate_references(pending.pop()):
      if reference.scoped_selector in seen:
        continue
      seen.add(reference.scoped_selector)
      binding = gin.get_bindings(reference.scoped_selector, resolve_references=False)
      if reference.selector == "gin.macro" and _is_required(binding):
        unset.add(reference.scopes[-1])
      else:  # A scoped reference takes the bindings of every enclosing scope too, as gin applies them.
        pending.append(binding)
  return sorted(unset)


def _report_unset(unset: list[str]) -> None:
  if unset:
    raise UserError(f"gin: required macro {', '.join(unset)} is not set "
                    f"(e.g. --gin.{unset[0]}=VALUE or a binding in a --gin_file)")


def check_required(selector: str, fn) -> None:
  """Before calling the configurable `selector` (wrapping `fn`): the macros its bindings need that are unset, and
  `fn`'s required arguments that gin leaves unbound, each reported as a one-line UserError."""
  _report_unset(_unset_macros(gin.get_bindings(selector, resolve_references=False)))
  short = ".".join(selector.split(".")[-2:])
  for name, parameter in inspect.signature(fn).parameters.items():
    if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
      continue
    if parameter.default is inspect.Parameter.empty or parameter.default is gin.REQUIRED:
      try:
        gin.query_parameter(f"{selector}.{name}")
      except ValueError:
        raise UserError(f"gin: {short}.{name} is not bound "
                        f"(e.g. --gin.{short}.{name}=VALUE or a binding in a --gin_file)") from None
