"""train.py's safety guarantees (issue 8) on tiny toy data: the folder lock, never replacing an
earlier run behind the user's back, checks before any data is loaded, safe checkpoint reads,
checked flags and caption files, Ctrl-C, and progress lines off a terminal. Real files, real
processes, real torch.load."""
import argparse
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings

import pytest
import torch

import train
import util
import vocab
from conftest import ROOT, load_checkpoint, one_line_error, toy_world
from test_util import full_disk  # noqa: F401  (a fixture: a real 64 KB file system)

TRAINING_FIXTURES = {'earlier'}  # fixtures that train a model: their tests are slow (conftest)

SIZES = {'train': 40, 'dev': 20, 'test': 10, 'testall': 10}  # 200 training captions: 4 batches of 50
SMALL = ['--img_dim', '64', '--embed_size', '32', '--word_dim', '16', '--num_labels', '20',
         '--label_hidden', '16', '--batch_size', '50', '--workers', '0', '--log_step', '5', '--val_step', '1000']
# One thread: on a loaded shared CPU, OpenMP threads spinning at barriers make this tiny model ~100x slower.
ENV = dict(os.environ, OMP_NUM_THREADS='1')
HOST = socket.gethostname()


class Toy:
    def __init__(self, root):
        self.root = root
        self.data = root / 'data'
        self.vocab_path = root / 'vocab'
        self.vocab_file = self.vocab_path / 'toy_precomp_vocab.json'
        self.bad = {}  # kind -> data folder whose train_caps.txt has a bad line 7

    def argv(self, out, *extra, logger=None, data_path=None):
        """train.py arguments writing checkpoints to `out` and logs to `logger` (default out/log)."""
        return (['--data_path', str(data_path or self.data), '--data_name', 'toy_precomp',
                 '--vocab_path', str(self.vocab_path)] + SMALL
                + ['--model_name', str(out), '--logger_name', str(logger or out / 'log')] + [str(e) for e in extra])

    def caps(self, kind):
        return self.bad[kind] / 'toy_precomp' / 'train_caps.txt'


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """Toy data, its vocabulary and labels, and two copies whose train_caps.txt line 7 is broken."""
    root = tmp_path_factory.mktemp('safety')
    t = Toy(root)
    toy_world(t.data, t.vocab_path, sizes=SIZES)
    for kind, line in (('utf8', b'\xff\xfe bad\n'), ('long', b'a' * 100_000 + b'\n')):
        t.bad[kind] = root / f'bad_{kind}'
        shutil.copytree(t.data, t.bad[kind])
        lines = t.caps(kind).read_bytes().splitlines(keepends=True)
        lines[6] = line
        t.caps(kind).write_bytes(b''.join(lines))
    return t


@pytest.fixture(scope='module')
def earlier(toy):
    """An earlier 2-epoch run: checkpoint_0, checkpoint_1, model_best in it, train.log and events in it/log.
    Tests that change it work on a copy (see copy_run)."""
    out = toy.root / 'earlier'
    train.main(toy.argv(out, '--num_epochs', 2))
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def refused(argv) -> str:
    """train.main(argv) must stop with one line: -> that line."""
    return one_line_error(train.main, argv)


def snapshot(folder) -> dict:
    """Every file under folder but the lock files -> its bytes."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if name != '.lock':
                path = os.path.join(dirpath, name)
                out[os.path.relpath(path, folder)] = open(path, 'rb').read()
    return out


def all_files(folder) -> list:
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names)


def checkpoints(folder) -> list:
    """checkpoint_N.pth.tar paths in epoch order."""
    names = [n for n in os.listdir(folder) if re.fullmatch(r'checkpoint_\d+\.pth\.tar', n)]
    return [os.path.join(folder, n) for n in sorted(names, key=lambda n: int(n[11:-8]))]


# ---------------------------------------------------------------------------------------------
# 1. The folder lock


class Holder:
    """A real process holding `folder` with util.FolderLock until killed."""

    def __init__(self, folder, flag):
        code = ('import sys, time; sys.path.insert(0, sys.argv[1]); import util; '
                'util.FolderLock(sys.argv[2], sys.argv[3]).__enter__(); print("held", flush=True); time.sleep(60)')
        self.proc = subprocess.Popen([sys.executable, '-c', code, ROOT, str(folder), flag],
                                     stdout=subprocess.PIPE, text=True, env=ENV)
        assert self.proc.stdout.readline().strip() == 'held'
        self.pid = self.proc.pid

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)  # no clean-up at all: only the OS can release the lock
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


@pytest.fixture
def holders():
    started = []
    yield lambda folder, flag: started.append(Holder(folder, flag)) or started[-1]
    for h in started:
        if h.proc.poll() is None:
            h.kill()


@pytest.mark.slow
def test_a_held_model_folder_is_refused_naming_the_holder_and_freed_when_it_is_killed(toy, tmp_path, holders):
    out = tmp_path / 'run'
    holder = holders(out, '--model_name')
    lock_text = (out / '.lock').read_text()
    assert lock_text.startswith(f'pid {holder.pid} on {HOST} since ') and lock_text.endswith('(-c)')
    argv = toy.argv(out, '--num_epochs', 1, logger=out)  # logs in the same folder: one lock
    msg = refused(argv)
    assert msg.startswith(f'error: --model_name {out} is in use by pid {holder.pid} on {HOST} since '), msg
    assert msg.endswith(': wait for that run to end or choose another --model_name'), msg
    assert os.listdir(out) == ['.lock'] and (out / '.lock').read_text() == lock_text  # nothing written there
    holder.kill()
    state = train.main(argv)  # the OS released the dead holder's lock
    assert state['epoch'] == 0 and load_checkpoint(out / 'checkpoint_0.pth.tar')['epoch'] == 1
    assert 'epoch 0 done' in (out / 'train.log').read_text()


def test_a_held_logger_folder_is_refused_too(toy, tmp_path, holders):
    out, logs = tmp_path / 'run', tmp_path / 'logs'
    holder = holders(logs, '--logger_name')
    msg = refused(toy.argv(out, '--num_epochs', 1, logger=logs))
    assert msg.startswith(f'error: --logger_name {logs} is in use by pid {holder.pid} on {HOST} since '), msg
    assert msg.endswith(': wait for that run to end or choose another --logger_name'), msg
    assert all_files(out) == ['.lock'] and all_files(logs) == ['.lock']


def start_train(argv, stderr=subprocess.PIPE, **env):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py')] + argv, cwd=ROOT,
                            env=dict(ENV, **env), stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                            start_new_session=True)


def wait_for(cond, proc, what, timeout=120, poll=0.02):
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f'train.py ended (exit {proc.returncode}) before {what}')
        if time.monotonic() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f'no {what} after {timeout} s')
        time.sleep(poll)


@pytest.mark.slow
def test_a_second_train_process_on_the_same_folder_is_refused_at_once(toy, tmp_path):
    out = tmp_path / 'run'
    argv = toy.argv(out, '--num_epochs', 2, logger=out)
    first = start_train(argv)
    try:
        wait_for(lambda: (out / '.lock').exists() and (out / '.lock').read_text().startswith(f'pid {first.pid} '),
                 first, 'lock held by the first run')
        os.kill(first.pid, signal.SIGSTOP)  # frozen while holding the lock: no race with the second's start-up
        try:
            second = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py')] + argv, cwd=ROOT,
                                    env=dict(ENV, CASC_PROGRESS_SECONDS='0'), capture_output=True, text=True,
                                    timeout=120)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 1, second.stderr
        err = second.stderr.strip()
        assert '\n' not in err, err  # the one line, and nothing before it: no data were loaded (no 'tokenizing')
        assert err.startswith(f'error: --model_name {out} is in use by pid {first.pid} on {HOST} since '), err
        _, first_err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, first_err
    assert [load_checkpoint(p)['epoch'] for p in checkpoints(out)] == [1, 2]
    assert load_checkpoint(out / 'model_best.pth.tar')['Eiters'] in (4, 8)
    assert 'epoch 1 done' in (out / 'train.log').read_text()


# ---------------------------------------------------------------------------------------------
# 2-3. Never replace an earlier run without --resume / --overwrite


def test_a_fresh_run_into_an_earlier_run_is_refused_and_leaves_it_as_it_was(toy, earlier, tmp_path):
    run = copy_run(earlier, tmp_path / 'run')
    before = snapshot(run)
    msg = refused(toy.argv(run, '--num_epochs', 1))
    assert msg.startswith('error: an earlier run left checkpoint_0.pth.tar, checkpoint_1.pth.tar, '
                          'model_best.pth.tar, train.log, ... in '), msg
    assert f' in {run} / {run / "log"}: ' in msg
    assert f'pass --resume {run / "checkpoint_1.pth.tar"} to continue it, --overwrite to replace it' in msg
    assert snapshot(run) == before
    # the hint names the last epoch by number, not by name: checkpoint_10 comes after checkpoint_9
    for n in (9, 10):
        shutil.copy(run / 'checkpoint_1.pth.tar', run / f'checkpoint_{n}.pth.tar')
    assert f'--resume {run / "checkpoint_10.pth.tar"} to continue it' in refused(toy.argv(run, '--num_epochs', 1))
    # a logger folder alone holding logs is an earlier run too
    logs_only = copy_run(earlier / 'log', tmp_path / 'logs')
    msg = refused(toy.argv(tmp_path / 'new', '--num_epochs', 1, logger=logs_only))
    assert 'left train.log, events.out.tfevents.' in msg and '--resume' not in msg and '--overwrite' in msg, msg


@pytest.mark.slow
def test_overwrite_replaces_an_earlier_run_only_once_the_data_loaded(toy, earlier, tmp_path):
    run = copy_run(earlier, tmp_path / 'run')
    before = snapshot(run)
    msg = refused(toy.argv(run, '--num_epochs', 1, '--overwrite', data_path=toy.bad['utf8']))
    assert f'{toy.caps("utf8")}: line 7 ' in msg
    assert snapshot(run) == before  # the data failed to load: the earlier run is still all there
    state = train.main(toy.argv(run, '--num_epochs', 1, '--overwrite'))
    assert state['epoch'] == 0
    assert sorted(os.listdir(run)) == ['.lock', 'checkpoint_0.pth.tar', 'log', 'model_best.pth.tar']
    events = [f for f in os.listdir(run / 'log') if f.startswith('events.out.tfevents.')]
    assert len(events) == 1 and events[0] not in before
    log = (run / 'log' / 'train.log').read_text().splitlines()
    old = before[os.path.join('log', 'train.log')].decode().splitlines()
    assert not set(old) & set(log) and 'epoch 1 done' not in '\n'.join(log)
    assert '--overwrite: removed ' in log[0] and 'epoch 0 done' in log[-1]
    assert load_checkpoint(run / 'checkpoint_0.pth.tar')['opt']['num_epochs'] == 1


@pytest.mark.slow
def test_a_run_that_fails_at_start_up_writes_no_log_so_the_rerun_needs_no_overwrite(toy, tmp_path):
    run = tmp_path / 'run'
    msg = refused(toy.argv(run, '--num_epochs', 1, '--img_dim', 2048))  # checked before anything is written
    ims = toy.data / 'toy_precomp' / 'train_ims.npy'
    assert msg == f'error: --img_dim: {ims} holds 64-dim region features, not 2048 (pass --img_dim 64)'
    assert not run.exists()
    msg = refused(toy.argv(run, '--num_epochs', 1, data_path=toy.bad['long']))  # fails after taking the locks
    assert msg.startswith(f'error: {toy.caps("long")}: line 7 '), msg
    assert all_files(run) == ['.lock', os.path.join('log', '.lock')]
    train.main(toy.argv(run, '--num_epochs', 1))
    assert (run / 'checkpoint_0.pth.tar').exists()


@pytest.mark.slow
def test_a_run_that_died_before_its_first_checkpoint_needs_overwrite(toy, tmp_path):
    run = tmp_path / 'run'
    msg = refused(toy.argv(run, '--num_epochs', 1, '--margin', '1e39'))  # inf in float32: the first loss is inf
    assert 'non-finite loss at iteration 1 ' in msg
    assert not checkpoints(run) and (run / 'log' / 'train.log').exists()
    before = snapshot(run)
    msg = refused(toy.argv(run, '--num_epochs', 1))
    assert msg.startswith('error: an earlier run left train.log') and '--overwrite' in msg, msg
    assert '--resume' not in msg  # nothing to resume
    assert snapshot(run) == before
    train.main(toy.argv(run, '--num_epochs', 1, '--overwrite'))
    assert 'non-finite' not in (run / 'log' / 'train.log').read_text()
    assert load_checkpoint(run / 'checkpoint_0.pth.tar')['epoch'] == 1


@pytest.mark.slow
def test_resume_that_would_write_later_checkpoints_again_is_refused_unless_overwrite(toy, earlier, tmp_path):
    run = copy_run(earlier, tmp_path / 'run')
    first = run / 'checkpoint_0.pth.tar'
    before = snapshot(run)
    argv = toy.argv(run, '--num_epochs', 2, '--resume', first)
    msg = refused(argv)
    assert msg == (f'error: --model_name {run} holds checkpoints of epochs the resumed run would write again '
                   f'(checkpoint_1.pth.tar): pass --overwrite to replace them, or resume into another --model_name')
    assert snapshot(run) == before
    state = train.main(argv + ['--overwrite'])
    assert state['epoch'] == 1 and state['Eiters'] == 8
    assert (run / 'checkpoint_0.pth.tar').read_bytes() == before['checkpoint_0.pth.tar']
    again = load_checkpoint(run / 'checkpoint_1.pth.tar')
    assert again['epoch'] == 2 and again['opt']['resume'] == str(first)
    assert f'--overwrite: removed {run / "checkpoint_1.pth.tar"}' in (run / 'log' / 'train.log').read_text()
    # resuming from the last checkpoint in place overwrites nothing: no --overwrite needed
    state = train.main(toy.argv(run, '--num_epochs', 3, '--resume', run / 'checkpoint_1.pth.tar'))
    assert state['epoch'] == 2 and load_checkpoint(run / 'checkpoint_2.pth.tar')['Eiters'] == 12
    assert (run / 'checkpoint_0.pth.tar').read_bytes() == before['checkpoint_0.pth.tar']


# ---------------------------------------------------------------------------------------------
# 4-5. Checks before any data is loaded; the vocabulary in the checkpoint


def refused_before_data(toy, out, *extra) -> str:
    """Refused with the broken caption file as data: had the data been loaded first, the caption
    error would have come instead. Nothing is written: the run folder is never created."""
    msg = refused(toy.argv(out, '--num_epochs', 2, *extra, data_path=toy.bad['utf8']))
    assert 'train_caps.txt' not in msg and not out.exists(), msg
    return msg


def test_unreadable_resume_files_are_refused_before_any_data_is_loaded(toy, earlier, tmp_path):
    good = (earlier / 'checkpoint_0.pth.tar').read_bytes()
    files = {'truncated': good[:len(good) // 2], 'random': random.Random(0).randbytes(4096), 'empty': b''}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    expected = {'missing': 'checkpoint not found',
                'truncated': 'not a readable PyTorch checkpoint (truncated or corrupt)',
                'random': 'not a readable PyTorch checkpoint (corrupt, or another kind of file)',
                'empty': 'not a readable PyTorch checkpoint (truncated or corrupt)'}
    for name, why in expected.items():
        msg = refused_before_data(toy, tmp_path / 'run', '--resume', tmp_path / name)
        assert msg == f'error: --resume {tmp_path / name}: {why}', msg
        assert 'weights_only' not in msg


class Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").write("ran")',)


def test_a_resume_file_whose_loading_would_run_code_is_refused_and_never_run(toy, tmp_path):
    marker = tmp_path / 'marker'
    bad = {'zip': tmp_path / 'zip.pth.tar', 'legacy': tmp_path / 'legacy.pth.tar', 'pickle2': tmp_path / 'p2.pkl',
           'pickle': tmp_path / 'plain.pkl'}
    state = {'model': {'w': torch.zeros(2)}, 'opt': Payload(marker)}
    torch.save(state, bad['zip'])
    torch.save(state, bad['legacy'], _use_new_zipfile_serialization=False)
    with open(bad['pickle2'], 'wb') as f:
        pickle.dump(state, f, protocol=2)
    with open(bad['pickle'], 'wb') as f:
        pickle.dump(state, f)  # protocol 5: torch's safe unpickler stops at its first opcode
    for kind, path in bad.items():
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter('always')
            msg = refused_before_data(toy, tmp_path / 'run', '--resume', path)
        assert not shown, [str(w.message) for w in shown]  # the one line alone: no torch advice before it
        assert msg.startswith(f'error: --resume {path}: ') and 'weights_only' not in msg, msg
        if kind != 'pickle':
            assert msg == (f'error: --resume {path}: refused, it holds Python objects other than tensors and plain '
                           f'containers, and loading those could run code'), msg
        assert not marker.exists(), kind
    # the payload is live: an unsafe load does run it (here it only writes the marker file)
    torch.load(bad['zip'], weights_only=False)
    assert marker.read_text() == 'ran'


def test_the_authors_checkpoint_format_is_not_resumable(toy, earlier, tmp_path):
    ckpt = load_checkpoint(earlier / 'checkpoint_0.pth.tar')
    parts = [{k[len(p):]: v for k, v in ckpt['model'].items() if k.startswith(p)}
             for p in ('img_enc.', 'txt_enc.', 'head.')]  # the release's [img_enc, txt_enc, head] state dicts
    assert sum(map(len, parts)) == len(ckpt['model'])
    path = tmp_path / 'authors.pth.tar'
    torch.save({'model': parts, 'opt': argparse.Namespace(**ckpt['opt'])}, path)
    msg = refused_before_data(toy, tmp_path / 'run', '--resume', path)
    assert msg == (f"error: --resume {path}: not a casc training checkpoint (no optimizer state); the authors' "
                   f"and SCAN's checkpoints can be evaluated, not resumed")


def test_a_checkpoint_shaped_resume_file_without_a_vocabulary_is_one_clear_line(toy, tmp_path):
    path = tmp_path / 'novocab.pth.tar'  # a training checkpoint's keys, but no vocab and no vocab_size
    torch.save({'model': {}, 'opt': {}, 'optimizers': [], 'epoch': 1, 'Eiters': 8, 'best_rsum': 0.0}, path)
    msg = refused_before_data(toy, tmp_path / 'run', '--resume', path)
    assert msg == (f'error: --resume {path}: stores no vocabulary (neither its words nor their number), so '
                   f"{toy.vocab_file} cannot be checked against it: not a checkpoint of this project's train.py")


def test_resume_with_other_model_sizes_is_refused(toy, earlier, tmp_path):
    first = earlier / 'checkpoint_0.pth.tar'
    msg = refused_before_data(toy, tmp_path / 'run', '--resume', first, '--embed_size', 64)
    assert msg == f'error: --resume {first}: trained with --embed_size 32, but these flags say --embed_size 64'
    msg = refused_before_data(toy, tmp_path / 'run', '--resume', first, '--embed_size', 64, '--word_dim', 8)
    assert msg.endswith('trained with --word_dim 16 --embed_size 32, but these flags say --word_dim 8 --embed_size 64')


def test_resume_with_a_vocabulary_of_the_same_size_but_other_ids_is_refused(toy, earlier, tmp_path):
    first = earlier / 'checkpoint_0.pth.tar'
    words = vocab.deserialize_vocab(str(toy.vocab_file)).words()
    swapped = list(words)
    swapped[5], swapped[6] = words[6], words[5]
    other = tmp_path / 'vocab'
    other.mkdir()
    vocab.serialize_vocab(vocab.Vocabulary.from_words(swapped), str(other / 'toy_precomp_vocab.json'))
    shutil.copy(toy.vocab_path / 'toy_precomp_labels.json', other)
    argv = toy.argv(tmp_path / 'run', '--num_epochs', 2, '--resume', first, data_path=toy.bad['utf8'])
    argv[argv.index('--vocab_path') + 1] = str(other)
    msg = refused(argv)
    assert msg == (f'error: --vocab_path {other / "toy_precomp_vocab.json"}: id 5 is {words[6]!r} there but '
                   f'{words[5]!r} in the vocabulary {first} was trained with')
    assert not (tmp_path / 'run').exists()


def test_img_dim_is_checked_before_any_data_is_loaded(toy, tmp_path):
    msg = refused_before_data(toy, tmp_path / 'run', '--img_dim', 2048)
    ims = toy.bad['utf8'] / 'toy_precomp' / 'train_ims.npy'
    assert msg == f'error: --img_dim: {ims} holds 64-dim region features, not 2048 (pass --img_dim 64)'


def test_checkpoints_store_the_vocabulary_words_in_id_order(toy, earlier):
    words = vocab.deserialize_vocab(str(toy.vocab_file)).words()
    paths = checkpoints(earlier) + [str(earlier / 'model_best.pth.tar')]
    assert len(paths) == 3
    for path in paths:
        ckpt = load_checkpoint(path)
        assert ckpt['vocab'] == words and ckpt['vocab_size'] == len(words), path


# ---------------------------------------------------------------------------------------------
# 6-7. Flags and caption files


@pytest.mark.parametrize('flag, value, expected', [
    ('--batch_size', '0', 'expected a positive integer'),
    ('--learning_rate', '-1', 'expected a positive number'),
    ('--eval_memory_gb', '0', 'expected a positive number'),
    ('--eval_memory_gb', '-1', 'expected a positive number'),
    ('--eval_memory_gb', 'nan', 'expected a positive number'),
    ('--workers', '-1', 'expected an integer >= 0'),
    ('--margin', 'nan', 'expected a finite number'),  # was accepted: "non-finite loss" and a train.log left
    ('--margin', 'inf', 'expected a finite number'),
    ('--seed', '-5', 'expected an integer from 0 to 4294967295'),  # was numpy's line, not naming --seed
    ('--seed', str(2 ** 70), 'expected an integer from 0 to 4294967295'),
])
def test_bad_numeric_flags_exit_2_naming_the_flag(toy, tmp_path, capsys, flag, value, expected):
    with pytest.raises(SystemExit) as e:
        train.main(toy.argv(tmp_path / 'run', flag, value))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f": error: argument {flag}: {expected}, got '{value}'"), err
    assert not (tmp_path / 'run').exists()


def test_label_weight_0_with_a_label_head_is_refused_naming_casc_base(toy, tmp_path, capsys):
    """The head would get no gradient yet weigh 1 - alpha in every score, validation's included."""
    with pytest.raises(SystemExit) as e:
        train.main(toy.argv(tmp_path / 'run', '--label_weight', '0'))  # SMALL: --num_labels 20
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(': error: --label_weight 0 trains no label head, but --num_labels 20 adds one whose '
                            'untrained output would be blended into every score: pass --num_labels 0 for '
                            'CASC-base'), err
    assert not (tmp_path / 'run').exists()
    args = train.parse_args(toy.argv(tmp_path / 'run', '--label_weight', '0', '--num_labels', '0'))
    assert (args.label_weight, args.num_labels) == (0.0, 0)  # CASC-base: no head, nothing blended
    assert train.parse_args(toy.argv(tmp_path / 'run', '--label_weight', '0.5')).num_labels == 20


@pytest.mark.parametrize('device, expected', [
    pytest.param('cuda', '--device cuda: no CUDA device here (torch ', marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason='this machine has CUDA')),
    ('gpu', '--device gpu: expected cpu, cuda, cuda:N or mps'),
])
def test_an_unavailable_or_unknown_device_is_one_line(toy, tmp_path, device, expected):
    msg = refused(toy.argv(tmp_path / 'run', '--device', device))
    assert msg.startswith(f'error: {expected}'), msg
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('kind, why', [
    ('utf8', "is not UTF-8 text (byte 0: b'\\xff')"),
    ('long', 'has 100,000 characters, more than a caption can (2,000): a missing line break?'),
])
def test_a_bad_caption_line_is_one_line_naming_the_file_and_line(toy, tmp_path, kind, why):
    run = tmp_path / 'run'
    msg = refused(toy.argv(run, '--num_epochs', 1, data_path=toy.bad[kind]))
    assert msg == f'error: {toy.caps(kind)}: line 7 {why}'
    assert all_files(run) == ['.lock', os.path.join('log', '.lock')]  # no train.log, no checkpoint


# ---------------------------------------------------------------------------------------------
# 8. Ctrl-C


def interrupt(proc):
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


@pytest.mark.slow
def test_a_full_disk_stops_training_with_one_line_naming_the_checkpoint(toy, tmp_path, full_disk):
    """--model_name on a 64 KB file system: the first checkpoint (~200 KB) does not fit. It was torch's
    30-line traceback; now one line, in train.log too, and no temporary file left."""
    out = full_disk / 'run'
    msg = refused(toy.argv(out, '--num_epochs', 1, logger=tmp_path / 'log'))
    best = re.escape(str(out / 'model_best.pth.tar'))  # written first, then checkpoint_0.pth.tar
    assert re.fullmatch(rf'error: {best}: not written, no space left on the device \(0\.\d MB free there\)', msg), msg
    assert os.listdir(out) == ['.lock']
    assert (tmp_path / 'log' / 'train.log').read_text().rstrip().endswith(msg)


@pytest.mark.slow
def test_ctrl_c_names_the_last_checkpoint_and_leaves_every_checkpoint_loadable(toy, tmp_path):
    out = tmp_path / 'run'
    with open(tmp_path / 'stderr', 'w') as err_file:
        proc = start_train(toy.argv(out, '--num_epochs', 200, logger=out), stderr=err_file)
        # at once: the interrupt lands right after checkpoint_0 appears, while the run may still be
        # finishing that save (it used to be lost then: 'no checkpoint was written', and no model_best)
        wait_for(lambda: (out / 'checkpoint_0.pth.tar').exists(), proc, 'checkpoint_0.pth.tar', poll=0.0005)
        interrupt(proc)
    err = (tmp_path / 'stderr').read_text()
    assert proc.returncode == 130, err
    assert 'Traceback' not in err, err
    last = checkpoints(out)[-1]
    expected = f'interrupted: the last checkpoint is {last}; continue with --resume {last}'
    assert err.strip().splitlines()[-1] == expected
    assert (out / 'train.log').read_text().rstrip('\n').endswith(' ' + expected)
    assert [load_checkpoint(p)['epoch'] for p in checkpoints(out)] == list(range(1, len(checkpoints(out)) + 1))
    best = load_checkpoint(out / 'model_best.pth.tar')
    assert best['best_rsum'] == load_checkpoint(last)['best_rsum']  # written with it, not lost
    assert not [f for f in os.listdir(out) if '.tmp' in f]
    with util.FolderLock(str(out), '--model_name'):  # and the folder is free again
        pass


@pytest.mark.slow
def test_ctrl_c_before_the_first_checkpoint_says_none_was_written(toy, tmp_path):
    out = tmp_path / 'run'
    with open(tmp_path / 'stderr', 'w') as err_file:  # batches of 2: 100 in the first epoch
        proc = start_train(toy.argv(out, '--num_epochs', 1, '--batch_size', 2, logger=out), stderr=err_file,
                           CASC_PROGRESS_SECONDS='0')
        wait_for(lambda: (out / 'train.log').exists() and 'epoch 0: 1/100 batch' in (out / 'train.log').read_text(),
                 proc, 'the first training step')
        interrupt(proc)
    err = (tmp_path / 'stderr').read_text()
    assert proc.returncode == 130 and 'Traceback' not in err, err
    expected = 'interrupted before the first epoch ended: no checkpoint was written'
    assert err.strip().splitlines()[-1] == expected
    assert (out / 'train.log').read_text().rstrip('\n').endswith(' ' + expected)
    assert not [f for f in os.listdir(out) if f.endswith('.pth.tar') or '.tmp' in f]


# ---------------------------------------------------------------------------------------------
# 9. Progress off a terminal


@pytest.mark.slow
def test_progress_lines_go_to_train_log_and_stderr_off_a_terminal(toy, tmp_path):
    out = tmp_path / 'run'
    proc = start_train(toy.argv(out, '--num_epochs', 1, logger=out), CASC_PROGRESS_SECONDS='0')
    _, err = proc.communicate(timeout=180)  # stderr is a pipe
    assert proc.returncode == 0, err
    log = (out / 'train.log').read_text()
    step = re.compile(r'epoch 0: 3/4 batch \(75%\), [\d.,]+ batch/s, \d+ s left, loss [\d.]+, pairs_s \d+')
    val = re.compile(r'similarity: [\d.]+k/2\.0k pair \(\d+%\), [\d.]+k? pair/s, ')
    for text in (log, err):
        assert step.search(text) and val.search(text), text
        assert re.search(r'epoch 0: 4/4 batch \(100%\), [\d.,]+ batch/s, done in \d+ s', text), text
