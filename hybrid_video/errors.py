"""User-facing errors: main.py prints their message as one line and exits non-zero."""


class UserError(ValueError):
  """Bad input from the user (config, flags, data, workdir). Shown without a traceback."""


class CheckpointError(UserError):
  """A checkpoint that cannot be used: unreadable, or written by an incompatible config."""


class NonFiniteLossError(UserError):
  """Training produced a NaN or infinite loss."""
