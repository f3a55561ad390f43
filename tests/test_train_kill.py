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

from conftest import ROOT, load_checkpoint, train_argv

EPOCHS = ['--num_epochs', '3', '--val_step', '1000']
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}  # tiny model: one thread is faster on a shared CPU


def argv(toy, out, *extra):
    return [sys.executable, os.path.join(ROOT, 'train.py'), *train_argv(toy, out, *EPOCHS, *extra)]


@pytest.mark.slow
def test_sigkill_loses_nothing_and_the_resumed_run_is_bit_identical(toy, tmp_path):
    straight = tmp_path / 'never_killed'
    subprocess.run(argv(toy, straight), check=True, capture_output=True, env=ENV)
    killed = tmp_path / 'killed'
    proc = subprocess.Popen(argv(toy, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    log = killed / 'log' / 'train.log'  # killed mid-epoch 1, after it logged (and maybe flushed) curve points
    while not (log.exists() and 'epoch 1 iter 30 ' in log.read_text()) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpts = sorted(glob.glob(str(killed / 'checkpoint_*.pth.tar')))
    assert ckpts and not (killed / 'checkpoint_2.pth.tar').exists()  # killed mid-run
    for path in ckpts + [str(killed / 'model_best.pth.tar')]:
        assert set(load_checkpoint(path)) >= {'model', 'optimizers', 'epoch', 'vocab'}  # every file on disk is whole
    # A kill in the middle of a checkpoint write leaves its temporary file: the next run removes it.
    leftover = killed / f'checkpoint_1.pth.tar.tmp{proc.pid}'
    leftover.write_bytes(b'half a checkpoint')
    # The lock died with the process: resuming into the same folder is allowed at once.
    subprocess.run(argv(toy, killed, '--resume', ckpts[-1]), check=True, capture_output=True, env=ENV)
    assert not leftover.exists() and not glob.glob(str(killed / '*.tmp*'))
    assert f'removed the half-written temporary files of a killed run: {leftover}' in (killed / 'log' / 'train.log').read_text()
    a, b = load_checkpoint(straight / 'checkpoint_2.pth.tar'), load_checkpoint(killed / 'checkpoint_2.pth.tar')
    assert a['Eiters'] == b['Eiters'] == 60 and a['best_rsum'] == b['best_rsum']
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    # The TensorBoard curves of the killed-and-resumed run are the uninterrupted run's: the points
    # the killed run logged after its last checkpoint were dropped, none is doubled or missing.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    curves = []
    for run in (straight, killed):
        events = EventAccumulator(str(run / 'log'))
        events.Reload()
        curves.append({tag: [(e.step, e.value) for e in events.Scalars(tag)]
                       for tag in ('train/loss', 'val/rsum')})
    assert [step for step, _ in curves[0]['train/loss']] == list(range(5, 61, 5))
    assert curves[1] == curves[0]
    for opt_a, opt_b in zip(a['optimizers'], b['optimizers']):
        for state_a, state_b in zip(opt_a['state'].values(), opt_b['state'].values()):
            assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
