"""Errors raised by the data package (kept dependency-free so importing is cheap)."""


class DataError(ValueError):
  """A dataset cannot be built or read: bad folder, no usable input, bad settings."""
