"""What the absl command lines share: --help exits 0, a flag mistake is one line."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import flags

HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "--helpfull", "--helpxml", "-?")


def wants_help(argv: Sequence[str]) -> bool:
  return any(a.split("=", 1)[0] in HELP_FLAGS for a in argv[1:])


def exit_if_help(argv: Sequence[str]) -> None:
  """On --help and friends: absl's usage, then exit with status 0 (absl's own exit is 1)."""
  if wants_help(argv):
    try:
      flags.FLAGS(list(argv))
    except SystemExit:
      pass
    sys.exit(0)


def flags_parser(prog: str) -> Callable[[Sequence[str]], list[str]]:
  """An `app.run(flags_parser=...)`: usage on --help (status 0), `PROG: error: ...` otherwise."""

  def parse(argv: Sequence[str]) -> list[str]:
    exit_if_help(argv)
    try:
      rest = flags.FLAGS(list(argv))
    except flags.Error as e:
      sys.exit(f"{prog}: error: {str(e).splitlines()[0]}")
    if len(rest) > 1:
      sys.exit(f"{prog}: error: unexpected arguments: {' '.join(rest[1:])}")
    return rest

  return parse
