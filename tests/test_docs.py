"""The repository stands on its own: the README is a front door to docs/, every page and figure
it points to is in the repository, no documented command writes into the checkout, and the
requirements files say what pyproject.toml says."""

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))
SOURCES = ([README] + sorted((REPO / "hn_jax").rglob("*.py"))
           + sorted((REPO / "configs").glob("*.py")) + PAGES)

# Flags and redirections by which a documented command writes a file or a folder.
_OUTPUT = re.compile(r"(?:--(?:out|output|figures|plot|json|sheet|workdir|root|data_dir|cache_dir)"
                     r"(?:=|\s+)|\s>>?\s*)(['\"]?)([^\s'\"`|;)]+)\1")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _commands(text: str) -> list[str]:
  """The commands of a page: the lines of its code blocks, and its inline code spans."""
  blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
  lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
  outside = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
  return lines + re.findall(r"`([^`\n]+)`", outside)


def _writes_into_checkout(command: str) -> list[str]:
  """The outputs of `command` that land in a folder or file of the repository."""
  bad = []
  for _, path in _OUTPUT.findall(" " + command):
    if re.match(r"[/$~]|gs://|[A-Z_]+$|FILE|DIR", path):  # absolute, a variable, a placeholder
      continue
    top = Path(path).parts[0] if Path(path).parts else "."
    if path.startswith(".") or (REPO / path).exists() or (REPO / top).is_dir():
      bad.append(path)
  return bad


def test_every_docs_path_named_in_the_repository_exists():
  named = {}
  for source in SOURCES:
    for path in re.findall(r"docs/[\w./-]+\.(?:md|png)", source.read_text()):
      named.setdefault(path, source.relative_to(REPO))
  assert "docs/protocol.md" in named and "docs/datasets.md" in named
  missing = {p: str(s) for p, s in named.items() if not (REPO / p).is_file()}
  assert not missing, f"named but not in the repository: {missing}"


def test_every_link_of_the_readme_and_docs_resolves():
  broken = []
  for page in [README] + PAGES:
    for target in _LINK.findall(page.read_text()):
      if re.match(r"[a-z]+://|#|mailto:", target):
        continue
      if not (page.parent / target.split("#")[0]).exists():
        broken.append(f"{page.relative_to(REPO)}: {target}")
  assert not broken, broken


def test_the_readme_links_every_docs_page():
  linked = set(_LINK.findall(README.read_text()))
  orphans = [p.name for p in PAGES if f"docs/{p.name}" not in linked]
  assert not orphans, f"docs pages the README does not link: {orphans}"


def test_the_readme_is_a_front_door():
  """Short, with the set-up, the main job and the tests before any result."""
  lines = README.read_text().splitlines()
  assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail to docs/"
  first = "\n".join(lines[:80])
  for command in ("pip install -r requirements.txt -e .",
                  "python -m hn_jax.main --config=configs/digits.py",
                  "python -m hn_jax.main --config=configs/cub.py",
                  "pip install -r requirements-test.txt",
                  "python -m pytest -q -n 2 --dist loadfile",
                  'python -m pytest -q -n 2 -m "not slow"'):
    assert command in first, f"not in README.md's first 80 lines: {command}"
  text = "\n".join(lines)
  assert text.index("pip install -r requirements.txt") < text.index("## Results")


@pytest.mark.parametrize("command, bad", [
    ("python -m hn_jax.tools.reproduce --root=/tmp/t --figures=docs/synthetic", ["docs/synthetic"]),
    ("python -m hn_jax.tools.report /tmp/s --plot docs/digits_sweep.png", ["docs/digits_sweep.png"]),
    ("python -m hn_jax.tools.analysis gradient_field --out='configs/x.png'", ["configs/x.png"]),
    ("python -m hn_jax.main --config=configs/digits.py --workdir=./run", ["./run"]),
    ("python -m hn_jax.tools.report runs > README.md", ["README.md"]),
    ("python -m hn_jax.main --config=configs/digits.py --workdir=/tmp/hn_digits", []),
    ("python -m hn_jax.tools.embed --workdir=$WORKDIR --out=~/x.npz --json=FILE.json", []),
])
def test_the_checker_of_outputs_finds_writes_into_the_checkout(command, bad):
  assert _writes_into_checkout(command) == bad


def test_no_documented_command_writes_into_the_checkout():
  bad = [f"{page.relative_to(REPO)}: {command.strip()}" for page in [README] + PAGES
         for command in _commands(page.read_text()) if _writes_into_checkout(command)]
  assert not bad, f"commands that write into tracked paths (write under /tmp instead): {bad}"


def _pins(path: Path) -> list[str]:
  lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
  return [line for line in lines if line]


def test_requirements_files_pin_exactly_what_pyproject_declares():
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  extras = project["optional-dependencies"]
  main = _pins(REPO / "requirements.txt")
  assert main == project["dependencies"]
  assert all(re.fullmatch(r"[\w.\-]+==[\w.]+", pin) for pin in main), main
  test = _pins(REPO / "requirements-test.txt")
  assert test[0] == "-r requirements.txt"
  own = [e for e in extras["test"] if not e.startswith("hn_jax[")]
  assert sorted(test[1:]) == sorted(own + extras["torch"] + extras["preflight"])
  assert "hn_jax[torch,preflight]" in extras["test"]
  # The main job installs no accelerator runtime, no torch and no test tool.
  assert not [p for p in main if re.match(r"(torch|libtpu|jax-cuda|pytest|execnet)", p)], main
  # The accelerator extras keep the pinned JAX.
  jax = next(p for p in main if p.startswith("jax=="))
  assert extras["cuda12"] == [jax.replace("jax==", "jax[cuda12]==")]
  assert extras["tpu"][0] == jax.replace("jax==", "jax[tpu]==")
  assert set(extras["tpu"][1:]) <= set(extras["preflight"])


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
