"""llama_hk.cli: the `--gin.X=Y` shorthand, the gin search path, macros and required bindings through gin's public
API, one-line errors, the dry-run printer; and the binaries working from an install outside the checkout."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import gin
import pytest

from llama_hk import cli
from llama_hk import memory
from llama_hk import sharding
from llama_hk.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@gin.configurable
def _needs(a, *, b, c=1):
  return a, b, c


@gin.configurable
def _pair(x=2):
  return ("pair", x)


def test_gin_shorthand_becomes_a_binding():
  assert cli._expand_gin_shorthand(["bin/x", "--gin.TRAIN_STEPS=5", "--gin.f.a='b=c'", "--gin_file=f.gin"]) == [
      "bin/x", "--gin_bindings=TRAIN_STEPS = 5", "--gin_bindings=f.a = 'b=c'", "--gin_file=f.gin"]


def test_gin_macro_calls_references_and_defaults(clean_gin):
  gin.parse_config(["SIZE = 5", "PAIR = @_pair()", "FN = @_pair", "_pair.x = %SIZE"])
  assert cli.gin_macro("SIZE") == 5
  assert cli.gin_macro("PAIR") == ("pair", 5)
  assert cli.gin_macro("FN")() == ("pair", 5)
  assert cli.gin_macro("UNDEFINED", "default") == "default"


def test_unset_required_macros_are_named_in_one_line(clean_gin):
  gin.parse_config(["DATA = %gin.REQUIRED", "PAIR = @scoped/_pair()", "scoped/_pair.x = %DATA", "_needs.a = %PAIR",
                    "_needs.b = %NEVER_DEFINED"])
  message = "gin: required macro DATA, NEVER_DEFINED is not set (e.g. --gin.DATA=VALUE or a binding in a --gin_file)"
  with pytest.raises(UserError, match=r"^" + message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
    cli.check_required("_needs", _needs.__wrapped__)
  with pytest.raises(UserError, match="required macro DATA is not set"):
    cli.gin_macro("PAIR")
  with pytest.raises(UserError, match="required macro DATA is not set"):
    cli.gin_macro("DATA")


def test_unbound_required_arguments_are_named_in_one_line(clean_gin):
  gin.parse_config(["_needs.a = 1"])
  with pytest.raises(UserError, match=r"^gin: _needs\.b is not bound \(e\.g\. --gin\._needs\.b=VALUE"):
    cli.check_required("_needs", _needs.__wrapped__)
  gin.parse_config(["_needs.b = 2"])
  cli.check_required("_needs", _needs.__wrapped__)


def test_gin_paths_resolve_outside_the_checkout(clean_gin, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.gin_model_config(["gin/models/llama2_7b.gin"]).max_seq_len == 4096  # Through two includes.
  (tmp_path / "gin" / "models").mkdir(parents=True)  # The working directory comes first.
  (tmp_path / "gin" / "models" / "7b.gin").write_text("include 'gin/models/tiny.gin'\n")
  assert cli.gin_model_config(["gin/models/llama2_7b.gin"]).d_model == 128


def test_memory_report_is_one_json_line_and_a_summary(capsys):
  config = cli.gin_model_config([str(REPO / "gin" / "models" / "tiny.gin")])
  report = memory.param_memory_report(config, sharding.make_mesh())
  assert report["param_bytes_per_device"] == report["param_bytes_total"] == report["parameters"] * 4
  cli.print_memory_report(report)
  out, err = capsys.readouterr()
  assert [json.loads(line) for line in out.splitlines()] == [report]
  assert "per-device memory:" in err and "parameters" in err


def _python(*args, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300, **kwargs)


def test_bad_flags_are_one_line_errors():
  result = _python(REPO / "bin" / "param_table", "--no_such_flag")
  assert (result.returncode, result.stderr) == (1, "error: Unknown command line flag 'no_such_flag'\n")


def test_compilation_cache_default_honours_the_environment(tmp_path):
  code = "from llama_hk import cli; cli.FLAGS(['x']); print(cli.FLAGS.compilation_cache_dir)"
  result = _python("-c", code, env={**os.environ, cli.COMPILATION_CACHE_ENV: str(tmp_path)})
  assert result.stdout.strip() == str(tmp_path), result.stderr


@pytest.mark.slow
def test_binaries_run_from_an_install_outside_the_checkout(tmp_path):
  source, site = tmp_path / "source", tmp_path / "site"  # A copy: the build writes build/ beside setup.py.
  shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__"))
  install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", site,
             source]
  subprocess.run(install, check=True, capture_output=True, timeout=300)
  assert (site / "llama_hk" / "gin" / "models" / "_llama.gin").is_file()
  assert (site / "llama_hk" / "gin" / "data" / "_pipeline.gin").is_file()
  env = {**os.environ, "PYTHONPATH": str(site)}
  work = tmp_path / "elsewhere"
  work.mkdir()
  where = _python("-c", "import llama_hk; print(llama_hk.__file__)", env=env, cwd=work)
  assert where.stdout.startswith(str(site)), where
  table = _python(REPO / "bin" / "param_table", env=env, cwd=work)
  assert table.returncode == 0 and "| `llama2_7b` | 4096 |" in table.stdout, table.stderr
  report = _python(REPO / "bin" / "eval", "--dry_run", "--gin_file=gin/tiny.gin", env=env, cwd=work)
  assert report.returncode == 0, report.stderr[-2000:]
  assert json.loads(report.stdout.splitlines()[-1])["parameters"] == 1_311_872
