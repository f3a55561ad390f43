"""Raw images -> a precomp feature file (SCAN's layout): 36 regions of 2048 dims per image.

    python features.py --data_path DATA --data_name f30k_precomp --split test --image_root flickr30k-images
    python features.py ... --regions boxes     # detector boxes; also writes {split}_boxes.npy

Images in the order of DATA/NAME/{split}_image_names.txt (paths relative to --image_root); without
that file, every image directly in --image_root, sorted by name, and the names file is written.
Output: DATA/NAME/{split}_ims.npy, float32 (n_images, 36, 2048): a ResNet-152 trunk's last feature
map (the image's shorter side resized to --image_size, its aspect kept) average-pooled to a 6x6
grid (row-major) or, with --regions boxes, RoI-aligned on up to 36 Faster R-CNN boxes (found at the
detector's training scale; class-agnostic NMS; free slots get grid cells spread over the image).
Beside it, {split}_ims.json records the settings that made it (and ties {split}_boxes.npy to it).
The whole output is reserved on disk first; it is written batch by batch into
{split}_ims.npy.partial, with progress in {split}_ims.npy.partial.json: a run stopped in any way
continues where it stopped when called again with the same arguments, and the result equals an
uninterrupted run's bit for bit (on the same machine: the thread count can change the last bits).
"""
# This file owns the command line, the settings that make the features' bits, the run's phases and
# its write loop; imagefiles.py decodes and checks the images, extractor.py holds the networks and
# the per-batch extraction (also used by photo.py for uploads), featstore.py the output files, the
# resume state and the settings record. (A comment, not the docstring: --help prints that.)
import time

STARTED = time.time()  # before torch's import (seconds of its own): the run's time covers it

import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import util  # noqa: E402  (first: it makes a Ctrl-C during the slow imports below one line)
util.quiet_ctrl_c(__name__)

import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from extractor import DIM, NMS_IOU, RECIPE, R, build_models, extract  # noqa: E402
from featstore import finish, open_partials, remove_partials, resume_point  # noqa: E402
from imagefiles import LONG_CAP, Images, check_images, collate, read_names  # noqa: E402
from progress import duration  # noqa: E402


# --- the write loop

@torch.inference_mode()
def write_features(loader, arrays: list, state: dict, state_path: str, trunk, detector, device):
    """Fill arrays from image state['done'] on, batch by batch; after each batch is flushed to
    disk, state['done'] is saved (atomically) to state_path."""
    with util.progress(total=len(arrays[0]) - state['done'], desc='features', unit='img') as bar:
        for xs, dets in loader:
            i0, i1 = state['done'], state['done'] + len(xs)
            feats, boxes = extract(trunk, detector, xs, dets, device)
            arrays[0][i0:i1] = feats.cpu().numpy()  # (n, 36, 2048)
            if boxes is not None:
                arrays[1][i0:i1] = boxes.cpu().numpy()  # (n, 36, 4)
            for a in arrays:
                a.flush()
            state['done'] = i1
            util.atomic_write(state_path, lambda f: f.write(json.dumps(state).encode()))
            bar.update(len(xs))


# --- the run's time

def seconds(t: float) -> str:
    """'4.2 s' under a minute, else progress.duration's '3 min 05 s'."""
    return f'{t:.1f} s' if t < 60 else duration(t)


class Clock:
    """The run's phases, each announced on stderr as it starts (no silent minute), and one summary
    of where the whole run's time went, from `started` (the process's start when run as a script)
    to the end: the phases' times add up to it."""

    def __init__(self, started=None):
        self.marks = ([('start-up', started)] if started is not None else []) + [('setup', time.time())]

    def phase(self, name: str, line: str):
        print(line, file=sys.stderr, flush=True)
        self.marks.append((name, time.time()))

    def spans(self) -> list:
        """[(phase, seconds)] from the first mark to now: they add up to the run's time."""
        ends = [t for _, t in self.marks[1:]] + [time.time()]
        return [(name, end - t) for (name, t), end in zip(self.marks, ends)]


# --- command line

def parse_args(argv=None):
    p = util.parser(__doc__)
    p.add_argument('--data_path', required=True, metavar='DATA', help='folder holding NAME')
    p.add_argument('--data_name', required=True, metavar='NAME', help='dataset folder, e.g. f30k_precomp')
    p.add_argument('--split', required=True, help='train, dev, test, testall, ...')
    p.add_argument('--image_root', required=True, metavar='DIR', help='folder the image names are relative to')
    p.add_argument('--regions', default='grid', choices=('grid', 'boxes'),
                   help='6x6 grid cells, or Faster R-CNN boxes (filled up with grid cells)')
    p.add_argument('--weights', default='DEFAULT', metavar='DEFAULT|none|FILE',
                   help="ResNet-152: torchvision's ImageNet weights (downloaded once), random from --seed "
                        '(tests, timing), or a local state_dict .pth')
    p.add_argument('--detector_weights', metavar='DEFAULT|none|FILE',
                   help='--regions boxes: the Faster R-CNN, as --weights (default: none with --weights none, '
                        'else DEFAULT)')
    p.add_argument('--image_size', type=util.positive_int, default=448,
                   help="the ResNet input's shorter side; the aspect is kept, the longer side at most 1333/800 of it")
    p.add_argument('--detector_size', type=util.positive_int,
                   help="--regions boxes: the detector input's shorter side, the longer at most 1333/800 of it "
                        "(default: 800, the scale torchvision's COCO weights were trained at; smaller is faster "
                        'and finds fewer small objects)')
    p.add_argument('--max_pixels', type=util.positive_int, default=64_000_000,
                   help='refuse images with more pixels (JPEGs: after decoding at a reduced size); bounds '
                        'the memory per image (about 1 GB per worker at the default)')
    p.add_argument('--batch_size', type=util.positive_int, default=32, help='images per forward pass')
    p.add_argument('--workers', type=util.nonneg_int, default=2, help='image decoding processes')
    p.add_argument('--device', help='cuda, cpu or mps (default: cuda when present, else mps, else cpu)')
    p.add_argument('--seed', type=util.seed, default=0, help='random weights of --weights none')
    p.add_argument('--overwrite', action='store_true',
                   help='replace an existing output (and remove the boxes of a boxes run), restart a partial run')
    args = p.parse_args(argv)
    if args.image_size < 32:
        p.error(f'--image_size {args.image_size}: at least 32 (ResNet-152 reduces it 32 times)')
    for flag in ('detector_weights', 'detector_size'):
        if getattr(args, flag) is not None and args.regions != 'boxes':
            p.error(f'--{flag} goes with --regions boxes')
    args.detector_size = args.detector_size or 800
    if args.detector_weights is None:
        args.detector_weights = 'none' if args.weights == 'none' else 'DEFAULT'
    return args


def _settings(args, names: list, device) -> dict:
    """What makes the features' bits: a partial run continues only under the same settings, and
    the record {split}_ims.json keeps them (to put another image through the same extractor)."""
    real = {w: w if w in ('DEFAULT', 'none') else os.path.realpath(w) for w in (args.weights, args.detector_weights)}
    boxes = args.regions == 'boxes'
    return {'recipe': RECIPE, 'regions': args.regions, 'trunk': 'resnet152', 'weights': real[args.weights],
            'image_size': args.image_size, 'long_cap': LONG_CAP,
            'detector': 'fasterrcnn_resnet50_fpn' if boxes else None,
            'detector_weights': real[args.detector_weights] if boxes else None,
            'detector_size': args.detector_size if boxes else None, 'nms_iou': NMS_IOU if boxes else None,
            'batch_size': args.batch_size, 'seed': args.seed, 'device': device.type,
            'image_root': os.path.realpath(args.image_root),
            'names_sha256': hashlib.sha256('\n'.join(names).encode()).hexdigest()}


def _record(settings: dict, args, n: int) -> dict:
    """{split}_ims.json: the settings that made the features file, its fingerprints added by finish."""
    return {'made_by': 'features.py', 'settings': settings, 'max_pixels': args.max_pixels, 'n_images': n,
            'versions': {'torch': torch.__version__, 'torchvision': torchvision.__version__, 'pillow': Image.__version__},
            'written': time.strftime('%Y-%m-%dT%H:%M:%S%z')}


def load_models(args, device, clock: Clock) -> tuple:
    """-> the trunk, the detector (None for grid regions), on device."""
    boxes = args.regions == 'boxes'
    clock.phase('models', f'loading ResNet-152 (--weights {args.weights})' +
                (f' and Faster R-CNN (--detector_weights {args.detector_weights})' if boxes else ''))
    if args.weights == 'none' or (boxes and args.detector_weights == 'none'):
        print(f'random weights (--weights none, --seed {args.seed}): for tests and timing only, not for '
              f'matching', file=sys.stderr)
    if device.type == 'cuda':  # fp32 products and convolutions, the same algorithm every run (exact resume)
        util.set_precision('fp32')
        torch.backends.cudnn.deterministic = True
    return build_models(vars(args), device)


def main(argv=None, started=None):
    """started: when the process started (as a script: before torch's import), for the run's time."""
    args = parse_args(argv)
    clock = Clock(started)
    with util.one_line_errors():
        device = util.pick_device(args.device)
        folder = os.path.join(args.data_path, args.data_name)
        names_path = os.path.join(folder, f'{args.split}_image_names.txt')
        names, listed = read_names(names_path, args.image_root)
        paths = {kind: os.path.join(folder, f'{args.split}_{kind}.npy') for kind in ('ims', 'boxes')}
        paths['record'] = os.path.join(folder, f'{args.split}_ims.json')
        outs = [paths['ims'], paths['boxes']] if args.regions == 'boxes' else [paths['ims']]  # features first
        state = {'settings': _settings(args, names, device), 'done': 0}
        state['done'] = done = resume_point(paths, outs, state['settings'], args.overwrite)
        util.check_writable(outs[0], '--data_path')
        clock.phase('disk', f'reserving the output on disk: {", ".join(f"{p}.partial" for p in outs)}')
        shapes = [(len(names), R, DIM), (len(names), R, 4)][:len(outs)]  # features, boxes
        arrays = open_partials(outs, shapes, done)
        images = [os.path.join(args.image_root, n) for n in names[done:]]
        sizes = dict(image_size=args.image_size, max_pixels=args.max_pixels,
                     detector_size=args.detector_size if args.regions == 'boxes' else 0)
        try:
            trunk, detector = load_models(args, device, clock)
            clock.phase('image check', f'checking {len(images)} images (decoding each once)')
            check_images(Images(images, check=True, **sizes), names[done:], args.image_root, args.workers)
        except BaseException:
            if not done:  # nothing of this run is kept
                del arrays
                remove_partials(outs)
            raise
        if listed:
            util.atomic_write(names_path, lambda f: f.write(''.join(f'{n}\n' for n in names).encode()))
        state_path = f'{outs[0]}.partial.json'  # first: a killed run never leaves a wrong one
        util.atomic_write(state_path, lambda f: f.write(json.dumps(state).encode()))
        loader = DataLoader(Images(images, **sizes), args.batch_size, num_workers=args.workers, collate_fn=collate,
                            pin_memory=device.type == 'cuda')
        clock.phase('features', f'computing the features of {len(images)} images on {device}')
        write_features(loader, arrays, state, state_path, trunk, detector, device)
        del arrays  # unmapped: flushed and closed
        clock.phase('finish', f'fingerprinting and renaming into place: {", ".join(outs)}')
        finish(paths, outs, _record(state['settings'], args, len(names)))
        os.remove(state_path)
        spans = clock.spans()
        rate = len(images) / max(dict(spans)['features'], 1e-9)
        resumed = f' (resumed after {done})' if done else ''
        print(f'{len(images)} images{resumed} in {seconds(sum(t for _, t in spans))}, the whole run '
              f'({", ".join(f"{name} {seconds(t)}" for name, t in spans)}); {rate:.2f} images/s in the '
              f'features phase: {", ".join(outs)}')
    return outs


if __name__ == '__main__':
    main(started=STARTED)
