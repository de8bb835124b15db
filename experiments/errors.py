"""The one exception the experiments layer reports to the user as a single line (exit 2)."""


class UserError(Exception):
  """A problem the user can fix (settings, data, workdir): reported as one message."""
