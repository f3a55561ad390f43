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
import time

STARTED = time.time()  # before torch's import (seconds of its own): the run's time covers it

import errno  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import util  # noqa: E402  (first: it makes a Ctrl-C during the slow imports below one line)
util.quiet_ctrl_c(__name__)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import checkpoint  # noqa: E402
from data import check_image_names, read_image_names  # noqa: E402

R, GRID, DIM = 36, 6, 2048  # regions = GRID x GRID cells, ResNet-152's last channels
RECIPE = 2  # bumped when the same flags give other features (2: aspect kept, detector at 800, cells spread)
EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp', '.webp')
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # ImageNet
LONG_CAP = 1333 / 800  # longer side at most this times the shorter one's size (torchvision detection's ratio)
NMS_IOU = 0.5


# --- images: the names list, the decode check, the trunk's and the detector's inputs

def read_names(path: str, image_root: str) -> tuple:
    """{split}_image_names.txt -> (names, False); without that file, the image files directly in
    image_root sorted by name -> (names, True). Either way checked as data.check_image_names does
    inside image_root: ValueError naming the line of an empty, absolute, '..', repeated, ... name."""
    if not os.path.isdir(image_root):
        raise ValueError(f'--image_root {image_root}: no such folder')
    if os.path.isfile(path):
        return read_image_names(path, root=image_root, root_flag='--image_root'), False
    root = os.path.realpath(image_root)
    names = sorted(n for n in os.listdir(root)
                   if n.lower().endswith(EXTENSIONS) and os.path.isfile(os.path.join(root, n)))
    if not names:
        raise ValueError(f'--image_root {image_root} holds no {"/".join(EXTENSIONS)} files (and there is no {path})')
    return check_image_names(names, f'{path} (to be written from --image_root)', root=image_root,
                             root_flag='--image_root'), True


def scaled_size(size: tuple, short: int) -> tuple:
    """(w, h) -> (w', h'), the aspect kept: the shorter side `short`, unless the longer one would
    pass LONG_CAP * short, then that (the rule of torchvision's detection transform)."""
    w, h = size
    scale = min(short / min(w, h), LONG_CAP * short / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def load_rgb(path: str, max_pixels: int = 0, short: int = 0) -> Image.Image:
    """Decode an image, EXIF orientation applied -> RGB (greyscale, CMYK and palettes converted;
    transparent pixels shown over white). A JPEG is decoded at 1/2, 1/4 or 1/8 of its size (Pillow's
    draft mode) where its shorter side stays >= short. ValueError, from the header before any
    decoding, when the decoded image would have more than max_pixels pixels (0: no limit): this
    check replaces Pillow's decompression-bomb warning, which is never printed."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if short:
                img.draft(None, (short, short))  # a no-op for other formats
            w, h = img.size
            if max_pixels and w * h > max_pixels:
                raise ValueError(f'{w} x {h} = {w * h / 1e6:.1f} megapixels, over --max_pixels {max_pixels}')
            img = ImageOps.exif_transpose(img)  # a decoded copy
    if img.mode in ('P', 'LA', 'PA', 'RGBA', 'La', 'RGBa') or 'transparency' in img.info:
        img = Image.alpha_composite(Image.new('RGBA', img.size, 'white'), img.convert('RGBA'))
    return img.convert('RGB')


def resized(img: Image.Image, short: int) -> Tensor:
    """RGB picture -> (3, h, w) uint8, resized (antialiased) to scaled_size(img.size, short)."""
    pixels = np.asarray(img.resize(scaled_size(img.size, short), Image.Resampling.BILINEAR))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # (3, h, w)


class Images(Dataset):
    """Image i -> (x (3, h, w) normalized, shorter side image_size; the detector's input (3, h', w')
    uint8, shorter side detector_size, or None without one). check=True: '' or why image i cannot
    be used. Each is decoded once, JPEGs at the smallest draft size both inputs allow."""

    def __init__(self, paths: list, image_size: int, max_pixels: int, detector_size: int = 0,
                 check: bool = False):
        self.paths, self.image_size, self.detector_size = paths, image_size, detector_size
        self.max_pixels, self.check = max_pixels, check

    def __len__(self):
        return len(self.paths)

    def load(self, i: int) -> Image.Image:
        """Image i decoded as load_rgb does, JPEGs no larger than both inputs need."""
        return load_rgb(self.paths[i], self.max_pixels, max(self.image_size, self.detector_size))

    def __getitem__(self, i: int):
        if self.check:
            try:
                self.load(i)
                return ''
            except FileNotFoundError:
                return 'missing'
            except UnidentifiedImageError:
                return 'not an image file'
            except Exception as e:  # anything else PIL or the OS raise on a bad file; too many pixels
                return ' '.join(str(e).split()) or type(e).__name__
        img = self.load(i)
        x = resized(img, self.image_size).float() / 255  # (3, h, w)
        det = resized(img, self.detector_size) if self.detector_size else None
        return (x - MEAN[:, None, None]) / STD[:, None, None], det


def collate(batch) -> tuple:
    """-> n trunk inputs (3, h, w) (sizes differ), n detector inputs (or Nones)."""
    return [x for x, _ in batch], [det for _, det in batch]


def check_images(images: Images, names: list, root: str, workers: int):
    """Open and fully decode every image (in `workers` processes): ValueError listing all those
    that are missing, unreadable, truncated or over --max_pixels (the first 20 and a count)."""
    loader = DataLoader(images, batch_size=None, num_workers=workers)
    reasons = util.progress(loader, total=len(names), desc='checking images', unit='img')
    bad = [f'{name} ({why})' for name, why in zip(names, reasons) if why]
    if bad:
        more = f'; and {len(bad) - 20} more' if len(bad) > 20 else ''
        raise ValueError(f'{len(bad)} of {len(names)} images in --image_root {root} cannot be used, '
                         f'nothing written: {"; ".join(bad[:20])}{more}')


# --- models: the ResNet-152 trunk, the detector, their weights

def _state_dict(weights: str, published, flag: str) -> dict:
    """--weights DEFAULT (torchvision's `published` ones, downloaded once) or FILE -> a state_dict."""
    if weights == 'DEFAULT':
        folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
        cached = os.path.isfile(os.path.join(folder, os.path.basename(published.url)))
        print(f"{flag} DEFAULT: torchvision's {published}, {'cached in' if cached else 'downloading once to'} "
              f'{folder}', file=sys.stderr, flush=True)
        try:
            return published.get_state_dict(progress=True, check_hash=True)
        except Exception as e:  # no network, a proxy, a corrupt download
            raise ValueError(f'{flag} DEFAULT: cannot get {published.url} ({" ".join(str(e).split())[:200]}); '
                             f'offline, download it elsewhere and pass {flag} FILE') from None
    if not os.path.isfile(weights):
        raise ValueError(f'{flag} {weights}: no such file')
    return checkpoint.safe_load(weights, flag, 'PyTorch state_dict file')


def load_weights(model: nn.Module, weights: str, published, flag: str) -> nn.Module:
    """Load --weights (DEFAULT, FILE) into model, or keep its random initialization ('none');
    ValueError naming the file when it does not fit."""
    if weights == 'none':
        return model
    state, expected = _state_dict(weights, published, flag), model.state_dict()
    if not isinstance(state, dict):
        raise ValueError(f'{flag} {weights}: holds a {type(state).__name__}, not a state_dict')
    bad = ([f'{k} has shape {tuple(getattr(v, "shape", ()))}, expected {tuple(expected[k].shape)}'
            for k, v in state.items() if k in expected and getattr(v, 'shape', None) != expected[k].shape]
           + [f'{k} missing' for k in expected if k not in state]
           + [f'unexpected {k}' for k in state if k not in expected and not k.endswith('num_batches_tracked')])
    if bad:
        raise ValueError(f'{flag} {weights}: not {type(model).__name__} weights ({bad[0]}; {len(bad)} mismatches)')
    model.load_state_dict(state)
    return model


def build_trunk(weights: str, seed: int) -> nn.Module:
    """ResNet-152 up to layer4, eval mode: (n, 3, h, w) -> (n, 2048, h/32, w/32)."""
    torch.manual_seed(seed)  # --weights none: the same random weights every run
    model = load_weights(torchvision.models.resnet152(), weights, torchvision.models.ResNet152_Weights.DEFAULT,
                         '--weights')
    return nn.Sequential(*list(model.children())[:-2]).eval()


def build_detector(weights: str, seed: int, size: int) -> nn.Module:
    """torchvision's fasterrcnn_resnet50_fpn (91 COCO classes), eval mode, its own transform resizing
    the shorter side to `size` (800: the scale its COCO weights were trained at) and capping the
    longer one at LONG_CAP times that (1333)."""
    torch.manual_seed(seed)
    backbone = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(backbone_name='resnet50', weights=None)
    model = torchvision.models.detection.FasterRCNN(backbone, num_classes=91, min_size=size,
                                                    max_size=round(size * LONG_CAP))
    return load_weights(model, weights, torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1,
                        '--detector_weights').eval()


def grid_cells() -> Tensor:
    """The 6x6 grid as boxes (36, 4) (x1, y1, x2, y2) in [0, 1]: cell r = row r // 6, column r % 6."""
    r = torch.arange(R)
    col, row = r % GRID, r // GRID
    return torch.stack([col, row, col + 1, row + 1], 1).float() / GRID


def farthest_first() -> list:
    """The 36 cell numbers in farthest-first order: cell 14 (row 2, column 2, next to the centre),
    then each time the cell farthest from those before (the first such in row-major order)."""
    rc = torch.stack([torch.arange(R) // GRID, torch.arange(R) % GRID], 1).float()  # (36, 2) row, column
    order, dist = [14], (rc - rc[14]).norm(dim=1)  # (36,) distance to the nearest cell taken
    while len(order) < R:
        order.append(int(dist.argmax()))
        dist = torch.minimum(dist, (rc - rc[order[-1]]).norm(dim=1))
    return order


SPREAD = farthest_first()


def spread_cells(k: int) -> Tensor:
    """k grid cells spread over the whole grid (k, 4), in row-major order: the first k of SPREAD,
    so 1 is the cell next to the centre, 5 add the four corners, 34 leave out two cells between others."""
    return grid_cells()[sorted(SPREAD[:k])]


def detect(detector, img: Tensor) -> Tensor:
    """img (3, h, w) uint8 -> boxes (36, 4) in [0, 1]: the best detections of any class after NMS
    across classes (IoU 0.5), then grid cells spread over the image in the slots left free."""
    h, w = img.shape[1:]
    found = detector([img.float() / 255])[0]  # one image: its resizing pads nothing
    keep = torchvision.ops.nms(found['boxes'], found['scores'], NMS_IOU)[:R]  # best first
    boxes = (found['boxes'][keep] / torch.tensor([w, h, w, h], device=img.device)).clamp(0, 1)  # (k, 4)
    return torch.cat([boxes, spread_cells(R - len(boxes)).to(boxes)])


def trunk_maps(trunk: nn.Module, xs: list) -> list:
    """n inputs (3, h, w) of any sizes -> n maps (2048, ceil(h/32), ceil(w/32)): one forward pass
    for the inputs of each size, in the order they come (so a resumed run batches as the first did)."""
    maps, by_size = [None] * len(xs), {}
    for k, x in enumerate(xs):
        by_size.setdefault(tuple(x.shape), []).append(k)
    for ks in by_size.values():
        for k, fmap in zip(ks, trunk(torch.stack([xs[k] for k in ks]))):  # (len(ks), 2048, h/32, w/32)
            maps[k] = fmap
    return maps


def pool(fmap: Tensor, size: tuple, boxes=None) -> Tensor:
    """fmap (2048, fh, fw) of an input of size (h, w) -> (36, 2048): averaged over the 6x6 grid, or
    RoI-aligned (7x7, averaged) on boxes (36, 4) (x1, y1, x2, y2) in [0, 1] of the image: a pixel
    x lies in map cell x / 32 (ResNet's stride), on both axes."""
    if boxes is None:
        return F.adaptive_avg_pool2d(fmap, GRID).flatten(1).T  # (2048, 36) -> (36, 2048)
    h, w = size
    pixels = boxes * torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)  # (36, 4)
    pooled = torchvision.ops.roi_align(fmap[None], [pixels], output_size=7, spatial_scale=1 / 32,
                                       sampling_ratio=2, aligned=True)  # (36, 2048, 7, 7)
    return pooled.mean((2, 3))  # (36, 2048)


def regions(trunk: nn.Module, xs: list, boxes=None) -> Tensor:
    """n inputs (3, h, w) -> (n, 36, 2048): each input's map pooled on the grid, or on its boxes
    (a list of n (36, 4) in [0, 1])."""
    maps = trunk_maps(trunk, xs)
    return torch.stack([pool(fmap, x.shape[1:], None if boxes is None else boxes[k])
                        for k, (x, fmap) in enumerate(zip(xs, maps))])  # (n, 36, 2048)


# --- output: the reserved partial files, resume, the write loop, the settings record

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


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


def open_partials(outs: list, n: int, done: int) -> list:
    """The memory-mapped {split}_ims.npy.partial (n, 36, 2048) [and _boxes (n, 36, 4)], new when
    done = 0, every block reserved on disk. ValueError naming the file and the space it lacks on a
    full disk (new files removed again; other files untouched)."""
    shapes, arrays = [(n, R, DIM), (n, R, 4)], []
    try:
        for p, shape in zip(outs, shapes):
            path = f'{p}.partial'
            arrays.append(np.lib.format.open_memmap(path, 'r+') if done else
                          np.lib.format.open_memmap(path, 'w+', np.float32, shape))
            reserve(path)
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        del arrays[:]  # unmapped
        if not done:
            remove_partials(outs)
        need = sum(4 * int(np.prod(shape)) for shape in shapes[:len(outs)]) / 1e6
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 1e6
        raise ValueError(f'{path}: no space left on that disk for the output ({need:,.1f} MB for {n} images, '
                         f'{free:,.1f} MB free there): nothing computed, the files already there are intact') from None
    return arrays


def remove_partials(outs: list):
    """Remove this run's .partial files (those that exist)."""
    for p in outs:
        if os.path.exists(f'{p}.partial'):
            os.remove(f'{p}.partial')


@torch.inference_mode()
def write_features(loader, arrays: list, state: dict, state_path: str, trunk, detector, device):
    """Fill arrays from image state['done'] on, batch by batch; after each batch is flushed to
    disk, state['done'] is saved (atomically) to state_path."""
    with util.progress(total=len(arrays[0]) - state['done'], desc='features', unit='img') as bar:
        for xs, dets in loader:
            i0, i1 = state['done'], state['done'] + len(xs)
            boxes = None if detector is None else [detect(detector, det.to(device)) for det in dets]
            arrays[0][i0:i1] = regions(trunk, [x.to(device) for x in xs], boxes).cpu().numpy()  # (n, 36, 2048)
            if boxes is not None:
                arrays[1][i0:i1] = torch.stack(boxes).cpu().numpy()  # (n, 36, 4)
            for a in arrays:
                a.flush()
            state['done'] = i1
            util.atomic_write(state_path, lambda f: f.write(json.dumps(state).encode()))
            bar.update(len(xs))


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


# --- the run's time

def seconds(t: float) -> str:
    """'4.2 s' under a minute, else util.duration's '3 min 05 s'."""
    return f'{t:.1f} s' if t < 60 else util.duration(t)


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
    if device.type == 'cuda':  # fp32 convolutions, the same algorithm every run (exact resume)
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = False, True
    trunk = build_trunk(args.weights, args.seed).to(device)
    detector = build_detector(args.detector_weights, args.seed, args.detector_size).to(device) if boxes else None
    return trunk, detector


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
        arrays = open_partials(outs, len(names), done)
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
