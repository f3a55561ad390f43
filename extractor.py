"""The networks that turn images into region features: the ResNet-152 trunk and the Faster R-CNN
detector with their weights (torchvision's, a local file, or seeded random ones), the 6x6 grid
cells, detection (NMS across classes, free slots filled with cells spread over the image) and
pooling each input's feature map on the grid or its boxes. `extract` is the one step both
features.py's write loop and photo.py's uploads take: a batch of inputs -> features and boxes.
RECIPE versions what these functions compute (the settings record holds it).
"""
import os
import sys

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

import checkpoint
from featstore import grid_boxes
from imagefiles import LONG_CAP

R, GRID, DIM = 36, 6, 2048  # regions = GRID x GRID cells, ResNet-152's last channels
RECIPE = 2  # bumped when the same flags give other features (2: aspect kept, detector at 800, cells spread)
NMS_IOU = 0.5


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


def build_models(settings: dict, device) -> tuple:
    """The extractor that settings name (features.py's flags as a dict, or its record's settings:
    weights, seed, regions, detector_weights, detector_size) -> (trunk, detector or None for grid
    regions), on device."""
    trunk = build_trunk(settings['weights'], settings['seed']).to(device)
    detector = (build_detector(settings['detector_weights'], settings['seed'], settings['detector_size']).to(device)
                if settings['regions'] == 'boxes' else None)
    return trunk, detector


def grid_cells() -> Tensor:
    """The 6x6 grid as boxes (36, 4) (x1, y1, x2, y2) in [0, 1]: cell r = row r // 6, column r % 6."""
    return torch.from_numpy(grid_boxes(R)).float()


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


def extract(trunk: nn.Module, detector, xs: list, dets: list, device) -> tuple:
    """n trunk inputs (3, h, w) and their detector inputs (uint8, or Nones without a detector) ->
    region features (n, 36, 2048) and boxes (n, 36, 4) in [0, 1] (None without a detector), on device."""
    boxes = None if detector is None else [detect(detector, det.to(device)) for det in dets]
    feats = regions(trunk, [x.to(device) for x in xs], boxes)  # (n, 36, 2048)
    return feats, None if boxes is None else torch.stack(boxes)  # (n, 36, 4)
