"""What a user sees of the scripts without reading the code: --help, and ./test.sh's report.

Every script's --help stands on its own: it exits 0, shows usage and the description, and names
nothing outside the repository (no ../shared path, no section of a spec a clone does not hold).
"""
import os
import re
import runpy
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPTS = ('vocab.py', 'labels.py', 'data.py', 'toy.py', 'train.py', 'evaluation.py', 'bench.py', 'features.py',
           'search.py', 'report.py')
OUTSIDE = re.compile(r'\.\./shared|shared/data|CASC_SPEC|\bspec\b|section \d', re.IGNORECASE)


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_exits_0_with_usage_and_names_nothing_outside_the_repository(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', [script, '--help'])
    with pytest.raises(SystemExit) as e:  # run as `python SCRIPT --help` is, in this process (one torch import)
        runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
    out, err = capsys.readouterr()
    assert e.value.code in (0, None) and err == '', err
    assert out.startswith(f'usage: {script} ') and '--help' in out, out[:200]
    assert not OUTSIDE.findall(out), OUTSIDE.findall(out)


def test_outside_pattern_catches_what_it_is_for():
    hits = ['(spec section 1)', 'when ../shared holds them', 'CASC_SPEC section 8', 'see the spec']
    assert all(OUTSIDE.search(text) for text in hits)
    assert not OUTSIDE.search("the layout in the README's Real data section; shared by N processes")


@pytest.mark.slow  # install.sh's pip check takes seconds
def test_test_sh_prints_skip_reasons(tmp_path):
    test = tmp_path / 'test_skipping.py'
    test.write_text('import pytest\n\ndef test_x():\n    pytest.skip("no such folder here, for a reason")\n')
    run = subprocess.run(['bash', os.path.join(ROOT, 'test.sh'), '-p', 'no:cacheprovider', str(test)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert 'SKIPPED [1]' in run.stdout and 'no such folder here, for a reason' in run.stdout, run.stdout
