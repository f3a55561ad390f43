"""A training run killed outright (SIGKILL: no handler runs) loses nothing: every checkpoint on
disk loads, and resuming from the last one ends with the same weights, bit for bit, as a run that
was never killed."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from test_train import SMALL, toy  # noqa: F401 (the fixture)

EPOCHS = ['--num_epochs', '3', '--val_step', '1000']
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}  # tiny model: one thread is faster on a shared CPU


def argv(toy, out, *extra):
    root, common = toy
    return [sys.executable, os.path.join(ROOT, 'train.py'), *common, *SMALL, *EPOCHS,
            '--logger_name', str(out / 'log'), '--model_name', str(out), *extra]


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.mark.slow
def test_sigkill_loses_nothing_and_the_resumed_run_is_bit_identical(toy):  # noqa: F811
    root, _ = toy
    straight = root / 'never_killed'
    subprocess.run(argv(toy, straight), check=True, capture_output=True, env=ENV)
    killed = root / 'killed'
    proc = subprocess.Popen(argv(toy, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while not (killed / 'checkpoint_0.pth.tar').exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpts = sorted(glob.glob(str(killed / 'checkpoint_*.pth.tar')))
    assert ckpts and not (killed / 'checkpoint_2.pth.tar').exists()  # killed mid-run
    for path in ckpts + [str(killed / 'model_best.pth.tar')]:
        assert set(load(path)) >= {'model', 'optimizers', 'epoch', 'vocab'}  # every file on disk is whole
    # The lock died with the process: resuming into the same folder is allowed at once.
    subprocess.run(argv(toy, killed, '--resume', ckpts[-1]), check=True, capture_output=True, env=ENV)
    a, b = load(straight / 'checkpoint_2.pth.tar'), load(killed / 'checkpoint_2.pth.tar')
    assert a['Eiters'] == b['Eiters'] == 60 and a['best_rsum'] == b['best_rsum']
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    for opt_a, opt_b in zip(a['optimizers'], b['optimizers']):
        for state_a, state_b in zip(opt_a['state'].values(), opt_b['state'].values()):
            assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
