"""The layering rules of the README's "Layout" section, checked on the source (ast), not by
importing: no import cycles, no library -> driver import, leaves stay leaves, and no
function-local import of a project module (main.py's dispatch excepted)."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("hybrid_video", "kernels", "data", "configs")
DRIVERS = "hybrid_video.modes"


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, str]:
  out = {}
  for package in PACKAGES:
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(dirpath, f)
          out[_module_name(path)] = path
  return out


def _resolve(name: str, modules: dict) -> str | None:
  """The project module an import names (a module, or the package of an imported symbol)."""
  while name:
    if name in modules:
      return name
    name = name.rpartition(".")[0]
  return None


def imports(path: str, modules: dict) -> list[tuple[str, bool]]:
  """[(project module, imported inside a function?)] of one file."""
  tree = ast.parse(open(path).read(), path)
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      names = []
      if isinstance(child, ast.Import):
        names = [a.name for a in child.names]
      elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
        names = [f"{child.module}.{a.name}" for a in child.names]
      for n in names:
        target = _resolve(n, modules)
        if target is not None:
          found.append((target, in_function))
      visit(child, nested)

  visit(tree, False)
  return found


def graph() -> dict[str, set[str]]:
  modules = _modules()
  return {m: {t for t, _ in imports(p, modules) if t != m} for m, p in modules.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def dfs(m):
    state[m] = 1
    stack.append(m)
    for n in sorted(g.get(m, ())):
      if state.get(n) == 1:
        return stack[stack.index(n):] + [n]
      if n not in state:
        cycle = dfs(n)
        if cycle:
          return cycle
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(g):
    if m not in state:
      cycle = dfs(m)
      if cycle:
        return cycle
  return None


def test_find_cycle_detects_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
  assert find_cycle(graph()) is None, f"import cycle: {' -> '.join(find_cycle(graph()))}"


def _is_driver(m: str) -> bool:
  return m == DRIVERS or m.startswith(DRIVERS + ".")


def test_library_never_imports_a_driver():
  bad = [(m, t) for m, targets in graph().items() if not _is_driver(m)
         for t in targets if _is_driver(t)]
  assert not bad, f"library -> driver imports: {bad}"


def test_leaves_stay_leaves():
  """kernels/ imports nothing of the project but kernels; data/ nothing of hybrid_video."""
  bad = []
  for m, targets in graph().items():
    for t in targets:
      if m.startswith("kernels") and not t.startswith("kernels"):
        bad.append((m, t))
      if m.startswith("data") and t.startswith(("hybrid_video", "kernels")):
        bad.append((m, t))
  assert not bad, f"leaf packages import upward: {bad}"


def test_no_function_local_project_imports():
  modules = _modules()
  bad = [(m, t) for m, p in modules.items() for t, local in imports(p, modules) if local]
  assert not bad, f"function-local imports of project modules: {bad}"


def test_checker_sees_a_planted_violation(tmp_path):
  """The ast walk finds a function-local import and a library -> driver import."""
  path = tmp_path / "planted.py"
  path.write_text("import os\n\ndef f():\n  from hybrid_video.modes import train\n")
  found = imports(str(path), _modules())
  assert ("hybrid_video.modes.train", True) in found
