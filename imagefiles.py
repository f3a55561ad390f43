"""Image files -> the networks' inputs: the list of names (a names file, or a folder's pictures),
decoding (upright RGB, transparency over white, JPEGs in Pillow's draft mode, the --max_pixels
bound read from the header), the up-front check that every image decodes, and the resized,
normalized tensors the trunk and the detector take (Images, collate). features.py and photo.py
decode through here; extractor.py holds the networks.
"""
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

import util
from image_names import check_image_names, read_image_names

EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp', '.webp')
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # ImageNet
LONG_CAP = 1333 / 800  # longer side at most this times the shorter one's size (torchvision detection's ratio)


def read_names(path: str, image_root: str) -> tuple:
    """{split}_image_names.txt -> (names, False); without that file, the image files directly in
    image_root sorted by name -> (names, True). Either way checked as image_names.check_image_names does
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
