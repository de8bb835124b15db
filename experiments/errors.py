"""Errors a user can fix, reported by `experiments.main` as one line and exit status 2."""


class UserError(Exception):
  """A problem the user can fix (settings, data, workdir, disk space): reported as one message."""
