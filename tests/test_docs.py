"""The repository stands on its own: every document and figure it points to is in it."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ([REPO / "README.md"] + sorted((REPO / "hn_jax").rglob("*.py"))
           + sorted((REPO / "configs").glob("*.py")) + sorted((REPO / "docs").glob("*.md")))


def test_every_docs_path_named_in_the_repository_exists():
  named = {}
  for source in SOURCES:
    for path in re.findall(r"docs/[\w./-]+\.(?:md|png)", source.read_text()):
      named.setdefault(path, source.relative_to(REPO))
  assert "docs/protocol.md" in named and "docs/datasets.md" in named
  missing = {p: str(s) for p, s in named.items() if not (REPO / p).is_file()}
  assert not missing, f"named but not in the repository: {missing}"


def test_no_pointer_to_notes_outside_the_repository():
  """The release's PROTOCOL / DATASETS notes are not shipped; docs/ replaces them."""
  stale = [f"{s.relative_to(REPO)}: {line.strip()}" for s in SOURCES
           for line in s.read_text().splitlines()
           if re.search(r"\bPROTOCOL(\.md| section)|\bDATASETS\.md", line)]
  assert not stale, stale


def test_the_settings_page_is_current_and_lists_every_setting():
  """docs/settings.md, where --help and the errors send users, is run_config.defaults()'s
  source as `python -m hn_jax.settings_doc --write` renders it (run that after a change)."""
  from hn_jax import run_config, settings_doc  # pylint: disable=import-outside-toplevel
  listed = settings_doc.settings()
  assert sorted(name for _, name, _, _ in listed) == sorted(run_config.defaults().keys())
  assert all(comment for _, _, _, comment in listed), "every setting has its comment"
  assert (REPO / "docs" / "settings.md").read_text() == settings_doc.markdown(), (
      "docs/settings.md is stale: python -m hn_jax.settings_doc --write")
