"""The one exception type for bad user input, and the one way to quote another exception in a one-line message."""


class UserError(ValueError):
  """Bad user input: the message is one line naming the file or flag and the fault."""


def first_line(exc: BaseException | str, limit: int | None = 200) -> str:
  """The first line of an exception's message, at most `limit` characters (None: all; "" when it is empty).

  Library errors (Orbax, torch, gguf, sentencepiece) can span pages; a UserError quotes only their first line.
  """
  lines = str(exc).strip().splitlines()
  return lines[0][:limit] if lines else ""
