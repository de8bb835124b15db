"""Progress bars on stderr that read well both on a terminal and in a log file.

On a terminal: tqdm's live bar. When stderr is not a terminal (a log file, CI, `nohup`): one
plain line per update, at most every `LOG_INTERVAL_S` seconds (none for a bar that ends
sooner), instead of carriage-return redraws that a log shows as one unreadable line.
"""

import sys

import tqdm

LOG_INTERVAL_S = 30.0


class _Lines:
  """A file for tqdm that turns each redraw into one line."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, s: str) -> None:
    s = s.replace("\r", "").replace("\x1b[A", "").strip()
    if s:
      self._stream.write(s + "\n")

  def flush(self) -> None:
    self._stream.flush()


def bar(
  total: int, *, desc: str, unit: str, disable: bool = False, leave: bool = True, initial: int = 0
):
  """A tqdm bar on stderr (a live bar on a terminal, plain lines otherwise), from `initial`."""
  stream = sys.stderr
  if disable or stream is None:
    return tqdm.tqdm(total=total, disable=True)
  if stream.isatty():
    return tqdm.tqdm(
      total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=leave,
      delay=0 if leave else 1, initial=initial,
    )  # fmt: skip
  return tqdm.tqdm(
    total=total,
    desc=desc,
    unit=unit,
    file=_Lines(stream),
    initial=initial,
    mininterval=LOG_INTERVAL_S,
    delay=LOG_INTERVAL_S,  # a stage shorter than that leaves no line
    ascii=True,
    ncols=100,
  )
