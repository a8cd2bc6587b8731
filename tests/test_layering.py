"""The data layer imports one way: no module of hn_jax/data/ imports (at its top or inside a
function) one that imports it back, directly or through others."""

import ast
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "hn_jax" / "data"


def _imports(path: Path) -> set[str]:
  """The hn_jax.data modules `path` imports anywhere in it."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "hn_jax.data":
        found |= {f"hn_jax.data.{a.name}" for a in node.names}
      elif node.module.startswith("hn_jax.data."):
        found.add(node.module)
    elif isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("hn_jax.data.")}
  return found


def _name(path: Path) -> str:
  parts = path.relative_to(DATA.parents[1]).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_data_layer_has_no_import_cycle():
  graph = {_name(p): _imports(p) for p in DATA.rglob("*.py")}
  # A package's modules may be reached through it: hn_jax.data.tfds_builders.cub -> package.
  state = {}

  def visit(node, path):
    if state.get(node) == "done":
      return
    assert state.get(node) != "open", " -> ".join([*path, node])
    state[node] = "open"
    for nxt in sorted(graph.get(node, ())):
      if nxt in graph and not node.startswith(nxt + "."):  # a module may import its package
        visit(nxt, [*path, node])
    state[node] = "done"

  for node in sorted(graph):
    visit(node, [])
