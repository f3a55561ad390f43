"""The top-level modules import each other without cycles (lazy imports inside functions count),
and importing any of them does no work."""
import ast
import glob
import os
import subprocess
import sys

import pytest

from conftest import ROOT

MODULES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, '*.py')))


def local_imports(name: str) -> set:
    """The top-level modules that module `name` imports anywhere in its source."""
    tree = ast.parse(open(os.path.join(ROOT, name + '.py'), encoding='utf-8').read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split('.')[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split('.')[0])
    return found & set(MODULES) - {name}


def test_no_import_cycles():
    graph = {m: local_imports(m) for m in MODULES}
    assert graph['evaluation'] and graph['report']  # the walk sees imports at all
    state = {}

    def visit(m, path):
        if state.get(m) == 'done':
            return
        assert state.get(m) != 'open', 'import cycle: ' + ' -> '.join(path + [m])
        state[m] = 'open'
        for dep in sorted(graph[m]):
            visit(dep, path + [m])
        state[m] = 'done'

    for m in MODULES:
        visit(m, [])


@pytest.mark.slow
def test_importing_every_module_does_no_work(tmp_path):
    """No output, no files written, in a fresh interpreter started in an empty folder."""
    code = f'import sys; sys.path.insert(0, {ROOT!r}); ' + '; '.join(f'import {m}' for m in MODULES)
    result = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == '' and result.stderr == ''
    assert os.listdir(tmp_path) == []
