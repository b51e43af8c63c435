"""The one exception type for bad user input."""


class UserError(ValueError):
  """Bad user input: the message is one line naming the file or flag and the fault."""
