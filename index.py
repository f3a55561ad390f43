"""The gallery index: a split encoded once (everything the scores need per image, and per caption
for image queries) into a folder, memory-mapped when read, reused by search.py, Searcher and the
server (server.py).

    index_dir/images/    meta.json + emb, norm, gram, proj: one raw float32 file each, (n_img, R, ...)
    index_dir/captions/  meta.json (the caption batches, longest first) + idx, lens, emb, norm, gram, proj

A side is written into a temporary folder beside its place and renamed into place when complete:
a half-written side is never read. Its meta.json holds the key it was built from (the checkpoint's
and the split's files by content, the vocabulary, the precision); opened with another key, the side
is rebuilt, saying why. Files are fingerprinted by their sha256, recomputed only when their size or
times changed (as git's index does), so a multi-GB features file is hashed once, not per start.

Reading maps only the chunk being scored (MappedArray): a scoring pass over a gallery larger than
RAM keeps resident memory to about one chunk, and the page cache serves repeated passes.
"""
import hashlib
import json
import os
import shutil
import sys

import numpy as np
import torch

import util
from encode import caption_batches, encode_images
from engine import Side

FORMAT = 1  # bump when the layout changes: older indexes are then rebuilt
FIELDS = ('emb', 'norm', 'gram', 'proj')  # Side's tensors, as stored (a caption's mask is rebuilt from lens)
IMAGE_BATCH, CAPTION_BATCH = 256, 128  # encode.py's batch sizes: the index holds the same bits as Searcher's


# ---------------------------------------------------------------------------------------------
# What an index was built from.

def fingerprint(path: str, known=None) -> dict:
    """A file -> {'path', 'size', 'stat', 'sha256'}; the sha256 is taken from `known` (an earlier
    fingerprint) when the size and times still match, else read again."""
    st = os.stat(path)
    stat = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    if known and known.get('stat') == stat and known.get('path') == os.path.realpath(path):
        return known
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            digest.update(block)
    return {'path': os.path.realpath(path), 'size': st.st_size, 'stat': stat, 'sha256': digest.hexdigest()}


def make_key(model_path: str, dataset, words: list, precision: str, known=None) -> dict:
    """What the encoded gallery depends on: the checkpoint and the split's files by content, the
    vocabulary the captions are encoded with, the precision. `known`: an earlier key (its hashes are
    reused for unchanged files)."""
    known = known or {}
    files = {'checkpoint': model_path, 'features': dataset.ims_path, 'captions': dataset.caps_path}
    key = {name: fingerprint(path, known.get(name)) for name, path in files.items()}
    key['vocab_sha256'] = hashlib.sha256('\n'.join(words).encode('utf-8')).hexdigest()
    key.update(precision=precision, n_images=int(dataset.n_images), format=FORMAT)
    return key


def key_difference(old: dict, new: dict):
    """-> why an index built under `old` does not serve `new` (None when it does)."""
    for name in ('checkpoint', 'features', 'captions'):
        if (old.get(name) or {}).get('sha256') != new[name]['sha256']:
            return f'another {name} file ({new[name]["path"]} changed since)'
    for name in ('vocab_sha256', 'precision', 'n_images', 'format'):
        if old.get(name) != new[name]:
            return f'another {name.replace("_sha256", "")} ({old.get(name)} then, {new[name]} now)'
    return None


def default_dir(model_path: str, dataset, precision: str) -> str:
    """Beside the checkpoint, one folder per split and precision: index/{data_name}_{split}_{precision}."""
    data_name = os.path.basename(os.path.dirname(os.path.abspath(dataset.ims_path)))
    return os.path.join(os.path.dirname(os.path.abspath(model_path)), 'index', f'{data_name}_{dataset.split}_{precision}')


# ---------------------------------------------------------------------------------------------
# Reading: arrays mapped chunk by chunk.

class MappedArray:
    """A float32/int64 array in a raw file, (shape), read by slicing the first axis: a[i0:i1] maps
    just those rows (copy-on-write, so torch may wrap them) -> a tensor on `device`. Only what a
    caller holds stays mapped; unmapped when its tensors are freed."""

    def __init__(self, path: str, dtype: str, shape: tuple, offset: int = 0, device='cpu'):
        self.path, self.dtype, self.shape, self.offset = path, np.dtype(dtype), tuple(shape), offset
        self.device = torch.device(device)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        i0, i1, step = rows.indices(self.shape[0])
        assert step == 1, 'rows are read as one contiguous range'
        if i1 <= i0:
            return torch.from_numpy(np.empty((0, *self.shape[1:]), self.dtype)).to(self.device)
        row = int(np.prod(self.shape[1:], dtype=np.int64))
        mapped = np.memmap(self.path, self.dtype, 'c', self.offset + i0 * row * self.dtype.itemsize,
                           (i1 - i0, *self.shape[1:]))
        return torch.from_numpy(mapped).to(self.device)


class CaptionBatches:
    """The gallery's captions as encode_captions gives them, [(caption indices (n,), Side)], each
    batch mapped when iterated (and unmapped once the caller drops it)."""

    def __init__(self, folder: str, meta: dict, device):
        self.folder, self.batches, self.device = folder, meta['batches'], torch.device(device)
        self.dims = meta['dims']  # d, H (0: no label head)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        d, H = self.dims
        for b in self.batches:
            n, L, at = b['n'], b['L'], b['at']  # at: this batch's first element in each file
            part = lambda name, dtype, *shape: MappedArray(  # noqa: E731
                os.path.join(self.folder, name), dtype, (n, *shape), at[name] * np.dtype(dtype).itemsize,
                self.device)[:]
            idx, lens = part('idx', 'int64').cpu(), part('lens', 'int64')
            mask = torch.arange(L, device=self.device) < lens[:, None]  # (n, L)
            yield idx, Side(part('emb', 'float32', L, d), mask, part('norm', 'float32', L),
                            part('gram', 'float32', L, L), part('proj', 'float32', L, H) if H else None)


def row_bytes(side: Side) -> int:
    """Bytes of one image's tensors when the Side is read chunk by chunk (MappedArrays); 0 when resident."""
    mapped = [a for a in side if isinstance(a, MappedArray)]
    return sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in mapped)


def image_side(folder: str, meta: dict, device) -> Side:
    """The gallery's images as one Side of MappedArrays: scoring.score_chunks slices it chunk by chunk."""
    n, R, d, H = meta['n'], meta['R'], *meta['dims']
    arr = lambda name, *shape: MappedArray(os.path.join(folder, name), 'float32', (n, *shape), 0, device)  # noqa
    return Side(arr('emb', R, d), None, arr('norm', R), arr('gram', R, R), arr('proj', R, H) if H else None)


# ---------------------------------------------------------------------------------------------
# Writing: batch by batch, appended to the raw files (resident memory: one batch).

def _append(files: dict, side: Side, **extra):
    """Append a batch's Side tensors (and extra arrays) to the open files, by field name."""
    parts = {**{f: getattr(side, f) for f in FIELDS}, **extra}
    assert all(getattr(side, f) is None or getattr(side, f).dtype == torch.float32 for f in FIELDS)  # as read
    for name, f in files.items():
        if parts[name] is not None:
            f.write(np.ascontiguousarray(parts[name].cpu().numpy()).tobytes())


def _open_files(folder: str, names) -> dict:
    return {name: open(os.path.join(folder, name), 'wb') for name in names}


def build_images(model, dataset, folder: str, device) -> dict:
    """Encode the split's images into folder, IMAGE_BATCH at a time -> the side's meta (n, R, dims)."""
    n = dataset.n_images
    files = _open_files(folder, FIELDS if model.head is not None else FIELDS[:3])
    with util.progress(total=n, desc='indexing images', unit='img') as bar:
        for i0 in range(0, n, IMAGE_BATCH):
            side = encode_images(model, dataset.images[i0:i0 + IMAGE_BATCH], IMAGE_BATCH, device)  # (n_b, R, d)
            _append(files, side)
            bar.update(len(side.emb))
    _close(files)
    return {'n': n, 'R': int(dataset.images.shape[1]), 'dims': _dims(model)}


def build_captions(model, dataset, folder: str, device) -> dict:
    """Encode the split's captions into folder in encode.caption_batches's batches (longest first,
    the same batches Searcher encodes in memory) -> the side's meta (batches with their offsets, dims)."""
    caps = dataset.captions
    files = _open_files(folder, ('idx', 'lens') + (FIELDS if model.head is not None else FIELDS[:3]))
    at, batches = dict.fromkeys(('idx', 'lens') + FIELDS, 0), []
    with util.progress(total=len(caps), desc='indexing captions', unit='cap') as bar:
        for idx, side in caption_batches(model, caps, CAPTION_BATCH, device):
            n, L = side.mask.shape  # (n, L)
            lens = side.mask.sum(1)
            _append(files, side, idx=idx, lens=lens)
            batches.append({'n': n, 'L': L, 'at': dict(at)})
            for name, t in (('idx', idx), ('lens', lens), *((f, getattr(side, f)) for f in FIELDS)):
                at[name] += 0 if t is None else t.numel()
            bar.update(n)
    _close(files)
    return {'batches': batches, 'dims': _dims(model)}


def _dims(model) -> list:
    return [model.cfg.embed_size, 0 if model.head is None else model.cfg.label_hidden]


def _close(files: dict):
    for f in files.values():
        f.flush()
        os.fsync(f.fileno())
        f.close()


# ---------------------------------------------------------------------------------------------
# The index folder: open a side, or build it (into a temporary folder, renamed when complete).

def read_meta(folder: str):
    """folder/meta.json -> dict, or None when there is none (or it is unreadable)."""
    try:
        with open(os.path.join(folder, 'meta.json'), encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _remove_leftovers(index_dir: str, kind: str):
    """Temporary folders of builds whose process is gone (killed mid-build)."""
    for name in os.listdir(index_dir):
        if name.startswith(f'.{kind}.tmp'):
            pid = name.rsplit('tmp', 1)[1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(index_dir, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _install(tmp: str, folder: str):
    """Rename the complete tmp folder into place (an older side, if any, is moved away first)."""
    old = f'{tmp}.old'
    if os.path.isdir(folder):
        os.replace(folder, old)  # open maps of the old files stay valid until dropped
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


class Gallery:
    """A split's encoded gallery in index_dir, tied to key (make_key). .images() and .captions()
    open a side, building it on first need (and rebuilding a stale one, saying why)."""

    def __init__(self, index_dir: str, key: dict, model, dataset, device, log=None):
        self.index_dir, self.key, self.model, self.dataset, self.log = index_dir, key, model, dataset, log
        self.device = torch.device(device)

    @staticmethod
    def known_key(index_dir: str):
        """The key of a side already in index_dir (its file hashes can be reused), or None."""
        for kind in ('images', 'captions'):
            meta = read_meta(os.path.join(index_dir, kind))
            if meta and isinstance(meta.get('key'), dict):
                return meta['key']
        return None

    def images(self) -> Side:
        folder = os.path.join(self.index_dir, 'images')
        return image_side(folder, self._side('images', build_images), self.device)

    def captions(self) -> CaptionBatches:
        folder = os.path.join(self.index_dir, 'captions')
        return CaptionBatches(folder, self._side('captions', build_captions), self.device)

    def _side(self, kind: str, build) -> dict:
        """The side's meta, after building it when it is missing or stale."""
        folder = os.path.join(self.index_dir, kind)
        meta = read_meta(folder)
        why = 'none yet' if meta is None else key_difference(meta.get('key') or {}, self.key)
        if why is None:
            if meta['key'] != self.key:  # same contents, new file times: remember the new ones
                meta['key'] = self.key
                _write_meta(folder, meta, quiet=True)
            return meta
        print(f'index {folder}: {"building it" if meta is None else f"built for {why}: rebuilding it"}',
              file=self.log or sys.stderr, flush=True)
        os.makedirs(self.index_dir, exist_ok=True)
        _remove_leftovers(self.index_dir, kind)
        tmp = os.path.join(self.index_dir, f'.{kind}.tmp{os.getpid()}')
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            meta = {**build(self.model, self.dataset, tmp, self.device), 'key': self.key}
            _write_meta(tmp, meta)  # last: a folder without it was never complete
            _install(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return meta


def _write_meta(folder: str, meta: dict, quiet: bool = False):
    try:
        util.atomic_write(os.path.join(folder, 'meta.json'), lambda f: f.write(json.dumps(meta).encode()))
    except OSError:
        if not quiet:  # a read-only index still serves; only new file times go unrecorded
            raise


def open_gallery(index_dir: str, model_path: str, model, dataset, words: list, precision: str, device,
                 log=None) -> Gallery:
    """The Gallery of a split for a checkpoint: its key computed (reusing the hashes of unchanged
    files recorded in index_dir), nothing encoded until a side is asked for. index_dir 'auto': default_dir."""
    if index_dir == 'auto':
        index_dir = default_dir(model_path, dataset, precision)
    key = make_key(model_path, dataset, words, precision, Gallery.known_key(index_dir))
    return Gallery(index_dir, key, model, dataset, device, log)
