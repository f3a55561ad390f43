"""The toy demo data: a small synthetic world in SCAN's precomp layout, for the demo and the tests.

    python toy.py DIR [--seed 0] [--overwrite]    (the same as: python data.py --make_toy DIR [--seed 0])

Writes ``DIR/toy_precomp/{train,dev,test,testall}_{ims.npy,caps.txt}`` (TOY_SPLITS images, 5
captions each, 12 regions of 64 dims). Same seed, same bytes: a rerun leaves identical files as
they are, and other files there (another seed) are refused without --overwrite. Objects have prototype features and
colours attribute features; every region of an object is prototype + colour + small noise, so
"red dog" in a caption names a region.
"""
import io
import os

import util  # first: it makes a Ctrl-C during the slow imports below one line
util.quiet_ctrl_c(__name__)

import numpy as np


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


def make_toy(out_dir: str, seed: int = 0, regions: int = 12, img_dim: int = 64, sizes=None,
             overwrite: bool = False) -> str:
    """Write the toy precomp folder -> its path. Same seed, same bytes. sizes: images per split
    (default TOY_SPLITS; tests pass smaller ones). Every file is made in memory and checked first:
    one that exists with other contents is a ValueError naming it and --overwrite (unless
    overwrite), before anything is written; identical ones are left as they are."""
    files = _toy_files(seed, regions, img_dim, sizes or TOY_SPLITS)
    folder = os.path.join(out_dir, 'toy_precomp')
    todo = {name: content for name, content in files.items()
            if not util.unchanged(os.path.join(folder, name), content, overwrite,
                                          'other toy data (another --seed?)', 'DIR')}
    os.makedirs(folder, exist_ok=True)
    for name, content in todo.items():
        util.atomic_write(os.path.join(folder, name), lambda f: f.write(content))
    return folder


def _toy_files(seed: int, regions: int, img_dim: int, sizes: dict) -> dict:
    """The toy world -> {file name: bytes} of every split's ims.npy and caps.txt."""
    rng = np.random.default_rng(seed)
    protos = np.maximum(rng.normal(size=(len(OBJECTS), img_dim)), 0) * 1.5   # (24, D)
    attrs = np.maximum(rng.normal(size=(len(COLOURS), img_dim)), 0) * 0.8    # (8, D)
    backgrounds = np.maximum(rng.normal(size=(4, img_dim)), 0) * 0.5         # (4, D) sky, grass, ...
    files = {}
    for split, n_img in sizes.items():
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
        buf = io.BytesIO()
        np.save(buf, ims)
        files[f'{split}_ims.npy'], files[f'{split}_caps.txt'] = buf.getvalue(), ('\n'.join(caps) + '\n').encode()
    return files


def parse_args(argv=None):
    p = util.parser(__doc__)
    p.add_argument('out_dir', metavar='DIR', help='write the toy data to DIR/toy_precomp')
    p.add_argument('--seed', type=util.seed, default=0, help='random seed of the toy world')
    p.add_argument('--overwrite', action='store_true', help='replace toy data of another seed in DIR/toy_precomp')
    return p.parse_args(argv)


def main(argv=None) -> str:
    """The command line (also behind data.py --make_toy) -> the folder written."""
    args = parse_args(argv)
    with util.one_line_errors():
        folder = make_toy(args.out_dir, args.seed, overwrite=args.overwrite)
    sizes = ', '.join(f'{s} {n}' for s, n in TOY_SPLITS.items())
    print(f'toy data written to {folder}: images per split {sizes}; 5 captions each; '
          f'features (12 regions, 64 dims)')
    return folder


if __name__ == '__main__':
    main()
