"""README's shell commands, run as written: a README edit that breaks one fails the suite.

Every command of README's ```sh blocks runs in order, from a temporary working directory laid out like a checkout
(`bin/`, `../shared` with the model and the plays, a `lear.txt` and a `prompts.txt`). What makes it run unattended
and within the budget is all the test changes:
- `/tmp/...` paths, in the command and in the /tmp macros of the gin files it names, point into the directory;
- bracketed optional arguments `[...]` are dropped;
- the install steps of a `&&` chain (`python3 -m venv`, `. .venv/bin/activate`, `pip install`) are skipped: the
  suite runs inside that install;
- bin/train and bin/train_tokenizer get `--gin.` overrides appended that shorten them (bin/generate a smaller
  --max_new_tokens), and a command whose gin files read the Shakespeare corpus reads ../shared's copy
  (SHAKESPEARE_SOURCE_DIR) rather than fetching it;
- the inputs are small: lear.txt is the play's first lines, the converted SmolLM2 that the examples name is the
  session's (when no earlier command made it), and the prepared Shakespeare TFDS directory (the gin files'
  DATA_DIR) starts as a copy of the session's, so that the commands which only read it do not wait for one another.
A command that cannot run unattended ends with `# (not run by tests/test_readme.py)` in README, and is skipped; so
does the two-process evaluation, which tests/test_sharding.py runs and compares with one process.
Commands that name no common /tmp path do not depend on each other, and run side by side.
"""

import dataclasses
import itertools
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent import futures

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SKIP_MARK = "# (not run by tests/test_readme.py)"
INSTALL_STEPS = ("python3 -m venv ", ". .venv/bin/activate", "pip install ")
SHORTENED = {  # Appended to the binaries' commands: the last binding of a macro (or value of a flag) wins.
    "bin/train": ["--gin.TRAIN_STEPS=2", "--gin.WARMUP_STEPS=1", "--gin.LOG_EVERY=1", "--gin.EVAL_EVERY=2",
                  "--gin.CHECKPOINT_EVERY=2", "--gin.EVAL_MAX_BATCHES=1", "--gin.SEQ_LEN=32", "--gin.BATCH_SIZE=2"],
    "bin/train_tokenizer": ["--gin.train_spm.train_tokenizer.max_input_chars=300000"],
    "bin/generate": ["--max_new_tokens=16"],
}
LEAR_LINES = 120
PROMPTS = "Write a haiku about the sea.\nTo be, or not to be:\n"


@dataclasses.dataclass(frozen=True)
class Command:
  line: int  # Where it starts in README.
  text: str  # Continuation lines joined.


def readme_commands(text: str) -> list[Command]:
  """The commands of the ```sh blocks: comment lines left out, backslash continuations joined."""
  commands, in_block, pending, start = [], False, "", 0
  for number, line in enumerate(text.splitlines(), 1):
    if line.strip() in ("```sh", "```"):
      in_block = line.strip() == "```sh"
      continue
    if not in_block or (not pending and (not line.strip() or line.lstrip().startswith("#"))):
      continue
    start = start if pending else number
    pending += line.strip()[:-1] + " " if line.rstrip().endswith("\\") else line.strip()
    if not line.rstrip().endswith("\\"):
      commands.append(Command(start, pending))
      pending = ""
  return commands


COMMANDS = readme_commands((REPO / "README.md").read_text())


def _gin_stack(gin_file: str) -> list[pathlib.Path]:
  """A gin file and the files it includes, transitively (paths as the binaries resolve them from a checkout)."""
  files, pending = [], [REPO / gin_file]
  while pending:
    path = pending.pop()
    if path.is_file() and path not in files:
      files.append(path)
      pending += [REPO / p for p in re.findall(r"^include '([^']+)'", path.read_text(), re.M)]
  return files


def _gin_overrides(segment: str, work: pathlib.Path) -> list[str]:
  """Macros the segment's gin files bind to /tmp paths, pointed into `work`; ../shared's plays for Shakespeare."""
  overrides = {}
  for gin_file in re.findall(r"--gin_file=(\S+)", segment):
    for path in _gin_stack(gin_file):
      for name, value in re.findall(r"^(\w+) = '(/tmp/[^']*)'", path.read_text(), re.M):
        overrides[name] = f"'{work}{value}'"
      if path == REPO / "gin" / "data" / "shakespeare.gin":
        overrides["SHAKESPEARE_SOURCE_DIR"] = f"'{SHARED / 'data' / 'shakespeare'}'"
  return [f"--gin.{name}=\"{value}\"" for name, value in overrides.items() if f"--gin.{name}=" not in segment]


def prepare(command: str, work: pathlib.Path) -> str:
  """The command as the test runs it (see the module docstring)."""
  command = re.sub(r"\s+#[^'\"]*$", "", command)  # A trailing comment; overrides go after the last argument.
  command = re.sub(r"\s*\[[^\]]*\]", "", command)
  command = re.sub(r"(?<![\w.])/tmp/", f"{work}/tmp/", command)
  segments = []
  for segment in command.split(" && "):
    if segment.startswith(INSTALL_STEPS):
      continue
    binary = segment.split(" ", 1)[0]
    segments.append(" ".join([segment, *_gin_overrides(segment, work), *SHORTENED.get(binary, [])]))
  return " && ".join(segments)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> pathlib.Path:
  """A working directory beside a small ../shared: the model, the plays (lear.txt cut short), bin/ and inputs."""
  root = tmp_path_factory.mktemp("readme")
  plays = root / "shared" / "data" / "shakespeare"
  plays.mkdir(parents=True)
  (root / "shared" / "models").symlink_to(SHARED / "models")
  for text in (SHARED / "data" / "shakespeare").iterdir():
    (plays / text.name).symlink_to(text)
  lear = "".join((SHARED / "data" / "shakespeare" / "lear.txt").open().readlines()[:LEAR_LINES])
  (plays / "lear.txt").unlink()
  (plays / "lear.txt").write_text(lear)
  work = root / "work"
  (work / "tmp").mkdir(parents=True)
  (work / "bin").symlink_to(REPO / "bin")
  (work / "lear.txt").write_text(lear)
  (work / "prompts.txt").write_text(PROMPTS)
  return work


TFDS_DIR = "llama_hk/tfds"  # The gin files' DATA_DIR under /tmp: prepared before any command runs, then only read.


def _groups(prepared: dict[int, str], work: pathlib.Path) -> list[list[int]]:
  """README lines joined when their commands name a common /tmp path (one writes what another reads), the groups
  of most commands first."""
  groups: list[tuple[set[str], list[int]]] = []
  for line, command in prepared.items():
    names = set(re.findall(rf"{re.escape(str(work))}/tmp/([\w.-]+(?:/[\w.-]+)*)", command)) - {TFDS_DIR}
    lines = [line]
    for group in [g for g in groups if g[0] & names]:
      groups.remove(group)
      names, lines = names | group[0], group[1] + lines
    groups.append((names, sorted(lines)))
  return sorted((lines for _, lines in groups), key=len, reverse=True)


def _run(command: str, work: pathlib.Path) -> tuple[subprocess.CompletedProcess, float]:
  """The command under bash in its own process group, which is killed whole on the way out (its `&` jobs too)."""
  env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
  start = time.perf_counter()
  process = subprocess.Popen(["bash", "-o", "pipefail", "-c", command], cwd=work, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    out, err = process.communicate(timeout=600)
  finally:
    try:
      os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # The group is gone: every process in it has exited.
      pass
    process.wait()
  return subprocess.CompletedProcess(process.args, process.returncode, out, err), time.perf_counter() - start


@pytest.fixture(scope="module")
def runs(workspace, request) -> dict[int, tuple[str, subprocess.CompletedProcess, float]]:
  """Every runnable command, run once: README line -> (the command as run, its process, seconds). Groups that share
  no /tmp path run side by side (two at a time, as the machine has two cores), each in README order."""
  prepared = {c.line: prepare(c.text, workspace) for c in COMMANDS if not c.text.endswith(SKIP_MARK)}
  if any(f"{workspace}/tmp/{TFDS_DIR}" in p for p in prepared.values()):
    shutil.copytree(request.getfixturevalue("shakespeare_data_dir"), workspace / "tmp" / TFDS_DIR)
  converted = str(workspace / "tmp" / "smollm2")
  if (any(re.search(rf"=({re.escape(converted)})(\s|$)", p) for p in prepared.values())
      and not any(f"--output={converted} " in f"{p} " for p in prepared.values())):  # No command converts it.
    os.symlink(request.getfixturevalue("smollm2_llama_hk"), converted)

  def run_group(lines):
    return [(line, (prepared[line], *_run(prepared[line], workspace))) for line in lines]

  with futures.ThreadPoolExecutor(max_workers=2) as pool:
    return dict(itertools.chain.from_iterable(pool.map(run_group, _groups(prepared, workspace))))


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[f"README:{c.line}:{c.text.split(' ', 1)[0]}" for c in COMMANDS])
def test_readme_command(command, runs):
  if command.text.endswith(SKIP_MARK):
    pytest.skip(f"README:{command.line} is marked as not run unattended")
  run, result, seconds = runs[command.line]
  errors = [line for line in result.stderr.splitlines() if line.startswith(("error:", "Traceback"))]
  assert result.returncode == 0 and not errors, (
      f"README:{command.line} failed (exit {result.returncode}, {seconds:.0f} s): {errors}\n{run}\n"
      f"{result.stderr[-3000:]}")


@pytest.mark.slow
def test_readme_fine_tune_of_smollm2_lowers_validation_loss(runs):
  """README's fine-tune of the real model from its GGUF (gin/smollm2_135m_shakespeare.gin), as shortened here."""
  [line] = [c.line for c in COMMANDS if "--gin_file=gin/smollm2_135m_shakespeare.gin" in c.text]
  run, result, _ = runs[line]
  assert result.returncode == 0, result.stderr[-3000:]
  model_dir = pathlib.Path(re.search(r"--model_dir=(\S+)", run).group(1))
  records = [json.loads(r) for r in (model_dir / "metrics.jsonl").read_text().splitlines()]
  before, after = [r for r in records if "eval_loss" in r]
  assert (before["step"], after["step"]) == (0, 2)
  assert after["eval_loss"] < before["eval_loss"] and after["eval_perplexity"] < before["eval_perplexity"]
  assert before["eval_perplexity"] < 100  # The pretrained model already knows English: not a random start.
  assert (f"validation perplexity {before['eval_perplexity']:.3f} at step 0 -> {after['eval_perplexity']:.3f} at "
          "step 2") in result.stdout


def test_readme_marks_the_commands_it_cannot_run():
  unattended = [c for c in COMMANDS if "pytest" in c.text or "--interactive" in c.text]
  assert unattended and all(c.text.endswith(SKIP_MARK) for c in unattended), unattended


def test_prepared_commands_write_only_into_the_working_directory():
  prepared = [prepare(c.text, pathlib.Path("/work_dir")) for c in COMMANDS if not c.text.endswith(SKIP_MARK)]
  # ../shared's own path (a checkout under /tmp has one there) is read, never written.
  written = [p.replace("/work_dir/tmp/", "").replace(str(SHARED), "") for p in prepared]
  assert prepared and not any(re.search(r"(?<![\w.])/tmp/", p) for p in written)
  assert not any("[" in p or p.startswith(INSTALL_STEPS) for p in prepared)
