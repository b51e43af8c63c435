"""Outputs are written to a temporary path and renamed, so a failure never leaves a half-written file."""

import json
import os
import pathlib
import tempfile


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def write_json_atomic(path: str | os.PathLike, value) -> None:
  write_text_atomic(path, json.dumps(value, indent=2) + "\n")
