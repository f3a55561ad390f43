"""Raw images -> a precomp feature file (spec section 1): 36 regions of 2048 dims per image.

    python features.py --data_path DATA --data_name f30k_precomp --split test --image_root flickr30k-images
    python features.py ... --regions boxes     # detector boxes; also writes {split}_boxes.npy

Images in the order of DATA/NAME/{split}_image_names.txt (paths relative to --image_root); without
that file, every image directly in --image_root, sorted by name, and the names file is written.
Output: DATA/NAME/{split}_ims.npy, float32 (n_images, 36, 2048): a ResNet-152 trunk's last feature
map, average-pooled to a 6x6 grid (row-major) or, with --regions boxes, RoI-aligned on up to 36
Faster R-CNN boxes (class-agnostic NMS; free slots get grid cells). It is written batch by batch
into {split}_ims.npy.partial, with progress in {split}_ims.npy.partial.json: a run stopped in any
way continues where it stopped when called again with the same arguments, and the result equals
an uninterrupted run's bit for bit (on the same machine: the thread count can change the last bits).
"""
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import checkpoint
import util
from data import check_image_names, read_image_names

R, GRID, DIM = 36, 6, 2048  # regions = GRID x GRID cells, ResNet-152's last channels
EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp', '.webp')
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # ImageNet


# --- images: the names list, the decode check, RGB inputs

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


def load_rgb(path: str) -> Image.Image:
    """Fully decode an image, EXIF orientation applied -> RGB (greyscale, CMYK and palettes
    converted; transparent pixels shown over white)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)  # a decoded copy
    if img.mode in ('P', 'LA', 'PA', 'RGBA', 'La', 'RGBa') or 'transparency' in img.info:
        img = Image.alpha_composite(Image.new('RGBA', img.size, 'white'), img.convert('RGBA'))
    return img.convert('RGB')


class Images(Dataset):
    """Image i -> (x (3, S, S) normalized, the RGB image (3, h, w) uint8 or None); with size None
    (the check) -> '' or why it cannot be decoded."""

    def __init__(self, paths: list, size=None, originals: bool = False):
        self.paths, self.size, self.originals = paths, size, originals

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i: int):
        if self.size is None:
            try:
                load_rgb(self.paths[i])
                return ''
            except FileNotFoundError:
                return 'missing'
            except UnidentifiedImageError:
                return 'not an image file'
            except Exception as e:  # anything else PIL or the OS raise on a bad file
                return ' '.join(str(e).split()) or type(e).__name__
        img = torch.from_numpy(np.array(load_rgb(self.paths[i]))).permute(2, 0, 1)  # (3, h, w) uint8
        x = F.interpolate(img[None].float() / 255, size=(self.size, self.size), mode='bilinear',
                          antialias=True, align_corners=False)[0]  # (3, S, S)
        return (x - MEAN[:, None, None]) / STD[:, None, None], img if self.originals else None


def collate(batch):
    """-> x (n, 3, S, S), list of n originals (or Nones)."""
    return torch.stack([x for x, _ in batch]), [img for _, img in batch]


def check_images(root: str, names: list, workers: int):
    """Open and fully decode every image (in `workers` processes): ValueError listing all those
    that are missing, unreadable or truncated (the first 20 and a count)."""
    loader = DataLoader(Images([os.path.join(root, n) for n in names]), batch_size=None, num_workers=workers)
    reasons = util.progress(loader, total=len(names), desc='checking images', unit='img')
    bad = [f'{name} ({why})' for name, why in zip(names, reasons) if why]
    if bad:
        more = f'; and {len(bad) - 20} more' if len(bad) > 20 else ''
        raise ValueError(f'{len(bad)} of {len(names)} images in --image_root {root} cannot be decoded, '
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
    """ResNet-152 up to layer4, eval mode: (n, 3, S, S) -> (n, 2048, S/32, S/32)."""
    torch.manual_seed(seed)  # --weights none: the same random weights every run
    model = load_weights(torchvision.models.resnet152(), weights, torchvision.models.ResNet152_Weights.DEFAULT,
                         '--weights')
    return nn.Sequential(*list(model.children())[:-2]).eval()


def build_detector(weights: str, seed: int, image_size: int) -> nn.Module:
    """torchvision's fasterrcnn_resnet50_fpn (91 COCO classes), eval mode, its resizing set from
    image_size (shorter side, and torchvision's 800:1333 cap on the longer one)."""
    torch.manual_seed(seed)
    backbone = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(backbone_name='resnet50', weights=None)
    model = torchvision.models.detection.FasterRCNN(backbone, num_classes=91, min_size=image_size,
                                                    max_size=image_size * 1333 // 800)
    return load_weights(model, weights, torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1,
                        '--detector_weights').eval()


def grid_cells() -> Tensor:
    """The 6x6 grid as boxes (36, 4) (x1, y1, x2, y2) in [0, 1]: cell r = row r // 6, column r % 6."""
    r = torch.arange(R)
    col, row = r % GRID, r // GRID
    return torch.stack([col, row, col + 1, row + 1], 1).float() / GRID


def detect(detector, img: Tensor) -> Tensor:
    """img (3, h, w) uint8 -> boxes (36, 4) in [0, 1]: the best detections of any class after NMS
    across classes (IoU 0.5), then grid cells (row-major) in the slots left free."""
    h, w = img.shape[1:]
    found = detector([img.float() / 255])[0]  # one image: its resizing pads nothing
    keep = torchvision.ops.nms(found['boxes'], found['scores'], 0.5)[:R]  # best first
    boxes = (found['boxes'][keep] / torch.tensor([w, h, w, h], device=img.device)).clamp(0, 1)  # (k, 4)
    return torch.cat([boxes, grid_cells().to(boxes)[:R - len(boxes)]])


def regions(trunk: nn.Module, x: Tensor, boxes=None) -> Tensor:
    """x (n, 3, S, S) -> (n, 36, 2048): the trunk's map average-pooled on the 6x6 grid, or
    RoI-aligned (7x7, averaged) on boxes, a list of n (36, 4) in [0, 1]."""
    fmap = trunk(x)  # (n, 2048, S/32, S/32)
    if boxes is None:
        return F.adaptive_avg_pool2d(fmap, GRID).flatten(2).transpose(1, 2)  # (n, 36, 2048)
    size = x.shape[-1]
    pooled = torchvision.ops.roi_align(fmap, [b * size for b in boxes], output_size=7,
                                       spatial_scale=fmap.shape[-1] / size, sampling_ratio=2, aligned=True)
    return pooled.mean((2, 3)).view(len(x), R, DIM)  # (n * 36, 2048, 7, 7) -> (n, 36, 2048)


# --- output: partial files, resume, the write loop

def resume_point(outs: list, settings: dict, overwrite: bool) -> int:
    """Images an interrupted run with these settings already wrote (0: start afresh). ValueError
    for an existing output or a partial run made with other settings (unless overwrite)."""
    existing = [p for p in outs if os.path.exists(p)]
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
        why = 'another list of images' if k == 'names_sha256' else f'{k} {old.get(k)} then, {settings[k]} now'
        raise ValueError(f'{outs[0]}.partial is a partial run made with other arguments ({why}): delete it '
                         f'or pass --overwrite to start again')
    return done if all(os.path.isfile(f'{p}.partial') for p in outs) else 0


def open_partials(outs: list, n: int, done: int) -> list:
    """The memory-mapped {split}_ims.npy.partial (n, 36, 2048) [and _boxes (n, 36, 4)], new when done = 0."""
    if done:
        return [np.lib.format.open_memmap(f'{p}.partial', 'r+') for p in outs]
    shapes = [(n, R, DIM), (n, R, 4)]
    return [np.lib.format.open_memmap(f'{p}.partial', 'w+', np.float32, shape) for p, shape in zip(outs, shapes)]


@torch.inference_mode()
def write_features(loader, arrays: list, state: dict, state_path: str, trunk, detector, device):
    """Fill arrays from image state['done'] on, batch by batch; after each batch is flushed to
    disk, state['done'] is saved (atomically) to state_path."""
    with util.progress(total=len(arrays[0]) - state['done'], desc='features', unit='img') as bar:
        for x, originals in loader:
            i0, i1 = state['done'], state['done'] + len(x)
            boxes = None if detector is None else [detect(detector, img.to(device)) for img in originals]
            arrays[0][i0:i1] = regions(trunk, x.to(device), boxes).cpu().numpy()  # (n, 36, 2048)
            if boxes is not None:
                arrays[1][i0:i1] = torch.stack(boxes).cpu().numpy()  # (n, 36, 4)
            for a in arrays:
                a.flush()
            state['done'] = i1
            util.atomic_write(state_path, lambda f: f.write(json.dumps(state).encode()))
            bar.update(len(x))


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
    p.add_argument('--image_size', type=util.positive_int, default=448, help='side of the square ResNet input')
    p.add_argument('--batch_size', type=util.positive_int, default=32, help='images per forward pass')
    p.add_argument('--workers', type=util.nonneg_int, default=2, help='image decoding processes')
    p.add_argument('--device', help='cuda, cpu or mps (default: cuda when present, else mps, else cpu)')
    p.add_argument('--seed', type=int, default=0, help='random weights of --weights none')
    p.add_argument('--overwrite', action='store_true', help='replace an existing output, restart a partial run')
    args = p.parse_args(argv)
    if args.image_size < 32:
        p.error(f'--image_size {args.image_size}: at least 32 (ResNet-152 reduces it 32 times)')
    if args.detector_weights and args.regions != 'boxes':
        p.error('--detector_weights goes with --regions boxes')
    if args.detector_weights is None:
        args.detector_weights = 'none' if args.weights == 'none' else 'DEFAULT'
    return args


def _settings(args, names: list, device) -> dict:
    """What changes the features' bits: a partial run continues only under the same settings."""
    real = {w: w if w in ('DEFAULT', 'none') else os.path.realpath(w) for w in (args.weights, args.detector_weights)}
    return {'regions': args.regions, 'weights': real[args.weights], 'image_size': args.image_size,
            'detector_weights': real[args.detector_weights] if args.regions == 'boxes' else None,
            'batch_size': args.batch_size, 'seed': args.seed, 'device': device.type,
            'image_root': os.path.realpath(args.image_root),
            'names_sha256': hashlib.sha256('\n'.join(names).encode()).hexdigest()}


def main(argv=None):
    args = parse_args(argv)
    with util.one_line_errors():
        t0, device = time.time(), util.pick_device(args.device)
        folder = os.path.join(args.data_path, args.data_name)
        names_path = os.path.join(folder, f'{args.split}_image_names.txt')
        names, listed = read_names(names_path, args.image_root)
        kinds = ('ims', 'boxes') if args.regions == 'boxes' else ('ims',)
        outs = [os.path.join(folder, f'{args.split}_{kind}.npy') for kind in kinds]  # features first
        state = {'settings': _settings(args, names, device), 'done': 0}
        state['done'] = done = resume_point(outs, state['settings'], args.overwrite)
        util.check_writable(outs[0], '--data_path')
        if args.weights == 'none' or (args.regions == 'boxes' and args.detector_weights == 'none'):
            print(f'random weights (--weights none, --seed {args.seed}): for tests and timing only, not for '
                  f'matching', file=sys.stderr)
        if device.type == 'cuda':  # fp32 convolutions, the same algorithm every run (exact resume)
            torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = False, True
        trunk = build_trunk(args.weights, args.seed).to(device)
        detector = None if args.regions == 'grid' else build_detector(
            args.detector_weights, args.seed, args.image_size).to(device)
        check_images(args.image_root, names[done:], args.workers)  # those written before were checked then
        if listed:
            util.atomic_write(names_path, lambda f: f.write(''.join(f'{n}\n' for n in names).encode()))
        state_path = f'{outs[0]}.partial.json'  # first: a killed run never leaves a wrong one
        util.atomic_write(state_path, lambda f: f.write(json.dumps(state).encode()))
        arrays = open_partials(outs, len(names), done)
        todo = Images([os.path.join(args.image_root, n) for n in names[done:]], args.image_size, detector is not None)
        loader = DataLoader(todo, args.batch_size, num_workers=args.workers, collate_fn=collate,
                            pin_memory=device.type == 'cuda')
        t1 = time.time()
        write_features(loader, arrays, state, state_path, trunk, detector, device)
        rate = (len(names) - done) / max(time.time() - t1, 1e-9)
        del arrays  # unmapped: flushed and closed
        for p in reversed(outs):  # the features last: {split}_ims.npy exists only when all is done
            os.replace(f'{p}.partial', p)
        os.remove(state_path)
        resumed = f' (resumed after {done})' if done else ''
        print(f'{len(names) - done} images{resumed} in {time.time() - t0:.1f} s, {rate:.2f} images/s '
              f'(feature extraction): {", ".join(outs)}')
    return outs


if __name__ == '__main__':
    main()
