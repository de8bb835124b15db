"""Entry points: the only code that reads flags or writes files."""
