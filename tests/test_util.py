"""util.py and progress.py: progress lines off a terminal, durations, atomic writes, the folder lock (held by
another real process, released even by SIGKILL), writable-output checks and the checked flag
types. Real files and processes, no mocks."""
import argparse
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import progress
import util
from conftest import ROOT

# ---------------------------------------------------------------- progress and durations

RATE = r'[0-9][0-9,.]*[kMG]?'  # '12', '1,234', '3.5', '2.1k'
DURATION = r'\d+ s|\d+ min \d\d s|\d+ h \d\d min'


@pytest.mark.parametrize('seconds, text', [(0, '0 s'), (42, '42 s'), (59.4, '59 s'), (60, '1 min 00 s'),
                                           (185, '3 min 05 s'), (3599, '59 min 59 s'),
                                           (2 * 3600 + 7 * 60, '2 h 07 min'), (2 * 3600 + 7 * 60 + 59, '2 h 07 min')])
def test_duration_reads_like_a_person_would_say_it(seconds, text):
    assert progress.duration(seconds) == text


def test_log_progress_with_interval_0_logs_every_update_and_a_final_line():
    lines = []
    bar = progress.LogProgress(total=4, desc='work', unit='img', log=lines.append, interval=0)
    for k in range(4):
        bar.set_postfix(loss=f'{0.5 / (k + 1):.3f}')
        bar.update(1)
    bar.close()
    bar.close()  # a second close adds nothing
    assert len(lines) == 5 and all('\n' not in line for line in lines)
    for k, line in enumerate(lines[:4], 1):
        m = re.fullmatch(rf'work: {k}/4 img \((\d+)%\), ({RATE}) img/s, ({DURATION}) left, loss (\S+)', line)
        assert m, line
        assert int(m[1]) == round(100 * k / 4) and m[4] == f'{0.5 / k:.3f}'
    assert re.fullmatch(rf'work: 4/4 img \(100%\), {RATE} img/s, done in ({DURATION}), loss 0\.125', lines[4]), lines[4]


def test_log_progress_time_left_is_the_remaining_work_at_the_current_rate():
    lines = []
    bar = progress.LogProgress(total=1000, desc='similarity', unit='pair', unit_scale=True, log=lines.append,
                           interval=30)
    bar.update(100)  # well within 30 s: nothing yet
    assert lines == []
    bar.t0 = bar.last = time.monotonic() - 40  # as if started 40 s ago
    bar.update(300)  # 400 pairs in 40 s: 10 pair/s, 600 to go: 60 s
    assert lines == ['similarity: 400/1.0k pair (40%), 10.0 pair/s, 1 min 00 s left']
    bar.t0 -= 80
    bar.last -= 80  # 120 s in all
    bar.update(600)
    bar.close()
    assert lines[1:] == ['similarity: 1.0k/1.0k pair (100%), 8.3 pair/s, 0 s left',
                         'similarity: 1.0k/1.0k pair (100%), 8.3 pair/s, done in 2 min 00 s']


def test_log_progress_with_a_long_interval_prints_nothing_for_a_short_loop(capsys):
    lines = []
    with progress.LogProgress(total=5, desc='quick', log=lines.append, interval=3600) as bar:
        for _ in range(5):
            bar.update(1)
    assert lines == [] and bar.n == 5
    for _ in progress.LogProgress(range(5), desc='quick', interval=3600):  # the default log: stderr
        pass
    assert capsys.readouterr() == ('', '')


def test_log_progress_iterating_a_list_counts_its_length():
    lines, items = [], ['a', 'b', 'c']
    bar = progress.LogProgress(items, desc='items', unit='cap', log=lines.append, interval=0)
    assert bar.total == 3
    assert list(bar) == items  # yields every item, then closes
    assert [line.split(',')[0] for line in lines] == ['items: 1/3 cap (33%)', 'items: 2/3 cap (67%)',
                                                      'items: 3/3 cap (100%)', 'items: 3/3 cap (100%)']
    assert 'done in' in lines[-1] and 'done in' not in ''.join(lines[:-1])


def test_log_progress_without_a_total_counts_only():
    lines = []
    bar = progress.LogProgress((k for k in range(3)), desc='stream', unit='batch', log=lines.append, interval=0)
    assert bar.total is None and sum(bar) == 3
    assert re.fullmatch(rf'stream: 1 batch, {RATE} batch/s', lines[0]), lines[0]
    assert re.fullmatch(rf'stream: 3 batch, {RATE} batch/s, done in {DURATION}', lines[-1]), lines[-1]


def test_log_progress_interval_comes_from_casc_progress_seconds(monkeypatch, capsys):
    monkeypatch.setenv('CASC_PROGRESS_SECONDS', '0')
    bar = util.progress(range(2), desc='env', unit='it')  # stderr is not a terminal under pytest
    assert isinstance(bar, progress.LogProgress) and bar.interval == 0
    assert list(bar) == [0, 1]
    err = capsys.readouterr().err.splitlines()
    assert [line.split(',')[0] for line in err] == ['env: 1/2 it (50%)', 'env: 2/2 it (100%)', 'env: 2/2 it (100%)']
    monkeypatch.setenv('CASC_PROGRESS_SECONDS', '7.5')
    assert progress.LogProgress(range(2)).interval == 7.5
    monkeypatch.delenv('CASC_PROGRESS_SECONDS')
    assert progress.LogProgress(range(2)).interval == 30.0


def test_progress_disabled_prints_nothing_but_still_counts(monkeypatch, capsys):
    monkeypatch.setenv('CASC_PROGRESS_SECONDS', '0')  # would log every update if enabled
    lines = []
    bar = util.progress(total=3, desc='off', log=lines.append, enabled=False)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert bar.n == 3 and lines == []
    assert list(util.progress(['x', 'y'], desc='off', enabled=False)) == ['x', 'y']
    assert capsys.readouterr() == ('', '')


# ---------------------------------------------------------------- atomic_write

def leftovers(folder, keep):
    return sorted(p for p in os.listdir(folder) if p not in keep)


def test_atomic_write_that_fails_midway_keeps_the_earlier_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / 'sims.npy'
    path.write_bytes(b'the earlier file')

    def half_then_fail(f):
        f.write(b'half of a new fi')
        raise OSError(28, 'No space left on device')

    with pytest.raises(OSError, match=f'^{re.escape(str(path))}: not written, no space left on the device'):
        util.atomic_write(str(path), half_then_fail)
    assert path.read_bytes() == b'the earlier file'
    assert leftovers(tmp_path, {'sims.npy'}) == []  # no '.tmp' file behind
    def interrupted(f):
        f.write(b'x')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C midway: the same
        util.atomic_write(str(path), interrupted)
    assert path.read_bytes() == b'the earlier file' and leftovers(tmp_path, {'sims.npy'}) == []


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a real file system of 64 KB: a tmpfs, which only root may mount (CI's container is)."""
    folder = tmp_path / 'small_disk'
    folder.mkdir()
    try:
        done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(folder)],
                              capture_output=True, text=True)
    except OSError as e:
        done = subprocess.CompletedProcess([], 1, '', str(e))
    if done.returncode:
        pytest.skip(f'no small file system to fill: mounting a 64 KB tmpfs failed ({done.stderr.strip()})')
    yield folder
    subprocess.run(['umount', str(folder)], check=True)


@pytest.mark.parametrize('writer', ['bytes', 'torch.save'])
def test_a_full_disk_is_one_line_naming_the_file_and_the_earlier_file_stays(full_disk, writer):
    """A real ENOSPC: raised by the file itself, or wrapped in a RuntimeError by torch.save (it was a
    bare '[Errno 28]' or torch's 30-line traceback). The partial temporary file is removed."""
    import torch
    path = full_disk / 'checkpoint_0.pth.tar'
    path.write_bytes(b'the earlier file')
    write = {'bytes': lambda f: f.write(os.urandom(200_000)),
             'torch.save': lambda f: torch.save({'w': torch.zeros(50_000)}, f)}[writer]
    with pytest.raises(OSError) as e:
        util.atomic_write(str(path), write)
    assert re.fullmatch(rf'{re.escape(str(path))}: not written, no space left on the device \(0\.\d MB free '
                        r'there\); the previous file is left as it was', str(e.value)), str(e.value)
    assert path.read_bytes() == b'the earlier file' and leftovers(full_disk, {path.name}) == []
    util.atomic_write(str(path), lambda f: f.write(os.urandom(40_000)))  # the partial file's space is free again


def test_atomic_write_replaces_the_file_and_creates_a_new_one(tmp_path):
    path = tmp_path / 'out.json'
    path.write_bytes(b'old contents, longer than the new ones')
    util.atomic_write(str(path), lambda f: f.write(b'new'))
    assert path.read_bytes() == b'new'
    util.atomic_write(str(tmp_path / 'fresh.bin'), lambda f: f.write(b'\x00\x01'))
    assert (tmp_path / 'fresh.bin').read_bytes() == b'\x00\x01'
    assert leftovers(tmp_path, {'out.json', 'fresh.bin'}) == []


# ---------------------------------------------------------------- FolderLock

HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
import util
with util.FolderLock({folder!r}, '--model_name'):
    print('held', flush=True)
    time.sleep(120)
"""


def start_holder(folder):
    """Another real process holding FolderLock(folder) until it is killed."""
    proc = subprocess.Popen([sys.executable, '-c', HOLDER.format(root=ROOT, folder=str(folder))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'held'
    return proc


def test_folder_lock_refuses_a_second_holder_in_another_process_until_it_is_killed(tmp_path):
    folder = tmp_path / 'runs' / 'f30k'  # created by the lock
    proc = start_holder(folder)
    try:
        with pytest.raises(ValueError) as exc:
            with util.FolderLock(str(folder), '--model_name'):
                pytest.fail('a second holder got the lock')
        msg = str(exc.value)
        assert '\n' not in msg and msg.startswith(f'--model_name {folder} is in use by ')
        assert re.search(rf'\bpid {proc.pid}\b', msg), msg
    finally:
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: the OS releases the lock
        proc.wait()
        proc.stdout.close()
    with util.FolderLock(str(folder), '--model_name'):
        text = (folder / '.lock').read_text()
        assert re.match(rf'pid {os.getpid()} on \S+ since ', text), text


def test_folder_lock_names_this_pid_while_held_and_refuses_a_second_holder_here(tmp_path):
    folder = tmp_path / 'run'
    with util.FolderLock(str(folder), '--logger_name'):
        assert re.match(rf'pid {os.getpid()} ', (folder / '.lock').read_text())
        expected = rf'^--logger_name {re.escape(str(folder))} is in use by pid {os.getpid()} '
        with pytest.raises(ValueError, match=expected):
            util.FolderLock(str(folder), '--logger_name').__enter__()
    assert (folder / '.lock').read_text() == ''  # released: nobody named
    with util.FolderLock(str(folder), '--logger_name'):  # and free again
        pass


# ---------------------------------------------------------------- check_writable

def test_check_writable_refuses_a_file_as_parent_folder(tmp_path):
    (tmp_path / 'plain').write_text('a file, not a folder')
    for path in (tmp_path / 'plain' / 'sims.npy', tmp_path / 'plain' / 'deeper' / 'sims.npy'):
        with pytest.raises(ValueError) as exc:
            util.check_writable(str(path), '--save_sims')
        msg = str(exc.value)
        assert msg.startswith(f'--save_sims {path}: cannot write there') and '\n' not in msg
    with pytest.raises(ValueError, match='^--out '):  # a folder output that is a file
        util.check_writable(str(tmp_path / 'plain'), '--out', folder=True)
    assert (tmp_path / 'plain').read_text() == 'a file, not a folder'


def test_check_writable_refuses_a_folder_given_for_a_file(tmp_path):
    with pytest.raises(ValueError) as exc:
        util.check_writable(str(tmp_path), '--save_sims')
    assert str(exc.value) == f'--save_sims {tmp_path}: is a folder, expected a file name'


def test_check_writable_creates_missing_parent_folders_and_writes_nothing(tmp_path):
    path = tmp_path / 'a' / 'b' / 'sims.npy'
    assert util.check_writable(str(path), '--save_sims') is None
    assert (tmp_path / 'a' / 'b').is_dir() and os.listdir(tmp_path / 'a' / 'b') == []
    util.check_writable(str(tmp_path / 'report' / 'x'), '--out', folder=True)
    assert (tmp_path / 'report' / 'x').is_dir() and os.listdir(tmp_path / 'report' / 'x') == []


# ---------------------------------------------------------------- flag types

@pytest.mark.parametrize('parse, good, bad', [
    (util.positive_float, {'2.5': 2.5, '1e-3': 1e-3, '7': 7.0}, ['0', '-1', 'nan', 'inf', '-inf', '1e400', 'x', '']),
    (util.positive_int, {'1': 1, '128': 128}, ['0', '-1', '2.5', 'nan', 'inf', 'x']),
    (util.nonneg_int, {'0': 0, '3': 3}, ['-1', '2.5', 'nan', 'inf', 'x']),
    (util.nonneg_float, {'0': 0.0, '0.8': 0.8}, ['-0.1', 'nan', 'inf', 'x']),
])
def test_flag_types_accept_what_they_say_and_reject_the_rest(parse, good, bad):
    for text, value in good.items():
        assert parse(text) == value and type(parse(text)) is type(value)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError) as exc:
            parse(text)
        assert str(exc.value).startswith('expected ') and repr(text) in str(exc.value)


def test_flag_type_error_through_argparse_is_exit_2_with_the_flag(capsys):
    p = util.parser('doc')
    p.add_argument('--eval_memory_gb', type=util.positive_float, default=2.0, help='budget')
    assert p.parse_args(['--eval_memory_gb', '2.5']).eval_memory_gb == 2.5
    for text in ('0', '-1', 'nan'):
        with pytest.raises(SystemExit) as exc:
            p.parse_args(['--eval_memory_gb', text])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --eval_memory_gb: expected a positive number, got '{text}'" in err
    assert math.isfinite(p.parse_args([]).eval_memory_gb)


def test_one_line_errors_escape_control_characters_of_the_message(capsys):
    """An error quoting data text (a caption line, an image name with ESC or a newline) stays one
    line on stderr and cannot act on the user's terminal."""
    with pytest.raises(SystemExit) as e, util.one_line_errors():
        raise ValueError('caps.txt: line 3: \x1b]0;owned\x07 a dog\nrm -rf')
    assert e.value.code == 'error: caps.txt: line 3: \\x1b]0;owned\\x07 a dog\\nrm -rf'
