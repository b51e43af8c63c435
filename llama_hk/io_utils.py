"""Atomic outputs: files and directories are written under a temporary name and renamed only on success, so a
failure (or a reader racing the writer) never sees a half-written one."""

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Iterator

from llama_hk.errors import UserError


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling path of `path`; it replaces `path` when the block succeeds, else is removed."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  tmp = pathlib.Path(tmp)
  try:
    yield tmp
    tmp.chmod(0o644)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def check_output_dir(path: str | os.PathLike) -> None:
  """Fails early (before any reading) when `path` would not be a fresh output directory."""
  path = pathlib.Path(path)
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise UserError(f"{path}: already exists and is not an empty directory")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a fresh temporary sibling directory of `path`; it is renamed to `path` (which may be an empty
  directory, check_output_dir) when the block succeeds, else removed."""
  path = pathlib.Path(path)
  check_output_dir(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
  try:
    yield tmp
    tmp.chmod(0o755)
    os.replace(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  with atomic_file(path) as tmp:
    tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, value) -> None:
  write_text_atomic(path, json.dumps(value, indent=2) + "\n")
