"""features.py's output on disk: the reserved, memory-mapped .partial files and the point an
interrupted run resumes from, putting the complete output in place, and the settings record
{split}_ims.json beside it: its file fingerprints, reading it back (photo.py), and deciding whether
{split}_boxes.npy belongs to the features beside it (boxes_for, for the pages); and the grid cells
regions lie on (grid_boxes: features.py's grid, and the pages' boxes when there is no boxes file).
No torch here.
"""
import errno
import hashlib
import json
import math
import os
import shutil

import numpy as np

import util

def resume_point(paths: dict, outs: list, settings: dict, overwrite: bool) -> int:
    """Images an interrupted run with these settings already wrote (0: start afresh). ValueError
    for an existing features or boxes file (a grid run removes the boxes of the run it replaces) or
    a partial run made with other settings (unless overwrite)."""
    existing = [paths[kind] for kind in ('ims', 'boxes') if os.path.exists(paths[kind])]
    if existing and not overwrite:
        raise ValueError(f'{existing[0]} exists: pass --overwrite to replace it')
    state_path = f'{outs[0]}.partial.json'
    if overwrite or not os.path.isfile(state_path):
        return 0  # partial files without a state are overwritten: they hold nothing known
    try:
        with open(state_path, encoding='utf-8') as f:
            state = json.load(f)
        old, done = dict(state['settings']), int(state['done'])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f'{state_path}: not a progress file of features.py: delete it or pass --overwrite') from None
    changed = [k for k in settings if old.get(k) != settings[k]]
    if changed:
        k = changed[0]
        why = {'names_sha256': 'another list of images', 'recipe': 'an older features.py, other features'}.get(
            k, f'{k} {old.get(k)} then, {settings[k]} now')
        raise ValueError(f'{outs[0]}.partial is a partial run made with other arguments ({why}): delete it '
                         f'or pass --overwrite to start again')
    return done if all(os.path.isfile(f'{p}.partial') for p in outs) else 0


def reserve(path: str):
    """Allocate every block of the file at path now (posix_fallocate; where the OS lacks it, check
    the free space): a full disk is found before any work, instead of killing the process with a
    SIGBUS when a write to the memory-mapped file finds no block. OSError ENOSPC when it lacks space."""
    size = os.path.getsize(path)
    if hasattr(os, 'posix_fallocate'):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    elif shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < size - os.stat(path).st_blocks * 512:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def open_partials(outs: list, shapes: list, done: int) -> list:
    """The memory-mapped float32 .partial file of each out, of its shape ({split}_ims.npy.partial
    (n, 36, 2048) [and _boxes (n, 36, 4)]), new when done = 0, every block reserved on disk.
    ValueError naming the file and the space it lacks on a full disk (new files removed again;
    other files untouched)."""
    arrays, n = [], shapes[0][0]
    try:
        for p, shape in zip(outs, shapes):
            path = f'{p}.partial'
            arrays.append(np.lib.format.open_memmap(path, 'r+') if done else
                          np.lib.format.open_memmap(path, 'w+', np.float32, shape))
            reserve(path)
    except OSError as e:
        if not util.no_space(e):
            raise
        del arrays[:]  # unmapped
        if not done:
            remove_partials(outs)
        need = sum(4 * int(np.prod(shape)) for shape in shapes) / 1e6
        raise ValueError(f'{path}: no space left on that disk for the output ({need:,.1f} MB for {n} images, '
                         f'{util.free_space(path)} free there): nothing computed, the files already there are intact') from None
    return arrays


def remove_partials(outs: list):
    """Remove this run's .partial files (those that exist)."""
    for p in outs:
        if os.path.exists(f'{p}.partial'):
            os.remove(f'{p}.partial')


def fingerprint(path: str, pieces: int = 64, piece: int = 1 << 16) -> str:
    """sha256 of a file's size and of 64 evenly spaced 64 KiB pieces (all of a smaller file): the
    same for a copy, another for other features (they differ in every image's rows); milliseconds
    for any size."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, 'rb') as f:
        for k in range(pieces):
            f.seek(k * max(size - piece, 0) // (pieces - 1))
            digest.update(f.read(piece))
    return digest.hexdigest()


def finish(paths: dict, outs: list, record: dict):
    """Put the complete output in place. The record first, with the new files' fingerprints: from
    then on the old features and boxes no longer match it (boxes_for); then the new boxes, or for
    grid features the removal of the boxes of the run they replace; the features last."""
    record['fingerprints'] = {'ims': fingerprint(f'{outs[0]}.partial'),
                              'boxes': fingerprint(f'{outs[1]}.partial') if len(outs) > 1 else None}
    util.atomic_write(paths['record'], lambda f: f.write(json.dumps(record, indent=1).encode()))
    if len(outs) == 1 and os.path.exists(paths['boxes']):
        os.remove(paths['boxes'])
    for p in reversed(outs):
        os.replace(f'{p}.partial', p)


def read_record(path: str):
    """features.py's record {split}_ims.json -> dict; None without the file. ValueError naming it
    when it is no such record."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            record = json.load(f)
    except ValueError:  # not JSON, not UTF-8
        record = None
    if not (isinstance(record, dict) and all(isinstance(record.get(k), dict) for k in ('settings', 'fingerprints'))):
        raise ValueError(f'{path}: not a settings record of features.py: delete it')
    return record


def boxes_for(folder: str, split: str):
    """{split}_boxes.npy in folder -> its (n, R, 4) array, memory-mapped, when it belongs to the
    features {split}_ims.npy beside it; else None. Features.py's record {split}_ims.json decides:
    the boxes belong when it says --regions boxes and fingerprints both files as they are now (not
    after a grid run, another boxes run, or a features file copied over). A boxes file without a
    record (made by other tools, from SCAN's bottom-up files, or by features.py before records) is
    taken as it is. ValueError naming an unreadable file."""
    path = os.path.join(folder, f'{split}_boxes.npy')
    if not os.path.isfile(path):
        return None
    record, ims = read_record(os.path.join(folder, f'{split}_ims.json')), os.path.join(folder, f'{split}_ims.npy')
    if record is not None and (not os.path.isfile(ims) or record['fingerprints'] != {
            'ims': fingerprint(ims), 'boxes': fingerprint(path)}):
        return None
    try:
        return np.load(path, mmap_mode='r')
    except (OSError, ValueError) as e:
        raise ValueError(f'{path}: not a readable .npy file ({e})') from None


def grid_shape(R: int) -> tuple:
    """R regions as the most square grid, rows x cols == R, rows <= cols: 36 -> (6, 6), 12 -> (3, 4)."""
    rows = max(r for r in range(1, math.isqrt(R) + 1) if R % r == 0)
    return rows, R // rows


def grid_boxes(R: int) -> np.ndarray:
    """The row-major grid cells of R regions as boxes (R, 4), (x1, y1, x2, y2) in [0, 1]."""
    rows, cols = grid_shape(R)
    r, c = np.divmod(np.arange(R), cols)
    return np.stack([c / cols, r / rows, (c + 1) / cols, (r + 1) / rows], 1)
