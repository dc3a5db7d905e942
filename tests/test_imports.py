"""The package's imports: no cycle among its modules (imports inside functions count), and
`load_model`'s modules free of TensorFlow."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'secvit_jax'


def _module_files() -> dict[str, pathlib.Path]:
  """'secvit_jax.tasks.base' -> its file, for every module of the package."""
  modules = {}
  for path in PACKAGE.rglob('*.py'):
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    modules['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return modules


def _imported_modules(name: str, path: pathlib.Path, modules: set[str]) -> set[str]:
  """The package's modules that module `name` imports anywhere (top level, functions, classes,
  TYPE_CHECKING blocks): `from P import x` counts as P.x where that is a module, else as P."""
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      for alias in node.names:
        found.add(f'{base}.{alias.name}' if f'{base}.{alias.name}' in modules else base)
  return {module for module in found if module in modules and module != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle of `graph` as the list of its modules (the first repeated at the end), or None."""
  state = {}  # 1: on the current path, 2: done.
  path = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for successor in sorted(graph[node]):
      if state.get(successor) == 1:
        return path[path.index(successor):] + [successor]
      if successor not in state:
        found = visit(successor)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_cycle_finder_finds_a_cycle():
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) is None


def test_the_package_has_no_import_cycle():
  files = _module_files()
  graph = {name: _imported_modules(name, path, set(files)) for name, path in files.items()}
  assert {'secvit_jax.tasks.detection', 'secvit_jax.checkpoints'} <= graph['secvit_jax.tasks']
  assert 'secvit_jax.data.segmentation' in graph['secvit_jax.tasks.segmentation']  # In methods.
  cycle = _cycle(graph)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_checkpoints_import_no_task_and_the_tasks_no_tensorflow():
  files = _module_files()
  assert not {name for name in _imported_modules('secvit_jax.checkpoints',
                                                 files['secvit_jax.checkpoints'], set(files))
              if name.startswith('secvit_jax.tasks')}
  code = ('import sys, secvit_jax.tasks; '
          'print(sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"))')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True, timeout=300)
  assert result.stdout.strip() == '[]'
