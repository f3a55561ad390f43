"""SCAN "precomp" data (the layout in the README's Real data section): the memory-mapped features,
the dataset, collate and the training loader. Its command line writes data files: Karpathy's
split files' captions (karpathy.py) or the toy data (toy.py).

    python data.py --from_karpathy dataset_flickr30k.json --data_path DATA --data_name f30k_precomp
    python data.py --make_toy DIR [--seed 0]

The first writes ``DATA/NAME/{split}_{caps,image_names}.txt`` from Karpathy's split file (see
``from_karpathy``), for your own region features in ``{split}_ims.npy``, image by image in the
order of ``{split}_image_names.txt`` (read back by ``image_names.read_image_names``); the second is ``python
toy.py DIR``: the toy demo data in ``DIR/toy_precomp`` (see toy.py).
"""
import os

import util  # first: it makes a Ctrl-C during the slow imports below one line
util.quiet_ctrl_c(__name__)

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import karpathy
import parallel
import toy
from labels import image_targets
from vocab import encode, read_captions, tokenize_all

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

    def image_captions(self, i: int) -> list:
        """Image i's captions, as written in the captions file (im_div of them)."""
        return self.raw_captions[i * self.im_div:(i + 1) * self.im_div]

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
            return karpathy.from_karpathy(args.from_karpathy, args.data_path, args.data_name, args.overwrite)
    return toy.main(['--seed', str(args.seed), *(['--overwrite'] if args.overwrite else []), '--', args.make_toy])


if __name__ == '__main__':
    main()
