"""SCAN "precomp" data (the layout in the README's Real data section): dataset, collate, loaders,
the image names file, and the precomp files of Karpathy's split files.

    python data.py --from_karpathy dataset_flickr30k.json --data_path DATA --data_name f30k_precomp
    python data.py --make_toy DIR [--seed 0]

The first writes ``DATA/NAME/{split}_{caps,image_names}.txt`` from Karpathy's split file (see
``from_karpathy``), for your own region features in ``{split}_ims.npy``, image by image in the
order of ``{split}_image_names.txt`` (read back by ``read_image_names``); the second is ``python
toy.py DIR``: the toy demo data in ``DIR/toy_precomp`` (see toy.py).
"""
import json
import ntpath
import os
import posixpath
import re

import util  # first: it makes a Ctrl-C during the slow imports below one line
util.quiet_ctrl_c(__name__)

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import parallel
import toy
from labels import image_targets
from vocab import encode, read_captions, too_long, tokenize_all

FULL_SCAN_BYTES = 2 << 30  # feature files up to this size are scanned for NaN/inf when opened


def open_features(path: str, n_images=None) -> np.memmap:
    """Memory-map ``{split}_ims.npy`` -> (n_img, R, img_dim), never read into RAM."""
    try:
        ims = np.load(path, mmap_mode='r')
    except ValueError:
        raise ValueError(f'{path}: not a .npy array file') from None
    if ims.ndim != 3 or not np.issubdtype(ims.dtype, np.floating) or not ims.flags.c_contiguous:
        order = '' if ims.flags.c_contiguous else ' in Fortran order'
        raise ValueError(f'{path}: expected a C-order float array (n_images, regions, img_dim), '
                         f'got shape {ims.shape} dtype {ims.dtype}{order}')
    return ims[:n_images]


def check_img_dim(data_path: str, data_name: str, splits, img_dim: int, what: str = '--img_dim'):
    """ValueError at start-up, not mid-epoch, when the splits' features are not img_dim wide
    (only the .npy headers are read; a missing file is left to the dataset to report)."""
    for split in splits:
        path = os.path.join(data_path, data_name, f'{split}_ims.npy')
        if os.path.isfile(path):
            dim = open_features(path).shape[2]
            if dim != img_dim:
                raise ValueError(f'{what}: {path} holds {dim}-dim region features, not {img_dim}'
                                 + (f' (pass --img_dim {dim})' if what == '--img_dim' else ''))


def check_finite(path: str, ims: np.memmap, chunk_bytes: int = 16 << 20):
    """Raise ValueError naming the first image with NaN/inf. Streams the file with plain reads
    into one chunk at a time, not through the mmap, so resident memory stays flat."""
    n_img, per_img = len(ims), int(np.prod(ims.shape[1:]))
    step = max(1, chunk_bytes // (per_img * ims.itemsize))
    with open(path, 'rb') as f, util.progress(total=n_img, desc='checking features', unit='img', leave=False) as bar:
        f.seek(ims.offset)
        for i0 in range(0, n_img, step):
            block = np.fromfile(f, dtype=ims.dtype, count=min(step, n_img - i0) * per_img)
            ok = np.isfinite(block.reshape(-1, per_img)).all(1)  # (chunk,)
            if not ok.all():
                raise ValueError(f'{path}: image {i0 + int(np.argmin(ok))} has NaN or inf features')
            bar.update(len(ok))


class PrecompDataset(Dataset):
    """Caption k of ``{split}_caps.txt`` pairs with image k // im_div of ``{split}_ims.npy``.

    ``labels`` (K words) adds ``targets`` (n_img, K); ``max_images`` keeps the first N images
    and their captions (validation uses dev's first 1,000)."""

    def __init__(self, data_path: str, data_name: str, split: str, vocab, labels=None,
                 max_images=None):
        folder = os.path.join(data_path, data_name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f'data folder not found: {folder} (check --data_path/--data_name)')
        self.split = split
        self.ims_path = os.path.join(folder, f'{split}_ims.npy')
        self.caps_path = os.path.join(folder, f'{split}_caps.txt')
        for path in (self.ims_path, self.caps_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f'{split} split file not found: {path}')
        self.images = open_features(self.ims_path)
        caps = read_captions(self.caps_path)
        n_img, n_cap = len(self.images), len(caps)
        if n_cap not in (n_img, 5 * n_img) or n_img == 0:
            raise ValueError(f'{self.caps_path} has {n_cap} captions but {self.ims_path} has '
                             f'{n_img} images: need 5 captions per image (or 1)')
        self.im_div = n_cap // n_img  # captions per image: 5, or 1
        self.images = self.images[:max_images]
        self.n_images = len(self.images)
        if self.images.nbytes <= FULL_SCAN_BYTES:
            check_finite(self.ims_path, self.images)
        self.raw_captions = caps[:self.n_images * self.im_div]
        self.tokens = tokenize_all(self.raw_captions, f'tokenizing {split}')
        self.captions = [encode(vocab, t) for t in self.tokens]
        self.targets = None if labels is None else image_targets(self.tokens, labels, self.im_div)

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, k: int):
        """-> image (R, img_dim) float, caption (n_words,) long, target (K,) or None, k, k // im_div"""
        i = k // self.im_div
        image = np.array(self.images[i], dtype=np.float32)  # copy just this image off the mmap
        if not np.isfinite(image).all():
            raise ValueError(f'{self.ims_path}: image {i} has NaN or inf features')
        target = None if self.targets is None else torch.from_numpy(self.targets[i])
        return torch.from_numpy(image), torch.tensor(self.captions[k]), target, k, i

    def __getstate__(self):
        # Spawned loader workers get a pickled copy: without this the mmap would be pickled
        # as its full contents, and the strings are not needed to serve items.
        return {**self.__dict__, 'images': None, 'raw_captions': None, 'tokens': None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.images = open_features(self.ims_path, self.n_images)


def pad_captions(caps) -> tuple:
    """Word-id sequences (lists or tensors) -> captions (B, L) zero-padded (0 = <pad>), lengths (B,)."""
    lengths = torch.tensor([len(c) for c in caps])
    captions = torch.zeros(len(caps), int(lengths.max()), dtype=torch.long)
    for b, c in enumerate(caps):
        captions[b, :len(c)] = torch.as_tensor(c)
    return captions, lengths


def collate_fn(batch):
    """list of items -> images (B, R, img_dim), captions (B, L) zero-padded, lengths (B,),
    targets (B, K) or None, cap_ids (B,), img_ids (B,). Not sorted: the model packs unsorted."""
    images, caps, targets, cap_ids, img_ids = zip(*batch)
    captions, lengths = pad_captions(caps)
    targets = None if targets[0] is None else torch.stack(targets)
    return torch.stack(images), captions, lengths, targets, torch.tensor(cap_ids), torch.tensor(img_ids)


def get_loaders(data_path, data_name, vocab, batch_size, workers, labels=None, pin_memory=False, seed=0):
    """-> (train loader: this process's share of each global batch of batch_size, shuffled by
    seed and the epoch (parallel.GlobalBatchSampler; call loader.batch_sampler.set_epoch);
    validation set: the first 1,000 dev images, scored whole by evaluation.evaluate_arrays)."""
    train = PrecompDataset(data_path, data_name, 'train', vocab, labels)
    dev = PrecompDataset(data_path, data_name, 'dev', vocab, labels, max_images=1000)
    sampler = parallel.GlobalBatchSampler(len(train), batch_size, seed, parallel.rank(), parallel.world())
    loader = DataLoader(train, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                        persistent_workers=workers > 0, collate_fn=collate_fn)
    return loader, dev


# Karpathy's split files -> SCAN's precomp splits (COCO: 'test' is the 1K, 'testall' the 5K).
KARPATHY_SPLITS = {'train': 'train', 'restval': 'train', 'val': 'dev', 'test': 'test'}
COCO_TEST_1K = 1000


def _load_karpathy(json_path: str) -> tuple:
    """-> (the 'images' list, is COCO); ValueError naming the file when it is not a split file."""
    with open(json_path, 'rb') as f:
        raw = f.read()
    try:
        top = json.loads(raw.decode('utf-8-sig'))  # a BOM (Windows editors) is allowed
    except UnicodeDecodeError as e:
        raise ValueError(f'{json_path}: not UTF-8 text (byte {e.start})') from None
    except json.JSONDecodeError as e:
        raise ValueError(f'{json_path}: not JSON ({e.msg}: line {e.lineno} column {e.colno})') from None
    images = top.get('images') if isinstance(top, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{json_path}: no 'images' list: not one of Karpathy's split files "
                         f"(dataset_coco.json, dataset_flickr30k.json, dataset_flickr8k.json)")
    coco = top.get('dataset') == 'coco' or any(isinstance(e, dict) and 'filepath' in e for e in images)
    return images, coco


def _karpathy_entry(json_path: str, i: int, entry) -> tuple:
    """images[i] -> (precomp split, image name, its first 5 captions on one line each), checked."""
    where = f'{json_path}: images[{i}]'
    if not isinstance(entry, dict):
        raise ValueError(f'{where} is not an object with filename, split and sentences')
    for key, kind in (('filename', str), ('split', str), ('sentences', list), ('filepath', str)):
        if key not in entry and key != 'filepath':  # only COCO has a filepath
            raise ValueError(f'{where} has no {key!r}')
        if key in entry and not isinstance(entry[key], kind):
            raise ValueError(f'{where}: {key!r} is not a {kind.__name__}')
    name = posixpath.join(entry['filepath'], entry['filename']) if 'filepath' in entry else entry['filename']
    where += f' ({name!r})'
    if _name_problem(name, '--image_root') or '' in re.split(r'[/\\]', name):  # read_image_names's rules too
        raise ValueError(f"{where}: an image name must be a relative path on one line, without '..', empty parts "
                         f"or surrounding whitespace")
    split = KARPATHY_SPLITS.get(entry['split'])
    if split is None:
        raise ValueError(f"{where} has split {entry['split']!r}: expected one of {', '.join(KARPATHY_SPLITS)}")
    if len(entry['sentences']) < 5:
        raise ValueError(f"{where} has {len(entry['sentences'])} sentences: need 5 captions per image")
    caps = []
    for k, sent in enumerate(entry['sentences'][:5]):
        raw = sent.get('raw') if isinstance(sent, dict) else None
        if not isinstance(raw, str):
            raise ValueError(f"{where}: sentence {k} has no 'raw' text")
        caps.append(' '.join(raw.split()))  # every whitespace run, line breaks included -> one space
        why = 'is empty' if not caps[-1] else too_long(caps[-1])
        if why:
            raise ValueError(f'{where}: sentence {k} {why}')
    return split, name, caps


def from_karpathy(json_path: str, data_path: str, data_name: str, overwrite: bool = False) -> dict:
    """Karpathy's split file (dataset_{coco,flickr30k,flickr8k}.json) -> {split: number of images},
    for the splits that have images, after writing ``data_path/data_name/{split}_caps.txt`` (each
    image's first 5 sentences, whitespace folded) and ``{split}_image_names.txt`` ('filepath/filename'
    or 'filename'): train = 'train' + 'restval' in file order, dev = 'val', test = 'test'; for COCO
    testall = 'test' (5K) and test = its first 1,000. Every image and every existing output file
    is checked before anything is written (ValueError naming the first problem); files that hold
    other contents are refused unless overwrite, identical ones are left as they are."""
    images, coco = _load_karpathy(json_path)
    splits, seen = {s: ([], []) for s in ('train', 'dev', 'test')}, {}  # split -> (names, captions)
    for i, entry in enumerate(images):
        split, name, caps = _karpathy_entry(json_path, i, entry)
        key = posixpath.normpath(name)  # './a.jpg' is 'a.jpg', as read_image_names sees it
        if key in seen:
            raise ValueError(f'{json_path}: images[{seen[key]}] and images[{i}] have the same name {name!r}')
        seen[key] = i
        splits[split][0].append(name)
        splits[split][1].extend(caps)
    if coco:
        names, caps = splits['testall'] = splits['test']  # the 5K split; test = its first 1K
        splits['test'] = names[:COCO_TEST_1K], caps[:5 * COCO_TEST_1K]
    empty = [s for s, (names, _) in splits.items() if not names]
    splits = {s: v for s, v in splits.items() if v[0]}
    if not splits:
        raise ValueError(f"{json_path}: its 'images' list is empty")
    folder = os.path.join(data_path, data_name)
    files = {os.path.join(folder, f'{s}_{kind}.txt'): ('\n'.join(lines) + '\n').encode('utf-8')
             for s, (names, caps) in splits.items() for kind, lines in (('caps', caps), ('image_names', names))}
    kept = [path for path, content in files.items() if util.unchanged(path, content, overwrite, 'other contents', '--data_name')]
    util.check_writable(folder, '--data_path', folder=True)
    for path, content in files.items():
        if path not in kept:
            util.atomic_write(path, lambda f, content=content: f.write(content))
    counts = ', '.join(f'{s} {len(names):,} images ({len(caps):,} captions)' for s, (names, caps) in splits.items())
    if len(kept) == len(files):
        print(f'{folder} already holds these captions and image names: left as they are ({counts})')
    else:
        left = f'; identical files left as they are: {", ".join(map(os.path.basename, kept))}' if kept else ''
        print(f'wrote captions and image names to {folder}: {counts}{left}')
    if empty:
        print(f'no images for {", ".join(empty)}: those files not written')
    print('region features go in {split}_ims.npy, one image per line of {split}_image_names.txt, in that order')
    return {s: len(names) for s, (names, _) in splits.items()}


def _name_problem(name: str, root_flag: str):
    """What is wrong with one image name on its own, or None."""
    if not name:
        return 'empty (one image name per line)'
    why = ('has leading or trailing whitespace' if name != name.strip() else
           'has a non-printable character' if not name.isprintable() else
           f'is an absolute path, not one inside {root_flag}' if posixpath.isabs(name) or ntpath.isabs(name) else
           f"has a '..' part: image names stay inside {root_flag}" if '..' in re.split(r'[/\\]', name) else None)
    return why and f'{name!r} {why}'


def check_image_names(names: list, where: str, n_images=None, root: str = None, root_flag: str = '--image_dir') -> list:
    """The names of ``{split}_image_names.txt`` (one per image, in order) -> names, or ValueError
    '{where}: line n ...' at the first that is empty, has surrounding whitespace or a non-printable
    character, is absolute, has a '..' part or repeats an earlier one as a path ('./a.jpg' repeats
    'a.jpg'); with root (the image folder), also at one that resolves outside it (a symlink) or to
    the file of an earlier one. ValueError '{where} ...' for no names, and given n_images, for any
    other count."""
    if not names:
        raise ValueError(f'{where}: no image names in it')
    if root is not None and not os.path.isdir(root):
        raise ValueError(f'{root_flag} {root}: no such folder')
    real_root, seen = root and os.path.realpath(root), {}
    for n, name in enumerate(names, 1):
        why = _name_problem(name, root_flag)
        if not why:  # the same image: the same path, or with root, the same file
            key = os.path.realpath(os.path.join(real_root, name)) if root else posixpath.normpath(name)
            if root and os.path.commonpath([real_root, key]) != real_root:
                why = f'{name!r} resolves outside {root_flag} {real_root} (a symlink)'
            elif key in seen:
                why = f'{name!r} names the same image as line {seen[key]}'
            seen[key] = seen.get(key, n)
        if why:
            raise ValueError(f'{where}: line {n}: {why}')
    if n_images is not None and len(names) != n_images:
        raise ValueError(f'{where} has {len(names):,} names but its split has {n_images:,} images')
    return names


def read_image_names(path: str, n_images=None, root: str = None, root_flag: str = '--image_dir') -> list:
    """``{split}_image_names.txt`` (UTF-8, a BOM and CRLF line ends allowed, one name per line,
    nothing stripped) -> its names, checked by ``check_image_names`` (file and line in every error)."""
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        text = raw.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        raise ValueError(f'{path}: line {raw[:e.start].count(10) + 1} is not UTF-8') from None
    names = [n.removesuffix('\r') for n in text.removesuffix('\n').split('\n')] if text else []
    return check_image_names(names, path, n_images, root, root_flag)


def parse_args(argv=None):
    p = util.parser(__doc__)
    todo = p.add_mutually_exclusive_group(required=True)
    todo.add_argument('--make_toy', metavar='DIR',
                      help='write the toy data to DIR/toy_precomp (default: none; this or --from_karpathy)')
    todo.add_argument('--from_karpathy', metavar='FILE.json',
                      help="write captions and image names from Karpathy's split file FILE.json to "
                           "DATA/NAME (default: none; this or --make_toy)")
    p.add_argument('--data_path', metavar='DATA',
                   help='with --from_karpathy: the folder that holds NAME (default: none; required with it)')
    p.add_argument('--data_name', metavar='NAME',
                   help='with --from_karpathy: the dataset folder, e.g. f30k_precomp (default: none; required with it)')
    p.add_argument('--overwrite', action='store_true', help='replace files with other contents (with --make_toy: toy data of another --seed)')
    p.add_argument('--seed', type=util.seed, default=0, help='with --make_toy: random seed of the toy world')
    args = p.parse_args(argv)
    if args.from_karpathy and not (args.data_path and args.data_name):
        p.error('--from_karpathy needs --data_path and --data_name')
    if args.make_toy and (args.data_path or args.data_name):
        p.error('--data_path and --data_name go with --from_karpathy, not --make_toy')
    return args


def main(argv=None):
    args = parse_args(argv)
    with util.one_line_errors():
        if args.from_karpathy:
            return from_karpathy(args.from_karpathy, args.data_path, args.data_name, args.overwrite)
    return toy.main(['--seed', str(args.seed), *(['--overwrite'] if args.overwrite else []), '--', args.make_toy])


if __name__ == '__main__':
    main()
