"""SCAN "precomp" data (spec section 1): dataset, collate, loaders, and the toy demo data.

    python data.py --make_toy DIR [--seed 0]
    python data.py --from_karpathy dataset_flickr30k.json --data_path DATA --data_name f30k_precomp

The first writes ``DIR/toy_precomp/{train,dev,test,testall}_{ims.npy,caps.txt}`` (see
``make_toy``); the second ``DATA/NAME/{split}_{caps,image_names}.txt`` from Karpathy's split
file (see ``from_karpathy``), for your own region features in ``{split}_ims.npy``, image by image
in the order of ``{split}_image_names.txt``.
"""
import json
import ntpath
import os
import posixpath
import re

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import util
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


def _loader(dataset, batch_size, workers, shuffle, pin_memory):
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=workers > 0, collate_fn=collate_fn)


def get_loaders(data_path, data_name, vocab, batch_size, workers, labels=None, pin_memory=False):
    """-> (train loader, shuffled; val loader on the first 1,000 dev images)."""
    train = PrecompDataset(data_path, data_name, 'train', vocab, labels)
    dev = PrecompDataset(data_path, data_name, 'dev', vocab, labels, max_images=1000)
    return (_loader(train, batch_size, workers, True, pin_memory),
            _loader(dev, batch_size, workers, False, pin_memory))


def get_test_loader(split, data_path, data_name, vocab, batch_size, workers, labels=None,
                    pin_memory=False):
    """-> loader over all of ``split`` in file order."""
    dataset = PrecompDataset(data_path, data_name, split, vocab, labels)
    return _loader(dataset, batch_size, workers, False, pin_memory)


# Toy world: objects with prototype features, colours with attribute features. Every region of
# an object is prototype + colour + small noise, so "red dog" in a caption names a region.
OBJECTS = tuple('dog cat man woman boy girl horse bird car bike bus truck boat ball kite frisbee '
                'tree bench chair table umbrella hat shirt cup'.split())
COLOURS = tuple('red blue green yellow white black brown orange'.split())
PEOPLE = ('man', 'woman', 'boy', 'girl')  # coloured by their clothes: 'a man in red'
TEMPLATES = ('{a} and {b}', 'there is {a} next to {b}', '{a} plays near {b}', 'a photo of {a} with {b}',
             '{a} sits beside {b} on the ground', 'in this picture we see {a} and {b}', '{a} near {b}')
TOY_SPLITS = {'train': 3000, 'dev': 300, 'test': 200, 'testall': 500}


def _phrase(rng, obj, colour):
    """'a red dog' / 'an orange cat' / 'a dog , colored red ,' / 'a man dressed in red' / 'a dog'."""
    form = rng.integers(4)
    if form == 3:
        words = obj  # colour left out
    elif obj in PEOPLE:
        words = f'{obj} in {colour}' if form < 2 else f'{obj} dressed in {colour}'
    else:
        words = f'{colour} {obj}' if form < 2 else f'{obj} , colored {colour} ,'
    return ('an ' if words[0] in 'aeiou' else 'a ') + words


def _caption(rng, objs, colours):
    """One caption naming 2+ of the image's objects, in random order, with varied case/punctuation."""
    keep = rng.permutation(len(objs))[:rng.integers(2, len(objs) + 1)]
    parts = [_phrase(rng, objs[j], colours[j]) for j in keep]
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    if len(parts) == 3:  # 'a , b and c' or 'a next to b and c'
        parts = ([f'{parts[0]} , {parts[1]}', parts[2]] if ' and ' in template
                 else [parts[0], f'{parts[1]} and {parts[2]}'])
    cap = template.format(a=parts[0], b=parts[1]).replace(', ,', ',').rstrip(' ,')
    cap = cap[0].upper() + cap[1:] if rng.random() < 0.6 else cap
    return cap + ('', ' .', '.', '!')[rng.integers(4)]


def make_toy(out_dir: str, seed: int = 0, regions: int = 12, img_dim: int = 64, sizes=None) -> str:
    """Write the toy precomp folder -> its path. Same seed, same bytes. sizes: images per split
    (default TOY_SPLITS; tests pass smaller ones)."""
    rng = np.random.default_rng(seed)
    protos = np.maximum(rng.normal(size=(len(OBJECTS), img_dim)), 0) * 1.5   # (24, D)
    attrs = np.maximum(rng.normal(size=(len(COLOURS), img_dim)), 0) * 0.8    # (8, D)
    backgrounds = np.maximum(rng.normal(size=(4, img_dim)), 0) * 0.5         # (4, D) sky, grass, ...
    folder = os.path.join(out_dir, 'toy_precomp')
    os.makedirs(folder, exist_ok=True)
    for split, n_img in (sizes or TOY_SPLITS).items():
        ims = np.empty((n_img, regions, img_dim), np.float32)
        caps = []
        for i in range(n_img):
            objs = rng.choice(len(OBJECTS), size=rng.integers(2, 4), replace=False)
            colours = rng.integers(len(COLOURS), size=len(objs))
            feats = [protos[o] + attrs[c] for o, c in zip(objs, colours) for _ in range(rng.integers(1, 4))]
            feats += [backgrounds[rng.integers(4)] for _ in range(regions - len(feats))]
            noisy = np.stack(feats)[rng.permutation(regions)] + rng.normal(0, 0.1, (regions, img_dim))
            ims[i] = np.maximum(noisy, 0)  # non-negative, like bottom-up features
            caps += [_caption(rng, [OBJECTS[o] for o in objs], [COLOURS[c] for c in colours]) for _ in range(5)]
        np.save(os.path.join(folder, f'{split}_ims.npy'), ims)
        with open(os.path.join(folder, f'{split}_caps.txt'), 'w', encoding='utf-8') as f:
            f.write('\n'.join(caps) + '\n')
    return folder


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
    parts = re.split(r'[/\\]', name)
    if posixpath.isabs(name) or ntpath.isabs(name) or '..' in parts or '' in parts or not name.isprintable():
        raise ValueError(f"{where}: an image name must be a relative path on one line, without '..' or empty parts")
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


def _unchanged(path: str, content: bytes, overwrite: bool) -> bool:
    """True when path already holds content; ValueError when it holds other contents (not with overwrite)."""
    def same(p):
        with open(p, 'rb') as f:
            return f.read() == content
    if overwrite:  # identical files are still left as they are
        return os.path.exists(path) and same(path)
    return util.already_written(path, same, 'other contents', '--data_name')


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
        if name in seen:
            raise ValueError(f'{json_path}: images[{seen[name]}] and images[{i}] have the same name {name!r}')
        seen[name] = i
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
    kept = [path for path, content in files.items() if _unchanged(path, content, overwrite)]
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
    p.add_argument('--overwrite', action='store_true', help='with --from_karpathy: replace files with other contents')
    p.add_argument('--seed', type=int, default=0, help='with --make_toy: random seed of the toy world')
    args = p.parse_args(argv)
    if args.from_karpathy and not (args.data_path and args.data_name):
        p.error('--from_karpathy needs --data_path and --data_name')
    if args.make_toy and (args.data_path or args.data_name or args.overwrite):
        p.error('--data_path, --data_name and --overwrite go with --from_karpathy, not --make_toy')
    return args


def main(argv=None):
    args = parse_args(argv)
    with util.one_line_errors():
        if args.from_karpathy:
            return from_karpathy(args.from_karpathy, args.data_path, args.data_name, args.overwrite)
        folder = make_toy(args.make_toy, args.seed)
    sizes = ', '.join(f'{s} {n}' for s, n in TOY_SPLITS.items())
    print(f'toy data written to {folder}: images per split {sizes}; 5 captions each; '
          f'features (12 regions, 64 dims)')
    return folder


if __name__ == '__main__':
    main()
