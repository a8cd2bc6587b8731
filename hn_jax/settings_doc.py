"""docs/settings.md: every setting of a run, its default and its comment, from the source.

`run_config.defaults()` is where the settings live, each with a comment on its line or on
the lines above it; this renders that function's source as the page that `--help` and the
commands' errors point to. `python -m hn_jax.settings_doc` prints the page, `--write` writes
it to docs/settings.md of the checkout (tests/test_docs.py checks that the page is current).
"""

from __future__ import annotations

import ast
import inspect
import io
import re
import sys
import textwrap
import tokenize
from pathlib import Path
from typing import Sequence

from hn_jax import run_config

PAGE = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
# A comment line alone that names a group of settings: "# Data.", "# Evaluation and bookkeeping."
_SECTION = re.compile(r"^[A-Z][A-Za-z ]{0,40}\.$")

_HEAD = """\
# Settings

Every setting of a run, with its default, as `hn_jax.run_config.defaults()` defines them
(this page is generated from that function: `python -m hn_jax.settings_doc --write`). The files
in `configs/` start from these defaults and change what differs (`configs/digits.py`,
`configs/cub.py`, ...; `configs/default.py` is the defaults alone). Any setting can be changed
on the command line: `python -m hn_jax.main --config=configs/digits.py --workdir=DIR
--config.loss=shn --config.seed=3`. On a resumed run only the settings in
`hn_jax/run_config.py`'s `CHANGEABLE` may change ({changeable}). What the settings reproduce is
in [protocol.md](protocol.md); the datasets' layouts in [datasets.md](datasets.md).
"""


def settings() -> list[tuple[str, str, str, str]]:
  """(section, name, default as written in the source, comment) for each setting, in order."""
  source = textwrap.dedent(inspect.getsource(run_config.defaults))
  lines = source.splitlines()
  comments: dict[int, str] = {}  # line number (1-based) -> its comment's text
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      comments[token.start[0]] = token.string.lstrip("#").strip()
  out, section = [], ""
  body = ast.parse(source).body[0].body
  for node in body:
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Attribute)
            and isinstance(node.targets[0].value, ast.Name)
            and node.targets[0].value.id == "config"):
      continue
    above, line = [], node.lineno - 1
    while line >= 1 and lines[line - 1].strip().startswith("#"):
      above.insert(0, comments[line])
      line -= 1
    headers = [i for i, text in enumerate(above) if _SECTION.match(text)]
    if headers:
      section = above[headers[-1]].rstrip(".")
      above = above[headers[-1] + 1:]
    own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
    default = ast.get_source_segment(source, node.value)
    out.append((section, node.targets[0].attr, " ".join(default.split()), " ".join(above + own)))
  return out


def markdown() -> str:
  """The page."""
  page = [_HEAD.format(changeable=", ".join(f"`{k}`" for k in sorted(run_config.CHANGEABLE)
                                            if k in run_config.defaults()))]
  section = None
  for where, name, default, comment in settings():
    if where != section:
      section = where
      page.append(f"\n## {section or 'Settings'}\n\n| Setting | Default | Meaning |\n|---|---|---|")
    cell = comment.replace("|", "\\|").replace("<", "&lt;")
    page.append(f"| `{name}` | `{default}` | {cell} |")
  return "\n".join(page) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv == ["--write"]:
    PAGE.write_text(markdown())
    print(f"hn_jax.settings_doc: wrote {PAGE}", file=sys.stderr)
  elif not argv:
    sys.stdout.write(markdown())
  else:
    print("usage: python -m hn_jax.settings_doc [--write]", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
