"""Running the project's binaries and scripts as child processes in tests: ports from the OS, children always killed
and reaped, jax.distributed groups retried when another process took their coordinator port, simulated-device runs
of tests/sharding_scripts/, and bin/train runs read back."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
from concurrent import futures
from typing import Callable, Sequence

from llama_hk import checkpoints

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "sharding_scripts"


def devices(count: int) -> dict:
  """The environment of a child JAX process with `count` simulated CPU devices."""
  return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}


EIGHT_DEVICES = devices(8)
# What a jax.distributed coordinator (gRPC) reports when its port was taken between free_port() and its bind.
BIND_RACE = re.compile(r"(?i)address already in use|failed to add port|could not bind")
Command = tuple[Sequence[str], dict | None]  # argv, and the environment (None: this process's).


def free_port() -> int:
  """A loopback port free now; a child that binds it later may lose it (run_group retries)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_children(commands: Sequence[Command], timeout: float) -> list[subprocess.CompletedProcess]:
  """Runs the commands at once from the checkout (stdin closed) and waits for all of them, reading their pipes side
  by side; every child is killed and reaped on the way out, also on a timeout or an error."""
  processes = [subprocess.Popen([str(a) for a in argv], cwd=REPO, env={**os.environ, **(env or {})},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for argv, env in commands]
  try:
    with futures.ThreadPoolExecutor(len(processes)) as pool:
      outputs = list(pool.map(lambda p: p.communicate(timeout=timeout), processes))
  finally:
    for p in processes:
      p.kill()
      p.wait()
  return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(processes, outputs)]


def run_group(make_commands: Callable[[int], Sequence[Command]], timeout: float,
              tries: int = 3) -> list[subprocess.CompletedProcess]:
  """A jax.distributed group, `make_commands(coordinator_port)`, on a port from the OS: run again on a fresh port
  when its coordinator lost that port to another process."""
  for _ in range(tries):
    results = run_children(make_commands(free_port()), timeout)
    if not any(r.returncode and BIND_RACE.search(r.stderr) for r in results):
      break
  return results


def run_python(args, device_count: int = 8, timeout: float = 600) -> subprocess.CompletedProcess:
  """A Python script or binary with `device_count` simulated CPU devices and the tests' matmul precision."""
  [result] = run_children([([sys.executable, *args], {**devices(device_count), "JAX_DEFAULT_MATMUL_PRECISION":
                                                       "highest"})], timeout)
  return result


def run_on_meshes(script: str, checkpoint, meshes: dict, *args) -> dict:
  """A tests/sharding_scripts/ script's last stdout line (JSON): the checkpoint run on each named mesh."""
  result = run_python([SCRIPTS / script, checkpoint, *args, json.dumps(meshes)])
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def sharded_logit_diffs(checkpoint, meshes: dict, batch: int = 8) -> dict:
  """{mesh name: max abs logit difference to one device, ...} of the checkpoint on each mesh."""
  return run_on_meshes("sharded_logits.py", checkpoint, meshes, batch)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, outputs: Sequence = ()) -> None:
  """A bad-input run: exit 1, stderr exactly one `error: ` line holding every fragment, no traceback anywhere, and
  none of the `outputs` paths (nor a temporary sibling of one) written."""
  assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
  assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), \
      result.stderr[-2000:]
  assert all(f in result.stderr for f in fragments), (fragments, result.stderr)
  assert "Traceback" not in result.stdout + result.stderr, result.stdout[-2000:]
  for path in map(pathlib.Path, outputs):
    assert not path.exists() and not list(path.parent.glob(f".{path.name}*")), path


def raises_one_line_error(match: str, fn, *args, **kwargs) -> str:
  """fn(*args, **kwargs) raises UserError with a one-line message that `match` (a regex) searches; the message."""
  from llama_hk.errors import UserError

  try:
    fn(*args, **kwargs)
  except UserError as e:
    message = str(e)
  else:
    raise AssertionError(f"{getattr(fn, '__name__', fn)} raised no UserError")
  assert "\n" not in message and re.search(match, message), message
  return message


def train_command(model_dir, args, **bindings) -> list[str]:
  """bin/train on `model_dir` with flags `args` and gin macro `bindings` (the session's compilation cache)."""
  return ([sys.executable, "bin/train", f"--model_dir={model_dir}"] + list(args)
          + [f"--gin.{key}={value}" for key, value in bindings.items()])


def run_train(model_dir, args, env=None, **bindings) -> subprocess.CompletedProcess:
  [result] = run_children([(train_command(model_dir, args, **bindings), env)], timeout=300)
  return result


def metrics(model_dir) -> list[dict]:
  return [json.loads(line) for line in (pathlib.Path(model_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(model_dir) -> list[tuple[int, float, float, float]]:
  return [(m["step"], m["loss"], m["grad_norm"], m["learning_rate"]) for m in metrics(model_dir) if "loss" in m]


def _has_checkpoint(model_dir: pathlib.Path, step: int) -> bool:
  """Whether the model_dir holds checkpoint `step` or a later one (Orbax renames a checkpoint into place whole)."""
  written = (model_dir / checkpoints.TRAINING_CHECKPOINTS_DIR).is_dir() and checkpoints.latest_step(model_dir)
  return bool(written) and written >= step


def kill_after_checkpoint(command, model_dir: pathlib.Path, step: int, timeout: float = 240) -> None:
  """Runs a bin/train command and SIGKILLs it as soon as the project sees checkpoint `step` written in full."""
  process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + timeout
    while process.poll() is None and not _has_checkpoint(model_dir, step):
      assert time.monotonic() < deadline, f"no checkpoint {step} in {model_dir} after {timeout} s"
      time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
  finally:
    process.kill()
    process.wait()
